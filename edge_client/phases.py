"""What a device does in the federation phases after stage 1 (plain functions, no Flower).

One device holds one user (its partition of the data; a stage-1 client may hold several).
The ClientApp (:mod:`edge_client.client_app`) unpacks each message, calls one function here
and packs the reply; everything in the reply is numbers (metrics) or consented arrays, never
text. Nothing here imports the ClientApp or Flower.

- :func:`local_stage1_update` (phase 1, collective stage 1): one client's local training of
  the collective parameters of one kind (:class:`~shared.methods.base.Collective`) from the
  global arrays; the server averages the replies.

- :func:`cluster_report` (sharer selection, phase 2): the index of the nearest
  centroid to this user's mean history embedding and the history size. The embedding itself
  is added only when the consent policy allows ``embeddings`` to leave the device.
- :func:`share_pieces` (phase 3): a selected sharer trains its LoRA and gates
  (:func:`shared.methods.perpcs.train_sharer_pieces`), keeps the pieces its consent policy
  allows and submits them, signed with the device key, to the pool over gRPC/TLS. The pool
  call goes through the audit interceptor.
- :func:`personalize` (phase 4): each asked method personalizes this user with the very
  :class:`~shared.methods.base.Core` that ``pfl eval`` uses, on a device-side
  :class:`~shared.methods.base.Runtime` whose collective parts (stage-1 model, PerFit stage
  1, piece pool) come from the server's arrays and the pool. The personal state stays on
  disk in the device's folder.
- :func:`evaluate` (phase 5): answer the user's held-out queries with that state and return
  additive metric statistics only (:func:`shared.metrics.metric_stats`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from edge_client.consent import ConsentDenied, ConsentPolicy
from edge_client.pool_client import PoolClient, PoolError
from edge_client.pool_pieces import PoolPieces, PoolUnavailable
from shared import crypto
from shared.config import options_from_message
from shared.data import load_dataset
from shared.embeddings import user_embedding
from shared.errors import (CONSENT_DENIED, FAILED, FAILED_METRIC, POOL_UNAVAILABLE,
                           PflError)
from shared.files import write_atomic
from shared.generation import GenerationConfig
from shared.methods import (PersonalState, Runtime, augmented_prompts, collective,
                            parse_method, split_arrays)
from shared.methods.oppu import personal_train_config
from shared.methods.perpcs import train_sharer_pieces
from shared.methods.perpcs.core import PiecePool, perpcs_config
from shared.metrics import TASK_KINDS, metric_stats
from shared.models import load_model
from shared.profiles import generate_profiles
from shared.prompts import encode_prompt
from shared.serialization import Grant
from shared.serving.engine import BatchedEngine
from shared.types import recent_history

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------- the device
def device_runtime(loaded, task, options: Mapping[str, Any], arrays: Mapping[str, np.ndarray],
                   *, pool: PiecePool | None = None) -> Runtime:
    """A :class:`~shared.methods.base.Runtime` for this device: the run's options and the
    collective parts the methods need, installed from the server's arrays (and the pool)."""
    runtime = Runtime(loaded=loaded, task=task, seed=int(options.get("seed", 0)),
                      progress=False, options=options_from_message(options))
    for kind, part in split_arrays(arrays).items():
        collective(kind).install(runtime, part)
    if pool is not None:
        runtime.cache.perpcs_pool = pool
    return runtime


# ------------------------------------------------------------ phase 1: stage 1 (FedAvg)
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


def round_train_config(options: Mapping[str, Any], base, partition_id: int, server_round: int):
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

    ``method`` names the kind of collective parameters (:func:`shared.methods.collective`:
    ``lora``, ``perfit``); its :meth:`~shared.methods.base.Collective.local_update` trains
    from the global arrays. Returned arrays are float32 numpy with the same keys; metrics
    hold ``num-examples`` (the FedAvg weight) and losses.
    """
    started = time.perf_counter()
    part = collective(method)
    loaded = load_model(str(options.get("model", "tiny")), device=options.get("device") or None)
    config = round_train_config(options, part.train_config(options), partition_id, server_round)
    arrays, stats = part.local_update(loaded, task, users, global_arrays, config, options)
    metrics = {"num-examples": int(stats["examples"]), "train-loss": float(stats["loss_last"]),
               "train-loss-first": float(stats["loss_first"]), "steps": int(stats["steps"]),
               "users": len(users), "seconds": time.perf_counter() - started}
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()}, metrics


# ------------------------------------------------------------------ phase 2: selection
def cached_user_embedding(task, user, device_dir: Path | None) -> np.ndarray:
    """The user's MiniLM embedding, kept on the device (``device_dir``) between the k-means
    iterations; the file is named after a digest of the embedded texts, so a changed history
    gets a new one."""
    if device_dir is None:
        return user_embedding(task, user).astype(np.float32)
    digest = hashlib.sha256("\x00".join(task.corpus_text(item) for item in user.history)
                            .encode("utf-8")).hexdigest()[:16]
    path = Path(device_dir) / f"embedding-{digest}.npy"
    if path.is_file():
        return np.load(path)
    embedding = user_embedding(task, user).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, embedding)
    tmp.replace(path)
    return embedding


def cluster_report(task, user, centroids: np.ndarray | None, consent: ConsentPolicy,
                   device_dir: Path | None = None, key_path: Path | None = None
                   ) -> tuple[dict[str, float], dict[str, np.ndarray], str]:
    """(metrics, arrays, consent rule) for sharer selection.

    Metrics: ``history-size``, ``may-share`` (1 when the policy allows sharing pieces) and,
    given centroids, ``cluster-index`` (nearest by cosine).
    Arrays: ``sharer-key`` (the device's public key, ``key_path``) when it may share: the
    grant a selected sharer gets is bound to it; ``user-embedding`` (the mean of the history
    embeddings, one vector) only when the policy allows ``embeddings``; per-item embeddings
    never leave.
    """
    rule = consent.require("cluster_index")
    # whether this device would share pieces if selected: the server picks sharers among
    # those that would (the one bit of its policy the selection needs)
    metrics: dict[str, float] = {"history-size": float(len(user.history)),
                                 "may-share": float(consent.allows("perpcs_pieces") is not None)}
    embedding = cached_user_embedding(task, user, device_dir)
    if centroids is not None and len(centroids):
        c = np.asarray(centroids, dtype=np.float32)
        sims = (c @ embedding) / (np.linalg.norm(c, axis=1) * np.linalg.norm(embedding) + 1e-12)
        metrics["cluster-index"] = float(int(np.argmax(sims)))
    arrays: dict[str, np.ndarray] = {}
    share_rule = consent.allows("perpcs_pieces")
    if share_rule is not None and key_path is not None:
        public = crypto.public_key_bytes(crypto.device_key(key_path))
        arrays["sharer-key"] = crypto.key_to_array(public)
        rule = f"{rule}+{share_rule}"
    embedding_rule = consent.allows("embeddings")
    if embedding_rule is not None:
        arrays["user-embedding"] = embedding
        rule = f"{rule}+{embedding_rule}"
    return metrics, arrays, rule


# ------------------------------------------------------------------- phase 3: sharing
def share_pieces(loaded, task, user, options: Mapping[str, Any],
                 arrays: Mapping[str, np.ndarray], consent: ConsentPolicy, *,
                 key_path: Path, pool_target: str, pool_ca: str | Path,
                 interceptors: Sequence = ()) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Train this sharer's pieces and gates, submit the consented ones with the federation's
    grant (``options["pool-grant"]``); return (metrics, {"sharer-key": the device's public
    key as 32 float32 byte values}), the key so that targets can pin whose pieces to take."""
    rule = consent.require("perpcs_pieces")
    consent.check_model(loaded.num_layers)
    started = time.perf_counter()
    runtime = device_runtime(loaded, task, options, arrays)
    if runtime.cache.stage1 is None:
        raise PflError("sharing needs the stage-1 LoRA arrays (lora.*) in the message")
    grant = Grant.from_text(str(options["pool-grant"])) if options.get("pool-grant") else None
    key = crypto.device_key(key_path)
    public = crypto.public_key_bytes(key)
    pseudonym = crypto.sharer_pseudonym(public)
    config = perpcs_config(runtime)
    train_config = personal_train_config(runtime)
    user = recent_history(user, runtime.option("max_history", None))
    gated = train_sharer_pieces(runtime.cache.stage1, loaded.tokenizer, task, user, config,
                                train_config, sharer=pseudonym)
    shared = consent.filter_pieces(gated, seed=config.sharing_seed)
    submitted = 0
    if shared:
        with PoolClient(pool_target, pool_ca, interceptors=interceptors) as pool:
            submitted = sum(1 for _ in pool.submit(shared, key, consent={"pool": True},
                                                   grant=grant))
    log.info("sharer %s: %d of %d pieces submitted (%s)", pseudonym, submitted, len(gated), rule)
    metrics = {"pieces-trained": float(len(gated)), "pieces-submitted": float(submitted),
               "bytes-submitted": float(sum(p.num_bytes for p in shared)),
               "seconds": time.perf_counter() - started}
    return metrics, {"sharer-key": crypto.key_to_array(public)}


def trusted_sharers(options: Mapping[str, Any]) -> dict[str, bytes] | None:
    """The sharers whose pieces this target may take, from the run's ``pool-sharers``
    ({pseudonym: hex public key}, sent by the server after sharing); None when not given."""
    text = options.get("pool-sharers")
    if not text:
        return None
    try:
        data = json.loads(str(text))
        keys = {str(name): bytes.fromhex(str(key)) for name, key in data.items()}
    except (ValueError, AttributeError, TypeError):
        raise PflError("pool-sharers is not a JSON object of hex keys") from None
    if any(len(k) != 32 or crypto.sharer_pseudonym(k) != name for name, k in keys.items()):
        raise PflError("pool-sharers names a key that does not match its pseudonym")
    return keys


# ------------------------------------------------------------ phase 4: personalization
def _state_dir(base: Path, method: str) -> Path:
    return base / "personal" / method.replace("+", "_")


def failure_code(exc: BaseException) -> int:
    """The device error code (:data:`shared.errors.DEVICE_ERRORS`) a method's failure is
    reported with: only the code leaves the device, the detail stays in its log."""
    if isinstance(exc, ConsentDenied):
        return CONSENT_DENIED
    if isinstance(exc, (PoolUnavailable, PoolError)):  # the pool refused or went away
        return POOL_UNAVAILABLE
    return FAILED


#: Beside a method's state: the code it failed with in personalization (evaluation reports it).
FAILED_FILE = "failed.json"


def _fail(metrics: dict, state_dir: Path | None, name: str, exc: BaseException) -> None:
    """Note that ``name`` failed on this device: ``METHOD/failed`` = its code, and (with a
    state folder) a mark that the evaluation phase reads back."""
    code = failure_code(exc)
    log.warning("%s failed on this device (code %d): %s", name, code, exc,
                exc_info=code == FAILED)
    metrics[f"{name}/{FAILED_METRIC}"] = float(code)
    if state_dir is not None:
        directory = _state_dir(state_dir, name)
        directory.mkdir(parents=True, exist_ok=True)
        write_atomic(directory / FAILED_FILE, json.dumps({"code": code}).encode())


def _profile(loaded, task, user, spec) -> str | None:
    if not spec.augmentation.profile:
        return None
    return generate_profiles(loaded.model, loaded.tokenizer, task, [user],
                             progress=False).get(user.id)


def personalize(loaded, task, user, methods: Sequence[str], options: Mapping[str, Any],
                arrays: Mapping[str, np.ndarray], state_dir: Path, *,
                pool: PiecePool | None = None) -> dict[str, float]:
    """Personalize this user with each method; states go to ``state_dir``. Returns
    ``METHOD/params``, ``METHOD/bytes``, ``METHOD/seconds`` per method."""
    runtime = device_runtime(loaded, task, options, arrays, pool=pool)
    metrics: dict[str, float] = {}
    for name in methods:
        spec = parse_method(name)
        core = spec.make_core()
        directory = _state_dir(state_dir, name)
        (directory / FAILED_FILE).unlink(missing_ok=True)
        try:  # one method's failure (an empty pool, a bug) leaves the others standing
            if core.uses_pool and pool is None:
                raise PoolUnavailable(f"{name} needs the piece pool, which could not be read")
            t0 = time.perf_counter()
            profile = _profile(loaded, task, user, spec)
            state = core.personalize(runtime, user, spec.augmentation, profile)
            seconds = time.perf_counter() - t0
            if profile:
                state.bytes += len(profile.encode("utf-8"))
            core.save(state, directory)
            if profile is not None:
                (directory / "profile.txt").write_text(profile)
        except Exception as exc:
            _fail(metrics, state_dir, name, exc)
            continue
        metrics.update({f"{name}/params": float(state.params),
                        f"{name}/bytes": float(state.bytes), f"{name}/seconds": seconds})
    return metrics


# ------------------------------------------------------------------- phase 5: evaluation
def _answer_engine(loaded, backend: str):
    """ONNX Runtime's engine for an ``onnx*`` backend (:func:`edge_client.ondevice.runtime.
    answer_engine`), None for PyTorch's."""
    if backend == "torch":
        return None
    # ONNX Runtime and the exporter load only when a device answers with them: Flower 1.41
    # starts a process for every message, and a device's every import is paid each time.
    from edge_client.ondevice.runtime import answer_engine

    return answer_engine(loaded, backend, progress=log.info)


def evaluate(loaded, task, user, methods: Sequence[str], options: Mapping[str, Any],
             arrays: Mapping[str, np.ndarray], state_dir: Path, *,
             pool: PoolPieces | None = None, remote=None,
             backend: str = "torch") -> dict[str, float]:
    """Answer this user's queries with each method's saved state; return ``METHOD/STAT``
    additive statistics (:func:`shared.metrics.metric_stats`). ``pool``: where a method that
    reads the piece pool (PER-PCS) takes the pieces its saved recipe names. ``remote``: an
    :class:`edge_client.inference_client.InferenceClient` (with the device's ledger and
    consent): the queries are answered by the cloud's inference service instead.
    ``backend``: how this device answers locally (``torch``, or ``onnx`` / ``onnx-int8`` /
    ``onnx-int4``: ONNX Runtime on the exported graph, :mod:`edge_client.ondevice`)."""
    golds = [q.gold for q in user.queries]
    if not golds or any(g is None for g in golds):
        raise PflError("this device has no held-out queries with gold outputs to evaluate")
    runtime = device_runtime(loaded, task, options, arrays)
    engine = _answer_engine(loaded, backend)
    if engine is not None:
        runtime.cache.answer_engine = engine
    generation = GenerationConfig(max_new_tokens=task.max_new_tokens,
                                  batch_size=int(options.get("batch-size-eval", 8)),
                                  seed=runtime.seed)
    if pool is not None:
        runtime.cache.perpcs_source = pool
    out: dict[str, float] = {"task/kind": float(TASK_KINDS.index(task.kind)),
                             "task/labels": float(len(task.labels or ()))}
    answers: dict[str, list[str]] = {}
    for name in methods:
        try:  # one method's failure leaves the others' statistics standing
            predictions = _answer_method(runtime, task, user, name, state_dir, generation,
                                         pool=pool, remote=remote)
        except _FailedBefore as failed:  # personalization already failed: the same code
            out[f"{name}/{FAILED_METRIC}"] = float(failed.code)
            continue
        except Exception as exc:
            _fail(out, None, name, exc)
            continue
        answers[name] = list(predictions)
        out.update({f"{name}/{key}": value
                    for key, value in metric_stats(task, predictions, golds).items()})
    keep_answers(state_dir, user, answers)
    return out


#: In a device's folder: its queries, their truths and each method's answers (this device's
#: own record; nothing of it leaves the device).
ANSWERS_FILE = "answers.json"


def keep_answers(state_dir: Path | None, user, answers: Mapping[str, Sequence[str]]) -> None:
    """Keep the user's queries, truths and each method's answers in ``state_dir`` (for the
    person who owns the device: ``pfl demo`` shows a few)."""
    if state_dir is None or not answers:
        return
    write_atomic(Path(state_dir) / ANSWERS_FILE, json.dumps({
        "queries": [{"id": q.id, "input": q.input, "gold": q.gold} for q in user.queries],
        "answers": {name: list(values) for name, values in answers.items()}},
        indent=1).encode("utf-8"), private=True)


class _FailedBefore(Exception):
    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def _answer_method(runtime, task, user, name: str, state_dir: Path, generation, *,
                   pool, remote) -> list[str]:
    """One method's answers to this user's queries."""
    spec = parse_method(name)
    core = spec.make_core()
    directory = _state_dir(state_dir, name)
    if (directory / FAILED_FILE).is_file():
        try:
            code = int(json.loads((directory / FAILED_FILE).read_text())["code"])
        except (ValueError, KeyError, TypeError):
            code = FAILED
        raise _FailedBefore(code)
    if core.uses_pool and pool is None:
        raise PoolUnavailable(f"{name} needs the piece pool to rebuild the adapter")
    state = core.load(directory, runtime)
    profile_path = directory / "profile.txt"
    profile = profile_path.read_text() if profile_path.is_file() else None
    prompts = augmented_prompts(runtime, user, spec.augmentation, profile)
    if remote is not None:
        personalization = core.remote_personalization(runtime, state)
        predictions = [remote.answer(prompt, personalization,
                                     max_new_tokens=task.max_new_tokens)
                       for prompt in prompts]
    else:
        predictions = core.answer(runtime, state, prompts, generation)
    return list(predictions)


# ------------------------------------------------------- answering a query (pfl generate)
def answer_query(loaded, task, method: str, prompt: str, *, state_dir: Path | None,
                 arrays: Mapping[str, np.ndarray], options: Mapping[str, Any] | None = None,
                 pool: PoolPieces | None = None, remote=None,
                 max_new_tokens: int | None = None, backend: str = "torch") -> str:
    """One user's greedy answer to ``prompt`` (the whole prompt text) with ``method``'s saved
    state under ``state_dir`` (from the personalize phase), locally or, with ``remote`` (an
    :class:`edge_client.inference_client.InferenceClient` whose interceptors hold the
    device's ledger and consent), by the cloud's inference service.

    Both ways run the same computation: the method's row (:meth:`Core.serving_adapter`) on
    the frozen base model, as the service batches it; so the answers are the same. Locally,
    ``backend`` picks PyTorch or ONNX Runtime (:func:`evaluate`)."""
    spec = parse_method(method)
    if spec.augmentation.retrieval != "none" or spec.augmentation.profile:
        raise PflError(f"{method}: give the core without +rag/+pag; put any retrieved items "
                       "in the prompt itself")
    runtime = device_runtime(loaded, task, options or {}, arrays)
    if pool is not None:
        runtime.cache.perpcs_source = pool
    core = spec.make_core()
    if core.uses_pool and pool is None:
        raise PflError(f"{method} needs the piece pool to read its recipe (--pool)")
    directory = _state_dir(Path(state_dir), spec.name) if state_dir is not None else None
    if directory is not None and (directory / "state.json").is_file():
        state = core.load(directory, runtime)
    elif core.shared_model:  # no per-user state (nonpersonalized, lora-c, perfit-c)
        state = PersonalState()
    else:
        raise PflError(f"no saved state for {method} under {state_dir}: personalize first")
    limit = int(max_new_tokens or task.max_new_tokens)
    if remote is not None:
        return remote.answer(prompt, core.remote_personalization(runtime, state),
                             max_new_tokens=limit)
    row = core.serving_adapter(runtime, state)
    onnx = _answer_engine(loaded, backend)  # kept for the process
    with nullcontext(onnx) if onnx is not None else \
            BatchedEngine(loaded.model, loaded.tokenizer) as engine:
        tokens = engine.generate([encode_prompt(loaded.tokenizer, prompt)], [row],
                                 max_new_tokens=limit)[0]
    return loaded.tokenizer.decode(tokens, skip_special_tokens=True).strip()
