"""``pfl bench attack``: both services under attack, over loopback with TLS.

For the piece pool (``ListGates`` on a pool of a few gated pieces) and for ``pfl serve``
(``Generate`` on the tiny model, or another), honest clients (each its own connection, one
call at a time) call for ``seconds``; the same is then repeated beside attackers:

- ``held`` streams (on ``held // 8 + 1`` connections) that send their headers and never their
  request, renewed as the server ends them (a slow-loris client);
- one flooding connection that keeps as many calls in flight as its ``flood`` threads can.

It reports the honest calls' p50 / p99 latency and failures without and with the attack, and
what happened to the attackers' calls. The target (what ``cloud_server.rpc.Admission`` is
for): honest p99 within 2x of the run without attackers, no honest call failed.
"""

from __future__ import annotations

import multiprocessing
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import grpc
import torch

from edge_client.inference_client import InferenceClient
from edge_client.pool_client import PoolClient
from shared import crypto
from shared.methods.perpcs.pieces import Piece
from simulations.deploy import free_port, wait_for_port


def _pieces(n: int = 8) -> list[Piece]:
    g = torch.Generator().manual_seed(0)
    return [Piece("bench", layer, "q_proj", torch.randn(2, 8, generator=g),
                  torch.randn(6, 2, generator=g) * 0.1, 0.5, torch.randn(8, generator=g))
            for layer in range(n)]


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _honest(call: Callable[[], Any], clients: int, seconds: float) -> dict[str, Any]:
    """``clients`` threads calling ``call()`` (each made with its own connection) for
    ``seconds``; latencies and failures."""
    latencies: list[float] = []
    failures: dict[str, int] = {}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def run():
        while time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                call()
                with lock:
                    latencies.append(time.perf_counter() - started)
            except Exception as exc:  # the benchmark counts what failed, by kind
                code = getattr(exc, "code", None)
                name = code().name if callable(code) else str(code or type(exc).__name__)
                with lock:
                    failures[name] = failures.get(name, 0) + 1

    threads = [threading.Thread(target=run) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 120)
    return {"calls": len(latencies), "failed": sum(failures.values()), "failures": failures,
            "p50_ms": 1000 * _percentile(latencies, 0.5),
            "p99_ms": 1000 * _percentile(latencies, 0.99),
            "mean_ms": 1000 * statistics.fmean(latencies) if latencies else float("nan")}


class _Attack:
    """Held-open streams renewed as they end, and a flooding connection, until stopped."""

    def __init__(self, target: str, ca: bytes, held_method: str, flood: Callable[[], Any],
                 held: int, flood_threads: int):
        self.stop = threading.Event()
        self.counts = {"held_opened": 0, "held_ended_by_server": 0, "flood_ok": 0,
                       "flood_refused": 0, "flood_other": 0}
        self.lock = threading.Lock()
        creds = grpc.ssl_channel_credentials(ca)
        self.channels = [grpc.secure_channel(target, creds) for _ in range(held // 8 + 1)]
        self.held_method, self.held, self.flood = held_method, held, flood
        self.threads = [threading.Thread(target=self._hold, args=(i,)) for i in range(held)]
        self.threads += [threading.Thread(target=self._flood) for _ in range(flood_threads)]

    def _count(self, key: str) -> None:
        with self.lock:
            self.counts[key] += 1

    def _hold(self, i: int) -> None:
        call = self.channels[i % len(self.channels)].stream_unary(
            self.held_method, request_serializer=None, response_deserializer=None)

        def nothing():
            self.stop.wait(600)
            return
            yield

        while not self.stop.is_set():
            self._count("held_opened")
            try:
                call(nothing(), timeout=600)
            except grpc.RpcError:
                if not self.stop.is_set():
                    self._count("held_ended_by_server")

    def _flood(self) -> None:
        while not self.stop.is_set():
            try:
                self.flood()
                self._count("flood_ok")
            except Exception as exc:  # refused or otherwise failed: counted
                code = getattr(exc, "code", None)
                name = code().name if callable(code) else ""
                self._count("flood_refused" if name == "RESOURCE_EXHAUSTED" else "flood_other")

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        time.sleep(1.0)  # the streams are open before the honest clients start
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for channel in self.channels:
            channel.close()
        for thread in self.threads:
            thread.join(30)


def _client_call(kind: str, target: str, certs: str):
    """A call of ``kind`` (``pool``: ListGates; ``serve``: a short Generate), each thread with
    its own kept connection; ``shared`` makes every thread use one connection."""
    local = threading.local()

    def call():
        client = getattr(local, "client", None)
        if client is None:
            if kind == "pool":
                client = local.client = PoolClient(target, certs, timeout=60)
            else:
                client = local.client = InferenceClient(target, certs, timeout=60)
        if kind == "pool":
            return client.list_gates()
        return client.generate(PROMPT, max_new_tokens=4)

    return call


def _attacker(kind: str, target: str, certs: str, held_method: str, held: int,
              flood: int, stop, out) -> None:
    """The attackers, in a process of their own (so their threads do not share the honest
    clients' interpreter): held streams and one flooding connection until ``stop``."""
    if kind == "pool":
        client = PoolClient(target, certs, timeout=60)
        flood_call = client.list_gates
    else:
        client = InferenceClient(target, certs, timeout=60)
        flood_call = lambda: client.generate(PROMPT, max_new_tokens=4)  # noqa: E731
    ca = (Path(certs) / "ca.pem").read_bytes()
    attack = _Attack(target, ca, held_method, flood_call, held, flood)
    with attack:
        stop.wait(3600)
    out.put(dict(attack.counts))


def _measure(name: str, kind: str, target: str, certs: str, held_method: str, *,
             clients: int, seconds: float, held: int, flood: int) -> dict[str, Any]:
    honest = _client_call(kind, target, certs)
    honest()  # warm: connections, the first batch
    quiet = _honest(honest, clients, seconds)
    context = multiprocessing.get_context("spawn")
    stop, out = context.Event(), context.Queue()
    attacker = context.Process(target=_attacker, args=(kind, target, certs, held_method, held,
                                                       flood, stop, out))
    attacker.start()
    try:
        time.sleep(8.0)  # the attacker's process is up and its streams are open
        attacked = _honest(honest, clients, seconds)
    finally:
        stop.set()
        counts = out.get(timeout=120) if attacker.is_alive() or not out.empty() else {}
        attacker.join(60)
        if attacker.is_alive():
            attacker.kill()
    return {"service": name, "without_attack": quiet, "under_attack": attacked,
            "attack": counts, "held": held, "flood_threads": flood,
            "p99_ratio": attacked["p99_ms"] / quiet["p99_ms"] if quiet["p99_ms"] else None}


PROMPT = "Rate this item from 1 to 5: a book."


def _service(args: list[str], port: int, log: Path):
    """A service process (``pfl ...``), listening on ``port`` when this returns."""
    process = subprocess.Popen([str(Path(sys.executable).parent / "pfl"), *args],
                               stdout=log.open("wb"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        wait_for_port(port, process, log, timeout=180)
    except BaseException:
        process.kill()
        raise
    return process


def bench_attack(*, clients: int = 4, seconds: float = 15.0, held: int = 64, flood: int = 32,
                 model: str = "tiny", services=("pool", "serve")) -> dict[str, Any]:
    """Honest latency of each service without and with attackers (see the module). Each
    service runs in its own process, the attackers in another, the honest clients here."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        certs = crypto.write_dev_certs(Path(tmp) / "certs").directory
        if "pool" in services:
            port = free_port()
            process = _service(["pool", "serve", "--db", str(Path(tmp) / "pool"), "--port",
                                str(port), "--certs", str(certs), "--open"], port,
                               Path(tmp) / "pool.log")
            try:
                target = f"127.0.0.1:{port}"
                with PoolClient(target, certs, timeout=30) as seed:
                    seed.submit(_pieces(), crypto.generate_device_key(), {"pool": True})
                rows.append(_measure("pool (ListGates)", "pool", target, str(certs),
                                     "/pfl.v1.PiecePool/SubmitPieces", clients=clients,
                                     seconds=seconds, held=held, flood=flood))
            finally:
                process.terminate()
                process.wait(30)
        if "serve" in services:
            port = free_port()
            process = _service(["serve", "--certs", str(certs), "--port", str(port),
                                "--model", model], port, Path(tmp) / "serve.log")
            try:
                rows.append(_measure("pfl serve (Generate)", "serve", f"127.0.0.1:{port}",
                                     str(certs), "/pfl.v1.Inference/Generate",
                                     clients=clients, seconds=seconds, held=held,
                                     flood=flood))
            finally:
                process.terminate()
                process.wait(30)
    return {"clients": clients, "seconds": seconds, "held": held, "flood": flood,
            "model": model, "rows": rows}


def attack_table(result: dict[str, Any]) -> str:
    lines = [f"{result['clients']} honest clients for {result['seconds']:.0f} s each way; "
             f"attack: {result['held']} held-open streams + 1 connection flooding with "
             f"{result['flood']} threads",
             f"{'service':<22} {'honest p50/p99 (ms), no attack':>31} "
             f"{'under attack':>18} {'p99 x':>6} {'failed':>7}  attackers"]
    for row in result["rows"]:
        q, a = row["without_attack"], row["under_attack"]
        ratio = row["p99_ratio"]
        lines.append(f"{row['service']:<22} {q['p50_ms']:>14.1f} / {q['p99_ms']:<14.1f} "
                     f"{a['p50_ms']:>8.1f} / {a['p99_ms']:<7.1f} "
                     f"{(f'{ratio:.2f}' if ratio else '-'):>6} {a['failed']:>7}  "
                     + ", ".join(f"{k} {v}" for k, v in row["attack"].items()))
    return "\n".join(lines)
