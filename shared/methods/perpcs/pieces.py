"""LoRA pieces: the one place where LoRA update math lives (training, pool and assembly).

A *piece* is the LoRA update (A, B) of one module in one decoder layer, contributed by one
sharer, optionally with a gate vector g (PER-PCS). Its output on an input row x is::

    gated_delta(x) = (x A^T B^T) * scaling * sigmoid(x . g)      (a per-token scalar gate)

and without a gate simply ``(x A^T B^T) * scaling`` (a plain LoRA update).

Two ways to combine weighted pieces of one module into a single update:

- :func:`combine_sum_of_products` (PER-PCS paper): Delta W = sum_s w_s * scaling_s * B_s A_s,
  kept exact and cheap as concatenated factors A_cat = [w_s scaling_s A_s], B_cat = [B_s].
- :func:`combine_factors` (the authors' code): A = sum_s w_s scaling_s A_s, B = sum_s w_s B_s,
  Delta W = B A. With equal scalings this is the code's ``scale * (sum w B)(sum w A)``; it has
  cross terms B_s A_t and is a different function.

:class:`PieceLinear` wraps a frozen ``nn.Linear`` and adds gated pieces (gate training) and/or
a combined :class:`LoraUpdate` (an assembled adapter). :func:`wrapped`, :func:`pieces_installed`
and :func:`updates_installed` put such wrappers on ``model.get_decoder().layers[i].self_attn.*``
(or ``.mlp.*``) and always put the original modules back on exit.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

#: The attention projections PER-PCS targets (the authors' code: q, k, v, o).
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
#: Where each targetable module sits inside a Llama-style decoder layer.
MODULE_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
                 "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp",
                 "down_proj": "mlp"}
#: A canonical order of modules inside one layer (the order a forward pass reaches them).
MODULE_ORDER = {name: i for i, name in enumerate(MODULE_PARENT)}
#: peft's key layout for a causal LM (what ``get_peft_model_state_dict`` returns).
PEFT_KEY_FORMAT = "base_model.model.model.layers.{layer}.{parent}.{module}.lora_{which}.weight"
PIECE_FORMAT = "pfl-lora-piece/1"

Key = tuple[int, str]  # (layer, module)

_PEFT_KEY = re.compile(r"^(?P<prefix>.*?)layers\.(?P<layer>\d+)\.(?P<parent>[A-Za-z_]\w*)\."
                       r"(?P<module>[A-Za-z_]\w*)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


def key_order(key: Key) -> tuple[int, int, str]:
    """Sort key for (layer, module): layers in order, modules in forward order."""
    layer, module = key
    return layer, MODULE_ORDER.get(module, len(MODULE_ORDER)), module


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The raw little-endian bytes of a tensor in row-major order (any dtype, bf16 included)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    data = flat.view(torch.uint8).numpy().tobytes()
    if sys.byteorder != "little" and tensor.element_size() > 1:  # pragma: no cover
        data = flat.numpy().byteswap().tobytes()
    return data


# --------------------------------------------------------------------------- the piece
@dataclass(frozen=True, eq=False)
class Piece:
    """One LoRA update (A, B) of one module in one layer, from one sharer, maybe gated.

    ``A`` is (r, d_in), ``B`` is (d_out, r), ``gate`` is (d_in,) or None. Tensors are detached
    copies, so a piece is an immutable value; its :attr:`piece_id` is a sha256 over a canonical
    encoding of (layer, module, A, B, gate, scaling, shapes, dtypes). The sharer pseudonym is
    provenance, not content: it is not part of the id.
    """

    sharer: str
    layer: int
    module: str
    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    gate: torch.Tensor | None = None

    def __post_init__(self):
        A, B = self.A.detach().clone(), self.B.detach().clone()
        if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]:
            raise ValueError(f"piece ({self.layer}, {self.module}): A must be (r, d_in) and B "
                             f"(d_out, r), got {tuple(A.shape)} and {tuple(B.shape)}")
        if not (A.is_floating_point() and B.is_floating_point()):
            raise ValueError("piece factors must be floating point")
        object.__setattr__(self, "A", A)
        object.__setattr__(self, "B", B)
        object.__setattr__(self, "layer", int(self.layer))
        object.__setattr__(self, "scaling", float(self.scaling))
        if self.gate is not None:
            gate = self.gate.detach().clone().reshape(-1)
            if gate.numel() != A.shape[1] or not gate.is_floating_point():
                raise ValueError(f"gate must have d_in={A.shape[1]} floats, got "
                                 f"{tuple(self.gate.shape)} {self.gate.dtype}")
            object.__setattr__(self, "gate", gate)

    # ----------------------------------------------------------------- shape facts
    @property
    def key(self) -> Key:
        return self.layer, self.module

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def d_in(self) -> int:
        return self.A.shape[1]

    @property
    def d_out(self) -> int:
        return self.B.shape[0]

    @property
    def num_bytes(self) -> int:
        """Bytes of payload (A, B and gate)."""
        size = self.A.numel() * self.A.element_size() + self.B.numel() * self.B.element_size()
        if self.gate is not None:
            size += self.gate.numel() * self.gate.element_size()
        return size

    # ------------------------------------------------------------------- identity
    def canonical_header(self) -> bytes:
        """The canonical JSON header hashed before the tensor bytes."""
        header = {
            "format": PIECE_FORMAT, "layer": self.layer, "module": self.module,
            "scaling": float(self.scaling).hex(),
            "A": {"dtype": str(self.A.dtype), "shape": list(self.A.shape)},
            "B": {"dtype": str(self.B.dtype), "shape": list(self.B.shape)},
            "gate": None if self.gate is None else {"dtype": str(self.gate.dtype),
                                                    "shape": list(self.gate.shape)},
        }
        return json.dumps(header, sort_keys=True, separators=(",", ":")).encode()

    @cached_property
    def piece_id(self) -> str:
        """Content id: hex sha256 of the header, a NUL, then the bytes of A, B and gate."""
        digest = hashlib.sha256(self.canonical_header())
        digest.update(b"\0")
        digest.update(tensor_bytes(self.A))
        digest.update(tensor_bytes(self.B))
        if self.gate is not None:
            digest.update(tensor_bytes(self.gate))
        return digest.hexdigest()

    # ---------------------------------------------------------------------- math
    def with_gate(self, gate: torch.Tensor | None) -> "Piece":
        """The same piece with another gate (a new piece, hence a new id)."""
        return Piece(self.sharer, self.layer, self.module, self.A, self.B, self.scaling, gate)

    def delta_weight(self) -> torch.Tensor:
        """The ungated update as a (d_out, d_in) matrix: B @ (A * scaling)."""
        return self.B @ (self.A * self.scaling)

    def __repr__(self) -> str:
        gated = "gated" if self.gate is not None else "ungated"
        return (f"Piece({self.sharer!r}, layer={self.layer}, {self.module}, r={self.rank}, "
                f"{self.d_in}->{self.d_out}, {gated}, id={self.piece_id[:12]})")


def lora_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
               gate: torch.Tensor | None = None) -> torch.Tensor:
    """``(x A^T B^T) * scaling``, times ``sigmoid(x . gate)`` per token when a gate is given.

    The gate score is computed in the gate's dtype (float32 gates train well even when the
    model runs in bf16).
    """
    out = (x @ A.t()) @ B.t() * scaling
    if gate is not None:
        prob = torch.sigmoid(x.to(gate.dtype) @ gate).to(out.dtype)
        out = out * prob.unsqueeze(-1)
    return out


def gated_delta(x: torch.Tensor, piece: Piece) -> torch.Tensor:
    """A piece's output on ``x`` (..., d_in): ``(x A^T B^T) * scaling * sigmoid(x . g)``."""
    gate = None if piece.gate is None else piece.gate.to(x.device)
    return lora_delta(x, piece.A.to(x), piece.B.to(x), piece.scaling, gate)


# --------------------------------------------------------------- combined updates
@dataclass(frozen=True, eq=False)
class LoraUpdate:
    """A low-rank module update Delta W = B @ A with any scaling already folded into A.

    ``A`` is (R, d_in), ``B`` is (d_out, R); applying it to x gives ``(x A^T) B^T``.
    """

    A: torch.Tensor
    B: torch.Tensor

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta_weight(self) -> torch.Tensor:
        """The (d_out, d_in) matrix B @ A."""
        return self.B @ self.A

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.A.t()) @ self.B.t()

    def to(self, *args, **kwargs) -> "LoraUpdate":
        """A copy on another device/dtype (``torch.Tensor.to`` arguments)."""
        return LoraUpdate(self.A.to(*args, **kwargs), self.B.to(*args, **kwargs))

    def equal(self, other: "LoraUpdate") -> bool:
        """Bit-for-bit equality of both factors."""
        return torch.equal(self.A, other.A) and torch.equal(self.B, other.B)


def _check_combinable(pieces: Sequence[Piece], weights: Sequence[float]) -> None:
    if not pieces:
        raise ValueError("nothing to combine: no pieces")
    if len(pieces) != len(weights):
        raise ValueError(f"{len(pieces)} pieces but {len(weights)} weights")
    d_in, d_out = pieces[0].d_in, pieces[0].d_out
    if any(p.d_in != d_in or p.d_out != d_out for p in pieces):
        raise ValueError("pieces to combine must share (d_out, d_in)")


def combine_sum_of_products(pieces: Sequence[Piece], weights: Sequence[float]) -> LoraUpdate:
    """The paper's combination: Delta W = sum_s w_s * scaling_s * B_s A_s, exactly.

    Kept as concatenated factors (rank = sum of the pieces' ranks): A_cat stacks
    ``A_s * (w_s * scaling_s)`` and B_cat stacks ``B_s`` side by side, so B_cat @ A_cat is
    the weighted sum of products.
    """
    _check_combinable(pieces, weights)
    A = torch.cat([p.A * (float(w) * p.scaling) for p, w in zip(pieces, weights)], dim=0)
    B = torch.cat([p.B for p in pieces], dim=1)
    return LoraUpdate(A, B)


def combine_factors(pieces: Sequence[Piece], weights: Sequence[float]) -> LoraUpdate:
    """The authors' code: A = sum_s w_s * scaling_s * A_s and B = sum_s w_s B_s; Delta W = B A.

    Not the paper's formula (it mixes B_s with A_t); offered to reproduce the code. Needs
    equal ranks.
    """
    _check_combinable(pieces, weights)
    if len({p.rank for p in pieces}) != 1:
        raise ValueError("combine_factors needs pieces of one rank")
    A = sum(p.A * (float(w) * p.scaling) for p, w in zip(pieces, weights))
    B = sum(p.B * float(w) for p, w in zip(pieces, weights))
    return LoraUpdate(A, B)


COMBINATIONS = {"sum_of_products": combine_sum_of_products, "factors": combine_factors}


def combine(pieces: Sequence[Piece], weights: Sequence[float],
            method: str = "sum_of_products") -> LoraUpdate:
    """Combine weighted pieces of one module with ``method`` ("sum_of_products"|"factors")."""
    try:
        return COMBINATIONS[method](pieces, weights)
    except KeyError:
        raise ValueError(f"unknown combination {method!r}; use one of "
                         f"{', '.join(COMBINATIONS)}") from None


def piece_updates(pieces: Iterable[Piece], combination: str = "sum_of_products"
                  ) -> dict[Key, LoraUpdate]:
    """Each piece alone, at weight 1, as its module's update (one piece per module): a
    sharer's or a user's whole adapter, installed as it was trained."""
    return {piece.key: combine([piece], [1.0], combination) for piece in pieces}


# ------------------------------------------------------------------ peft round trip
def pieces_from_peft_state_dict(state_dict: Mapping[str, torch.Tensor],
                                scaling: float | Mapping[str, float], sharer: str) -> list[Piece]:
    """Split a peft LoRA state dict into pieces (one per layer and module).

    Keys look like ``...layers.{i}.self_attn.q_proj.lora_A.weight`` (an adapter name before
    ``.weight`` is accepted too). ``scaling`` is alpha / r, one float or per module name.
    Keys that are not LoRA factors are ignored; an A without its B is an error.
    """
    found: dict[Key, dict[str, torch.Tensor]] = {}
    for name, tensor in state_dict.items():
        match = _PEFT_KEY.match(name)
        if match is None:
            continue
        key = (int(match["layer"]), match["module"])
        found.setdefault(key, {})[match["which"]] = tensor
    pieces = []
    for key in sorted(found, key=key_order):
        parts = found[key]
        if set(parts) != {"A", "B"}:
            raise ValueError(f"layer {key[0]} {key[1]}: LoRA A and B must both be present")
        s = scaling[key[1]] if isinstance(scaling, Mapping) else scaling
        pieces.append(Piece(sharer, key[0], key[1], parts["A"], parts["B"], float(s)))
    return pieces


def peft_state_dict_from_pieces(pieces: Iterable[Piece], *,
                                key_format: str = PEFT_KEY_FORMAT) -> dict[str, torch.Tensor]:
    """The inverse of :func:`pieces_from_peft_state_dict` (gates and scaling are dropped).

    ``key_format`` gets ``layer``, ``parent`` (self_attn/mlp), ``module`` and ``which`` (A/B).
    """
    out: dict[str, torch.Tensor] = {}
    for p in sorted(pieces, key=lambda p: key_order(p.key)):
        parent = MODULE_PARENT.get(p.module, "self_attn")
        for which, tensor in (("A", p.A), ("B", p.B)):
            name = key_format.format(layer=p.layer, parent=parent, module=p.module, which=which)
            if name in out:
                raise ValueError(f"two pieces for {name}")
            out[name] = tensor.clone()
    return out


# --------------------------------------------------------------- the module wrapper
class PieceLinear(nn.Module):
    """A frozen linear layer plus LoRA pieces (gated or not) and/or one combined update.

    ``forward(x) = base(x) + sum_i lora_delta(x, A_i, B_i, scaling_i, g_i) + update(x)``.
    Pieces' factors are non-persistent buffers (never trained); gates are parameters, trainable
    when added with ``train_gate=True``. The update is set with :meth:`set_update`.
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.gates = nn.ParameterList()
        self._pieces: list[tuple[Piece, str, str, int | None]] = []
        self.update: LoraUpdate | None = None

    # Code that reads a projection's weight (dtype checks, merging) still finds it.
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self):
        return getattr(self.base, "bias", None)

    @property
    def in_features(self) -> int:
        return self.base.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.base.weight.shape[0]

    def _like(self) -> dict:
        return {"device": self.base.weight.device, "dtype": self.base.weight.dtype}

    def add_piece(self, piece: Piece, *, train_gate: bool = False) -> None:
        """Add a piece; its gate (if any) becomes a float32 parameter (trainable if asked)."""
        if (piece.d_in, piece.d_out) != (self.in_features, self.out_features):
            raise ValueError(f"{piece!r} does not fit a {self.in_features}->"
                             f"{self.out_features} linear")
        i = len(self._pieces)
        a_name, b_name = f"piece{i}_A", f"piece{i}_B"
        self.register_buffer(a_name, piece.A.to(**self._like()), persistent=False)
        self.register_buffer(b_name, piece.B.to(**self._like()), persistent=False)
        gate_index = None
        if piece.gate is not None:
            gate = nn.Parameter(piece.gate.to(self.base.weight.device, torch.float32),
                                requires_grad=train_gate)
            self.gates.append(gate)
            gate_index = len(self.gates) - 1
        elif train_gate:
            raise ValueError(f"{piece!r} has no gate to train")
        self._pieces.append((piece, a_name, b_name, gate_index))

    @property
    def pieces(self) -> list[Piece]:
        """The pieces added, as given."""
        return [p for p, *_ in self._pieces]

    def gate_of(self, index: int) -> torch.Tensor | None:
        """The current gate parameter of the ``index``-th piece (None if ungated)."""
        gate_index = self._pieces[index][3]
        return None if gate_index is None else self.gates[gate_index]

    def trained_pieces(self) -> list[Piece]:
        """The pieces with their current gates (after gate training)."""
        out = []
        for i, (piece, *_rest) in enumerate(self._pieces):
            gate = self.gate_of(i)
            out.append(piece if gate is None else
                       piece.with_gate(gate.detach().to("cpu", piece.gate.dtype)))
        return out

    def set_update(self, update: LoraUpdate | None) -> None:
        """Set (or clear, with None) the combined update added to the output."""
        self.update = None if update is None else update.to(**self._like())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        for i, (piece, a_name, b_name, _) in enumerate(self._pieces):
            out = out + lora_delta(x, getattr(self, a_name), getattr(self, b_name),
                                   piece.scaling, self.gate_of(i))
        if self.update is not None:
            out = out + self.update(x)
        return out

    def extra_repr(self) -> str:
        return f"pieces={len(self._pieces)}, update={'yes' if self.update is not None else 'no'}"


# ---------------------------------------------------------- installing the wrappers
def decoder_layers(model: nn.Module):
    """The decoder layers of a HF causal LM (``model.get_decoder().layers``)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    return decoder.layers


def _parent(model: nn.Module, key: Key) -> tuple[nn.Module, str]:
    layer, module = key
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise ValueError(f"layer {layer} out of range for a {len(layers)}-layer model")
    parent = getattr(layers[layer], MODULE_PARENT.get(module, "self_attn"))
    if not hasattr(parent, module):
        raise ValueError(f"layer {layer} has no module {module!r}")
    return parent, module


def get_module(model: nn.Module, key: Key) -> nn.Module:
    """The module at (layer, module name), e.g. ``layers[3].self_attn.q_proj``."""
    parent, name = _parent(model, key)
    return getattr(parent, name)


def install_wrappers(model: nn.Module, keys: Iterable[Key]) -> dict[Key, PieceLinear]:
    """Replace each (layer, module) by an empty :class:`PieceLinear` around it.

    Pair with :func:`uninstall_wrappers` (or use :func:`wrapped`), which puts the original
    module objects back.
    """
    installed: dict[Key, PieceLinear] = {}
    try:
        for key in sorted(set(keys), key=key_order):
            parent, name = _parent(model, key)
            wrapper = PieceLinear(getattr(parent, name))
            setattr(parent, name, wrapper)
            installed[key] = wrapper
    except BaseException:
        uninstall_wrappers(model, installed)
        raise
    return installed


def uninstall_wrappers(model: nn.Module, installed: Mapping[Key, PieceLinear]) -> None:
    """Put back the original modules that :func:`install_wrappers` wrapped."""
    for key in sorted(installed, key=key_order, reverse=True):
        parent, name = _parent(model, key)
        if getattr(parent, name) is not installed[key]:
            raise RuntimeError(f"module at {key} was replaced by someone else; not restoring")
        setattr(parent, name, installed[key].base)


@contextmanager
def wrapped(model: nn.Module, keys: Iterable[Key]) -> Iterator[dict[Key, PieceLinear]]:
    """Context manager: empty wrappers on ``keys`` for the duration; originals back on exit."""
    installed = install_wrappers(model, keys)
    try:
        yield installed
    finally:
        uninstall_wrappers(model, installed)


@contextmanager
def pieces_installed(model: nn.Module, pieces: Iterable[Piece], *,
                     train_gates: bool = False) -> Iterator[dict[Key, PieceLinear]]:
    """Context manager: every piece added (gates trainable if asked) to its module."""
    pieces = list(pieces)
    with wrapped(model, [p.key for p in pieces]) as installed:
        for p in pieces:
            installed[p.key].add_piece(p, train_gate=train_gates)
        yield installed


@contextmanager
def updates_installed(model: nn.Module,
                      updates: Mapping[Key, LoraUpdate]) -> Iterator[dict[Key, PieceLinear]]:
    """Context manager: an assembled adapter ({(layer, module): update}) on the model."""
    with wrapped(model, updates) as installed:
        for key, update in updates.items():
            installed[key].set_update(update)
        yield installed
