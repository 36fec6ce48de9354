"""A device's client of the cloud's inference service (gRPC over TLS).

    with InferenceClient("127.0.0.1:50071", "certs/") as cloud:
        text = cloud.generate(prompt)                              # the stage-1 model
        text = cloud.generate(prompt, recipe=recipe)               # PER-PCS
        text = cloud.generate(prompt, perfit=personal_stage)       # PerFit
        text = cloud.generate(prompt, adapter=cloud.upload(pieces))  # OPPU, uploaded once

What a request sends is the prompt text and the user's personal parameters: whether a device
may do that is its consent rule ``inference.remote`` (off by default), checked by the caller
(:func:`edge_client.phases.remote_answers`), and every request passes the device's audit
ledger when ``interceptors`` hold it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import grpc

from shared import crypto
from shared.errors import PflError
from shared.serialization import (adapter_to_proto, perfit_stage_to_proto, recipe_to_proto)
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
                 interceptors: Sequence = (), timeout: float = 120.0,
                 server_name: str | None = None):
        if not isinstance(root_certificates, bytes):
            root_certificates = crypto.load_root_certificate(root_certificates)
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
        self._channel = grpc.secure_channel(target, credentials, options=options)
        channel = grpc.intercept_channel(self._channel, *interceptors) if interceptors \
            else self._channel
        self._stub = pfl_pb2_grpc.InferenceStub(channel)
        self.target, self.timeout = target, timeout
        self.last_reply: pfl_pb2.GenerateReply | None = None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "InferenceClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def upload(self, pieces) -> str:
        """Upload a personal LoRA (ungated pieces: :func:`shared.serving.rows.lora_state_pieces`);
        returns its adapter id."""
        try:
            reply = self._stub.UploadAdapter(adapter_to_proto(pieces), timeout=self.timeout)
        except grpc.RpcError as exc:
            raise InferenceError(exc.code(), exc.details()) from None
        return reply.adapter_id

    def request(self, prompt: str, *, recipe=None, perfit=None, adapter: str | None = None,
                max_new_tokens: int = 0, min_new_tokens: int = 0) -> pfl_pb2.GenerateRequest:
        """The request :meth:`generate` sends (at most one personalization)."""
        if sum(x is not None for x in (recipe, perfit, adapter)) > 1:
            raise PflError("a request carries one personalization: recipe, perfit or adapter")
        request = pfl_pb2.GenerateRequest(prompt=prompt, max_new_tokens=int(max_new_tokens),
                                          min_new_tokens=int(min_new_tokens))
        if recipe is not None:
            request.perpcs.CopyFrom(recipe_to_proto(recipe))
        elif perfit is not None:
            request.perfit.CopyFrom(perfit_stage_to_proto(perfit))
        elif adapter is not None:
            request.oppu_adapter = adapter
        return request

    def generate(self, prompt: str, **kwargs) -> str:
        """The service's greedy answer to ``prompt`` with the given personalization (none:
        the stage-1 model). The reply's timings are kept in :attr:`last_reply`."""
        try:
            reply = self._stub.Generate(self.request(prompt, **kwargs), timeout=self.timeout)
        except grpc.RpcError as exc:
            raise InferenceError(exc.code(), exc.details()) from None
        self.last_reply = reply
        return reply.text
