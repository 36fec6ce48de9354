"""``pfl bench serve``: throughput of many users in one batch, and a load test of the real
inference service.

Part 1, the engine (:class:`shared.serving.engine.BatchedEngine`, no network): generated
tokens per second and seconds per batch for

- ``base``: the base model alone (no personalization) at each batch size;
- ``one-at-a-time``: the same requests, mixed methods, one per forward pass (swapping
  adapters between requests, as a server without multi-adapter batching must);
- mixed batches of distinct users of each method (``lora-c``, ``oppu``, ``perpcs``,
  ``perfit``) and of all methods together (``mixed``).

Each request decodes exactly ``new_tokens`` tokens (EOS is suppressed), so every row costs the
same and the rates compare. Users' parameters have each method's real shapes (stage-1 LoRA
rank 8 on q,k,v; OPPU rank 8 on q,v; PER-PCS top-2 pieces of rank 8 on q,k,v,o; PerFit rank 4
on every layer at 7+7 prompt positions) with random values: the cost of a forward pass does
not depend on the values. Prompts are real synthetic-task queries.

Part 2, the service (:mod:`cloud_server.inference_service`) on 127.0.0.1 with TLS:
``clients`` concurrent clients send ``requests`` requests in all (each a random user of a
random method: OPPU adapters uploaded first, PER-PCS recipes resolved against a real pool,
PerFit parameters inline), bounded by ``timeout`` seconds. Every answer is checked against
the same request answered alone by the engine; the latency percentiles are per request.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import torch

from cloud_server.inference_service import InferenceServer, Personalizer, ServeLimits
from cloud_server.pool_store import PoolStore
from edge_client.inference_client import InferenceClient
from shared import crypto
from shared.data import load_dataset
from shared.methods.oppu.config import personal_lora, stage1_lora
from shared.methods.perfit.config import PerFitConfig
from shared.methods.perfit.model import new_stages
from shared.methods.perpcs.config import PerPcsConfig
from shared.methods.perpcs.pieces import LoraUpdate, Piece, piece_updates
from shared.methods.perpcs.recipe import Recipe, rebuild
from shared.models import load_model
from shared.prompts import build_prompt, encode_prompt
from shared.serialization import SignedPiece
from shared.serving.engine import BatchedEngine
from shared.serving.rows import RowAdapter, RowIntervention, concat, module_shapes

KINDS = ("lora-c", "oppu", "perpcs", "perfit")


class _Users:
    """Random per-user parameters of each method's real shapes on ``model``."""

    def __init__(self, model, seed: int = 0):
        self.gen = torch.Generator().manual_seed(seed)
        self.shapes = module_shapes(model, ("q_proj", "k_proj", "v_proj", "o_proj"))
        self.num_layers = model.config.num_hidden_layers
        self.hidden = model.config.hidden_size
        spec = stage1_lora()
        self.stage1 = self._lora(spec.target_modules, spec.r, "stage1")
        perfit = PerFitConfig()
        self.perfit_config = perfit
        self.device = next(model.parameters()).device
        self.perfit_stage1, _ = new_stages(perfit, self.num_layers, self.hidden, seed=seed,
                                           device=self.device)
        self.pieces: dict[str, list[Piece]] = {}  # sharer -> pieces (the pool)

    def _factors(self, key, r):
        d_out, d_in = self.shapes[key]
        A = torch.randn(r, d_in, generator=self.gen) / d_in ** 0.5
        B = torch.randn(d_out, r, generator=self.gen) * 0.02
        return A, B

    def _lora(self, modules, r, owner) -> dict:
        out = {}
        for layer in range(self.num_layers):
            for module in modules:
                A, B = self._factors((layer, module), r)
                out[(layer, module)] = LoraUpdate(A, B)
        return out

    def oppu_pieces(self) -> list[Piece]:
        spec = personal_lora()
        pieces = []
        for layer in range(self.num_layers):
            for module in spec.target_modules:
                A, B = self._factors((layer, module), spec.r)
                pieces.append(Piece("upload", layer, module, A, B, spec.alpha / spec.r))
        return pieces

    def sharer(self, name: str) -> list[Piece]:
        spec, config = personal_lora(), PerPcsConfig()
        pieces = []
        for layer in range(self.num_layers):
            for module in config.target_modules:
                A, B = self._factors((layer, module), spec.r)
                gate = torch.randn(self.shapes[(layer, module)][1], generator=self.gen)
                pieces.append(Piece(name, layer, module, A, B, spec.alpha / spec.r, gate))
        self.pieces[name] = pieces
        return pieces

    def recipe(self) -> Recipe:
        """A top-k PER-PCS recipe over the pool's sharers (random picks and weights)."""
        config = PerPcsConfig()
        sharers = sorted(self.pieces)
        entries = {}
        by_key = {(p.layer, p.module, s): p for s in sharers for p in self.pieces[s]}
        for layer in range(self.num_layers):
            for module in config.target_modules:
                picks = random.Random(int(torch.randint(1 << 30, (1,), generator=self.gen)))\
                    .sample(sharers, min(config.top_k, len(sharers)))
                weights = torch.softmax(torch.randn(len(picks), generator=self.gen), 0)
                entries[(layer, module)] = [(by_key[(layer, module, s)].piece_id, float(w))
                                            for s, w in zip(picks, weights)]
        return Recipe(entries, config.combination)

    def perfit_stage2(self):
        stage = new_stages(self.perfit_config, self.num_layers, self.hidden,
                           seed=int(torch.randint(1 << 30, (1,), generator=self.gen)))[1]
        with torch.no_grad():  # a trained stage 2 is not zero: give W and b some size
            for layer in stage.layers:
                stage[layer].learned_source.weight.normal_(0, 0.02, generator=self.gen)
                stage[layer].learned_source.bias.normal_(0, 0.02, generator=self.gen)
        return stage.to(self.device)

    # rows as the device / the service builds them
    def row(self, kind: str, payload) -> RowAdapter | None:
        if kind == "base":
            return None
        if kind == "lora-c":
            return RowAdapter(self.stage1, name=kind)
        if kind == "oppu":
            return RowAdapter(concat(self.stage1, piece_updates(payload)), name=kind)
        if kind == "perpcs":
            lookup = {p.piece_id: p for ps in self.pieces.values() for p in ps}
            return RowAdapter(concat(self.stage1, rebuild(payload, lookup)), name=kind)
        return RowAdapter(intervention=RowIntervention((self.perfit_stage1, payload),
                                                       self.perfit_config.positions), name=kind)

    def payload(self, kind: str):
        return {"oppu": self.oppu_pieces, "perpcs": self.recipe,
                "perfit": self.perfit_stage2}.get(kind, lambda: None)()


def _prompts(tokenizer, n: int, seed: int) -> tuple[list[str], list[list[int]]]:
    """``n`` real synthetic-task prompts: their texts (what a device sends) and token ids."""
    dataset = load_dataset("synthetic", None, num_users=n, seed=seed, queries_per_user=1)
    texts = [build_prompt(dataset.user(i).queries[0].input, task=dataset.task)
             for i in range(n)]
    return texts, [encode_prompt(tokenizer, text) for text in texts]


def _timed(engine, prompts, rows, new_tokens: int) -> float:
    started = time.perf_counter()
    engine.generate(prompts, rows, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    return time.perf_counter() - started


def bench_serve(model: str = "smollm2-135m", *, batch_sizes: Sequence[int] = (8, 32, 128),
                new_tokens: int = 16, repeats: int = 2, clients: int = 50,
                requests: int = 1000, max_batch: int = 32, sharers: int = 10,
                timeout: float = 1800.0, device: str | None = None, seed: int = 0,
                load_test: bool = True) -> dict[str, Any]:
    loaded = load_model(model, device=device, seed=seed)
    users = _Users(loaded.model, seed)
    for i in range(sharers):
        users.sharer(f"sharer-{i:02d}")
    biggest = max(batch_sizes)
    texts, prompts = _prompts(loaded.tokenizer, biggest, seed)
    payloads = {kind: [users.payload(kind) for _ in range(biggest)] for kind in KINDS}
    result: dict[str, Any] = {"model": loaded.name, "device": str(loaded.device),
                              "threads": torch.get_num_threads(), "new_tokens": new_tokens,
                              "repeats": repeats, "rows": []}
    with BatchedEngine(loaded.model, loaded.tokenizer) as engine:
        engine.generate(prompts[:2], [None, None], max_new_tokens=2)  # warm-up
        for size in batch_sizes:
            batch = prompts[:size]
            cases = {"base": [None] * size}
            # placed on the engine's device once, as the inference service keeps them
            for kind in KINDS:
                cases[kind] = [engine.place(users.row(kind, payloads[kind][i]))
                               for i in range(size)]
            cases["mixed"] = [engine.place(users.row(KINDS[i % len(KINDS)],
                                                     payloads[KINDS[i % len(KINDS)]][i]))
                              for i in range(size)]
            for name, rows in cases.items():
                seconds = statistics.median(_timed(engine, batch, rows, new_tokens)
                                            for _ in range(repeats))
                result["rows"].append({"batch": size, "case": name, "seconds": seconds,
                                       "tokens_per_second": size * new_tokens / seconds})
            if size == min(batch_sizes):  # one request per forward pass, the same requests
                started = time.perf_counter()
                for prompt, row in zip(batch, cases["mixed"]):
                    engine.generate([prompt], [row], max_new_tokens=new_tokens,
                                    min_new_tokens=new_tokens)
                seconds = time.perf_counter() - started
                result["rows"].append({"batch": size, "case": "one-at-a-time",
                                       "seconds": seconds,
                                       "tokens_per_second": size * new_tokens / seconds})
    for row in result["rows"]:
        base = next(r for r in result["rows"] if r["batch"] == row["batch"]
                    and r["case"] == "base")
        row["vs_base"] = row["tokens_per_second"] / base["tokens_per_second"]
    if load_test:
        result["load_test"] = _load_test(loaded, users, texts, prompts, clients=clients,
                                         requests=requests, max_batch=max_batch,
                                         new_tokens=new_tokens, timeout=timeout, seed=seed)
    return result


def _load_test(loaded, users: _Users, texts, prompts, *, clients: int, requests: int,
               max_batch: int, new_tokens: int, timeout: float, seed: int) -> dict[str, Any]:
    """The real service on 127.0.0.1 (TLS): ``clients`` threads, ``requests`` in all."""
    rng = random.Random(seed)
    # 64 distinct users (16 of each method), each asking one of 4 prompts: 256 distinct
    # requests, each answered alone first to check what the service answers
    people = [(kind, users.payload(kind)) for kind in KINDS for _ in range(16)]
    choices = min(4, len(prompts))
    asks = [(rng.randrange(len(people)), rng.randrange(choices)) for _ in range(requests)]
    with tempfile.TemporaryDirectory(prefix="pfl-bench-serve-") as tmp:
        tmp = Path(tmp)
        certs = crypto.write_dev_certs(tmp / "certs").directory
        store = PoolStore(tmp / "pool")
        for name, pieces in users.pieces.items():
            key = crypto.generate_device_key()
            store.submit([SignedPiece.sign(p, key, {"pool": True}) for p in pieces])
        limits = ServeLimits(max_batch=max_batch, max_wait_ms=10, max_pending=4 * requests,
                             max_per_client=requests, max_new_tokens=max(new_tokens, 1),
                             default_new_tokens=max(new_tokens, 1), max_prompt_tokens=2048)
        engine = BatchedEngine(loaded.model, loaded.tokenizer, max_rank=limits.max_rank)
        try:
            personalizer = Personalizer(engine, limits, stage1=users.stage1,
                                        perfit_stage1=users.perfit_stage1,
                                        perfit_positions=users.perfit_config.positions,
                                        pool=store)
            # what each distinct (person, prompt) answers alone, on the same engine
            expected = {}
            for person, prompt in sorted(set(asks)):
                kind, payload = people[person]
                tokens = engine.generate([prompts[prompt]],
                                         [engine.place(users.row(kind, payload))],
                                         max_new_tokens=new_tokens,
                                         min_new_tokens=new_tokens)[0]
                expected[(person, prompt)] = loaded.tokenizer.decode(
                    tokens, skip_special_tokens=True).strip()
            server = InferenceServer(engine, personalizer, certs, limits=limits,
                                     max_workers=clients + 8)
            try:
                return _drive(server, certs, people, asks, texts, expected, clients=clients,
                              new_tokens=new_tokens, timeout=timeout)
            finally:
                server.stop()
        finally:
            engine.close()
            store.close()


def _drive(server, certs, people, asks, texts, expected, *, clients: int, new_tokens: int,
           timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    latencies: list[float] = []
    rows: list[int] = []
    failures: list[str] = []
    wrong, wrong_kinds = 0, {}
    lock = threading.Lock()
    chunks = [list(range(i, len(asks), clients)) for i in range(clients)]

    def run(chunk):
        nonlocal wrong
        with InferenceClient(server.target, certs, timeout=max(1.0, timeout)) as client:
            for index in chunk:
                if time.monotonic() > deadline:
                    with lock:
                        failures.append("not sent: the time bound was reached")
                    continue
                person, prompt = asks[index]
                kind, payload = people[person]
                personalization = {"oppu": {"adapter_pieces": payload},
                                   "perpcs": {"recipe": payload},
                                   "perfit": {"perfit": payload}}.get(kind, {})
                started = time.perf_counter()
                try:
                    text = client.answer(texts[prompt], personalization,
                                         max_new_tokens=new_tokens,
                                         min_new_tokens=new_tokens)
                except Exception as exc:  # counted, and the run goes on
                    with lock:
                        failures.append(str(exc)[:200])
                    continue
                with lock:
                    latencies.append(time.perf_counter() - started)
                    rows.append(client.last_reply.batch_rows)
                    if text != expected[(person, prompt)]:
                        wrong += 1
                        wrong_kinds[kind] = wrong_kinds.get(kind, 0) + 1

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(run, chunks))
    wall = time.perf_counter() - started
    latencies.sort()

    def pct(q):
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else None

    return {"clients": clients, "requests": len(asks), "answered": len(latencies),
            "failed": len(failures), "wrong_answers": wrong, "wrong_by_method": wrong_kinds,
            "failures": failures[:5],
            "wall_seconds": wall, "requests_per_second": len(latencies) / wall,
            "tokens_per_second": len(latencies) * new_tokens / wall,
            "latency_p50": pct(0.50), "latency_p99": pct(0.99),
            "mean_batch_rows": statistics.fmean(rows) if rows else 0.0,
            "max_batch_rows": max(rows) if rows else 0}


def serve_table(result: dict[str, Any]) -> str:
    lines = [f"serving {result['model']} on {result['device']} ({result['threads']} threads), "
             f"{result['new_tokens']} new tokens a request, median of {result['repeats']}",
             f"{'batch':>5}  {'case':<14} {'tokens/s':>9} {'s/batch':>8} {'vs base':>8}"]
    for row in result["rows"]:
        lines.append(f"{row['batch']:>5}  {row['case']:<14} {row['tokens_per_second']:>9.1f} "
                     f"{row['seconds']:>8.2f} {row['vs_base']:>7.2f}x")
    load = result.get("load_test")
    if load:
        lines.append(
            f"load test: {load['clients']} clients, {load['answered']}/{load['requests']} "
            f"answered, {load['failed']} failed, {load['wrong_answers']} wrong; "
            f"{load['requests_per_second']:.1f} req/s, {load['tokens_per_second']:.1f} tok/s, "
            f"latency p50 {load['latency_p50'] or 0:.2f} s p99 {load['latency_p99'] or 0:.2f} s, "
            f"{load['mean_batch_rows']:.1f} rows a batch on average (max "
            f"{load['max_batch_rows']}), {load['wall_seconds']:.0f} s")
    return "\n".join(lines)


def serve_plot(result: dict[str, Any], path) -> Any:
    from simulations.plots import new_figure, save_figure  # matplotlib only for a figure

    fig, axis = new_figure(size=(6, 4))
    cases = [c for c in ("base", "lora-c", "oppu", "perpcs", "perfit", "mixed")
             if any(r["case"] == c for r in result["rows"])]
    for case in cases:
        points = [(r["batch"], r["tokens_per_second"]) for r in result["rows"]
                  if r["case"] == case]
        axis.plot(*zip(*points), marker="o", label=case)
    single = [r for r in result["rows"] if r["case"] == "one-at-a-time"]
    for r in single:
        axis.axhline(r["tokens_per_second"], color="grey", linestyle="--",
                     label="one user at a time")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("rows in a batch (distinct users)")
    axis.set_ylabel("generated tokens / s")
    axis.set_title(f"serving many users at once, {result['model']}")
    axis.set_ylim(bottom=0)
    axis.legend(fontsize=8)
    return save_figure(fig, path)
