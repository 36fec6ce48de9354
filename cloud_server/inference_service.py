"""The cloud's inference service (gRPC over TLS): one copy of the frozen base model answers many
users in the same batch, each request with its own personalization.

A request (``GenerateRequest``) carries the prompt text and names its personalization:

- nothing: the stage-1 model (the base plus the federation's stage-1 task LoRA, if any);
  ``base``: the raw base model;
- a PER-PCS recipe, resolved against the service's own piece pool; assembled adapters are
  kept in an LRU cache bounded in bytes;
- PerFit stage-2 parameters, inline (a few KB), on top of the federation's PerFit stage 1;
- an OPPU adapter, uploaded once (``UploadAdapter``) and then named by its id (LRU, bounded).

Requests wait at most ``max_wait_ms`` for others to join them, then go through
:class:`shared.serving.engine.BatchedEngine` together (dynamic batching): one base matmul for
the batch, each row's own LoRA factors and PerFit intervention. Greedy answers equal the same
request's answer alone.

Every call is signed with the caller's device key (:mod:`cloud_server.client_auth`): the
key is the caller's identity, an uploaded adapter is usable only by the key that uploaded
it, and each key's adapters count against its own quota (``adapter_quota_mb``) before the
whole cache's. Every inbound payload is bounded and validated before it touches the model;
a bad request gets a status and changes nothing:

    UNAUTHENTICATED     an unsigned, stale or replayed call, or a signature that does not
                        verify
    PERMISSION_DENIED   a key that is not on the service's client list (``--clients``)
    INVALID_ARGUMENT    malformed or out-of-bounds parameters (NaN, shapes or ranks that do
                        not fit the model, a prompt over the token limit, too many tokens)
    NOT_FOUND           piece ids the pool does not hold (e.g. a recipe from another pool),
                        an adapter id this caller has not uploaded (or that was evicted)
    FAILED_PRECONDITION PerFit parameters when the service has no PerFit stage 1
    RESOURCE_EXHAUSTED  the queue is full, or one client has too many requests in flight
    DEADLINE_EXCEEDED   the answer took longer than the request's deadline
    INTERNAL            anything unexpected (a fixed message; details in the log)

Run it with ``pfl serve`` (:func:`serve`).
"""

from __future__ import annotations

import collections
import hashlib
import logging
import threading
import zipfile
import time
from concurrent.futures import Future
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Sequence

import grpc
import numpy as np
import torch

from cloud_server.client_auth import RequestAuth
from cloud_server.rpc import (Admission, RequestError, guard, run_until_stopped, target_of,
                              tls_server)
from shared.errors import PflError
from shared.methods import Runtime, split_arrays
from shared.methods.oppu.config import stage1_lora
from shared.methods.perfit.core import perfit_config, perfit_from_arrays
from shared.methods.perpcs.pieces import piece_updates
from shared.methods.perpcs.recipe import rebuild
from shared.prompts import encode_prompt
from shared.methods.oppu.wire import adapter_from_proto, adapter_id
from shared.methods.perfit.wire import perfit_stage_from_proto
from shared.methods.perpcs.wire import recipe_from_proto
from shared.serialization import DEFAULT_LIMITS, InvalidPiece
from shared.serving.engine import BatchedEngine
from shared.serving.rows import RowAdapter, RowIntervention, concat, lora_state_updates
from shared.tasks import SYNTHETIC
from shared.wire import pfl_pb2, pfl_pb2_grpc

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 << 20


@dataclass(frozen=True)
class ServeLimits:
    """What one request, one client and the whole service may use (``pfl serve`` flags)."""

    max_prompt_tokens: int = 1024   # a longer prompt is refused, not cut
    max_new_tokens: int = 128       # per request
    default_new_tokens: int = 32    # when a request says 0
    max_batch: int = 32             # rows in one forward pass
    max_wait_ms: float = 5.0        # how long the first request of a batch waits for others
    max_pending: int = 1024         # requests queued or running, all clients together
    max_per_client: int = 64        # requests in flight from one client
    max_rank: int = 256             # of a row's update on one module (stage 1 included)
    adapter_cache_mb: float = 1024  # uploaded OPPU adapters kept (LRU), all clients
    adapter_quota_mb: float = 64    # of which one client's adapters may use at most
    recipe_cache_mb: float = 512    # assembled PER-PCS adapters kept (LRU)

    def __post_init__(self):
        for f in fields(self):
            if getattr(self, f.name) < 0 or (f.name != "max_wait_ms" and
                                             getattr(self, f.name) == 0):
                raise PflError(f"serve: {f.name} must be positive, got {getattr(self, f.name)}")
        if self.default_new_tokens > self.max_new_tokens:
            raise PflError("serve: default_new_tokens exceeds max_new_tokens")


def _bad(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


#: the owner of entries every caller may use (assembled PER-PCS recipes: pool pieces only)
SHARED = b""


class _OwnedLru:
    """Values by (owner, key): each owner's share bounded by ``quota`` bytes (its own least
    recently used are evicted first), all owners together by ``capacity`` bytes (the least
    recently used of anyone's beyond that). One owner cannot push out another's entries
    while the cache has room for both, and never finds an entry another owner put. With
    ``quota == capacity`` and one owner (:data:`SHARED`) it is a plain LRU bounded in bytes."""

    def __init__(self, capacity: int, quota: int):
        self.capacity, self.quota = int(capacity), int(min(quota, capacity))
        self.items: collections.OrderedDict = collections.OrderedDict()
        self.usage: collections.Counter = collections.Counter()
        self.size = 0
        self.lock = threading.Lock()

    def get(self, owner, key):
        with self.lock:
            if (owner, key) not in self.items:
                return None
            self.items.move_to_end((owner, key))
            return self.items[(owner, key)][0]

    def _drop(self, item) -> None:
        _, size = self.items.pop(item)
        self.size -= size
        self.usage[item[0]] -= size
        if self.usage[item[0]] <= 0:
            del self.usage[item[0]]

    def put(self, owner, key, value, size: int) -> bool:
        """Keep ``value``; False (and nothing kept) if it alone exceeds the owner's quota."""
        with self.lock:
            if size > self.quota:
                return False
            if (owner, key) in self.items:
                self.items.move_to_end((owner, key))
                return True
            while self.usage[owner] + size > self.quota:  # the owner's own oldest first
                self._drop(next(item for item in self.items if item[0] == owner))
            self.items[(owner, key)] = (value, size)
            self.size += size
            self.usage[owner] += size
            while self.size > self.capacity:
                self._drop(next(iter(self.items)))
            return True

    def __len__(self) -> int:
        return len(self.items)


def _updates_bytes(updates) -> int:
    return sum(u.A.numel() * u.A.element_size() + u.B.numel() * u.B.element_size()
               for u in updates.values())


class Personalizer:
    """Turns a request's personalization into a :class:`RowAdapter` on the raw base model.

    ``stage1``: the stage-1 task LoRA's updates (empty: none); ``perfit_stage1``: PerFit's
    collective stage (None: PerFit requests are refused); ``pool``: the service's piece pool
    (a :class:`cloud_server.pool_store.PoolStore`: ``missing(ids)`` and ``piece(id)``)."""

    def __init__(self, engine: BatchedEngine, limits: ServeLimits, *, stage1=None,
                 perfit_stage1=None, perfit_positions: str = "f7+l7",
                 pool=None):
        self.engine, self.limits = engine, limits
        self.stage1 = dict(stage1 or {})
        self.perfit_stage1, self.perfit_positions = perfit_stage1, perfit_positions
        self.pool = pool
        self.adapters = _OwnedLru(int(limits.adapter_cache_mb * (1 << 20)),
                                  int(limits.adapter_quota_mb * (1 << 20)))
        recipe_bytes = int(limits.recipe_cache_mb * (1 << 20))
        self.recipes = _OwnedLru(recipe_bytes, recipe_bytes)
        self.base_row = engine.place(RowAdapter(self.stage1, name="stage1")
                                     if self.stage1 else None)

    def _checked(self, row: RowAdapter, *, place: bool = True) -> RowAdapter:
        """``row`` checked against the model and (``place``) put on the engine's device."""
        try:
            if not place:
                self.engine.check(row)
                return row
            return self.engine.place(row)
        except PflError as exc:
            raise _bad(str(exc)) from None

    def row(self, request: pfl_pb2.GenerateRequest, owner: bytes) -> RowAdapter | None:
        """The row answering ``request`` from the caller whose key is ``owner`` (an OPPU
        adapter is looked up among the ones this caller uploaded)."""
        kind = request.WhichOneof("personalization")
        if kind is None:
            return self.base_row
        if kind == "base":
            return None
        if kind == "perpcs":
            return self._perpcs(request.perpcs)
        if kind == "perfit":
            return self._perfit(request.perfit)
        return self._oppu(request.oppu_adapter, owner)

    def _perpcs(self, msg: pfl_pb2.Recipe) -> RowAdapter:
        if self.pool is None:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               "this service has no piece pool: PER-PCS recipes are not served")
        key = hashlib.sha256(msg.SerializeToString(deterministic=True)).hexdigest()
        cached = self.recipes.get(SHARED, key)
        if cached is not None:
            return cached
        try:
            recipe = recipe_from_proto(msg)
        except (InvalidPiece, PflError) as exc:
            raise _bad(str(exc)) from None
        if not recipe.entries:
            raise _bad("recipe: no entries")
        ids = sorted(recipe.piece_ids())
        missing = self.pool.missing(ids)  # an index lookup: no blob is read for it
        if missing:
            raise RequestError(grpc.StatusCode.NOT_FOUND,
                               f"{len(missing)} piece(s) of the recipe are not in this pool "
                               f"(first: {missing[0][:12]}...): a recipe from another pool?")
        try:
            updates = rebuild(recipe, self.pool.piece)
        except (PflError, ValueError) as exc:
            raise _bad(f"recipe: {exc}") from None
        self._checked(RowAdapter(updates, name="perpcs"), place=False)  # alone: shapes fit?
        row = self._checked(RowAdapter(concat(self.stage1, updates), name="perpcs"))
        self.recipes.put(SHARED, key, row, _updates_bytes(updates))
        return row

    def _perfit(self, msg: pfl_pb2.PerFitParams) -> RowAdapter:
        if self.perfit_stage1 is None:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               "this service has no PerFit stage 1: PerFit is not served")
        try:
            stage2 = perfit_stage_from_proto(msg, max_layers=self.engine.num_layers)
        except InvalidPiece as exc:
            raise _bad(str(exc)) from None
        if stage2.hidden_size != self.engine.hidden_size or \
                max(stage2.layers) >= self.engine.num_layers:
            raise _bad(f"PerFit parameters of width {stage2.hidden_size} on layers "
                       f"{list(stage2.layers)} do not fit the model "
                       f"({self.engine.num_layers} layers of width {self.engine.hidden_size})")
        return self._checked(RowAdapter(intervention=RowIntervention(
            (self.perfit_stage1, stage2), self.perfit_positions), name="perfit"))

    def _oppu(self, adapter: str, owner: bytes) -> RowAdapter:
        row = self.adapters.get(owner, adapter)
        if row is None:
            raise RequestError(grpc.StatusCode.NOT_FOUND,
                               f"unknown adapter {adapter[:70]!r}: this client has not "
                               "uploaded it, or it was evicted (upload it again)")
        return row

    def upload(self, msg: pfl_pb2.UploadAdapterRequest, owner: bytes) -> tuple[str, bool]:
        """Keep an adapter for the caller whose key is ``owner``: (its id, whether it was
        new to this caller). Another caller's uploads are neither visible nor usable."""
        try:
            pieces = adapter_from_proto(msg, DEFAULT_LIMITS, max_factors=len(self.engine.shapes))
        except InvalidPiece as exc:
            raise _bad(str(exc)) from None
        ident = adapter_id(pieces)
        if self.adapters.get(owner, ident) is not None:
            return ident, False
        updates = piece_updates(pieces)
        self._checked(RowAdapter(updates, name="oppu"), place=False)  # alone: shapes fit?
        row = self._checked(RowAdapter(concat(self.stage1, updates), name="oppu"))
        if not self.adapters.put(owner, ident, row, _updates_bytes(updates)):
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               "the adapter is larger than a client's adapter quota")
        return ident, True


@dataclass
class _Job:
    prompt: list[int]
    row: RowAdapter | None
    max_new_tokens: int
    min_new_tokens: int
    client: str
    future: Future
    queued_at: float


class Batcher:
    """Collects requests into batches: the first waits up to ``max_wait_ms`` for others (up
    to ``max_batch`` rows), then the batch runs on the engine; one batch at a time."""

    def __init__(self, engine: BatchedEngine, limits: ServeLimits):
        self.engine, self.limits = engine, limits
        self.queue: collections.deque[_Job] = collections.deque()
        self.cond = threading.Condition()
        self.in_flight: collections.Counter = collections.Counter()
        self.pending = 0
        self.closed = False
        self.batches = 0
        self.thread = threading.Thread(target=self._loop, name="pfl-batcher", daemon=True)
        self.thread.start()

    def submit(self, prompt: list[int], row: RowAdapter | None, max_new_tokens: int,
               client: str, min_new_tokens: int = 0) -> Future:
        with self.cond:
            if self.closed:
                raise RequestError(grpc.StatusCode.UNAVAILABLE, "the service is stopping")
            if self.pending >= self.limits.max_pending:
                raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"the service has {self.pending} requests in flight "
                                   f"(limit {self.limits.max_pending}); retry later")
            if self.in_flight[client] >= self.limits.max_per_client:
                raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"this client has {self.in_flight[client]} requests in "
                                   f"flight (limit {self.limits.max_per_client})")
            job = _Job(prompt, row, max_new_tokens, min_new_tokens, client, Future(),
                       time.perf_counter())
            self.in_flight[client] += 1
            self.pending += 1
            self.queue.append(job)
            self.cond.notify_all()
        job.future.add_done_callback(lambda _: self._done(client))
        return job.future

    def _done(self, client: str) -> None:
        with self.cond:
            self.pending -= 1
            self.in_flight[client] -= 1
            if self.in_flight[client] <= 0:
                del self.in_flight[client]

    def _take(self) -> list[_Job]:
        with self.cond:
            while not self.queue and not self.closed:
                self.cond.wait()
            if self.closed:
                return []
            deadline = self.queue[0].queued_at + self.limits.max_wait_ms / 1000
            while len(self.queue) < self.limits.max_batch and not self.closed:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self.cond.wait(timeout=left)
            return self._fair_batch(min(len(self.queue), self.limits.max_batch))

    def _fair_batch(self, n: int) -> list[_Job]:
        """Up to ``n`` queued jobs taken in turn from each client (in the order clients first
        queued), so one client's backlog cannot keep another's next request out of the next
        batch; each client's own jobs keep their order. With several clients waiting, each
        puts at most ``max_batch // clients`` rows in a batch: a flooding client's backlog
        does not make every other client's batch a full one (a client alone still fills
        it). Call with the lock held."""
        by_client: dict[str, collections.deque] = {}
        for job in self.queue:
            by_client.setdefault(job.client, collections.deque()).append(job)
        share = max(1, self.limits.max_batch // len(by_client)) if by_client else n
        for client, jobs in by_client.items():
            while len(jobs) > share:
                jobs.pop()  # the newest wait for a later batch
        taken: list[_Job] = []
        while len(taken) < n and by_client:
            for client in list(by_client):
                taken.append(by_client[client].popleft())
                if not by_client[client]:
                    del by_client[client]
                if len(taken) == n:
                    break
        chosen = {id(job) for job in taken}
        self.queue = collections.deque(j for j in self.queue if id(j) not in chosen)
        return taken

    def _loop(self) -> None:
        while True:
            jobs = self._take()
            if not jobs:
                if self.closed:
                    return
                continue
            jobs = [job for job in jobs if job.future.set_running_or_notify_cancel()]
            # rows that differ in min_new_tokens run apart: a row's EOS must stay its own
            groups: dict[int, list[_Job]] = {}
            for job in jobs:
                groups.setdefault(job.min_new_tokens, []).append(job)
            for group in groups.values():
                self._run(group, len(jobs))

    def _run(self, jobs: list[_Job], taken: int) -> None:
        started = time.perf_counter()
        try:
            outputs = self.engine.generate(
                [j.prompt for j in jobs], [j.row for j in jobs],
                max_new_tokens=max(j.max_new_tokens for j in jobs),
                min_new_tokens=jobs[0].min_new_tokens)
        except Exception as exc:  # every row of the batch learns of it
            log.exception("a batch of %d failed", len(jobs))
            for job in jobs:
                job.future.set_exception(exc)
            return
        seconds = time.perf_counter() - started
        self.batches += 1
        for job, tokens in zip(jobs, outputs):
            # greedy: a shorter limit is a prefix of the longer run
            job.future.set_result((tokens[: job.max_new_tokens], len(jobs),
                                   started - job.queued_at, seconds))

    def close(self) -> None:
        with self.cond:
            self.closed = True
            left = list(self.queue)
            self.queue.clear()
            self.cond.notify_all()
        for job in left:
            job.future.set_exception(RequestError(grpc.StatusCode.UNAVAILABLE,
                                                  "the service is stopping"))
        self.thread.join(timeout=30)


def _client_of(context) -> str:
    """Who a request is from, for the per-client limit: its connection (the peer's address
    and port). Many clients share an address behind a NAT or on one host, so the address
    alone would throttle them together; a client that opens many connections to flood the
    service meets ``max_pending``, the limit over all clients."""
    return context.peer() or "unknown"


class InferenceServicer(pfl_pb2_grpc.InferenceServicer):
    """Generate and UploadAdapter over a :class:`Personalizer` and a :class:`Batcher`."""

    def __init__(self, personalizer: Personalizer, batcher: Batcher, tokenizer,
                 limits: ServeLimits, auth: RequestAuth):
        self.personalizer, self.batcher = personalizer, batcher
        self.tokenizer, self.limits, self.auth = tokenizer, limits, auth

    def _caller(self, context, method: str, request) -> bytes:
        try:
            return self.auth.check(context, method, request)
        except RequestError as exc:
            context.abort(exc.code, str(exc))

    @guard
    def UploadAdapter(self, request, context):
        caller = self._caller(context, "UploadAdapter", request)
        try:
            ident, created = self.personalizer.upload(request, caller)
        except RequestError as exc:
            context.abort(exc.code, str(exc))
        return pfl_pb2.UploadAdapterReply(adapter_id=ident, created=created)

    @guard
    def Generate(self, request, context):
        caller = self._caller(context, "Generate", request)
        try:
            prompt, max_new, row = self._parse(request, caller)
            future = self.batcher.submit(prompt, row, max_new, _client_of(context),
                                         min_new_tokens=request.min_new_tokens)
        except RequestError as exc:
            context.abort(exc.code, str(exc))
        timeout = context.time_remaining()
        try:
            tokens, rows, queued, seconds = future.result(
                timeout=None if timeout is None else max(0.0, timeout))
        except TimeoutError:
            future.cancel()
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "no answer within the deadline")
        except RequestError as exc:
            context.abort(exc.code, str(exc))
        text = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        return pfl_pb2.GenerateReply(text=text, new_tokens=len(tokens), batch_rows=rows,
                                     queue_seconds=queued, compute_seconds=seconds)

    def _parse(self, request, owner: bytes) -> tuple[list[int], int, RowAdapter | None]:
        limits = self.limits
        max_new = request.max_new_tokens or limits.default_new_tokens
        if max_new > limits.max_new_tokens:
            raise _bad(f"max_new_tokens {max_new} exceeds the limit {limits.max_new_tokens}")
        if request.min_new_tokens > max_new:
            raise _bad(f"min_new_tokens {request.min_new_tokens} exceeds max_new_tokens "
                       f"{max_new}")
        if not request.prompt.strip():
            raise _bad("empty prompt")
        if len(request.prompt) > 8 * limits.max_prompt_tokens:  # before tokenizing it
            raise _bad(f"prompt of {len(request.prompt)} characters is over the limit")
        prompt = encode_prompt(self.tokenizer, request.prompt)
        if len(prompt) > limits.max_prompt_tokens:
            raise _bad(f"prompt of {len(prompt)} tokens exceeds the limit "
                       f"{limits.max_prompt_tokens}")
        return prompt, max_new, self.personalizer.row(request, owner)


class InferenceServer:
    """A running inference service with TLS: ``.port``, ``.target``; stop with :meth:`stop`."""

    def __init__(self, engine: BatchedEngine, personalizer: Personalizer, certs_dir, *,
                 limits: ServeLimits, host: str = "127.0.0.1", port: int = 0,
                 max_workers: int = 64, interceptors: Sequence = (),
                 auth: RequestAuth | None = None):
        self.engine, self.personalizer, self.limits = engine, personalizer, limits
        self.auth = auth or RequestAuth()
        self.batcher = Batcher(engine, limits)
        servicer = InferenceServicer(personalizer, self.batcher, engine.tokenizer, limits,
                                     self.auth)
        self.host = host
        try:
            self.server, self.port = tls_server(
                lambda server: pfl_pb2_grpc.add_InferenceServicer_to_server(servicer, server),
                certs_dir, host=host, port=port, max_workers=max_workers,
                max_message_bytes=MAX_MESSAGE_BYTES, interceptors=interceptors,
                admission=Admission(per_connection=limits.max_per_client,
                                    streams_per_connection=max(100, 2 * limits.max_per_client)))
        except BaseException:
            self.batcher.close()
            raise

    @property
    def target(self) -> str:
        return target_of(self.host, self.port)

    def stop(self, grace: float | None = 1.0) -> None:
        self.server.stop(grace).wait(timeout=(grace or 0) + 5)
        self.batcher.close()

    def __enter__(self) -> "InferenceServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def load_collectives(loaded, arrays_path: str | Path | None) -> tuple[dict, object, str]:
    """(stage-1 updates, PerFit stage 1 or None, PerFit positions) from a federation's
    ``global_arrays.npz`` (None: neither, the raw base model)."""
    if arrays_path is None:
        return {}, None, "f7+l7"
    try:
        with np.load(arrays_path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise PflError(f"no arrays file {arrays_path} (a federation writes "
                       f"RUN_DIR/global_arrays.npz: give --run RUN_DIR)") from None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise PflError(f"{arrays_path} is not a readable .npz file ({exc})") from None
    parts = split_arrays(arrays)
    if not ({"lora", "perfit"} & set(parts)):
        raise PflError(f"{arrays_path} holds no stage-1 LoRA (lora.*) or PerFit (perfit.*) "
                       "arrays: give the run folder's global_arrays.npz (--run RUN_DIR)")
    stage1 = {}
    if "lora" in parts:  # as factors, never merged: the service keeps one copy of the model
        spec = stage1_lora()
        stage1 = lora_state_updates({k: torch.from_numpy(np.array(v, dtype=np.float32))
                                     for k, v in parts["lora"].items()}, spec.alpha / spec.r)
    perfit = None
    if "perfit" in parts:
        perfit = perfit_from_arrays(parts["perfit"], device=loaded.device)[0]
    runtime = Runtime(loaded=loaded, task=SYNTHETIC, seed=0, progress=False)
    return stage1, perfit, perfit_config(runtime).positions


def start_inference_server(certs_dir: str | Path, *, model: str | None = None,
                           arrays: str | Path | None = None, pool_db: str | Path | None = None,
                           limits: ServeLimits = ServeLimits(), host: str = "127.0.0.1",
                           port: int = 0, device: str | None = None, cache=None,
                           loaded=None, clients: frozenset[bytes] | None = None
                           ) -> InferenceServer:
    """Load the base model (once), the federation's collective arrays and the pool, and serve.

    ``loaded``: an already loaded model to serve (tests); else ``model`` is loaded.
    ``clients``: the device public keys that may call (None: any signed key)."""
    from shared.models import load_model  # a caller that passes ``loaded`` needs no loader

    loaded = loaded or load_model(model, device=device, cache=cache)
    stage1, perfit_stage1, positions = load_collectives(loaded, arrays)
    store = None
    if pool_db is not None:
        from cloud_server.pool_store import PoolStore  # SQLite only when there is a pool
        store = PoolStore(pool_db)
    engine = BatchedEngine(loaded.model, loaded.tokenizer, max_rank=limits.max_rank)
    try:
        personalizer = Personalizer(engine, limits, stage1=stage1, perfit_stage1=perfit_stage1,
                                    perfit_positions=positions,
                                    pool=store)
        server = InferenceServer(engine, personalizer, certs_dir, limits=limits, host=host,
                                 port=port, auth=RequestAuth(clients))
    except BaseException:
        engine.close()
        if store is not None:
            store.close()
        raise
    server.store = store
    return server


def serve(certs_dir, *, host: str = "127.0.0.1", port: int = 50071, **kwargs) -> int:
    """Serve until SIGINT/SIGTERM (``pfl serve``); returns an exit status."""
    server = start_inference_server(certs_dir, host=host, port=port, **kwargs)
    engine = server.engine

    def stop():
        server.stop(grace=2.0)
        engine.close()
        if server.store is not None:
            server.store.close()

    run_until_stopped(stop, lambda: print(
        f"pfl serve: {len(engine.shapes)} servable modules, stage 1 "
        f"{'on' if server.personalizer.stage1 else 'off'}, PerFit "
        f"{'on' if server.personalizer.perfit_stage1 is not None else 'off'}, pool "
        f"{'on' if server.store is not None else 'off'}, clients "
        f"{'any signed key' if server.auth.allowed is None else len(server.auth.allowed)}; "
        f"listening on {server.target} (TLS)", flush=True))
    print("pfl serve: stopped", flush=True)
    return 0
