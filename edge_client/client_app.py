"""The device's Flower ClientApp (flwr 1.41 Message API): one handler per federation phase.

Handlers only unpack the message, call plain functions and pack the reply: ``train``
(collective stage 1, below), ``query.select`` (sharer selection), ``train.share``,
``train.personalize`` and ``evaluate`` (:mod:`edge_client.phases`); the training math is in
:mod:`edge_client.trainers`, :mod:`edge_client.cores` and :mod:`shared.methods`.

Stage-1 message in (from :mod:`cloud_server.server_app`):

- ArrayRecord ``"arrays"``: the global collective parameters, float32. ``method = "lora"``: the
  stage-1 task LoRA state (keys ``model.layers.N.self_attn.q_proj.lora_A.weight`` ...).
  ``method = "perfit"``: PerFit stage 1 and the shared stage 2, keys ``stage1.layers.N.R|W|b``
  and ``stage2.layers.N.R|W|b`` (:func:`perfit_to_arrays`).
- ConfigRecord ``"config"``: ``method``, ``model``, ``task``, ``num-users-per-client``,
  ``seed``, ``run-dir``, ``server-round`` and optional training knobs (``local-epochs``,
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
- consent: the policy file in ``node_config["consent-policy"]`` (defaults when absent); an
  upload the policy does not allow is refused with an error reply, nothing is trained or sent;
- audit: :func:`edge_client.audit.audit_mod` (outermost mod) writes every reply to the
  device's ledger: ``node_config["ledger"]`` when set, else
  ``RUN_DIR/clients/partition-NNNNN/ledger.jsonl`` (:mod:`edge_client.state`); a device with
  no ledger location answers nothing but an error;
- per-client state between rounds: on disk (:class:`edge_client.state.ClientState`), never in
  ``context.state`` (which Flower keeps in RAM for every virtual client); ``context.state``
  holds only the consent rule a handler notes for the audit mod, which takes it back out.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from flwr.app import (Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord,
                      RecordDict)
from flwr.clientapp import ClientApp

from edge_client.audit import audit_mod, note_consent_rule
from edge_client.consent import ConsentPolicy
from edge_client.state import ClientState, ledger_path
from shared.errors import PflError
from shared.types import recent_history

log = logging.getLogger(__name__)

METHODS = ("lora", "perfit")
#: method -> the consent policy's upload kind (edge_client.consent.KINDS).
CONSENT_KIND = {"lora": "stage1_lora", "perfit": "perfit_stage1"}
#: Error codes of this app's refusals (Flower's own codes are 0..8).
BAD_REQUEST, CONSENT_DENIED, FAILED = 400, 403, 500
STAGE_PREFIXES = ("stage1", "stage2")


# =============================================================== plain functions (no Flower)
def perfit_to_arrays(stage1, stage2) -> dict[str, np.ndarray]:
    """PerFit stage 1 + shared stage 2 as one flat float32 dict ``stageK.layers.N.R|W|b``."""
    out = {}
    for prefix, stage in zip(STAGE_PREFIXES, (stage1, stage2)):
        for key, value in stage.export_arrays().items():
            out[f"{prefix}.{key}"] = np.asarray(value, dtype=np.float32)
    return out


def perfit_from_arrays(arrays: Mapping[str, Any], device="cpu"):
    """Inverse of :func:`perfit_to_arrays`: (stage 1, shared stage 2) as PerFitStage modules
    (an R that is not orthonormal, e.g. a raw average, is re-orthonormalized on load)."""
    from shared.methods.perfit import PerFitStage

    parts: dict[str, dict] = {prefix: {} for prefix in STAGE_PREFIXES}
    for key, value in arrays.items():
        prefix, _, rest = key.partition(".")
        if prefix not in parts or not rest:
            raise PflError(f"PerFit arrays: unexpected key {key!r} (want stage1.* / stage2.*)")
        parts[prefix][rest] = value
    if not all(parts.values()):
        raise PflError("PerFit arrays need both stage1.* and stage2.* keys")
    return tuple(PerFitStage.from_arrays(parts[p], device=device) for p in STAGE_PREFIXES)


def partition_users(dataset, partition_id: int, num_partitions: int, users_per_client: int,
                    max_history: int | None = None) -> list:
    """The users of one partition: indices [pid * n, (pid + 1) * n) of ``dataset``, each with
    only its ``max_history`` most recent history items (None: all)."""
    if not 0 <= partition_id < num_partitions:
        raise PflError(f"partition id {partition_id} is outside 0..{num_partitions - 1}")
    start = partition_id * users_per_client
    stop = min(start + users_per_client, len(dataset))
    users = [recent_history(dataset.user(i), max_history) for i in range(start, stop)]
    if not users:
        raise PflError(f"partition {partition_id} has no users ({len(dataset)} users, "
                       f"{users_per_client} per client)")
    return users


def load_partition(options: Mapping[str, Any], partition_id: int,
                   num_partitions: int) -> tuple[Any, list]:
    """(task spec, this client's users) for the task named in ``options`` (synthetic by
    default; LaMP / HuffPost data from ``data-path`` on the device)."""
    from shared.data import load_dataset

    per = int(options.get("num-users-per-client", 2))
    task = str(options.get("task", "synthetic"))
    if task == "synthetic":
        dataset = load_dataset(task, None, num_users=num_partitions * per,
                               seed=int(options.get("seed", 0)))
    else:
        dataset = load_dataset(task, options.get("data-path") or None,
                               users=num_partitions * per)
    max_history = options.get("max-history")
    return dataset.task, partition_users(dataset, partition_id, num_partitions, per,
                                         int(max_history) if max_history else None)


def _train_config(options: Mapping[str, Any], base, partition_id: int, server_round: int):
    """Round- and client-specific training settings on top of the method's recipe."""
    overrides: dict[str, Any] = {
        # a different shuffle / dropout draw per client and round, reproducible from the seed
        "seed": int(options.get("seed", 0)) * 1_000_003 + 7919 * server_round + partition_id}
    for key, name, cast in (("local-epochs", "epochs", float), ("lr", "lr", float),
                            ("batch-size", "batch_size", int), ("max-steps", "max_steps", int)):
        if options.get(key) not in (None, "", 0):
            overrides[name] = cast(options[key])
    return replace(base, **overrides)


def local_stage1_update(method: str, global_arrays: Mapping[str, np.ndarray], task,
                        users: Sequence, options: Mapping[str, Any], *, partition_id: int = 0,
                        server_round: int = 1) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """One client's local stage-1 training from the global arrays: (new arrays, metrics).

    ``lora``: :func:`edge_client.trainers.train_stage1_lora` starting from the global LoRA
    state. ``perfit``: :func:`shared.methods.perfit.train_stage1` (collective stage 1 jointly
    with the shared stage 2) starting from the global stages. Returned arrays are float32
    numpy with the same keys; metrics hold ``num-examples`` (the FedAvg weight) and losses.
    """
    from shared.models import load_model

    started = time.perf_counter()
    loaded = load_model(str(options.get("model", "tiny")), device=options.get("device") or None)
    if method == "lora":
        from edge_client.trainers import train_stage1_lora
        from shared.methods.oppu import stage1_lora, stage1_train

        initial = {k: torch.from_numpy(np.array(v, dtype=np.float32, copy=True))
                   for k, v in global_arrays.items()}
        config = _train_config(options, stage1_train(), partition_id, server_round)
        state, stats = train_stage1_lora(loaded.model, loaded.tokenizer, task, users,
                                         stage1_lora(), config, initial_state=initial,
                                         progress=False)
        arrays = {k: v.detach().to("cpu", torch.float32).numpy() for k, v in state.items()}
        examples = stats["examples"]
    elif method == "perfit":
        from shared.methods.perfit import PerFitConfig, train_stage1
        from shared.prompts import pad_token_id
        from shared.training import history_examples

        perfit_config = PerFitConfig(positions=str(options.get("positions", "f7+l7")))
        stage1, stage2 = perfit_from_arrays(global_arrays, device=loaded.device)
        config = _train_config(options, perfit_config.train_config(), partition_id,
                               server_round)
        examples_list = [ex for user in users for ex in history_examples(
            task, user.history, loaded.tokenizer, max_prompt_tokens=config.max_prompt_tokens,
            max_target_tokens=config.max_target_tokens)]
        if not examples_list:
            raise PflError("no history to train on")
        stage1, stage2, stats = train_stage1(loaded.model, examples_list, perfit_config,
                                             pad_id=pad_token_id(loaded.tokenizer), stage1=stage1, stage2=stage2,
                                             train_config=config, seed=config.seed)
        arrays = perfit_to_arrays(stage1, stage2)
        examples = len(examples_list)
    else:
        raise PflError(f"unknown stage-1 method {method!r} (known: {', '.join(METHODS)})")
    metrics = {"num-examples": int(examples), "train-loss": float(stats["loss_last"]),
               "train-loss-first": float(stats["loss_first"]), "steps": int(stats["steps"]),
               "users": len(users), "seconds": time.perf_counter() - started}
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()}, metrics


# ================================================================= Flower plumbing
def _message_run_dir(msg: Message | None) -> str | None:
    if msg is None or not msg.has_content():
        return None
    config = msg.content.config_records.get("config")
    value = config.get("run-dir") if config is not None else None
    return str(value) if value else None


def device_ledger_path(context: Context, msg: Message | None = None, *,
                       options: Mapping[str, Any] | None = None) -> Path | None:
    """This node's audit ledger: ``node_config["ledger"]`` on a real device, else the
    partition's ledger under the run folder (the run config's, or the one the server sent in
    ``msg`` / ``options``; nothing is kept per client in ``context.state``)."""
    explicit = context.node_config.get("ledger")
    if explicit:
        return Path(str(explicit))
    run_dir = (context.run_config.get("run-dir") or (options or {}).get("run-dir")
               or _message_run_dir(msg))
    partition = context.node_config.get("partition-id")
    if not run_dir or partition is None:
        return None
    return ledger_path(str(run_dir), int(partition))


def consent_policy(context: Context, options: Mapping[str, Any]) -> ConsentPolicy:
    """The device's consent policy: node config ``consent-policy`` (a real device), else the
    run's ``consent-policy`` (a simulation, where every virtual device shares one), else the
    documented defaults."""
    path = context.node_config.get("consent-policy") or options.get("consent-policy")
    return ConsentPolicy.load(str(path) if path else None)


def _message_options(msg: Message, context: Context) -> dict[str, Any]:
    """The run config overlaid with the message's ConfigRecord (the server's message wins)."""
    config = msg.content.config_records.get("config") or ConfigRecord()
    return {**dict(context.run_config), **dict(config)}


def _device_refusal(context: Context, options: Mapping[str, Any],
                    kind: str) -> tuple[int | None, str]:
    """(error code, reason) when this device must not answer a message whose reply is an
    upload of consent ``kind``, else (None, the consent rule that allows it)."""
    if device_ledger_path(context, options=options) is None:
        return BAD_REQUEST, ("no audit ledger is configured for this device (node config "
                             "'ledger', or a run-dir): sending nothing")
    if "partition-id" not in context.node_config or "num-partitions" not in context.node_config:
        return BAD_REQUEST, "node config needs partition-id and num-partitions"
    rule = consent_policy(context, options).allows(kind)
    if rule is None:
        return CONSENT_DENIED, f"the consent policy does not allow uploading {kind}"
    return None, rule


def _refusal(method: str, context: Context,
             options: Mapping[str, Any] | None = None) -> tuple[int | None, str]:
    """:func:`_device_refusal` for a stage-1 ``method`` (unknown methods refused first)."""
    if method not in CONSENT_KIND:
        return BAD_REQUEST, f"unknown stage-1 method {method!r} (known: {', '.join(METHODS)})"
    return _device_refusal(context, options or {}, CONSENT_KIND[method])


def _error(msg: Message, code: int, reason: str) -> Message:
    log.warning("refusing %s: %s", msg.metadata.message_type, reason)
    return Message(Error(code=code, reason=reason), reply_to=msg)


def train(msg: Message, context: Context) -> Message:
    """Local stage-1 training on this partition's users; reply with the updated arrays."""
    options = _message_options(msg, context)
    method = str(options.get("method", "lora"))
    code, rule = _refusal(method, context, options)
    if code is not None:
        return _error(msg, code, rule)
    if "arrays" not in msg.content.array_records:
        return _error(msg, BAD_REQUEST, "no 'arrays' record in the message")
    global_arrays = {k: v.numpy() for k, v in msg.content["arrays"].items()}
    partition = int(context.node_config["partition-id"])
    server_round = int(options.get("server-round", 0))
    try:
        task, users = load_partition(options, partition,
                                     int(context.node_config["num-partitions"]))
        arrays, metrics = local_stage1_update(method, global_arrays, task, users, options,
                                              partition_id=partition, server_round=server_round)
    except Exception as exc:  # reply (and audit) an error instead of crashing the node
        log.exception("local stage-1 training failed")
        return _error(msg, FAILED, f"local training failed: {type(exc).__name__}: "
                                   f"{str(exc)[:300]}")
    if options.get("run-dir"):  # per-client facts go to disk, not to context.state
        state = ClientState(str(options["run-dir"]), partition)
        state.record_round({"round": server_round, "method": method, **metrics})
        if options.get("keep-updates"):
            state.save_arrays("last-update", arrays)
    return _reply(msg, context, rule, metrics, arrays)


# ------------------------------------------------------------- phases 2-5 (one user each)
def _phase_setup(msg: Message, context: Context, kind: str):
    """(options, consent policy, rule, arrays) or an error reply for a phase message of
    ``kind`` (the consent kind whose rule covers the reply)."""
    options = _message_options(msg, context)
    code, rule = _device_refusal(context, options, kind)
    if code is not None:
        return _error(msg, code, rule)
    policy = consent_policy(context, options)
    arrays = ({k: v.numpy() for k, v in msg.content["arrays"].items()}
              if "arrays" in msg.content.array_records else {})
    return options, policy, rule, arrays


def _device_user(options: Mapping[str, Any], context: Context, *, model: bool = True):
    """(loaded model or None, task, this device's one user with its whole history)."""
    from shared.models import load_model

    one_user = {**options, "num-users-per-client": 1, "max-history": None}
    task, users = load_partition(one_user, int(context.node_config["partition-id"]),
                                 int(context.node_config["num-partitions"]))
    loaded = load_model(str(options.get("model", "tiny")),
                        device=options.get("device") or None) if model else None
    return loaded, task, users[0]


def _device_dir(options: Mapping[str, Any], context: Context) -> Path:
    """This device's own folder: node config ``state-dir``, else its partition's folder
    under the run folder (simulation)."""
    explicit = context.node_config.get("state-dir")
    if explicit:
        return Path(str(explicit))
    return ClientState(str(options["run-dir"]), int(context.node_config["partition-id"])).directory


def _pool_access(options: Mapping[str, Any], context: Context):
    """(pool address, CA path, audit interceptors) for this device's pool calls. The CA comes
    from the node config (``pool-ca``) when set: a device trusts its own root, not the
    server's word; simulations pass it in the run config."""
    from edge_client.audit import AuditClientInterceptor
    from edge_client.pool_client import describe_request

    target = str(options.get("pool-address") or "")
    ca = context.node_config.get("pool-ca") or options.get("pool-ca")
    if not target or not ca:
        raise PflError("this phase needs the piece pool: set pool-address (run config) and "
                       "pool-ca (node config)")
    interceptor = AuditClientInterceptor(device_ledger_path(context, options=options),
                                         "pool-grpc", target,
                                         describe_request)
    return target, str(ca), [interceptor]


def _methods(options: Mapping[str, Any]) -> list[str]:
    return [m for m in str(options.get("methods", "")).split(",") if m]


def _needs_pool(methods: Sequence[str]) -> bool:
    """Whether one of ``methods`` is PER-PCS (with any prompt augmentation)."""
    from shared.methods.base import parse_method

    return any(parse_method(m).core == "perpcs" for m in methods)


def _reply(msg: Message, context: Context, rule: str, metrics: Mapping[str, float],
           arrays: Mapping[str, np.ndarray] | None = None) -> Message:
    """The reply: ``metrics`` (as given: ints stay ints) and optional float32 ``arrays``,
    with the consent rule noted for the audit mod."""
    note_consent_rule(context, rule)
    content = RecordDict({"metrics": MetricRecord(dict(metrics))})
    if arrays:
        content["arrays"] = ArrayRecord({k: Array(np.ascontiguousarray(v, np.float32))
                                         for k, v in arrays.items()})
    return Message(content, reply_to=msg)


def _run_phase(msg: Message, context: Context, kind: str, work) -> Message:
    setup = _phase_setup(msg, context, kind)
    if isinstance(setup, Message):
        return setup
    options, policy, rule, arrays = setup
    try:
        metrics, out_arrays, rule = work(options, policy, rule, arrays)
    except Exception as exc:  # reply (and audit) an error instead of crashing the node
        log.exception("%s failed", msg.metadata.message_type)
        return _error(msg, FAILED, f"{msg.metadata.message_type} failed: "
                                   f"{type(exc).__name__}: {str(exc)[:300]}")
    return _reply(msg, context, rule, metrics, out_arrays)


def select(msg: Message, context: Context) -> Message:
    """Sharer selection: cluster index and history size (embedding only with consent)."""
    from edge_client.phases import cluster_report

    def work(options, policy, rule, arrays):
        _, task, user = _device_user(options, context, model=False)
        return cluster_report(task, user, arrays.get("centroids"), policy,
                              _device_dir(options, context))

    return _run_phase(msg, context, "cluster_index", work)


def share(msg: Message, context: Context) -> Message:
    """A selected sharer trains LoRA + gates and submits its consented pieces to the pool."""
    from edge_client.phases import share_pieces

    def work(options, policy, rule, arrays):
        loaded, task, user = _device_user(options, context)
        target, ca, interceptors = _pool_access(options, context)
        key_path = Path(str(context.node_config.get("device-key")
                            or _device_dir(options, context) / "device.key"))
        metrics = share_pieces(loaded, task, user, options, arrays, policy, key_path=key_path,
                               pool_target=target, pool_ca=ca, interceptors=interceptors)
        return metrics, None, "upload.perpcs_pieces(pool)+metrics.may_report"

    return _run_phase(msg, context, "metrics", work)


def personalize(msg: Message, context: Context) -> Message:
    """Personalize this device's user with each method asked; reply with costs only."""
    from edge_client import phases

    def work(options, policy, rule, arrays):
        loaded, task, user = _device_user(options, context)
        methods = _methods(options)
        pool = None
        if _needs_pool(methods):
            from edge_client.cores import perpcs_config

            target, ca, interceptors = _pool_access(options, context)
            modules = perpcs_config(phases.device_runtime(loaded, task, options, {})) \
                .target_modules
            pool = phases.fetch_pool(target, ca, modules, interceptors=interceptors)
        metrics = phases.personalize(loaded, task, user, methods, options, arrays,
                                     _device_dir(options, context), pool=pool)
        if pool is not None:  # what came down from the pool (tensor bytes of the pieces)
            metrics["pool-download-bytes"] = float(pool["download_bytes"])
        return metrics, None, rule

    return _run_phase(msg, context, "metrics", work)


def evaluate(msg: Message, context: Context) -> Message:
    """Answer the user's held-out queries on the device; reply with metric sums only."""
    from edge_client import phases

    def work(options, policy, rule, arrays):
        loaded, task, user = _device_user(options, context)
        methods = _methods(options)
        downloaded = []

        def fetch(ids):
            from edge_client.pool_client import PoolClient

            target, ca, interceptors = _pool_access(options, context)
            with PoolClient(target, ca, interceptors=interceptors) as client:
                pieces = client.fetch_pieces(ids)
            downloaded.append(client.received_bytes)
            return pieces
        metrics = phases.evaluate(loaded, task, user, methods, options, arrays,
                                  _device_dir(options, context),
                                  pool_pieces=fetch if _needs_pool(methods) else None)
        if downloaded:  # what came down from the pool (tensor bytes of the pieces)
            metrics["pool-download-bytes"] = float(sum(downloaded))
        return metrics, None, rule

    return _run_phase(msg, context, "metrics", work)


def make_client_app() -> ClientApp:
    """A ClientApp with every phase's handler, audited by :func:`audit_mod`.

    audit_mod is the outermost (here: only) mod: it records the reply as it leaves the device.
    The app holds no model and no ledger, so it pickles (Ray ships the ClientApp to its
    actors); each worker loads the frozen model once (:func:`shared.models.load_model`).
    """
    client_app = ClientApp(mods=[audit_mod(device_ledger_path, channel="flower")])
    client_app.train()(train)
    client_app.query("select")(select)
    client_app.train("share")(share)
    client_app.train("personalize")(personalize)
    client_app.evaluate()(evaluate)
    return client_app


#: ``flwr run`` / SuperNode entry point (pyproject: [tool.flwr.app.components] clientapp).
app = make_client_app()
