"""The piece pool's gRPC service (TLS): SubmitPieces, ListGates, FetchPieces.

Every submitted piece is decoded and validated (shapes, dtype, finiteness, size and norm
bounds, content id) and its Ed25519 signature verified before anything is stored; a batch is
all-or-nothing. Errors carry a gRPC status whose details name the piece and the problem:

    INVALID_ARGUMENT   malformed or out-of-bounds payload (e.g. "piece 0 (3, 'q_proj'): A has
                       non-finite values (NaN or inf)")
    UNAUTHENTICATED    missing or bad signature, or a pseudonym bound to another key
    NOT_FOUND          fetch of unknown piece ids
    DATA_LOSS          a stored blob changed on disk

Run it with ``python -m cloud_server.pool_service --db DIR --port P --certs DIR`` (or
``pfl pool serve``); it prints ``pfl pool: serving ... on HOST:PORT`` once listening.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from concurrent import futures
from pathlib import Path
from typing import Sequence

import grpc

from cloud_server.pool_store import PieceNotFound, PoolCorruption, PoolStore
from shared import crypto
from shared.errors import PflError
from shared.serialization import InvalidPiece, SignedPiece, check_names, is_piece_id
from shared.wire import pfl_pb2, pfl_pb2_grpc

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 128 << 20
MAX_BATCH = 4096
MAX_FETCH = 1024


class PiecePoolServicer(pfl_pb2_grpc.PiecePoolServicer):
    """Serves a :class:`PoolStore` over gRPC."""

    def __init__(self, store: PoolStore, *, max_batch: int = MAX_BATCH,
                 max_fetch: int = MAX_FETCH):
        self.store = store
        self.max_batch = max_batch
        self.max_fetch = max_fetch

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
        try:
            results = self.store.submit(batch)
        except crypto.SignatureError as exc:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        except InvalidPiece as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        created = sum(c for _, c in results)
        log.info("submit from %s: %d pieces, %d new", context.peer(), n, created)
        return pfl_pb2.SubmitPiecesReply(
            results=[pfl_pb2.SubmitResult(piece_id=pid, created=c) for pid, c in results])

    def ListGates(self, request, context):
        """Stream the gates of gated pieces matching the layer/module/sharer filters."""
        try:
            for module in request.modules:
                check_names("filter", 0, module)
            for sharer in request.sharers:
                check_names(sharer, 0, "filter")
        except InvalidPiece as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"filter: {exc}")
        try:
            gates = self.store.list_gates(request.layers, request.modules, request.sharers)
        except PoolCorruption as exc:
            context.abort(grpc.StatusCode.DATA_LOSS, str(exc))
        for gate in gates:
            yield gate.to_proto()

    def FetchPieces(self, request, context):
        """Stream the requested pieces in order (NOT_FOUND before any if one is unknown)."""
        ids = list(request.piece_ids)
        if not 1 <= len(ids) <= self.max_fetch:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"fetch 1..{self.max_fetch} pieces at a time, got {len(ids)}")
        bad = [pid for pid in ids if not is_piece_id(pid)]
        if bad:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"malformed piece id {bad[0][:70]!r} (64 lowercase hex digits)")
        missing = self.store.missing(ids)
        if missing:
            context.abort(grpc.StatusCode.NOT_FOUND, str(PieceNotFound(missing)))
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
                 interceptors: Sequence[grpc.ServerInterceptor] = (), own_store: bool = False):
        self.store = store
        self._own_store = own_store
        chain, key = crypto.load_server_credentials(certs_dir)
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.so_reuseport", 0)]
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                                  interceptors=list(interceptors), options=options)
        pfl_pb2_grpc.add_PiecePoolServicer_to_server(PiecePoolServicer(store), self.server)
        self.host = host
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            self.port = self.server.add_secure_port(
                address, grpc.ssl_server_credentials([(key, chain)]))
        except RuntimeError as exc:
            self.port = 0
            reason = f": {exc}"
        else:
            reason = ""
        if not self.port:
            raise PflError(f"cannot listen on {address} (in use or not a local address){reason}")
        self.server.start()

    @property
    def target(self) -> str:
        """``host:port`` for a client."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

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
                      host: str = "127.0.0.1", **kwargs) -> PoolServer:
    """Open the pool in ``db`` and serve it with TLS (the server closes the store on stop)."""
    store = PoolStore(db)
    try:
        return PoolServer(store, certs_dir, port=port, host=host, own_store=True, **kwargs)
    except BaseException:
        store.close()
        raise


def serve(db: str | Path, port: int, certs_dir: str | Path, host: str = "127.0.0.1") -> int:
    """Serve the pool until SIGINT/SIGTERM; returns an exit status."""
    server = start_pool_server(db, certs_dir, port=port, host=host)
    stopping = threading.Event()

    def _stop(signum, frame):
        stopping.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop)
    print(f"pfl pool: serving {db} ({len(server.store)} pieces) on {server.target} (TLS)",
          flush=True)
    try:
        while not stopping.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.stop(grace=2.0)
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        return serve(args.db, args.port, args.certs, args.host)
    except PflError as exc:
        print(f"pfl: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
