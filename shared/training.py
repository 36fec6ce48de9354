"""The one training loop every method uses: examples from history, loss on target tokens only.

- :func:`history_examples` turns a user's history into (input_ids, labels) examples in the
  task's format, optionally with RAG (retrieving only from *earlier* items: no leakage) and a
  PAG profile in the prompt.
- :func:`target_loss` runs the decoder and applies the LM head only at the positions whose
  next token is a target token: the logits over the whole sequence and vocabulary are never
  built (on SmolLM2 the vocabulary is 49k, the target a handful of tokens).
- :func:`train` is AdamW with weight decay, linear schedule with warm-up and gradient-norm
  clipping (the papers' recipe), over whatever parameters the method made trainable.
"""

from __future__ import annotations

import itertools
import math
import random
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence, overload

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from shared.prompts import build_prompt, encode_example
from shared.retrieval import BM25Retriever
from shared.tasks import TaskSpec
from shared.types import HistoryItem

Example = tuple[list[int], list[int]]  # (input_ids, labels with -100 on prompt tokens)


@dataclass
class TrainConfig:
    """The papers' recipe: AdamW, linear schedule with warm-up, grad-norm clip."""

    epochs: float = 2.0
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 0.3
    batch_size: int = 4
    max_steps: int | None = None  # caps the number of optimizer steps (gates: 50-200)
    seed: int = 0
    max_prompt_tokens: int = 384
    max_target_tokens: int = 64
    # Recompute each decoder layer's activations in the backward pass instead of keeping them
    # (less memory, one more forward pass of compute per step). The PER-PCS/OPPU authors'
    # code trains this way (``grad_ckpt=True``); off by default here.
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        """A setting that cannot train (NaN, a negative rate, a zero batch, a string where a
        number goes) is a ValueError naming it, before any step runs (a rate of 0 is allowed:
        it trains nothing, which tests use)."""
        checks = {"epochs": (float, 0.0), "lr": (float, 0.0), "weight_decay": (float, 0.0),
                  "warmup_ratio": (float, 0.0), "max_grad_norm": (float, None),
                  "batch_size": (int, 1), "seed": (int, None), "max_prompt_tokens": (int, 1),
                  "max_target_tokens": (int, 1)}
        for name, (kind, low) in checks.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not math.isfinite(value) or (kind is int and value != int(value)):
                raise ValueError(f"{name} must be a finite {kind.__name__}, got {value!r}")
            if (low is None and name == "max_grad_norm" and value <= 0) or \
                    (low is not None and value < low):
                raise ValueError(f"{name} must be {'> 0' if low is None else f'>= {low}'}, "
                                 f"got {value!r}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio!r}")
        if self.max_steps is not None and (isinstance(self.max_steps, bool) or not isinstance(
                self.max_steps, int) or self.max_steps < 1):
            raise ValueError(f"max_steps must be a whole number >= 1, got {self.max_steps!r}")


@contextmanager
def seeded(seed: int, device: torch.device | str | None = None) -> Iterator[None]:
    """Run the block with torch's CPU generator (and ``device``'s, when it is a CUDA device)
    seeded with ``seed``; the caller's RNG state is restored afterwards.

    Same draws as ``fork_rng`` + ``torch.manual_seed`` on those devices, without the cost of
    the latter: ``torch.manual_seed`` also queues a seed for every accelerator backend torch
    knows of (CUDA, XPU, MTIA), recording a stack trace for each, about 2.5 ms a call on a
    machine that has none of them, a tenth of a tiny-model federated update."""
    device = torch.device(device or "cpu")
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(seed)
        if devices:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


class LazyExamples(Sequence[Example]):
    """Examples encoded when first read, then kept; reading them all gives, in the same order,
    the examples an eager encoding would. A step-capped update (a federated round of two
    steps over a long history) tokenizes only the few items it trains on, while ``len`` (the
    FedAvg weight, the epoch length) still counts every item."""

    def __init__(self, encoders: Sequence[Callable[[], Example]]):
        self._encoders = list(encoders)
        self._done: dict[int, Example] = {}  # in the order first read

    @classmethod
    def concat(cls, parts: Iterable["LazyExamples"]) -> "LazyExamples":
        """One sequence of several (e.g. each user's examples, pooled)."""
        return cls([encoder for part in parts for encoder in part._encoders])

    def __len__(self) -> int:
        return len(self._encoders)

    @overload
    def __getitem__(self, index: int) -> Example: ...

    @overload
    def __getitem__(self, index: slice) -> list[Example]: ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = range(len(self))[index]  # negative indices, and IndexError past the end
        if index not in self._done:
            self._done[index] = self._encoders[index]()
        return self._done[index]

    def encoded(self, start: int = 0) -> list[Example]:
        """The examples read so far, in the order first read, from the ``start``-th on (a
        batch is encoded before the model runs on it)."""
        return list(itertools.islice(self._done.values(), start, None))

    def encoded_count(self) -> int:
        """How many examples have been read so far."""
        return len(self._done)


def history_examples(task: TaskSpec, history: Sequence[HistoryItem], tokenizer, *,
                     rag_k: int = 0, profile: str | None = None,
                     max_prompt_tokens: int = 384, max_target_tokens: int = 64) -> LazyExamples:
    """One example per history item in the task's format, each encoded when first read
    (:class:`LazyExamples`).

    With ``rag_k`` > 0, item i's prompt holds the top-k BM25 matches among items 0..i-1 only.
    """
    retriever = BM25Retriever(task, history) if rag_k > 0 else None

    def encoder(index: int, item: HistoryItem) -> Callable[[], Example]:
        def encode() -> Example:
            instruction, target = task.history_example(item)
            retrieved = (retriever.top_k(task.corpus_text(item), rag_k, before=index)
                         if retriever else ())
            prompt = build_prompt(instruction, profile=profile, retrieved=retrieved, task=task)
            return encode_example(tokenizer, prompt, target, max_prompt_tokens,
                                  max_target_tokens)
        return encode

    return LazyExamples([encoder(index, item) for index, item in enumerate(history)])


def collate(examples: Sequence[Example], pad_id: int,
            device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Right-padded batch (training); padding is masked out and labelled -100."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        attention[row, : len(ids)] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention.to(device),
            "labels": labels.to(device)}


def batches(examples: Sequence[Example], batch_size: int, pad_id: int, *, shuffle: bool,
            seed: int = 0, device: torch.device | str = "cpu") -> Iterator[dict]:
    order = list(range(len(examples)))
    if shuffle:
        random.Random(seed).shuffle(order)
    for start in range(0, len(order), batch_size):
        yield collate([examples[i] for i in order[start: start + batch_size]], pad_id, device)


def target_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of every position whose *next* token is a target token, and those tokens."""
    next_labels = labels[:, 1:]
    rows, cols = torch.nonzero(next_labels != -100, as_tuple=True)
    return (rows, cols), next_labels[rows, cols]


def target_loss(model: torch.nn.Module, batch: dict, *, reduction: str = "mean") -> torch.Tensor:
    """Causal-LM cross-entropy on target tokens, with logits computed only where needed."""
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    hidden = decoder(input_ids=batch["input_ids"],
                     attention_mask=batch["attention_mask"]).last_hidden_state
    (rows, cols), targets = target_positions(batch["labels"])
    logits = head(hidden[rows, cols]).float()
    return F.cross_entropy(logits, targets, reduction=reduction)


def full_logits_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The same loss through the model's own forward (all logits): the reference for tests
    and for ``pfl bench model``'s comparison."""
    return model(**batch).loss


def _linear_schedule(optimizer, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _checkpointing(model: torch.nn.Module, enable: bool) -> None:
    """Switch transformers' activation checkpointing of the decoder layers on or off.

    Reentrant checkpointing recomputes each whole layer in the backward pass, as
    ``torch.utils.checkpoint.checkpoint(layer, ...)`` did in the authors' code (the
    non-reentrant kind stops recomputing early). The RNG state is replayed, so dropout masks,
    and so the trained values, are those of a run without it. transformers makes the
    embeddings' output require grad for it; that hook is removed again when switching off."""
    if enable:
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": True})
        if not any(getattr(module, "gradient_checkpointing", False) is True
                   for module in model.modules()):  # a release that moved the switch
            raise RuntimeError("gradient checkpointing was asked for, but transformers' "
                               "activation_checkpointing_enable switched no layer of "
                               f"{type(model).__name__} to it")
        return
    model.activation_checkpointing_disable()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base, "_require_grads_hook", None) is not None:
        base.disable_input_require_grads()


def train(model: torch.nn.Module, parameters: Iterable[torch.nn.Parameter],
          examples: Sequence[Example], config: TrainConfig, pad_id: int, *,
          desc: str = "train", progress: bool = True) -> dict:
    """Train ``parameters`` (the only ones given to the optimizer) on ``examples``.

    Returns {"steps", "loss_first", "loss_last", "tokens"}.
    """
    params = [p for p in parameters if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires grad")
    if not examples:
        raise ValueError("nothing to train on: no examples")
    device = params[0].device
    steps_per_epoch = math.ceil(len(examples) / config.batch_size)
    total = max(1, math.ceil(steps_per_epoch * config.epochs))
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = _linear_schedule(optimizer, int(config.warmup_ratio * total), total)
    was_training = model.training
    model.train()
    losses, tokens, step, epoch = [], 0, 0, 0
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False)
    if config.gradient_checkpointing:
        _checkpointing(model, True)
    try:
        while step < total:
            for batch in batches(examples, config.batch_size, pad_id, shuffle=True,
                                 seed=config.seed + epoch, device=device):
                loss = target_loss(model, batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                losses.append(loss.item())
                tokens += int(batch["attention_mask"].sum())
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                if step >= total:
                    break
            epoch += 1
    finally:
        bar.close()
        if config.gradient_checkpointing:
            _checkpointing(model, False)
        model.train(was_training)
    return {"steps": step, "loss_first": losses[0], "loss_last": losses[-1], "tokens": tokens}
