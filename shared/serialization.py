"""Pieces, gates and grants <-> protobuf messages (shared.wire), with validation; the
tensor codec every method's own wire format uses (a method folder's ``wire.py``: PER-PCS
recipes, OPPU adapters, PerFit parameters).

Tensors travel as raw little-endian row-major bytes in float32 or float16 (never bf16) with
their shape and hex sha256. Decoding checks every inbound field before a :class:`Piece` is
built: dtype allowed, byte count and sha256 match, shapes consistent (A is (r, d_in), B is
(d_out, r), gate is (d_in,)), values finite, size and norm bounds (:class:`Limits`), names
well formed, and the claimed piece id equal to the content id. A failure raises
:class:`InvalidPiece` whose message names the piece and the problem.

The content bytes of a piece (:func:`content_bytes`) are exactly what its id hashes, so
``sha256(content_bytes(p)) == p.piece_id``: the pool stores them as content-addressed blobs.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping

import numpy as np
import torch

from shared import crypto
from shared.errors import PflError
from shared.methods.perpcs.pieces import Piece, tensor_bytes
from shared.wire import pfl_pb2

#: dtype names allowed on the wire -> (torch dtype, little-endian numpy dtype).
WIRE_DTYPES = {"float32": (torch.float32, np.dtype("<f4")),
               "float16": (torch.float16, np.dtype("<f2"))}
_WIRE_NAME = {torch_dtype: name for name, (torch_dtype, _) in WIRE_DTYPES.items()}
# fullmatch everywhere: "$" would also match before a trailing newline ("q_proj\n")
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_SHARER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}")
_PIECE_ID = re.compile(r"[0-9a-f]{64}")


class InvalidPiece(PflError):
    """An inbound or outbound piece, gate or recipe breaks a wire rule (message says which)."""


@dataclass(frozen=True)
class Limits:
    """Bounds every piece must respect (generous for 7B-class models, tiny for attacks)."""

    max_rank: int = 1024
    max_dim: int = 65536          # d_in and d_out
    max_layer: int = 4096
    max_piece_bytes: int = 64 << 20
    max_norm: float = 1e4         # Frobenius norm of A, B and the gate, each
    max_abs_scaling: float = 1e3
    #: Frobenius norm of the weight update a piece makes, |scaling * B A|. SmolLM2 sharers
    #: trained with the tuned recipe (lr 1e-3) give 0.08 median and 0.16 at most (1,200
    #: pieces of 10 sharers); 8 leaves 50x room for other recipes and models and still
    #: refuses the 1e10 updates that A, B and scaling at their own bounds allow, which no
    #: assembly weight (<= 1) could tame.
    max_update_norm: float = 8.0


@dataclass(frozen=True)
class ModelShapes:
    """The pieces a model can take: ``num_layers`` decoder layers and each module's
    ``(d_in, d_out)`` (:func:`shared.models.model_linear_shapes`). A piece for another layer,
    module or shape cannot be installed, so the pool and the targets refuse it."""

    num_layers: int
    modules: Mapping[str, tuple[int, int]]

    @classmethod
    def of(cls, model_or_name, **kwargs) -> "ModelShapes":
        """The shapes of a loaded ``torch.nn.Module`` or of a model name / path."""
        from shared import models  # lazy: transformers, only when shapes are read by name

        if isinstance(model_or_name, torch.nn.Module):
            layers, modules = models.decoder_linear_shapes(model_or_name)
        else:
            layers, modules = models.model_linear_shapes(model_or_name, **kwargs)
        return cls(layers, dict(modules))

    def check(self, piece: Piece) -> Piece:
        """The piece, or :class:`InvalidPiece` when the model has no such layer / module /
        shape."""
        where = f"piece ({piece.layer}, {piece.module})"
        if not 0 <= piece.layer < self.num_layers:
            raise InvalidPiece(f"{where}: the model has layers 0..{self.num_layers - 1}")
        if piece.module not in self.modules:
            raise InvalidPiece(f"{where}: the model's decoder layers have no module "
                               f"{piece.module!r}")
        if (piece.d_in, piece.d_out) != tuple(self.modules[piece.module]):
            raise InvalidPiece(f"{where}: shape {piece.d_in}->{piece.d_out}, the model's "
                               f"{piece.module} is {self.modules[piece.module][0]}->"
                               f"{self.modules[piece.module][1]}")
        return piece


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class RemoteKind:
    """How one method's personalization travels in a ``GenerateRequest`` (its ``oneof
    personalization`` field), registered by the method folder's ``wire.py``: the consent
    kind a device needs to send it (beyond ``inference_remote``; None: nothing more leaves
    than ids), and what its audit entry says of it: ``describe(part)`` gives (arrays sent,
    extra fields, meta)."""

    field: str
    consent: str | None
    describe: Callable[[Any], tuple[dict, dict, dict]]


_REMOTE_KINDS: dict[str, RemoteKind] = {}


def register_remote_kind(kind: RemoteKind) -> None:
    _REMOTE_KINDS[kind.field] = kind


def remote_kind(field_name: str) -> RemoteKind:
    """The registered kind of a ``GenerateRequest`` personalization field."""
    if field_name not in _REMOTE_KINDS:  # not yet imported: look in the method folders once
        # lazy: the method folders' wire modules import this one
        from shared.methods.base import discover

        discover()
    if field_name not in _REMOTE_KINDS:
        raise PflError(f"no method registered the personalization {field_name!r}")
    return _REMOTE_KINDS[field_name]


def wire_arrays(messages: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``{name: Tensor message}`` as numpy arrays, as sent (no checks: for describing)."""
    return {name: np.frombuffer(t.data, dtype=np.dtype(t.dtype)).reshape(tuple(t.shape))
            for name, t in messages.items()}


def is_piece_id(text: str) -> bool:
    """Whether ``text`` looks like a piece id (64 lowercase hex digits)."""
    return isinstance(text, str) and bool(_PIECE_ID.fullmatch(text))


# ---------------------------------------------------------------------------- tensors
def tensor_to_proto(tensor: torch.Tensor, name: str = "tensor") -> pfl_pb2.Tensor:
    """A float32/float16 tensor as a wire Tensor (bytes, shape, dtype, sha256)."""
    if tensor.dtype not in _WIRE_NAME:
        raise InvalidPiece(f"{name}: dtype {tensor.dtype} is not allowed on the wire "
                           f"(use float32 or float16; see piece_for_wire)")
    data = tensor_bytes(tensor)
    return pfl_pb2.Tensor(dtype=_WIRE_NAME[tensor.dtype], shape=list(tensor.shape), data=data,
                          sha256=hashlib.sha256(data).hexdigest())


def tensor_from_proto(msg: pfl_pb2.Tensor, name: str = "tensor",
                      limits: Limits = DEFAULT_LIMITS) -> torch.Tensor:
    """Decode and check a wire Tensor: dtype, byte count, sha256, size; returns a copy."""
    if msg.dtype not in WIRE_DTYPES:
        raise InvalidPiece(f"{name}: dtype {msg.dtype!r} is not allowed "
                           f"(allowed: {', '.join(WIRE_DTYPES)})")
    torch_dtype, np_dtype = WIRE_DTYPES[msg.dtype]
    if not 1 <= len(msg.shape) <= 2:
        raise InvalidPiece(f"{name}: {len(msg.shape)} dimensions (a vector or a matrix only)")
    shape = tuple(int(s) for s in msg.shape)
    if any(s < 1 for s in shape):
        raise InvalidPiece(f"{name}: shape {shape} has an empty dimension")
    if any(s > limits.max_dim for s in shape):
        raise InvalidPiece(f"{name}: shape {shape} exceeds the dimension bound {limits.max_dim}")
    expected = math.prod(shape) * np_dtype.itemsize
    if expected > limits.max_piece_bytes:
        raise InvalidPiece(f"{name}: {expected} bytes exceed the size bound "
                           f"{limits.max_piece_bytes}")
    if len(msg.data) != expected:
        raise InvalidPiece(f"{name}: {len(msg.data)} bytes for shape {shape} {msg.dtype} "
                           f"(expected {expected})")
    if hashlib.sha256(msg.data).hexdigest() != msg.sha256:
        raise InvalidPiece(f"{name}: sha256 of the bytes does not match the declared sha256")
    array = np.frombuffer(msg.data, dtype=np_dtype).astype(np_dtype.newbyteorder("="))
    return torch.from_numpy(array.reshape(shape)).to(torch_dtype)


# ----------------------------------------------------------------------- validation
def check_values(tensor: torch.Tensor, name: str, limits: Limits) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise InvalidPiece(f"{name} has non-finite values (NaN or inf)")
    norm = float(torch.linalg.vector_norm(tensor.double()))
    if norm > limits.max_norm:
        raise InvalidPiece(f"{name} norm {norm:.4g} exceeds the norm bound {limits.max_norm:g}")


def check_names(sharer: str, layer: int, module: str, limits: Limits = DEFAULT_LIMITS) -> None:
    """Check a sharer pseudonym, layer index and module name."""
    if not _SHARER.fullmatch(sharer or ""):
        raise InvalidPiece(f"sharer pseudonym {sharer!r} is not allowed (1-128 of "
                           "letters, digits and ._:@+- starting with a letter or digit)")
    if not 0 <= layer <= limits.max_layer:
        raise InvalidPiece(f"layer {layer} is out of range 0..{limits.max_layer}")
    if not _MODULE.fullmatch(module or ""):
        raise InvalidPiece(f"module name {module!r} is not an identifier")


def validate_piece(piece: Piece, limits: Limits = DEFAULT_LIMITS) -> Piece:
    """Check a piece against the wire rules; returns it, or raises :class:`InvalidPiece`."""
    where = f"piece ({piece.layer}, {piece.module})"
    check_names(piece.sharer, piece.layer, piece.module, limits)
    if piece.rank < 1 or piece.rank > limits.max_rank:
        raise InvalidPiece(f"{where}: rank {piece.rank} is out of range 1..{limits.max_rank}")
    if min(piece.d_in, piece.d_out) < 1 or max(piece.d_in, piece.d_out) > limits.max_dim:
        raise InvalidPiece(f"{where}: {piece.d_in}->{piece.d_out} exceeds the dimension bound "
                           f"{limits.max_dim}")
    if piece.num_bytes > limits.max_piece_bytes:
        raise InvalidPiece(f"{where}: {piece.num_bytes} bytes exceed the size bound "
                           f"{limits.max_piece_bytes}")
    if not math.isfinite(piece.scaling) or abs(piece.scaling) > limits.max_abs_scaling:
        raise InvalidPiece(f"{where}: scaling {piece.scaling} is not finite or exceeds "
                           f"{limits.max_abs_scaling:g}")
    for name, tensor in (("A", piece.A), ("B", piece.B), ("gate", piece.gate)):
        if tensor is None:
            continue
        if tensor.dtype not in _WIRE_NAME:
            raise InvalidPiece(f"{where}: {name} dtype {tensor.dtype} is not allowed "
                               "(float32 or float16; see piece_for_wire)")
        check_values(tensor, f"{where}: {name}", limits)
    update = update_norm(piece)
    if update > limits.max_update_norm:
        raise InvalidPiece(f"{where}: its update |scaling * B A| = {update:.4g} exceeds the "
                           f"bound {limits.max_update_norm:g}")
    return piece


def update_norm(piece: Piece) -> float:
    """|scaling * B A|_F, computed from r x r products: sqrt(trace((B^T B)(A A^T)))."""
    A, B = piece.A.double(), piece.B.double()
    value = float(torch.trace((B.T @ B) @ (A @ A.T)).clamp_min(0.0)) ** 0.5
    return abs(float(piece.scaling)) * value


def piece_for_wire(piece: Piece, dtype: torch.dtype = torch.float32) -> Piece:
    """The piece with any non-wire dtype (e.g. bf16) converted to ``dtype`` (a new id)."""
    def fix(t):
        return t if t is None or t.dtype in _WIRE_NAME else t.to(dtype)

    if all(t is None or t.dtype in _WIRE_NAME for t in (piece.A, piece.B, piece.gate)):
        return piece
    return Piece(piece.sharer, piece.layer, piece.module, fix(piece.A), fix(piece.B),
                 piece.scaling, fix(piece.gate))


def check_consent(consent: Mapping[str, bool]) -> dict[str, bool]:
    """Check consent flags (at most 32 names of 1-64 characters, boolean values)."""
    if len(consent) > 32:
        raise InvalidPiece(f"{len(consent)} consent flags (at most 32)")
    for name, value in consent.items():
        if not isinstance(name, str) or not 1 <= len(name) <= 64 or not isinstance(value, bool):
            raise InvalidPiece(f"consent flag {name!r}: names are 1-64 characters, "
                               "values booleans")
    return dict(consent)


# --------------------------------------------------------------------------- pieces
def piece_to_proto(piece: Piece, *, signature: bytes = b"", public_key: bytes = b"",
                   consent: Mapping[str, bool] | None = None,
                   limits: Limits = DEFAULT_LIMITS) -> pfl_pb2.Piece:
    """A validated piece (with optional signature, key and consent flags) as a wire Piece."""
    validate_piece(piece, limits)
    msg = pfl_pb2.Piece(piece_id=piece.piece_id, sharer=piece.sharer, layer=piece.layer,
                        module=piece.module, rank=piece.rank, scaling=piece.scaling,
                        a=tensor_to_proto(piece.A, "A"), b=tensor_to_proto(piece.B, "B"),
                        signature=signature, public_key=public_key)
    if piece.gate is not None:
        msg.gate.CopyFrom(tensor_to_proto(piece.gate, "gate"))
    msg.consent.update(dict(consent or {}))
    return msg


def piece_from_proto(msg: pfl_pb2.Piece, limits: Limits = DEFAULT_LIMITS) -> Piece:
    """Decode and validate a wire Piece; its claimed id (if any) must equal the content id."""
    where = f"piece ({msg.layer}, {msg.module})"
    check_names(msg.sharer, msg.layer, msg.module, limits)
    if not msg.HasField("a") or not msg.HasField("b"):
        raise InvalidPiece(f"{where}: A and B are both required")
    A = tensor_from_proto(msg.a, f"{where}: A", limits)
    B = tensor_from_proto(msg.b, f"{where}: B", limits)
    gate = tensor_from_proto(msg.gate, f"{where}: gate", limits) if msg.HasField("gate") else None
    if A.dim() != 2 or B.dim() != 2:
        raise InvalidPiece(f"{where}: A and B must be matrices, got shapes {tuple(A.shape)} "
                           f"and {tuple(B.shape)}")
    r, d_in = A.shape
    if B.shape[1] != r:
        raise InvalidPiece(f"{where}: B must be (d_out, r={r}), got {tuple(B.shape)}")
    if msg.rank != r:
        raise InvalidPiece(f"{where}: declared rank {msg.rank} but A has {r} rows")
    if gate is not None and tuple(gate.shape) != (d_in,):
        raise InvalidPiece(f"{where}: gate must be (d_in={d_in},), got {tuple(gate.shape)}")
    try:
        piece = Piece(msg.sharer, msg.layer, msg.module, A, B, msg.scaling, gate)
    except ValueError as exc:
        raise InvalidPiece(f"{where}: {exc}") from None
    validate_piece(piece, limits)
    if msg.piece_id and msg.piece_id != piece.piece_id:
        raise InvalidPiece(f"{where}: piece_id {msg.piece_id[:16]}... does not match the "
                           f"content (content id {piece.piece_id[:16]}...)")
    return piece


@dataclass(frozen=True)
class SignedPiece:
    """A piece with its sharer's signature, public key and consent flags (as pooled)."""

    piece: Piece
    signature: bytes = b""
    public_key: bytes = b""
    consent: Mapping[str, bool] = field(default_factory=dict)
    created_at: float = 0.0

    @property
    def piece_id(self) -> str:
        """The piece's content id."""
        return self.piece.piece_id

    @classmethod
    def sign(cls, piece: Piece, key, consent: Mapping[str, bool] | None = None
             ) -> "SignedPiece":
        """Sign ``piece`` (id + its sharer pseudonym) with an Ed25519 device key."""
        return cls(piece, crypto.sign_piece(key, piece.piece_id, piece.sharer),
                   crypto.public_key_bytes(key), dict(consent or {}))

    def verify(self) -> "SignedPiece":
        """Check the signature (``crypto.SignatureError`` otherwise); returns self."""
        crypto.verify_piece(self.public_key, self.piece.piece_id, self.piece.sharer,
                            self.signature)
        return self

    def to_proto(self, limits: Limits = DEFAULT_LIMITS) -> pfl_pb2.Piece:
        """The wire Piece."""
        msg = piece_to_proto(self.piece, signature=self.signature, public_key=self.public_key,
                             consent=self.consent, limits=limits)
        msg.created_at = self.created_at
        return msg

    @classmethod
    def from_proto(cls, msg: pfl_pb2.Piece, limits: Limits = DEFAULT_LIMITS) -> "SignedPiece":
        """Decode and validate (not verify) a wire Piece."""
        return cls(piece_from_proto(msg, limits), bytes(msg.signature), bytes(msg.public_key),
                   dict(msg.consent), float(msg.created_at))


# --------------------------------------------------------------------------- grants
_GRANT_ID = re.compile(r"[0-9a-f]{32}")
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}")


@dataclass(frozen=True)
class Grant:
    """A selected sharer's permission to submit pieces, signed by the federation key.

    ``public_key``: the sharer's device key, reported at selection and signed into the grant;
    the pool takes the grant from that key only, so a grant read off the wire is of no use to
    anyone else (empty: bound to the first key that uses it, an older grant)."""

    grant_id: str
    run: str
    max_pieces: int
    expires_at: float
    signature: bytes = b""
    public_key: bytes = b""

    @classmethod
    def mint(cls, key, run: str, max_pieces: int, ttl_seconds: float = 86400.0, *,
             public_key: bytes = b"") -> "Grant":
        """A fresh grant (random id) for ``run`` and the device key ``public_key``, signed
        with the federation ``key``."""
        import secrets
        import time

        grant = cls(secrets.token_hex(16), run, int(max_pieces), time.time() + ttl_seconds,
                    public_key=bytes(public_key))
        grant.check()
        return replace(grant, signature=crypto.sign(key, grant.signing_message()))

    def signing_message(self) -> bytes:
        return crypto.grant_signing_message(self.grant_id, self.run, self.max_pieces,
                                            self.expires_at, self.public_key)

    def check(self) -> "Grant":
        """Well-formed fields (:class:`InvalidPiece` otherwise)."""
        if not _GRANT_ID.fullmatch(self.grant_id or ""):
            raise InvalidPiece("grant: malformed grant id")
        if not RUN_NAME.fullmatch(self.run or ""):
            raise InvalidPiece("grant: malformed run name")
        if not 1 <= self.max_pieces <= 1 << 20 or not math.isfinite(self.expires_at):
            raise InvalidPiece("grant: max_pieces or expiry out of range")
        if len(self.public_key) not in (0, 32):
            raise InvalidPiece("grant: the bound device key is not 32 bytes")
        return self

    def verify(self, federation_key: bytes, now: float) -> "Grant":
        """Check the federation's signature and the expiry (``crypto.SignatureError``)."""
        self.check()
        crypto.verify(federation_key, self.signing_message(), self.signature)
        if now > self.expires_at:
            raise crypto.SignatureError(f"grant {self.grant_id[:8]} expired")
        return self

    def to_proto(self) -> pfl_pb2.SharerGrant:
        return pfl_pb2.SharerGrant(grant_id=self.grant_id, run=self.run,
                                   max_pieces=self.max_pieces, expires_at=self.expires_at,
                                   signature=self.signature, public_key=self.public_key)

    @classmethod
    def from_proto(cls, msg: pfl_pb2.SharerGrant) -> "Grant":
        return cls(msg.grant_id, msg.run, int(msg.max_pieces), float(msg.expires_at),
                   bytes(msg.signature), bytes(msg.public_key)).check()

    def to_text(self) -> str:
        """The grant as one JSON line (how the server hands it to a sharer in a message)."""
        return json.dumps({"grant_id": self.grant_id, "run": self.run,
                           "max_pieces": self.max_pieces, "expires_at": self.expires_at,
                           "signature": self.signature.hex(),
                           "public_key": self.public_key.hex()}, sort_keys=True)

    @classmethod
    def from_text(cls, text: str) -> "Grant":
        """Inverse of :meth:`to_text` (:class:`InvalidPiece` when malformed)."""
        try:
            data = json.loads(text)
            return cls(str(data["grant_id"]), str(data["run"]), int(data["max_pieces"]),
                       float(data["expires_at"]), bytes.fromhex(data["signature"]),
                       bytes.fromhex(str(data.get("public_key", "")))).check()
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidPiece(f"grant: malformed ({type(exc).__name__})") from None


# ---------------------------------------------------------------------------- gates
@dataclass(frozen=True)
class Gate:
    """A pooled piece's gate with its provenance: what a PER-PCS target scores."""

    piece_id: str
    sharer: str
    layer: int
    module: str
    rank: int
    gate: torch.Tensor
    signature: bytes = b""
    public_key: bytes = b""

    @property
    def key(self) -> tuple[int, str]:
        """(layer, module), as :attr:`Piece.key`: a gate stands for its piece in assembly."""
        return self.layer, self.module

    def verify(self) -> "Gate":
        """Check the sharer's signature over (piece id, sharer); returns self."""
        crypto.verify_piece(self.public_key, self.piece_id, self.sharer, self.signature)
        return self

    def to_proto(self) -> pfl_pb2.GateEntry:
        """The wire GateEntry."""
        return pfl_pb2.GateEntry(piece_id=self.piece_id, sharer=self.sharer, layer=self.layer,
                                 module=self.module, rank=self.rank,
                                 gate=tensor_to_proto(self.gate, "gate"),
                                 signature=self.signature, public_key=self.public_key)

    @classmethod
    def from_proto(cls, msg: pfl_pb2.GateEntry, limits: Limits = DEFAULT_LIMITS) -> "Gate":
        """Decode and validate a wire GateEntry."""
        where = f"gate of {msg.piece_id[:12]!r}"
        if not is_piece_id(msg.piece_id):
            raise InvalidPiece(f"{where}: malformed piece id")
        check_names(msg.sharer, msg.layer, msg.module, limits)
        gate = tensor_from_proto(msg.gate, where, limits)
        if gate.dim() != 1:
            raise InvalidPiece(f"{where}: must be a vector, got shape {tuple(gate.shape)}")
        check_values(gate, where, limits)
        return cls(msg.piece_id, msg.sharer, msg.layer, msg.module, msg.rank, gate,
                   bytes(msg.signature), bytes(msg.public_key))


# ---------------------------------------------------------------- content bytes (blobs)
def content_bytes(piece: Piece) -> bytes:
    """The bytes a piece id hashes: canonical header, NUL, A, B and gate bytes."""
    parts = [piece.canonical_header(), b"\0", tensor_bytes(piece.A), tensor_bytes(piece.B)]
    if piece.gate is not None:
        parts.append(tensor_bytes(piece.gate))
    return b"".join(parts)


def piece_from_content_bytes(data: bytes, sharer: str, expected_id: str | None = None) -> Piece:
    """Inverse of :func:`content_bytes` (the sharer is provenance, given separately).

    With ``expected_id`` the bytes must hash to it (``InvalidPiece`` otherwise).
    """
    if expected_id is not None and hashlib.sha256(data).hexdigest() != expected_id:
        raise InvalidPiece(f"piece {expected_id[:12]}: stored bytes do not hash to its id")
    cut = data.find(b"\0")
    try:
        header = json.loads(data[:cut]) if cut > 0 else None
        offset = cut + 1
        tensors = {}
        for name in ("A", "B", "gate"):
            spec = header[name]
            if spec is None:
                tensors[name] = None
                continue
            torch_dtype, np_dtype = WIRE_DTYPES[spec["dtype"].removeprefix("torch.")]
            size = math.prod(spec["shape"]) * np_dtype.itemsize
            chunk = np.frombuffer(data, dtype=np_dtype, count=size // np_dtype.itemsize,
                                  offset=offset).astype(np_dtype.newbyteorder("="))
            tensors[name] = torch.from_numpy(chunk.reshape(spec["shape"])).to(torch_dtype)
            offset += size
        if offset != len(data):
            raise ValueError(f"{len(data) - offset} trailing bytes")
        return Piece(sharer, header["layer"], header["module"], tensors["A"], tensors["B"],
                     float.fromhex(header["scaling"]), tensors["gate"])
    except (TypeError, KeyError, ValueError, json.JSONDecodeError) as exc:
        raise InvalidPiece(f"malformed piece content bytes: {exc}") from None
