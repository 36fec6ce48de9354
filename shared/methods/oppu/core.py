"""OPPU's cores and its collective part, as every caller runs them (``pfl eval`` in one
process, a device in the federation).

- :func:`stage1_model`: the base with the stage-1 task LoRA (trained on collective users)
  merged in; LoRA-C, OPPU, PER-PCS and PEFT retrieval build on it.
- :class:`PersonalLora` (``oppu``): a personal LoRA per user on the stage-1 model;
  :class:`PersonalLoraNoStage1` (``lora-p``): the same on the raw base.
- :class:`LoraStage1` (collective kind ``lora``): the stage-1 task LoRA as the federation
  trains it with FedAvg.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Sequence

import numpy as np
import torch

from shared.config import options_from_message
from shared.errors import PflError
from shared.methods.base import (Collective, Core, PersonalState, PromptAugmentation, Runtime,
                                 options_section,
                                 register_collective, register_core)
from shared.methods.oppu.config import personal_lora, personal_train, stage1_lora, stage1_train
from shared.methods.oppu.model import (attach_lora, load_adapter_state, lora_state, merge_lora,
                                       param_count, save_adapter_state, state_bytes)
from shared.methods.oppu.training import (personal_examples, stage1_examples, train_personal_lora,
                                         train_stage1_lora)
from shared.methods.store import arrays_digest, model_digest, trained_once
from shared.training import TrainConfig, seeded
from shared.types import User, recent_history

log = logging.getLogger(__name__)


def personal_train_config(runtime: Runtime) -> TrainConfig:
    """The personal LoRA recipe of OPPU, LoRA-P and the PER-PCS sharers: 2 epochs (or the
    run's ``personal_epochs``), lr 1e-4, ..., with any ``--set oppu.FIELD=VALUE`` of
    :class:`~shared.training.TrainConfig` (e.g. ``oppu.gradient_checkpointing=true``)."""
    return runtime.section(personal_train, "oppu", seed=runtime.seed,
                           epochs=runtime.option("personal_epochs", 2.0))


def stage1_train_config(runtime: Runtime) -> TrainConfig:
    """The stage-1 task LoRA's recipe: 3 epochs (or the run's ``stage1_epochs``), lr 1e-4,
    ..., with any ``--set stage1.FIELD=VALUE`` of :class:`~shared.training.TrainConfig`."""
    return runtime.section(stage1_train, "stage1", seed=runtime.seed,
                           epochs=runtime.option("stage1_epochs", 3.0))


def stage1_model(runtime: Runtime):
    """The base with the stage-1 task LoRA (trained on collective users) merged in.

    Trained once per run and shared by every method built on it (LoRA-C, OPPU, PER-PCS,
    PEFT retrieval). Collective users train on their history, capped at ``max_history``.
    On a device it comes from the federation's arrays instead (:class:`LoraStage1`).
    """
    if runtime.cache.stage1 is None:
        collective = [recent_history(u, runtime.option("max_history", None))
                      for u in runtime.roles.get("collective", [])]
        if not collective:
            raise ValueError("stage 1 needs collective users: none were assigned")
        config = stage1_train_config(runtime)

        def train():
            state, stats = train_stage1_lora(runtime.model, runtime.tokenizer, runtime.task,
                                             collective, stage1_lora(), config,
                                             progress=runtime.progress)
            log.info("stage 1: %d collective users, %d steps, loss %.3f -> %.3f",
                     len(collective), stats["steps"], stats["loss_first"], stats["loss_last"])
            return {k: v.numpy() for k, v in state.items()}, stats

        examples = stage1_examples(runtime.task, collective, runtime.tokenizer, config)
        arrays, stats = trained_once(runtime, "lora-stage1", collective, examples,
                                     {"lora": stage1_lora(), "train": config}, train)
        state = {k: torch.from_numpy(v) for k, v in arrays.items()}
        runtime.cache.stage1 = merge_lora(runtime.model, state, stage1_lora())
        runtime.cache.stage1_state = state
        runtime.cache.stage1_stats = stats
    return runtime.cache.stage1


def stage1_digest(runtime: Runtime) -> str:
    """sha256 over the stage-1 model's parameters: what identifies the run's stage 1 in the
    keys of state trained on it (memoized per merged model: a federation may install
    another)."""
    model = stage1_model(runtime)
    memo = runtime.cache.stage1_digest
    if memo is None or memo[0] is not model:
        memo = runtime.cache.stage1_digest = (model, model_digest(model))
    return memo[1]


def stage1_updates(runtime: Runtime) -> dict:
    """The stage-1 task LoRA as per-row updates on the raw base (:mod:`shared.serving`)."""
    from shared.serving.rows import lora_state_updates  # cycle: shared.serving imports the methods

    stage1_model(runtime)
    if runtime.cache.stage1_state is None:
        raise PflError("the stage-1 LoRA factors are not in this run (a merged model only)")
    if runtime.cache.stage1_updates is None:  # once per run, shared by every user's row
        spec = stage1_lora()
        runtime.cache.stage1_updates = lora_state_updates(runtime.cache.stage1_state,
                                                             spec.alpha / spec.r)
    return runtime.cache.stage1_updates


class PersonalLora(Core):
    """OPPU: a personal LoRA (q, v; r=8) per user on top of the stage-1 model."""

    name = "oppu"
    shared_model = False
    on_stage1 = True
    collective = ("lora",)

    def _base(self, runtime):
        return stage1_model(runtime) if self.on_stage1 else runtime.model

    def prepare(self, runtime, dataset, augmentation):
        personal_train_config(runtime)  # a bad --set oppu.* fails now, not after stage 1
        if self.on_stage1:
            stage1_train_config(runtime)
        self._base(runtime)

    def personalize(self, runtime: Runtime, user: User, augmentation: PromptAugmentation,
                    profile: str | None) -> PersonalState:
        user = recent_history(user, runtime.option("max_history", None))
        config = personal_train_config(runtime)
        rag_k = augmentation.k if augmentation.retrieval == "bm25" else 0
        base = self._base(runtime)

        def train():
            state, stats = train_personal_lora(base, runtime.tokenizer, runtime.task, user,
                                               personal_lora(), config, rag_k=rag_k,
                                               profile=profile, progress=False)
            return {k: v.numpy() for k, v in state.items()}, stats

        # kept per user when the run has a store: a resumed run trains only the users missing
        examples = personal_examples(runtime.task, user, runtime.tokenizer, config, rag_k,
                                     profile)
        arrays, stats = trained_once(
            runtime, f"{self.name}-personal", [user], examples,
            lambda: {"lora": personal_lora(), "train": config,
                     "stage1": stage1_digest(runtime) if self.on_stage1 else None}, train)
        state = {k: torch.from_numpy(v) for k, v in arrays.items()}
        return PersonalState(params=param_count(state), bytes=state_bytes(state), payload=state,
                             info={"steps": stats["steps"]})

    @contextmanager
    def model_for(self, runtime, state):
        with attach_lora(self._base(runtime), personal_lora(), state=state.payload) as model:
            yield model

    def remote_personalization(self, runtime, state):
        from shared.serving.rows import lora_state_pieces  # cycle: shared.serving imports the methods

        if not self.on_stage1:
            raise PflError(f"{self.name} is not served remotely: the service adds stage 1 to "
                           "every uploaded adapter")
        spec = personal_lora()
        return {"adapter_pieces": lora_state_pieces(state.payload, spec.alpha / spec.r)}

    def serving_adapter(self, runtime, state):
        from shared.serving.rows import RowAdapter, concat, lora_state_updates  # cycle: shared.serving imports the methods

        spec = personal_lora()
        personal = lora_state_updates(state.payload, spec.alpha / spec.r)
        if not self.on_stage1:
            return RowAdapter(personal, name=self.name)
        return RowAdapter(concat(stage1_updates(runtime), personal), name=self.name)

    def save_payload(self, payload, directory):
        save_adapter_state(payload, personal_lora(), directory / "adapter")

    def load_payload(self, directory, runtime):
        return load_adapter_state(directory / "adapter")[0]


class PersonalLoraNoStage1(PersonalLora):
    """LoRA-P: the personal LoRA trained on the raw base (no stage 1)."""

    name = "lora-p"
    on_stage1 = False
    collective = ()


_MERGED: dict[str, torch.nn.Module] = {}  # one stage-1 merged model per process


class LoraStage1(Collective):
    """The stage-1 task LoRA (q, k, v; r=8) as the federation trains it: peft's seeded
    initialisation (A random, B zero) on the server, :func:`train_stage1_lora` on each
    collective device, merged into the base on the devices that personalize."""

    kind = "lora"
    consent_kind = "stage1_lora"

    def initial_arrays(self, loaded, seed, options):
        with seeded(seed), attach_lora(loaded.model, stage1_lora()) as peft_model:
            state = lora_state(peft_model)
        return {k: v.numpy().astype(np.float32) for k, v in state.items()}

    def train_config(self, options):
        """What :func:`stage1_train_config` gives ``pfl eval``: the run's ``stage1.*`` and
        ``stage1_epochs`` (the message's ``options.*``) over the stage-1 recipe."""
        method_options = options_from_message(options)
        return options_section(method_options, stage1_train, "stage1",
                               epochs=method_options.get("stage1_epochs", 3.0))

    def local_update(self, loaded, task, users: Sequence, arrays, train_config, options):
        initial = {k: torch.from_numpy(np.array(v, dtype=np.float32, copy=True))
                   for k, v in arrays.items()}
        state, stats = train_stage1_lora(loaded.model, loaded.tokenizer, task, users,
                                         stage1_lora(), train_config, initial_state=initial,
                                         progress=False)
        return {k: v.detach().to("cpu", torch.float32).numpy() for k, v in state.items()}, stats

    def install(self, runtime, arrays):
        key = arrays_digest(arrays)
        if key not in _MERGED:
            _MERGED.clear()  # keep one: a worker serves one federation at a time
            state = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in
                     arrays.items()}
            _MERGED[key] = merge_lora(runtime.model, state, stage1_lora())
        runtime.cache.stage1 = _MERGED[key]
        runtime.cache.stage1_state = {k: torch.from_numpy(np.array(v, dtype=np.float32))
                                         for k, v in arrays.items()}
        runtime.cache.stage1_updates = None  # derived from the state just replaced


for _core in (PersonalLora, PersonalLoraNoStage1):
    register_core(_core.name, _core)
register_collective(LoraStage1())
