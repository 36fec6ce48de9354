"""What every gRPC service of the cloud shares: TLS servers that idle or flooding clients
cannot stall (:class:`Admission`), and handlers that never leak a Python error
(pool_service, inference_service)."""

from __future__ import annotations

import functools
import inspect
import logging
import signal
import threading
from collections import OrderedDict, deque
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import grpc

from shared import crypto
from shared.errors import PflError

log = logging.getLogger(__name__)


class RequestError(PflError):
    """A request a service refuses: ``code`` is the gRPC status it answers with."""

    def __init__(self, code: grpc.StatusCode, message: str):
        self.code = code
        super().__init__(message)


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


@dataclass(frozen=True)
class Admission:
    """How a service admits calls, so that idle or flooding clients cannot stall it.

    - ``request_timeout``: seconds a call may take to deliver its request after opening its
      stream; then it is cancelled (a stream that sends headers and nothing holds a thread
      only this long).
    - ``waiting``: calls that may wait for their request at once (threads beyond the
      workers; cheap, since they only wait); with the workers, the bound on concurrent
      calls (``maximum_concurrent_rpcs``): more get RESOURCE_EXHAUSTED at once.
    - ``streams_per_connection``: HTTP/2 ``max_concurrent_streams``, the streams one
      connection may hold open (a client past it gets UNAVAILABLE for the extra ones).
    - the workers (``max_workers`` of the server) run handlers, handed out in turn between
      connections (:class:`FairSlots`): one connection's backlog waits behind its own calls,
      not in front of another's next one; a connection with ``per_connection`` calls
      admitted (waiting or running) gets RESOURCE_EXHAUSTED for more.
    - keepalive: the server pings an idle connection every ``keepalive_seconds`` and closes
      it when the ping is not answered in ``keepalive_timeout_seconds`` (a dead peer); a
      connection with no call for ``idle_seconds`` is closed.
    """

    request_timeout: float = 10.0
    waiting: int = 256
    streams_per_connection: int = 100
    per_connection: int = 16
    keepalive_seconds: float = 60.0
    keepalive_timeout_seconds: float = 20.0
    idle_seconds: float = 300.0

    def server_options(self) -> list[tuple[str, int]]:
        return [("grpc.max_concurrent_streams", self.streams_per_connection),
                ("grpc.keepalive_time_ms", int(self.keepalive_seconds * 1000)),
                ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout_seconds * 1000)),
                ("grpc.max_connection_idle_ms", int(self.idle_seconds * 1000))]


class FairSlots:
    """``slots`` places to run a handler, handed out in turn between keys (connections):
    each key queues its own calls, and a freed place goes to the next key in line that
    waits, not to the key with most calls waiting."""

    def __init__(self, slots: int, per_key: int | None = None):
        self.free = int(slots)
        self.per_key = per_key
        self.queues: OrderedDict[str, deque] = OrderedDict()
        self.held: dict[str, int] = {}  # calls of a key waiting or running
        self.cond = threading.Condition()

    def _head(self):
        for queue in self.queues.values():
            return queue[0]
        return None

    @contextmanager
    def slot(self, key: str, is_active: Callable[[], bool] = lambda: True):
        """Hold a place while the block runs (wait for one, in turn, first); gives up,
        raising :class:`Cancelled`, when ``is_active()`` turns false while waiting;
        :class:`TooMany` at once when the key already holds ``per_key`` calls."""
        ticket = object()
        with self.cond:
            if self.per_key is not None and self.held.get(key, 0) >= self.per_key:
                raise TooMany(key)
            self.held[key] = self.held.get(key, 0) + 1
            self.queues.setdefault(key, deque()).append(ticket)
            try:
                while not (self.free > 0 and self._head() is ticket):
                    if not is_active():
                        self._release(key)
                        raise Cancelled(key)
                    self.cond.wait(timeout=0.5)
            finally:
                queue = self.queues[key]
                queue.remove(ticket)
                if queue:
                    self.queues.move_to_end(key)  # its next call waits behind the others
                else:
                    del self.queues[key]
                self.cond.notify_all()
            self.free -= 1
        try:
            yield
        finally:
            with self.cond:
                self.free += 1
                self._release(key)
                self.cond.notify_all()

    def _release(self, key: str) -> None:
        self.held[key] -= 1
        if not self.held[key]:
            del self.held[key]


class Cancelled(Exception):
    """A call that ended (cancelled, timed out) before it got a place to run."""


class TooMany(Exception):
    """A connection that already has its share of calls admitted."""


class AdmissionInterceptor(grpc.ServerInterceptor):
    """Runs every call under :class:`Admission`: unary requests are read by the handler
    thread itself (the method becomes request-streaming on the server, the same on the
    wire), with a deadline for the request to arrive, then the handler waits for a place
    in :class:`FairSlots`, in turn with the other connections."""

    def __init__(self, admission: Admission, slots: int):
        self.admission = admission
        self.slots = FairSlots(slots, admission.per_connection)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler
        if handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(
                self._streaming(handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return grpc.stream_unary_rpc_method_handler(
            self._unary(handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)

    def _request(self, requests, context):
        """The call's one request, or None when it did not come in time (the call is
        cancelled then) or the client ended the call."""
        timer = threading.Timer(self.admission.request_timeout, context.cancel)
        timer.daemon = True
        timer.start()
        try:
            return next(requests, None)
        except Exception:  # cancelled while waiting (a timeout, the client gone)
            return None
        finally:
            timer.cancel()

    @contextmanager
    def _admitted(self, requests, context):
        """The call's request, read within the deadline, while the call holds a place to
        run; an abort with the reason otherwise."""
        request = self._request(requests, context)
        if request is None or not context.is_active():
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "no request arrived in time")
        try:
            with self.slots.slot(context.peer() or "?", context.is_active):
                yield request
        except Cancelled:
            context.abort(grpc.StatusCode.CANCELLED, "the call ended while it waited")
        except TooMany:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"this connection has {self.admission.per_connection} calls in "
                          "flight (the limit); retry later")

    def _unary(self, behavior):
        def run(requests, context):
            with self._admitted(requests, context) as request:
                return behavior(request, context)
        return run

    def _streaming(self, behavior):
        def run(requests, context):
            with self._admitted(requests, context) as request:
                yield from behavior(request, context)
        return run


def tls_server(add_servicer: Callable[[grpc.Server], None], certs_dir: str | Path, *,
               host: str, port: int, max_workers: int, max_message_bytes: int,
               interceptors: Sequence[grpc.ServerInterceptor] = (),
               admission: Admission = Admission()) -> tuple[grpc.Server, int]:
    """A started gRPC server with TLS (the `pfl certs` server certificate) on ``host:port``
    (0: a free port); returns it and its port. Raises PflError if it cannot listen.
    ``max_workers`` handlers run at once, given out fairly between connections; calls are
    admitted under ``admission`` (:class:`Admission`)."""
    chain, key = crypto.load_server_credentials(certs_dir)
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes),
               ("grpc.so_reuseport", 0), *admission.server_options()]
    threads = max_workers + admission.waiting
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads),
                         interceptors=[AdmissionInterceptor(admission, max_workers),
                                       *interceptors],
                         options=options, maximum_concurrent_rpcs=threads)
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
