"""What every gRPC service of the cloud shares: TLS servers and handlers that never leak a
Python error (pool_service, inference_service)."""

from __future__ import annotations

import functools
import inspect
import logging
import signal
import threading
from concurrent import futures
from pathlib import Path
from typing import Callable, Sequence

import grpc

from shared import crypto
from shared.errors import PflError

log = logging.getLogger(__name__)


def _internal(method, exc: Exception, context) -> None:
    """Re-raise an abort the handler chose; anything else becomes INTERNAL (logged here)."""
    if isinstance(exc, grpc.RpcError) or context.code() is not None:
        raise exc
    log.exception("%s failed", method.__name__)
    context.abort(grpc.StatusCode.INTERNAL, "internal error")


def guard(method):
    """Turn what a handler did not expect into INTERNAL with a fixed message (logged here),
    never gRPC's UNKNOWN with a Python message."""
    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def stream(self, request, context):
            try:
                yield from method(self, request, context)
            except Exception as exc:
                _internal(method, exc, context)
        return stream

    @functools.wraps(method)
    def unary(self, request, context):
        try:
            return method(self, request, context)
        except Exception as exc:
            _internal(method, exc, context)
    return unary


def tls_server(add_servicer: Callable[[grpc.Server], None], certs_dir: str | Path, *,
               host: str, port: int, max_workers: int, max_message_bytes: int,
               interceptors: Sequence[grpc.ServerInterceptor] = ()) -> tuple[grpc.Server, int]:
    """A started gRPC server with TLS (the `pfl certs` server certificate) on ``host:port``
    (0: a free port); returns it and its port. Raises PflError if it cannot listen."""
    chain, key = crypto.load_server_credentials(certs_dir)
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes),
               ("grpc.so_reuseport", 0)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                         interceptors=list(interceptors), options=options)
    add_servicer(server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_secure_port(address, grpc.ssl_server_credentials([(key, chain)]))
    except RuntimeError as exc:
        bound, reason = 0, f": {exc}"
    else:
        reason = ""
    if not bound:
        raise PflError(f"cannot listen on {address} (in use or not a local address){reason}")
    server.start()
    return server, bound


def target_of(host: str, port: int) -> str:
    """``host:port`` for a client (IPv6 hosts in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def run_until_stopped(stop: Callable[[], None], announce: Callable[[], None]) -> None:
    """Block until SIGTERM or Ctrl-C, then ``stop()``. ``announce()`` runs once the SIGTERM
    handler is in place (a process that says it is serving can be stopped cleanly at once)."""
    stopping = threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: stopping.set())
    announce()
    try:
        while not stopping.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        stop()
