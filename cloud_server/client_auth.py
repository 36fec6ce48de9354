"""Who is asking: the inference service's check of a signed call (:func:`shared.crypto.sign_request`).

A device signs every call with its Ed25519 device key: the gRPC method, the time, a random
nonce and the sha256 of the request's deterministic serialization travel in the call's
metadata. The service answers a call only when

- the signature verifies for that method and body (UNAUTHENTICATED otherwise: a missing or
  malformed field, a signature that does not verify);
- the time is within ``max_skew`` seconds of the service's clock and the nonce was not seen
  in that window (UNAUTHENTICATED: a stale or replayed call);
- with an allow-list (``pfl serve --clients FILE``), the key is on it (PERMISSION_DENIED).

The caller's identity is its key: what it uploads is its own (an adapter is usable only by
the key that uploaded it), and its cache quota is counted against it. Without an allow-list
any key may call (a fresh key is a fresh identity with nothing of anyone else's).
"""

from __future__ import annotations

import collections
import threading
import time

import grpc

from cloud_server.rpc import RequestError
from shared import crypto


_SIGNED_CALL = (crypto.REQUEST_KEY, crypto.REQUEST_TIME, crypto.REQUEST_NONCE, crypto.REQUEST_SIG)


def _unauthenticated(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.UNAUTHENTICATED, message)


class RequestAuth:
    """Checks signed calls: signature, freshness, replays and (optionally) an allow-list.

    ``allowed``: raw public keys that may call (None: any key); ``max_skew``: seconds a
    call's time may differ from this clock; ``max_nonces``: nonces remembered at most (the
    oldest are forgotten first; a forgotten nonce is older than the window or the service is
    under a flood of valid calls, which the admission limits bound)."""

    def __init__(self, allowed: frozenset[bytes] | None = None, *, max_skew: float = 120.0,
                 max_nonces: int = 200_000, clock=time.time):
        self.allowed = None if allowed is None else frozenset(allowed)
        self.max_skew, self.max_nonces, self.clock = float(max_skew), int(max_nonces), clock
        self._seen: collections.OrderedDict[bytes, float] = collections.OrderedDict()
        self._lock = threading.Lock()

    def check(self, context, method: str, request) -> bytes:
        """The caller's raw public key (its identity) for ``method`` (its short name, e.g.
        ``"Generate"``) with ``request``, from the call's metadata; :class:`~cloud_server.rpc.RequestError` when it is not
        answered."""
        meta: dict[str, bytes | str] = {}
        for item in context.invocation_metadata() or ():
            if item.key not in _SIGNED_CALL:
                continue
            if item.key in meta:
                raise _unauthenticated(f"{item.key} given twice")
            meta[item.key] = item.value
        key, stamp = meta.get(crypto.REQUEST_KEY), meta.get(crypto.REQUEST_TIME)
        nonce, signature = meta.get(crypto.REQUEST_NONCE), meta.get(crypto.REQUEST_SIG)
        if not (isinstance(key, bytes) and isinstance(nonce, bytes) and
                isinstance(signature, bytes) and isinstance(stamp, str)):
            raise _unauthenticated("the call is not signed with a device key (metadata "
                                   f"{crypto.REQUEST_KEY}, {crypto.REQUEST_TIME}, "
                                   f"{crypto.REQUEST_NONCE}, {crypto.REQUEST_SIG})")
        if len(key) != crypto.PUBLIC_KEY_BYTES or len(nonce) != crypto.NONCE_BYTES:
            raise _unauthenticated("malformed key or nonce")
        if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= 16):
            raise _unauthenticated("malformed time")
        body = request.SerializeToString(deterministic=True)
        try:
            crypto.verify(key, crypto.request_signing_message(method, body, int(stamp), nonce),
                          signature)
        except (crypto.SignatureError, ValueError):
            raise _unauthenticated("the signature does not verify") from None
        now = self.clock()
        if abs(now - int(stamp) / 1000) > self.max_skew:
            raise _unauthenticated(f"the call's time is more than {self.max_skew:g} s from "
                                   "the service's clock")
        if self.allowed is not None and key not in self.allowed:
            raise RequestError(grpc.StatusCode.PERMISSION_DENIED,
                            f"key {crypto.key_fingerprint(key)} is not a client of this "
                            "service")
        with self._lock:
            while self._seen and (next(iter(self._seen.values())) < now - 2 * self.max_skew
                                  or len(self._seen) >= self.max_nonces):
                self._seen.popitem(last=False)
            tag = key + nonce
            if tag in self._seen:
                raise _unauthenticated("a replayed call (its nonce was seen)")
            self._seen[tag] = now
        return bytes(key)
