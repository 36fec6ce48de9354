"""``pfl bench personalize``: personalization time per user against history length (the
PER-PCS paper's Figure 7, bottom).

One target user (the one with the longest history) is personalized with its N most recent
items, for each N, by the very cores ``pfl eval`` and the devices run: OPPU (personal LoRA
training), PER-PCS (assembly from a pool, no training) and PerFit (stage-2 training). The
collective parts are built once and reused: a small PER-PCS pool trained by ``sharers``
sharers on ``sharer_history`` items each, and fresh stage-1 parts (the time of a
personalization step does not depend on the values of the frozen collective parameters, so
stage 1 is not trained here). OPPU trains ``personal_epochs`` epochs and PerFit stage 2
``perfit_epochs`` (default: the same number, so both pass over the history as often); OPPU
is timed twice, as this system trains it and with gradient checkpointing (``oppu-ckpt``, as
the authors' code trains it). Each
cell is the median of ``repeats`` runs; all methods are
timed in the same process, one after the other, so their ratios are comparable.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Sequence
from shared.data import load_dataset
from shared.methods.perpcs.core import piece_pool
from shared.methods.base import Runtime, parse_method
from shared.methods.perfit import PerFitConfig, new_stages
from shared.models import load_model
from shared.types import recent_history

#: column -> (method, extra run options). "oppu-ckpt" is OPPU trained with gradient
#: checkpointing, as the PER-PCS/OPPU authors' code trains (``grad_ckpt=True``): the same
#: adapter, one more forward pass per step; the paper's ~7x compute ratio was measured so.
METHODS = {"oppu": ("oppu", {}),
           "oppu-ckpt": ("oppu", {"oppu": {"gradient_checkpointing": True}}),
           "perpcs": ("perpcs", {}), "perfit": ("perfit", {}),
           # loss routing: one forward pass per sharer over the selection items
           "perpcs-loss-routing": ("perpcs", {"perpcs": {"routing": "loss"}}),
           # the shipped synthetic recipe's PER-PCS: loss routing on the latest 4 selection
           # items, then the held-out check (4 items, margin 0.2)
           "perpcs-shipped": ("perpcs", {"perpcs": {"routing": "loss", "loss_items": 4,
                                                    "check_margin": 0.2}})}


def bench_personalize(model: str = "smollm2-135m", task: str = "news-headline",
                      data: str | None = None, lengths: Sequence[int] = (5, 10, 20, 40),
                      *, sharers: int = 3, sharer_history: int = 10,
                      personal_epochs: float = 2.0, perfit_epochs: float | None = None,
                      repeats: int = 1, seed: int = 0,
                      progress: bool = True) -> dict[str, Any]:

    dataset = load_dataset(task, data, seed=seed)
    users = sorted(dataset.users(limit=max(50, sharers + 1)), key=lambda u: -len(u.history))
    target, sharer_users = users[0], users[1: 1 + sharers]
    if len(target.history) < max(lengths):
        lengths = [n for n in lengths if n <= len(target.history)]
    loaded = load_model(model, seed=seed)
    # The pool is set-up, not what is timed: few gate steps (the values of the gates do not
    # change the cost of an assembly, only which pieces it picks).
    options = {"max_history": sharer_history, "personal_epochs": personal_epochs,
               "perpcs": {"gate_steps": 20},
               "perfit": {"epochs": perfit_epochs if perfit_epochs is not None
                          else personal_epochs}}
    shared = Runtime(loaded=loaded, task=dataset.task, seed=seed, progress=False,
                     options=options, roles={"sharers": sharer_users})
    shared.cache.stage1 = loaded.model  # untrained stage 1: same cost, no training here
    config = PerFitConfig()
    shared.cache.perfit_stage1 = new_stages(config, loaded.model.config.num_hidden_layers,
                                               loaded.model.config.hidden_size, seed=seed)
    t0 = time.perf_counter()
    pool = piece_pool(shared)
    pool_seconds = time.perf_counter() - t0
    if progress:
        print(f"pool: {len(pool.pool)} pieces from {sharers} sharers in {pool_seconds:.0f} s",
              flush=True)
    rows = []
    for n in lengths:
        user = recent_history(target, n)
        row: dict[str, Any] = {"history": n}
        for column, (name, extra) in METHODS.items():
            runtime = Runtime(loaded=loaded, task=dataset.task, seed=seed, progress=False,
                              options={**options, **extra, "max_history": n}, cache=shared.cache)
            spec = parse_method(name)
            core = spec.make_core()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                core.personalize(runtime, user, spec.augmentation, None)
                times.append(time.perf_counter() - t0)
            row[column] = statistics.median(times)
        rows.append(row)
        if progress:
            print(f"history {n:>4}: " + ", ".join(f"{m} {row[m]:.2f} s" for m in METHODS),
                  flush=True)
    return {"model": loaded.name, "task": dataset.task.name, "user": target.id,
            "sharers": sharers, "pool_pieces": len(pool.pool),
            "personal_epochs": personal_epochs,
            "perfit_epochs": options["perfit"]["epochs"], "repeats": repeats, "rows": rows}


def personalize_table(result: dict[str, Any]) -> str:
    ckpt = all("oppu-ckpt" in r for r in result["rows"])  # older results have no such column
    lines = [f"personalization seconds per user, {result['model']}, {result['task']} user "
             f"{result['user']}; pool of {result['pool_pieces']} pieces; epochs: OPPU "
             f"{result['personal_epochs']}, PerFit {result.get('perfit_epochs', 4.0)}; "
             f"median of {result['repeats']}",
             f"{'history':>8} {'OPPU':>8} {'PER-PCS':>8} {'PerFit':>8} "
             f"{'OPPU/PER-PCS':>13} {'OPPU/PerFit':>12}" + (
                 f" {'OPPU-ckpt':>9} {'OPPU-ckpt/PER-PCS':>18}" if ckpt else "")]
    for r in result["rows"]:
        line = (f"{r['history']:>8} {r['oppu']:>8.2f} {r['perpcs']:>8.2f} "
                f"{r['perfit']:>8.2f} {r['oppu'] / r['perpcs']:>12.1f}x "
                f"{r['oppu'] / r['perfit']:>11.1f}x")
        if ckpt:
            line += f" {r['oppu-ckpt']:>9.2f} {r['oppu-ckpt'] / r['perpcs']:>17.1f}x"
        lines.append(line)
    for key, label in (("perpcs-loss-routing", "PER-PCS (loss routing)"),
                       ("perpcs-shipped", "PER-PCS (shipped: loss on 4, checked)")):
        if all(key in r for r in result["rows"]):
            lines.append(f"{'history':>8} {label:>38} {'OPPU/it':>8}")
            lines += [f"{r['history']:>8} {r[key]:>38.2f} {r['oppu'] / r[key]:>7.1f}x"
                      for r in result["rows"]]
    if ckpt:
        lines.append("OPPU-ckpt: the same training with gradient checkpointing, as the authors' "
                     "code trains (the paper's ~7x was measured that way)")
    return "\n".join(lines)


def personalize_plot(result: dict[str, Any], path) -> Any:
    # lazy: matplotlib loads only when a figure is drawn
    from simulations.plots import new_figure, save_figure

    fig, axis = new_figure(size=(5.5, 4))
    xs = [r["history"] for r in result["rows"]]
    for key, label in (("oppu", "OPPU (train)"),
                       ("oppu-ckpt", "OPPU (train, gradient checkpointing)"),
                       ("perpcs", "PER-PCS (assemble)"), ("perfit", "PerFit (stage 2)")):
        if not all(key in r for r in result["rows"]):
            continue
        axis.plot(xs, [r[key] for r in result["rows"]], marker="o", label=label)
    axis.set_xlabel("history items")
    axis.set_ylabel("seconds per user")
    axis.set_title(f"personalization time, {result['model']}")
    axis.set_ylim(bottom=0)
    axis.legend()
    return save_figure(fig, path)
