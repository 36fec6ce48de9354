"""The baselines every paper compares against, as cores.

- ``nonpersonalized``: the base model itself (:class:`shared.methods.base.Core`), with any
  prompt augmentation (``rag1``, ``random1``, ``pag`` ...).
- ``lora-c`` (:class:`LoraCollective`): the stage-1 task LoRA only, no per-user state.

OPPU's LoRA-P ablation lives with OPPU (:mod:`shared.methods.oppu`), PER-PCS's PEFT-retrieval
baseline with PER-PCS (:mod:`shared.methods.perpcs`).
"""

from __future__ import annotations

from contextlib import contextmanager

from shared.methods.base import Core, register_core
from shared.methods.oppu.core import stage1_model, stage1_updates


class LoraCollective(Core):
    """LoRA-C: stage 1 only (the task LoRA of collective users), no per-user state."""

    name = "lora-c"
    collective = ("lora",)

    def prepare(self, runtime, dataset, augmentation):
        stage1_model(runtime)

    @contextmanager
    def model_for(self, runtime, state):
        yield stage1_model(runtime)

    def remote_personalization(self, runtime, state):
        return {}  # the service's default row is the stage-1 model

    def serving_adapter(self, runtime, state):
        from shared.serving.rows import RowAdapter  # cycle: shared.serving imports the methods

        return RowAdapter(stage1_updates(runtime), name=self.name)


register_core(LoraCollective.name, LoraCollective)
