"""PER-PCS' cores: the sharers' side (pieces and gates, once per run), the targets' assembly,
and the PEFT-retrieval baseline, as every caller runs them (``pfl eval`` in one process, a
device in the federation).

- :func:`piece_pool`: every sharer trains its LoRA on the stage-1 model, splits it into pieces,
  trains their gates and shares the consented subset (kept between runs under the cache dir,
  :func:`save_sharer_pieces`).
- :class:`PersonalPieces` (``perpcs``): a target assembles its adapter from the pool, no
  training; it stores only the recipe (piece ids and weights, compact binary).
- :class:`PeftRetrieval` (``peft-retrieval``): the top-k sharers' whole adapters by
  user-embedding similarity.
- :class:`LossScoredPieces` (``perpcs-loss``): the sharer whose pooled pieces give the lowest
  loss on the target's history.

A device reads pieces from the pool service through a *piece source* in
``runtime.cache.perpcs_source``: an object with ``gates(modules)`` (the pool's gates:
``piece_id``, ``sharer``, ``layer``, ``module``) and ``fetch(ids)`` ({id: Piece});
:class:`LocalPieces` is the one of an in-process run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from shared.embeddings import user_embedding
from shared.methods.base import Core, PersonalState, Runtime, register_core, user_examples
from shared.methods.oppu.core import (personal_train_config, stage1_digest, stage1_model,
                                     stage1_updates)
from shared.methods.perpcs.check import assemble_checked
from shared.methods.perpcs.config import PerPcsConfig
from shared.methods.perpcs.gates import select_shared_pieces
from shared.methods.perpcs.loss_selection import loss_scored_recipe
from shared.methods.perpcs.pieces import updates_installed
from shared.methods.perpcs.recipe import Recipe, rebuild
from shared.methods.perpcs.retrieval_baseline import peft_retrieval_recipe
from shared.methods.perpcs.training import train_sharer_pieces
from shared.methods.store import note_reused
from shared.prompts import pad_token_id
from shared.serialization import InvalidPiece, content_bytes, piece_from_content_bytes
from shared.types import User, recent_history

log = logging.getLogger(__name__)

#: The file a target's recipe is stored in (compact binary, :meth:`Recipe.to_compact`).
RECIPE_FILE = "recipe.pcr"


@dataclass
class PiecePool:
    """The pieces PER-PCS reads in one run (``runtime.cache.perpcs_pool``).

    ``pool``: the shared gated pieces targets assemble from; ``lookup``: piece id -> piece,
    for rebuilding a recipe. An in-process run (:func:`piece_pool`) also knows each sharer's
    whole adapter, its user embedding (PEFT retrieval) and its time; a device knows only
    what it fetched from the pool service."""

    pool: list
    lookup: dict
    adapters: dict = field(default_factory=dict)
    embeddings: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    #: a device's pool of gates only: fetch(ids) -> {id: Piece} brings the pieces assembly
    #: selects (:func:`~shared.methods.perpcs.assembly.assemble`); None: ``pool`` is whole
    fetch: Callable | None = None

    @classmethod
    def of(cls, pieces: dict) -> "PiecePool":
        """A pool of exactly ``pieces`` ({id: piece})."""
        return cls(pool=list(pieces.values()), lookup=dict(pieces))

    def whole(self) -> list:
        """Every pooled piece with its factors (fetched first when the pool is gates)."""
        if self.fetch is None:
            return self.pool
        got = self.fetch([entry.piece_id for entry in self.pool])
        return [got[entry.piece_id] for entry in self.pool]


class LocalPieces:
    """The piece source of an in-process run: the pool :func:`piece_pool` built."""

    def __init__(self, pool: PiecePool):
        self._pool = pool

    def gates(self, modules: Sequence[str]) -> list:
        return [p for p in self._pool.pool if p.module in set(modules)]

    def fetch(self, ids: Sequence[str]) -> dict:
        return {pid: self._pool.lookup[pid] for pid in ids}


def perpcs_config(runtime: Runtime) -> PerPcsConfig:
    """PER-PCS' settings for this run: :class:`PerPcsConfig` with ``--set perpcs.FIELD=VALUE``."""
    return runtime.section(PerPcsConfig, "perpcs")


def piece_pool(runtime: Runtime) -> PiecePool:
    """The sharers' side of PER-PCS, once per run: each sharer trains a personal LoRA (q,k,v,o)
    on the stage-1 model, splits it into pieces, trains their gates and shares the consented
    subset. Returns the :class:`PiecePool` (each sharer's whole adapter, embedding and time
    included)."""
    if runtime.cache.perpcs_pool is not None:
        return runtime.cache.perpcs_pool
    config = perpcs_config(runtime)
    train_config = personal_train_config(runtime)  # both checked before stage 1 trains
    model = stage1_model(runtime)
    store = runtime.cache.sharer_store  # a folder: trained pieces kept between runs
    pool, adapters, embeddings, seconds = [], {}, {}, {}
    sharers = runtime.roles.get("sharers", [])
    for n, sharer in enumerate(sharers, 1):
        t0 = time.perf_counter()
        history = recent_history(sharer, runtime.option("max_history", None))
        key = sharer_pieces_key(runtime, history, config, train_config) if store else None
        kept = load_sharer_pieces(store, key) if store else None
        gated, kept_seconds = kept if kept else (None, 0.0)
        if gated is None:
            log.info("sharer %d/%d (%s): training its LoRA and gates on %d items",
                     n, len(sharers), sharer.id, len(history.history))
            gated = train_sharer_pieces(model, runtime.tokenizer, runtime.task, history,
                                        config, train_config, sharer=sharer.id)
            log.info("sharer %d/%d (%s): %d pieces in %.0f s", n, len(sharers), sharer.id,
                     len(gated), time.perf_counter() - t0)
            if store:
                save_sharer_pieces(store, key, gated, seconds=time.perf_counter() - t0)
        else:
            log.info("sharer %s: %d trained pieces reused from %s", sharer.id, len(gated), store)
            note_reused(runtime, kept_seconds)  # what training them took, for a resumed run's costs
        pool += select_shared_pieces(gated, config.sharing_ratio, config.sharing_seed)
        adapters[sharer.id] = gated
        embeddings[sharer.id] = user_embedding(runtime.task, sharer)
        seconds[sharer.id] = time.perf_counter() - t0 + kept_seconds
    if not pool:
        raise ValueError("PER-PCS needs sharers: none were assigned")
    log.info("piece pool: %d pieces from %d sharers", len(pool), len(adapters))
    runtime.cache.perpcs_pool = PiecePool(
        pool=pool, lookup={p.piece_id: p for ps in adapters.values() for p in ps},
        adapters=adapters, embeddings=embeddings, seconds=seconds)
    return runtime.cache.perpcs_pool


#: PerPcsConfig fields that change what a sharer trains (the others only select or assemble).
SHARER_TRAINING_FIELDS = ("target_modules", "gate_steps", "gate_lr", "gate_batch_size")


def sharer_pieces_key(runtime: Runtime, sharer: User, config: PerPcsConfig,
                      train_config) -> str:
    """What a sharer's trained pieces depend on, hashed: the stage-1 model, the task, the
    sharer and its history, the pieces' training settings. The sharing ratio, top-k and the
    other assembly settings are not in it: runs that differ only there reuse the pieces."""
    body = {"format": 1, "stage1": stage1_digest(runtime), "task": runtime.task.name,
            "sharer": sharer.id,
            "history": [[item.id, sorted(item.fields.items())] for item in sharer.history],
            "pieces": {k: config.to_dict()[k] for k in SHARER_TRAINING_FIELDS},
            "train": asdict(train_config)}
    text = json.dumps(body, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def save_sharer_pieces(store: str | Path, key: str, pieces: list, *,
                       seconds: float = 0.0) -> Path:
    """Keep a sharer's gated pieces under ``store/key/`` (content bytes per piece, named by
    its id, and an index with the ``seconds`` training them took), written to a temporary
    folder and renamed into place."""
    target = Path(store) / key
    if target.is_dir():
        return target
    Path(store).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key[:16]}.", dir=store))
    try:
        for piece in pieces:
            (tmp / f"{piece.piece_id}.bin").write_bytes(content_bytes(piece))
        (tmp / "index.json").write_text(json.dumps(
            {"sharer": pieces[0].sharer if pieces else "", "pieces": [p.piece_id for p in pieces],
             "seconds": float(seconds)}))
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not target.is_dir():
            raise
    return target


def load_sharer_pieces(store: str | Path, key: str) -> tuple[list, float] | None:
    """``(pieces, seconds)`` that :func:`save_sharer_pieces` kept under ``key`` (each piece
    re-hashed against its id; seconds 0 for an entry kept before its time was), or None when
    there are none or they do not check out."""
    folder = Path(store) / key
    try:
        index = json.loads((folder / "index.json").read_text())
        pieces = [piece_from_content_bytes((folder / f"{pid}.bin").read_bytes(), index["sharer"],
                                           expected_id=pid) for pid in index["pieces"]]
        return pieces, float(index.get("seconds", 0.0))
    except (OSError, ValueError, KeyError, TypeError, InvalidPiece):
        return None


class PersonalPieces(Core):
    """PER-PCS: assemble each target's adapter from the sharers' pieces, without training.

    Per user only the recipe (piece ids and weights per layer and module) is stored."""

    name = "perpcs"
    shared_model = False
    collective = ("lora",)
    uses_pool = True

    def prepare(self, runtime, dataset, augmentation):
        piece_pool(runtime)

    def recipe(self, runtime, user, augmentation, profile):
        """The target's checked recipe (:func:`~shared.methods.perpcs.check.assemble_checked`:
        gate or loss routing on its history less the held-out items, then the check)."""
        return assemble_checked(stage1_model(runtime), piece_pool(runtime),
                                user_examples(runtime, user, augmentation, profile),
                                pad_token_id(runtime.tokenizer), perpcs_config(runtime))

    def personalize(self, runtime, user, augmentation, profile):
        recipe = self.recipe(runtime, user, augmentation, profile)
        weights = sum(len(entries) for entries in recipe.entries.values())
        check = recipe.config.get("check") or {}
        info = {"outcome": check["outcome"]} if "outcome" in check else {}
        return PersonalState(params=weights, bytes=recipe.num_bytes, payload=recipe, info=info)

    def remote_personalization(self, runtime, state):
        return {"recipe": state.payload}  # piece ids and weights: the service has the pool

    def serving_adapter(self, runtime, state):
        from shared.serving.rows import RowAdapter, concat  # cycle: shared.serving imports the methods

        updates = rebuild(state.payload, piece_pool(runtime).lookup)
        return RowAdapter(concat(stage1_updates(runtime), updates), name=self.name)

    @contextmanager
    def model_for(self, runtime, state):
        updates = rebuild(state.payload, piece_pool(runtime).lookup)
        model = stage1_model(runtime)
        with updates_installed(model, updates):
            yield model

    def save_payload(self, payload: Recipe, directory):
        """The recipe's compact binary form (:meth:`Recipe.to_compact`): what a target
        stores, and what :attr:`PersonalState.bytes` counts."""
        (directory / RECIPE_FILE).write_bytes(payload.to_compact())

    def load_payload(self, directory, runtime):
        """The recipe back from its compact form, its pieces' ids expanded against the
        pool's candidates (``runtime.cache.perpcs_source`` on a device, else this run's
        pool), and the pieces it names made available to :meth:`model_for`."""
        source = runtime.cache.perpcs_source or LocalPieces(piece_pool(runtime))
        candidates: dict = {}
        for gate in source.gates(perpcs_config(runtime).target_modules):
            candidates.setdefault((gate.layer, gate.module), []).append(
                (gate.piece_id, gate.sharer))
        recipe = Recipe.from_compact((directory / RECIPE_FILE).read_bytes(), candidates)
        lookup = source.fetch(sorted(recipe.piece_ids()))
        runtime.cache.perpcs_pool = PiecePool.of(lookup)
        return recipe


class PeftRetrieval(PersonalPieces):
    """PEFT retrieval: the top-k sharers' whole adapters by user-embedding similarity,
    averaged with similarity weights (stored, like PER-PCS, as a recipe)."""

    name = "peft-retrieval"
    federated = False  # it needs the sharers' embeddings on the server (no consent by default)

    def recipe(self, runtime, user, augmentation, profile):
        pool = piece_pool(runtime)
        return peft_retrieval_recipe(user_embedding(runtime.task, user), pool.embeddings,
                                     pool.adapters, perpcs_config(runtime))


class LossScoredPieces(PersonalPieces):
    """PER-PCS with a rating-aware choice instead of gates: the one sharer whose pooled pieces
    give the lowest loss on the target's own history (:mod:`shared.methods.perpcs.loss_selection`).
    No training; stored, fetched and rebuilt as a PER-PCS recipe from the same pool."""

    name = "perpcs-loss"

    def recipe(self, runtime, user, augmentation, profile):
        return loss_scored_recipe(stage1_model(runtime), piece_pool(runtime).whole(),
                                  user_examples(runtime, user, augmentation, profile),
                                  pad_token_id(runtime.tokenizer), perpcs_config(runtime))


for _core in (PersonalPieces, PeftRetrieval, LossScoredPieces):
    register_core(_core.name, _core)
