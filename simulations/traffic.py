"""``pfl bench traffic RUN_DIR``: uplink and downlink bytes per client, per phase, read from
the devices' audit ledgers of a federation run (``pfl simulate`` / ``pfl demo``).

- Uplink: every ledger entry is one outbound payload (``payload_bytes``): the Flower reply of
  a phase, and the pool calls a device made while handling it (a pool entry belongs to the
  phase of the next Flower reply in the same ledger, since the reply is written when the
  handler returns).
- Downlink: the Flower message the device received (``meta.inbound_bytes``, written by the
  audit mod beside the reply) plus what it fetched from the piece pool, which the device
  reports as ``pool-download-bytes`` in the reply's metrics (also in the ledger).

Stage 1 is split by what was trained: the task LoRA (OPPU, PER-PCS, LoRA-C) or PerFit.
Personalization and evaluation carry every method of the run in one message each.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any
from edge_client.audit.ledger import PHASE_ORDER, entry_phases, read_entries
from edge_client.state import ledger_paths
from shared.errors import PflError

def _pool_download(entry: dict) -> int:
    for value in (entry.get("fields") or {}).values():
        if isinstance(value, dict) and "pool-download-bytes" in value:
            return int(value["pool-download-bytes"])
    return 0


def ledger_traffic(run_dir: str | Path) -> dict[str, Any]:
    """Per phase: how many clients took part and their uplink / downlink bytes."""

    paths = ledger_paths(run_dir)
    if not paths:
        raise PflError(f"no device ledgers under {run_dir}/clients (is it a run folder?)")
    per_client: dict[str, dict[int, dict[str, int]]] = defaultdict(dict)
    for pid, path in paths.items():
        entries = read_entries(path)
        for entry, phase in zip(entries, entry_phases(entries)):
            if phase is None:  # after the last Flower reply: not a federation phase
                continue
            totals = per_client[phase].setdefault(pid, {"up": 0, "down": 0, "messages": 0})
            totals["up"] += int(entry.get("payload_bytes") or 0)
            if entry["channel"] == "flower":
                totals["down"] += int((entry.get("meta") or {}).get("inbound_bytes") or 0) \
                    + _pool_download(entry)
                totals["messages"] += 1
    phases = []
    for phase in sorted(per_client,
                        key=lambda p: PHASE_ORDER.index(p) if p in PHASE_ORDER else 99):
        clients = per_client[phase]
        ups = [c["up"] for c in clients.values()]
        downs = [c["down"] for c in clients.values()]
        phases.append({"phase": phase, "clients": len(clients),
                       "messages": sum(c["messages"] for c in clients.values()),
                       "up_median": statistics.median(ups), "up_max": max(ups),
                       "down_median": statistics.median(downs), "down_max": max(downs),
                       "up_total": sum(ups), "down_total": sum(downs)})
    return {"run_dir": str(run_dir), "ledgers": len(paths), "phases": phases}


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1000
    return f"{size} B"  # pragma: no cover


def traffic_table(result: dict[str, Any]) -> str:
    lines = [f"traffic per client, from {result['ledgers']} device ledgers in {result['run_dir']}",
             f"{'phase':<17} {'clients':>7} {'uplink median':>14} {'uplink max':>11} "
             f"{'downlink median':>16} {'downlink max':>13}"]
    for p in result["phases"]:
        lines.append(f"{p['phase']:<17} {p['clients']:>7,} {_human(p['up_median']):>14} "
                     f"{_human(p['up_max']):>11} {_human(p['down_median']):>16} "
                     f"{_human(p['down_max']):>13}")
    return "\n".join(lines)


def traffic_plot(result: dict[str, Any], path: Path) -> Path:
    # lazy: matplotlib loads only when a figure is drawn
    from simulations.plots import new_figure, save_figure

    phases = [p["phase"] for p in result["phases"]]
    xs = range(len(phases))
    fig, axis = new_figure(size=(7, 4))
    axis.bar([x - 0.2 for x in xs], [max(1, p["up_median"]) for p in result["phases"]],
             width=0.4, label="uplink (median client)")
    axis.bar([x + 0.2 for x in xs], [max(1, p["down_median"]) for p in result["phases"]],
             width=0.4, label="downlink (median client)")
    axis.set_xticks(list(xs), phases, rotation=20)
    axis.set_yscale("log")
    axis.set_ylabel("bytes per client")
    axis.set_title("bytes on the wire per phase (audit ledgers)")
    axis.legend()
    return save_figure(fig, path)
