"""Batched generation with left padding: greedy by default, the papers' sampling as an option."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from shared.errors import PflError
from shared.prompts import encode_prompt, pad_token_id


@dataclass(frozen=True)
class GenerationConfig:
    """Greedy decoding unless ``sample``; then the papers' temperature 0.1, top-k 10, top-p 0.9."""

    max_new_tokens: int = 32
    batch_size: int = 8
    max_prompt_tokens: int = 512
    sample: bool = False
    temperature: float = 0.1
    top_k: int = 10
    top_p: float = 0.9
    seed: int = 0


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int,
             device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Left-padded input_ids and attention_mask: every prompt ends at the last column."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        if ids:
            input_ids[row, width - len(ids):] = torch.tensor(list(ids))
            attention[row, width - len(ids):] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention.to(device)}


@torch.inference_mode()
def generate(model: torch.nn.Module, tokenizer, prompts: Sequence[str],
             config: GenerationConfig = GenerationConfig(), *, desc: str = "generate",
             progress: bool = True,
             on_batch: Callable[[list[int], int], None] | None = None) -> list[str]:
    """Continue each prompt; returns the decoded new text, stripped, in the prompts' order.

    Prompts are sorted by length so that batches carry little padding. ``on_batch(lengths,
    width)`` is called before each batch with its prompts' lengths and the padded width (for
    methods that act on prompt positions, such as PerFit's interventions).
    """
    encoded = [encode_prompt(tokenizer, p, config.max_prompt_tokens) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    outputs: list[str] = [""] * len(encoded)
    pad_id = pad_token_id(tokenizer)
    device = next(model.parameters()).device
    options = dict(max_new_tokens=config.max_new_tokens, pad_token_id=pad_id,
                   eos_token_id=tokenizer.eos_token_id)
    if config.sample:
        torch.manual_seed(config.seed)
        options.update(do_sample=True, temperature=config.temperature, top_k=config.top_k,
                       top_p=config.top_p)
    else:
        options.update(do_sample=False, temperature=None, top_k=None, top_p=None)
    with tqdm(total=len(encoded), desc=desc, disable=not progress, leave=False) as bar:
        for start in range(0, len(order), config.batch_size):
            rows = order[start: start + config.batch_size]
            batch = left_pad([encoded[i] for i in rows], pad_id, device)
            if on_batch is not None:
                on_batch([len(encoded[i]) for i in rows], batch["input_ids"].shape[1])
            generated = model.generate(**batch, **options)
            new_tokens = generated[:, batch["input_ids"].shape[1]:]
            for row, tokens in zip(rows, new_tokens):
                outputs[row] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
            bar.update(len(rows))
    return outputs


def engine_generate(engine, tokenizer, row, prompts: Sequence[str],
                    config: GenerationConfig = GenerationConfig(), *, desc: str = "generate",
                    progress: bool = True) -> list[str]:
    """:func:`generate` for one user whose personalization is ``row`` (a
    :class:`shared.serving.rows.RowAdapter`, None: the base model), on ``engine``: anything
    with :class:`shared.serving.engine.BatchedEngine`'s ``generate(prompts, adapters)``, such
    as :class:`edge_client.ondevice.runtime.OnnxEngine`. Same prompt encoding, length order
    and batches as :func:`generate`; greedy only."""
    if config.sample:
        raise PflError("an answer engine decodes greedily; sampling needs the PyTorch backend")
    encoded = [encode_prompt(tokenizer, p, config.max_prompt_tokens) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    outputs: list[str] = [""] * len(encoded)
    with tqdm(total=len(encoded), desc=desc, disable=not progress, leave=False) as bar:
        for start in range(0, len(order), config.batch_size):
            rows = order[start: start + config.batch_size]
            tokens = engine.generate([encoded[i] for i in rows], [row] * len(rows),
                                     max_new_tokens=config.max_new_tokens)
            for i, new in zip(rows, tokens):
                outputs[i] = tokenizer.decode(new, skip_special_tokens=True).strip()
            bar.update(len(rows))
    return outputs
