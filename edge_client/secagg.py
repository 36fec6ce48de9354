"""The device's half of secure aggregation (SecAgg+) for stage 1 (the server's half is
:mod:`cloud_server.secagg`): one ClientApp mod, :func:`secagg_mod`, on the ``train`` handler.

A stage-1 message that carries SecAgg+'s config record (``secaggplus_configs``) is one of
the protocol's four stages; any other ``train`` message goes to the handler untouched.

- ``setup``, ``share keys``, ``unmask``: Flower's ``secaggplus_mod`` answers with public
  keys, encrypted secret shares, and the shares that remove the masks; nothing of the user.
  The ledger records them under the rule :data:`PROTOCOL_RULE`. The device first checks what
  it can see on its own and refuses (an error code) a setup whose threshold is not a
  majority of the shares or that names fewer than three devices, and an unmask request that
  asks for both kinds of share of one device, or for its own secret key.
- ``collect masked vectors``: the legacy ``fitins`` message is unpacked into the handler's
  layout (``arrays`` by the comma-joined names of :data:`shared.config.SECAGG_NAMES_KEY`,
  ``config``),
  the handler trains as in any round, and its reply is packed as a legacy ``fitres`` whose
  weight is its example count capped at :data:`shared.config.SECAGG_WEIGHT_KEY` (1 under
  DP); under DP, Flower's ``fixedclipping_mod`` clips the update first; then
  ``secaggplus_mod`` quantizes and masks it and drops the plain arrays. The audit mod
  (outermost) records what is left: the masked vectors, marked ``secagg`` in the ledger.

A refusal or failure inside the protocol leaves as a code only (the server counts the device
as dropped out; the others' round goes on). The protocol's state (keys and shares of this
round) lives in ``context.state`` as Flower's mod keeps it: it is small, per device, and
replaced each round.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.client.mod import fixedclipping_mod, secaggplus_mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from edge_client.audit import note_consent_rule
from edge_client.consent import ConsentPolicy, device_policy
from shared.config import (DP_ROUND_KEYS, SECAGG_MIN_DEVICES, SECAGG_NAMES_KEY,
                           SECAGG_WEIGHT_KEY)
from shared.errors import BAD_REQUEST, CONSENT_DENIED, FAILED, device_error_reason
from shared.methods import collective, collective_kinds
from shared.records import to_array_record

log = logging.getLogger(__name__)

#: The consent rule a protocol message (keys, shares) leaves under: it carries nothing of
#: the user, and the device only answers it when it may upload some collective update.
PROTOCOL_RULE = "protocol.secaggplus"
#: Most devices and arrays a device accepts in a round's protocol messages.
MAX_DEVICES, MAX_ARRAYS = 100_000, 10_000
MIN_DEVICES = SECAGG_MIN_DEVICES


class _Refused(Exception):
    def __init__(self, code: int, detail: str):
        super().__init__(detail)
        self.code = code


def secagg_stage(msg: Message) -> str | None:
    """The SecAgg+ stage a message asks for (None when it is not a SecAgg+ message)."""
    if not msg.has_content():
        return None
    record = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    stage = record.get(Key.STAGE) if record is not None else None
    return str(stage) if isinstance(stage, str) else None


def _check_setup(configs: ConfigRecord) -> None:
    """Refuse a setup the server could use to unmask one device on its own."""
    values = {k: configs.get(k) for k in (Key.SAMPLE_NUMBER, Key.SHARE_NUMBER, Key.THRESHOLD)}
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values.values()):
        raise _Refused(BAD_REQUEST, f"setup: non-integer sizes {values}")
    sample, shares, threshold = (values[Key.SAMPLE_NUMBER], values[Key.SHARE_NUMBER],
                                 values[Key.THRESHOLD])
    if not MIN_DEVICES <= sample <= MAX_DEVICES:
        raise _Refused(BAD_REQUEST, f"setup: {sample} devices (need {MIN_DEVICES} to "
                                    f"{MAX_DEVICES})")
    if not MIN_DEVICES <= shares <= sample + 1:  # Flower makes an even count odd
        raise _Refused(BAD_REQUEST, f"setup: {shares} shares for {sample} devices")
    if not shares / 2 < threshold <= shares:
        raise _Refused(BAD_REQUEST, f"setup: threshold {threshold} is not a majority of "
                                    f"{shares} shares")


def _check_unmask(configs: ConfigRecord, node_id: int) -> None:
    """Refuse an unmask request that would reveal a device's update: a device listed both
    as active (its mask seed's share) and dropped (its key's share), or this device itself
    listed as dropped."""
    active = configs.get(Key.ACTIVE_NODE_ID_LIST) or []
    dead = configs.get(Key.DEAD_NODE_ID_LIST) or []
    if len(active) + len(dead) > MAX_DEVICES:
        raise _Refused(BAD_REQUEST, "unmask: too many devices")
    if set(active) & set(dead):
        raise _Refused(BAD_REQUEST, "unmask: a device is listed as active and as dropped")
    if node_id in set(dead):
        raise _Refused(BAD_REQUEST, "unmask: this device is listed as dropped")


def _may_upload_collective(policy: ConsentPolicy) -> bool:
    return any(policy.allows(collective(kind).consent_kind) for kind in collective_kinds())


def _unpack_fitins(msg: Message) -> tuple[RecordDict, list[str], dict[str, Any]]:
    """(the handler's content, the arrays' names, the legacy config) of a legacy fit message."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    config = dict(fitins.config)
    joined = config.get(SECAGG_NAMES_KEY)
    names = joined.split(",") if isinstance(joined, str) and joined else []
    arrays = parameters_to_ndarrays(fitins.parameters)
    if not names or len(names) != len(arrays) or len(set(names)) != len(names) or \
            len(names) > MAX_ARRAYS:
        raise _Refused(BAD_REQUEST, "fit message: the array names do not match its arrays")
    keep = {k: v for k, v in config.items()
            if k not in (SECAGG_NAMES_KEY, KEY_CLIPPING_NORM)}
    content = RecordDict({"arrays": to_array_record(dict(zip(names, arrays))),
                          "config": ConfigRecord(keep)})
    return content, names, config


def _pack_fitres(reply: Message, names: list[str], config: dict[str, Any]) -> RecordDict:
    """The handler's reply as a legacy ``fitres``: the arrays in ``names`` order, the weight
    capped (1 under DP: equal weights), the metrics as they are."""
    arrays = reply.content.array_records.get("arrays")
    if arrays is None or sorted(arrays.keys()) != sorted(names):
        raise _Refused(FAILED, "the handler's reply does not carry the round's arrays")
    metrics = reply.content.metric_records.get("metrics") or MetricRecord()
    count = float(metrics.get("num-examples", 0))
    cap = float(config.get(SECAGG_WEIGHT_KEY) or 1.0)
    weight = 1 if any(k in config for k in DP_ROUND_KEYS) else max(1, int(min(count, cap)))
    fitres = FitRes(status=Status(code=Code.OK, message=""),
                    parameters=ndarrays_to_parameters([np.asarray(arrays[n].numpy(), np.float32)
                                                       for n in names]),
                    num_examples=weight, metrics=dict(metrics))
    return compat.fitres_to_recorddict(fitres, keep_input=True)


def secagg_mod(msg: Message, context: Context, call_next) -> Message:
    """The ``train`` handler's mod for SecAgg+ (see the module's text)."""
    stage = secagg_stage(msg)
    if stage is None:
        return call_next(msg, context)

    def error(code: int, detail: str) -> Message:
        log.warning("secure aggregation, stage %s: refusing (code %d): %s", stage, code,
                    detail)
        return Message(Error(code=code, reason=device_error_reason(code)), reply_to=msg)

    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    try:
        if stage == Stage.SETUP:
            _check_setup(configs)
            if not _may_upload_collective(device_policy(context)):
                raise _Refused(CONSENT_DENIED, "the consent policy allows no stage-1 upload")
        elif stage == Stage.UNMASK:
            _check_unmask(configs, int(msg.metadata.dst_node_id))
        if stage != Stage.COLLECT_MASKED_VECTORS:
            reply = secaggplus_mod(msg, context, call_next)
            note_consent_rule(context, PROTOCOL_RULE)
            return reply
        return _collect(msg, context, call_next)
    except _Refused as exc:
        return error(exc.code, str(exc))
    except Exception as exc:  # Flower's mod raises on a malformed or out-of-order stage
        log.exception("secure aggregation failed at stage %s", stage)
        return error(FAILED, type(exc).__name__)


class _HandlerError(Exception):
    def __init__(self, reply: Message):
        super().__init__("the handler replied with an error")
        self.reply = reply


def _collect(msg: Message, context: Context, call_next) -> Message:
    """The masked-vector stage: train through the handler, clip under DP, mask."""
    def handler(fit_msg: Message, ctx: Context) -> Message:
        content, names, config = _unpack_fitins(fit_msg)
        fit_msg.content = content  # the handler's layout (the ledger measured the original)
        reply = call_next(fit_msg, ctx)
        if reply.has_error():
            raise _HandlerError(reply)
        return Message(_pack_fitres(reply, names, config), reply_to=fit_msg)

    def clipped(fit_msg: Message, ctx: Context) -> Message:
        fitins_config = fit_msg.content.config_records.get("fitins.config") or {}
        if KEY_CLIPPING_NORM in fitins_config:  # DP: Flower clips the update on the device
            return fixedclipping_mod(fit_msg, ctx, handler)
        return handler(fit_msg, ctx)

    try:
        return secaggplus_mod(msg, context, clipped)
    except _HandlerError as exc:  # the handler's own code (e.g. consent denied) leaves
        return Message(exc.reply.error, reply_to=msg)
