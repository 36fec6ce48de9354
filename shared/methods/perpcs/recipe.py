"""What a PER-PCS target stores: piece ids and weights per layer and module (a recipe).

A recipe is bytes, not megabytes: for every (layer, module) a short list of (piece id, weight),
plus the combination method and the settings that produced it. :func:`rebuild` turns it back
into the adapter, bit for bit, from the pool's pieces.

Serialized form (compact JSON, UTF-8)::

    {"format": "pfl-perpcs-recipe/1", "combination": "sum_of_products", "config": {...},
     "entries": [[layer, "q_proj", [["<sha256 hex>", weight], ...]], ...]}

Weights are held as float16 values (a mixing weight needs no more precision), written with
``repr`` in JSON, so a recipe read back holds the very same values.

Compact binary form (:meth:`Recipe.to_compact`, what a target stores; :attr:`num_bytes` is
its size)::

    b"PCR1" | combination u8 | grid flag u8 | layout | per (layer, module): k u8, then
    k x (first 4 bytes of the piece's sha256 id, weight float16)

``layout`` is (number of layers u16, module mask u8) when the recipe covers every
(layer, module) of a full grid in canonical order (the usual case), else the explicit list of
keys. Reading it back (:meth:`Recipe.from_compact`) needs the pool's candidate ids per
(layer, module) to expand the 4-byte prefixes; an unknown or ambiguous prefix is an error.
For SmolLM2 (30 layers x q,k,v,o, top-2) that is 1,568 bytes against 1.8 MB for an OPPU
adapter.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from shared.errors import PflError
from shared.methods.lora_pieces import COMBINATIONS, Key, LoraUpdate, Piece, combine, key_order

RECIPE_FORMAT = "pfl-perpcs-recipe/1"
COMPACT_MAGIC = b"PCR1"
ID_PREFIX_BYTES = 4
#: Module codes of the compact form (index = code).
MODULE_CODES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
COMBINATION_CODES = ("sum_of_products", "factors")


def float16_value(value: float) -> float:
    """The nearest float16 value, as a Python float."""
    return struct.unpack("<e", struct.pack("<e", value))[0]
PieceLookup = Mapping[str, Piece] | Callable[[str], Piece]


@dataclass(frozen=True)
class Recipe:
    """{(layer, module): ((piece_id, weight), ...)} plus combination method and settings."""

    entries: Mapping[Key, tuple[tuple[str, float], ...]]
    combination: str = "sum_of_products"
    config: Mapping = field(default_factory=dict)

    def __post_init__(self):
        if self.combination not in COMBINATIONS:
            raise PflError(f"recipe: unknown combination {self.combination!r}")
        clean = {}
        for key in sorted(self.entries, key=key_order):
            layer, module = key
            items = tuple((str(pid), float16_value(float(w))) for pid, w in self.entries[key])
            if not items:
                raise PflError(f"recipe: no pieces for layer {layer} {module}")
            if any(not math.isfinite(w) for _, w in items):
                raise PflError(f"recipe: non-finite weight at layer {layer} {module}")
            if len({pid for pid, _ in items}) != len(items):
                raise PflError(f"recipe: a piece appears twice at layer {layer} {module}")
            clean[(int(layer), str(module))] = items
        object.__setattr__(self, "entries", clean)
        object.__setattr__(self, "config", dict(self.config))

    # ------------------------------------------------------------------ queries
    def piece_ids(self) -> set[str]:
        """Every piece id the recipe needs from the pool."""
        return {pid for items in self.entries.values() for pid, _ in items}

    def __eq__(self, other) -> bool:
        return (isinstance(other, Recipe) and self.entries == other.entries
                and self.combination == other.combination and self.config == other.config)

    # ------------------------------------------------------------ serialization
    def to_dict(self) -> dict:
        """A JSON-able dict (see the module docstring for the layout)."""
        return {"format": RECIPE_FORMAT, "combination": self.combination,
                "config": self.config,
                "entries": [[layer, module, [[pid, w] for pid, w in items]]
                            for (layer, module), items in self.entries.items()]}

    def to_json(self) -> str:
        """Compact JSON text."""
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True,
                          allow_nan=False)

    def to_bytes(self) -> bytes:
        """Compact JSON as UTF-8 bytes (what a target stores)."""
        return self.to_json().encode("utf-8")

    @property
    def num_bytes(self) -> int:
        """Bytes a target stores: the size of :meth:`to_compact`."""
        return len(self.to_compact())

    def _grid(self) -> tuple[int, int] | None:
        """(layers, module mask) when the keys are exactly a full layers x modules grid."""
        keys = list(self.entries)
        modules = sorted({m for _, m in keys}, key=MODULE_CODES.index)
        layers = sorted({layer for layer, _ in keys})
        if layers != list(range(len(layers))) or len(keys) != len(layers) * len(modules):
            return None
        mask = sum(1 << MODULE_CODES.index(m) for m in modules)
        return len(layers), mask

    def to_compact(self) -> bytes:
        """The binary form (see the module docstring): bytes, not kilobytes."""
        unknown = {m for _, m in self.entries if m not in MODULE_CODES}
        if unknown:
            raise PflError(f"recipe: no compact code for modules {sorted(unknown)}")
        out = bytearray(COMPACT_MAGIC)
        grid = self._grid()
        out += struct.pack("<BB", COMBINATION_CODES.index(self.combination), grid is not None)
        if grid is not None:
            out += struct.pack("<HB", *grid)
        else:
            out += struct.pack("<H", len(self.entries))
            for layer, module in self.entries:
                out += struct.pack("<HB", layer, MODULE_CODES.index(module))
        for items in self.entries.values():
            out += struct.pack("<B", len(items))
            for pid, weight in items:
                out += bytes.fromhex(pid[: 2 * ID_PREFIX_BYTES]) + struct.pack("<e", weight)
        return bytes(out)

    @classmethod
    def from_compact(cls, data: bytes, candidates: Mapping[Key, Sequence[str]],
                     config: Mapping | None = None) -> "Recipe":
        """Inverse of :meth:`to_compact`; ``candidates`` maps (layer, module) to the pool's
        piece ids there, which expand the stored 4-byte prefixes."""
        try:
            if data[:4] != COMPACT_MAGIC:
                raise PflError("not a compact PER-PCS recipe")
            combination_code, is_grid = struct.unpack_from("<BB", data, 4)
            offset = 6
            if is_grid:
                n_layers, mask = struct.unpack_from("<HB", data, offset)
                offset += 3
                modules = [m for i, m in enumerate(MODULE_CODES) if mask >> i & 1]
                keys = [(layer, m) for layer in range(n_layers) for m in modules]
            else:
                (n_keys,) = struct.unpack_from("<H", data, offset)
                offset += 2
                keys = []
                for _ in range(n_keys):
                    layer, code = struct.unpack_from("<HB", data, offset)
                    offset += 3
                    keys.append((layer, MODULE_CODES[code]))
            entries = {}
            for key in sorted(keys, key=key_order):
                (k,) = struct.unpack_from("<B", data, offset)
                offset += 1
                items = []
                for _ in range(k):
                    prefix = data[offset: offset + ID_PREFIX_BYTES].hex()
                    (weight,) = struct.unpack_from("<e", data, offset + ID_PREFIX_BYTES)
                    offset += ID_PREFIX_BYTES + 2
                    matches = [pid for pid in candidates.get(key, ()) if pid.startswith(prefix)]
                    if len(matches) != 1:
                        what = "no" if not matches else "several"
                        raise PflError(f"recipe: {what} pool pieces at layer {key[0]} {key[1]} "
                                       f"match id prefix {prefix}")
                    items.append((matches[0], weight))
                entries[key] = tuple(items)
            if offset != len(data):
                raise PflError(f"compact recipe has {len(data) - offset} trailing bytes")
            return cls(entries, COMBINATION_CODES[combination_code], config or {})
        except (struct.error, IndexError) as exc:
            raise PflError(f"malformed compact PER-PCS recipe: {exc}") from None

    @classmethod
    def from_dict(cls, data: Mapping) -> "Recipe":
        """Inverse of :meth:`to_dict`, with validation."""
        if not isinstance(data, Mapping) or data.get("format") != RECIPE_FORMAT:
            raise PflError(f"not a PER-PCS recipe (expected format {RECIPE_FORMAT!r})")
        entries: dict[Key, tuple] = {}
        try:
            for layer, module, items in data["entries"]:
                if not isinstance(layer, int) or not isinstance(module, str):
                    raise TypeError("layer must be int and module str")
                key = (layer, module)
                if key in entries:
                    raise PflError(f"recipe: layer {layer} {module} appears twice")
                entries[key] = tuple((str(pid), float(w)) for pid, w in items)
            return cls(entries, data["combination"], data.get("config") or {})
        except (KeyError, TypeError, ValueError) as exc:
            raise PflError(f"malformed PER-PCS recipe: {exc}") from None

    @classmethod
    def from_json(cls, text: str | bytes) -> "Recipe":
        """Read :meth:`to_json` / :meth:`to_bytes` output."""
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PflError(f"malformed PER-PCS recipe: {exc}") from None
        return cls.from_dict(data)

    from_bytes = from_json


def _lookup(piece_lookup: PieceLookup, piece_id: str) -> Piece:
    try:
        piece = piece_lookup(piece_id) if callable(piece_lookup) else piece_lookup[piece_id]
    except KeyError:
        piece = None
    if piece is None:
        raise PflError(f"piece {piece_id} is not in the pool")
    return piece


def rebuild(recipe: Recipe, piece_lookup: PieceLookup, *,
            verify_ids: bool = True) -> dict[Key, LoraUpdate]:
    """The adapter a recipe describes: {(layer, module): combined update}, bit for bit.

    ``piece_lookup`` maps piece id -> :class:`Piece` (a dict or a callable, e.g. the pool).
    With ``verify_ids`` each fetched piece's content id is recomputed and must match, and it
    must sit at the recipe's layer and module.
    """
    updates: dict[Key, LoraUpdate] = {}
    for key, items in recipe.entries.items():
        pieces: list[Piece] = []
        for pid, _ in items:
            piece = _lookup(piece_lookup, pid)
            if verify_ids and piece.piece_id != pid:
                raise PflError(f"piece {pid[:12]}... does not hash to its id")
            if piece.key != key:
                raise PflError(f"piece {pid[:12]}... belongs to {piece.key}, not {key}")
            pieces.append(piece)
        updates[key] = combine(pieces, [w for _, w in items], recipe.combination)
    return updates


def average_weights(per_batch: Sequence[Mapping[Key, Sequence[tuple[str, float]]]]
                    ) -> dict[Key, tuple[tuple[str, float], ...]]:
    """Average per-batch selections: a piece's weight is the mean over batches (0 where a
    batch did not pick it). Both combinations are linear in the weights given the pieces, so
    this equals averaging the per-batch adapters (what the authors' code does). Entries are
    sorted by weight (descending), then piece id.
    """
    if not per_batch:
        raise ValueError("no batches to average")
    sums: dict[Key, dict[str, float]] = {}
    for selection in per_batch:
        for key, items in selection.items():
            bucket = sums.setdefault(key, {})
            for pid, w in items:
                bucket[pid] = bucket.get(pid, 0.0) + float(w)
    n = len(per_batch)
    return {key: tuple(sorted(((pid, total / n) for pid, total in bucket.items()),
                              key=lambda item: (-item[1], item[0])))
            for key, bucket in sorted(sums.items(), key=lambda kv: key_order(kv[0]))}
