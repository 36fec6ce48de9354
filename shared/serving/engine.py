"""Many users in one forward pass: greedy generation for a batch whose rows each carry their
own low-rank updates and PerFit intervention, on one copy of the frozen base model.

- The base linear layers run once for the whole batch.
- Each wrapped linear module then adds, for the rows that have an update there, that row's
  ``(x A_i^T) B_i^T``: the rows' factors are gathered into (rows, R, d) stacks, zero-padded to
  the batch's largest rank R, and applied with two batched matmuls (the torch fallback of
  vLLM's ``bgmv`` and Punica's kernels does the same). Zero padding adds exact zeros.
- A hook on each decoder layer applies each PerFit row's stages at that row's own prompt
  positions (the row's prompt sits at the right end of a left-padded batch); decoding steps
  past the prompt are not intervened, as in :func:`shared.methods.perfit.model.generate`.

Each row's arithmetic is its own: a row gets the same greedy tokens in a mixed batch as alone
(tested in float64, where rounding cannot flip an argmax; in float32 the base model's batched
matmuls may differ in the last bit between batch shapes, as any batched inference does).

The engine owns its model: it wraps the linear modules once (``close()`` puts the originals
back) and must not be used by two threads at once (the service's batcher serializes calls).
"""

from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager
from typing import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from shared.errors import PflError
from shared.generation import left_pad
from shared.methods.perfit.model import window_start
from shared.methods.perfit.positions import intervention_mask
from shared.methods.perpcs.pieces import Key, MODULE_PARENT, decoder_layers, key_order
from shared.serving.rows import RowAdapter, module_shapes
from shared.training import target_positions

#: Modules the engine can carry updates on (every linear module of a Llama decoder layer).
SERVED_MODULES = tuple(MODULE_PARENT)


class MultiLoraLinear(nn.Module):
    """A linear module plus per-row low-rank updates for the current batch (none: the base)."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.rows: torch.Tensor | None = None  # (n,) batch rows that have an update here
        self.A: torch.Tensor | None = None  # (n, R, d_in)
        self.B: torch.Tensor | None = None  # (n, d_out, R)
        self.last_row = -1  # the largest row with an update (a Python int: no device sync)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def set_rows(self, rows: Sequence[int], updates: Sequence, device, dtype) -> None:
        """This batch's updates: ``updates[j]`` (a LoraUpdate) for batch row ``rows[j]``."""
        if not rows:
            self.rows = self.A = self.B = None
            return
        rank = max(u.A.shape[0] for u in updates)
        d_out, d_in = self.base.weight.shape
        A = torch.zeros(len(rows), rank, d_in, dtype=dtype, device=device)
        B = torch.zeros(len(rows), d_out, rank, dtype=dtype, device=device)
        for j, update in enumerate(updates):
            r = update.A.shape[0]
            A[j, :r] = update.A.to(dtype)
            B[j, :, :r] = update.B.to(dtype)
        self.rows = torch.tensor(list(rows), dtype=torch.long, device=device)
        self.A, self.B = A, B
        self.last_row = max(rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.rows is None:
            return y
        if x.shape[0] <= self.last_row:
            raise RuntimeError("the batch changed size under the engine (beams are not supported)")
        xs = x.index_select(0, self.rows).to(self.A.dtype)  # (n, seq, d_in)
        delta = torch.bmm(torch.bmm(xs, self.A.transpose(1, 2)), self.B.transpose(1, 2))
        return y.index_add(0, self.rows, delta.to(y.dtype))


class _Interventions:
    """Per-row PerFit for the current batch: for each row with an intervention, its stages
    and the batch columns of its intervened prompt positions."""

    def __init__(self):
        self.rows: list[tuple[int, object, torch.Tensor]] = []  # (row, RowIntervention, cols)
        self.layers: frozenset[int] = frozenset()  # the layers any row intervenes on
        self.width = 0  # the prompt columns: a call past them (a decoding step) changes nothing

    def set_rows(self, adapters: Sequence[RowAdapter | None], lengths: Sequence[int],
                 width: int, device) -> None:
        self.rows, layers = [], set()
        for row, adapter in enumerate(adapters):
            if adapter is None or adapter.intervention is None:
                continue
            mask = intervention_mask([lengths[row]], width, adapter.intervention.positions,
                                     "left")[0]
            self.rows.append((row, adapter.intervention, mask.nonzero().flatten().to(device)))
            layers.update(adapter.intervention.layers)
        self.layers, self.width = frozenset(layers), width

    def hook(self, layer: int):
        def apply(module, args, kwargs, output):
            # Cheap exits first: a layer no row intervenes on, or a decoding step (its columns
            # lie past every prompt), needs neither the window's start (a device sync) nor the
            # per-row loop, which made PerFit rows 0.22x of base rows at 128 rows on a GPU.
            if not self.rows or layer not in self.layers:
                return output
            hidden = output[0] if isinstance(output, tuple) else output
            seq = hidden.shape[1]
            start = window_start(module.forward, args, kwargs, seq)
            if start >= self.width:
                return output
            out = hidden
            for row, intervention, cols in self.rows:
                if layer not in intervention.layers:
                    continue
                cols = cols[(cols >= start) & (cols < start + seq)] - start
                if cols.numel() == 0:
                    continue
                x = out[row, cols].float()
                for stage in intervention.stages:
                    if layer in stage:
                        x = stage[layer](x)
                if out is hidden:
                    out = hidden.clone()
                out[row, cols] = x.to(out.dtype)
            if isinstance(output, tuple):
                return (out,) + tuple(output[1:])
            return out
        return apply


class BatchedEngine:
    """Greedy generation for mixed batches of personalized rows on one frozen base model.

    ``max_rank`` bounds the rank of any row's update on a module (a request above it is
    refused by :meth:`check`); ``modules`` are the linear modules that can carry updates.
    """

    def __init__(self, model: nn.Module, tokenizer, *, modules: Sequence[str] = SERVED_MODULES,
                 max_rank: int = 256):
        self.model, self.tokenizer, self.max_rank = model, tokenizer, int(max_rank)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.shapes = module_shapes(model, modules)
        self.num_layers = len(decoder_layers(model))
        self.hidden_size = int(model.config.hidden_size)
        # no tokenizer: an engine that only scores (target_losses), never generates
        self.pad_id = None if tokenizer is None else tokenizer.pad_token_id \
            if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._lock = threading.Lock()
        self._wrappers: dict[Key, MultiLoraLinear] = {}
        self._interventions = _Interventions()
        self._placed = weakref.WeakValueDictionary()  # id -> adapter checked and placed here
        self._handles = []
        layers = decoder_layers(model)
        try:
            for key in sorted(self.shapes, key=key_order):
                layer, name = key
                parent = getattr(layers[layer], MODULE_PARENT[name])
                wrapper = MultiLoraLinear(getattr(parent, name))
                setattr(parent, name, wrapper)
                self._wrappers[key] = wrapper
            for index, layer in enumerate(layers):
                self._handles.append(layer.register_forward_hook(
                    self._interventions.hook(index), with_kwargs=True))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Put the model's original modules back and remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        layers = decoder_layers(self.model)
        for (layer, name), wrapper in self._wrappers.items():
            parent = getattr(layers[layer], MODULE_PARENT[name])
            if getattr(parent, name) is wrapper:
                setattr(parent, name, wrapper.base)
        self._wrappers = {}

    def __enter__(self) -> "BatchedEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def place(self, adapter: RowAdapter | None) -> RowAdapter | None:
        """``adapter`` checked (:meth:`check`) and with its tensors on this engine's device
        (itself on the CPU): a service keeps the placed copy, so no batch copies it to the
        GPU or checks its values again."""
        self.check(adapter)
        if adapter is None or self.device.type == "cpu":
            return adapter
        placed = adapter.to(self.device)
        self._placed[id(placed)] = placed
        return placed

    def check(self, adapter: RowAdapter | None, *, values: bool = True) -> None:
        """Raise :class:`PflError` if ``adapter`` does not fit this model and limits
        (``values``: also its values, all finite)."""
        if adapter is not None:
            adapter.check(self.shapes, self.num_layers, self.hidden_size,
                          max_rank=self.max_rank, values=values)

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]],
                 adapters: Sequence[RowAdapter | None], *,
                 max_new_tokens: int = 32, min_new_tokens: int = 0) -> list[list[int]]:
        """Each prompt's greedy continuation (token ids, up to EOS), row i personalized by
        ``adapters[i]`` (None: the base model), all rows in one batch. ``min_new_tokens``
        keeps EOS from being chosen before that many tokens (benchmarks decode a fixed
        length)."""
        if len(prompts) != len(adapters):
            raise ValueError(f"{len(prompts)} prompts for {len(adapters)} adapters")
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise PflError("an empty prompt cannot be continued")
        with self._batch(prompts, adapters) as batch:
            width = batch["input_ids"].shape[1]
            output = self.model.generate(
                **batch, max_new_tokens=int(max_new_tokens), min_new_tokens=int(min_new_tokens),
                do_sample=False, temperature=None, top_k=None, top_p=None,
                pad_token_id=self.pad_id, eos_token_id=self.tokenizer.eos_token_id)
        results = []
        eos = self.tokenizer.eos_token_id
        for row in output[:, width:].tolist():
            results.append(row[: row.index(eos)] if eos in row else row)
        return results

    @torch.inference_mode()
    def last_logits(self, prompts: Sequence[Sequence[int]],
                    adapters: Sequence[RowAdapter | None]) -> torch.Tensor:
        """(rows, vocab) next-token logits after each prompt, each row personalized by its
        adapter, in one batch (what the first greedy step reads; for tests and benchmarks)."""
        if len(prompts) != len(adapters) or not prompts:
            raise ValueError("give one adapter per prompt, and at least one prompt")
        with self._batch(prompts, adapters) as batch:
            position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            logits = self.model(**batch, position_ids=position_ids).logits
        return logits[:, -1].float()

    @torch.inference_mode()
    def target_losses(self, batch: Mapping[str, torch.Tensor],
                      adapters: Sequence[RowAdapter | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced cross-entropy of each row's target tokens, row i personalized by
        ``adapters[i]`` (None: the base model), in one forward pass: (sum over the row's
        target tokens, their count), both (rows,) on the CPU. ``batch`` is a training batch
        (``input_ids``, ``attention_mask``, ``labels`` with -100 off target;
        :func:`shared.training.batches`); PER-PCS' loss routing scores several candidate
        adapters on the same items this way, reading the weights once for all of them."""
        rows = batch["input_ids"].shape[0]
        if rows != len(adapters) or not rows:
            raise ValueError("give one adapter per row, and at least one row")
        if any(a is not None and a.intervention is not None for a in adapters):
            # interventions sit at prompt positions of a left-padded batch; this one is not
            raise ValueError("target_losses scores low-rank updates only, no intervention")
        with self._rows(adapters, batch["attention_mask"].sum(-1).tolist(),
                        batch["input_ids"].shape[1]):
            hidden = self.model.get_decoder()(
                input_ids=batch["input_ids"].to(self.device),
                attention_mask=batch["attention_mask"].to(self.device)).last_hidden_state
        (where, cols), targets = target_positions(batch["labels"].to(self.device))
        logits = self.model.get_output_embeddings()(hidden[where, cols]).float()
        losses = F.cross_entropy(logits, targets, reduction="none").cpu().double()
        where = where.cpu()
        sums = torch.zeros(rows, dtype=torch.float64).index_add_(0, where, losses)
        return sums, torch.bincount(where, minlength=rows)

    @contextmanager
    def _batch(self, prompts, adapters):
        """The left-padded batch, with each row's updates and interventions in place for
        the block (checked first; one batch at a time)."""
        batch = left_pad(prompts, self.pad_id, self.device)
        with self._rows(adapters, [len(p) for p in prompts], batch["input_ids"].shape[1]):
            yield batch

    @contextmanager
    def _rows(self, adapters, lengths, width):
        """Each row's updates and interventions in place for the block (checked first; one
        batch at a time)."""
        for adapter in adapters:  # values once per placed adapter: a GPU check syncs
            self.check(adapter, values=self._placed.get(id(adapter)) is not adapter)
        with self._lock:
            self._set_batch(adapters, lengths, width)
            try:
                yield
            finally:
                self._clear()

    def _set_batch(self, adapters: Sequence[RowAdapter | None], lengths: Sequence[int],
                   width: int) -> None:
        per_key: dict[Key, tuple[list[int], list]] = {}
        for row, adapter in enumerate(adapters):
            for key, update in (adapter.updates.items() if adapter is not None else ()):
                rows, updates = per_key.setdefault(key, ([], []))
                rows.append(row)
                updates.append(update)
        for key, wrapper in self._wrappers.items():
            rows, updates = per_key.get(key, ([], []))
            wrapper.set_rows(rows, updates, self.device, self.dtype)
        self._interventions.set_rows(adapters, lengths, width, self.device)

    def _clear(self) -> None:
        for wrapper in self._wrappers.values():
            wrapper.set_rows([], [], self.device, self.dtype)
        self._interventions.rows = []


def mixed_generate(engine: BatchedEngine, requests: Sequence[tuple[Sequence[int], RowAdapter | None]],
                   *, batch_size: int, max_new_tokens: int) -> list[list[int]]:
    """:meth:`BatchedEngine.generate` over ``requests`` in batches of ``batch_size`` (in
    order), for callers that hold more requests than one batch."""
    out: list[list[int]] = []
    for start in range(0, len(requests), batch_size):
        chunk = requests[start: start + batch_size]
        out += engine.generate([p for p, _ in chunk], [a for _, a in chunk],
                               max_new_tokens=max_new_tokens)
    return out

