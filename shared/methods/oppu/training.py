"""OPPU's training: the stage-1 task LoRA and the personal LoRA (plain functions).

- :func:`train_stage1_lora`: the task LoRA (stage 1) on the histories of collective users. In
  the federation each client calls it once per round on its own users, starting from the
  global state it was sent (``initial_state``); the server averages the returned states.
- :func:`train_personal_lora`: one user's personal LoRA: OPPU when ``model`` is the stage-1
  merged model (:func:`shared.methods.oppu.merge_lora`), LoRA-P when it is the raw base.
  Each adapter sees **only that user's history** (upstream OPPU.py never cleared its training
  list between users, so user i also trained on users 0..i-1; that bug is not reproduced).

Both attach the adapter to ``model`` in place for the duration of the call and restore the
base on return (see :func:`shared.methods.oppu.attach_lora`), and both are reproducible: the
LoRA init and dropout draw from a generator seeded with ``train_config.seed``, forked so the
caller's global RNG state is left untouched."""

from __future__ import annotations

import time
from typing import Mapping, Sequence

import torch

from shared.errors import PflError
from shared.methods.oppu.config import LoraSpec
from shared.methods.oppu.model import attach_lora, lora_state, param_count, state_bytes
from shared.prompts import pad_token_id
from shared.tasks import TaskSpec
from shared.training import Example, LazyExamples, TrainConfig, history_examples, seeded, train
from shared.types import User


def personal_examples(task: TaskSpec, user: User, tokenizer, config: TrainConfig, rag_k: int,
                      profile: str | None) -> LazyExamples:
    """What a user's personal LoRA trains on (and stage 1 on each collective user's)."""
    return history_examples(task, user.history, tokenizer, rag_k=rag_k, profile=profile,
                            max_prompt_tokens=config.max_prompt_tokens,
                            max_target_tokens=config.max_target_tokens)


def _train_lora(model: torch.nn.Module, tokenizer, examples: Sequence[Example], spec: LoraSpec,
                config: TrainConfig, initial_state: Mapping[str, object] | None, *,
                desc: str, progress: bool) -> tuple[dict, dict]:
    if not examples:
        raise PflError(f"{desc}: no history to train on")
    pad_id = pad_token_id(tokenizer)
    device = next(model.parameters()).device
    started = time.perf_counter()
    with seeded(config.seed, device):
        with attach_lora(model, spec, state=initial_state) as peft_model:
            params = [p for p in peft_model.parameters() if p.requires_grad]
            stats = train(peft_model, params, examples, config, pad_id, desc=desc,
                          progress=progress)
            state = lora_state(peft_model)
    stats.update(examples=len(examples), params=param_count(state), bytes=state_bytes(state),
                 seconds=time.perf_counter() - started)
    return state, stats


def stage1_examples(task: TaskSpec, users: Sequence[User], tokenizer, train_config: TrainConfig,
                    rag_k: int = 0,
                    profiles: Mapping[str, str] | None = None) -> LazyExamples:
    """The pooled examples stage 1 trains on: each user's from that user's own history
    (encoded when read: :class:`~shared.training.LazyExamples`)."""
    return LazyExamples.concat(
        personal_examples(task, user, tokenizer, train_config, rag_k,
                          (profiles or {}).get(user.id))
        for user in users)


def train_stage1_lora(model: torch.nn.Module, tokenizer, task: TaskSpec, users: Sequence[User],
                      spec: LoraSpec, train_config: TrainConfig, rag_k: int = 0, *,
                      profiles: Mapping[str, str] | None = None,
                      initial_state: Mapping[str, object] | None = None,
                      progress: bool = True) -> tuple[dict, dict]:
    """Train the stage-1 task LoRA on the pooled histories of collective ``users``.

    Each user's examples are built from that user's own history (RAG retrieves within it,
    ``profiles[user.id]`` is its PAG profile). ``initial_state`` (e.g. the current global
    federated state) replaces peft's initialisation. Returns ``(lora_state, stats)``; stats
    are :func:`shared.training.train`'s plus ``examples``, ``users``, ``params``, ``bytes``,
    ``seconds``. ``model`` is restored on return.
    """
    examples = stage1_examples(task, users, tokenizer, train_config, rag_k, profiles)
    state, stats = _train_lora(model, tokenizer, examples, spec, train_config, initial_state,
                               desc=f"stage-1 LoRA ({len(users)} users)", progress=progress)
    stats["users"] = len(users)
    return state, stats


def train_personal_lora(model: torch.nn.Module, tokenizer, task: TaskSpec, user: User,
                        spec: LoraSpec, train_config: TrainConfig, rag_k: int = 0,
                        profile: str | None = None, *,
                        initial_state: Mapping[str, object] | None = None,
                        progress: bool = True) -> tuple[dict, dict]:
    """Train one user's personal LoRA on that user's history only.

    ``model`` is the stage-1 merged model for OPPU, the raw base for LoRA-P. With ``rag_k``
    each history item's prompt holds the top-k earlier items; ``profile`` is the user's PAG
    profile. Returns ``(lora_state, stats)`` as :func:`train_stage1_lora`; ``model`` is
    restored on return.
    """
    state, stats = _train_lora(model, tokenizer,
                               personal_examples(task, user, tokenizer, train_config, rag_k,
                                                 profile),
                               spec, train_config, initial_state, desc=f"OPPU LoRA {user.id}",
                               progress=progress)
    stats["users"] = 1
    return state, stats
