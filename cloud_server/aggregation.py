"""Server-side aggregation of collective parameters: validated, weighted FedAvg (no Flower).

Everything here works on plain ``{name: numpy array}`` dicts, so it is tested without a
federation. The ServerApp (:mod:`cloud_server.server_app`) only converts Flower records to and
from these dicts.

- :func:`check_reply`: why one client's arrays must not be averaged (None when they are fine):
  names, shapes and dtypes must match the global arrays the round started from, values must be
  finite and within a norm bound, and the example count (the FedAvg weight) must be positive.
- :func:`fedavg`: drops the bad replies (logging each, never raising) and averages the rest,
  weighted by their number of training examples. A client chooses its own count, so no
  count is taken as it is: each is capped (``max_examples``, from what the server asked a
  client to train on), an update (reply minus the global arrays) larger than
  ``max_update_ratio`` times the global arrays' norm is dropped, and with three or more
  replies each update is clipped to ``clip_factor`` times the round's median update norm.
  One client can then move the average by at most its capped share of a bounded update.

What makes an average valid again for one kind of collective parameters (PerFit's R
matrices) is that kind's :meth:`~shared.methods.base.Collective.after_aggregation`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np


log = logging.getLogger(__name__)

#: dtypes a reply may use on the wire (never bf16, which Flower cannot carry).
WIRE_DTYPES = ("float32", "float16")
#: Default bound on the L2 norm of any single reply array (LoRA factors and LoReFT R/W/b are
#: O(1)-O(10); a reply far beyond this is broken or hostile and would swamp the average).
MAX_NORM = 1e4
#: Default bound on a client's update (reply - global), relative to the global arrays' norm
#: (at least 1): honest local training moves the collective parameters by a few percent.
MAX_UPDATE_RATIO = 1.0
#: With 3+ replies, each update is clipped to this many times the round's median update norm.
CLIP_FACTOR = 3.0

Arrays = dict[str, np.ndarray]


@dataclass
class Reply:
    """One client's contribution to a round: its arrays, FedAvg weight and metrics."""

    arrays: Mapping[str, Any]
    num_examples: float
    node: str | int = "?"
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass
class Aggregate:
    """The result of one aggregation: the averaged arrays (None when no reply was usable),
    the replies used, and ``(node, reason)`` for every reply dropped."""

    arrays: Arrays | None
    accepted: list[Reply]
    dropped: list[tuple[str | int, str]]

    @property
    def total_examples(self) -> float:
        return float(sum(r.num_examples for r in self.accepted))


def check_reply(arrays: Mapping[str, Any], num_examples: Any,
                reference: Mapping[str, Any] | None, *,
                max_norm: float | None = MAX_NORM) -> str | None:
    """The reason ``arrays`` cannot be averaged, or None when they can.

    ``reference`` (the global arrays the round started from) fixes the names and shapes; None
    skips that comparison. Each array must have a wire dtype (:data:`WIRE_DTYPES`), finite
    values and an L2 norm <= ``max_norm``; ``num_examples`` must be a finite number > 0.
    """
    try:
        weight = float(num_examples)
    except (TypeError, ValueError):
        return f"num-examples {num_examples!r} is not a number"
    if not math.isfinite(weight) or weight <= 0:
        return f"num-examples {num_examples!r} must be a finite number > 0"
    if not arrays:
        return "no arrays"
    if reference is not None:
        missing = sorted(set(reference) - set(arrays))
        extra = sorted(set(arrays) - set(reference))
        if missing or extra:
            return (f"array names differ from the global ones (missing {missing[:3]}, "
                    f"unexpected {extra[:3]})")
    for name, value in arrays.items():
        array = np.asarray(value)
        if array.dtype.name not in WIRE_DTYPES:
            return f"{name}: dtype {array.dtype.name} (allowed: {', '.join(WIRE_DTYPES)})"
        if reference is not None:
            expected = tuple(np.shape(reference[name]))
            if array.shape != expected:
                return f"{name}: shape {array.shape}, expected {expected}"
        if not np.isfinite(array).all():
            return f"{name}: non-finite values"
        if max_norm is not None:
            norm = float(np.linalg.norm(array.astype(np.float64).ravel()))
            if norm > max_norm:
                return f"{name}: norm {norm:.3g} exceeds the bound {max_norm:.3g}"
    return None


def weighted_average(arrays_list: Sequence[Mapping[str, Any]],
                     weights: Sequence[float]) -> Arrays:
    """sum_i w_i x_i / sum_i w_i for every name (float64 accumulation, float32 result).

    All dicts must have the same names and shapes (see :func:`check_reply`).
    """
    if not arrays_list or len(arrays_list) != len(weights):
        raise ValueError("weighted_average needs as many weights as array dicts (at least 1)")
    total = float(sum(weights))
    if not total > 0:
        raise ValueError(f"weights must sum to a positive number, got {total}")
    out: Arrays = {}
    for name in arrays_list[0]:
        acc = np.zeros(np.shape(arrays_list[0][name]), dtype=np.float64)
        for arrays, weight in zip(arrays_list, weights):
            acc += np.asarray(arrays[name], dtype=np.float64) * (float(weight) / total)
        out[name] = acc.astype(np.float32)
    return out


def global_norm(arrays: Mapping[str, Any]) -> float:
    """The L2 norm of all ``arrays`` together."""
    return math.sqrt(math.fsum(float(np.square(np.asarray(v, np.float64)).sum())
                               for v in arrays.values()))


def fedavg(replies: Sequence[Reply], reference: Mapping[str, Any] | None = None, *,
           max_norm: float | None = MAX_NORM, max_examples: float | None = None,
           max_update_ratio: float | None = MAX_UPDATE_RATIO,
           clip_factor: float | None = CLIP_FACTOR) -> Aggregate:
    """Weighted FedAvg (weights = number of examples) of the replies that pass
    :func:`check_reply`; every dropped reply is logged with its reason, none is fatal.

    Defences against a client that lies (see the module docstring): weights above
    ``max_examples`` are capped to it; with ``reference`` (the global arrays), an update whose
    norm exceeds ``max_update_ratio * max(1, |reference|)`` is dropped, and with 3+ replies
    every update is scaled down to at most ``clip_factor`` times the median update norm.
    With ``reference`` None, the first reply fixes the names and shapes the others must match
    (and updates are not bounded).
    """
    accepted: list[Reply] = []
    dropped: list[tuple[str | int, str]] = []
    bound = None
    if reference is not None and max_update_ratio is not None:
        bound = max_update_ratio * max(1.0, global_norm(reference))
    for reply in replies:
        ref = reference if reference is not None else (accepted[0].arrays if accepted else None)
        reason = check_reply(reply.arrays, reply.num_examples, ref, max_norm=max_norm)
        if reason is None and bound is not None:
            norm = delta_norm(reference, reply.arrays)
            if norm > bound:
                reason = f"update norm {norm:.4g} exceeds the bound {bound:.4g}"
        if reason is not None:
            log.warning("dropping the reply of node %s: %s", reply.node, reason)
            dropped.append((reply.node, reason))
            continue
        if max_examples is not None and float(reply.num_examples) > max_examples:
            log.warning("node %s claims %s examples: counted as %g (the cap)", reply.node,
                        reply.num_examples, max_examples)
            reply = Reply(reply.arrays, float(max_examples), reply.node, reply.metrics)
        accepted.append(reply)
    if not accepted:
        return Aggregate(None, accepted, dropped)
    if reference is not None and clip_factor is not None and len(accepted) >= 3:
        accepted = _clip_updates(accepted, reference, clip_factor)
    weights = [float(r.num_examples) for r in accepted]
    if not math.isfinite(math.fsum(weights)):  # cannot happen with a cap; never average it
        log.warning("the example counts of this round sum to a non-finite total: no update")
        return Aggregate(None, [], dropped + [(r.node, "non-finite total weight")
                                              for r in accepted])
    averaged = weighted_average([r.arrays for r in accepted], weights)
    return Aggregate(averaged, accepted, dropped)


def _clip_updates(replies: Sequence[Reply], reference: Mapping[str, Any],
                  factor: float) -> list[Reply]:
    """Each reply's update scaled to norm <= ``factor`` x the median update norm."""
    norms = [delta_norm(reference, r.arrays) for r in replies]
    limit = factor * float(np.median(norms))
    out = []
    for reply, norm in zip(replies, norms):
        if norm > limit > 0:
            scale = limit / norm
            log.warning("node %s: update norm %.4g clipped to %.4g (%g x the median)",
                        reply.node, norm, limit, factor)
            arrays = {k: (np.asarray(reference[k], np.float64) + scale * (
                np.asarray(v, np.float64) - np.asarray(reference[k], np.float64))
            ).astype(np.float32) for k, v in reply.arrays.items()}
            reply = Reply(arrays, reply.num_examples, reply.node, reply.metrics)
        out.append(reply)
    return out


def average_metrics(replies: Sequence[Reply]) -> dict[str, float]:
    """Example-weighted mean of every finite numeric metric the replies share (a reply's
    NaN, inf or non-number is left out of that metric's mean, with a warning)."""
    if not replies:
        return {}
    names = set.intersection(*(set(r.metrics) for r in replies))
    out = {}
    for name in sorted(names):
        pairs = []
        for reply in replies:
            value = reply.metrics[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(float(value)):
                log.warning("node %s: metric %s = %r left out", reply.node, name, value)
                continue
            pairs.append((float(value), float(reply.num_examples)))
        total = math.fsum(w for _, w in pairs)
        if pairs and total > 0:
            out[name] = math.fsum(v * w for v, w in pairs) / total
    return out


def delta_norm(before: Mapping[str, Any], after: Mapping[str, Any]) -> float:
    """Global L2 norm of ``after - before`` over their common names."""
    total = 0.0
    for name in set(before) & set(after):
        diff = np.asarray(after[name], np.float64) - np.asarray(before[name], np.float64)
        total += float((diff * diff).sum())
    return math.sqrt(total)
