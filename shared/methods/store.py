"""Trained collective state kept between runs, by what it was trained from.

Stage 1 (the task LoRA on the collective users) and PerFit's stage 1 take the longest of any
step of ``pfl eval`` and ``pfl tune``: 105 minutes of one CPU thread for news-category. They
depend only on the base model, the task, the collective users' histories and the training
settings, so a run that needs the same state again (a resumed run, a tuning run that shares
its collective users with the evaluation, the next method of a study) reads it back instead.

The key is a sha256 over all of those (:func:`state_key`); an entry is the state's arrays in
an .npz and a small JSON of training statistics, each written atomically. A missing, partial
or unreadable entry is trained again. Federated runs do not use the store: there stage 1 is
the federation's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import zipfile
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from shared.files import save_npz, write_json
from shared.types import User

log = logging.getLogger(__name__)

FORMAT = 1


def model_digest(model: torch.nn.Module) -> str:
    """sha256 over a model's parameters and buffers, by name (its exact bytes)."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode() + b"\0")
        h.update(tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def base_digest(runtime) -> str:
    """:func:`model_digest` of the run's base model, once per run."""
    if runtime.cache.base_digest is None:
        runtime.cache.base_digest = model_digest(runtime.model)
    return runtime.cache.base_digest


def users_fingerprint(users: Sequence[User]) -> list:
    """What of ``users`` training reads: each id and its history items' ids and fields."""
    return [[u.id, [[item.id, sorted(item.fields.items())] for item in u.history]]
            for u in users]


def examples_digest(examples: Sequence[tuple[Sequence[int], Sequence[int]]]) -> str:
    """sha256 over training examples' token ids and labels: it changes with the prompt
    format, the tokenizer and the history, whatever made them."""
    h = hashlib.sha256()
    for ids, labels in examples:
        h.update(np.asarray(ids, dtype=np.int64).tobytes() + b"|")
        h.update(np.asarray(labels, dtype=np.int64).tobytes() + b";")
    return h.hexdigest()


def arrays_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 over names, shapes and bytes: identifies a set of collective arrays."""
    h = hashlib.sha256()
    for key in sorted(arrays):
        value = np.ascontiguousarray(arrays[key], dtype=np.float32)
        h.update(key.encode() + str(value.shape).encode() + value.tobytes())
    return h.hexdigest()


def _plain(value: Any) -> Any:
    return asdict(value) if is_dataclass(value) and not isinstance(value, type) else value


def state_key(runtime, kind: str, users: Sequence[User], examples: Sequence,
              **settings: Any) -> str:
    """The store key of ``kind`` trained on ``users``' ``examples`` with ``settings``
    (dataclasses or plain JSON values), on this run's base model, task and device type."""
    body = {"format": FORMAT, "kind": kind, "base": base_digest(runtime),
            "device": runtime.loaded.device.type if hasattr(runtime.loaded.device, "type")
            else str(runtime.loaded.device),
            "task": runtime.task.name, "users": users_fingerprint(users),
            "examples": examples_digest(examples),
            "settings": {k: _plain(v) for k, v in sorted(settings.items())}}
    text = json.dumps(body, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def load_state(store: str | Path, key: str) -> tuple[dict[str, np.ndarray], dict] | None:
    """``(arrays, stats)`` kept under ``key``, or None when there is no complete entry."""
    folder = Path(store)
    try:
        stats = json.loads((folder / f"{key}.json").read_text())
        with np.load(folder / f"{key}.npz", allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None
    if stats.get("arrays") != sorted(arrays):
        return None
    return arrays, stats.get("stats", {})


def save_state(store: str | Path, key: str, arrays: Mapping[str, np.ndarray],
               stats: Mapping[str, Any]) -> None:
    """Keep ``arrays`` and ``stats`` under ``key``: the arrays first, then the JSON that
    names them (an entry without its JSON is not read)."""
    folder = Path(store)
    folder.mkdir(parents=True, exist_ok=True)
    save_npz(folder / f"{key}.npz", arrays)
    plain = json.loads(json.dumps(dict(stats), default=str))
    write_json(folder / f"{key}.json", {"arrays": sorted(arrays), "stats": plain})


def trained_once(runtime, kind: str, users: Sequence[User], examples: Sequence,
                 settings: Mapping[str, Any] | Callable[[], Mapping[str, Any]],
                 train: Callable[[], tuple[Mapping[str, np.ndarray], Mapping[str, Any]]]
                 ) -> tuple[dict[str, np.ndarray], dict]:
    """``train()``'s ``(arrays, stats)``, or the same read back from the run's store
    (``runtime.cache.state_store``, a folder) when an earlier run trained it on the same
    ``users``, ``examples`` (:func:`examples_digest`) and ``settings`` (a mapping, or a
    function that returns one: called only when there is a store). Stats kept carry
    ``train_seconds``; reading them back counts that time with :func:`note_reused`."""
    store = runtime.cache.state_store
    if store is None:
        arrays, stats = train()
        return dict(arrays), dict(stats)
    key = state_key(runtime, kind, users, examples,
                    **(settings() if callable(settings) else settings))
    kept = load_state(store, key)
    if kept is not None:
        log.info("%s: trained state reused from %s (%s)", kind, store, key[:12])
        arrays, stats = kept
        note_reused(runtime, stats.get("train_seconds", stats.get("seconds", 0.0)))
        return arrays, stats
    started = time.perf_counter()
    arrays, stats = train()
    stats = {**stats, "train_seconds": time.perf_counter() - started}
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    try:
        save_state(store, key, arrays, stats)
    except OSError as e:  # a full or read-only cache must not lose the run
        log.warning("%s: could not keep the trained state in %s: %s", kind, store, e)
    return arrays, stats


def note_reused(runtime, seconds: float) -> None:
    """Count ``seconds`` of earlier training that this run read back instead of repeating it
    (a kept state, a sharer's kept pieces). ``pfl eval`` adds what a step read back to the
    time it measured (:func:`reused_so_far` before and after), so that a resumed run reports
    what a method costs, not what reading its files costs. Entries kept before their time
    was recorded count 0."""
    runtime.cache.reused_seconds = reused_so_far(runtime) + float(seconds or 0.0)


def reused_so_far(runtime) -> float:
    """The training seconds this run has read back so far (:func:`note_reused`)."""
    return float(runtime.cache.reused_seconds)
