"""``pfl bench population``: a simulated population's throughput and peak memory.

For each population size the benchmark runs, as child processes on Flower's simulation
engine (Ray):

1. ``pfl simulate`` (every phase of the method, tiny model by default) with a fixed number of
   clients sampled per stage-1 round, and
2. a **no-op** federation through the same engine: Flower's own FedAvg with the same sampling
   and the same stage-1 arrays, and a ClientApp that sends the arrays straight back. Its
   client updates per second are Flower's floor on this machine, so ``ratio`` (ours / no-op)
   says how much of a round the method's own work takes.

Memory is the peak, over the whole run, of the summed resident set size (RSS) of the child
and all its descendants (Ray's GCS, raylet and workers included), sampled every
``interval`` seconds with psutil. Summed RSS counts pages shared between processes once per
process, so it is an upper bound of what the run needs; it is the same measure at every
population size, which is what the flatness check compares.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import psutil

from cloud_server.server_app import initial_arrays
from shared.errors import PflError
from shared.records import to_array_record
from simulations.simulate import run_on_engine


# ------------------------------------------------------------------- measuring a child
def tree_rss(process: psutil.Process) -> int:
    """Summed RSS in bytes of ``process`` and all its live descendants."""
    total = 0
    try:
        members = [process] + process.children(recursive=True)
    except psutil.Error:
        return 0
    for member in members:
        try:
            total += member.memory_info().rss
        except psutil.Error:  # exited between listing and reading
            continue
    return total


def run_measured(command: Sequence[str], *, log_path: Path, interval: float = 0.25,
                 timeout: float | None = None, env: dict[str, str] | None = None
                 ) -> dict[str, Any]:
    """Run ``command`` with its output in ``log_path``; return wall seconds, exit code and
    the peak summed RSS of its process tree. The child runs in its own process group, which
    is stopped (TERM, then KILL) if it outlives ``timeout`` or this call is interrupted."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log_path, "wb") as log:
        child = subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT,
                                 env=env, start_new_session=True)
        peak = 0
        stop = threading.Event()
        watched = psutil.Process(child.pid)

        def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, tree_rss(watched))
                stop.wait(interval)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            code = child.wait(timeout=timeout)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            _stop_group(child)
            raise
        finally:
            stop.set()
            sampler.join()
            _stop_group(child)  # Ray daemons the child left behind, if any
    return {"returncode": code, "wall_seconds": time.perf_counter() - started,
            "peak_rss_bytes": peak}


def _group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` is still running (zombies do not count)."""
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error, OSError):
            continue
    return False


def _stop_group(child: subprocess.Popen) -> None:
    """TERM the child's process group, then KILL what is left after a grace period."""
    import signal

    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        if child.poll() is not None and not _group_alive(child.pid):
            return
        try:
            os.killpg(child.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            child.poll()  # reap our own child
            if not _group_alive(child.pid):
                return
            time.sleep(0.2)


# ---------------------------------------------------------------------- the no-op run
def run_noop(num_clients: int, sample: int, rounds: int, method: str, model: str,
             out: Path, num_cpus_per_client: float = 1.0) -> dict[str, Any]:
    """Flower's FedAvg over ``num_clients`` virtual clients whose ClientApp only echoes the
    arrays; same engine, sampling and payload (``method``'s stage-1 arrays) as pfl's run."""
    import numpy as np
    from flwr.app import Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg


    arrays = initial_arrays(method, model)
    client_app = ClientApp()

    @client_app.train()
    def echo(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"arrays": msg.content["arrays"],
                                   "metrics": MetricRecord({"num-examples": 1})}),
                       reply_to=msg)

    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(fraction_train=sample / num_clients, fraction_evaluate=0.0,
                          min_train_nodes=sample, min_evaluate_nodes=0,
                          min_available_nodes=num_clients)
        record = to_array_record(arrays)
        t0 = time.perf_counter()
        strategy.start(grid=grid, initial_arrays=record, num_rounds=rounds, timeout=3600.0)
        seconds = time.perf_counter() - t0
        out.write_text(json.dumps({"updates": sample * rounds, "seconds": seconds,
                                   "bytes_per_update": int(sum(np.asarray(v).nbytes
                                                               for v in arrays.values()))}))

    run_on_engine(server_app, client_app, num_clients,  # the same engine as pfl simulate's
                  num_cpus_per_client=num_cpus_per_client)
    if not out.is_file():
        raise PflError("the no-op simulation ended without a result (see its log)")
    return json.loads(out.read_text())


# -------------------------------------------------------------------------- the suite
STAGE1_OF = {"perfit": "perfit", "oppu": "lora", "perpcs": "lora", "lora-c": "lora"}


def bench_population(populations: Sequence[int], *, sample: int = 100, rounds: int = 3,
                     method: str = "perfit", model: str = "tiny", max_steps: int | None = 2,
                     targets: int = 4, sharers: int = 2, work_dir: Path = Path("runs/bench-population"),
                     timeout: float | None = None, progress: bool = True,
                     on_row=None) -> dict[str, Any]:
    """Measure ``pfl simulate`` and the no-op run at each population size (see module doc).
    ``on_row(result so far)`` is called after every run (to save partial results); a run
    that fails is kept as a row with ``failed`` and its log, and the others go on."""
    if method not in STAGE1_OF:
        raise PflError(f"--method must be one of {', '.join(STAGE1_OF)}")
    if any(n <= sample + targets + sharers for n in populations):
        raise PflError(f"every population must exceed --sample-per-round + targets + sharers "
                       f"({sample + targets + sharers})")
    work_dir = Path(work_dir).resolve()

    def _result(rows: list) -> dict[str, Any]:
        return {"method": method, "model": model, "sample_per_round": sample,
                "rounds": rounds, "max_steps": max_steps, "cpu_count": os.cpu_count(),
                "total_memory_bytes": psutil.virtual_memory().total, "rows": list(rows)}

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    rows = []
    for n in populations:
        for kind in ("noop", "pfl"):
            run_dir = work_dir / f"{kind}-{n}"
            out = run_dir / "result.json"
            run_dir.mkdir(parents=True, exist_ok=True)
            out.unlink(missing_ok=True)
            if kind == "noop":
                command = [sys.executable, "-m", "simulations.bench_population", "noop",
                           str(n), str(sample), str(rounds), STAGE1_OF[method], model, str(out)]
            else:
                command = [sys.executable, "-m", "simulations.cli", "simulate",
                           "--model", model, "--task", "synthetic", "--clients", str(n),
                           "--sample-per-round", str(sample), "--rounds", str(rounds),
                           "--method", method, "--targets", str(targets),
                           "--sharers", str(sharers), "--run-dir", str(run_dir / "run"),
                           "--out", str(out)]
                if max_steps is not None:
                    command += ["--max-steps", str(max_steps)]
            if progress:
                print(f"[{n} clients] {kind} ...", flush=True)
            try:
                measured = run_measured(command, log_path=run_dir / "log.txt",
                                        timeout=timeout, env=env)
            except subprocess.TimeoutExpired:
                measured = {"returncode": "timeout", "wall_seconds": timeout,
                            "peak_rss_bytes": 0}
            if measured["returncode"] != 0 or not out.is_file():
                # Reported, not hidden: the row says it failed and where the log is.
                rows.append({"clients": n, "kind": kind, "failed": True,
                             "returncode": measured["returncode"],
                             "log": str(run_dir / "log.txt"),
                             "wall_seconds": measured["wall_seconds"],
                             "peak_rss_bytes": measured["peak_rss_bytes"]})
                if progress:
                    print(f"[{n} clients] {kind}: FAILED (exit {measured['returncode']}); "
                          f"see {run_dir / 'log.txt'}", flush=True)
                if on_row is not None:
                    on_row(_result(rows))
                continue
            result = json.loads(out.read_text())
            if kind == "noop":
                updates, seconds = result["updates"], result["seconds"]
                phases = {"stage1": seconds}
            else:
                stage1 = result["stage1"][STAGE1_OF[method]]
                updates = int(sum(stage1["replies"]))
                phases = dict(result["phase_seconds"])
                seconds = phases[f"stage1-{STAGE1_OF[method]}"]
            row = {"clients": n, "kind": kind, "updates": updates, "stage1_seconds": seconds,
                   "updates_per_second": updates / seconds if seconds else float("nan"),
                   "wall_seconds": measured["wall_seconds"],
                   "peak_rss_bytes": measured["peak_rss_bytes"], "phase_seconds": phases}
            rows.append(row)
            if on_row is not None:
                on_row(_result(rows))
            if progress:
                print(f"[{n} clients] {kind}: {updates} updates in {seconds:.1f} s "
                      f"({row['updates_per_second']:.2f}/s), peak RSS "
                      f"{row['peak_rss_bytes'] / 2**30:.2f} GiB, wall "
                      f"{row['wall_seconds']:.0f} s", flush=True)
    return _result(rows)


def population_table(result: dict[str, Any]) -> str:
    """Per population: updates/s of pfl and of the no-op floor, their ratio, peak memory."""
    by = {(r["clients"], r["kind"]): r for r in result["rows"]}
    sizes = sorted({r["clients"] for r in result["rows"]})
    lines = [f"method {result['method']}, model {result['model']}, "
             f"{result['sample_per_round']} clients per round x {result['rounds']} rounds, "
             f"max-steps {result['max_steps']}",
             f"{'clients':>8} {'pfl upd/s':>10} {'no-op upd/s':>12} {'ratio':>6} "
             f"{'pfl peak RSS':>13} {'no-op peak RSS':>15} {'pfl wall s':>11}"]
    for n in sizes:
        ours, floor = by.get((n, "pfl")), by.get((n, "noop"))
        if not ours or not floor:
            continue
        if ours.get("failed") or floor.get("failed"):
            failed = [r["kind"] for r in (ours, floor) if r.get("failed")]
            lines.append(f"{n:>8,}  FAILED: {', '.join(failed)} (exit "
                         f"{(ours if ours.get('failed') else floor)['returncode']}; see "
                         f"{(ours if ours.get('failed') else floor)['log']})")
            continue
        lines.append(f"{n:>8,} {ours['updates_per_second']:>10.2f} "
                     f"{floor['updates_per_second']:>12.2f} "
                     f"{ours['updates_per_second'] / floor['updates_per_second']:>6.2f} "
                     f"{ours['peak_rss_bytes'] / 2**30:>10.2f} GiB "
                     f"{floor['peak_rss_bytes'] / 2**30:>12.2f} GiB {ours['wall_seconds']:>11.0f}")
    done = [n for n in sizes if (n, "pfl") in by and not by[(n, "pfl")].get("failed")]
    if len(done) > 1:
        sizes = done
        first, last = by[(sizes[0], "pfl")], by[(sizes[-1], "pfl")]
        growth = last["peak_rss_bytes"] / first["peak_rss_bytes"] - 1
        lines.append(f"peak memory at {sizes[-1]:,} vs {sizes[0]:,} clients: "
                     f"{growth:+.1%} (target: within +25%)")
        rate = last["updates_per_second"] / first["updates_per_second"] - 1
        lines.append(f"pfl update rate at {sizes[-1]:,} vs {sizes[0]:,} clients: "
                     f"{rate:+.1%} (target: within -25%)")
    return "\n".join(lines)


def population_plot(result: dict[str, Any], path: Path) -> Path:
    """Updates/s and peak RSS against population size, pfl and no-op."""
    # lazy: matplotlib loads only when a figure is drawn
    from simulations.plots import new_figure, save_figure

    fig, (left, right) = new_figure(2, (10, 4))
    for kind, label in (("pfl", f"pfl ({result['method']})"), ("noop", "no-op ClientApp")):
        rows = sorted((r for r in result["rows"] if r["kind"] == kind and not r.get("failed")),
                      key=lambda r: r["clients"])
        xs = [r["clients"] for r in rows]
        left.plot(xs, [r["updates_per_second"] for r in rows], marker="o", label=label)
        right.plot(xs, [r["peak_rss_bytes"] / 2**30 for r in rows], marker="o", label=label)
    for axis, title in ((left, "client updates per second"), (right, "peak RSS, all processes (GiB)")):
        axis.set_xscale("log")
        axis.set_xlabel("virtual clients")
        axis.set_title(title)
        axis.set_ylim(bottom=0)
        axis.legend()
    return save_figure(fig, path)


if __name__ == "__main__":  # the no-op child: noop N SAMPLE ROUNDS KIND MODEL OUT
    if len(sys.argv) == 8 and sys.argv[1] == "noop":
        _, _, n, s, r, kind, model, out_path = sys.argv
        run_noop(int(n), int(s), int(r), kind, model, Path(out_path))
    else:
        sys.exit("usage: python -m simulations.bench_population noop N SAMPLE ROUNDS KIND "
                 "MODEL OUT")
