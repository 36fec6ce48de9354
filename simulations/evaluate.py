"""In-process evaluation of methods on the same base model and the same target users.

For each method: the core prepares (collective work), then each target user is personalized
from their own history (timed), their queries are answered with greedy decoding, and the
task's LaMP metrics are computed over all queries. PAG profiles are generated once per user
per run and shared by every method that uses them (their generation time is charged to each
such method's per-user time).
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from shared.config import MAX_HISTORY
from shared.data import HUFFPOST_TASKS, load_dataset
from shared.errors import PflError
from shared.generation import GenerationConfig
from shared.methods import (Core, MethodSpec, PersonalState, Runtime, augmented_prompts,
                            parse_method)
from shared.methods.store import reused_so_far
from shared.metrics import evaluate, metric_stats
from shared.models import cache_dir, canonical_name, load_model
from shared.profiles import generate_profiles
from shared.recipes import merge_options, over_recipe, resolve_recipe
from shared.statistics import metric_interval
from shared.tasks import canonical_task_name
from shared.types import User
from simulations import references  # noqa: F401  (registers the reference rows)

log = logging.getLogger(__name__)

DEFAULT_METHODS = ("nonpersonalized", "random1", "rag1", "rag2", "rag4", "pag", "pag+rag1")


@dataclass
class EvalConfig:
    task: str
    data: str | None = None
    methods: Sequence[str] = DEFAULT_METHODS
    model: str | None = None
    users: int = 40
    queries_per_user: int | None = None  # None: 3 on HuffPost and synthetic (LaMP has 1)
    seed: int = 0
    batch_size: int = 8
    device: str | None = None
    cache_dir: str | None = None
    min_history: int | None = None  # None: the task's default
    sharers: int = 10
    collective: int = 30
    max_history: int | None = MAX_HISTORY  # trained methods use each user's most recent items only
    stage1_epochs: float | None = None  # None: the recipe's (paper: 3)
    personal_epochs: float | None = None  # None: the recipe's (paper: 2)
    progress: bool = True
    sample: bool = False
    options: dict = field(default_factory=dict)
    recipe: str = "tuned"  # "tuned", "paper" or a recipe file (shared.recipes)
    reuse_trained: bool = True  # keep stage 1s and PER-PCS sharer pieces in the cache dir
    sharer_slots: int | None = None  # the collective users of a run with this many sharers
    backend: str = "torch"  # or onnx, onnx-int8, onnx-int4 (edge_client.ondevice.runtime)


def sharer_store(cache: str | None) -> Path:
    """Where trained PER-PCS sharer pieces are kept between runs (:mod:`shared.methods.perpcs.core`)."""
    return cache_dir(cache) / "sharer-pieces"


def use_stores(runtime: Runtime, cache: str | None) -> None:
    """Let ``runtime`` keep and reuse what takes longest to train, under the cache dir:
    stage 1 and PerFit stage 1 (:mod:`shared.methods.store`, ``trained-state/``) and the
    PER-PCS sharers' pieces (``sharer-pieces/``)."""
    runtime.cache.sharer_store = sharer_store(cache)
    runtime.cache.state_store = cache_dir(cache) / "trained-state"


def run_options(config: EvalConfig) -> tuple[str, dict]:
    """(recipe name, the methods' options): the recipe, then the command line's epochs and
    ``--set`` settings on top."""
    name, recipe = resolve_recipe(config.recipe, canonical_name(config.model),
                                  canonical_task_name(config.task))
    flags = {"max_history": config.max_history}
    for key in ("stage1_epochs", "personal_epochs"):
        if getattr(config, key) is not None:
            flags[key] = getattr(config, key)
    return name, over_recipe(recipe, merge_options(flags, config.options))


def assign_roles(dataset, targets: int, sharers: int, collective: int, seed: int,
                 validation: int = 0, sharer_slots: int | None = None) -> dict:
    """Split users into targets, sharers, collective and validation users, disjoint and
    reproducible.

    Targets are drawn at random (seeded) so they are not systematically the most active users;
    sharers are the most active of the rest (PER-PCS' "most active" strategy); collective
    users are the rest after them, and validation users (``pfl tune``) the rest after those.
    Asking for validation users changes none of the other roles, so a recipe tuned on them
    never saw a target of the ``pfl eval`` run with the same seed and sizes. A lazily
    generated population is only read as far as needed.

    ``sharer_slots`` fixes the collective users whatever the number of sharers (``pfl study
    sharers``): they are the users after the ``sharer_slots`` most active ones, as in a run
    with that many sharers. Fewer sharers are the most active of those; more are those plus
    the most active users after the collective ones. So every point of a study has the
    stage 1 (and the sharers) of the ``pfl eval`` run with ``sharer_slots`` sharers.
    """
    slots = sharers if sharer_slots is None else int(sharer_slots)
    if slots < 0:
        raise PflError(f"sharer_slots {slots} is negative")
    extra = max(0, sharers - slots)  # sharers beyond the slots: after the collective users
    wanted = targets + max(slots, sharers) + collective + validation
    pool = list(dataset.users(limit=wanted if len(dataset) > 10_000 else None))
    rng = random.Random(seed)
    order = list(range(len(pool)))
    rng.shuffle(order)
    chosen = sorted(order[:targets])  # keep the dataset's order among targets
    rest = [pool[i] for i in sorted(order[targets:])]
    rest.sort(key=lambda u: -len(u.history))  # stable: ties keep the dataset's order
    after = slots + collective
    return {"targets": [pool[i] for i in chosen],
            "sharers": rest[:min(sharers, slots)] + rest[after: after + extra],
            "collective": rest[slots: after],
            "validation": rest[after + extra: after + extra + validation]}


def _profile_bytes(profile: str | None) -> int:
    return len(profile.encode("utf-8")) if profile else 0


def evaluate_method(runtime: Runtime, spec: MethodSpec, dataset, targets: Sequence[User],
                    profiles: dict[str, str], profile_seconds: float,
                    generation: GenerationConfig) -> dict:
    """Personalize every target with one method, answer its queries, score them."""
    core: Core = spec.make_core()
    augmentation = spec.augmentation
    # what a step read back from the caches (stage 1, sharers, users' states) counts as the
    # training it replaced: a resumed run reports the method's cost, not a file read's
    started, reused = time.perf_counter(), reused_so_far(runtime)
    core.prepare(runtime, dataset, augmentation)
    prepare_seconds = time.perf_counter() - started + reused_so_far(runtime) - reused

    states: list[PersonalState] = []
    seconds: list[float] = []
    prompts_per_user: list[list[str]] = []
    for user in tqdm(targets, desc=f"{spec.name}: personalize", disable=not runtime.progress,
                     leave=False):
        profile = profiles.get(user.id) if augmentation.profile else None
        t0, reused = time.perf_counter(), reused_so_far(runtime)
        state = core.personalize(runtime, user, augmentation, profile)
        prompts_per_user.append(augmented_prompts(runtime, user, augmentation, profile))
        seconds.append(time.perf_counter() - t0 + reused_so_far(runtime) - reused
                       + (profile_seconds if augmentation.profile else 0))
        state.bytes += _profile_bytes(profile)
        states.append(state)

    predictions: list[str] = []
    if core.shared_model:  # one model for all: batch every user's queries together
        flat = [p for prompts in prompts_per_user for p in prompts]
        predictions = core.answer(runtime, states[0] if states else PersonalState(), flat,
                                  generation, desc=f"{spec.name}: generate",
                                  progress=runtime.progress)
    else:
        for state, prompts in tqdm(list(zip(states, prompts_per_user)),
                                   desc=f"{spec.name}: generate", disable=not runtime.progress,
                                   leave=False):
            predictions += core.answer(runtime, state, prompts, generation)
    pairs = [(user, query) for user in targets for query in user.queries]
    golds = [query.gold for _, query in pairs]
    n = max(1, len(targets))
    queries = [{"user": u.id, "query": q.id, "prediction": p, "gold": q.gold,
                "stats": metric_stats(runtime.task, [p], [q.gold])}
               for (u, q), p in zip(pairs, predictions)]
    metrics = evaluate(runtime.task, predictions, golds)
    outcomes = Counter(s.info["outcome"] for s in states if "outcome" in s.info)
    return {
        "metrics": metrics,
        **({"outcomes": dict(sorted(outcomes.items()))} if outcomes else {}),
        "intervals": {metric: metric_interval(runtime.task, queries, metric, seed=runtime.seed)
                      for metric in metrics},
        "params_per_user": sum(s.params for s in states) / n,
        "bytes_per_user": sum(s.bytes for s in states) / n,
        "seconds_per_user": sum(seconds) / n,
        "prepare_seconds": prepare_seconds,
        "queries": queries,
    }


DEFAULT_QUERIES_PER_USER = 3


def queries_per_user(task: str, asked: int | None) -> int | None:
    """The queries of each target: ``asked``, else 3 where the task can have several
    (HuffPost, synthetic; 40 targets x 3 = 120 queries by default), else LaMP's one (None)."""
    if asked is not None:
        return asked
    multi = canonical_task_name(task) in HUFFPOST_TASKS + ("synthetic",)
    return DEFAULT_QUERIES_PER_USER if multi else None


def run_settings(config: EvalConfig) -> dict:
    """What decides a method's results besides its name: two runs with equal settings give
    the same results (seeded), so a resumed run may keep the methods an earlier one finished."""
    return {"task": config.task, "data": config.data, "model": config.model,
            "users": config.users,
            "queries_per_user": queries_per_user(config.task, config.queries_per_user),
            "seed": config.seed, "min_history": config.min_history,
            "sharers": config.sharers, "collective": config.collective,
            "sample": config.sample, "options": run_options(config)[1],
            **({"sharer_slots": config.sharer_slots} if config.sharer_slots else {}),
            **({"backend": config.backend} if config.backend != "torch" else {})}


def resumable_methods(config: EvalConfig, previous: dict, names: Sequence[str]) -> dict:
    """The finished methods among ``names`` of an earlier run's results that a run of
    ``config`` may keep.

    Raises PflError if the earlier run had other settings (its results would not be
    comparable with the new ones)."""
    earlier = previous.get("settings")
    wanted = json.loads(json.dumps(run_settings(config)))  # as the JSON file holds them
    if earlier != wanted:
        changed = sorted(k for k in set(wanted) | set(earlier or {})
                         if (earlier or {}).get(k) != wanted.get(k))
        raise PflError("cannot resume: the earlier results were made with other settings "
                       f"({', '.join(changed) if earlier else 'none recorded'}); "
                       "use the same options or another --out")
    return {name: result for name, result in previous.get("methods", {}).items()
            if name in names}


def run_eval(config: EvalConfig, on_method=None, previous: dict | None = None) -> dict:
    """Evaluate ``config.methods`` on ``config.users`` target users; returns the results dict.

    ``on_method(results)`` is called after each method with the results so far (``pfl eval
    --out`` writes them, so a long run that is cut off keeps the methods it finished).
    ``previous``: an earlier run's results with the same settings (``--resume``); the methods
    it finished are kept as they are and not run again, those not asked for this time too
    (the file a resumed run writes loses nothing)."""
    specs = [parse_method(m) for m in config.methods]  # fail fast on a bad name
    kept = resumable_methods(config, previous, list(previous.get("methods", {}))) \
        if previous else {}
    todo = [s for s in specs if s.name not in kept]
    queries = queries_per_user(config.task, config.queries_per_user)
    dataset = load_dataset(config.task, config.data, min_history=config.min_history,
                           queries_per_user=queries, seed=config.seed)
    if len(dataset) == 0:
        raise PflError(f"{config.task}: no user in the data has enough history items before "
                       f"their latest {queries} (lower --min-history or --queries-per-user)")
    roles = assign_roles(dataset, config.users, config.sharers, config.collective, config.seed,
                         sharer_slots=config.sharer_slots)
    targets = roles["targets"]
    if kept and previous.get("targets", [u.id for u in targets]) != [u.id for u in targets]:
        raise PflError("cannot resume: the earlier run evaluated other target users")
    missing = [u.id for u in targets if any(q.gold is None for q in u.queries)]
    if missing:
        raise PflError(f"{len(missing)} users have queries without gold outputs "
                       f"(e.g. {missing[0]}): evaluate on a split with outputs")
    loaded = load_model(config.model, device=config.device, cache=config.cache_dir,
                        seed=config.seed)
    recipe, options = run_options(config)
    runtime = Runtime(loaded=loaded, task=dataset.task, seed=config.seed,
                      progress=config.progress, options=options, roles=roles)
    if config.reuse_trained:
        use_stores(runtime, config.cache_dir)
    if config.backend != "torch":
        # lazy: onnxruntime is loaded only by runs that answer with it
        from edge_client.ondevice.runtime import answer_engine

        runtime.cache.answer_engine = answer_engine(
            loaded, config.backend, cache=config.cache_dir,
            progress=(lambda m: log.info("%s", m)) if not config.progress else print)
    generation = GenerationConfig(max_new_tokens=dataset.task.max_new_tokens,
                                  batch_size=config.batch_size, sample=config.sample,
                                  seed=config.seed)

    profiles: dict[str, str] = {}
    profile_seconds = 0.0
    if any(s.augmentation.profile for s in todo):
        t0 = time.perf_counter()
        profiles = generate_profiles(loaded.model, loaded.tokenizer, dataset.task, targets,
                                     batch_size=config.batch_size, progress=config.progress)
        profile_seconds = (time.perf_counter() - t0) / max(1, len(targets))

    results = {
        "task": dataset.task.name,
        "base_model": loaded.name,
        "users": len(targets),
        "sharers": len(roles["sharers"]),
        "collective_users": len(roles["collective"]),
        "queries": sum(len(u.queries) for u in targets),
        "data": config.data,
        "seed": config.seed,
        "backend": config.backend,
        "targets": [u.id for u in targets],
        "metric_task": {"kind": dataset.task.kind, "labels": list(dataset.task.labels or ())},
        "recipe": {"name": recipe, "options": options},
        "settings": run_settings(config),
        # the earlier run's methods not asked for this time come first, so that every
        # partial write keeps them
        "methods": {name: result for name, result in kept.items()
                    if name not in {s.name for s in specs}},
    }
    for name in results["methods"]:
        log.info("keeping %s from the earlier run (not asked for this time)", name)
    for spec in specs:
        if spec.name in kept:
            log.info("keeping %s from the earlier run", spec.name)
            results["methods"][spec.name] = kept[spec.name]
            continue
        log.info("evaluating %s", spec.name)
        results["methods"][spec.name] = evaluate_method(runtime, spec, dataset, targets, profiles,
                                                        profile_seconds, generation)
        if on_method is not None:
            on_method(results)
    return results
