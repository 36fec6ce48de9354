"""One whole federation run over the Flower Grid: every phase, orchestration only.

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
   collective can exclude sharers (the papers' stage 1 uses users who are neither).
3. **Collective stage 1** over the collective nodes: FedAvg of the task LoRA and/or of PerFit
   stage 1 (:func:`cloud_server.server_app.run_stage1`, on a :class:`NodeSubset` of the Grid);
   ``sample-per-round`` (or ``fraction-train``) sets how many train in each round.
4. **Sharing** (``train.share``): the sharers train LoRA + gates and submit their consented
   pieces to the pool service themselves; the server only gets counts back.
5. **Personalization** (``train.personalize``) of every target with every method, on the
   device; replies are costs (parameters, bytes, seconds).
6. **Evaluation** (``evaluate``) on the device; replies are additive metric statistics, which
   the server sums into the results table (:func:`shared.metrics.metrics_from_stats`).

The run config is parsed once (:class:`shared.config.RunConfig`: typed, one set of defaults,
an unknown key is an error). The training recipe (``recipe``: ``tuned``, ``paper`` or a file;
:mod:`shared.recipes`) is resolved once for the run's model and task, the run's dotted method
settings (``oppu.lr`` ...) laid over it, and the devices receive the result with every phase
message (``options.*`` entries); stage 1's ``lr`` (and epochs) come from it unless the run
config sets them.

A node that fails or does not answer in a phase is logged and left out; the phase goes on
with the others. Everything lands in ``run-dir``: ``federation.json`` (the results), the
stage-1 folders and, in simulation, the devices' folders and ledgers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from cloud_server.server_app import run_stage1
from shared import crypto
from shared.config import ARRAYS_DIGEST_KEY, KEPT_METRIC, RunConfig, options_to_message
from shared.errors import DEVICE_ERRORS, FAILED, FAILED_METRIC, PflError
from shared.files import save_npz, write_json
from shared.methods import core_class, core_names, parse_method
from shared.methods.store import arrays_digest
from shared.methods.perpcs import select_sharers_from_clusters
from shared.metrics import TASK_KINDS, add_stats, check_stats, metrics_from_stats
from shared.statistics import users_interval
from shared.models import canonical_name
from shared.recipes import over_recipe, resolve_recipe
from shared.records import to_array_record
from shared.report import methods_table
from shared.serialization import Grant, ModelShapes
from shared.tasks import canonical_task_name

log = logging.getLogger("flwr.pfl.federation")

#: Run settings the server sends to devices. A device's own settings (its consent policy, the
#: pool CA it trusts, its ledger and folders) are not among them: they come from the device.
DEVICE_KEYS = ("model", "task", "data-path", "seed", "device", "pool-address",
               "batch-size-eval")
EMBEDDING_DIM = 384  # all-MiniLM-L6-v2
#: Where a run says what it is doing (:class:`Status`), in its run folder.
STATUS_FILE = "status.json"
#: In the run folder: every collective part the run trained (``lora.*``, ``perfit.*``).
GLOBAL_ARRAYS = "global_arrays.npz"
#: In the run folder: the results (:func:`write_summary`).
SUMMARY_FILE = "federation.json"


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

    @property
    def synchronous(self) -> bool:
        """Whether the grid delivers every message and reply at once (in process)."""
        return bool(getattr(self._grid, "synchronous", False))

    def set_run(self, run) -> None:
        self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run


# ------------------------------------------------------------------------- helpers
@dataclass(frozen=True)
class Plan:
    """A run, parsed and checked: the typed run config, the training recipe's name and the
    method options every device gets (the recipe with the run's settings on top)."""

    config: RunConfig
    recipe: str
    options: dict

    @property
    def methods(self) -> list[str]:
        return self.config.methods.split(",")

    @property
    def cores(self) -> set[str]:
        return {parse_method(m).core for m in self.methods}

    def device_config(self) -> dict[str, Any]:
        """What every phase message tells a device: the run settings in
        :data:`DEVICE_KEYS` and the method options (``options.*``)."""
        return {**{k: self.config[k] for k in DEVICE_KEYS},
                **options_to_message(self.options)}


def resolve(run_config: Mapping[str, Any]) -> Plan:
    """The run config parsed (:meth:`RunConfig.parse`), its methods checked, its recipe
    resolved."""
    config = RunConfig.parse(run_config)
    methods = [m for m in config.methods.split(",") if m]
    if not methods:
        raise PflError("no methods to run")
    federated = [c for c in core_names() if core_class(c).federated]
    for name in methods:
        if not core_class(parse_method(name).core).federated:
            raise PflError(f"method {name!r} cannot run in the federation (known cores: "
                           f"{', '.join(federated)})")
    name, recipe = resolve_recipe(config.recipe, canonical_name(config.model),
                                  canonical_task_name(config.task))
    return Plan(config.replace(methods=",".join(methods)), name,
                over_recipe(recipe, config.method_settings()))


def collective_kinds_needed(cores) -> list[str]:
    """The kinds of collective parameters (stage 1) the cores build on, in a fixed order."""
    return sorted({kind for core in cores for kind in core_class(core).collective})


def pool_needed(cores) -> bool:
    """Whether one of the cores reads the PER-PCS piece pool (sharers must share first)."""
    return any(core_class(core).uses_pool for core in cores)


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


@dataclass
class Status:
    """Where a run stands, for people watching it: the phase, how many devices answered it
    and how many failed, and each device's role. Written to ``RUN_DIR/status.json`` (what
    ``pfl deploy status`` reads) on every change (at most once per poll of the grid)."""

    path: Path | None = None
    state: dict[str, Any] = field(default_factory=dict)

    def update(self, **fields: Any) -> None:
        self.state.update(fields, updated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        if self.path is not None:
            write_json(self.path, self.state)


#: How often (seconds) a phase that is still waiting logs its progress.
PROGRESS_EVERY = 30.0


def exchange(grid: Grid, node_ids: Sequence[int], message_type: str, config: Mapping,
             arrays: Mapping[str, np.ndarray] | None, timeout: float, phase: str, *,
             per_node: Mapping[int, Mapping] | None = None,
             holding: Iterable[int] = (), status: Status | None = None,
             role: str = "device") -> dict[int, Message]:
    """Send one message per node, wait for the replies; return the good ones by node.
    ``per_node[node]`` adds settings for that node only (e.g. its sharer grant); nodes in
    ``holding`` already keep ``arrays`` (by their digest, :data:`ARRAYS_DIGEST_KEY`) and
    get the digest only; ``role`` names them in the log (with their node ids). Error
    replies and missing nodes are logged and left out. While it
    waits, a progress line (done/total, failures) goes to the log every
    :data:`PROGRESS_EVERY` seconds and to ``status`` on every change."""
    record = to_array_record(arrays) if arrays else None
    holding = set(holding)

    def content(node: int) -> RecordDict:
        settings = {**config, **((per_node or {}).get(node) or {})}
        out = RecordDict({"config": ConfigRecord({k: v for k, v in settings.items()
                                                  if v not in (None, "")})})
        if record is not None and node not in holding:
            out["arrays"] = record
        return out

    messages = [Message(content(node), dst_node_id=node, message_type=message_type,
                        group_id=phase) for node in node_ids]
    log.info("%s: sending %s to %d %s(s) %s ...", phase, message_type, len(messages), role,
             _some(node_ids))
    started = time.perf_counter()
    replies = _collect(grid, messages, timeout, phase, status)
    good = good_replies(replies, node_ids, phase)
    log.info("%s: %d of %d device(s) answered in %.1f s (%d failed, %d silent)", phase,
             len(good), len(node_ids), time.perf_counter() - started,
             len(replies) - len(good), len(node_ids) - len(replies))
    return good


def _collect(grid: Grid, messages: Sequence[Message], timeout: float, phase: str,
             status: Status | None) -> list[Message]:
    """Push ``messages`` and pull their replies until all came or ``timeout`` ran out (as
    Flower's ``Grid.send_and_receive``), reporting progress as replies arrive."""
    total = len(messages)
    if getattr(grid, "synchronous", False):  # an in-process grid: what comes is there at once
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        if status is not None:
            status.update(phase=phase, done=len(replies), total=total,
                          failed=sum(1 for r in replies if r.has_error()))
        return replies
    waiting = set(grid.push_messages(messages))
    replies: list[Message] = []
    failed = 0
    started = last_log = time.monotonic()
    if status is not None:
        status.update(phase=phase, done=0, failed=0, total=total)
    while waiting:
        arrived = list(grid.pull_messages(list(waiting)))
        waiting.difference_update(r.metadata.reply_to_message_id for r in arrived)
        replies += arrived
        failed += sum(1 for r in arrived if r.has_error())
        now = time.monotonic()
        if arrived and status is not None:
            status.update(done=len(replies), failed=failed)
        if not waiting or now - started >= timeout:
            break
        if now - last_log >= PROGRESS_EVERY:
            log.info("%s: %d/%d done, %d failed, %.0f s", phase, len(replies), total, failed,
                     now - started)
            last_log = now
        time.sleep(min(1.0, max(0.05, (now - started) / 10)))
    return replies


def good_replies(replies: Iterable[Message], node_ids: Sequence[int], phase: str
                 ) -> dict[int, Message]:
    """{node: reply} of the replies that are not errors; errors and silent nodes logged."""
    replies = list(replies)
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
    return good


def mint_grants(config: Mapping[str, Any], sharers: Sequence[int],
                keys: Mapping[int, bytes] | None = None) -> dict[int, str]:
    """{sharer node: its grant} signed with the federation key (run config ``grant-key``):
    what lets a selected sharer, and no one else, submit to the pool. Each grant allows one
    piece per layer and module of the model, for this run, and is bound to the device key
    the sharer reported at selection (``keys``; a given sharer, never asked, gets a grant
    the pool binds to the first key that uses it). {} without a grant key (an open pool)."""
    if not config.get("grant-key") or not sharers:
        if sharers:
            log.warning("no grant-key in the run config: sharers submit without grants "
                        "(only an open-enrolment pool takes that)")
        return {}
    key = crypto.load_device_key(str(config["grant-key"]))
    shapes = ModelShapes.of(str(config["model"]))
    allowed = shapes.num_layers * len(shapes.modules)
    run = grant_run(config)
    keys = keys or {}
    return {int(n): Grant.mint(key, run, allowed,
                               ttl_seconds=float(config["phase-timeout"]) * 2,
                               public_key=keys.get(int(n), b"")).to_text()
            for n in sharers}


def grant_run(config: Mapping[str, Any]) -> str:
    """The run name this run's grants carry ("" without a grant key: an open pool, no
    grants): the pool lists this run's targets only the pieces submitted under them."""
    if not config.get("grant-key"):
        return ""
    return "run-" + hashlib.sha256(str(config["run-dir"]).encode()).hexdigest()[:16]


def reported_key(reply: Message) -> bytes | None:
    """The device key a reply carries (``arrays["sharer-key"]``), None when it has none or
    a malformed one."""
    arrays = reply.content.array_records.get("arrays")
    if arrays is None or "sharer-key" not in arrays:
        return None
    return crypto.key_from_array(arrays["sharer-key"].numpy())


def sharer_keys(replies: Mapping[int, Message],
                expected: Mapping[int, bytes] | None = None) -> dict[str, str]:
    """{pseudonym: hex public key} of the sharers that reported their key after sharing;
    with ``expected`` (the keys reported at selection, which their grants are bound to), a
    sharer reporting another key is left out."""
    out = {}
    for node, reply in replies.items():
        key = reported_key(reply)
        if key is None:
            log.warning("share: node %s sent no or a malformed sharer key; its pieces are "
                        "not used", node)
            continue
        if expected and node in expected and expected[node] != key:
            log.warning("share: node %s reports another key than at selection; its pieces "
                        "are not used", node)
            continue
        out[crypto.sharer_pseudonym(key)] = key.hex()
    return out


def _metrics(reply: Message) -> dict[str, float]:
    return dict(reply.content["metrics"]) if "metrics" in reply.content.metric_records else {}


# ------------------------------------------------------------------ phase 2: selection
def kmeans_round(grid: Grid, candidates: Sequence[int], centroids: np.ndarray | None,
                 device_config: Mapping, timeout: float, phase: str,
                 sizes: dict[int, int], clusters: dict[int, int], willing: set[int],
                 status: Status | None = None, keys: dict[int, bytes] | None = None) -> int:
    """One round of federated k-means: every candidate reports its nearest centroid, its
    history size and whether its consent lets it share pieces, with its device key when it
    does (``sizes``, ``clusters``, ``willing``, ``keys`` are updated); each centroid moves to
    the mean of its consenting members' embeddings (in place). Returns how many embeddings
    came."""
    arrays = {"centroids": centroids} if centroids is not None else None
    replies = exchange(grid, candidates, "query.select", device_config, arrays, timeout, phase,
                       status=status, role="candidate")
    embeddings: dict[int, list[np.ndarray]] = {}
    for node, reply in replies.items():
        metrics = _metrics(reply)
        sizes[node] = int(metrics.get("history-size", 0))
        key = reported_key(reply)
        if metrics.get("may-share") == 1.0 and key is not None:
            willing.add(node)
            if keys is not None:
                keys[node] = key
        else:
            willing.discard(node)
        if "cluster-index" not in metrics:
            continue
        clusters[node] = int(metrics["cluster-index"])
        if "arrays" in reply.content.array_records and \
                "user-embedding" in reply.content["arrays"]:
            embeddings.setdefault(clusters[node], []).append(
                reply.content["arrays"]["user-embedding"].numpy())
    for cluster, members in embeddings.items():
        if centroids is not None:
            mean = np.mean(members, axis=0)
            centroids[cluster] = mean / (np.linalg.norm(mean) + 1e-12)
    return sum(len(v) for v in embeddings.values())


def pick_sharers(wanted: int, sizes: Mapping[int, int], clusters: Mapping[int, int],
                 small: int, willing: Iterable[int] | None = None) -> list[int]:
    """The most active member of each cluster with more than ``small`` items, then (empty
    clusters, or no clusters: most-active) the most active remaining candidates. With
    ``willing``, only those nodes (whose consent lets them share pieces) are picked."""
    if willing is not None:
        willing = set(willing)
        sizes = {n: v for n, v in sizes.items() if n in willing}
        clusters = {n: v for n, v in clusters.items() if n in willing}
    sharers: list[int] = []
    if clusters:
        nodes = sorted(clusters)
        chosen = select_sharers_from_clusters([str(n) for n in nodes],
                                              [clusters[n] for n in nodes],
                                              [sizes[n] for n in nodes],
                                              small_cluster_items=small)
        sharers = [int(n) for n in chosen]
    for node in sorted(sizes, key=lambda n: (-sizes[n], n)):
        if len(sharers) >= wanted:
            break
        if node not in sharers and sizes[node] > small:
            sharers.append(node)
    return sharers[:wanted]


def select_sharers(grid: Grid, candidates: Sequence[int], config: RunConfig,
                   device_config: Mapping, status: Status | None = None,
                   keys: dict[int, bytes] | None = None) -> dict[str, Any]:
    """Federated k-means (or most-active) over the candidates; returns the chosen node ids
    and what was learnt (cluster sizes, consenting embeddings)."""
    if config.sharers <= 0 or not candidates:
        return {"sharers": [], "strategy": config.selection}
    kmeans = config.selection == "kmeans"
    k = min(config.sharers, len(candidates))
    centroids = np.random.default_rng(config.seed).standard_normal(
        (k, EMBEDDING_DIM)).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    sizes: dict[int, int] = {}
    clusters: dict[int, int] = {}
    willing: set[int] = set()
    consenting = 0
    for it in range(max(1, config.kmeans_iterations if kmeans else 1)):
        consenting = kmeans_round(grid, candidates, centroids if kmeans else None,
                                  device_config, config.phase_timeout, f"select-{it}", sizes,
                                  clusters, willing, status, keys)
    sharers = pick_sharers(config.sharers, sizes, clusters if kmeans else {},
                           config.small_cluster_items, willing)
    log.info("sharer selection (%s): %d sharers from %d candidates (%d consent to share "
             "pieces, %d consented to share their embedding)", config.selection, len(sharers),
             len(candidates), len(willing), consenting)
    if len(sharers) < config.sharers:
        log.warning("sharer selection: %d of %d sharers wanted: only %d of %d candidates' "
                    "consent policies allow sharing pieces (upload.perpcs_pieces = true)",
                    len(sharers), config.sharers, len(willing), len(sizes))
    return {"sharers": sharers, "strategy": config.selection, "willing": len(willing),
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
    kinds = {int(_metrics(r).get("task/kind", -1)) for r in replies.values()}
    labels = {int(_metrics(r).get("task/labels", 0)) for r in replies.values()}
    if len(kinds) > 1 or len(labels) > 1:
        raise PflError(f"targets disagree on the task: kinds {kinds}, label counts {labels}")
    kind = TASK_KINDS[kinds.pop()] if kinds and -1 not in kinds else "generation"
    return SimpleNamespace(name=name, kind=kind, labels=list(range(labels.pop() if labels else 0)))


# ----------------------------------------------------------------------- the run
@dataclass
class Roles:
    """Who plays which part in a run (node ids)."""

    nodes: list[int]
    targets: list[int]
    candidates: list[int]  # non-targets: sharer candidates, then the collective
    given_sharers: list[int] = field(default_factory=list)
    sharers: list[int] = field(default_factory=list)
    collective: list[int] = field(default_factory=list)
    #: the device key each consenting candidate reported at selection: a sharer's grant is
    #: minted for it, so no other key can use the grant
    device_keys: dict[int, bytes] = field(default_factory=dict)


def choose_targets(grid: Grid, config: Mapping[str, Any]) -> Roles:
    """Phase 1: wait for the nodes; the targets are given (``target-nodes``) or a seeded
    draw among the nodes that are not given sharers."""
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
    return Roles(nodes, targets, candidates, given_sharers)


def choose_sharers(grid: Grid, config: Mapping[str, Any], roles: Roles, cores: set[str],
                   device_config: Mapping, status: Status | None = None) -> dict[str, Any]:
    """Phase 2: the sharers (when a method reads the pool): given, or selected among (a
    sample of) the candidates; the collective is the candidates who are not sharers."""
    asked = roles.candidates
    if 0 < int(config["selection-sample"]) < len(asked):  # a large population: a sample
        asked = sorted(random.Random(int(config["seed"]) + 1).sample(
            asked, int(config["selection-sample"])))
    if not pool_needed(cores):
        selection: dict[str, Any] = {"sharers": []}
    elif roles.given_sharers:
        selection = {"sharers": [n for n in roles.given_sharers if n not in roles.targets],
                     "strategy": "given"}
    else:
        selection = select_sharers(grid, asked, config, device_config, status,
                                   roles.device_keys)
    roles.sharers = selection["sharers"]
    roles.collective = [n for n in roles.candidates if n not in roles.sharers]
    if int(config["collective"]) > 0:
        roles.collective = roles.collective[: int(config["collective"])]
    return selection


def stage1_settings(plan: Plan, kind: str, output_dir: Path, clients: int) -> RunConfig:
    """The run config of one stage-1 phase: the run's, with the recipe's max history unless
    the run config sets it (the server caps a device's FedAvg weight by it). The training
    settings (``stage1.*``, ``perfit.*``) reach the devices as the resolved method options,
    which every stage-1 message carries (:func:`cloud_server.server_app.run_stage1`); the
    run config's own ``local-epochs``, ``lr`` and ``batch-size`` override them when set."""
    config, options = plan.config, plan.options
    return config.replace(
        method=kind, output_dir=str(output_dir), num_clients=clients,
        max_history=config.max_history or options.get("max_history") or 0)


def train_collective(grid: Grid, plan: Plan, roles: Roles, run_dir: Path,
                     seconds: dict, status: Status | None = None
                     ) -> tuple[dict[str, np.ndarray], dict]:
    """Phase 3: FedAvg of each kind of collective parameters the methods build on, over the
    collective nodes; returns ({"KIND.name": array}, {kind: summary})."""
    arrays: dict[str, np.ndarray] = {}
    stage1: dict[str, Any] = {}
    for kind in collective_kinds_needed(plan.cores):
        if not roles.collective:
            raise PflError(f"stage 1 ({kind}) needs collective nodes: none are left")
        t0 = time.perf_counter()
        if status is not None:
            status.update(phase=f"stage1-{kind}", done=0, failed=0,
                          total=len(roles.collective))
        summary = run_stage1(NodeSubset(grid, roles.collective),
                             stage1_settings(plan, kind, run_dir / f"stage1-{kind}",
                                             len(roles.collective)), plan.options)
        with np.load(summary["final_arrays"]) as data:
            arrays.update({f"{kind}.{k}": data[k] for k in data.files})
        stage1[kind] = {k: summary[k] for k in ("rounds", "train_loss", "replies", "params",
                                                "bytes_per_update", "dp", "secagg")}
        seconds[f"stage1-{kind}"] = time.perf_counter() - t0
    if arrays:  # every collective part in one file: what `pfl serve --run RUN_DIR` loads
        save_npz(run_dir / GLOBAL_ARRAYS, arrays)
    return arrays, stage1


def share(grid: Grid, config: Mapping[str, Any], sharers: Sequence[int],
          arrays: Mapping[str, np.ndarray], device_config: Mapping,
          status: Status | None = None, keys: Mapping[int, bytes] | None = None
          ) -> tuple[dict, dict, str | None]:
    """Phase 4: the sharers train and submit their pieces with their grants; returns
    ({node: counts}, {pseudonym: hex key} of the sharers whose pieces targets may take,
    why the pool is empty or None when it is not)."""
    if not sharers:
        return {}, {}, ("no sharer was selected (the run asks for none, or no candidate's "
                        "consent allows sharing pieces: upload.perpcs_pieces)")
    lora_only = {k: v for k, v in arrays.items() if k.startswith("lora.")}
    grants = mint_grants(config, sharers, keys)
    replies = exchange(grid, sharers, "train.share", device_config, lora_only,
                       float(config["phase-timeout"]), "share",
                       per_node={n: {"pool-grant": g} for n, g in grants.items()},
                       status=status, role="sharer")
    shared = {str(n): _metrics(r) for n, r in replies.items()}
    keys = sharer_keys(replies, keys)
    if not any(m.get("pieces-submitted", 0) for m in shared.values()):
        why = (f"no sharer submitted pieces ({len(sharers)} selected, {len(replies)} "
               "answered; a sharer's log says why, e.g. the pool refused them)")
        log.warning("share: %s: the pool is empty, methods that read it are skipped", why)
        return shared, {}, why
    return shared, keys, None


def _finite_cost(value) -> float:
    ok = isinstance(value, (int, float)) and math.isfinite(value) and value >= 0
    return float(value) if ok else 0.0


def _failures(name: str, replies: Iterable[Message]) -> dict[int, int]:
    """{code: devices} of the targets on which ``name`` failed (``METHOD/failed``)."""
    out: dict[int, int] = {}
    for reply in replies:
        value = _metrics(reply).get(f"{name}/{FAILED_METRIC}")
        if value is None:
            continue
        # a device's word: only a known code counts as itself, anything else as FAILED
        code = next((c for c in DEVICE_ERRORS if value == c), FAILED)
        out[code] = out.get(code, 0) + 1
    return out


def _describe_failures(failures: Mapping[int, int]) -> str:
    return "; ".join(f"{n} target(s): code {code}, "
                     f"{DEVICE_ERRORS.get(code, DEVICE_ERRORS[500])}"
                     for code, n in sorted(failures.items()))


def method_results(name: str, task, evaluated: Mapping[int, Message],
                   personalized: Mapping[int, Message]) -> dict[str, Any]:
    """One method's row: the targets' metric statistics summed (a device whose statistics
    do not check out, or on which the method failed, is left out and counted) and their
    mean costs."""
    stats: dict[str, float] = {}
    per_user: list[dict[str, float]] = []
    costs: dict[str, list[float]] = {"params": [], "bytes": [], "seconds": []}
    failures = _failures(name, list(personalized.values()) + [
        r for node, r in evaluated.items()
        if f"{name}/{FAILED_METRIC}" not in _metrics(personalized[node])])
    for node, reply in evaluated.items():
        user_stats = {k.split("/", 1)[1]: v for k, v in _metrics(reply).items()
                      if k.startswith(name + "/")}
        if FAILED_METRIC in user_stats:
            continue
        problem = check_stats(task, user_stats)
        if problem is not None:  # a broken or hostile device: its answer is left out
            log.warning("evaluate: node %s's %s statistics are left out: %s", node, name,
                        problem)
            continue
        add_stats(stats, user_stats)
        per_user.append(user_stats)
        personal = _metrics(personalized[node])
        for cost in costs:
            costs[cost].append(_finite_cost(personal.get(f"{name}/{cost}", 0.0)))
    failed = {"failed_targets": sum(failures.values()),
              "failures": _describe_failures(failures)} if failures else {}
    if not stats:
        why = f": it failed on {failed['failures']}" if failures else ""
        return {"error": f"no target evaluated this method{why}", **failed}
    n = max(1, len(costs["params"]))
    metrics = metrics_from_stats(task, stats)
    return {"metrics": metrics, "users": len(costs["params"]),
            # 95% bootstrap intervals over the targets (one user each)
            "intervals": {m: users_interval(task, per_user, m) for m in metrics},
            "queries": int(stats.get("n", 0)), **failed,
            **{f"{cost}_per_user": sum(values) / n for cost, values in costs.items()}}


def _some(nodes: Sequence[int], limit: int = 12) -> str:
    """Node ids for a log line: all of a few, the first ``limit`` of many."""
    nodes = list(nodes)
    shown = ", ".join(str(n) for n in nodes[:limit])
    return f"[{shown}{f', ... ({len(nodes)} in all)' if len(nodes) > limit else ''}]"


#: Node ids of one role the status file lists (it is rewritten as replies arrive: a
#: population of thousands is counted, not listed; federation.json has every id).
STATUS_IDS = 50


def log_roles(roles: Roles, status: Status) -> None:
    """Each device's role, in the log and in the status file."""
    log.info("roles: targets %s; sharers %s; collective %s", _some(roles.targets),
             _some(roles.sharers), _some(roles.collective))
    parts = {"targets": roles.targets, "sharers": roles.sharers,
             "collective": roles.collective}
    status.update(roles={name: ids[:STATUS_IDS] for name, ids in parts.items()},
                  role_counts={name: len(ids) for name, ids in parts.items()})


class NothingEvaluated(PflError):
    """A run in which no method was evaluated on any target (``federation.json`` is written
    first, and is ``summary``): the ServerApp fails, so Flower marks the run
    ``finished:failed`` with this message (``flwr ls``) and ``pfl`` exits non-zero."""

    def __init__(self, message: str, summary: Mapping[str, Any]):
        super().__init__(message)
        self.summary = summary


def check_evaluated(summary: Mapping[str, Any]) -> Mapping[str, Any]:
    """``summary`` when at least one method has a result; else :class:`NothingEvaluated`."""
    if not any("metrics" in row for row in summary["methods"].values()):
        why = "; ".join(f"{name}: {row.get('error', 'no result')}"
                        for name, row in summary["methods"].items())
        raise NothingEvaluated(
            f"no method was evaluated on any target ({why}); see "
            f"{Path(summary['run_dir']) / SUMMARY_FILE} and the log", summary)
    return summary


def run_federation(grid: Grid, run_config: Mapping[str, Any] | RunConfig) -> dict[str, Any]:
    """Run every phase; write and return ``federation.json``'s content. A method that cannot
    run (an empty pool) or fails on some targets is reported in its row; the others' results
    stand. Raises :class:`NothingEvaluated` (after writing the file) when no method has a
    result."""
    plan = resolve(run_config)
    started, seconds = time.perf_counter(), {}
    run_dir = Path(plan.config.run_dir).expanduser().resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    plan = dataclasses.replace(plan, config=plan.config.replace(run_dir=str(run_dir)))
    config, device_config = plan.config, plan.device_config()
    status = Status(run_dir / STATUS_FILE)
    status.update(phase="waiting for devices", methods=plan.methods, finished=False)

    roles = choose_targets(grid, config)
    log.info("federation: %d nodes, %d targets, methods %s", len(roles.nodes),
             len(roles.targets), plan.methods)
    t0 = time.perf_counter()
    selection = choose_sharers(grid, config, roles, plan.cores, device_config, status)
    seconds["selection"] = time.perf_counter() - t0
    log_roles(roles, status)
    arrays, stage1 = train_collective(grid, plan, roles, run_dir, seconds, status)
    shared, pool_sharers, skipped = {}, {}, {}
    if pool_needed(plan.cores):
        t0 = time.perf_counter()
        shared, pool_sharers, empty = share(grid, config, roles.sharers, arrays,
                                            device_config, status, roles.device_keys)
        seconds["share"] = time.perf_counter() - t0
        if empty:  # the methods that read the pool cannot run; the others still do
            skipped = {m: f"skipped: {empty}" for m in plan.methods
                       if core_class(parse_method(m).core).uses_pool}
    runnable = [m for m in plan.methods if m not in skipped]
    personalized, evaluated = personalize_and_evaluate(grid, plan, roles.targets, arrays,
                                                       pool_sharers, seconds, runnable, status,
                                                       pool_run=grant_run(config))
    task = _task_of(evaluated, config.task)
    results = {name: ({"error": skipped[name], "skipped": True} if name in skipped
                      else method_results(name, task, evaluated, personalized))
               for name in plan.methods}
    summary = write_summary(plan, roles, selection, stage1, shared, results, seconds,
                            evaluated, time.perf_counter() - started)
    done = [name for name, row in results.items() if "metrics" in row]
    status.update(phase="finished", finished=True, evaluated_methods=done,
                  results=str(run_dir / SUMMARY_FILE))
    log.info("results: %s (%d of %d methods evaluated)", run_dir / SUMMARY_FILE,
             len(done), len(results))
    return check_evaluated(summary)


def personalize_and_evaluate(grid: Grid, plan: Plan, targets: Sequence[int],
                             arrays: Mapping[str, np.ndarray], pool_sharers: Mapping[str, str],
                             seconds: dict, methods: Sequence[str] | None = None,
                             status: Status | None = None, pool_run: str = ""
                             ) -> tuple[dict[int, Message], dict[int, Message]]:
    """Phases 5 and 6: every target personalizes with every method (``methods``, default the
    run's; costs come back), then answers its held-out queries (metric statistics come
    back). ``pool_run``: the run the sharers' grants named; targets list only the pieces
    submitted under it."""
    methods = list(plan.methods if methods is None else methods)
    if not methods:
        return {}, {}
    config = {**plan.device_config(), "methods": ",".join(methods)}
    if pool_sharers:  # targets take pieces from these sharers only
        config["pool-sharers"] = json.dumps(pool_sharers, sort_keys=True)
    if pool_run:  # ... and only those they submitted under this run's grants
        config["pool-run"] = pool_run
    timeout = plan.config.phase_timeout
    t0 = time.perf_counter()
    if arrays:  # a device keeps the collective arrays by digest between the two phases
        config[ARRAYS_DIGEST_KEY] = arrays_digest(arrays)
    personalized = exchange(grid, targets, "train.personalize", config, arrays, timeout,
                            "personalize", status=status, role="target")
    seconds["personalize"], t0 = time.perf_counter() - t0, time.perf_counter()
    holding = [node for node, reply in personalized.items()
               if _metrics(reply).get(KEPT_METRIC) == 1.0]
    evaluated = exchange(grid, sorted(personalized), "evaluate", config, arrays, timeout,
                         "evaluate", holding=holding, status=status, role="target")
    seconds["evaluate"] = time.perf_counter() - t0
    return personalized, evaluated


def write_summary(plan: Plan, roles: Roles, selection, stage1, shared, results, seconds,
                  evaluated, elapsed: float) -> dict[str, Any]:
    """``federation.json`` in the run folder; returns its content."""
    config = plan.config
    summary = {"task": config.task, "model": config.model, "seed": config.seed,
               "run_dir": config.run_dir,
               "recipe": {"name": plan.recipe, "options": plan.options},
               "nodes": len(roles.nodes), "targets": roles.targets, "sharers": roles.sharers,
               "collective": roles.collective, "selection": selection, "stage1": stage1,
               "shared": shared, "methods": results, "phase_seconds": seconds,
               "evaluated_targets": sorted(evaluated), "seconds": elapsed,
               "global_arrays": str(Path(config.run_dir) / GLOBAL_ARRAYS) if stage1 else None}
    path = Path(config.run_dir) / SUMMARY_FILE
    path.write_text(json.dumps(summary, indent=2, default=float) + "\n")
    return summary


def read_run(run_dir: str | Path) -> tuple[dict[str, Any], Path | None]:
    """(results, the collective arrays file or None) of a finished run's folder, what
    ``pfl serve --run`` reads; a one-line error when it is not one."""
    run_dir = Path(run_dir)
    path = run_dir / SUMMARY_FILE
    if not run_dir.is_dir():
        raise PflError(f"no run folder {run_dir}")
    if not path.is_file():
        raise PflError(f"{run_dir} is not a finished run's folder: no {SUMMARY_FILE} (a run "
                       f"writes it at its end; its progress is in {STATUS_FILE})")
    try:
        summary = json.loads(path.read_text())
        str(summary["model"])
    except (ValueError, KeyError, TypeError, RecursionError):
        raise PflError(f"{path} is not a run's results file") from None
    arrays = run_dir / GLOBAL_ARRAYS
    if summary.get("stage1") and not arrays.is_file():
        raise PflError(f"{run_dir}: the run trained {', '.join(summary['stage1'])} but "
                       f"{GLOBAL_ARRAYS} is missing")
    return summary, arrays if arrays.is_file() else None


def format_results(summary: Mapping[str, Any]) -> str:
    """The federation's results: a title line, then the same table as ``pfl eval``'s."""
    head = (f"federation: task {summary['task']} | model {summary['model']} | "
            f"{summary['nodes']} nodes, {len(summary['evaluated_targets'])} targets evaluated, "
            f"{len(summary['sharers'])} sharers, {len(summary['collective'])} collective")
    for kind, part in (summary.get("stage1") or {}).items():
        dp = part.get("dp") if isinstance(part, Mapping) else None
        if dp:
            head += (f"\nstage 1 ({kind}) with differential privacy: epsilon {dp['epsilon']:.3f} "
                     f"at delta {dp['delta']:g} (noise multiplier {dp['noise_multiplier']:g}, "
                     f"clipping norm {dp['clipping_norm']:g}, {dp['releases']} releases)")
        secure = part.get("secagg") if isinstance(part, Mapping) else None
        if secure:
            head += (f"\nstage 1 ({kind}) under secure aggregation: SecAgg+, "
                     f"{secure['devices_per_round']} devices per round, {secure['shares']} "
                     f"shares, threshold {secure['threshold']}")
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
        try:
            summary = run_federation(grid, {**dict(context.run_config), **fixed})
        except NothingEvaluated as exc:  # the table says why; then the run fails
            if print_results:
                print(format_results(exc.summary), flush=True)
            raise
        if print_results:
            print(format_results(summary), flush=True)

    return server_app


#: ``flwr run`` / SuperLink entry point (pyproject: [tool.flwr.app.components] serverapp).
app = make_federation_app()
