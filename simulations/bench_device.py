"""``pfl bench device``: answering on a device, PyTorch against ONNX Runtime (fp32, and the
weight-only int8 and int4 graphs), at batch 1 and 8.

For each backend and batch size: the time to first token (the prompt's forward pass and the
first greedy token), the decode rate (new tokens per second after the first, over all rows),
and the peak resident memory of the process. Each backend runs in a process of its own, so
its peak memory is its own: the PyTorch process loads the model; an ONNX Runtime process
loads only the graph, the tokenizer and the user's rows, no model weights. Both import the
same libraries first (the rows' builders use torch): ``baseline`` is the memory after the
imports, before any weights, so ``peak - baseline`` is what the backend itself adds (the
imports happen when the module loads, before :func:`measure` reads the baseline).

Rows are a user's real OPPU personalization shapes (stage 1, rank 8 on q, k, v, plus the
personal LoRA, rank 8 on q, v; random values: the cost does not depend on them), the same
for every backend. Prompts are real synthetic-task queries. Every request decodes exactly
``new_tokens`` tokens (EOS suppressed), medians of ``repeats`` runs after one warm-up.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Sequence

import torch
from transformers import AutoModelForCausalLM

from edge_client.ondevice.export import exported_graph
from edge_client.ondevice.runtime import OnnxEngine
from shared.models import load_model, load_tokenizer, model_config
from shared.serving.engine import BatchedEngine
from simulations.bench_serve import _prompts, _Users

BACKENDS = ("torch", "onnx", "onnx-int8", "onnx-int4")


def _rows(model_name: str, n: int, seed: int, model=None) -> list:
    """``n`` OPPU-shaped rows; without ``model``, shapes come from the model's config on the
    meta device (no weights in memory)."""
    if model is None:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config(model_name))
    users = _Users(model, seed)
    return [users.row("oppu", users.payload("oppu")) for _ in range(n)]


def _memory(field: str = "VmHWM") -> int:
    """This process's peak (``VmHWM``) or current (``VmRSS``) resident memory in bytes.
    VmHWM starts afresh at exec (getrusage's ru_maxrss would carry the parent's peak over a
    fork and exec)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux


def measure(backend: str, model_name: str, batch_sizes: Sequence[int], new_tokens: int,
            repeats: int, threads: int, seed: int = 0) -> dict[str, Any]:
    """One backend's figures, in this process (see the module docstring)."""
    torch.set_num_threads(threads)
    tokenizer = load_tokenizer()  # both backends' processes hold the tokenizer
    baseline = _memory("VmRSS")  # the libraries, before any weights
    started = time.perf_counter()
    if backend == "torch":
        loaded = load_model(model_name, device="cpu", seed=seed)
        rows = _rows(model_name, max(batch_sizes), seed, loaded.model)
        engine = BatchedEngine(loaded.model, tokenizer)
    else:
        rows = _rows(model_name, max(batch_sizes), seed)
        quantization = "fp32" if backend == "onnx" else backend.split("-", 1)[1]
        path = os.environ["PFL_BENCH_GRAPH_" + quantization.upper()]
        engine = OnnxEngine(path, tokenizer, threads=threads)
    load_seconds = time.perf_counter() - started
    _, prompts = _prompts(tokenizer, max(batch_sizes), seed)
    out = []
    for batch in batch_sizes:
        p, r = prompts[:batch], rows[:batch]
        engine.generate(p, r, max_new_tokens=2, min_new_tokens=2)  # warm-up
        first, full = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            engine.generate(p, r, max_new_tokens=1, min_new_tokens=1)
            first.append(time.perf_counter() - t)
            t = time.perf_counter()
            engine.generate(p, r, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
            full.append(time.perf_counter() - t)
        ttft, total = statistics.median(first), statistics.median(full)
        out.append({"batch": batch, "ttft_seconds": ttft, "total_seconds": total,
                    "prompt_tokens": sum(len(x) for x in p),
                    "decode_tokens_per_second": batch * (new_tokens - 1) / max(total - ttft,
                                                                                 1e-9)})
    return {"backend": backend, "load_seconds": load_seconds, "peak_rss_bytes": _memory(),
            "baseline_rss_bytes": baseline, "pid": os.getpid(), "rows": out}


def bench_device(model: str = "smollm2-135m", *, batch_sizes: Sequence[int] = (1, 8),
                 new_tokens: int = 32, repeats: int = 3, threads: int = 2,
                 backends: Sequence[str] = BACKENDS, cache=None, seed: int = 0) -> dict:
    """Every backend's figures, each measured in a fresh process."""
    env = dict(os.environ)
    if any(b != "torch" for b in backends):
        loaded = load_model(model, device="cpu", seed=seed)
        for backend in backends:
            if backend != "torch":
                q = "fp32" if backend == "onnx" else backend.split("-", 1)[1]
                env["PFL_BENCH_GRAPH_" + q.upper()] = str(
                    exported_graph(loaded, quantization=q, cache=cache))
    results = []
    for backend in backends:
        spec = json.dumps({"backend": backend, "model_name": model,
                           "batch_sizes": list(batch_sizes), "new_tokens": new_tokens,
                           "repeats": repeats, "threads": threads, "seed": seed})
        env.update(OMP_NUM_THREADS=str(threads))
        done = subprocess.run([sys.executable, "-m", "simulations.bench_device", spec],
                              env=env, capture_output=True, text=True, timeout=3600)
        if done.returncode != 0:
            raise RuntimeError(f"bench device {backend} failed:\n{done.stderr[-3000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    base = {r["batch"]: r for r in results[0]["rows"]} if results else {}
    for result in results:
        for row in result["rows"]:
            ref = base.get(row["batch"])
            row["decode_vs_first"] = row["decode_tokens_per_second"] / \
                ref["decode_tokens_per_second"] if ref else None
            row["ttft_vs_first"] = ref["ttft_seconds"] / row["ttft_seconds"] if ref else None
    return {"model": model, "threads": threads, "new_tokens": new_tokens, "repeats": repeats,
            "batch_sizes": list(batch_sizes), "row": "oppu (stage 1 + personal LoRA)",
            "machine": f"{os.cpu_count()} CPU cores", "results": results}


def device_table(result: dict) -> str:
    lines = [f"answering on the device: {result['model']}, {result['threads']} thread(s), "
             f"{result['row']} rows, {result['new_tokens']} new tokens a request, median of "
             f"{result['repeats']}",
             f"{'backend':<10} {'batch':>5} {'TTFT s':>8} {'decode tok/s':>13} "
             f"{'vs ' + result['results'][0]['backend']:>9} {'peak MB':>8} "
             f"{'- libs':>7} {'load s':>7}"]
    for r in result["results"]:
        for row in r["rows"]:
            lines.append(f"{r['backend']:<10} {row['batch']:>5} {row['ttft_seconds']:>8.3f} "
                         f"{row['decode_tokens_per_second']:>13.1f} "
                         f"{row['decode_vs_first']:>8.2f}x {r['peak_rss_bytes'] / 2**20:>8.0f} "
                         f"{(r['peak_rss_bytes'] - r['baseline_rss_bytes']) / 2**20:>7.0f} "
                         f"{r['load_seconds']:>7.1f}")
    return "\n".join(lines)


def device_plot(result: dict, path) -> Any:
    from simulations.plots import new_figure, save_figure  # matplotlib only for a figure

    fig, axes = new_figure(ncols=3, size=(13, 4))
    names = [r["backend"] for r in result["results"]]
    width = 0.8 / len(result["batch_sizes"])
    for i, batch in enumerate(result["batch_sizes"]):
        xs = [j + i * width for j in range(len(names))]
        rows = [next(x for x in r["rows"] if x["batch"] == batch) for r in result["results"]]
        axes[0].bar(xs, [x["ttft_seconds"] for x in rows], width, label=f"batch {batch}")
        axes[1].bar(xs, [x["decode_tokens_per_second"] for x in rows], width,
                    label=f"batch {batch}")
    axes[2].bar(range(len(names)), [r["baseline_rss_bytes"] / 2**20
                                    for r in result["results"]], label="libraries")
    axes[2].bar(range(len(names)), [(r["peak_rss_bytes"] - r["baseline_rss_bytes"]) / 2**20
                                    for r in result["results"]],
                bottom=[r["baseline_rss_bytes"] / 2**20 for r in result["results"]],
                label="model / graph and run")
    axes[2].legend()
    for axis, title in zip(axes, ("time to first token (s)", "decode tokens/s",
                                  "peak resident memory (MB)")):
        axis.set_xticks([j + width * (len(result["batch_sizes"]) - 1) / 2
                         if axis is not axes[2] else j for j in range(len(names))])
        axis.set_xticklabels(names)
        axis.set_title(title)
    axes[0].legend()
    fig.suptitle(f"{result['model']} on the device, {result['threads']} thread(s)")
    return save_figure(fig, path)


if __name__ == "__main__":  # one backend, in its own process (bench_device runs it)
    spec = json.loads(sys.argv[1])
    print(json.dumps(measure(**spec)))
