"""``pfl tune``: choose a training recipe on validation users, never on reported targets.

The papers' recipes (lr 1e-4, 2-3 epochs) were tuned for a 7B model and users with hundreds
of history items; a 135M model and 10-50 items a user need their own. ``pfl tune`` searches a
small grid, one trained part after the other, each on top of the choices before it:

1. ``stage1``: the stage-1 task LoRA, scored as LoRA-C;
2. ``oppu``: the personal LoRA (OPPU, and so LoRA-P and the PER-PCS sharers), scored as OPPU;
3. ``perpcs``: the gates (post-hoc, on the sharers), scored as PER-PCS;
4. ``perfit``: both PerFit stages, scored as PerFit.

Scores are the task's first metric on the held-out queries of *validation users*: users of
the same data who are neither the targets nor the sharers nor the collective users of the
``pfl eval`` run with the same seed and sizes (:func:`~simulations.evaluate.assign_roles`).
The first value of each grid axis is the papers'; a setting replaces it only when it scores
strictly better. The result is a recipe file (:mod:`shared.recipes`) with every trial kept
(metrics with 95% intervals over the validation users), written after each trial so that
``--resume`` continues a cut-off search, and extends a finished one by later stages or by
more values on an axis (only the new trials run; the choice is made again over all).
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Sequence

from shared.config import MAX_HISTORY
from shared.data import load_dataset
from shared.errors import PflError
from shared.generation import GenerationConfig
from shared.methods.base import Runtime, parse_method
from shared.metrics import is_better
from shared.models import canonical_name, load_model
from shared.recipes import FORMAT, check_options, merge_options
from shared.report import format_table
from shared.statistics import format_interval
from shared.tasks import canonical_task_name
from simulations.evaluate import assign_roles, evaluate_method, queries_per_user, use_stores

log = logging.getLogger(__name__)

#: What each stage's settings are scored as.
STAGE_METHOD = {"stage1": "lora-c", "oppu": "oppu", "perpcs": "perpcs", "perfit": "perfit"}
#: The default grid: the papers' value first on every axis.
DEFAULT_GRID: dict[str, dict[str, list]] = {
    "stage1": {"lr": [1e-4, 1e-3, 3e-3]},
    "oppu": {"lr": [1e-4, 1e-3, 5e-3], "epochs": [2, 4]},
    "perpcs": {"gate_lr": [2e-5, 1e-3, 1e-2]},
    "perfit": {"lr": [1e-4, 1e-3, 1e-2]},
}


@dataclass
class TuneConfig:
    task: str
    data: str | None = None
    model: str | None = None
    seed: int = 0
    validation: int = 8
    queries_per_user: int | None = None  # None: as pfl eval (3 on HuffPost and synthetic)
    # the roles of the pfl eval run whose targets must stay unseen
    targets: int = 40
    sharers: int = 10
    collective: int = 30
    max_history: int | None = MAX_HISTORY
    min_history: int | None = None
    stages: Sequence[str] = tuple(STAGE_METHOD)
    grid: dict = field(default_factory=lambda: json.loads(json.dumps(DEFAULT_GRID)))
    batch_size: int = 8
    device: str | None = None
    cache_dir: str | None = None
    progress: bool = True
    reuse_trained: bool = True  # keep stage 1s and PER-PCS sharer pieces in the cache dir
    # also score the pfl eval run's sharers (not targets; never for the perpcs stage)
    validate_on_sharers: bool = False


def grid_settings(axes: dict[str, list]) -> list[dict]:
    """Every combination of a stage's axes, in grid order (the first is the papers')."""
    names = list(axes)
    return [dict(zip(names, values)) for values in itertools.product(*(axes[n] for n in names))]


def check_grid(grid: dict, stages: Sequence[str]) -> None:
    for stage in stages:
        if stage not in STAGE_METHOD:
            raise PflError(f"unknown stage {stage!r} (known: {', '.join(STAGE_METHOD)})")
        axes = grid.get(stage)
        if not isinstance(axes, dict) or not axes or not all(
                isinstance(v, list) and v for v in axes.values()):
            raise PflError(f"the grid of {stage} needs at least one axis with values")
        check_options({stage: {k: v[0] for k, v in axes.items()}}, f"grid of {stage}")


def tune(config: TuneConfig, on_trial=None, previous: dict | None = None) -> dict:
    """Run the search; returns the recipe (``options`` = the chosen settings, ``trials``).

    ``previous``: an earlier, cut-off result of the same search: its trials are kept and not
    run again. ``on_trial(recipe)`` is called after each trial with the recipe so far.
    """
    stages = list(config.stages)
    check_grid(config.grid, stages)
    model_name, task = canonical_name(config.model), canonical_task_name(config.task)
    queries = queries_per_user(config.task, config.queries_per_user)
    dataset = load_dataset(config.task, config.data, min_history=config.min_history,
                           queries_per_user=queries, seed=config.seed)
    roles = assign_roles(dataset, config.targets, config.sharers, config.collective,
                         config.seed, validation=config.validation)
    if config.validate_on_sharers:
        if "perpcs" in stages:
            raise PflError("--validate-on-sharers cannot tune perpcs: a sharer's own pieces "
                           "are in the pool it would be scored with")
        roles["validation"] = roles["sharers"] + roles["validation"]
    validation = roles["validation"]
    if len(validation) < 2:
        raise PflError(f"only {len(validation)} validation users are left after "
                       f"{config.targets} targets, {config.sharers} sharers and "
                       f"{config.collective} collective users: use fewer, or "
                       "--validate-on-sharers")
    wanted = config.validation + (len(roles["sharers"]) if config.validate_on_sharers else 0)
    if len(validation) < wanted:
        log.warning("only %d of the %d validation users asked for are left after %d targets, "
                    "%d sharers and %d collective users (the data has no more)%s",
                    len(validation), wanted, config.targets, config.sharers,
                    config.collective, "" if config.validate_on_sharers else
                    "; --validate-on-sharers adds the sharers")
    search = {"seed": config.seed, "targets_excluded": config.targets,
              "sharers": config.sharers, "collective": config.collective,
              "validation": [u.id for u in validation],
              **({"validation_includes_sharers": True} if config.validate_on_sharers else {}),
              "queries_per_user": queries, "max_history": config.max_history,
              "stages": stages, "grid": {s: config.grid[s] for s in stages}}
    done = {}
    if previous is not None:
        if not _resumable(previous.get("search") or {}, json.loads(json.dumps(search))):
            raise PflError("cannot resume: the earlier search had other settings or users "
                           "(a finished recipe can only be extended by stages after its own, "
                           "or by more values on its grids' axes)")
        done = {json.dumps([t["stage"], t["options"]], sort_keys=True): t
                for t in previous.get("trials", [])}
    loaded = load_model(config.model, device=config.device, cache=config.cache_dir,
                        seed=config.seed)
    generation = GenerationConfig(max_new_tokens=dataset.task.max_new_tokens,
                                  batch_size=config.batch_size, seed=config.seed)
    recipe = {"format": FORMAT, "model": model_name, "task": task, "options": {},
              "search": search, "trials": []}
    chosen: dict = {}
    memo: dict = {}  # the last stage-1 model, reused while its settings do not change
    for stage in stages:
        spec = parse_method(STAGE_METHOD[stage])
        best, best_value, metric = None, None, None
        for setting in grid_settings(config.grid[stage]):
            options = merge_options(chosen, {stage: setting})
            key = json.dumps([stage, options], sort_keys=True)
            trial = done.get(key)
            if trial is None:
                trial = _trial(loaded, dataset, roles, spec, stage, options, config, generation,
                               memo)
            recipe["trials"].append(trial)
            metric = next(iter(trial["metrics"]))
            value = trial["metrics"][metric]
            log.info("tune %s %s: %s %.4f", stage, setting, metric, value)
            if is_better(metric, value, best_value):
                best, best_value = setting, value
            if on_trial is not None:
                on_trial(recipe)
        chosen = merge_options(chosen, {stage: best})
        recipe["options"] = chosen
        if on_trial is not None:
            on_trial(recipe)
    return recipe


def _resumable(previous: dict, search: dict) -> bool:
    """Whether an earlier search's trials belong to this one: the same users and settings,
    its stages the first of this one's, and each of its grids contained in this one's (same
    axes, its values among this one's). So a shipped recipe, tuned for ``oppu``, is extended
    by ``--stages oppu,perfit`` without running its trials again, and a grid is widened
    (``--grid perfit.lr=1e-4,1e-3,1e-2`` after ``1e-4,1e-3``) by running the new values only;
    the choice is then made again over every trial."""
    before, now = dict(previous), dict(search)
    stages_before, stages_now = before.pop("stages", None) or [], now.pop("stages")
    grid_before, grid_now = before.pop("grid", None) or {}, now.pop("grid")
    return (before == now and stages_now[:len(stages_before)] == stages_before
            and all(_within(grid_before.get(stage), grid_now[stage])
                    for stage in stages_before))


def _within(axes_before: dict | None, axes_now: dict) -> bool:
    """Whether every setting of an earlier grid is one of this grid's."""
    return (isinstance(axes_before, dict) and set(axes_before) == set(axes_now)
            and all(isinstance(values, list) and all(v in axes_now[name] for v in values)
                    for name, values in axes_before.items()))


def _trial(loaded, dataset, roles, spec, stage, options, config, generation, memo) -> dict:
    runtime = Runtime(loaded=loaded, task=dataset.task, seed=config.seed,
                      progress=config.progress,
                      options=merge_options({"max_history": config.max_history}, options),
                      roles={**roles, "targets": roles["validation"]})
    if config.reuse_trained:
        use_stores(runtime, config.cache_dir)
    stage1_key = json.dumps([options.get("stage1"), options.get("stage1_epochs")],
                            sort_keys=True)
    if memo.get("key") == stage1_key:  # the same stage 1: trained once, not per trial
        for name, value in memo["cache"].items():
            setattr(runtime.cache, name, value)
    started = time.perf_counter()
    result = evaluate_method(runtime, spec, dataset, roles["validation"], {}, 0.0, generation)
    if runtime.cache.stage1 is not None:
        memo.update(key=stage1_key, cache={k: getattr(runtime.cache, k) for k in (
            "stage1", "stage1_state", "stage1_stats")})
    return {"stage": stage, "setting": options[stage], "options": options,
            "metrics": result["metrics"], "intervals": result["intervals"],
            "seconds_per_user": result["seconds_per_user"],
            "prepare_seconds": result["prepare_seconds"],
            "wall_seconds": time.perf_counter() - started}


def tune_report(recipe: dict) -> str:
    """The tuning report: every trial with its 95% interval, and what was chosen."""
    search = recipe["search"]
    sharers = search.get("validation_includes_sharers", False)
    lines = [f"recipe tuned for {recipe['model']} on {recipe['task']}: "
             f"{len(search['validation'])} validation users x {search['queries_per_user']} "
             f"queries (none of them a target{'' if sharers else ', sharer'} or collective "
             f"user of the pfl eval run with seed {search['seed']}, "
             f"{search['targets_excluded']} targets"
             + (f"; its {search['sharers']} sharers are among them" if sharers else "") + ")"]
    rows = []
    for trial in recipe["trials"]:
        metric = next(iter(trial["metrics"]))
        interval = trial["intervals"][metric]
        shown = format_interval(trial["metrics"][metric], interval.get("low"),
                                interval.get("high"))
        extra = [f"{trial['metrics'][m]:.3f}" if m in trial["metrics"] else "-"
                 for m in ("valid",)]
        chosen = recipe["options"].get(trial["stage"]) == trial["setting"]
        rows.append([trial["stage"], json.dumps(trial["setting"]), f"{metric} {shown}",
                     *extra, f"{trial['wall_seconds']:.0f}", "chosen" if chosen else ""])
    lines.append(format_table(["stage", "setting", "score (95% CI over users)", "valid",
                               "wall s", ""], rows))
    lines.append("options: " + json.dumps(recipe["options"], sort_keys=True))
    return "\n".join(lines)

