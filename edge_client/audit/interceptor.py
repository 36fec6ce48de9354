"""The audit ledger's gRPC client interceptor: every request a device sends to the piece pool
is recorded before it leaves."""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any, Callable, Mapping

import grpc

from edge_client.audit.ledger import AuditLedger

log = logging.getLogger(__name__)
#: A refusal entry's ``meta``: ``outcome`` and the seq of the request it answers.
OUTCOME_REFUSED, OUTCOME_OF = "refused", "outcome_of"


# -------------------------------------------------------------------- gRPC interceptor
def _serialized(request: Any) -> bytes:
    if isinstance(request, (bytes, bytearray, memoryview)):
        return bytes(request)
    if hasattr(request, "SerializeToString"):
        return request.SerializeToString()
    raise TypeError(f"cannot serialize a {type(request).__name__} request for the audit")


class AuditClientInterceptor(grpc.UnaryUnaryClientInterceptor,
                             grpc.UnaryStreamClientInterceptor):
    """A gRPC client interceptor recording each outbound request before it is sent.

    Every entry has the request's serialized size (``payload_bytes``) and sha256 (in
    ``meta``), and the method as ``message_type``. ``describe_request_fn(method, request)``
    may return a dict with ``arrays`` (a mapping for :func:`describe_arrays`),
    ``consent_rule``, ``extra`` (fields to summarize) and ``meta`` (identifiers kept verbatim,
    e.g. the sha256 of a prompt); it may also raise (e.g. a consent
    denial), and then nothing is recorded and nothing is sent. Use:
    ``grpc.intercept_channel(channel, AuditClientInterceptor(ledger, "pool-grpc", target))``.
    """

    def __init__(self, ledger: AuditLedger | str | os.PathLike, channel_name: str,
                 destination: str,
                 describe_request_fn: Callable[[str, Any], Mapping | None] | None = None, *,
                 meta: Mapping[str, str | int | float | bool] | None = None):
        self.ledger = ledger if isinstance(ledger, AuditLedger) else AuditLedger(ledger)
        self.channel_name = channel_name
        self.destination = destination
        self.describe_request_fn = describe_request_fn
        self.meta = dict(meta or {})  # kept on every entry, e.g. the Flower run id

    def record(self, method: str | bytes, request: Any) -> dict:
        """Append the ledger entry for one request; return it."""
        method = method.decode() if isinstance(method, bytes) else str(method)
        data = _serialized(request)
        described = dict(self.describe_request_fn(method, request) or {}) \
            if self.describe_request_fn else {}
        return self.ledger.append(
            self.channel_name, self.destination, method, described.get("arrays"),
            described.get("consent_rule"), described.get("extra"), payload_bytes=len(data),
            meta={**self.meta, "request_bytes": len(data),
                  "request_sha256": hashlib.sha256(data).hexdigest(),
                  **dict(described.get("meta") or {})})

    def record_refusal(self, entry: Mapping[str, Any], code: grpc.StatusCode) -> dict:
        """Append that the request recorded as ``entry`` was refused (its bytes did leave;
        the receiver did not take it): a zero-byte entry pointing at it."""
        return self.ledger.append(
            self.channel_name, self.destination, str(entry["message_type"]), None, None,
            None, payload_bytes=0, meta={**self.meta, "outcome": OUTCOME_REFUSED,
                                         OUTCOME_OF: int(entry["seq"]), "status": code.name})

    def intercept_unary_unary(self, continuation, client_call_details, request):
        """Record, send, and record a refusal (an error status) when one comes back."""
        entry = self.record(client_call_details.method, request)
        outcome = continuation(client_call_details, request)
        try:
            code = outcome.code()
        except Exception:  # not a finished call: nothing to add
            code = None
        if code is not None and code != grpc.StatusCode.OK:
            try:
                self.record_refusal(entry, code)
            except Exception:  # the request is recorded; the note of its refusal is extra
                log.exception("could not record the refusal of %s", entry.get("message_type"))
        return outcome

    def intercept_unary_stream(self, continuation, client_call_details, request):
        """Record, then send (server-streaming calls have one outbound request)."""
        self.record(client_call_details.method, request)
        return continuation(client_call_details, request)


