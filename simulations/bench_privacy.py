"""``pfl bench privacy``: what secure aggregation and differential privacy cost stage 1.

For each number of simulated devices and each setting (plain FedAvg, DP, SecAgg+, SecAgg+
with DP) it runs real stage-1 rounds (:func:`cloud_server.server_app.run_stage1`) on an
in-process grid (:class:`simulations.simulate.LocalGrid`: every device its own ClientApp,
context and ledger, every message copied as from the wire) and reports:

- seconds per round (the whole run divided by its rounds; the devices train one after the
  other in this process, so a round's time is the sum of the devices' work plus the
  server's), the devices' own training seconds, and the rest (the protocol, the server, the
  messages): the part secure aggregation and DP change; medians of ``repeats`` runs;
- bytes per device and round, up (every reply, as the device's ledger recorded it: keys,
  shares and masked vectors under SecAgg+) and down (every message it answered).

Every device trains ``max_steps`` local steps on one synthetic user; DP uses noise
multiplier 1.0 and clipping norm 0.1 (its cost in time is the clipping and the noise; its
cost in quality is in simulations/reports/privacy/dp-utility.md).
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from shared.files import human_bytes

#: The settings compared: name -> run-config keys.
SETTINGS: dict[str, dict[str, Any]] = {
    "plain": {},
    "dp": {"dp-noise-multiplier": 1.0, "dp-clipping-norm": 0.1},
    "secagg": {"secagg": True},
    "secagg+dp": {"secagg": True, "dp-noise-multiplier": 1.0, "dp-clipping-norm": 0.1},
}


def _ledger_bytes(run_dir: Path) -> tuple[int, int, int]:
    """(bytes up, bytes down, devices) of the stage-1 entries of every ledger under run_dir."""
    up = down = devices = 0
    for path in sorted(run_dir.glob("clients/partition-*/ledger.jsonl")):
        devices += 1
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            if entry.get("message_type") != "train":
                continue
            up += int(entry.get("payload_bytes") or 0)
            down += int((entry.get("meta") or {}).get("inbound_bytes") or 0)
    return up, down, devices


def bench_privacy(counts: Sequence[int] = (5, 20, 100), *, model: str = "tiny",
                  method: str = "lora", rounds: int = 2, max_steps: int = 1,
                  settings: Sequence[str] = tuple(SETTINGS), secagg_num_shares: int = 0,
                  repeats: int = 3,
                  work_dir: Path | None = None,
                  on_row: Callable[[dict], None] | None = None) -> dict[str, Any]:
    # lazy: a command loads only what it runs (pfl --help loads no torch)
    from cloud_server.server_app import run_stage1
    from edge_client.client_app import make_client_app
    from simulations.simulate import LocalGrid

    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise ValueError(f"unknown settings {unknown} (known: {', '.join(SETTINGS)})")
    root = Path(work_dir or tempfile.mkdtemp(prefix="pfl-bench-privacy-"))
    rows: list[dict[str, Any]] = []
    quiet = logging.getLogger("flwr")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # SecAgg+ logs every stage of every device
    try:
        for count in counts:
            for name in settings:
                totals, trainings = [], []
                for repeat in range(repeats):
                    run_dir = root / f"{name}-{count}-{repeat}"
                    shutil.rmtree(run_dir, ignore_errors=True)
                    config = {"method": method, "rounds": rounds, "model": model,
                              "num-users-per-client": 1, "run-dir": str(run_dir),
                              "num-clients": count, "max-steps": max_steps,
                              "max-examples": 64, "secagg-num-shares": secagg_num_shares,
                              **SETTINGS[name]}
                    grid = LocalGrid(make_client_app({"device-root": str(run_dir)}), count)
                    started = time.perf_counter()
                    summary = run_stage1(grid, config)
                    totals.append((time.perf_counter() - started) / rounds)
                    up, down, devices = _ledger_bytes(run_dir)
                    trained = 0.0
                    for state in run_dir.glob("clients/partition-*/state.json"):
                        trained += sum(float(r.get("seconds", 0.0)) for r in
                                       json.loads(state.read_text()).get("rounds", []))
                    trainings.append(trained / rounds)
                    shutil.rmtree(run_dir, ignore_errors=True)
                rest = [t - d for t, d in zip(totals, trainings)]
                row = {"devices": count, "setting": name, "repeats": repeats,
                       "seconds_per_round": statistics.median(totals),
                       "training_seconds_per_round": statistics.median(trainings),
                       "protocol_seconds_per_round": statistics.median(rest),
                       "up_bytes_per_device_round": up / max(1, devices) / rounds,
                       "down_bytes_per_device_round": down / max(1, devices) / rounds,
                       "accepted": summary["accepted"],
                       "epsilon": (summary.get("dp") or {}).get("epsilon"),
                       "secagg": summary.get("secagg")}
                rows.append(row)
                if on_row is not None:
                    on_row(_result(model, method, rounds, max_steps, rows))
    finally:
        quiet.setLevel(level)
        if work_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    return _result(model, method, rounds, max_steps, rows)


def _result(model, method, rounds, max_steps, rows) -> dict[str, Any]:
    return {"model": model, "method": method, "rounds": rounds, "max_steps": max_steps,
            "settings": {k: SETTINGS[k] for k in SETTINGS}, "rows": list(rows)}


def privacy_table(result: dict[str, Any]) -> str:
    lines = [f"stage 1 ({result['method']}, model {result['model']}, {result['max_steps']} "
             f"local step(s), {result['rounds']} rounds; medians): cost of SecAgg+ and DP",
             f"{'devices':>7} {'setting':<10} {'s/round':>8} {'training':>9} {'rest':>7} "
             f"{'x plain':>8} {'up/device':>10} {'down/device':>12} {'epsilon':>8}"]
    plain = {r["devices"]: r for r in result["rows"] if r["setting"] == "plain"}
    for r in result["rows"]:
        base = plain.get(r["devices"])
        ratio = (f"{r['protocol_seconds_per_round'] / base['protocol_seconds_per_round']:.1f}"
                 if base and base["protocol_seconds_per_round"] > 0 else "-")
        eps = f"{r['epsilon']:.2f}" if r.get("epsilon") else "-"
        lines.append(f"{r['devices']:>7} {r['setting']:<10} {r['seconds_per_round']:>8.2f} "
                     f"{r['training_seconds_per_round']:>9.2f} "
                     f"{r['protocol_seconds_per_round']:>7.2f} {ratio:>8} "
                     f"{human_bytes(r['up_bytes_per_device_round']):>10} "
                     f"{human_bytes(r['down_bytes_per_device_round']):>12} {eps:>8}")
    lines.append("training: the devices' own training (summed; they run one after the other); "
                 "rest: the protocol, the server and the messages; x plain: rest against "
                 "plain FedAvg's")
    return "\n".join(lines)


def privacy_plot(result: dict[str, Any], path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name in result["settings"]:
        rows = [r for r in result["rows"] if r["setting"] == name]
        if not rows:
            continue
        xs = [r["devices"] for r in rows]
        axes[0].plot(xs, [r["protocol_seconds_per_round"] for r in rows], marker="o",
                     label=name)
        axes[1].plot(xs, [r["up_bytes_per_device_round"] / 1024 for r in rows], marker="o",
                     label=name)
    axes[0].set(xscale="log", yscale="log", xlabel="devices per round",
                ylabel="seconds per round beside training", title="protocol + server time")
    axes[1].set(xscale="log", yscale="log", xlabel="devices per round",
                ylabel="KiB up per device and round", title="upload per device")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
