"""Sharer selection by the target's own history loss: a rating-aware alternative to PER-PCS'
gates, with no training.

PER-PCS' gates score a piece by the cosine between its gate and the module's input at the
positions that *produce* an item's output. Those inputs are the item's prompt: what the user
wrote about, not what they answered. On a task where users differ in their answers to the same
inputs (ratings), the gates route by topic, and a target gets the pieces of sharers who rated
the same topics, however differently they rated them (simulations/reports/ has the figures).

:func:`loss_scored_recipe` asks the question the gates cannot: which sharer's shared pieces,
installed on the stage-1 model, give the lowest loss on the target's own history (teacher
forced, one forward pass per sharer over the history, or its latest ``loss_items`` items;
no gradient). The target keeps that
sharer's pieces with weight 1, as a :class:`~shared.methods.perpcs.recipe.Recipe`: it is
stored, fetched and rebuilt exactly like a PER-PCS recipe, from the same pool. It reads every
sharer's pieces, so it fetches the whole pool.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from shared.methods.perpcs.config import PerPcsConfig
from shared.methods.perpcs.pieces import Key, Piece, piece_updates
from shared.methods.perpcs.recipe import Recipe
from shared.training import Example, batches, target_loss


def history_loss(model: torch.nn.Module, examples: Sequence[Example], pad_id: int,
                 batch_size: int) -> float:
    """Mean cross-entropy per target token of ``examples`` under ``model`` (no gradient)."""
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in batches(examples, batch_size, pad_id, shuffle=False, device=device):
            total += float(target_loss(model, batch, reduction="sum"))
            tokens += int((batch["labels"][:, 1:] != -100).sum())
    return total / max(1, tokens)


def candidate_losses(model: torch.nn.Module, candidates: Mapping[str, Mapping[Key, object]],
                     examples: Sequence[Example], pad_id: int, *,
                     rows_per_pass: int = 64) -> dict[str, float]:
    """Mean cross-entropy per target token of ``examples`` under each candidate adapter
    ({name: {(layer, module): LoraUpdate}}; {} is the model itself), no gradient. The
    candidates are scored side by side in the rows of one batch (each row its own adapter,
    :meth:`shared.serving.engine.BatchedEngine.target_losses`), ``rows_per_pass`` rows a
    forward pass: on a CPU a small batch costs about as much as a large one, so scoring ten
    sharers this way costs a few passes, not ten. Equal, to float rounding, to
    :func:`history_loss` with the candidate installed."""
    # cycle: shared.serving.engine imports this package's pieces
    from shared.serving.engine import BatchedEngine
    from shared.serving.rows import RowAdapter

    items = list(examples)
    if not items:
        raise ValueError("no examples to score")
    names = list(candidates)
    adapters = [RowAdapter(dict(candidates[n]), name=n) if candidates[n] else None
                for n in names]
    sums = dict.fromkeys(names, 0.0)
    counts = dict.fromkeys(names, 0)
    device = next(model.parameters()).device
    per_pass = max(1, rows_per_pass // len(items))  # candidates a pass, every item each
    with BatchedEngine(model, None) as engine:
        for start in range(0, len(items), rows_per_pass):
            chunk = items[start:start + rows_per_pass]
            batch = next(batches(chunk, len(chunk), pad_id, shuffle=False, device=device))
            for first in range(0, len(names), per_pass):
                group = list(range(first, min(len(names), first + per_pass)))
                repeated = {k: batch[k].repeat(len(group), 1)
                            for k in ("input_ids", "attention_mask", "labels")}
                rows = [adapters[i] for i in group for _ in chunk]
                loss, tokens = engine.target_losses(repeated, rows)
                for j, i in enumerate(group):
                    part = slice(j * len(chunk), (j + 1) * len(chunk))
                    sums[names[i]] += float(loss[part].sum())
                    counts[names[i]] += int(tokens[part].sum())
    return {n: sums[n] / max(1, counts[n]) for n in names}


def pieces_by_sharer(pool: Sequence[Piece], modules: Sequence[str]) -> dict[str, list[Piece]]:
    """The pool's pieces on ``modules``, per sharer (sharers sorted; each its pieces)."""
    out: dict[str, list[Piece]] = {}
    for piece in pool:
        if piece.module in modules:
            out.setdefault(piece.sharer, []).append(piece)
    return {sharer: out[sharer] for sharer in sorted(out)}


def loss_scored_recipe(model: torch.nn.Module, pool: Sequence[Piece],
                       examples: Sequence[Example], pad_id: int,
                       config: PerPcsConfig | None = None) -> Recipe:
    """The recipe of the one sharer whose pooled pieces give the lowest loss on ``examples``
    (every sharer and the stage-1 model scored side by side, :func:`candidate_losses`)
    (oldest first; only the latest ``config.loss_items`` when that is set; ties: the lower
    sharer pseudonym). Its settings record every sharer's loss, the stage-1 model's own and
    how many items were scored, so a reader can see how far apart they were."""
    config = config or PerPcsConfig()
    if not examples:
        raise ValueError("loss-scored selection needs history examples: the target has none")
    if config.loss_items:
        examples = examples[-config.loss_items:]  # a LazyExamples slice encodes only these
    sharers = pieces_by_sharer(pool, config.target_modules)
    if not sharers:
        raise ValueError("loss-scored selection needs a pool with pieces: it is empty")
    # a sharer has at most one piece per (layer, module); "" is the stage-1 model itself
    candidates = {sharer: piece_updates(pieces, config.combination)
                  for sharer, pieces in sharers.items()}
    candidates[""] = {}
    losses = candidate_losses(model, candidates, examples, pad_id)
    stage1_loss = losses.pop("")
    best = min(losses, key=lambda s: (losses[s], s))
    entries: Mapping[Key, list[tuple[str, float]]] = {
        piece.key: [(piece.piece_id, 1.0)] for piece in sharers[best]}
    settings = config.to_dict()
    settings.update(method="perpcs-loss", sharer=best, scored_items=len(examples),
                    losses={s: round(v, 6) for s, v in losses.items()},
                    stage1_loss=round(stage1_loss, 6))
    return Recipe(dict(entries), config.combination, settings,
                  {p.piece_id: best for p in sharers[best]})
