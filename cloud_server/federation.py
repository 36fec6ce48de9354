"""One whole federation run over the Flower Grid: every phase of DESIGN.md, orchestration only.

:func:`run_federation` is the ServerApp's main (:func:`make_federation_app`). Phases:

1. **Roles.** The connected nodes (one user each) are shuffled with ``seed``; the first
   ``targets`` are targets, the rest candidates for sharers and the collective. An operator
   may fix the roles instead: ``target-nodes`` / ``sharer-nodes`` (comma-separated node ids;
   given sharers skip the selection phase).
2. **Sharer selection** (when PER-PCS runs): federated k-means. The server sends centroids
   (``query.select``); each device answers with the index of its nearest centroid and its
   history size, plus its mean embedding only if its consent policy lets embeddings leave.
   Centroids move to the mean of the consenting members (a cluster with none keeps its
   centroid); the first centroids are seeded random directions in the embedding space. The
   most active member of each cluster with more than ``small-cluster-items`` items becomes a
   sharer (:func:`shared.methods.perpcs.select_sharers_from_clusters`); ``selection =
   "most-active"`` uses history sizes only. With ``selection-sample = M`` only a seeded
   sample of M candidates is asked (a population of thousands). Selection runs *before* stage 1 so that the
   collective can exclude sharers (METHODS.md: stage 1 uses users who are neither).
3. **Collective stage 1** over the collective nodes: FedAvg of the task LoRA and/or of PerFit
   stage 1 (:func:`cloud_server.server_app.run_stage1`, on a :class:`NodeSubset` of the Grid);
   ``sample-per-round`` (or ``fraction-train``) sets how many train in each round.
4. **Sharing** (``train.share``): the sharers train LoRA + gates and submit their consented
   pieces to the pool service themselves; the server only gets counts back.
5. **Personalization** (``train.personalize``) of every target with every method, on the
   device; replies are costs (parameters, bytes, seconds).
6. **Evaluation** (``evaluate``) on the device; replies are additive metric statistics, which
   the server sums into the results table (:func:`shared.metrics.metrics_from_stats`).

The training recipe (``recipe``: ``tuned``, ``paper`` or a file; :mod:`shared.recipes`) is
resolved once for the run's model and task and laid under ``method-options``, which the
devices receive with every phase message; stage 1's ``lr`` (and epochs) come from it unless
the run config sets them.

A node that fails or does not answer in a phase is logged and left out; the phase goes on
with the others. Everything lands in ``run-dir``: ``federation.json`` (the results), the
stage-1 folders and, in simulation, the devices' folders and ledgers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from shared.errors import PflError
from shared.metrics import TASK_KINDS
from shared.models import canonical_name
from shared.recipes import over_recipe, resolve_recipe
from shared.tasks import canonical_task_name

log = logging.getLogger("flwr.pfl.federation")

DEFAULTS: dict[str, Any] = {
    "methods": "nonpersonalized,oppu,perpcs,perfit", "targets": 2, "sharers": 2,
    "collective": 0, "rounds": 1, "fraction-train": 1.0, "selection": "kmeans",
    "kmeans-iterations": 3, "small-cluster-items": 0, "model": "tiny", "task": "synthetic",
    "seed": 0, "run-dir": "runs/federation", "num-clients": 0, "phase-timeout": 3600.0,
    "wait-for-nodes": 120.0, "method-options": "{}", "selection-sample": 0,
    "sample-per-round": 0, "target-nodes": "", "sharer-nodes": "", "recipe": "tuned",
}
#: Run-config keys sent to devices with every phase message.
#: Run settings the server sends to devices. A device's own settings (its consent policy, the
#: pool CA it trusts, its ledger and folders) are not among them: they come from the device.
DEVICE_KEYS = ("model", "task", "data-path", "seed", "method-options", "device",
               "pool-address", "batch-size-eval")
NEEDS_LORA = {"lora-c", "oppu", "perpcs"}
EMBEDDING_DIM = 384  # all-MiniLM-L6-v2


class NodeSubset(Grid):
    """A view of a Grid that shows only some node ids (so a strategy samples among them)."""

    def __init__(self, grid: Grid, node_ids: Iterable[int]):
        self._grid = grid
        self._ids = [int(n) for n in node_ids]

    def get_node_ids(self) -> Iterable[int]:
        return list(self._ids)

    def get_nodes(self):
        return [n for n in self._grid.get_nodes() if getattr(n, "node_id", None) in self._ids]

    def create_message(self, *args, **kwargs) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def push_messages(self, messages):
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids):
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages, *, timeout=None):
        return self._grid.send_and_receive(messages, timeout=timeout)

    def set_run(self, run) -> None:
        self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run


# ------------------------------------------------------------------------- helpers
def resolve(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """DEFAULTS overlaid with ``run_config``, checked."""
    from shared.methods.base import parse_method

    config = {**DEFAULTS, **dict(run_config)}
    methods = [m for m in str(config["methods"]).split(",") if m]
    if not methods:
        raise PflError("no methods to run")
    from edge_client.phases import FEDERATED_CORES

    for name in methods:
        core = parse_method(name).core
        if core not in FEDERATED_CORES:
            raise PflError(f"method {name!r} cannot run in the federation (known cores: "
                           f"{', '.join(FEDERATED_CORES)})")
    config["methods"] = ",".join(methods)
    if int(config["targets"]) < 1:
        raise PflError("need at least one target")
    if config["selection"] not in ("kmeans", "most-active"):
        raise PflError(f"selection must be kmeans or most-active, got {config['selection']!r}")
    # the training recipe (shared.recipes) under the run's own method options
    try:
        method_options = json.loads(str(config["method-options"] or "{}"))
    except json.JSONDecodeError as exc:
        raise PflError(f"method-options is not JSON: {exc}") from None
    config["recipe-name"], recipe = resolve_recipe(str(config["recipe"]),
                                              canonical_name(str(config["model"])),
                                              canonical_task_name(str(config["task"])))
    config["method-options"] = json.dumps(over_recipe(recipe, method_options))
    return config


def _cores(config) -> set[str]:
    from shared.methods.base import parse_method

    return {parse_method(m).core for m in config["methods"].split(",")}


def wait_for_nodes(grid: Grid, wanted: int, timeout: float) -> list[int]:
    """The connected node ids, after waiting (bounded) until ``wanted`` are there."""
    deadline = time.monotonic() + timeout
    while True:
        ids = sorted(int(n) for n in grid.get_node_ids())
        if len(ids) >= wanted or time.monotonic() >= deadline:
            if len(ids) < wanted:
                log.warning("only %d of %d nodes connected after %.0f s; going on", len(ids),
                            wanted, timeout)
            return ids
        time.sleep(1.0)


def exchange(grid: Grid, node_ids: Sequence[int], message_type: str, config: Mapping,
             arrays: Mapping[str, np.ndarray] | None, timeout: float, phase: str, *,
             per_node: Mapping[int, Mapping] | None = None) -> dict[int, Message]:
    """Send one message per node, wait for the replies; return the good ones by node.
    ``per_node[node]`` adds settings for that node only (e.g. its sharer grant).
    Error replies and missing nodes are logged and left out."""
    record = None
    if arrays:
        record = ArrayRecord({k: Array(np.ascontiguousarray(v, np.float32))
                              for k, v in arrays.items()})

    def content(node: int) -> RecordDict:
        settings = {**config, **((per_node or {}).get(node) or {})}
        out = RecordDict({"config": ConfigRecord({k: v for k, v in settings.items()
                                                  if v not in (None, "")})})
        if record is not None:
            out["arrays"] = record
        return out

    messages = [grid.create_message(content(node), message_type, node, group_id=phase)
                for node in node_ids]
    log.info("%s: sending %s to %d device(s) ...", phase, message_type, len(messages))
    started = time.perf_counter()
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    good: dict[int, Message] = {}
    for reply in replies:
        node = int(reply.metadata.src_node_id)
        if reply.has_error():
            log.warning("%s: node %s failed: %s", phase, node, reply.error.reason)
        else:
            good[node] = reply
    missing = set(node_ids) - {int(r.metadata.src_node_id) for r in replies}
    if missing:
        log.warning("%s: %d node(s) did not answer: %s", phase, len(missing), sorted(missing))
    log.info("%s: %d of %d device(s) answered in %.1f s", phase, len(good), len(node_ids),
             time.perf_counter() - started)
    return good


def mint_grants(config: Mapping[str, Any], sharers: Sequence[int]) -> dict[int, str]:
    """{sharer node: its grant} signed with the federation key (run config ``grant-key``):
    what lets a selected sharer, and no one else, submit to the pool. Each grant allows one
    piece per layer and module of the model. {} without a grant key (an open pool)."""
    from shared import crypto
    from shared.serialization import Grant, ModelShapes

    if not config.get("grant-key") or not sharers:
        if sharers:
            log.warning("no grant-key in the run config: sharers submit without grants "
                        "(only an open-enrolment pool takes that)")
        return {}
    key = crypto.load_device_key(str(config["grant-key"]))
    shapes = ModelShapes.of(str(config["model"]))
    allowed = shapes.num_layers * len(shapes.modules)
    run = "run-" + hashlib.sha256(str(config["run-dir"]).encode()).hexdigest()[:16]
    return {int(n): Grant.mint(key, run, allowed,
                               ttl_seconds=float(config["phase-timeout"]) * 2).to_text()
            for n in sharers}


def sharer_keys(replies: Mapping[int, Message]) -> dict[str, str]:
    """{pseudonym: hex public key} of the sharers that reported their key after sharing."""
    from edge_client.phases import key_from_array, sharer_pseudonym

    out = {}
    for node, reply in replies.items():
        arrays = reply.content.array_records.get("arrays")
        if arrays is None or "sharer-key" not in arrays:
            continue
        key = key_from_array(arrays["sharer-key"].numpy())
        if key is None:
            log.warning("share: node %s sent a malformed sharer key; its pieces are not used",
                        node)
            continue
        out[sharer_pseudonym(key)] = key.hex()
    return out


def _metrics(reply: Message) -> dict[str, float]:
    return dict(reply.content["metrics"]) if "metrics" in reply.content.metric_records else {}


# ------------------------------------------------------------------ phase 2: selection
def select_sharers(grid: Grid, candidates: Sequence[int], config: Mapping, device_config: Mapping
                   ) -> dict[str, Any]:
    """Federated k-means (or most-active) over the candidates; returns the chosen node ids
    and what was learnt (cluster sizes, consenting embeddings)."""
    from shared.methods.perpcs import select_sharers_from_clusters

    wanted = int(config["sharers"])
    timeout = float(config["phase-timeout"])
    if wanted <= 0 or not candidates:
        return {"sharers": [], "strategy": config["selection"]}
    rng = np.random.default_rng(int(config["seed"]))
    k = min(wanted, len(candidates))
    centroids = rng.standard_normal((k, EMBEDDING_DIM)).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    iterations = int(config["kmeans-iterations"]) if config["selection"] == "kmeans" else 1
    sizes: dict[int, int] = {}
    clusters: dict[int, int] = {}
    consenting = 0
    for it in range(max(1, iterations)):
        arrays = {"centroids": centroids} if config["selection"] == "kmeans" else None
        replies = exchange(grid, candidates, "query.select", device_config, arrays, timeout,
                           f"select-{it}")
        embeddings: dict[int, list[np.ndarray]] = {}
        for node, reply in replies.items():
            metrics = _metrics(reply)
            sizes[node] = int(metrics.get("history-size", 0))
            if "cluster-index" in metrics:
                clusters[node] = int(metrics["cluster-index"])
                if "arrays" in reply.content.array_records and \
                        "user-embedding" in reply.content["arrays"]:
                    embeddings.setdefault(clusters[node], []).append(
                        reply.content["arrays"]["user-embedding"].numpy())
        consenting = sum(len(v) for v in embeddings.values())
        for cluster, members in embeddings.items():
            mean = np.mean(members, axis=0)
            centroids[cluster] = mean / (np.linalg.norm(mean) + 1e-12)
    small = int(config["small-cluster-items"])
    if config["selection"] == "kmeans" and clusters:
        nodes = sorted(clusters)
        chosen = select_sharers_from_clusters([str(n) for n in nodes],
                                              [clusters[n] for n in nodes],
                                              [sizes[n] for n in nodes],
                                              small_cluster_items=small)
        sharers = [int(n) for n in chosen]
    else:
        sharers = []
    # Fill up (empty clusters, or most-active) with the most active remaining candidates.
    for node in sorted(sizes, key=lambda n: (-sizes[n], n)):
        if len(sharers) >= wanted:
            break
        if node not in sharers and sizes[node] > small:
            sharers.append(node)
    log.info("sharer selection (%s): %d sharers from %d candidates (%d consented to share "
             "their embedding)", config["selection"], len(sharers), len(candidates), consenting)
    return {"sharers": sharers[:wanted], "strategy": config["selection"],
            "cluster_sizes": np.bincount(list(clusters.values()), minlength=k).tolist()
            if clusters else [], "embeddings_received": consenting}


def _given_nodes(config: Mapping, key: str, nodes: Sequence[int]) -> list[int]:
    """Node ids an operator fixed for a role (``"7,12"``); they must be connected."""
    text = str(config.get(key) or "").strip()
    if not text:
        return []
    try:
        given = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise PflError(f"{key} must be comma-separated node ids, got {text!r}") from None
    unknown = sorted(set(given) - set(nodes))
    if unknown:
        raise PflError(f"{key}: node(s) {unknown} are not connected")
    return given


def _task_of(replies: Mapping[int, Message], name: str):
    """What the server needs of the task to finish the metrics: its kind and label count,
    as the devices reported them (the server holds no data)."""
    from types import SimpleNamespace

    kinds = {int(_metrics(r).get("task/kind", -1)) for r in replies.values()}
    labels = {int(_metrics(r).get("task/labels", 0)) for r in replies.values()}
    if len(kinds) > 1 or len(labels) > 1:
        raise PflError(f"targets disagree on the task: kinds {kinds}, label counts {labels}")
    kind = TASK_KINDS[kinds.pop()] if kinds and -1 not in kinds else "generation"
    return SimpleNamespace(name=name, kind=kind, labels=list(range(labels.pop() if labels else 0)))


# ----------------------------------------------------------------------- the run
def run_federation(grid: Grid, run_config: Mapping[str, Any]) -> dict[str, Any]:
    """Run every phase; write and return ``federation.json``'s content."""
    from cloud_server.server_app import run_stage1
    from shared.metrics import add_stats, check_stats, metrics_from_stats

    config = resolve(run_config)
    started = time.perf_counter()
    run_dir = Path(str(config["run-dir"])).expanduser().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    config["run-dir"] = str(run_dir)
    timeout = float(config["phase-timeout"])
    cores = _cores(config)
    methods = config["methods"].split(",")
    device_config = {k: config[k] for k in DEVICE_KEYS if k in config}
    phase_seconds: dict[str, float] = {}

    nodes = wait_for_nodes(grid, int(config["num-clients"]), float(config["wait-for-nodes"]))
    given_targets = _given_nodes(config, "target-nodes", nodes)
    given_sharers = _given_nodes(config, "sharer-nodes", nodes)
    if given_targets:
        targets = sorted(given_targets)
    else:
        order = [n for n in nodes if n not in given_sharers]
        random.Random(int(config["seed"])).shuffle(order)
        targets = sorted(order[: int(config["targets"])])
    candidates = [n for n in nodes if n not in targets]
    log.info("federation: %d nodes, %d targets, methods %s", len(nodes), len(targets), methods)

    t0 = time.perf_counter()
    asked = candidates
    if 0 < int(config["selection-sample"]) < len(candidates):  # a large population: a sample
        asked = sorted(random.Random(int(config["seed"]) + 1).sample(
            candidates, int(config["selection-sample"])))
    if "perpcs" not in cores:
        selection = {"sharers": []}
    elif given_sharers:
        selection = {"sharers": [n for n in given_sharers if n not in targets],
                     "strategy": "given"}
    else:
        selection = select_sharers(grid, asked, config, device_config)
    phase_seconds["selection"] = time.perf_counter() - t0
    sharers = selection["sharers"]
    collective = [n for n in candidates if n not in sharers]
    if int(config["collective"]) > 0:
        collective = collective[: int(config["collective"])]

    arrays: dict[str, np.ndarray] = {}
    stage1: dict[str, Any] = {}
    for kind, needed in (("lora", cores & NEEDS_LORA), ("perfit", cores & {"perfit"})):
        if not needed:
            continue
        if not collective:
            raise PflError(f"stage 1 ({kind}) needs collective nodes: none are left")
        t0 = time.perf_counter()
        method_options = json.loads(str(config["method-options"] or "{}"))
        stage_config = {**{k: v for k, v in config.items() if k not in ("methods",)},
                        "method": kind, "output-dir": str(run_dir / f"stage1-{kind}"),
                        "num-clients": len(collective)}
        recipe = method_options.get("stage1" if kind == "lora" else "perfit") or {}
        for key, value in (("max-history", method_options.get("max_history")),
                           ("local-epochs", (recipe.get("epochs") if kind == "lora" else None)
                            or method_options.get("stage1_epochs")),
                           ("lr", recipe.get("lr"))):
            if key not in config and value is not None:
                stage_config[key] = value
        summary = run_stage1(NodeSubset(grid, collective), stage_config)
        with np.load(summary["final_arrays"]) as data:
            arrays.update({f"{kind}.{k}": data[k] for k in data.files})
        stage1[kind] = {k: summary[k] for k in ("rounds", "train_loss", "replies", "params",
                                                "bytes_per_update")}
        phase_seconds[f"stage1-{kind}"] = time.perf_counter() - t0

    lora_only = {k: v for k, v in arrays.items() if k.startswith("lora.")}
    shared: dict[str, Any] = {}
    pool_sharers: dict[str, str] = {}
    if "perpcs" in cores:
        t0 = time.perf_counter()
        grants = mint_grants(config, sharers)
        replies = exchange(grid, sharers, "train.share", device_config, lora_only, timeout,
                           "share", per_node={n: {"pool-grant": g} for n, g in grants.items()})
        shared = {str(n): _metrics(r) for n, r in replies.items()}
        pool_sharers = sharer_keys(replies)
        phase_seconds["share"] = time.perf_counter() - t0
        if not any(m.get("pieces-submitted", 0) for m in shared.values()):
            log.warning("no sharer submitted pieces: PER-PCS has an empty pool")

    t0 = time.perf_counter()
    personal_config = {**device_config, "methods": config["methods"]}
    if "perpcs" in cores and pool_sharers:  # targets take pieces from these sharers only
        personal_config["pool-sharers"] = json.dumps(pool_sharers, sort_keys=True)
    personalized = exchange(grid, targets, "train.personalize", personal_config, arrays,
                            timeout, "personalize")
    phase_seconds["personalize"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    evaluated = exchange(grid, sorted(personalized), "evaluate", personal_config, arrays,
                         timeout, "evaluate")
    phase_seconds["evaluate"] = time.perf_counter() - t0

    task = _task_of(evaluated, str(config["task"]))
    results: dict[str, Any] = {}
    for name in methods:
        stats: dict[str, float] = {}
        costs = {"params": [], "bytes": [], "seconds": []}
        users = 0
        for node, reply in evaluated.items():
            metrics = _metrics(reply)
            user_stats = {k.split("/", 1)[1]: v for k, v in metrics.items()
                          if k.startswith(name + "/")}
            problem = check_stats(task, user_stats)
            if problem is not None:  # a broken or hostile device: its answer is left out
                log.warning("evaluate: node %s's %s statistics are left out: %s", node, name,
                            problem)
                continue
            add_stats(stats, user_stats)
            users += 1
            personal = _metrics(personalized[node])
            for cost in costs:
                value = personal.get(f"{name}/{cost}", 0.0)
                finite = isinstance(value, (int, float)) and math.isfinite(value) and value >= 0
                costs[cost].append(float(value) if finite else 0.0)
        if not stats:
            results[name] = {"error": "no target evaluated this method"}
            continue
        n = max(1, len(costs["params"]))
        results[name] = {"metrics": metrics_from_stats(task, stats), "users": users,
                         "queries": int(stats.get("n", 0)),
                         "params_per_user": sum(costs["params"]) / n,
                         "bytes_per_user": sum(costs["bytes"]) / n,
                         "seconds_per_user": sum(costs["seconds"]) / n}
    summary = {"task": str(config["task"]), "model": str(config["model"]), "seed": int(config["seed"]),
               "recipe": {"name": config["recipe-name"],
                          "options": json.loads(config["method-options"])},
               "nodes": len(nodes), "targets": targets, "sharers": sharers,
               "collective": collective, "selection": selection, "stage1": stage1,
               "shared": shared, "methods": results, "phase_seconds": phase_seconds,
               "evaluated_targets": sorted(evaluated), "seconds": time.perf_counter() - started}
    (run_dir / "federation.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    return summary


def format_results(summary: Mapping[str, Any]) -> str:
    """The federation's results: a title line, then the same table as ``pfl eval``'s."""
    from simulations.report import methods_table

    head = (f"federation: task {summary['task']} | model {summary['model']} | "
            f"{summary['nodes']} nodes, {len(summary['evaluated_targets'])} targets evaluated, "
            f"{len(summary['sharers'])} sharers, {len(summary['collective'])} collective")
    return head + "\n" + methods_table(dict(summary["methods"]))


def make_federation_app(overrides: Mapping[str, Any] | None = None, *,
                        print_results: bool = True) -> ServerApp:
    """A ServerApp running :func:`run_federation` (DEFAULTS < run config < ``overrides``);
    it prints the results table at the end unless ``print_results`` is false (a caller
    that prints its own, like ``pfl simulate``)."""
    server_app = ServerApp()
    fixed = dict(overrides or {})

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        summary = run_federation(grid, {**dict(context.run_config), **fixed})
        if print_results:
            print(format_results(summary), flush=True)

    return server_app


#: ``flwr run`` / SuperLink entry point (pyproject: [tool.flwr.app.components] serverapp).
app = make_federation_app()
