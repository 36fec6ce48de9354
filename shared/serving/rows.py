"""What one row of a mixed batch carries: its own low-rank updates and its own intervention.

One copy of the frozen base model answers many users at once. What makes a row *that user's*
is a :class:`RowAdapter`:

- ``updates``: ``{(layer, module): LoraUpdate}``, the low-rank updates added to the base
  linear modules' outputs for this row only. The stage-1 task LoRA, an OPPU adapter and a
  PER-PCS assembly are all of this form: a PER-PCS adapter of k pieces is a rank k*r update
  (its pieces' factors side by side), and stage 1 plus a personal LoRA is one update whose
  rank is the sum (:func:`concat`). Scaling is folded into A (``LoraUpdate``).
- ``intervention``: PerFit's stages, applied to this row's hidden states at its own prompt
  positions (:class:`RowIntervention`).

Builders turn each method's stored state into a RowAdapter: :func:`lora_state_updates` (an
OPPU / stage-1 peft state), :func:`shared.methods.perpcs.recipe.rebuild` (PER-PCS). The base
model itself is never changed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from shared.errors import PflError
from shared.methods.perpcs.pieces import (Key, LoraUpdate, Piece, decoder_layers, get_module,
                                          piece_updates)

_MODULE_PATH = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)$")


def module_key(path: str) -> Key:
    """``(layer, module)`` of a module path such as ``model.layers.3.self_attn.q_proj`` (a
    peft prefix ``base_model.model.`` is allowed)."""
    match = _MODULE_PATH.search(path)
    if not match:
        raise PflError(f"not a decoder-layer linear module: {path!r}")
    return int(match.group(1)), match.group(2)


def lora_state_updates(state: Mapping[str, torch.Tensor], scaling: float
                       ) -> dict[Key, LoraUpdate]:
    """A flat LoRA state (``...q_proj.lora_A.weight`` / ``.lora_B.weight``, as OPPU and stage 1
    keep it) as updates, with ``scaling`` (alpha / r) folded into A: the same updates the
    service builds from the uploaded pieces."""
    return piece_updates(lora_state_pieces(state, scaling))


def lora_state_pieces(state: Mapping[str, torch.Tensor], scaling: float,
                      owner: str = "upload") -> list:
    """A flat LoRA state (an OPPU adapter) as ungated pieces, one per module: the form in
    which a device uploads it to the inference service (``adapter_to_proto``)."""
    # cycle: the method packages' cores import this module
    from shared.methods.oppu.model import PEFT_PREFIX, lora_pairs

    pieces = []
    for path, (A, B) in lora_pairs(state).items():
        path = path[len(PEFT_PREFIX):] if path.startswith(PEFT_PREFIX) else path
        layer, module = module_key(path)
        pieces.append(Piece(owner, layer, module, torch.as_tensor(A).float(),
                            torch.as_tensor(B).float(), float(scaling)))
    return pieces


def concat(*parts: Mapping[Key, LoraUpdate]) -> dict[Key, LoraUpdate]:
    """The sum of several sets of updates, module by module, as one set: where two parts have
    the same module their factors are stacked (ranks add), so that
    ``concat(a, b)[k](x) == a[k](x) + b[k](x)`` up to rounding."""
    out: dict[Key, list[LoraUpdate]] = {}
    for part in parts:
        for key, update in part.items():
            out.setdefault(key, []).append(update)
    return {key: ups[0] if len(ups) == 1 else
            LoraUpdate(torch.cat([u.A for u in ups], 0), torch.cat([u.B for u in ups], 1))
            for key, ups in out.items()}


@dataclass(frozen=True)
class RowIntervention:
    """PerFit on one row: ``stages`` (stage 1, then the row's stage 2; PerFitStage modules)
    applied at the row's prompt positions given by ``positions`` ("f7+l7", ...)."""

    stages: tuple
    positions: str = "f7+l7"

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted({layer for stage in self.stages for layer in stage.layers}))


@dataclass(frozen=True)
class RowAdapter:
    """One request's personalization (nothing: the base model)."""

    updates: Mapping[Key, LoraUpdate] = field(default_factory=dict)
    intervention: RowIntervention | None = None
    name: str = ""  # for logs and errors only

    def to(self, device) -> "RowAdapter":
        """The same adapter with its updates and PerFit stages on ``device`` (where the
        engine's model is: a CUDA engine then copies nothing host-to-device per batch). The
        updates are copies; the stages are modules, which ``Module.to`` moves in place."""
        updates = {key: update.to(device) for key, update in self.updates.items()}
        intervention = self.intervention
        if intervention is not None:
            intervention = RowIntervention(tuple(stage.to(device) for stage in
                                                 intervention.stages), intervention.positions)
        return RowAdapter(updates, intervention, self.name)

    @property
    def rank(self) -> int:
        """The largest rank among its updates (0 without any)."""
        return max((u.rank for u in self.updates.values()), default=0)

    def check(self, shapes: Mapping[Key, tuple[int, int]], num_layers: int,
              hidden_size: int, *, max_rank: int, values: bool = True) -> None:
        """Raise :class:`PflError` unless every update fits the model: a known module, the
        module's (d_out, d_in), a rank in 1..``max_rank``, finite values; and the
        intervention's layers and width fit too."""
        for key, update in self.updates.items():
            if key not in shapes:
                raise PflError(f"{self.name or 'adapter'}: the model has no module {key}")
            d_out, d_in = shapes[key]
            A, B = update.A, update.B
            if A.dim() != 2 or B.dim() != 2 or A.shape[1] != d_in or B.shape[0] != d_out \
                    or A.shape[0] != B.shape[1]:
                raise PflError(f"{self.name or 'adapter'}: update at {key} has shapes "
                               f"{tuple(A.shape)} / {tuple(B.shape)}, the module is "
                               f"{d_out}x{d_in}")
            if not 1 <= A.shape[0] <= max_rank:
                raise PflError(f"{self.name or 'adapter'}: rank {A.shape[0]} at {key} is "
                               f"outside 1..{max_rank}")
            if values and not (torch.isfinite(A).all() and torch.isfinite(B).all()):
                raise PflError(f"{self.name or 'adapter'}: non-finite values at {key}")
        if self.intervention is not None:
            layers = self.intervention.layers
            if layers and (min(layers) < 0 or max(layers) >= num_layers):
                raise PflError(f"{self.name or 'adapter'}: intervention layers {layers} do not "
                               f"fit a {num_layers}-layer model")
            for stage in self.intervention.stages:
                if stage.hidden_size != hidden_size:
                    raise PflError(f"{self.name or 'adapter'}: intervention width "
                                   f"{stage.hidden_size}, the model's is {hidden_size}")


def module_shapes(model: torch.nn.Module, modules: Sequence[str]) -> dict[Key, tuple[int, int]]:
    """``{(layer, module): (d_out, d_in)}`` of every decoder layer's ``modules``."""
    shapes = {}
    for layer in range(len(decoder_layers(model))):
        for module in modules:
            try:
                shapes[(layer, module)] = tuple(get_module(model, (layer, module)).weight.shape)
            except (ValueError, AttributeError):
                continue
    return shapes
