"""A target checks what it assembles: the pieces it may use, each sharer's share, and the
assembled adapter against its own held-out history.

The pool's sharers may be hostile. A piece within the pool's absolute bound
(:attr:`shared.serialization.Limits.max_update_norm`) can still be a thousand times larger
than every honest piece at its layer and module, and gates can be aimed at whatever a target
feeds the module, so the gates alone cannot be trusted to keep a sharer out. Before a recipe
is used:

1. :func:`norm_outliers`: a piece whose update norm |scaling * B A| exceeds
   ``max_norm_ratio`` times the median of the pieces the target sees at the same (layer,
   module) is left out (groups of at least :data:`MIN_GROUP` pieces; a relative bound, so it
   follows the model and the recipe the honest sharers trained with).
2. :func:`cap_shares`: where several sharers were selected at a (layer, module), none carries
   more than ``max_sharer_share`` of its weight (cut, never given to others); loss routing, which picks one sharer for
   the whole adapter, is exempt because the held-out check below must support it.
3. :func:`check_recipe`: the target's latest ``check_items`` history items are held out of
   selection. The assembled adapter's mean target-token loss on them must not exceed the
   stage-1 model's (times 1 + ``check_margin``). If it does, the sharer whose removal lowers that loss most is dropped, up
   to ``prune_rounds`` times; if it is still worse, the recipe is refused and the target
   answers with stage 1 (an empty recipe). Only forward passes: no training.

The outcome (``kept``, ``pruned``, ``refused`` or ``unchecked`` when the history is too short
to hold items out) and both losses are written into the recipe's settings, which the results
and the device's stored state keep.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Callable, Mapping, Sequence

import torch

from shared.methods.perpcs.assembly import assemble
from shared.methods.perpcs.config import PerPcsConfig
from shared.methods.perpcs.loss_selection import candidate_losses, loss_scored_recipe
from shared.methods.perpcs.pieces import Piece
from shared.methods.perpcs.recipe import Recipe, rebuild
from shared.serialization import update_norm
from shared.training import Example

#: a (layer, module) needs this many pieces before its median bounds them
MIN_GROUP = 3


def split_history(examples: Sequence[Example], config: PerPcsConfig
                  ) -> tuple[Sequence[Example], Sequence[Example]]:
    """(selection items, held-out items): the latest ``config.check_items`` items are held
    out, never more than half of the history (none when the check is off or there is a
    single item)."""
    held = min(config.check_items, len(examples) // 2)
    if held <= 0:
        return examples, examples[:0]
    return examples[:len(examples) - held], examples[len(examples) - held:]


def _piece_key(piece) -> tuple[int, str, str]:
    return piece.layer, piece.module, piece.piece_id


def norm_outliers(pieces: Sequence, ratio: float, *,
                  norm: Callable[[Piece], float] = update_norm,
                  key: Callable = _piece_key) -> set[str]:
    """Ids of the pieces whose update norm exceeds ``ratio`` x the median norm of the pieces
    at their (layer, module) (only where there are at least :data:`MIN_GROUP`); empty when
    ``ratio`` is 0 (off). ``norm`` and ``key`` (-> layer, module, id) read other records
    than pieces (the pool's rows)."""
    if not ratio:
        return set()
    groups: dict = defaultdict(list)
    for piece in pieces:
        layer, module, piece_id = key(piece)
        groups[(layer, module)].append((piece_id, norm(piece)))
    out = set()
    for members in groups.values():
        if len(members) < MIN_GROUP:
            continue
        median = statistics.median(n for _, n in members)
        out |= {pid for pid, n in members if n > ratio * median}
    return out


def cap_shares(recipe: Recipe, cap: float) -> Recipe:
    """The recipe with each sharer's summed weight at every (layer, module) cut to at most
    ``cap`` of that (layer, module)'s total where several sharers were selected (cut, not
    handed to the others: the update only shrinks). ``cap`` 1 (or a recipe without sources)
    leaves it as it is."""
    if cap >= 1.0 or not recipe.sources:
        return recipe
    entries = {}
    for key, items in recipe.entries.items():
        total = sum(w for _, w in items)
        by_sharer: dict = defaultdict(float)
        for pid, w in items:
            by_sharer[recipe.sources.get(pid, pid)] += w
        if len(by_sharer) < 2:  # top-1 or one sharer here: the held-out check decides
            entries[key] = items
            continue
        scale = {s: min(1.0, cap * total / w) if w > 0 else 1.0 for s, w in by_sharer.items()}
        entries[key] = tuple((pid, w * scale[recipe.sources.get(pid, pid)]) for pid, w in items)
    return Recipe(entries, recipe.combination, recipe.config, recipe.sources)


def without_pieces(recipe: Recipe, drop: Callable[[str], bool]) -> Recipe:
    """The recipe less every piece whose id ``drop`` names (a (layer, module) left empty is
    dropped)."""
    entries = {key: tuple((pid, w) for pid, w in items if not drop(pid))
               for key, items in recipe.entries.items()}
    return Recipe({k: v for k, v in entries.items() if v}, recipe.combination, recipe.config,
                  recipe.sources)


def without_sharers(recipe: Recipe, sharers: set[str]) -> Recipe:
    """The recipe less every piece of ``sharers``."""
    return without_pieces(recipe, lambda pid: recipe.sources.get(pid) in sharers)


def check_recipe(model: torch.nn.Module, recipe: Recipe,
                 lookup: Mapping[str, Piece] | Callable[[str], Piece],
                 held_out: Sequence[Example], pad_id: int, config: PerPcsConfig,
                 **noted) -> Recipe:
    """``recipe`` checked on the ``held_out`` items against the stage-1 ``model``: kept,
    pruned (sharers dropped) or refused (an empty recipe: stage 1). The returned recipe's
    settings carry ``check`` = {outcome, items, stage1_loss, loss, dropped} and ``noted``
    (what the caller found before, e.g. ``norm_outliers``)."""
    info: dict = {"items": len(held_out), "dropped": [], **noted}
    if not held_out or not recipe.entries:
        info["outcome"] = "unchecked" if not held_out else "kept"
        return _with_check(recipe, info)
    # stage 1 and the adapter side by side in one batch (then each pruning round's trials)
    first = candidate_losses(model, {"stage1": {}, "recipe": rebuild(recipe, lookup)},
                             held_out, pad_id)
    base, loss = first["stage1"], first["recipe"]
    info.update(stage1_loss=round(base, 6), assembled_loss=round(loss, 6))
    base *= 1.0 + config.check_margin  # the loss the adapter may reach and still pass
    current = recipe
    for _ in range(config.prune_rounds):
        if loss <= base:
            break
        present = sorted({current.sources.get(pid, pid) for pid in current.piece_ids()})
        if len(present) < 2:
            break
        trials = {s: without_sharers(current, {s}) for s in present}
        trials = {s: r for s, r in trials.items() if r.entries}
        scores = candidate_losses(model, {s: rebuild(r, lookup) for s, r in trials.items()},
                                  held_out, pad_id) if trials else {}
        if not scores:
            break
        drop = min(scores, key=lambda s: (scores[s], s))
        current, loss = trials[drop], scores[drop]
        info["dropped"].append(drop)
    info["loss"] = round(loss, 6)
    if loss > base:
        info["outcome"] = "refused"
        return _with_check(Recipe({}, recipe.combination, recipe.config), info)
    info["outcome"] = "pruned" if info["dropped"] else "kept"
    return _with_check(current, info)


def _with_check(recipe: Recipe, info: dict) -> Recipe:
    config = dict(recipe.config)
    config["check"] = info
    return Recipe(recipe.entries, recipe.combination, config, recipe.sources)


def assemble_checked(model: torch.nn.Module, pool, examples: Sequence[Example], pad_id: int,
                     config: PerPcsConfig) -> Recipe:
    """A target's recipe as PER-PCS makes it by default: the latest ``check_items`` history
    items held out, the pieces chosen on the rest (``config.routing``: the gates, or the
    sharer with the lowest loss), norm outliers left out, shares capped, then
    :func:`check_recipe` on the held-out items. ``pool`` is a
    :class:`~shared.methods.perpcs.core.PiecePool` (gates only with a ``fetch``, or whole)."""
    select, held_out = split_history(examples, config)
    if config.routing == "loss":
        pieces = pool.whole()
        refused = norm_outliers(pieces, config.max_norm_ratio)
        usable = [p for p in pieces if p.piece_id not in refused]
        if not any(p.module in config.target_modules for p in usable):
            return _nothing_usable(config, len(refused))
        recipe = loss_scored_recipe(model, usable, select, pad_id, config)
        lookup = {p.piece_id: p for p in usable}
    else:
        refused: set = set()
        fetched: dict = {}

        def fetch(ids):
            got = pool.fetch(ids) if pool.fetch is not None else \
                {pid: pool.lookup[pid] for pid in ids}
            fetched.update(got)
            return got

        candidates = pool.pool
        if pool.fetch is None:  # every piece at hand: bound each against all at its key
            refused = norm_outliers(candidates, config.max_norm_ratio)
            candidates = [p for p in candidates if p.piece_id not in refused]
            if not any(p.module in config.target_modules for p in candidates):
                return _nothing_usable(config, len(refused))
        recipe = assemble(model, candidates, select, pad_id, config, fetch=fetch)
        fetch(sorted(recipe.piece_ids() - set(fetched)))  # scored on stage 1 (no autoregression)
        # a pool of gates (the pool service bounds what it lists): the pieces assembly
        # selected, also checked against each other at their (layer, module)
        refused |= norm_outliers(list(fetched.values()), config.max_norm_ratio)
        if refused:
            recipe = without_pieces(recipe, refused.__contains__)
        recipe = cap_shares(recipe, config.max_sharer_share)
        lookup = fetched
    noted = {"norm_outliers": len(refused)} if refused else {}
    return check_recipe(model, recipe, lookup, held_out, pad_id, config, **noted)


def _nothing_usable(config: PerPcsConfig, outliers: int) -> Recipe:
    """Every piece was left out (norm outliers): the target answers with stage 1."""
    return _with_check(Recipe({}, config.combination, config.to_dict()),
                       {"items": 0, "dropped": [], "outcome": "refused",
                        "norm_outliers": outliers, "why": "no usable piece"})
