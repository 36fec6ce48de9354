"""OPPU (Tan et al. 2024): one personal LoRA per user, on top of a task LoRA merged into the
base (stage 1).

- :mod:`.config`: the LoRA specs and both recipes; :mod:`.model`: the adapter plumbing (peft);
- :mod:`.training`: the stage-1 and personal LoRA training;
- :mod:`.core`: the ``oppu`` and ``lora-p`` cores, :func:`stage1_model`, and the collective
  kind ``lora`` (the stage-1 task LoRA in the federation).
"""

from shared.methods.oppu.config import (OppuConfig, LoraSpec, PERSONAL_TARGETS, STAGE1_TARGETS,
                                        personal_lora, personal_train, stage1_lora, stage1_train)
from shared.methods.oppu.core import (LoraStage1, PersonalLora, PersonalLoraNoStage1,
                                      personal_train_config, stage1_model, stage1_train_config)
from shared.methods.oppu.model import (PEFT_PREFIX, LoraState, attach_lora, has_lora,
                                       load_adapter_state, load_lora_state, lora_pairs,
                                       lora_state, merge_lora, param_count, save_adapter,
                                       save_adapter_state, state_bytes)
from shared.methods.oppu.training import train_personal_lora, train_stage1_lora

__all__ = [
    "OppuConfig", "LoraSpec", "PERSONAL_TARGETS", "STAGE1_TARGETS", "personal_lora",
    "personal_train", "stage1_lora", "stage1_train", "PEFT_PREFIX", "LoraState", "attach_lora",
    "has_lora", "load_adapter_state", "load_lora_state", "lora_pairs", "lora_state",
    "merge_lora", "param_count", "save_adapter", "save_adapter_state", "state_bytes",
    "train_personal_lora", "train_stage1_lora", "LoraStage1", "PersonalLora",
    "PersonalLoraNoStage1", "personal_train_config", "stage1_model", "stage1_train_config",
]
