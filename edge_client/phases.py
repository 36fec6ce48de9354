"""What a device does in the federation phases after stage 1 (plain functions, no Flower).

One device holds one user (its partition of the data). The ClientApp
(:mod:`edge_client.client_app`) unpacks each message, calls one function here and packs the
reply; everything in the reply is numbers (metrics) or consented arrays, never text.

- :func:`cluster_report` (sharer selection, DESIGN phase 2): the index of the nearest
  centroid to this user's mean history embedding and the history size. The embedding itself
  is added only when the consent policy allows ``embeddings`` to leave the device.
- :func:`share_pieces` (phase 3): a selected sharer trains its LoRA and gates
  (:func:`edge_client.trainers.train_sharer_pieces`), keeps the pieces its consent policy
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
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from edge_client.cores import augmented_prompts  # importing it registers every core
from edge_client.consent import ConsentPolicy
from shared.errors import PflError
from shared.types import recent_history

log = logging.getLogger(__name__)

#: Methods a federation can run (PEFT retrieval needs sharers' embeddings on the server,
#: which the default consent policy does not give, so it is not among them).
FEDERATED_CORES = ("nonpersonalized", "lora-c", "lora-p", "oppu", "perpcs", "perfit")
_MERGED: dict[str, torch.nn.Module] = {}  # one stage-1 merged model per process


# ------------------------------------------------------------------------- the device
def arrays_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 over names, shapes and bytes: identifies a set of collective arrays."""
    h = hashlib.sha256()
    for key in sorted(arrays):
        value = np.ascontiguousarray(arrays[key], dtype=np.float32)
        h.update(key.encode() + str(value.shape).encode() + value.tobytes())
    return h.hexdigest()


def split_arrays(arrays: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
    """(stage-1 LoRA arrays, PerFit arrays ``stage1.*``/``stage2.*``) of one message."""
    lora = {k[len("lora."):]: v for k, v in arrays.items() if k.startswith("lora.")}
    perfit = {k[len("perfit."):]: v for k, v in arrays.items() if k.startswith("perfit.")}
    return lora, perfit


def stage1_merged(loaded, lora_arrays: Mapping[str, np.ndarray]) -> torch.nn.Module:
    """The base with the collective stage-1 LoRA merged in (memoized per process)."""
    from shared.methods.oppu import merge_lora, stage1_lora

    key = arrays_digest(lora_arrays)
    if key not in _MERGED:
        _MERGED.clear()  # keep one: a worker serves one federation at a time
        state = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in
                 lora_arrays.items()}
        _MERGED[key] = merge_lora(loaded.model, state, stage1_lora())
    return _MERGED[key]


def device_runtime(loaded, task, options: Mapping[str, Any], arrays: Mapping[str, np.ndarray],
                   *, pool: Mapping | None = None):
    """A :class:`~shared.methods.base.Runtime` for this device: the run's options and the
    collective parts the methods need, taken from the server's arrays (and the pool)."""
    from edge_client.client_app import perfit_from_arrays
    from shared.methods.base import Runtime

    method_options = json.loads(str(options.get("method-options") or "{}"))
    runtime = Runtime(loaded=loaded, task=task, seed=int(options.get("seed", 0)),
                      progress=False, options=dict(method_options))
    lora, perfit = split_arrays(arrays)
    if lora:
        runtime.cache["stage1"] = stage1_merged(loaded, lora)
    if perfit:
        runtime.cache["perfit_stage1"] = perfit_from_arrays(perfit, device=loaded.device)
    if pool is not None:
        runtime.cache["perpcs_pool"] = dict(pool)
    return runtime


# ------------------------------------------------------------------ phase 2: selection
def cached_user_embedding(task, user, device_dir: Path | None) -> np.ndarray:
    """The user's MiniLM embedding, kept on the device (``device_dir``) between the k-means
    iterations; the file is named after a digest of the embedded texts, so a changed history
    gets a new one."""
    from shared.embeddings import user_embedding

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
                   device_dir: Path | None = None
                   ) -> tuple[dict[str, float], dict[str, np.ndarray], str]:
    """(metrics, arrays, consent rule) for sharer selection.

    Metrics: ``history-size`` and, given centroids, ``cluster-index`` (nearest by cosine).
    Arrays: ``user-embedding`` (the mean of the history embeddings, one vector) only when
    the policy allows ``embeddings``; per-item embeddings never leave.
    """
    rule = consent.require("cluster_index")
    metrics: dict[str, float] = {"history-size": float(len(user.history))}
    embedding = cached_user_embedding(task, user, device_dir)
    if centroids is not None and len(centroids):
        c = np.asarray(centroids, dtype=np.float32)
        sims = (c @ embedding) / (np.linalg.norm(c, axis=1) * np.linalg.norm(embedding) + 1e-12)
        metrics["cluster-index"] = float(int(np.argmax(sims)))
    arrays: dict[str, np.ndarray] = {}
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
    from edge_client.pool_client import PoolClient
    from edge_client.trainers import train_sharer_pieces
    from shared import crypto
    from shared.serialization import Grant

    rule = consent.require("perpcs_pieces")
    consent.check_model(loaded.num_layers)
    started = time.perf_counter()
    runtime = device_runtime(loaded, task, options, arrays)
    if "stage1" not in runtime.cache:
        raise PflError("sharing needs the stage-1 LoRA arrays (lora.*) in the message")
    grant = Grant.from_text(str(options["pool-grant"])) if options.get("pool-grant") else None
    key = crypto.device_key(key_path)
    public = crypto.public_key_bytes(key)
    pseudonym = sharer_pseudonym(public)
    from edge_client.cores import perpcs_config, personal_train_config  # as pfl eval reads them

    config = perpcs_config(runtime)
    train_config = personal_train_config(runtime)
    user = recent_history(user, runtime.option("max_history", None))
    gated = train_sharer_pieces(runtime.cache["stage1"], loaded.tokenizer, task, user, config,
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
    return metrics, {"sharer-key": np.frombuffer(public, dtype=np.uint8).astype(np.float32)}


def sharer_pseudonym(public_key: bytes) -> str:
    """The pseudonym a sharer's pieces carry: derived from its device's public key."""
    from shared import crypto

    return "sharer-" + crypto.key_fingerprint(public_key)[:16]


def key_from_array(values) -> bytes | None:
    """Inverse of the ``sharer-key`` array (None when it is not 32 byte values)."""
    array = np.asarray(values, dtype=np.float64).ravel()
    if array.size != 32 or not np.all((array >= 0) & (array <= 255) & (array == np.round(array))):
        return None
    return bytes(array.astype(np.uint8).tolist())


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
    if any(len(k) != 32 or sharer_pseudonym(k) != name for name, k in keys.items()):
        raise PflError("pool-sharers names a key that does not match its pseudonym")
    return keys


# ------------------------------------------------------------ phase 4: personalization
def fetch_pool(pool_target: str, pool_ca: str | Path, modules: Sequence[str], *,
               interceptors: Sequence = (), trusted_keys: Mapping[str, bytes] | None = None,
               shapes=None) -> dict:
    """The pool's gated pieces for ``modules`` (every signature and content id verified; with
    ``trusted_keys`` only those sharers', with ``shapes`` only pieces that fit this model), in
    the form the PER-PCS cores read: ``{"pool": [...], "lookup": {id: piece}}``."""
    from edge_client.pool_client import PoolClient

    with PoolClient(pool_target, pool_ca, interceptors=interceptors, trusted_keys=trusted_keys,
                    shapes=shapes) as client:
        gates = client.list_gates(modules=list(modules),
                                  sharers=sorted(trusted_keys or ()))
        pieces = client.fetch_pieces([g.piece_id for g in gates])
    pool = list(pieces.values())
    if not pool:
        raise PflError(f"the piece pool at {pool_target} has no pieces for {list(modules)}")
    return {"pool": pool, "lookup": dict(pieces), "download_bytes": client.received_bytes}


def _state_dir(base: Path, method: str) -> Path:
    return base / "personal" / method.replace("+", "_")


def save_state(method_core: str, state, directory: Path) -> None:
    """Write one method's personal state to the device's disk."""
    from shared.methods.oppu import personal_lora, save_adapter_state

    directory.mkdir(parents=True, exist_ok=True)
    payload = state.payload
    facts = {"params": state.params, "bytes": state.bytes}
    if method_core in ("oppu", "lora-p"):
        save_adapter_state(payload, personal_lora(), directory / "adapter")
    elif method_core == "perpcs":
        (directory / "recipe.pcr").write_bytes(payload.to_compact())
        (directory / "recipe.json").write_text(payload.to_json())
    elif method_core == "perfit":
        np.savez(directory / "stage2.npz", **payload.export_arrays())
    (directory / "state.json").write_text(json.dumps(facts))


def load_state(method_core: str, directory: Path, device="cpu"):
    """Inverse of :func:`save_state`."""
    from shared.methods.base import PersonalState

    facts_path = directory / "state.json"
    if not facts_path.is_file():
        raise PflError(f"no personal state for {method_core} in {directory}: personalize first")
    facts = json.loads(facts_path.read_text())
    payload: Any = None
    if method_core in ("oppu", "lora-p"):
        from shared.methods.oppu import load_adapter_state

        payload, _ = load_adapter_state(directory / "adapter")
    elif method_core == "perpcs":
        from shared.methods.perpcs import Recipe

        payload = Recipe.from_json((directory / "recipe.json").read_text())
    elif method_core == "perfit":
        from shared.methods.perfit import PerFitStage

        with np.load(directory / "stage2.npz") as data:
            payload = PerFitStage.from_arrays({k: data[k] for k in data.files}, device=device)
    return PersonalState(params=facts["params"], bytes=facts["bytes"], payload=payload)


def _profile(loaded, task, user, spec) -> str | None:
    if not spec.augmentation.profile:
        return None
    from shared.profiles import generate_profiles

    return generate_profiles(loaded.model, loaded.tokenizer, task, [user],
                             progress=False).get(user.id)


def personalize(loaded, task, user, methods: Sequence[str], options: Mapping[str, Any],
                arrays: Mapping[str, np.ndarray], state_dir: Path, *,
                pool: Mapping | None = None) -> dict[str, float]:
    """Personalize this user with each method; states go to ``state_dir``. Returns
    ``METHOD/params``, ``METHOD/bytes``, ``METHOD/seconds`` per method."""
    from shared.methods.base import parse_method

    runtime = device_runtime(loaded, task, options, arrays, pool=pool)
    metrics: dict[str, float] = {}
    for name in methods:
        spec = parse_method(name)
        core = spec.make_core()
        t0 = time.perf_counter()
        profile = _profile(loaded, task, user, spec)
        state = core.personalize(runtime, user, spec.augmentation, profile)
        seconds = time.perf_counter() - t0
        if profile:
            state.bytes += len(profile.encode("utf-8"))
        save_state(spec.core, state, _state_dir(state_dir, name))
        if profile is not None:
            (_state_dir(state_dir, name) / "profile.txt").write_text(profile)
        metrics.update({f"{name}/params": float(state.params),
                        f"{name}/bytes": float(state.bytes), f"{name}/seconds": seconds})
    return metrics


# ------------------------------------------------------------------- phase 5: evaluation
def evaluate(loaded, task, user, methods: Sequence[str], options: Mapping[str, Any],
             arrays: Mapping[str, np.ndarray], state_dir: Path, *,
             pool_pieces=None) -> dict[str, float]:
    """Answer this user's queries with each method's saved state; return ``METHOD/STAT``
    additive statistics (:func:`shared.metrics.metric_stats`). ``pool_pieces(ids)`` fetches
    the pieces a PER-PCS recipe names (the target rebuilds its adapter from the pool)."""
    from shared.generation import GenerationConfig
    from shared.methods.base import parse_method
    from shared.metrics import metric_stats

    golds = [q.gold for q in user.queries]
    if not golds or any(g is None for g in golds):
        raise PflError("this device has no held-out queries with gold outputs to evaluate")
    runtime = device_runtime(loaded, task, options, arrays)
    generation = GenerationConfig(max_new_tokens=task.max_new_tokens,
                                  batch_size=int(options.get("batch-size-eval", 8)),
                                  seed=runtime.seed)
    from shared.metrics import TASK_KINDS

    out: dict[str, float] = {"task/kind": float(TASK_KINDS.index(task.kind)),
                             "task/labels": float(len(task.labels or ()))}
    for name in methods:
        spec = parse_method(name)
        directory = _state_dir(state_dir, name)
        state = load_state(spec.core, directory, device=loaded.device)
        if spec.core == "perpcs":
            if pool_pieces is None:
                raise PflError("PER-PCS evaluation needs the pool to rebuild the adapter")
            lookup = pool_pieces(sorted(state.payload.piece_ids()))
            runtime.cache["perpcs_pool"] = {"pool": list(lookup.values()), "lookup": lookup}
        profile_path = directory / "profile.txt"
        profile = profile_path.read_text() if profile_path.is_file() else None
        prompts = augmented_prompts(runtime, user, spec.augmentation, profile)
        predictions = spec.make_core().answer(runtime, state, prompts, generation)
        for key, value in metric_stats(task, predictions, golds).items():
            out[f"{name}/{key}"] = value
    return out
