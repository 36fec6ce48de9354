"""``pfl bench poison``: PER-PCS targets against hostile sharers, in one process.

The honest pool is the one ``pfl eval`` builds (the same roles, stage 1 and sharers; trained
pieces reused from the cache). Then 0, 1, 2, 5 ... attacking sharers join it, each with the
in-bound attack a selected sharer can mount without breaking any bound the pool checks:

- a piece at every (layer, module), random low-rank factors scaled to an update norm just
  under the pool's absolute bound (``Limits.max_update_norm``, where honest SmolLM2 pieces
  are about 0.1);
- each gate aimed at the mean module input measured on another user's history (a collective
  user's: what the gates score), so that the gates route to it;
- several attackers collude: they share the aims.

Every target personalizes with PER-PCS under each *variant* and answers its queries:

- ``gates-undefended``: the papers' assembly as it was (gates, top-k, no held-out check, no
  relative norm bound, no share cap);
- ``gates``: the gates with today's defences (:mod:`shared.methods.perpcs.check`);
- ``loss``: loss routing with the same defences.

Each row: the variant's score with its interval, paired against the same variant with no
attacker and against stage 1, on the same users, and how many answers the attack changed.
The pool service's own relative bound (it lists no gate of an outsized piece) is not in this
in-process run: it would leave the targets nothing to defend.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from shared.data import load_dataset
from shared.errors import PflError
from shared.generation import GenerationConfig
from shared.methods import parse_method
from shared.methods.base import Runtime, user_examples
from shared.methods.oppu.core import stage1_model
from shared.methods.perpcs.assembly import assemble
from shared.methods.perpcs.config import PerPcsConfig
from shared.methods.perpcs.core import PiecePool, perpcs_config, piece_pool
from shared.methods.perpcs.pieces import Piece, get_module
from shared.models import load_model
from shared.prompts import pad_token_id
from shared.serialization import DEFAULT_LIMITS, update_norm
from shared.statistics import format_interval, paired_comparison
from simulations.evaluate import (EvalConfig, assign_roles, evaluate_method, queries_per_user,
                                  run_options, use_stores)

log = logging.getLogger(__name__)

#: variant -> PER-PCS settings over the run's
VARIANTS = {
    "gates-undefended": {"routing": "gates", "check_items": 0, "max_norm_ratio": 0,
                         "max_sharer_share": 1.0},
    "gates": {"routing": "gates"},
    "loss": {"routing": "loss"},
}


@dataclass
class PoisonConfig:
    task: str = "synthetic"
    data: str | None = None
    model: str = "tiny"
    users: int = 20
    sharers: int = 10
    collective: int = 10
    max_history: int = 16
    attackers: Sequence[int] = (0, 1, 2, 5)
    variants: Sequence[str] = tuple(VARIANTS)
    #: the attackers' update norm (default: just under the pool's absolute bound)
    norm: float | None = None
    options: dict = field(default_factory=dict)  # --set METHOD.KEY=VALUE
    recipe: str = "tuned"
    seed: int = 0
    cache_dir: str | None = None
    device: str | None = None
    progress: bool = False


def mean_inputs(model: torch.nn.Module, pool: Sequence[Piece], examples, pad_id: int,
                config: PerPcsConfig) -> dict:
    """The mean unit module input at each (layer, module) that has pool pieces, on
    ``examples`` (what the gates score), read through assembly's trace hook."""
    seen: dict = {}

    def on_score(layer, module, inputs, alphas, ids):
        seen.setdefault((layer, module), []).append(F.normalize(inputs.float(), dim=-1)
                                                    .mean(dim=0).cpu())

    assemble(model, pool, examples, pad_id, config, on_score=on_score)
    return {key: torch.stack(v).mean(dim=0) for key, v in seen.items()}


def aimed_pieces(model: torch.nn.Module, sharer: str, aims: dict, norm: float, seed: int, *,
                 rank: int = 4) -> list[Piece]:
    """The in-bound attacker's pieces: at every aimed (layer, module), random rank-``rank``
    factors with update norm ``norm`` and a gate along the aim (scaled up: cosine ~1 with the
    mean input)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for (layer, module), aim in sorted(aims.items()):
        d_out, d_in = get_module(model, (layer, module)).weight.shape
        A, B = torch.randn(rank, d_in, generator=gen), torch.randn(d_out, rank, generator=gen)
        scale = (norm / update_norm(Piece(sharer, layer, module, A, B, 1.0))) ** 0.5
        out.append(Piece(sharer, layer, module, A * scale, B * scale, 1.0,
                         aim.float() * 100))
    return out


def bench_poison(config: PoisonConfig) -> dict:
    """Run every (attackers, variant) and return the rows (see the module docstring)."""
    unknown = [v for v in config.variants if v not in VARIANTS]
    if unknown:
        raise PflError(f"unknown variants {unknown} (known: {', '.join(VARIANTS)})")
    if any(k < 0 for k in config.attackers) or 0 not in config.attackers:
        raise PflError("--attackers needs 0 (the reference) and no negative count")
    queries = queries_per_user(config.task, None)
    dataset = load_dataset(config.task, config.data, queries_per_user=queries, seed=config.seed)
    roles = assign_roles(dataset, config.users, config.sharers, config.collective, config.seed)
    if not roles["sharers"] or not roles["collective"]:
        raise PflError("the bench needs honest sharers and a collective user (the aim)")
    eval_config = EvalConfig(task=config.task, methods=["perpcs"], users=config.users,
                             sharers=config.sharers, collective=config.collective,
                             max_history=config.max_history, options=config.options,
                             recipe=config.recipe, seed=config.seed, model=config.model)
    recipe, options = run_options(eval_config)
    loaded = load_model(config.model, device=config.device, cache=config.cache_dir,
                        seed=config.seed)
    runtime = Runtime(loaded=loaded, task=dataset.task, seed=config.seed,
                      progress=config.progress, options=options, roles=roles)
    use_stores(runtime, config.cache_dir)
    generation = GenerationConfig(max_new_tokens=dataset.task.max_new_tokens, seed=config.seed)
    targets = roles["targets"]

    started = time.perf_counter()
    stage1 = evaluate_method(runtime, parse_method("lora-c"), dataset, targets, {}, 0.0,
                             generation)
    honest = piece_pool(runtime)
    model = stage1_model(runtime)
    pad_id = pad_token_id(runtime.tokenizer)
    aims = mean_inputs(model, honest.whole(), user_examples(runtime, roles["collective"][0]),
                       pad_id, perpcs_config(runtime))
    norm = config.norm or DEFAULT_LIMITS.max_update_norm * 0.999
    honest_norms = sorted(update_norm(p) for p in honest.whole())
    log.info("honest pieces: median update norm %.4g, max %.4g; attackers' %.4g",
             honest_norms[len(honest_norms) // 2], honest_norms[-1], norm)
    base_options = dict(runtime.options)
    rows, reference = [], {}
    for k in sorted(config.attackers):
        hostile = [p for i in range(k)
                   for p in aimed_pieces(model, f"attacker-{i}", aims, norm, seed=1000 + i)]
        pieces = honest.whole() + hostile
        for variant in config.variants:
            runtime.options = {**base_options, "perpcs": {
                **(base_options.get("perpcs") or {}), **VARIANTS[variant]}}
            runtime.cache.perpcs_pool = PiecePool(
                pool=pieces, lookup={p.piece_id: p for p in pieces},
                adapters=honest.adapters, embeddings=honest.embeddings, seconds=honest.seconds)
            log.info("poison: %d attackers, %s", k, variant)
            result = evaluate_method(runtime, parse_method("perpcs"), dataset, targets, {}, 0.0,
                                     generation)
            metric = next(iter(result["metrics"]))
            row = {"attackers": k, "variant": variant, "metric": metric,
                   "value": result["metrics"][metric],
                   "interval": result["intervals"][metric],
                   "outcomes": result.get("outcomes", {}),
                   "seconds_per_user": result["seconds_per_user"],
                   "queries": result["queries"]}
            versus = paired_comparison(dataset.task, result["queries"], stage1["queries"],
                                       metric, a=variant, b="stage 1", seed=config.seed)
            row["vs_stage1"] = versus.__dict__
            if k == 0:
                reference[variant] = result["queries"]
            else:
                clean = paired_comparison(dataset.task, result["queries"], reference[variant],
                                          metric, a=f"{variant}, {k} attackers",
                                          b=f"{variant}, none", seed=config.seed)
                row["vs_no_attacker"] = clean.__dict__
            row["changed_answers"] = sum(
                a["prediction"] != b["prediction"]
                for a, b in zip(result["queries"], reference[variant]))
            rows.append(row)
    runtime.options = base_options
    stage1_metric = next(iter(stage1["metrics"]))
    return {"task": dataset.task.name, "base_model": loaded.name, "users": len(targets),
            "sharers": len(roles["sharers"]), "queries": len(stage1["queries"]),
            "recipe": {"name": recipe, "options": options}, "attack": {
                "update_norm": norm, "honest_median_norm": honest_norms[len(honest_norms) // 2],
                "honest_max_norm": honest_norms[-1], "aim": roles["collective"][0].id},
            "stage1": {"metric": stage1_metric, "value": stage1["metrics"][stage1_metric],
                       "interval": stage1["intervals"][stage1_metric]},
            "rows": rows, "seconds": time.perf_counter() - started}


def poison_table(result: dict) -> str:
    """The rows as a table (score [CI], paired against no attacker, answers changed)."""
    s1 = result["stage1"]
    lines = [f"task {result['task']} | model {result['base_model']} | {result['users']} "
             f"targets, {result['queries']} queries | {result['sharers']} honest sharers | "
             f"attackers' update norm {result['attack']['update_norm']:.3g} (honest median "
             f"{result['attack']['honest_median_norm']:.3g})",
             f"stage 1: {s1['metric']} {format_interval(s1['value'], s1['interval']['low'], s1['interval']['high'])}",
             "",
             f"{'attackers':>9}  {'variant':<17}  {'score [95% CI]':<24}  "
             f"{'vs no attacker (paired)':<26}  {'changed':>9}  outcomes"]
    for row in result["rows"]:
        interval = format_interval(row["value"], row["interval"]["low"], row["interval"]["high"])
        versus = row.get("vs_no_attacker")
        paired = "-" if versus is None else format_interval(
            *(None if versus[k] is None else versus[k] + 0.0  # + 0.0: no "-0.000"
              for k in ("difference", "low", "high")), "{:+.3f}", "{:+.3f}")
        outcomes = ", ".join(f"{k} {v}" for k, v in row["outcomes"].items()) or "-"
        lines.append(f"{row['attackers']:>9}  {row['variant']:<17}  {interval:<24}  "
                     f"{paired:<26}  {row['changed_answers']:>4}/{len(row['queries']):<4}  "
                     f"{outcomes}")
    lines.append("")
    lines.append("paired differences > 0: better than with no attacker; changed: answers that "
                 "differ from the same variant's with no attacker")
    return "\n".join(lines)
