"""The piece pool's gRPC service (TLS): SubmitPieces, ListGates, FetchPieces.

Every submitted piece is decoded and validated (shapes, dtype, finiteness, size and norm
bounds, content id) and its Ed25519 signature verified before anything is stored; a batch is
all-or-nothing. Errors carry a gRPC status whose details name the piece and the problem:

    INVALID_ARGUMENT   malformed or out-of-bounds payload (e.g. "piece 0 (3, 'q_proj'): A has
                       non-finite values (NaN or inf)"), a piece the model has no place for,
                       a request over its size caps (filters, repeated or too many ids)
    UNAUTHENTICATED    missing or bad signature, or a pseudonym bound to another key
    PERMISSION_DENIED  no valid federation grant (or one bound to another key, or used up),
                       or pieces without consent ``pool = true``
    NOT_FOUND          fetch of unknown piece ids
    RESOURCE_EXHAUSTED a fetch whose pieces add up to more than MAX_FETCH_BYTES
    DATA_LOSS          a stored blob changed on disk
    INTERNAL           anything unexpected (a fixed message; the details are in the log)

Run it with ``python -m cloud_server.pool_service --db DIR --port P --certs DIR`` (or
``pfl pool serve``); it prints ``pfl pool: serving ... on HOST:PORT`` once listening.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path
from typing import Sequence

import grpc

from cloud_server.pool_store import NotPermitted, PieceNotFound, PoolCorruption, PoolStore
from cloud_server.rpc import Admission, guard, run_until_stopped, target_of, tls_server
from shared import crypto
from shared.errors import PflError
from shared.serialization import (DEFAULT_LIMITS, RUN_NAME, Grant, InvalidPiece, SignedPiece,
                                  check_names, is_piece_id)
from shared.serialization import ModelShapes
from shared.wire import pfl_pb2, pfl_pb2_grpc

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 128 << 20
MAX_BATCH = 4096
MAX_FETCH = 1024
MAX_FETCH_BYTES = 64 << 20      # tensor bytes one FetchPieces call may stream
MAX_FILTER = {"layers": 4096, "modules": 64, "sharers": 1024}  # ListGates filter entries


class PiecePoolServicer(pfl_pb2_grpc.PiecePoolServicer):
    """Serves a :class:`PoolStore` over gRPC."""

    def __init__(self, store: PoolStore, *, max_batch: int = MAX_BATCH,
                 max_fetch: int = MAX_FETCH):
        self.store = store
        self.max_batch = max_batch
        self.max_fetch = max_fetch

    @guard
    def SubmitPieces(self, request, context):
        """Validate and verify every piece, then store the batch (all or nothing)."""
        n = len(request.pieces)
        if not 1 <= n <= self.max_batch:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"a batch holds 1..{self.max_batch} pieces, got {n}")
        batch = []
        for i, msg in enumerate(request.pieces):
            try:
                signed = SignedPiece.from_proto(msg, self.store.limits)
            except InvalidPiece as exc:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"piece {i}: {exc}")
            if not msg.signature or not msg.public_key:
                context.abort(grpc.StatusCode.UNAUTHENTICATED,
                              f"piece {i} ({signed.piece_id[:12]}): unsigned (signature and "
                              "public key are required)")
            try:
                signed.verify()
            except crypto.SignatureError as exc:
                context.abort(grpc.StatusCode.UNAUTHENTICATED, f"piece {i}: {exc}")
            batch.append(signed)
        grant = None
        if request.HasField("grant"):
            try:
                grant = Grant.from_proto(request.grant)
            except InvalidPiece as exc:
                context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        try:
            results = self.store.submit(batch, grant)
        except NotPermitted as exc:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        except crypto.SignatureError as exc:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        except InvalidPiece as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        created = sum(c for _, c in results)
        log.info("submit from %s: %d pieces, %d new", context.peer(), n, created)
        return pfl_pb2.SubmitPiecesReply(
            results=[pfl_pb2.SubmitResult(piece_id=pid, created=c) for pid, c in results])

    @guard
    def ListGates(self, request, context):
        """Stream the gates of gated pieces matching the layer/module/sharer filters."""
        filters = {"layers": list(dict.fromkeys(request.layers)),
                   "modules": list(dict.fromkeys(request.modules)),
                   "sharers": list(dict.fromkeys(request.sharers))}
        for name, values in filters.items():
            if len(values) > MAX_FILTER[name]:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"filter: at most {MAX_FILTER[name]} {name}, got {len(values)}")
        try:
            for module in request.modules:
                check_names("filter", 0, module)
            for sharer in request.sharers:
                check_names(sharer, 0, "filter")
        except InvalidPiece as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"filter: {exc}")
        if request.run and not RUN_NAME.fullmatch(request.run):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "filter: malformed run name")
        try:
            gates = self.store.list_gates(filters["layers"], filters["modules"],
                                          filters["sharers"], run=request.run)
        except PoolCorruption as exc:
            context.abort(grpc.StatusCode.DATA_LOSS, str(exc))
        for gate in gates:
            yield gate.to_proto()

    @guard
    def FetchPieces(self, request, context):
        """Stream the requested pieces in order (NOT_FOUND before any if one is unknown)."""
        ids = list(request.piece_ids)
        if not 1 <= len(ids) <= self.max_fetch:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"fetch 1..{self.max_fetch} pieces at a time, got {len(ids)}")
        if len(set(ids)) != len(ids):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "fetch: a piece id is repeated")
        bad = [pid for pid in ids if not is_piece_id(pid)]
        if bad:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"malformed piece id {bad[0][:70]!r} (64 lowercase hex digits)")
        missing = self.store.missing(ids)
        if missing:
            context.abort(grpc.StatusCode.NOT_FOUND, str(PieceNotFound(missing)))
        size = self.store.sizes(ids)
        if size > MAX_FETCH_BYTES:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"fetch: {size} bytes asked, at most {MAX_FETCH_BYTES} per call")
        for pid in ids:
            try:
                signed = self.store.fetch([pid])[0]
            except PoolCorruption as exc:
                log.error("pool corruption: %s", exc)
                context.abort(grpc.StatusCode.DATA_LOSS, str(exc))
            except PieceNotFound as exc:
                context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
            yield signed.to_proto(self.store.limits)


# -------------------------------------------------------------------------- the server
class PoolServer:
    """A running TLS pool server: ``.port``, ``.store``; stop with :meth:`stop` or ``with``."""

    def __init__(self, store: PoolStore, certs_dir: str | Path, *, port: int = 0,
                 host: str = "127.0.0.1", max_workers: int = 8,
                 interceptors: Sequence[grpc.ServerInterceptor] = (), own_store: bool = False,
                 admission: Admission = Admission()):
        self.store = store
        self._own_store = own_store
        self.host = host
        self.server, self.port = tls_server(
            lambda server: pfl_pb2_grpc.add_PiecePoolServicer_to_server(
                PiecePoolServicer(store), server),
            certs_dir, host=host, port=port, max_workers=max_workers,
            max_message_bytes=MAX_MESSAGE_BYTES, interceptors=interceptors,
            admission=admission)

    @property
    def target(self) -> str:
        """``host:port`` for a client."""
        return target_of(self.host, self.port)

    def stop(self, grace: float | None = 1.0) -> None:
        """Stop serving (waits up to ``grace`` seconds for running calls)."""
        self.server.stop(grace).wait(timeout=(grace or 0) + 5)
        if self._own_store:
            self.store.close()

    def wait(self) -> None:
        """Block until the server stops."""
        self.server.wait_for_termination()

    def __enter__(self) -> "PoolServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_pool_server(db: str | Path, certs_dir: str | Path, *, port: int = 0,
                      host: str = "127.0.0.1", model: str | None = None,
                      open_enrolment: bool | None = None, max_update_norm: float | None = None,
                      max_norm_ratio: float | None = None, **kwargs) -> PoolServer:
    """Open the pool in ``db`` and serve it with TLS (the server closes the store on stop).

    ``model``: check every piece against that model's layers and module shapes.
    ``max_update_norm``: the bound on a piece's |scaling * B A| (default: Limits').
    ``max_norm_ratio``: gates of pieces above this multiple of the median norm at their layer
    and module are not listed (default 10; 0: off).
    Enrolment: ``certs_dir/federation.pub`` (from ``pfl certs``) makes the pool take pieces
    only with a grant signed by the federation key; ``open_enrolment=True`` takes any signed
    piece (development); None: grants when that file exists, else open (with a warning)."""
    pub = Path(certs_dir) / crypto.FEDERATION_PUB
    if open_enrolment is None:
        open_enrolment = not pub.is_file()
    if not open_enrolment and not pub.is_file():
        raise PflError(f"no federation key {pub}: create it with `pfl certs {certs_dir}`, or "
                       "serve with --open (open enrolment: development only)")
    federation_key = None if open_enrolment else crypto.load_federation_public_key(pub)
    if open_enrolment:
        log.warning("pool %s: OPEN ENROLMENT: anyone with a device key may submit pieces", db)
    shapes = ModelShapes.of(model) if model else None
    limits = DEFAULT_LIMITS if max_update_norm is None else \
        dataclasses.replace(DEFAULT_LIMITS, max_update_norm=float(max_update_norm))
    ratio = {} if max_norm_ratio is None else {"max_norm_ratio": float(max_norm_ratio)}
    store = PoolStore(db, shapes=shapes, federation_key=federation_key, limits=limits, **ratio)
    try:
        return PoolServer(store, certs_dir, port=port, host=host, own_store=True, **kwargs)
    except BaseException:
        store.close()
        raise


def serve(db: str | Path, port: int, certs_dir: str | Path, host: str = "127.0.0.1", *,
          model: str | None = None, open_enrolment: bool = False,
          max_update_norm: float | None = None, max_norm_ratio: float | None = None) -> int:
    """Serve the pool until SIGINT/SIGTERM; returns an exit status."""
    server = start_pool_server(db, certs_dir, port=port, host=host, model=model,
                               open_enrolment=open_enrolment, max_update_norm=max_update_norm,
                               max_norm_ratio=max_norm_ratio)
    mode = "open enrolment" if server.store.federation_key is None else "federation grants"
    shapes = f", pieces checked against {model}" if model else ""
    run_until_stopped(lambda: server.stop(grace=2.0), lambda: print(
        f"pfl pool: serving {db} ({len(server.store)} pieces) on {server.target} (TLS, "
        f"{mode}{shapes})", flush=True))
    print("pfl pool: stopped", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m cloud_server.pool_service --db DIR --port P --certs DIR [--host H]``."""
    parser = argparse.ArgumentParser(prog="python -m cloud_server.pool_service",
                                     description="Serve the piece pool over gRPC with TLS.")
    parser.add_argument("--db", required=True, help="pool directory (created if missing)")
    parser.add_argument("--port", type=int, default=50061, help="0 picks a free port")
    parser.add_argument("--certs", required=True, help="directory from `pfl certs`")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--model", default=None, help="check pieces against this model")
    parser.add_argument("--open", action="store_true", help="open enrolment (development)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        return serve(args.db, args.port, args.certs, args.host, model=args.model,
                     open_enrolment=args.open)
    except PflError as exc:
        print(f"pfl: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
