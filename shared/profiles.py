"""PAG: a short natural-language profile of the user, written on the device by the local model.

The profile is generated from a sample of the user's own history with the base model itself,
so neither the history nor the profile has to leave the device.
"""

from __future__ import annotations

from typing import Sequence

from shared.generation import GenerationConfig, generate
from shared.prompts import PROFILE_MAX_NEW_TOKENS, profile_prompt
from shared.tasks import TaskSpec
from shared.types import User


def generate_profiles(model, tokenizer, task: TaskSpec, users: Sequence[User], *,
                      batch_size: int = 8, max_new_tokens: int = PROFILE_MAX_NEW_TOKENS,
                      progress: bool = True) -> dict[str, str]:
    """{user id: profile} for users with a history (batched greedy generation)."""
    with_history = [u for u in users if u.history]
    prompts = [profile_prompt(task, u.history) for u in with_history]
    config = GenerationConfig(max_new_tokens=max_new_tokens, batch_size=batch_size,
                              max_prompt_tokens=1024)
    texts = generate(model, tokenizer, prompts, config, desc="profiles", progress=progress)
    return {u.id: text for u, text in zip(with_history, texts)}
