"""Every method's cores as run in one process (``pfl eval``): the same steps the federation
runs across server and devices, here one after the other on one machine.

Importing this module registers the cores with :mod:`shared.methods.base`; the method math
lives in :mod:`shared.methods`, the device-side training in :mod:`edge_client.trainers`.

Roles (chosen by :func:`simulations.evaluate.assign_roles`): *collective* users train stage 1
(the task adaptation shared by all methods), *sharers* contribute PER-PCS pieces, *targets*
are personalized and evaluated. No target's data is used by any collective step.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import replace

from edge_client.trainers import train_personal_lora, train_stage1_lora
from shared.methods.base import Core, PersonalState, PromptAugmentation, Runtime, register_core
from shared.methods.oppu import (attach_lora, merge_lora, param_count, personal_lora,
                                 personal_train, stage1_lora, stage1_train, state_bytes)
from shared.types import User

log = logging.getLogger(__name__)


def recent_history(user: User, limit: int | None) -> User:
    """The user with only their ``limit`` most recent history items (None: all)."""
    if limit is None or len(user.history) <= limit:
        return user
    return replace(user, history=user.history[-limit:])


def stage1_model(runtime: Runtime):
    """The base with the stage-1 task LoRA (trained on collective users) merged in.

    Trained once per run and shared by every method built on it (LoRA-C, OPPU, PER-PCS,
    PEFT retrieval). Collective users train on their history, capped at ``max_history``.
    """
    if "stage1" not in runtime.cache:
        collective = [recent_history(u, runtime.option("max_history", None))
                      for u in runtime.roles.get("collective", [])]
        if not collective:
            raise ValueError("stage 1 needs collective users: none were assigned")
        config = stage1_train(seed=runtime.seed,
                              epochs=runtime.option("stage1_epochs", 3.0))
        state, stats = train_stage1_lora(runtime.model, runtime.tokenizer, runtime.task,
                                         collective, stage1_lora(), config,
                                         progress=runtime.progress)
        log.info("stage 1: %d collective users, %d steps, loss %.3f -> %.3f", len(collective),
                 stats["steps"], stats["loss_first"], stats["loss_last"])
        runtime.cache["stage1"] = merge_lora(runtime.model, state, stage1_lora())
        runtime.cache["stage1_stats"] = stats
    return runtime.cache["stage1"]


class LoraCollective(Core):
    """LoRA-C: stage 1 only (the task LoRA of collective users), no per-user state."""

    name = "lora-c"

    def prepare(self, runtime, dataset, augmentation):
        stage1_model(runtime)

    @contextmanager
    def model_for(self, runtime, state):
        yield stage1_model(runtime)


class PersonalLora(Core):
    """OPPU: a personal LoRA (q, v; r=8) per user on top of the stage-1 model."""

    name = "oppu"
    shared_model = False
    on_stage1 = True

    def _base(self, runtime):
        return stage1_model(runtime) if self.on_stage1 else runtime.model

    def prepare(self, runtime, dataset, augmentation):
        self._base(runtime)

    def personalize(self, runtime: Runtime, user: User, augmentation: PromptAugmentation,
                    profile: str | None) -> PersonalState:
        user = recent_history(user, runtime.option("max_history", None))
        config = personal_train(seed=runtime.seed,
                                epochs=runtime.option("personal_epochs", 2.0))
        rag_k = augmentation.k if augmentation.retrieval == "bm25" else 0
        state, stats = train_personal_lora(self._base(runtime), runtime.tokenizer, runtime.task,
                                           user, personal_lora(), config, rag_k=rag_k,
                                           profile=profile, progress=False)
        return PersonalState(params=param_count(state), bytes=state_bytes(state), payload=state,
                             info={"steps": stats["steps"]})

    @contextmanager
    def model_for(self, runtime, state):
        with attach_lora(self._base(runtime), personal_lora(), state=state.payload) as model:
            yield model


class PersonalLoraNoStage1(PersonalLora):
    """LoRA-P: the personal LoRA trained on the raw base (no stage 1)."""

    name = "lora-p"
    on_stage1 = False


for _core in (LoraCollective, PersonalLora, PersonalLoraNoStage1):
    register_core(_core.name, _core)
