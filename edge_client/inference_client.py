"""A device's client of the cloud's inference service (gRPC over TLS).

    with InferenceClient("127.0.0.1:50071", "certs/", key=device_key) as cloud:
        text = cloud.generate(prompt)                              # the stage-1 model
        text = cloud.generate(prompt, recipe=recipe)               # PER-PCS
        text = cloud.generate(prompt, perfit=personal_stage)       # PerFit
        text = cloud.generate(prompt, adapter=cloud.upload(pieces))  # OPPU, uploaded once

What a request sends is the prompt text and the user's personal parameters: whether a device
may do that is its consent rule ``inference.remote`` (off by default), checked by the caller
(:func:`edge_client.phases.remote_answers`), and every request passes the device's audit
ledger when ``interceptors`` hold it. Every call is signed with the device key
(:func:`shared.crypto.sign_request`): the service knows the caller by its key, and an
adapter uploaded with one key is usable only with that key (the ledger's adapter id is the
adapter's content hash, not a credential).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared import crypto
from shared.errors import PflError
from shared.methods.oppu.wire import (UPLOAD_CONSENT, adapter_id, adapter_to_proto,
                                      describe_upload)
from shared.methods.perfit.wire import perfit_stage_to_proto
from shared.methods.perpcs.wire import recipe_to_proto
from shared.serialization import remote_kind
from shared.wire import pfl_pb2, pfl_pb2_grpc

MAX_MESSAGE_BYTES = 64 << 20


class InferenceError(PflError):
    """An inference call failed; ``.code`` is the gRPC status code."""

    def __init__(self, code: grpc.StatusCode, details: str):
        self.code, self.details = code, details
        super().__init__(f"inference: {code.name}: {details}")


class InferenceClient:
    """Upload a personal adapter to, and generate answers with, an inference service."""

    def __init__(self, target: str, root_certificates: bytes | str | Path, *,
                 key: Ed25519PrivateKey | None = None, interceptors: Sequence = (),
                 timeout: float = 120.0, server_name: str | None = None):
        """``key``: the device key that signs every call (None: a new key for this client
        alone, whose uploads no later client can use)."""
        self._channel, channel = crypto.tls_channel(
            target, root_certificates, max_message_bytes=MAX_MESSAGE_BYTES,
            server_name=server_name, interceptors=interceptors)
        self._stub = pfl_pb2_grpc.InferenceStub(channel)
        self.target, self.timeout = target, timeout
        self.last_reply: pfl_pb2.GenerateReply | None = None
        self._uploaded: set[str] = set()
        self.key = key if key is not None else crypto.generate_device_key()

    def _call(self, name: str, request):
        """``name``'s stub called with ``request``, signed; :class:`InferenceError` on a
        status."""
        metadata = crypto.sign_request(self.key, name,
                                       request.SerializeToString(deterministic=True))
        try:
            return getattr(self._stub, name)(request, timeout=self.timeout, metadata=metadata)
        except grpc.RpcError as exc:
            raise InferenceError(exc.code(), exc.details()) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "InferenceClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def upload(self, pieces) -> str:
        """Upload a personal LoRA (ungated pieces: :func:`shared.serving.rows.lora_state_pieces`);
        returns its adapter id."""
        return self._call("UploadAdapter", adapter_to_proto(pieces)).adapter_id

    def request(self, prompt: str, *, recipe=None, perfit=None, adapter: str | None = None,
                base: bool = False, max_new_tokens: int = 0,
                min_new_tokens: int = 0) -> pfl_pb2.GenerateRequest:
        """The request :meth:`generate` sends (at most one personalization)."""
        if sum(x is not None for x in (recipe, perfit, adapter)) + bool(base) > 1:
            raise PflError("a request carries one personalization: base, recipe, perfit or "
                           "adapter")
        request = pfl_pb2.GenerateRequest(prompt=prompt, max_new_tokens=int(max_new_tokens),
                                          min_new_tokens=int(min_new_tokens))
        if base:
            request.base = True
        elif recipe is not None:
            request.perpcs.CopyFrom(recipe_to_proto(recipe))
        elif perfit is not None:
            request.perfit.CopyFrom(perfit_stage_to_proto(perfit))
        elif adapter is not None:
            request.oppu_adapter = adapter
        return request

    def answer(self, prompt: str, personalization: dict, **kwargs) -> str:
        """:meth:`generate` with a core's ``remote_personalization``: an ``adapter_pieces``
        entry is uploaded first (once per adapter on this client, and again when the
        service no longer holds it) and named by its id."""
        personalization = dict(personalization)
        pieces = personalization.pop("adapter_pieces", None)
        if pieces is None:
            return self.generate(prompt, **personalization, **kwargs)
        ident = adapter_id(pieces)
        if ident not in self._uploaded:
            self._uploaded.add(self.upload(pieces))
        personalization["adapter"] = ident
        try:
            return self.generate(prompt, **personalization, **kwargs)
        except InferenceError as exc:
            if exc.code != grpc.StatusCode.NOT_FOUND:
                raise
        self._uploaded.discard(ident)  # evicted (or the service restarted): once more
        self._uploaded.add(self.upload(pieces))
        return self.generate(prompt, **personalization, **kwargs)

    def generate(self, prompt: str, **kwargs) -> str:
        """The service's greedy answer to ``prompt`` with the given personalization (none:
        the stage-1 model). The reply's timings are kept in :attr:`last_reply`."""
        reply = self._call("Generate", self.request(prompt, **kwargs))
        self.last_reply = reply
        return reply.text


def inference_describer(policy, signed_by: bytes | None = None):
    """The audit ledger's ``describe_request_fn`` for the inference service, under a device's
    consent ``policy``: every request needs ``inference.remote``, and a method's
    personalization also the consent kind its folder's ``wire.py`` registered
    (:class:`shared.serialization.RemoteKind`: PerFit parameters ``upload.perfit_stage2``; an
    adapter upload ``upload.oppu_personal_lora``; a recipe or an adapter id nothing more). A
    request
    the policy does not allow raises :class:`edge_client.consent.ConsentDenied`, so it is
    neither recorded nor sent. The entry names the rule(s), describes every tensor sent, and
    keeps the prompt's sha256 and length (the ledger holds no raw text). ``signed_by``: the
    device's public key that signs each call (it travels in the call's metadata, with the
    time, a nonce and the signature), recorded in every entry's meta."""
    import hashlib

    signer = {"signed_by": signed_by.hex()} if signed_by else {}

    def describe(method: str, request) -> dict:
        name = method.rsplit("/", 1)[-1]
        rules = [policy.require("inference_remote")]
        if name == "UploadAdapter":
            rules.append(policy.require(UPLOAD_CONSENT))
            arrays, extra = describe_upload(request)
            return {"arrays": arrays, "consent_rule": "+".join(rules), "extra": extra,
                    "meta": dict(signer)}
        if name != "Generate":
            raise PflError(f"inference: no consent rule covers {name}")
        kind = request.WhichOneof("personalization") or "stage1"
        arrays, extra, meta = {}, {}, {}
        if kind not in ("stage1", "base"):  # a method's own: its wire.py says what leaves
            remote = remote_kind(kind)
            if remote.consent is not None:
                rules.append(policy.require(remote.consent))
            arrays, extra, meta = remote.describe(getattr(request, kind))
        extra = {"prompt": request.prompt, "personalization": kind,
                 "max_new_tokens": request.max_new_tokens, **extra}
        data = request.prompt.encode("utf-8")
        return {"arrays": arrays, "consent_rule": "+".join(rules), "extra": extra,
                "meta": {"prompt_sha256": hashlib.sha256(data).hexdigest(),
                         "prompt_bytes": len(data), **meta, **signer}}

    return describe
