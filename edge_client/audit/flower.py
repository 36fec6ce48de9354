"""The audit ledger's Flower ClientApp mod: every reply a device sends is recorded before it
leaves (:mod:`edge_client.audit.ledger` holds the format)."""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Callable

from edge_client.audit.ledger import AuditLedger
from shared.config import DP_ROUND_KEYS
from shared.errors import FAILED, NOT_CONFIGURED, device_error_reason

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------ Flower mod
_STATE_KEY = "pfl.audit"


def note_consent_rule(context, rule: str) -> None:
    """Tell :func:`audit_mod` which consent rule allowed the reply a handler is building
    (kept in ``context.state``, which never leaves the device)."""
    from flwr.app import ConfigRecord

    context.state[_STATE_KEY] = ConfigRecord({"consent_rule": str(rule)})


def _take_consent_rule(reply, context) -> str | None:
    """The rule noted with :func:`note_consent_rule`, consumed so it is not reused."""
    record = context.state.config_records.get(_STATE_KEY) if context.state else None
    if record is None:
        return None
    rule = record.get("consent_rule")
    del context.state[_STATE_KEY]
    return str(rule) if rule else None


def describe_record_dict(content) -> tuple[dict[str, Any], dict[str, Any]]:
    """(arrays, fields) of a Flower RecordDict: every Array as ``record/key`` (to describe),
    every MetricRecord as ``fields["metrics/<record>"]`` and every ConfigRecord as
    ``fields["config/<record>"]`` (mappings of its keys to values, summarized on append)."""
    arrays: dict[str, Any] = {}
    fields: dict[str, Any] = {}
    for name, record in content.array_records.items():
        for key, array in record.items():
            arrays[f"{name}/{key}"] = array
    for kind, records in (("metrics", content.metric_records),
                          ("config", content.config_records)):
        for name, record in records.items():
            fields[f"{kind}/{name}"] = {str(k): v for k, v in record.items()}
    return arrays, fields


def message_bytes(msg) -> int:
    """Size of a Flower message as serialized for the wire (content, metadata, error)."""
    from flwr.common.serde import message_to_proto

    return int(message_to_proto(msg).ByteSize())


def announced_privacy(msg) -> dict[str, float]:
    """The DP terms the server announced for the round this message belongs to (config keys
    ``dp-noise-multiplier``, ``dp-clipping-norm``, ``dp-delta``, ``dp-epsilon``), as the
    ledger's meta keys (``dp_noise_multiplier`` ...): numbers only, at most these four."""
    out: dict[str, float] = {}
    if not msg.has_content():
        return out
    for record in msg.content.config_records.values():
        for key in DP_ROUND_KEYS:
            value = record.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and \
                    math.isfinite(float(value)):
                out[key.replace("-", "_")] = float(value)
    return out


def _secagg_names() -> tuple[str, str, str]:
    """SecAgg+'s config record, stage key and masked-vector key (Flower's names)."""
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    return RECORD_KEY_CONFIGS, Key.STAGE, Key.MASKED_PARAMETERS


def announced_protocol(msg) -> dict[str, Any]:
    """``{"secagg": True, "secagg_stage": STAGE}`` for a SecAgg+ message, else empty."""
    if not msg.has_content():
        return {}
    record_key, stage_key, _ = _secagg_names()
    record = msg.content.config_records.get(record_key)
    stage = record.get(stage_key) if record is not None else None
    return {"secagg": True, "secagg_stage": stage} if isinstance(stage, str) else {}


def masked_vectors(fields: dict[str, Any]) -> dict[str, bytes]:
    """The masked vectors of a SecAgg+ reply (raw bytes, described like arrays), moved out
    of ``fields`` (``config/secaggplus_configs``)."""
    record_key, _, masked_key = _secagg_names()
    record = fields.get(f"config/{record_key}")
    if not isinstance(record, dict) or masked_key not in record:
        return {}
    vectors = record.pop(masked_key)
    return {f"masked/{i}": bytes(v) for i, v in enumerate(vectors or [])
            if isinstance(v, (bytes, bytearray))}


def audit_mod(ledger_path_fn: Callable[[Any, Any], str | os.PathLike | None], *,
              channel: str = "flower",
              consent_rule_fn: Callable[[Any, Any], str | None] | None = None):
    """A Flower ClientApp mod that records every reply the device sends.

    ``ledger_path_fn(context, incoming message)`` gives the ledger path for this node (e.g.
    from ``context.node_config``); None skips auditing for that node. ``consent_rule_fn(reply,
    context)`` gives the consent rule; by default the one a handler noted with
    :func:`note_consent_rule`. Use: ``ClientApp(mods=[audit_mod(fn), ...])``: put it first
    (outermost), so that it records the reply after any other mod (e.g. SecAgg+ masking)
    changed it, i.e. what actually leaves the device.
    """
    rule_of = consent_rule_fn or _take_consent_rule

    def mod(msg, context, call_next):
        from flwr.app import Error, Message

        def error(code):
            return Message(Error(code=code, reason=device_error_reason(code)), reply_to=msg)

        inbound = message_bytes(msg)  # before a mod unpacks it (SecAgg+ does)
        protocol = announced_protocol(msg)
        privacy = announced_privacy(msg)
        try:
            reply = call_next(msg, context)
        except Exception:  # never let Flower send a traceback: a code, and the ledger sees it
            log.exception("the ClientApp raised on %s", msg.metadata.message_type)
            reply = error(FAILED)
        path = ledger_path_fn(context, msg)
        if path is None:  # nothing unaudited leaves: a bare code at most
            log.warning("no audit ledger configured: replying with an error code only")
            return error(NOT_CONFIGURED)
        ledger = AuditLedger(path)  # nothing kept per device: a population stays flat
        if not reply.has_content() and reply.error.reason != device_error_reason(
                reply.error.code):
            reply = error(reply.error.code)  # only the fixed text of a code leaves
        meta = reply.metadata
        if reply.has_content():
            arrays, fields = describe_record_dict(reply.content)
            if protocol:  # the masked vectors are what left in place of the arrays
                arrays.update(masked_vectors(fields))
        else:
            arrays = {}
            fields = {"error": {"code": reply.error.code, "reason": reply.error.reason or ""}}
        # payload_bytes: the whole serialized reply (arrays, metrics, metadata);
        # inbound_bytes: the message it answers (what came down), for traffic accounting.
        try:
            ledger.append(channel, f"superlink run {meta.run_id} node {meta.dst_node_id}",
                          meta.message_type, arrays, rule_of(reply, context), fields,
                          payload_bytes=message_bytes(reply),
                          meta={"run_id": meta.run_id, "node_id": context.node_id,
                                "group_id": meta.group_id,
                                "reply_to": meta.reply_to_message_id,
                                "inbound_bytes": inbound, **privacy, **protocol})
        except Exception:  # a ledger that cannot be written: send nothing it would not show
            log.exception("the audit ledger %s cannot be written", path)
            return error(FAILED)
        return reply

    return mod


