"""The piece pool as a device reads it: the PER-PCS cores' piece source on a device
(:class:`PoolPieces`), every signature, content id and shape verified, listings and pieces
kept on the device and checked again when read back."""

from __future__ import annotations

import hashlib
import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from edge_client.pool_client import PoolClient
from shared.errors import PflError
from shared.files import write_atomic
from shared.methods.perpcs.core import PiecePool
from shared.serialization import Gate, SignedPiece, is_piece_id
from shared.wire import pfl_pb2

log = logging.getLogger(__name__)


class PoolUnavailable(PflError):
    """The piece pool could not be read (unreachable, refused, or no pieces for this
    device): the methods that read it fail on this device, the others go on."""


class PoolPieces:
    """The piece pool service as a device reads it, and the piece source of the PER-PCS core
    (:mod:`shared.methods.perpcs.core`): every signature and content id verified; with
    ``trusted_keys`` only those sharers' pieces, with ``shapes`` only pieces that fit this
    model; with ``run`` only pieces submitted under that run's grants. ``received`` adds up
    the tensor bytes that came down."""

    def __init__(self, target: str, ca: str | Path, *, interceptors: Sequence = (),
                 trusted_keys: Mapping[str, bytes] | None = None, shapes=None,
                 cache_dir: str | Path | None = None, run: str = ""):
        self.target, self.ca, self.interceptors = target, ca, interceptors
        self.run = run
        self.trusted, self.shapes = trusted_keys, shapes
        self.received = 0
        self._open: PoolClient | None = None
        self._pieces: dict = {}  # fetched pieces by content id (this phase)
        # signed pieces kept on the device by content id, checked again when read back
        self.cache_dir = None if cache_dir is None else Path(cache_dir)

    def _client(self) -> PoolClient:
        return PoolClient(self.target, self.ca, interceptors=self.interceptors,
                          trusted_keys=self.trusted, shapes=self.shapes)

    def _call(self, work):
        if self._open is not None:  # inside session(): one connection for every call
            return work(self._open)
        with self._client() as client:
            out = work(client)
        self.received += client.received_bytes
        return out

    @contextmanager
    def session(self) -> Iterator["PoolPieces"]:
        """One connection for every call made inside (assembly fetches layer by layer)."""
        with self._client() as client:
            self._open = client
            try:
                yield self
            finally:
                self._open = None
                self.received += client.received_bytes

    def gates(self, modules: Sequence[str]) -> list:
        """The pool's gates for ``modules`` from the trusted sharers. With ``cache_dir`` the
        listing is kept (keyed by the request) and read back, checked again, by a later
        phase: evaluation expands its recipe against the listing personalization used."""
        sharers = sorted(self.trusted or ())
        path = None
        if self.cache_dir is not None:
            request = json.dumps({"modules": list(modules), "run": self.run, "sharers": {
                s: (self.trusted or {})[s].hex() for s in sharers}}, sort_keys=True)
            path = self.cache_dir / f"gates-{hashlib.sha256(request.encode()).hexdigest()}"
            kept = self._kept_gates(path)
            if kept is not None:
                return kept
        gates = self._call(lambda c: c.list_gates(modules=list(modules), sharers=sharers,
                                                  run=self.run))
        if path is not None:
            blobs = [g.to_proto().SerializeToString() for g in gates]
            write_atomic(path, b"".join(len(b).to_bytes(4, "big") + b for b in blobs))
        return gates

    def _kept_gates(self, path: Path) -> list | None:
        """A kept gate listing, every gate checked as from the pool; None when absent or
        when any gate fails (then the pool is asked again)."""
        if not path.is_file():
            return None
        data, gates, at = path.read_bytes(), [], 0
        checker = self._client()
        try:
            while at < len(data):
                size = int.from_bytes(data[at:at + 4], "big")
                msg = pfl_pb2.GateEntry.FromString(data[at + 4:at + 4 + size])
                gates.append(checker.check_gate(Gate.from_proto(msg)))
                at += 4 + size
        except Exception:  # damaged or replaced on disk: list again
            log.warning("the kept gate listing %s failed its checks; listing again", path.name)
            return None
        finally:
            checker.close()
        return gates

    def fetch(self, ids: Sequence[str]) -> dict:
        """{id: Piece}; a piece fetched before (in this phase, or kept in ``cache_dir``) is
        not fetched again."""
        missing = [pid for pid in dict.fromkeys(ids) if pid not in self._pieces]
        if missing and self.cache_dir is not None:
            checker = self._client()  # its checks only (a channel opens on first call)
            try:
                for pid in list(missing):
                    signed = self._cached(pid, checker)
                    if signed is not None:
                        self._pieces[pid] = signed.piece
                        missing.remove(pid)
            finally:
                checker.close()
        if missing:
            fetched = self._call(lambda c: c.fetch(missing))
            for signed in fetched:
                self._pieces[signed.piece_id] = signed.piece
                self._keep(signed)
        return {pid: self._pieces[pid] for pid in ids}

    def _cached(self, piece_id: str, checker: PoolClient):
        """The signed piece kept under ``piece_id``, checked as from the pool; None when
        absent or when it fails a check (then it is fetched again)."""
        if not is_piece_id(piece_id):
            return None
        path = self.cache_dir / f"{piece_id}.piece"
        if not path.is_file():
            return None
        try:
            return checker.check(SignedPiece.from_proto(pfl_pb2.Piece.FromString(
                path.read_bytes())), piece_id)
        except Exception:  # damaged or replaced on disk: fetch it again
            log.warning("cached piece %s failed its checks; fetching it again", piece_id[:12])
            return None

    def _keep(self, signed) -> None:
        if self.cache_dir is not None:
            write_atomic(self.cache_dir / f"{signed.piece_id}.piece",
                                   signed.to_proto().SerializeToString())

    def pool(self, modules: Sequence[str], *, lazy: bool = False) -> PiecePool:
        """The pool for ``modules`` as the PER-PCS cores read them: every gated piece, or
        with ``lazy`` the gates only, each piece fetched when assembly selects it."""
        gates = self.gates(modules)
        if not gates:
            raise PoolUnavailable(f"the piece pool at {self.target} has no pieces for "
                                  f"{list(modules)}")
        if lazy:
            return PiecePool(pool=gates, lookup={}, fetch=self.fetch)
        return PiecePool.of(self.fetch([g.piece_id for g in gates]))


def fetch_pool(pool_target: str, pool_ca: str | Path, modules: Sequence[str], *,
               interceptors: Sequence = (), trusted_keys: Mapping[str, bytes] | None = None,
               shapes=None) -> PiecePool:
    """:meth:`PoolPieces.pool` of one pool service."""
    return PoolPieces(pool_target, pool_ca, interceptors=interceptors,
                      trusted_keys=trusted_keys, shapes=shapes).pool(modules)
