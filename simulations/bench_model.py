"""``pfl bench model``: forward and training-step throughput, and what target-only logits save.

For each batch size it times, on random token sequences of a fixed length:
- ``forward``: an inference forward pass over the full sequence (tokens/s);
- ``train step (full logits)``: forward + backward of a LoRA (q,v; r=8) with the model's own
  loss, which builds logits over every position and the whole vocabulary;
- ``train step (target logits)``: the same step through :func:`shared.training.target_loss`,
  which applies the LM head only at the target positions (the last ``target_len`` tokens).
Medians over ``repeats`` runs after one warm-up; the speed-up column is the ratio of the two
training steps measured in the same run.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Sequence

import torch
from peft import LoraConfig, get_peft_model

from shared.models import load_model
from shared.report import format_table
from shared.training import full_logits_loss, target_loss


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _batch(vocab: int, batch_size: int, seq_len: int, target_len: int, device) -> dict:
    generator = torch.Generator().manual_seed(batch_size)
    ids = torch.randint(10, vocab, (batch_size, seq_len), generator=generator)
    labels = torch.full_like(ids, -100)
    labels[:, -target_len:] = ids[:, -target_len:]
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "labels": labels.to(device)}


def bench_model(model_name: str | None = None, *, batch_sizes: Sequence[int] = (1, 4, 8),
                seq_len: int = 128, target_len: int = 8, repeats: int = 3,
                device: str | None = None, cache_dir: str | None = None) -> dict:
    loaded = load_model(model_name, device=device, cache=cache_dir)
    base = loaded.model
    trainee = get_peft_model(copy.deepcopy(base),
                             LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                        lora_dropout=0.0))
    params = [p for p in trainee.parameters() if p.requires_grad]
    vocab = base.config.vocab_size
    rows = []
    for bs in batch_sizes:
        batch = _batch(vocab, bs, seq_len, target_len, loaded.device)
        tokens = bs * seq_len

        def forward():
            with torch.inference_mode():
                base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

        def step(loss_fn):
            def run():
                loss = loss_fn(trainee, batch)
                loss.backward()
                for p in params:
                    p.grad = None
            return run

        fwd = _median_seconds(forward, repeats)
        full = _median_seconds(step(full_logits_loss), repeats)
        target = _median_seconds(step(target_loss), repeats)
        rows.append({"batch_size": bs, "seq_len": seq_len, "target_len": target_len,
                     "forward_tokens_per_s": tokens / fwd,
                     "train_full_logits_tokens_per_s": tokens / full,
                     "train_target_logits_tokens_per_s": tokens / target,
                     "target_logits_speedup": full / target})
    return {"model": loaded.name, "device": str(loaded.device),
            "threads": torch.get_num_threads(), "rows": rows}


def bench_table(result: dict) -> str:
    headers = ["batch", "forward tok/s", "train tok/s (full logits)",
               "train tok/s (target logits)", "speed-up"]
    rows = [[str(r["batch_size"]), f"{r['forward_tokens_per_s']:,.0f}",
             f"{r['train_full_logits_tokens_per_s']:,.0f}",
             f"{r['train_target_logits_tokens_per_s']:,.0f}",
             f"{r['target_logits_speedup']:.2f}x"] for r in result["rows"]]
    first = result["rows"][0]
    title = (f"model {result['model']} on {result['device']} ({result['threads']} threads), "
             f"sequence {first['seq_len']} tokens, {first['target_len']} target tokens")
    return title + "\n" + format_table(headers, rows)
