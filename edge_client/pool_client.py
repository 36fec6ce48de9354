"""A device's client of the piece pool (gRPC over TLS).

    with PoolClient("127.0.0.1:50061", "certs/") as pool:      # trusts certs/ca.pem
        pool.submit(pieces, device_key, consent={"pool": True})
        gates = pool.list_gates(layers=[3], modules=["q_proj"])
        pieces = pool.fetch([g.piece_id for g in gates[:2]])

Everything that comes back is checked: tensors decoded and validated, each fetched piece's
content id recomputed and compared with the id asked for, and every signature verified
(optionally against pinned sharer keys). ``interceptors`` are gRPC client interceptors (for
example an audit ledger that records every outbound payload).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping, Sequence

import grpc

from shared import crypto
from shared.errors import PflError
from shared.methods.perpcs.pieces import Piece
from shared.serialization import (DEFAULT_LIMITS, Gate, Grant, InvalidPiece, Limits,
                                  ModelShapes, SignedPiece)
from shared.wire import pfl_pb2, pfl_pb2_grpc

MAX_MESSAGE_BYTES = 128 << 20
FETCH_CHUNK = 64


class PoolError(PflError):
    """A pool call failed; ``.code`` is the gRPC status code (e.g. INVALID_ARGUMENT)."""

    def __init__(self, code: grpc.StatusCode, details: str):
        self.code = code
        self.details = details
        super().__init__(f"pool: {code.name}: {details}")


class PoolClient:
    """Submit signed pieces to, list gates of, and fetch pieces from a pool server."""

    def __init__(self, target: str, root_certificates: bytes | str | Path, *,
                 interceptors: Sequence[grpc.UnaryUnaryClientInterceptor
                                        | grpc.UnaryStreamClientInterceptor] = (),
                 trusted_keys: Mapping[str, bytes] | None = None, timeout: float = 60.0,
                 server_name: str | None = None, limits: Limits = DEFAULT_LIMITS,
                 shapes: ModelShapes | None = None):
        """``root_certificates``: CA PEM bytes, a PEM file or a `pfl certs` directory.

        ``trusted_keys`` pins sharers' public keys: when given, every piece and gate must come
        from a listed sharer with that key. ``shapes``: every gate and piece must fit this
        model (a layer it has, a module it has, that module's shape). ``server_name``
        overrides the TLS host name.
        """
        self._channel, channel = crypto.tls_channel(
            target, root_certificates, max_message_bytes=MAX_MESSAGE_BYTES,
            server_name=server_name, interceptors=interceptors)
        self._stub = pfl_pb2_grpc.PiecePoolStub(channel)
        self.target = target
        self.timeout = timeout
        self.limits = limits
        self.trusted_keys = None if trusted_keys is None else dict(trusted_keys)
        self.shapes = shapes
        #: tensor bytes of every gate listed and piece (A, B, gate) fetched so far: the
        #: device's pool downlink
        self.received_bytes = 0

    # ----------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> "PoolClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------- helpers
    def _check_key(self, sharer: str, public_key: bytes) -> None:
        if self.trusted_keys is None:
            return
        if self.trusted_keys.get(sharer) != public_key:
            raise crypto.SignatureError(f"sharer {sharer!r} is not trusted with key "
                                        f"{crypto.key_fingerprint(public_key)}")

    def _check_gate_shape(self, gate: Gate) -> None:
        module = self.shapes.modules.get(gate.module)
        if not 0 <= gate.layer < self.shapes.num_layers or module is None or \
                tuple(gate.gate.shape) != (module[0],):
            raise InvalidPiece(f"gate of {gate.piece_id[:12]}: ({gate.layer}, {gate.module!r}) "
                               "does not fit the model")

    # ----------------------------------------------------------------------- API
    def submit(self, pieces: Iterable[Piece], key, consent: Mapping[str, bool] | None = None,
               grant: Grant | None = None) -> list[tuple[str, bool]]:
        """Sign pieces with the device ``key`` and submit them as one all-or-nothing batch,
        with the federation's ``grant`` (a pool that is not open needs one).

        Returns (piece id, created) per piece; created is False if the pool had it already.
        """
        return self.submit_signed([SignedPiece.sign(p, key, consent) for p in pieces], grant)

    def submit_signed(self, pieces: Sequence[SignedPiece], grant: Grant | None = None
                      ) -> list[tuple[str, bool]]:
        """Submit already-signed pieces as one batch."""
        request = pfl_pb2.SubmitPiecesRequest(pieces=[p.to_proto(self.limits) for p in pieces])
        if grant is not None:
            request.grant.CopyFrom(grant.to_proto())
        try:
            reply = self._stub.SubmitPieces(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise PoolError(exc.code(), exc.details()) from None
        return [(r.piece_id, r.created) for r in reply.results]

    def list_gates(self, layers: Iterable[int] = (), modules: Iterable[str] = (),
                   sharers: Iterable[str] = (), run: str = "") -> list[Gate]:
        """Gates of the pooled gated pieces matching the filters, signatures verified; with
        ``run``, only pieces submitted under that run's grants."""
        request = pfl_pb2.ListGatesRequest(layers=list(layers), modules=list(modules),
                                           sharers=list(sharers), run=run)
        gates = []
        try:
            for msg in self._stub.ListGates(request, timeout=self.timeout):
                gate = self.check_gate(Gate.from_proto(msg, self.limits))
                self.received_bytes += gate.gate.numel() * gate.gate.element_size()
                gates.append(gate)
        except grpc.RpcError as exc:
            raise PoolError(exc.code(), exc.details()) from None
        return gates

    def fetch(self, piece_ids: Sequence[str]) -> list[SignedPiece]:
        """The pieces with these ids, in order; content ids and signatures verified."""
        ids = list(piece_ids)
        out: list[SignedPiece] = []
        for start in range(0, len(ids), FETCH_CHUNK):
            chunk = ids[start:start + FETCH_CHUNK]
            request = pfl_pb2.FetchPiecesRequest(piece_ids=chunk)
            try:
                received = [SignedPiece.from_proto(msg, self.limits)
                            for msg in self._stub.FetchPieces(request, timeout=self.timeout)]
            except grpc.RpcError as exc:
                raise PoolError(exc.code(), exc.details()) from None
            if len(received) != len(chunk):
                raise InvalidPiece(f"asked for {len(chunk)} pieces, got {len(received)}")
            for asked, signed in zip(chunk, received):
                self.check(signed, asked)
                self.received_bytes += signed.piece.num_bytes
            out.extend(received)
        return out

    def check_gate(self, gate: Gate) -> Gate:
        """Refuse a gate whose signature fails, whose sharer is not trusted or that does not
        fit the model (what every listed gate, or one a device kept, must pass)."""
        gate.verify()
        self._check_key(gate.sharer, gate.public_key)
        if self.shapes is not None:
            self._check_gate_shape(gate)
        return gate

    def check(self, signed: SignedPiece, asked: str) -> SignedPiece:
        """Refuse a piece that is not ``asked`` (its content hashes to another id), whose
        signature fails, whose sharer is not trusted or that does not fit the model: what
        every piece from the pool, or from a device's own cache of them, must pass."""
        if signed.piece_id != asked:
            raise InvalidPiece(f"asked for piece {asked[:12]} but its content hashes "
                               f"to {signed.piece_id[:12]}")
        signed.verify()
        self._check_key(signed.piece.sharer, signed.public_key)
        if self.shapes is not None:
            self.shapes.check(signed.piece)
        return signed

    def fetch_pieces(self, piece_ids: Iterable[str]) -> dict[str, Piece]:
        """{piece id: Piece} for a recipe rebuild (``recipe.rebuild(recipe, mapping)``)."""
        ids = list(dict.fromkeys(piece_ids))
        return {s.piece_id: s.piece for s in self.fetch(ids)}


def describe_request(method: str, request) -> dict:
    """What an outbound pool request carries, for the audit ledger
    (:class:`edge_client.audit.AuditClientInterceptor`'s ``describe_request_fn``).

    ``SubmitPieces``: every tensor of every piece (``PIECE_ID/A``, ``/B``, ``/gate``) with
    shape, dtype and sha256, under the rule ``upload.perpcs_pieces``. ``ListGates`` /
    ``FetchPieces``: the filters / piece ids asked for (no personal data; rule ``none``).
    """
    import numpy as np

    name = method.rsplit("/", 1)[-1]
    if name == "SubmitPieces":
        arrays = {}
        for piece in request.pieces:
            for field in ("a", "b", "gate"):
                if piece.HasField(field):
                    tensor = getattr(piece, field)
                    arrays[f"{piece.piece_id[:16]}/{field if field == 'gate' else field.upper()}"] = \
                        np.frombuffer(tensor.data, dtype=np.dtype(tensor.dtype)).reshape(
                            tuple(tensor.shape))
        return {"arrays": arrays, "consent_rule": "upload.perpcs_pieces",
                "extra": {"pieces": len(request.pieces),
                          "sharers": sorted({p.sharer for p in request.pieces})}}
    if name == "ListGates":
        return {"consent_rule": "none (a query)",
                "extra": {"layers": list(request.layers), "modules": list(request.modules)}}
    if name == "FetchPieces":
        return {"consent_rule": "none (a query)",
                "extra": {"piece_ids": len(request.piece_ids)}}
    return {"consent_rule": None, "extra": {"method": name}}
