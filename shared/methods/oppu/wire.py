"""OPPU's wire format: a personal LoRA uploaded to the inference service once
(``UploadAdapterRequest`` in proto/pfl.proto) and named afterwards by its id."""

from __future__ import annotations

import hashlib

from shared.methods.perpcs.pieces import Piece
from shared.serialization import (DEFAULT_LIMITS, InvalidPiece, Limits, RemoteKind,
                                  check_names, piece_for_wire, register_remote_kind,
                                  tensor_from_proto, tensor_to_proto, validate_piece,
                                  wire_arrays)
from shared.wire import pfl_pb2


def adapter_to_proto(pieces) -> pfl_pb2.UploadAdapterRequest:
    """A personal LoRA (ungated pieces, one per module) as an upload for the inference
    service."""
    msg = pfl_pb2.UploadAdapterRequest()
    for piece in pieces:
        piece = piece_for_wire(piece)
        msg.factors.add(layer=piece.layer, module=piece.module, scaling=piece.scaling,
                        a=tensor_to_proto(piece.A, "A"), b=tensor_to_proto(piece.B, "B"))
    return msg


def adapter_id(pieces) -> str:
    """The id of a personal LoRA: sha256 over its pieces' content ids, sorted."""
    return hashlib.sha256("".join(sorted(p.piece_id for p in pieces)).encode()).hexdigest()


def adapter_from_proto(msg: pfl_pb2.UploadAdapterRequest, limits: Limits = DEFAULT_LIMITS,
                       *, max_factors: int = 4096) -> list[Piece]:
    """Decode and validate an uploaded personal LoRA: each factor pair as a piece must pass
    :func:`validate_piece` (shapes, finiteness, norms, update bound), and a module appears
    once. Shapes against the served model are the service's check."""
    if not 1 <= len(msg.factors) <= max_factors:
        raise InvalidPiece(f"an adapter has 1..{max_factors} modules, got {len(msg.factors)}")
    pieces, seen = [], set()
    for i, factor in enumerate(msg.factors):
        check_names("upload", factor.layer, factor.module, limits)
        key = (factor.layer, factor.module)
        if key in seen:
            raise InvalidPiece(f"adapter: layer {factor.layer} {factor.module} appears twice")
        seen.add(key)
        A = tensor_from_proto(factor.a, f"factor {i} A", limits)
        B = tensor_from_proto(factor.b, f"factor {i} B", limits)
        if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]:
            raise InvalidPiece(f"factor {i} {key}: A {tuple(A.shape)} and B {tuple(B.shape)} "
                               "are not (r, d_in) and (d_out, r)")
        pieces.append(validate_piece(Piece("upload", factor.layer, factor.module, A, B,
                                           float(factor.scaling)), limits))
    return pieces


#: the consent kind an adapter upload needs (the user's personal LoRA leaves the device)
UPLOAD_CONSENT = "oppu_personal_lora"


def describe_upload(msg: pfl_pb2.UploadAdapterRequest) -> tuple[dict, dict]:
    """(arrays sent, extra fields) of an adapter upload, for the device's audit entry."""
    return (wire_arrays({f"{f.layer}.{f.module}/{x}": getattr(f, x.lower())
                         for f in msg.factors for x in ("A", "B")}),
            {"modules": len(msg.factors)})


register_remote_kind(RemoteKind(
    "oppu_adapter", None,  # an id of what this device uploaded (the upload was consented)
    lambda ident: ({}, {"adapter_id": len(ident)}, {"adapter_id": ident})))
