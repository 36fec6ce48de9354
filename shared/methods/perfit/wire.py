"""PerFit's wire format: a user's stage-2 parameters inline in an inference request
(``PerFitParams`` in proto/pfl.proto), validated when decoded."""

from __future__ import annotations

import torch

from shared.methods.perfit.model import PerFitStage
from shared.serialization import (DEFAULT_LIMITS, InvalidPiece, Limits, RemoteKind,
                                  check_values, register_remote_kind, tensor_from_proto,
                                  tensor_to_proto, wire_arrays)
from shared.wire import pfl_pb2


def perfit_stage_to_proto(stage) -> pfl_pb2.PerFitParams:
    """A PerFit stage (a user's personal stage 2) as inline request parameters."""
    msg = pfl_pb2.PerFitParams()
    for layer in stage.layers:
        arrays = stage[layer].export_arrays()
        msg.layers.add(layer=layer, **{name.lower(): tensor_to_proto(
            torch.from_numpy(arrays[name]), name) for name in "RWb"})
    return msg


def perfit_stage_from_proto(msg: pfl_pb2.PerFitParams, limits: Limits = DEFAULT_LIMITS, *,
                            max_layers: int = 256):
    """Decode and validate inline PerFit parameters into a PerFitStage: per layer R and W
    (r, d), b (r,), one rank and width for all, finite and within the norm bound; an R that
    is not orthonormal is re-orthonormalized (as after FedAvg)."""
    if not 1 <= len(msg.layers) <= max_layers:
        raise InvalidPiece(f"PerFit parameters need 1..{max_layers} layers, got "
                           f"{len(msg.layers)}")
    arrays, seen = {}, set()
    for entry in msg.layers:
        if entry.layer > limits.max_layer or entry.layer in seen:
            raise InvalidPiece(f"PerFit: layer {entry.layer} is out of range or repeated")
        seen.add(entry.layer)
        for name, tensor_msg in (("R", entry.r), ("W", entry.w), ("b", entry.b)):
            tensor = tensor_from_proto(tensor_msg, f"PerFit layer {entry.layer} {name}", limits)
            check_values(tensor, f"PerFit layer {entry.layer} {name}", limits)
            arrays[f"layers.{entry.layer}.{name}"] = tensor.float().numpy()
    shapes = {(a.shape[0], a.shape[-1] if a.ndim == 2 else None) for k, a in arrays.items()
              if not k.endswith(".b")}
    if len(shapes) != 1:
        raise InvalidPiece(f"PerFit: R and W must all have one shape (rank, width), got "
                           f"{sorted(shapes)}")
    try:
        return PerFitStage.from_arrays(arrays)
    except (ValueError, RuntimeError) as exc:
        raise InvalidPiece(f"PerFit parameters: {exc}") from None


register_remote_kind(RemoteKind(
    "perfit", "perfit_stage2",  # the user's own parameters leave the device
    lambda msg: (wire_arrays({f"{entry.layer}/{x}": getattr(entry, x.lower())
                              for entry in msg.layers for x in ("R", "W", "b")}), {}, {})))
