"""The device's Flower ClientApp (flwr 1.41 Message API): one handler per federation phase.

Handlers only unpack the message, call one plain function of :mod:`edge_client.phases` and
pack the reply: ``train`` (collective stage 1), ``query.select`` (sharer selection),
``train.share``, ``train.personalize`` and ``evaluate``; the methods themselves are in
:mod:`shared.methods` (one folder each).

Stage-1 message in (from :mod:`cloud_server.server_app`):

- ArrayRecord ``"arrays"``: the global collective parameters, float32. ``method = "lora"``: the
  stage-1 task LoRA state (keys ``model.layers.N.self_attn.q_proj.lora_A.weight`` ...).
  ``method = "perfit"``: PerFit stage 1 and the shared stage 2, keys ``stage1.layers.N.R|W|b``
  and ``stage2.layers.N.R|W|b`` (:func:`shared.methods.perfit.perfit_to_arrays`). ``method``
  names a registered kind of collective parameters (:func:`shared.methods.collective`).
- ConfigRecord ``"config"``: ``method``, ``model``, ``task``, ``num-users-per-client``,
  ``seed``, ``server-round`` and optional training knobs (``local-epochs``,
  ``lr``, ``max-steps``, ``batch-size``, ``max-history``, ``positions``, ``data-path``,
  ``keep-updates``: also keep this client's last update on disk, ``arrays/last-update.npz``).

Reply: ArrayRecord ``"arrays"`` (the locally trained values, float32 only, same keys) and
MetricRecord ``"metrics"`` (``num-examples`` = the FedAvg weight, ``train-loss``,
``train-loss-first``, ``steps``, ``users``, ``seconds``). Nothing else leaves the device: no
text, no token ids, no user ids. A refusal or a failure is an error reply (code and reason).

Where things come from:

- the client's data: the users of its partition (``context.node_config["partition-id"]`` of
  ``"num-partitions"``): users ``[pid * n, (pid + 1) * n)`` of the task's dataset, n =
  ``num-users-per-client``; their history never leaves the process;
- the base model: :func:`shared.models.load_model`, once per worker process (memoized), never
  captured in this (pickled) ClientApp;
- device settings (:data:`DEVICE_SETTINGS`) come from the node config only, never from the
  server's messages or the run config (a simulation sets them with :func:`device_settings_mod`);
- how the device answers its queries: ``node_config["answer-backend"]`` (``torch``, default,
  or ``onnx``, ``onnx-int8``, ``onnx-int4``: ONNX Runtime, :mod:`edge_client.ondevice`);
- consent: the policy file in ``node_config["consent-policy"]`` (defaults when absent); an
  upload the policy does not allow is refused with an error reply, nothing is trained or sent;
- secure aggregation: the ``train`` handler's mod :func:`edge_client.secagg.secagg_mod`
  answers SecAgg+'s protocol messages and masks the handler's reply (run config ``secagg``);
- audit: :func:`edge_client.audit.audit_mod` (outermost mod) writes every reply to the
  device's ledger: ``node_config["ledger"]`` when set, else
  ``DEVICE_ROOT/clients/partition-NNNNN/ledger.jsonl`` (:mod:`edge_client.state`); a device
  with no ledger location answers nothing but an error;
- errors: a refusal or failure leaves as a code and its fixed text
  (:data:`shared.errors.DEVICE_ERRORS`), never the exception's message;
- per-client state between rounds: on disk (:class:`edge_client.state.ClientState`), never in
  ``context.state`` (which Flower keeps in RAM for every virtual client); ``context.state``
  holds only the consent rule a handler notes for the audit mod, which takes it back out.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Mapping, Sequence

import grpc
import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from edge_client import phases
from edge_client.audit import AuditClientInterceptor, audit_mod, note_consent_rule
from edge_client.consent import ConsentDenied, device_policy
from edge_client.pool_client import describe_request
from edge_client.pool_pieces import PoolPieces
from edge_client.secagg import secagg_mod
from edge_client.state import ClientState, ledger_path
from shared.config import ARRAYS_DIGEST_KEY, KEPT_METRIC
from shared.errors import (BAD_REQUEST, CONSENT_DENIED, FAILED, NOT_CONFIGURED, PflError,
                           device_error_reason)
from shared.files import save_npz
from shared.methods import collective, core_class, parse_method
from shared.methods.store import arrays_digest
from shared.methods.perpcs.core import perpcs_config
from shared.models import load_model
from shared.records import from_array_record, to_array_record
from shared.serialization import ModelShapes

log = logging.getLogger(__name__)


# ================================================================= Flower plumbing
#: Settings a device gives itself, in its node config (``flower-supernode --node-config``):
#: its ledger file, its state folder, its consent policy, the CA it trusts for the pool, its
#: signing key, and (simulations) ``device-root``, the folder that holds one state folder per
#: partition. They are never read from the server's messages or the run config: the server
#: must not choose what a device consents to, whom it trusts or where it writes.
DEVICE_SETTINGS = ("ledger", "state-dir", "device-root", "consent-policy", "pool-ca",
                   "device-key", "answer-backend")


def device_settings_mod(settings: Mapping[str, Any]):
    """A ClientApp mod that gives every (virtual) device the node-config ``settings`` it
    lacks: how a simulation, which builds its devices itself, configures them (a real
    SuperNode gets the same keys from ``--node-config``). Keys must be :data:`DEVICE_SETTINGS`."""
    unknown = sorted(set(settings) - set(DEVICE_SETTINGS))
    if unknown:
        raise PflError(f"unknown device settings {unknown} (known: {', '.join(DEVICE_SETTINGS)})")
    fixed = {k: str(v) for k, v in settings.items() if v not in (None, "")}

    def mod(msg: Message, context: Context, call_next) -> Message:
        for key, value in fixed.items():
            if not context.node_config.get(key):
                context.node_config[key] = value
        return call_next(msg, context)

    return mod


def _partition(context: Context) -> int | None:
    value = context.node_config.get("partition-id")
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def device_ledger_path(context: Context, msg: Message | None = None) -> Path | None:
    """This node's audit ledger: node config ``ledger``, else its partition's ledger under
    node config ``device-root`` (simulations). ``msg`` is not read: the server does not
    choose where a device writes."""
    explicit = context.node_config.get("ledger")
    if explicit:
        return Path(str(explicit))
    root, partition = context.node_config.get("device-root"), _partition(context)
    if not root or partition is None or partition < 0:
        return None
    return ledger_path(str(root), partition)


def _message_options(msg: Message, context: Context) -> dict[str, Any]:
    """The run config overlaid with the message's ConfigRecord (the server's message wins);
    device settings (:data:`DEVICE_SETTINGS`) are dropped from both."""
    config = msg.content.config_records.get("config") or ConfigRecord()
    merged = {**dict(context.run_config), **dict(config)}
    return {k: v for k, v in merged.items() if k not in DEVICE_SETTINGS}


class Refusal(Exception):
    """A handler's refusal: an error reply with ``code`` (shared.errors.DEVICE_ERRORS); the
    ``detail`` stays in the device's log."""

    def __init__(self, code: int, detail: str):
        super().__init__(detail)
        self.code = code


def _device_refusal(context: Context, kind: str) -> str:
    """The consent rule that allows an upload of consent ``kind``; raises :class:`Refusal`
    when this device must not answer (no ledger, no partition, consent denied)."""
    if device_ledger_path(context) is None:
        raise Refusal(NOT_CONFIGURED, "no audit ledger is configured for this device (node "
                                      "config 'ledger' or 'device-root'): sending nothing")
    if _partition(context) is None or "num-partitions" not in context.node_config:
        raise Refusal(NOT_CONFIGURED, "node config needs partition-id and num-partitions")
    rule = device_policy(context).allows(kind)
    if rule is None:
        raise Refusal(CONSENT_DENIED, f"the consent policy does not allow uploading {kind}")
    return rule


def _error(msg: Message, code: int, detail: str) -> Message:
    """An error reply: the code and its fixed text only (the detail is logged here)."""
    log.warning("refusing %s (code %d): %s", msg.metadata.message_type, code, detail)
    return Message(Error(code=code, reason=device_error_reason(code)), reply_to=msg)


def guarded(handler):
    """Run a handler so that nothing but a code leaves on failure: a :class:`Refusal` gives
    its code, any other exception ``FAILED``; the traceback goes to the device's log."""
    @functools.wraps(handler)
    def run(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Refusal as exc:
            return _error(msg, exc.code, str(exc))
        except ConsentDenied as exc:
            return _error(msg, CONSENT_DENIED, str(exc))
        except Exception as exc:  # reply (and audit) an error instead of crashing the node
            log.exception("%s failed", msg.metadata.message_type)
            return _error(msg, FAILED, f"{type(exc).__name__}")
    return run


@guarded
def train(msg: Message, context: Context) -> Message:
    """Local stage-1 training on this partition's users; reply with the updated arrays."""
    options = _message_options(msg, context)
    method = str(options.get("method", "lora"))
    try:
        part = collective(method)
    except PflError as exc:
        raise Refusal(BAD_REQUEST, str(exc)) from None
    rule = _device_refusal(context, part.consent_kind)
    if "arrays" not in msg.content.array_records:
        raise Refusal(BAD_REQUEST, "no 'arrays' record in the message")
    global_arrays = from_array_record(msg.content["arrays"])
    partition = int(context.node_config["partition-id"])
    server_round = int(options.get("server-round", 0))
    task, users = phases.load_partition(options, partition,
                                        int(context.node_config["num-partitions"]))
    arrays, metrics = phases.local_stage1_update(method, global_arrays, task, users, options,
                                                 partition_id=partition,
                                                 server_round=server_round)
    directory = _device_dir(context, required=False)
    if directory is not None:  # per-client facts go to disk, not to context.state
        state = ClientState.at(directory, partition)
        state.record_round({"round": server_round, "method": method, **metrics})
        if options.get("keep-updates"):
            state.save_arrays("last-update", arrays)
    return _reply(msg, context, rule, metrics, arrays)


# ------------------------------------------------------------- phases 2-5 (one user each)
def _phase_setup(msg: Message, context: Context, kind: str):
    """(options, consent policy, rule, arrays) for a phase message of ``kind`` (the consent
    kind whose rule covers the reply); raises :class:`Refusal`."""
    options = _message_options(msg, context)
    rule = _device_refusal(context, kind)
    policy = device_policy(context)
    arrays = (from_array_record(msg.content["arrays"])
              if "arrays" in msg.content.array_records else {})
    digest = options.get(ARRAYS_DIGEST_KEY)
    if not arrays and digest:  # the server knows this device kept them: use its own copy
        arrays = _kept_arrays(context, str(digest))
    return options, policy, rule, arrays


#: Where a device keeps the collective arrays between personalization and evaluation.
KEPT_ARRAYS = Path("arrays") / "collective.npz"


def _keep_arrays(context: Context, arrays: Mapping[str, np.ndarray]) -> bool:
    """Keep ``arrays`` in the device's folder for the next phase; True when kept."""
    directory = _device_dir(context, required=False)
    if directory is None or not arrays:
        return False
    save_npz(directory / KEPT_ARRAYS, {k: np.asarray(v) for k, v in arrays.items()})
    return True


def _kept_arrays(context: Context, digest: str) -> dict[str, np.ndarray]:
    """The collective arrays this device kept, if their digest is ``digest``."""
    directory = _device_dir(context, required=False)
    path = None if directory is None else directory / KEPT_ARRAYS
    if path is None or not path.is_file():
        raise Refusal(BAD_REQUEST, "the server sent a digest, but this device kept no arrays")
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    if arrays_digest(arrays) != digest:
        raise Refusal(BAD_REQUEST, "the kept arrays are not the ones the server names")
    return arrays


def _device_user(options: Mapping[str, Any], context: Context, *, model: bool = True):
    """(loaded model or None, task, this device's one user with its whole history)."""
    one_user = {**options, "num-users-per-client": 1, "max-history": None}
    task, users = phases.load_partition(one_user, int(context.node_config["partition-id"]),
                                        int(context.node_config["num-partitions"]))
    loaded = load_model(str(options.get("model", "tiny")),
                        device=options.get("device") or None) if model else None
    return loaded, task, users[0]


def _device_dir(context: Context, *, required: bool = True) -> Path | None:
    """This device's own folder: node config ``state-dir``, else its partition's folder
    under node config ``device-root`` (simulations)."""
    explicit = context.node_config.get("state-dir")
    if explicit:
        return Path(str(explicit))
    root, partition = context.node_config.get("device-root"), _partition(context)
    if root and partition is not None:
        return ClientState(str(root), partition).directory
    if required:
        raise Refusal(NOT_CONFIGURED, "node config needs state-dir (or device-root)")
    return None


def _pool_access(options: Mapping[str, Any], context: Context):
    """(pool address, CA path, audit interceptors) for this device's pool calls. The CA comes
    from the device's node config (``pool-ca``) only: a device trusts its own root, not the
    server's word. The address may come from the server (TLS against that CA protects it)."""
    target = str(options.get("pool-address") or "")
    ca = context.node_config.get("pool-ca")
    if not target:
        raise Refusal(BAD_REQUEST, "this phase needs the piece pool: the run names no "
                                   "pool-address")
    if not ca:
        raise Refusal(NOT_CONFIGURED, "this phase needs the piece pool: node config pool-ca")
    # the address is the server's word; the ledger also names the root this device's own
    # node config trusts for it (TLS to the pool is verified against that CA only)
    interceptor = AuditClientInterceptor(
        device_ledger_path(context), "pool-grpc", target, describe_request,
        meta={"run_id": context.run_id, "address_from": "server",
              "trusted_ca_sha256": _file_digest(str(ca))})
    return target, str(ca), [interceptor]


def _file_digest(path: str) -> str:
    """sha256 of a file's bytes ("unreadable" when it cannot be read: TLS will fail then)."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return "unreadable"


def _methods(options: Mapping[str, Any]) -> list[str]:
    return [m for m in str(options.get("methods", "")).split(",") if m]


def _needs_pool(methods: Sequence[str]) -> bool:
    """Whether one of ``methods`` reads the piece pool (PER-PCS, with any augmentation)."""
    return any(core_class(parse_method(m).core).uses_pool for m in methods)


def _pool(options: Mapping[str, Any], context: Context, loaded) -> PoolPieces:
    """The pool service as this device reads it: its own CA, the sharers the server named,
    pieces that fit this model, every call audited, fetched pieces kept on the device."""
    target, ca, interceptors = _pool_access(options, context)
    directory = _device_dir(context, required=False)
    return PoolPieces(target, ca, interceptors=interceptors,
                             trusted_keys=phases.trusted_sharers(options),
                             run=str(options.get("pool-run") or ""),
                             shapes=ModelShapes.of(loaded.model),
                             # pieces kept by content id: evaluation reuses personalization's
                             cache_dir=None if directory is None else directory / "pieces")


def _reply(msg: Message, context: Context, rule: str, metrics: Mapping[str, float],
           arrays: Mapping[str, np.ndarray] | None = None) -> Message:
    """The reply: ``metrics`` (as given: ints stay ints) and optional float32 ``arrays``,
    with the consent rule noted for the audit mod."""
    note_consent_rule(context, rule)
    content = RecordDict({"metrics": MetricRecord(dict(metrics))})
    if arrays:
        content["arrays"] = to_array_record(arrays)
    return Message(content, reply_to=msg)


def _run_phase(msg: Message, context: Context, kind: str, work) -> Message:
    options, policy, rule, arrays = _phase_setup(msg, context, kind)
    metrics, out_arrays, rule = work(options, policy, rule, arrays)
    return _reply(msg, context, rule, metrics, out_arrays)


def _device_key_path(context: Context) -> Path:
    """The device's signing key (node config ``device-key``, else ``DEVICE_DIR/device.key``;
    created on first use)."""
    return Path(str(context.node_config.get("device-key") or _device_dir(context) / "device.key"))


@guarded
def select(msg: Message, context: Context) -> Message:
    """Sharer selection: cluster index and history size (embedding only with consent)."""
    def work(options, policy, rule, arrays):
        _, task, user = _device_user(options, context, model=False)
        return phases.cluster_report(task, user, arrays.get("centroids"), policy,
                                     _device_dir(context), _device_key_path(context))

    return _run_phase(msg, context, "cluster_index", work)


@guarded
def share(msg: Message, context: Context) -> Message:
    """A selected sharer trains LoRA + gates and submits its consented pieces to the pool."""
    def work(options, policy, rule, arrays):
        loaded, task, user = _device_user(options, context)
        target, ca, interceptors = _pool_access(options, context)
        metrics, key = phases.share_pieces(loaded, task, user, options, arrays, policy,
                                    key_path=_device_key_path(context), pool_target=target,
                                    pool_ca=ca,
                                    interceptors=interceptors)
        return metrics, key, "upload.perpcs_pieces(pool)+metrics.may_report"

    return _run_phase(msg, context, "metrics", work)


@guarded
def personalize(msg: Message, context: Context) -> Message:
    """Personalize this device's user with each method asked; reply with costs only."""
    def work(options, policy, rule, arrays):
        loaded, task, user = _device_user(options, context)
        methods = _methods(options)
        pool, source = None, None
        if _needs_pool(methods):
            try:  # an unreadable or empty pool fails the methods that read it, no others
                source = _pool(options, context, loaded)
                modules = perpcs_config(phases.device_runtime(loaded, task, options, {})) \
                    .target_modules
                # the gates first; assembly fetches the pieces it selects, on one connection
                pool = source.pool(modules, lazy=True)
            except (Refusal, PflError, grpc.RpcError) as exc:
                log.warning("the piece pool cannot be read: %s", exc)
                pool, source = None, None
        with source.session() if source is not None else nullcontext():
            metrics = phases.personalize(loaded, task, user, methods, options, arrays,
                                         _device_dir(context), pool=pool)
        if options.get(ARRAYS_DIGEST_KEY) and _keep_arrays(context, arrays):
            metrics[KEPT_METRIC] = 1.0  # evaluation may send the digest alone
        if pool is not None:  # what came down from the pool (tensor bytes of the pieces)
            metrics["pool-download-bytes"] = float(source.received)
        return metrics, None, rule

    return _run_phase(msg, context, "metrics", work)


@guarded
def evaluate(msg: Message, context: Context) -> Message:
    """Answer the user's held-out queries on the device; reply with metric sums only."""
    def work(options, policy, rule, arrays):
        loaded, task, user = _device_user(options, context)
        methods = _methods(options)
        source = None
        if _needs_pool(methods):
            try:  # without the pool only the methods that read it fail
                source = _pool(options, context, loaded)
            except Refusal as exc:
                log.warning("the piece pool cannot be read: %s", exc)
        metrics = phases.evaluate(loaded, task, user, methods, options, arrays,
                                  _device_dir(context), pool=source,
                                  backend=str(context.node_config.get("answer-backend",
                                                                      "torch")))
        if source is not None:  # what came down from the pool (gates and pieces)
            metrics["pool-download-bytes"] = float(source.received)
        return metrics, None, rule

    return _run_phase(msg, context, "metrics", work)


def make_client_app(device: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp with every phase's handler, audited by :func:`audit_mod`.

    ``device``: node-config settings (:data:`DEVICE_SETTINGS`) that every virtual device of a
    simulation gets unless its own node config sets them (:func:`device_settings_mod`).
    audit_mod is the outermost mod that sees the reply (the settings mod around it changes
    no reply), so it records the reply as it leaves the device.
    The app holds no model and no ledger, so it pickles (Ray ships the ClientApp to its
    actors); each worker loads the frozen model once (:func:`shared.models.load_model`).
    """
    mods = [audit_mod(device_ledger_path, channel="flower")]
    if device:
        mods.insert(0, device_settings_mod(device))  # changes no reply: outside the audit
    client_app = ClientApp(mods=mods)
    client_app.train(mods=[secagg_mod])(train)  # SecAgg+ rounds (edge_client.secagg)
    client_app.query("select")(select)
    client_app.train("share")(share)
    client_app.train("personalize")(personalize)
    client_app.evaluate()(evaluate)
    return client_app


#: ``flwr run`` / SuperNode entry point (pyproject: [tool.flwr.app.components] clientapp).
app = make_client_app()
