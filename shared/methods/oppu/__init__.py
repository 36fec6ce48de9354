"""OPPU (Tan et al. 2024): one personal LoRA per user, on top of a task LoRA merged into the
base (stage 1). ``config`` holds the specs and recipes, ``model`` the adapter plumbing;
the training functions live on the device side, in :mod:`edge_client.trainers`."""

from shared.methods.oppu.config import (OppuConfig, LoraSpec, PERSONAL_TARGETS, STAGE1_TARGETS,
                                        personal_lora, personal_train, stage1_lora, stage1_train)
from shared.methods.oppu.model import (PEFT_PREFIX, LoraState, attach_lora, has_lora,
                                       load_adapter_state, load_lora_state, lora_pairs,
                                       lora_state, merge_lora, param_count, save_adapter,
                                       save_adapter_state, state_bytes)

__all__ = [
    "OppuConfig", "LoraSpec", "PERSONAL_TARGETS", "STAGE1_TARGETS", "personal_lora",
    "personal_train", "stage1_lora", "stage1_train", "PEFT_PREFIX", "LoraState", "attach_lora",
    "has_lora", "load_adapter_state", "load_lora_state", "lora_pairs", "lora_state",
    "merge_lora", "param_count", "save_adapter", "save_adapter_state", "state_bytes",
]
