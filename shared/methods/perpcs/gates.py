"""Post-hoc gates for a sharer's pieces, and the subset of pieces a sharer shares.

Each piece gets a gate g in R^{d_in}, initialised to zeros (so sigmoid(g . v) = 0.5 at first);
the piece's output becomes ``B A v * scaling * sigmoid(g . v)``. Everything but the gates is
frozen, and the gates are trained with the project's one loop (:func:`shared.training.train`)
on the sharer's own history examples for ``gate_steps`` steps.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from shared.methods.perpcs.config import PerPcsConfig
from shared.methods.perpcs.pieces import Piece, key_order, pieces_installed
from shared.training import Example, TrainConfig, batches, target_loss, target_positions, train


@dataclass
class GateTrainingResult:
    """Gated pieces and what the training did."""

    pieces: list[Piece]
    steps: int
    loss_before: float | None  # mean target-token loss with zero gates (None if not evaluated)
    loss_after: float | None
    seconds: float


def zero_gates(pieces: Sequence[Piece]) -> list[Piece]:
    """The pieces with gate = zeros(d_in) in float32 (sigmoid = 0.5 everywhere)."""
    return [p.with_gate(torch.zeros(p.d_in, dtype=torch.float32)) for p in pieces]


@torch.no_grad()
def mean_target_loss(model: torch.nn.Module, examples: Sequence[Example], pad_id: int, *,
                     batch_size: int = 8) -> float:
    """Token-weighted mean cross-entropy on target tokens over ``examples``."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for batch in batches(examples, batch_size, pad_id, shuffle=False, device=device):
            n = len(target_positions(batch["labels"])[1])
            if n:
                total += float(target_loss(model, batch, reduction="sum"))
                count += n
    finally:
        model.train(was_training)
    return total / max(1, count)


def gate_train_config(config: PerPcsConfig, base: TrainConfig | None = None) -> TrainConfig:
    """The training recipe for gates: ``base`` (default TrainConfig) with the gate lr, batch
    size and exactly ``gate_steps`` optimizer steps (epochs are repeated as needed)."""
    base = base or TrainConfig()
    return replace(base, lr=config.gate_lr, batch_size=config.gate_batch_size,
                   max_steps=config.gate_steps, epochs=float(config.gate_steps))


def train_gates(model: torch.nn.Module, pieces: Sequence[Piece], examples: Sequence[Example],
                pad_id: int, config: PerPcsConfig | None = None, *,
                train_config: TrainConfig | None = None, evaluate: bool = True,
                progress: bool = False) -> GateTrainingResult:
    """Train a zero-initialised gate per piece on the sharer's own history; return gated pieces.

    ``model`` is the (stage-1) base model; it is left exactly as it was (wrappers removed,
    ``requires_grad`` flags restored). Pieces that already have gates start from zeros anyway.
    With ``evaluate``, the mean target loss is measured before and after training.
    """
    config = config or PerPcsConfig()
    start = time.perf_counter()
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.requires_grad_(False)
        with pieces_installed(model, zero_gates(pieces), train_gates=True) as installed:
            gates = [g for w in installed.values() for g in w.gates]
            loss_before = mean_target_loss(model, examples, pad_id) if evaluate else None
            stats = train(model, gates, examples, gate_train_config(config, train_config),
                          pad_id, desc="gates", progress=progress)
            loss_after = mean_target_loss(model, examples, pad_id) if evaluate else None
            gated = [p for key in sorted(installed, key=key_order)
                     for p in installed[key].trained_pieces()]
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    return GateTrainingResult(gated, stats["steps"], loss_before, loss_after,
                              time.perf_counter() - start)


def select_shared_pieces(pieces: Sequence[Piece], ratio: float, seed: int = 0) -> list[Piece]:
    """The subset of a sharer's pieces submitted to the pool: ``round(ratio * n)`` pieces (at
    least one), drawn with a generator seeded by (seed, sharer) from the pieces in canonical
    (layer, module) order, so the same inputs always share the same pieces. Returned in
    canonical order.
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"sharing ratio must be in (0, 1], got {ratio}")
    ordered = sorted(pieces, key=lambda p: (key_order(p.key), p.piece_id))
    if ratio == 1.0 or not ordered:
        return ordered
    n = max(1, round(ratio * len(ordered)))
    sharers = sorted({p.sharer for p in ordered})
    rng = random.Random(f"perpcs-share:{seed}:{'|'.join(sharers)}")
    keep = set(rng.sample(range(len(ordered)), n))
    return [p for i, p in enumerate(ordered) if i in keep]
