"""``pfl bench aggregation``: the server's aggregation time against the number of replies.

Times :func:`cloud_server.aggregation.fedavg` (validation of every reply: names, shapes,
dtypes, finiteness, norm bound; then the example-weighted mean) on replies shaped like the
model's real stage-1 arrays (the task LoRA, and PerFit stage 1 + shared stage 2, whose R are
then re-orthonormalized as the server does after every round). Replies are the initial
arrays plus seeded noise, so every one is valid. Medians of ``repeats`` runs.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Sequence

import numpy as np
from cloud_server.aggregation import Reply, fedavg
from cloud_server.server_app import initial_arrays
from shared.methods.perfit import reorthonormalize_perfit


def bench_aggregation(counts: Sequence[int] = (10, 100, 1000), *, model: str = "tiny",
                      repeats: int = 3, seed: int = 0) -> dict[str, Any]:

    rng = np.random.default_rng(seed)
    rows = []
    for kind in ("lora", "perfit"):
        base = initial_arrays(kind, model)
        nbytes = int(sum(np.asarray(v).nbytes for v in base.values()))
        for count in counts:
            replies = [Reply(node=i, arrays={k: (v + 0.01 * rng.standard_normal(v.shape))
                                              .astype(np.float32) for k, v in base.items()},
                             num_examples=int(rng.integers(5, 50)))
                       for i in range(count)]
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                result = fedavg(replies, base)
                if kind == "perfit":
                    reorthonormalize_perfit(result.arrays)
                times.append(time.perf_counter() - t0)
            assert len(result.accepted) == count
            median = statistics.median(times)
            rows.append({"kind": kind, "replies": count, "bytes_per_reply": nbytes,
                         "seconds": median, "ms_per_reply": 1000 * median / count,
                         "mb_per_second": count * nbytes / median / 1e6})
            del replies
    return {"model": model, "repeats": repeats, "rows": rows}


def aggregation_table(result: dict[str, Any]) -> str:
    lines = [f"server aggregation (validate + weighted mean), model {result['model']}, "
             f"median of {result['repeats']}",
             f"{'arrays':<8} {'replies':>8} {'KB/reply':>9} {'seconds':>9} {'ms/reply':>9} "
             f"{'MB/s':>8}"]
    for r in result["rows"]:
        lines.append(f"{r['kind']:<8} {r['replies']:>8,} {r['bytes_per_reply'] / 1024:>9.1f} "
                     f"{r['seconds']:>9.3f} {r['ms_per_reply']:>9.3f} {r['mb_per_second']:>8.0f}")
    return "\n".join(lines)


def aggregation_plot(result: dict[str, Any], path) -> Any:
    # lazy: matplotlib loads only when a figure is drawn
    from simulations.plots import new_figure, save_figure

    fig, axis = new_figure(size=(5, 4))
    for kind in ("lora", "perfit"):
        rows = [r for r in result["rows"] if r["kind"] == kind]
        axis.plot([r["replies"] for r in rows], [r["seconds"] for r in rows], marker="o",
                  label=f"{kind} ({rows[0]['bytes_per_reply'] / 1024:.0f} KB/reply)")
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("replies aggregated")
    axis.set_ylabel("seconds")
    axis.set_title(f"server aggregation, {result['model']}")
    axis.legend()
    return save_figure(fig, path)
