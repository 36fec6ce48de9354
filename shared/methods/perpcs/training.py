"""A PER-PCS sharer's training: its LoRA split into pieces, then the pieces' gates."""

from __future__ import annotations

import torch

from shared.methods.oppu.config import LoraSpec
from shared.methods.oppu.training import train_personal_lora
from shared.methods.perpcs.gates import train_gates, zero_gates
from shared.methods.perpcs.pieces import pieces_from_peft_state_dict
from shared.prompts import pad_token_id
from shared.tasks import TaskSpec
from shared.training import TrainConfig, history_examples
from shared.types import User


def train_sharer_pieces(model: torch.nn.Module, tokenizer, task: TaskSpec, user: User,
                        config, train_config: TrainConfig, *, sharer: str) -> list:
    """A PER-PCS sharer's side: its personal LoRA on ``config.target_modules`` (as OPPU, on the
    stage-1 ``model``), split into pieces named for ``sharer`` (a pseudonym), then the
    post-hoc gates trained on the same history (``config.gate_steps == 0``: zero gates, no
    gate training). Returns every gated piece; what is shared is
    decided afterwards (sharing ratio, consent).

    ``pfl eval`` (in one process) and a sharer device in the federation both call this, so
    the same user, model and seed give the same pieces (the piece id does not include the
    sharer name).
    """
    spec = LoraSpec(target_modules=tuple(config.target_modules))
    state, _ = train_personal_lora(model, tokenizer, task, user, spec, train_config,
                                   progress=False)
    pieces = pieces_from_peft_state_dict(state, spec.scaling, sharer=sharer)
    if config.gate_steps == 0:
        return zero_gates(pieces)
    examples = history_examples(task, user.history, tokenizer)
    return train_gates(model, pieces, examples, pad_token_id(tokenizer), config,
                       evaluate=False).pieces
