"""PerFit on a Hugging Face causal LM: two LoReFT stages hooked onto decoder-layer outputs.

- :class:`PerFitStage`: one stage, a :class:`LoReftIntervention` per intervened layer.
- :func:`intervened`: a context manager that hooks stage 1 (collective) and stage 2 (personal)
  into a Llama/Qwen-style model (``model.get_decoder().layers[i]``) so that each intervened
  layer's output becomes phi2(phi1(h)) at the prompt positions of the current batch, and that
  removes every hook on exit, error or not. The batch's positions are set on the controller it
  yields (:meth:`InterventionController.set_prompts`) before calling the model or ``generate``.
- During generation the prompt is intervened in the prefill; cached decoding steps (forward
  calls whose tokens are all new) are not intervened: the prompt's intervened states already
  live in the KV cache. Which columns a forward call covers is read from the ``position_ids``
  that the model passes to each decoder layer (:func:`window_start`), not from an internal
  keyword (transformers 5.24 renamed ``past_key_values`` to ``cache``, which silently
  intervened every generated token of a hook that read the old name); a layer that is not told
  its positions raises.
- :func:`train_stage1` / :func:`train_stage2` train through :func:`shared.training.train`; the
  base model stays frozen (and in eval mode); only intervention parameters train.
- Speed: everything up to and including the first intervened layer is frozen and sees only the
  input, so :class:`PrefixCache` computes that layer's output once per example and training
  replays it, running only the layers above (``cache_prefix=True``), when training reads the
  examples more than once (:func:`prefix_pays`).

Hooks live on the (shared) model while a context is open: one intervened context per model at
a time, not thread-safe.
"""

from __future__ import annotations

import inspect
import math
from contextlib import contextmanager, nullcontext
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared.generation import left_pad
from shared.methods.perfit.config import PerFitConfig
from shared.methods.perfit.intervention import LoReftIntervention
from shared.methods.perfit.positions import intervention_mask, prompt_lengths_from_labels
from shared.prompts import pad_token_id
from shared.training import (Example, LazyExamples, TrainConfig, collate, seeded, target_loss,
                             train)


# ----------------------------------------------------------------------------- stages

class PerFitStage(nn.Module):
    """One PerFit stage: a rank-``rank`` LoReFT intervention on each layer in ``layers``."""

    def __init__(self, layers: Sequence[int], hidden_size: int, rank: int, *,
                 init: str = "random", seed: int | None = None):
        super().__init__()
        if not layers:
            raise ValueError("a stage needs at least one layer")
        with seeded(seed) if seed is not None else nullcontext():
            self.interventions = nn.ModuleDict({
                str(layer): LoReftIntervention(hidden_size, rank, init=init)
                for layer in sorted({int(layer) for layer in layers})})
        self.hidden_size, self.rank = hidden_size, rank

    @property
    def layers(self) -> tuple[int, ...]:
        """The intervened layer indices, ascending."""
        return tuple(int(key) for key in self.interventions)

    def __contains__(self, layer: int) -> bool:
        return str(layer) in self.interventions

    def __getitem__(self, layer: int) -> LoReftIntervention:
        return self.interventions[str(layer)]

    def num_parameters(self) -> int:
        """Floats stored/sent for this stage: r * (2d + 1) per layer."""
        return sum(self[layer].num_parameters() for layer in self.layers)

    def export_arrays(self) -> dict[str, np.ndarray]:
        """Plain float32 arrays keyed "layers.{i}.R|W|b" (the wire format)."""
        return {f"layers.{layer}.{name}": value for layer in self.layers
                for name, value in self[layer].export_arrays().items()}

    def load_arrays(self, arrays: Mapping[str, np.ndarray | torch.Tensor]) -> None:
        """Load :meth:`export_arrays` output (e.g. a FedAvg of it; R is re-orthonormalized)."""
        expected = {f"layers.{layer}.{name}" for layer in self.layers for name in "RWb"}
        if set(arrays) != expected:
            raise ValueError(f"stage arrays have keys {sorted(arrays)}, expected "
                             f"{sorted(expected)}")
        for layer in self.layers:
            self[layer].load_arrays(*(arrays[f"layers.{layer}.{name}"] for name in "RWb"))

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray | torch.Tensor],
                    device: torch.device | str = "cpu") -> "PerFitStage":
        """A stage rebuilt from :meth:`export_arrays` output (layers and sizes from shapes)."""
        layers = sorted({int(key.split(".")[1]) for key in arrays})
        rank, hidden = np.shape(arrays[f"layers.{layers[0]}.R"])
        stage = cls(layers, int(hidden), int(rank), seed=0).to(device)
        stage.load_arrays(arrays)
        return stage

    def clone(self) -> "PerFitStage":
        """An independent copy with the same values, on the same device."""
        return PerFitStage.from_arrays(self.export_arrays(), device=_device_of(self))


def new_stages(config: PerFitConfig, num_layers: int, hidden_size: int, *, seed: int = 0,
               device: torch.device | str = "cpu") -> tuple[PerFitStage, PerFitStage]:
    """Fresh (stage 1, shared stage 2) for a model of the given depth and width."""
    layers = config.resolved_layers(num_layers)
    stage1 = PerFitStage(layers, hidden_size, config.collective_rank, seed=seed)
    stage2 = PerFitStage(layers, hidden_size, config.personal_rank, seed=seed + 1)
    return stage1.to(device), stage2.to(device)


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


# ----------------------------------------------------------------------------- hooks

class InterventionController:
    """Applies phi2(phi1(h)) at the masked positions of each intervened layer's output.

    Set the current batch's positions with :meth:`set_prompts` (or :meth:`set_mask`) before
    each model call. The mask covers the prompt columns of the batch; a forward call over
    columns [start, start + seq) (start = tokens already in the KV cache, see
    :func:`window_start`) uses that window of it, so cached decoding steps, which lie past the
    prompt, intervene on nothing.
    """

    def __init__(self, stage1: PerFitStage | None, stage2: PerFitStage | None, positions: str):
        if stage1 is None and stage2 is None:
            raise ValueError("give at least one stage")
        self.stages = tuple(stage for stage in (stage1, stage2) if stage is not None)
        self.layers = tuple(sorted({layer for stage in self.stages for layer in stage.layers}))
        self.positions = positions
        self.mask: torch.Tensor | None = None  # (batch, width) bool

    def set_prompts(self, prompt_lengths: Sequence[int] | torch.Tensor, width: int,
                    padding_side: str) -> torch.Tensor:
        """Mask for a batch of prompts of these lengths, padded to ``width`` on that side."""
        return self.set_mask(intervention_mask(prompt_lengths, width, self.positions,
                                               padding_side))

    def set_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """Use an explicit boolean (batch, width) mask of intervened positions."""
        self.mask = mask.to(device=_device_of(self.stages[0]), dtype=torch.bool)
        return self.mask

    def apply(self, layer: int, h: torch.Tensor, start: int = 0) -> torch.Tensor:
        """``h`` (batch, seq, d), the states of columns [start, start + seq) of the batch,
        with phi2(phi1(.)) applied at the masked positions among them."""
        window = self._window(h, start)
        if window is None:
            return h
        rows, cols = window.nonzero(as_tuple=True)
        x = h[rows, cols].float()  # interventions run in float32
        for stage in self.stages:
            if layer in stage:
                x = stage[layer](x)
        return h.index_put((rows, cols), x.to(h.dtype))

    def _window(self, h: torch.Tensor, start: int) -> torch.Tensor | None:
        if self.mask is None:
            raise RuntimeError("PerFit: set the batch's prompt positions (set_prompts) "
                               "before calling the model")
        batch, seq = h.shape[:2]
        mask = self.mask
        if mask.shape[0] != batch:  # generate() expands rows for beams / several samples
            if batch % mask.shape[0]:
                raise RuntimeError(f"PerFit mask has {mask.shape[0]} rows, batch has {batch}")
            mask = mask.repeat_interleave(batch // mask.shape[0], dim=0)
        window = mask[:, start: start + seq]
        if window.shape[1] < seq:  # columns past the prompt: generated tokens
            window = F.pad(window, (0, seq - window.shape[1]), value=False)
        return window if window.any() else None

    def attach(self, model: nn.Module) -> list:
        """Register the hooks on ``model``; returns their handles (remove them when done)."""
        decoder = model.get_decoder()
        if max(self.layers) >= len(decoder.layers):
            raise ValueError(f"layer {max(self.layers)} does not exist "
                             f"({len(decoder.layers)} decoder layers)")
        handles = []
        try:
            for layer in self.layers:
                handles.append(decoder.layers[layer].register_forward_hook(
                    self._hook(layer), with_kwargs=True))
        except BaseException:
            for handle in handles:
                handle.remove()
            raise
        return handles

    def _hook(self, layer: int):
        def hook(module, args, kwargs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            start = window_start(module.forward, args, kwargs, hidden.shape[1])
            out = self.apply(layer, hidden, start)
            if isinstance(output, tuple):  # older transformers return (hidden, ...)
                return (out,) + tuple(output[1:])
            return out
        return hook


def window_start(forward, args: tuple, kwargs: dict, seq: int) -> int:
    """The first batch column of a decoder layer's current call (tokens already cached), from
    the arguments of that call to the layer's ``forward``.

    Read from the ``position_ids`` the model gives the layer: the row with no padding (every
    batch has one: the longest prompt) has position ids ``start .. start + seq - 1``, and
    padded rows (left padding, as generate numbers them) have smaller ones, so ``start`` is the
    largest last position id less ``seq - 1``. Raises when the layer is not told its positions,
    so that a transformers release that stops passing them fails loudly instead of
    intervening the wrong tokens.
    """
    position_ids = kwargs.get("position_ids")
    if position_ids is None and args:
        try:
            bound = inspect.signature(forward).bind_partial(*args, **kwargs)
        except TypeError:
            bound = None
        position_ids = bound.arguments.get("position_ids") if bound is not None else None
    if not torch.is_tensor(position_ids) or position_ids.dim() != 2 \
            or position_ids.shape[-1] != seq:
        raise RuntimeError(
            "PerFit: the decoder layer was not given position_ids of shape (batch, seq), so "
            "the intervened positions of this call cannot be determined; this transformers "
            "version passes decoder layers something else (see the lock file for a tested one)")
    start = int(position_ids[:, -1].max()) - seq + 1
    if start < 0:
        raise RuntimeError(f"PerFit: position_ids {position_ids[:, -1].tolist()} end before "
                           f"the {seq} columns of this call: no row of the batch is unpadded")
    return start


@contextmanager
def intervened(model: nn.Module, stage1: PerFitStage | None, stage2: PerFitStage | None = None,
               positions: str = "f7+l7") -> Iterator[InterventionController]:
    """Hook phi2(phi1(.)) into ``model`` for the duration of the block; hooks go on exit.

    Usage::

        with intervened(model, stage1, stage2, "f7+l7") as ctl:
            ctl.set_prompts(prompt_lengths, input_ids.shape[1], padding_side="left")
            model.generate(input_ids=input_ids, attention_mask=attention_mask, ...)
    """
    controller = InterventionController(stage1, stage2, positions)
    handles = controller.attach(model)
    try:
        yield controller
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: Sequence[Sequence[int]],
             stage1: PerFitStage | None, stage2: PerFitStage | None = None, *,
             positions: str = "f7+l7", max_new_tokens: int = 32,
             **generate_kwargs) -> list[list[int]]:
    """Greedy generation (by default) with PerFit; returns each prompt's new tokens (to EOS).

    Prompts are token-id lists (from shared.prompts.encode_prompt), left-padded together.
    """
    pad_id = pad_token_id(tokenizer)
    batch = left_pad(prompts, pad_id, next(model.parameters()).device)
    width = batch["input_ids"].shape[1]
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
    kwargs.update(generate_kwargs)
    with intervened(model, stage1, stage2, positions) as controller:
        controller.set_prompts([len(ids) for ids in prompts], width, padding_side="left")
        output = model.generate(**batch, **kwargs)
    results = []
    for row in output[:, width:].tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id)]
        results.append(row)
    return results


# ----------------------------------------------------------------------------- training

def _key(input_ids: torch.Tensor, attention_mask: torch.Tensor, row: int) -> tuple[int, ...]:
    """An example's identity inside a right-padded batch: its unpadded token ids."""
    return tuple(input_ids[row, : int(attention_mask[row].sum())].tolist())


class _PromptIndex:
    """Prompt length of each training example, looked up by its token ids.

    shared.training.target_loss calls the decoder with input ids and attention mask only, so
    the labels (where the prompt ends) are recovered from the examples themselves.
    """

    def __init__(self, examples: Sequence[Example]):
        self.lengths: dict[tuple[int, ...], int] = {}
        # Examples that are encoded when read are indexed once they are (a batch is encoded
        # before the model runs on it), so indexing does not encode the ones never used.
        self.lazy = examples if isinstance(examples, LazyExamples) else None
        self._add(examples.encoded() if self.lazy is not None else examples)
        self._indexed = self.lazy.encoded_count() if self.lazy is not None else 0

    def _add(self, examples: Iterable[Example]) -> None:
        for ids, labels in examples:
            length = int(prompt_lengths_from_labels(labels)[0])
            if self.lengths.setdefault(tuple(ids), length) != length:
                raise ValueError("two examples have the same tokens but different prompts")

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[int]:
        keys = [_key(input_ids, attention_mask, row) for row in range(input_ids.shape[0])]
        if self.lazy is not None and any(key not in self.lengths for key in keys):
            self._add(self.lazy.encoded(self._indexed))  # only those read since the last look
            self._indexed = self.lazy.encoded_count()
        return [self.lengths[key] for key in keys]


class _StopForward(Exception):
    pass


class _Skip(nn.Module):
    """Stands in for a frozen layer below the cached one: does nothing."""

    def __init__(self, original: nn.Module):
        super().__init__()
        if hasattr(original, "attention_type"):
            self.attention_type = original.attention_type

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class _Replay(_Skip):
    """Stands in for the cached layer: its cached output, with the interventions applied."""

    def __init__(self, original, cached, controller, layer, as_tuple):
        super().__init__(original)
        self.cached, self.controller = cached, controller
        self.layer, self.as_tuple = layer, as_tuple
        self.__dict__["original_forward"] = original.forward  # for its signature only
        self.calls = 0

    def forward(self, hidden_states, *args, **kwargs):
        self.calls += 1
        start = window_start(self.original_forward, (hidden_states,) + args, kwargs,
                             self.cached.shape[1])
        out = self.controller.apply(self.layer, self.cached, start)
        return (out,) if self.as_tuple else out


class PrefixCache:
    """The output of decoder layer ``layer`` (before any intervention) per example.

    Layers 0..layer are frozen and see only the input, so their result is computed once here;
    :meth:`replaying` then swaps them for stand-ins that return it, and only the layers above
    run (tests check the loss equals the uncached path's).
    """

    def __init__(self, model: nn.Module, examples: Sequence[Example], layer: int, pad_id: int,
                 *, batch_size: int = 8):
        self.layer = layer
        self.store: dict[tuple[int, ...], torch.Tensor] = {}
        self.as_tuple = False
        decoder = model.get_decoder()
        device = next(model.parameters()).device
        captured = {}

        def capture(module, args, output):
            self.as_tuple = isinstance(output, tuple)
            captured["h"] = output[0] if self.as_tuple else output
            raise _StopForward  # nothing above this layer is needed

        unique = list(dict.fromkeys(tuple(ids) for ids, _ in examples))
        handle = decoder.layers[layer].register_forward_hook(capture)
        try:
            with torch.no_grad():
                for start in range(0, len(unique), batch_size):
                    chunk = unique[start: start + batch_size]
                    batch = collate([(list(ids), list(ids)) for ids in chunk], pad_id, device)
                    captured.clear()
                    try:
                        decoder(input_ids=batch["input_ids"],
                                attention_mask=batch["attention_mask"])
                    except _StopForward:
                        pass
                    if "h" not in captured:
                        raise RuntimeError(f"PerFit prefix cache: decoder layer {layer} never "
                                           "ran during the decoder's forward")
                    for row, ids in enumerate(chunk):
                        self.store[ids] = captured["h"][row, : len(ids)].clone()
        finally:
            handle.remove()

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The cached outputs of a right-padded batch, zero at padding: (batch, width, d)."""
        rows = [self.store[_key(input_ids, attention_mask, row)]
                for row in range(input_ids.shape[0])]
        out = rows[0].new_zeros((len(rows), input_ids.shape[1], rows[0].shape[-1]))
        for row, value in enumerate(rows):
            out[row, : value.shape[0]] = value
        return out

    @contextmanager
    def replaying(self, decoder: nn.Module, hidden: torch.Tensor,
                  controller: InterventionController):
        """Within the block, ``decoder`` skips layers < layer and replays ``hidden`` at it."""
        layers = decoder.layers
        stand_ins = [_Skip(layers[i]) for i in range(self.layer)]
        replay = _Replay(layers[self.layer], hidden, controller, self.layer, self.as_tuple)
        decoder.layers = nn.ModuleList(stand_ins + [replay] + list(layers[self.layer + 1:]))
        try:
            yield
        finally:
            decoder.layers = layers
        if replay.calls != 1:  # the decoder no longer runs its layers from decoder.layers
            raise RuntimeError(f"PerFit prefix cache: the decoder called the cached layer "
                               f"{replay.calls} times, expected once")


class _TrainingView(nn.Module):
    """What shared.training sees: the base LM whose decoder call first sets the batch's
    prompt mask (and replays the prefix cache when there is one).

    The base model is deliberately not a submodule: train()/eval() on the view toggle only the
    interventions, and the frozen base stays in eval mode.
    """

    def __init__(self, model, controller, index, prefix=None):
        super().__init__()
        self.__dict__["base"] = model
        self.stages = nn.ModuleList(controller.stages)
        self.controller, self.index, self.prefix = controller, index, prefix

    def get_decoder(self):
        return self._decode

    def get_output_embeddings(self):
        return self.base.get_output_embeddings()

    def _decode(self, input_ids, attention_mask, **kwargs):
        decoder = self.base.get_decoder()
        self.controller.set_prompts(self.index(input_ids, attention_mask), input_ids.shape[1],
                                    padding_side="right")
        replay = (self.prefix.replaying(decoder, self.prefix.hidden(input_ids, attention_mask),
                                        self.controller)
                  if self.prefix is not None else nullcontext())
        with replay:
            return decoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def prefix_pays(train_config: TrainConfig, num_examples: int) -> bool:
    """Whether :class:`PrefixCache` saves work: it runs the frozen prefix once for every
    example, so it pays only when training reads examples more than once in all (more
    example-passes than examples: several epochs). A capped update that reads fewer (a
    federated round of two steps, say) computes the prefix inside its own batches instead."""
    steps = math.ceil(math.ceil(num_examples / train_config.batch_size) * train_config.epochs)
    if train_config.max_steps is not None:
        steps = min(steps, train_config.max_steps)
    return max(1, steps) * train_config.batch_size > num_examples


def _train(model, examples, stage1, stage2, trainable, config: PerFitConfig,
           train_config: TrainConfig | None, pad_id: int, cache_prefix: bool, desc: str,
           progress: bool) -> dict:
    train_config = train_config or config.train_config()
    controller_layers = sorted(set(stage1.layers) | set(stage2.layers))
    prefix = (PrefixCache(model, examples, controller_layers[0], pad_id,
                          batch_size=train_config.batch_size)
              if cache_prefix and prefix_pays(train_config, len(examples)) else None)
    with intervened(model, stage1, stage2, config.positions) as controller:
        view = _TrainingView(model, controller, _PromptIndex(examples), prefix)
        params = [p for stage in trainable for p in stage.parameters()]
        return train(view, params, examples, train_config, pad_id, desc=desc,
                     progress=progress)


def train_stage1(model: nn.Module, examples: Sequence[Example], config: PerFitConfig, *,
                 pad_id: int, stage1: PerFitStage | None = None,
                 stage2: PerFitStage | None = None, train_config: TrainConfig | None = None,
                 cache_prefix: bool = True, seed: int = 0,
                 progress: bool = False) -> tuple[PerFitStage, PerFitStage, dict]:
    """Train stage 1 (collective) jointly with a shared stage 2 on ``examples``.

    ``stage1``/``stage2`` (e.g. the global values of a federation round) are trained in place;
    fresh ones (seeded) are made when absent. The shared stage 2 initialises every user's
    personal stage 2. Returns (stage1, stage2, stats of shared.training.train).
    """
    if stage1 is None or stage2 is None:
        decoder_config = model.config
        fresh1, fresh2 = new_stages(config, decoder_config.num_hidden_layers,
                                    decoder_config.hidden_size, seed=seed,
                                    device=next(model.parameters()).device)
        stage1 = fresh1 if stage1 is None else stage1
        stage2 = fresh2 if stage2 is None else stage2
    stats = _train(model, examples, stage1, stage2, (stage1, stage2), config, train_config,
                   pad_id, cache_prefix, "perfit stage 1", progress)
    return stage1, stage2, stats


def train_stage2(model: nn.Module, examples: Sequence[Example], config: PerFitConfig,
                 stage1: PerFitStage, stage2_init: PerFitStage, *, pad_id: int,
                 train_config: TrainConfig | None = None, cache_prefix: bool = True,
                 progress: bool = False) -> tuple[PerFitStage, dict]:
    """Train one user's personal stage 2 (a copy of ``stage2_init``) with stage 1 frozen.

    Neither ``stage1`` nor ``stage2_init`` changes. Returns (personal stage 2, stats).
    """
    personal = stage2_init.clone()
    frozen = [p.requires_grad for p in stage1.parameters()]
    stage1.requires_grad_(False)
    try:
        stats = _train(model, examples, stage1, personal, (personal,), config, train_config,
                       pad_id, cache_prefix, "perfit stage 2", progress)
    finally:
        for p, flag in zip(stage1.parameters(), frozen):
            p.requires_grad_(flag)
    return personal, stats


@torch.no_grad()
def evaluate_loss(model: nn.Module, examples: Sequence[Example], stage1: PerFitStage | None,
                  stage2: PerFitStage | None, *, positions: str, pad_id: int,
                  batch_size: int = 8) -> float:
    """Mean per-token target loss of ``examples`` with the given stages (none: base model)."""
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start: start + batch_size], pad_id,
                        next(model.parameters()).device)
        if stage1 is None and stage2 is None:
            losses = target_loss(model, batch, reduction="none")
        else:
            with intervened(model, stage1, stage2, positions) as controller:
                view = _TrainingView(model, controller, _PromptIndex(examples))
                losses = target_loss(view, batch, reduction="none")
        total, count = total + losses.sum().item(), count + losses.numel()
    return total / max(1, count)
