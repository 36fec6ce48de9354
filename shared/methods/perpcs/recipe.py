"""What a PER-PCS target stores: piece ids and weights per layer and module (a recipe).

A recipe is bytes, not megabytes: for every (layer, module) a short list of (piece id, weight),
plus the combination method and the settings that produced it. :func:`rebuild` turns it back
into the adapter, bit for bit, from the pool's pieces.

Readable form (JSON, UTF-8: for people, logs and tests; a target stores the compact binary
form below, :meth:`Recipe.to_compact`)::

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

When the recipe knows each piece's sharer (``sources``, set by assembly) it is written as
``PCR2`` instead: the same header, then a sharer table and a digest, and one byte per piece::

    b"PCR2" | combination u8 | grid flag u8 | layout | n u8 | n x sharer tag (4 bytes of
    sha256(pseudonym)) | 8 bytes of sha256 over all piece ids in order | per (layer, module):
    a bit mask of the sharers used (ceil(n / 8) bytes), then one weight float16 per set bit

A piece is found in the pool by (layer, module, sharer) and the digest checks that they are
the very pieces the recipe was made with. Averaging over history batches makes the union of
picked pieces larger than top-k; at 2 bytes a piece plus a 2-byte mask per module (10
sharers) the recipe stays under 1.5 KB for SmolLM2 with up to 5 pieces per module (over
1,000x smaller than the OPPU adapter).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from shared.errors import PflError
from shared.methods.perpcs.pieces import COMBINATIONS, Key, LoraUpdate, Piece, combine, key_order

RECIPE_FORMAT = "pfl-perpcs-recipe/1"
COMPACT_MAGIC = b"PCR1"
COMPACT_MAGIC_SHARERS = b"PCR2"
ID_PREFIX_BYTES = 4
TAG_BYTES = 4
DIGEST_BYTES = 8
#: Module codes of the compact form (index = code).
MODULE_CODES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
COMBINATION_CODES = ("sum_of_products", "factors")


def sharer_tag(sharer: str) -> bytes:
    """4 bytes naming a sharer in a compact recipe: the head of sha256(pseudonym)."""
    return hashlib.sha256(sharer.encode("utf-8")).digest()[:TAG_BYTES]


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
    #: piece id -> sharer pseudonym (provenance); lets :meth:`to_compact` name pieces by a
    #: one-byte sharer index instead of a 4-byte id prefix.
    sources: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        if self.combination not in COMBINATIONS:
            raise PflError(f"recipe: unknown combination {self.combination!r}")
        clean = {}
        for key in sorted(self.entries, key=key_order):
            layer, module = key
            # Canonical order (weight descending, then id): the order pieces are combined in,
            # so equal recipes rebuild bit-identical adapters whatever order they came in.
            items = tuple(sorted(((str(pid), float16_value(float(w)))
                                  for pid, w in self.entries[key]),
                                 key=lambda item: (-item[1], item[0])))
            if not items:
                raise PflError(f"recipe: no pieces for layer {layer} {module}")
            if any(not math.isfinite(w) for _, w in items):
                raise PflError(f"recipe: non-finite weight at layer {layer} {module}")
            if len({pid for pid, _ in items}) != len(items):
                raise PflError(f"recipe: a piece appears twice at layer {layer} {module}")
            clean[(int(layer), str(module))] = items
        object.__setattr__(self, "entries", clean)
        object.__setattr__(self, "config", dict(self.config))
        needed = self.piece_ids()
        object.__setattr__(self, "sources", {pid: str(s) for pid, s in self.sources.items()
                                             if pid in needed})

    # ------------------------------------------------------------------ queries
    def piece_ids(self) -> set[str]:
        """Every piece id the recipe needs from the pool."""
        return {pid for items in self.entries.values() for pid, _ in items}

    def __eq__(self, other) -> bool:
        return (isinstance(other, Recipe) and self.entries == other.entries
                and self.combination == other.combination and self.config == other.config
                and self.sources == other.sources)

    # ------------------------------------------------------------ serialization
    def to_dict(self) -> dict:
        """A JSON-able dict (see the module docstring for the layout)."""
        return {"format": RECIPE_FORMAT, "combination": self.combination,
                "config": self.config, "sources": dict(sorted(self.sources.items())),
                "entries": [[layer, module, [[pid, w] for pid, w in items]]
                            for (layer, module), items in self.entries.items()]}

    def to_json(self) -> str:
        """Compact JSON text."""
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True,
                          allow_nan=False)

    def to_bytes(self) -> bytes:
        """The readable JSON form as UTF-8 bytes (a target stores :meth:`to_compact`)."""
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

    def _sharer_table(self) -> list[str] | None:
        """Sharers in first-use order when every piece has a known, distinct-enough source
        (at most 255 sharers, and no (layer, module) with two pieces of one sharer)."""
        if set(self.sources) != self.piece_ids():
            return None
        table: list[str] = []
        for items in self.entries.values():
            owners = [self.sources[pid] for pid, _ in items]
            if len(set(owners)) != len(owners):
                return None
            table += [o for o in owners if o not in table]
        return table if len(table) <= 255 else None

    def ids_digest(self) -> bytes:
        """8 bytes of sha256 over every entry's piece id, in order: pins the exact pieces."""
        h = hashlib.sha256()
        for items in self.entries.values():
            for pid, _ in items:
                h.update(pid.encode("ascii"))
        return h.digest()[:DIGEST_BYTES]

    def to_compact(self) -> bytes:
        """The binary form (see the module docstring): bytes, not kilobytes.

        With the sources of all pieces known this is ``PCR2`` (one byte per piece: its
        sharer's index), else ``PCR1`` (4-byte id prefixes)."""
        unknown = {m for _, m in self.entries if m not in MODULE_CODES}
        if unknown:
            raise PflError(f"recipe: no compact code for modules {sorted(unknown)}")
        table = self._sharer_table()
        out = bytearray(COMPACT_MAGIC if table is None else COMPACT_MAGIC_SHARERS)
        grid = self._grid()
        out += struct.pack("<BB", COMBINATION_CODES.index(self.combination), grid is not None)
        if grid is not None:
            out += struct.pack("<HB", *grid)
        else:
            out += struct.pack("<H", len(self.entries))
            for layer, module in self.entries:
                out += struct.pack("<HB", layer, MODULE_CODES.index(module))
        if table is not None:
            out += struct.pack("<B", len(table))
            for sharer in table:
                out += sharer_tag(sharer)
            out += self.ids_digest()
        mask_bytes = (len(table) + 7) // 8 if table is not None else 0
        for items in self.entries.values():
            if table is None:
                out += struct.pack("<B", len(items))
                for pid, weight in items:
                    out += bytes.fromhex(pid[: 2 * ID_PREFIX_BYTES]) + struct.pack("<e", weight)
                continue
            weights = {table.index(self.sources[pid]): w for pid, w in items}
            out += sum(1 << i for i in weights).to_bytes(mask_bytes, "little")
            for index in sorted(weights):
                out += struct.pack("<e", weights[index])
        return bytes(out)

    @classmethod
    def from_compact(cls, data: bytes, candidates: Mapping[Key, Sequence[str | tuple[str, str]]],
                     config: Mapping | None = None) -> "Recipe":
        """Inverse of :meth:`to_compact`. ``candidates`` maps (layer, module) to the pool's
        pieces there, as ids (enough for ``PCR1``) or (id, sharer) pairs (needed for
        ``PCR2``, whose 8-byte digest then checks that the very same pieces were found)."""
        try:
            magic = bytes(data[:4])
            if magic not in (COMPACT_MAGIC, COMPACT_MAGIC_SHARERS):
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
            tags: list[bytes] = []
            digest = b""
            if magic == COMPACT_MAGIC_SHARERS:
                (n_sharers,) = struct.unpack_from("<B", data, offset)
                offset += 1
                tags = [bytes(data[offset + i * TAG_BYTES: offset + (i + 1) * TAG_BYTES])
                        for i in range(n_sharers)]
                offset += n_sharers * TAG_BYTES
                digest = bytes(data[offset: offset + DIGEST_BYTES])
                offset += DIGEST_BYTES
            entries, sources = {}, {}
            mask_bytes = (len(tags) + 7) // 8
            for key in sorted(keys, key=key_order):
                pool_here = [(c, "") if isinstance(c, str) else (str(c[0]), str(c[1]))
                             for c in candidates.get(key, ())]
                refs: list[tuple[str, Callable[[str, str], bool], float]] = []
                if tags:
                    mask = int.from_bytes(data[offset: offset + mask_bytes], "little")
                    if len(data) < offset + mask_bytes or mask >> len(tags):
                        raise PflError("malformed compact PER-PCS recipe: bad sharer mask")
                    offset += mask_bytes
                    for index in range(len(tags)):
                        if mask >> index & 1:
                            (weight,) = struct.unpack_from("<e", data, offset)
                            offset += 2
                            tag = tags[index]
                            refs.append((f"sharer tag {tag.hex()}",
                                         lambda pid, s, tag=tag: bool(s) and sharer_tag(s) == tag,
                                         weight))
                else:
                    (k,) = struct.unpack_from("<B", data, offset)
                    offset += 1
                    for _ in range(k):
                        prefix = data[offset: offset + ID_PREFIX_BYTES].hex()
                        (weight,) = struct.unpack_from("<e", data, offset + ID_PREFIX_BYTES)
                        offset += ID_PREFIX_BYTES + 2
                        refs.append((f"id prefix {prefix}",
                                     lambda pid, s, prefix=prefix: pid.startswith(prefix),
                                     weight))
                items = []
                for what, matches_ref, weight in refs:
                    matches = [(pid, s) for pid, s in pool_here if matches_ref(pid, s)]
                    if len(matches) != 1:
                        found = "no" if not matches else "several"
                        raise PflError(f"recipe: {found} pool pieces at layer {key[0]} {key[1]} "
                                       f"match {what}")
                    pid, sharer = matches[0]
                    items.append((pid, weight))
                    if sharer:
                        sources[pid] = sharer
                entries[key] = tuple(items)
            if offset != len(data):
                raise PflError(f"compact recipe has {len(data) - offset} trailing bytes")
            recipe = cls(entries, COMBINATION_CODES[combination_code], config or {}, sources)
            if digest and recipe.ids_digest() != digest:
                raise PflError("recipe: the pool's pieces differ from the ones the recipe was "
                               "made with (id digest mismatch)")
            return recipe
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
            return cls(entries, data["combination"], data.get("config") or {},
                       data.get("sources") or {})
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
