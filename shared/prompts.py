"""Prompt templates and the one place text becomes token ids.

The template is the PER-PCS paper's (Table 6), with empty sections omitted::

    ### User Profile:
    {profile}

    ### User History:
    {retrieved}

    ### User Instruction:
    {task instruction with the query}

With no profile and no history the prompt is the bare instruction (the non-personalized
baseline). Instruction-tuned tokenizers (those with a chat template, like SmolLM2-Instruct)
get the prompt as the user turn of their chat template; training and generation both go
through :func:`encode_prompt` so they always agree.
"""

from __future__ import annotations

from typing import Sequence

from shared.tasks import TaskSpec
from shared.types import HistoryItem

#: Profile-generation prompts per kind of history (after the PER-PCS paper, Table 5).
PROFILE_PROMPT = (
    "Here are some {subject} written by one user:\n{items}\n\n"
    "Describe this user's interests, preferences and writing style in two or three short "
    "sentences. Write only the description."
)
PROFILE_ITEMS = 8  # history items shown to the profile generator
PROFILE_ITEM_CHARS = 300  # each item is cut to this many characters
CONTEXT_ITEM_CHARS = 400  # a retrieved item is cut to this many characters in the prompt
PROFILE_MAX_NEW_TOKENS = 64


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def build_prompt(instruction: str, *, profile: str | None = None,
                 retrieved: Sequence[HistoryItem] = (), task: TaskSpec | None = None) -> str:
    """Fill the template; sections with nothing in them are left out."""
    sections = []
    if profile:
        sections.append(f"### User Profile:\n{profile.strip()}")
    if retrieved:
        if task is None:
            raise ValueError("retrieved items need the task to render them")
        lines = "\n".join(_clip(task.render_context(item), CONTEXT_ITEM_CHARS)
                          for item in retrieved)
        sections.append(f"### User History:\n{lines}")
    if not sections:
        return instruction
    sections.append(f"### User Instruction:\n{instruction}")
    return "\n\n".join(sections)


def profile_prompt(task: TaskSpec, history: Sequence[HistoryItem]) -> str:
    """The prompt that asks the local model for a short profile of the user (PAG)."""
    sample = list(history)[-PROFILE_ITEMS:]  # the most recent items
    items = "\n".join(f"- {_clip(task.render_context(item), PROFILE_ITEM_CHARS)}"
                      for item in sample)
    return PROFILE_PROMPT.format(subject=task.profile_subject, items=items)


def pad_token_id(tokenizer) -> int:
    """The id to pad with: the tokenizer's pad token, else its EOS (as load_model sets it)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def uses_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_prompt(tokenizer, prompt: str, max_prompt_tokens: int | None = None) -> list[int]:
    """Token ids of a prompt, ready for the model to continue with the answer.

    With a chat template the prompt is the user turn and the ids end with the assistant
    header. Over-long prompts keep their *end* (where the instruction and query are).
    """
    if uses_chat_template(tokenizer):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                            add_generation_prompt=True, tokenize=True,
                                            return_dict=False)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        ids = list(ids)
    else:
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
        ids = ids[-max_prompt_tokens:]
    return ids


def encode_example(tokenizer, prompt: str, target: str,
                   max_prompt_tokens: int | None = None,
                   max_target_tokens: int = 64) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one training example: loss on the target and EOS only."""
    prompt_ids = encode_prompt(tokenizer, prompt, max_prompt_tokens)
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"][:max_target_tokens]
    target_ids = target_ids + [tokenizer.eos_token_id]
    return prompt_ids + target_ids, [-100] * len(prompt_ids) + target_ids
