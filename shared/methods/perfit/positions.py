"""Which token positions PerFit intervenes on: computed here and nowhere else.

A spec is "fN+lM" (the first N and the last M prompt tokens), "lM" or "fN". When both parts
are present each is capped at half the prompt length, so they never overlap (a 5-token prompt
under "f7+l7" gets positions 0, 1 and 3, 4); a part on its own is capped at the prompt length.
Only prompt tokens are ever intervened: never padding, never target or generated tokens.
"""

from __future__ import annotations

import re
from typing import Sequence

import torch

_PART = re.compile(r"^([fl])(\d+)$")


def parse_positions(spec: str) -> tuple[int, int]:
    """``"f7+l7"`` -> (7, 7); ``"l7"`` -> (0, 7); ``"f3"`` -> (3, 0)."""
    first = last = None
    for part in str(spec).replace(" ", "").lower().split("+"):
        match = _PART.match(part)
        if match is None:
            raise ValueError(f"bad positions spec {spec!r}: use 'fN+lM', 'lM' or 'fN'")
        kind, count = match.group(1), int(match.group(2))
        if kind == "f" and first is None:
            first = count
        elif kind == "l" and last is None:
            last = count
        else:
            raise ValueError(f"bad positions spec {spec!r}: '{kind}' given twice")
    first, last = first or 0, last or 0
    if first + last == 0:
        raise ValueError(f"positions spec {spec!r} selects no token")
    return first, last


def intervention_mask(prompt_lengths: Sequence[int] | torch.Tensor, width: int, positions: str,
                      padding_side: str) -> torch.Tensor:
    """Boolean (batch, width) mask of the intervened positions of a padded batch of prompts.

    ``prompt_lengths[i]`` is the number of prompt tokens of row i. With ``padding_side="right"``
    (training batches) row i's prompt occupies columns [0, L); with ``"left"`` (generation
    batches, where the whole unpadded input is the prompt) it occupies [width - L, width).
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    first, last = parse_positions(positions)
    lengths = torch.as_tensor(prompt_lengths, dtype=torch.long).reshape(-1, 1)  # (batch, 1)
    if (lengths > width).any() or (lengths < 0).any():
        raise ValueError(f"prompt lengths {lengths.flatten().tolist()} do not fit width {width}")
    cap = lengths // 2 if (first and last) else lengths
    n_first, n_last = cap.clamp(max=first), cap.clamp(max=last)
    start = torch.zeros_like(lengths) if padding_side == "right" else width - lengths
    rel = torch.arange(width).unsqueeze(0) - start  # position inside the prompt
    in_prompt = (rel >= 0) & (rel < lengths)
    return in_prompt & ((rel < n_first) | (rel >= lengths - n_last))


def prompt_lengths_from_labels(labels: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Prompt length of each row of a right-padded training batch (or of one example).

    Examples carry -100 on prompt tokens, so the prompt is the prefix before the first target
    label. A row with no target at all counts as all-prompt (its full width).
    """
    labels = torch.as_tensor(labels)
    if labels.dim() == 1:
        labels = labels.unsqueeze(0)
    is_target = labels != -100
    first_target = is_target.int().argmax(dim=1)
    return torch.where(is_target.any(dim=1), first_target, torch.full_like(first_target,
                                                                            labels.shape[1]))
