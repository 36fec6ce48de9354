"""Every method's cores: how a device personalizes a user (and what a sharer or collective
user contributes), on top of the method math in :mod:`shared.methods` and the trainers of
:mod:`edge_client.trainers`. A device runs them in the federation (:mod:`edge_client.phases`);
``pfl eval`` runs the very same cores one after the other in one process.

Importing this module registers the cores with :mod:`shared.methods.base`.

Roles (chosen by :func:`simulations.evaluate.assign_roles`): *collective* users train stage 1
(the task adaptation shared by all methods), *sharers* contribute PER-PCS pieces, *targets*
are personalized and evaluated. No target's data is used by any collective step.
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
from dataclasses import asdict
from pathlib import Path

import torch

from shared.errors import PflError
from edge_client.trainers import train_personal_lora, train_sharer_pieces, train_stage1_lora
from shared.embeddings import user_embedding
from shared.generation import generate
from shared.methods import perfit
from shared.methods.base import Core, PersonalState, PromptAugmentation, Runtime, register_core
from shared.methods.lora_pieces import updates_installed
from shared.methods.oppu import (attach_lora, merge_lora, param_count, personal_lora,
                                 personal_train, stage1_lora, stage1_train, state_bytes)
from shared.methods.perpcs import (PerPcsConfig, assemble, peft_retrieval_recipe, rebuild,
                                   select_shared_pieces)
from shared.prompts import build_prompt, pad_token_id
from shared.retrieval import BM25Retriever, random_k
from shared.training import TrainConfig, history_examples
from shared.types import User, recent_history

log = logging.getLogger(__name__)


def augmented_prompts(runtime: Runtime, user: User, augmentation: PromptAugmentation,
                      profile: str | None) -> list[str]:
    """The prompt of each of the user's queries under a prompt augmentation."""
    task = runtime.task
    retriever = BM25Retriever(task, user.history) if augmentation.retrieval == "bm25" else None
    prompts = []
    for query in user.queries:
        retrieved: list = []
        if retriever is not None:
            retrieved = retriever.top_k(task.retrieval_query(query.input), augmentation.k)
        elif augmentation.retrieval == "random":
            retrieved = random_k(user.history, augmentation.k,
                               f"{runtime.seed}-{user.id}-{query.id}")
        prompts.append(build_prompt(query.input, profile=profile if augmentation.profile else None,
                                    retrieved=retrieved, task=task))
    return prompts


def stage1_model(runtime: Runtime):
    """The base with the stage-1 task LoRA (trained on collective users) merged in.

    Trained once per run and shared by every method built on it (LoRA-C, OPPU, PER-PCS,
    PEFT retrieval). Collective users train on their history, capped at ``max_history``.
    """
    if "stage1" not in runtime.cache:
        collective = [recent_history(u, runtime.option("max_history", None))
                      for u in runtime.roles.get("collective", [])]
        if not collective:
            raise ValueError("stage 1 needs collective users: none were assigned")
        config = stage1_train_config(runtime)
        state, stats = train_stage1_lora(runtime.model, runtime.tokenizer, runtime.task,
                                         collective, stage1_lora(), config,
                                         progress=runtime.progress)
        log.info("stage 1: %d collective users, %d steps, loss %.3f -> %.3f", len(collective),
                 stats["steps"], stats["loss_first"], stats["loss_last"])
        runtime.cache["stage1"] = merge_lora(runtime.model, state, stage1_lora())
        runtime.cache["stage1_stats"] = stats
    return runtime.cache["stage1"]


class LoraCollective(Core):
    """LoRA-C: stage 1 only (the task LoRA of collective users), no per-user state."""

    name = "lora-c"

    def prepare(self, runtime, dataset, augmentation):
        stage1_model(runtime)

    @contextmanager
    def model_for(self, runtime, state):
        yield stage1_model(runtime)


class PersonalLora(Core):
    """OPPU: a personal LoRA (q, v; r=8) per user on top of the stage-1 model."""

    name = "oppu"
    shared_model = False
    on_stage1 = True

    def _base(self, runtime):
        return stage1_model(runtime) if self.on_stage1 else runtime.model

    def prepare(self, runtime, dataset, augmentation):
        personal_train_config(runtime)  # a bad --set oppu.* fails now, not after stage 1
        if self.on_stage1:
            stage1_train_config(runtime)
        self._base(runtime)

    def personalize(self, runtime: Runtime, user: User, augmentation: PromptAugmentation,
                    profile: str | None) -> PersonalState:
        user = recent_history(user, runtime.option("max_history", None))
        config = personal_train_config(runtime)
        rag_k = augmentation.k if augmentation.retrieval == "bm25" else 0
        state, stats = train_personal_lora(self._base(runtime), runtime.tokenizer, runtime.task,
                                           user, personal_lora(), config, rag_k=rag_k,
                                           profile=profile, progress=False)
        return PersonalState(params=param_count(state), bytes=state_bytes(state), payload=state,
                             info={"steps": stats["steps"]})

    @contextmanager
    def model_for(self, runtime, state):
        with attach_lora(self._base(runtime), personal_lora(), state=state.payload) as model:
            yield model


class PersonalLoraNoStage1(PersonalLora):
    """LoRA-P: the personal LoRA trained on the raw base (no stage 1)."""

    name = "lora-p"
    on_stage1 = False


def _examples(runtime: Runtime, user: User, augmentation: PromptAugmentation | None = None,
              profile: str | None = None):
    """The user's (recent) history as training/scoring examples, with RAG/PAG as asked."""
    user = recent_history(user, runtime.option("max_history", None))
    rag_k = augmentation.k if augmentation and augmentation.retrieval == "bm25" else 0
    return history_examples(runtime.task, user.history, runtime.tokenizer, rag_k=rag_k,
                            profile=profile)


def _method_config(cls, runtime: Runtime, section: str, **defaults):
    """``cls`` built from the run's ``--set section.key=value`` options (over ``defaults``),
    with clear errors."""
    settings = runtime.option(section, {})
    try:
        return cls(**{**defaults, **settings})
    except (TypeError, ValueError) as exc:
        raise PflError(f"bad {section} setting in {settings}: {exc}") from None


def personal_train_config(runtime: Runtime) -> TrainConfig:
    """The personal LoRA recipe of OPPU, LoRA-P and the PER-PCS sharers: 2 epochs (or the
    run's ``personal_epochs``), lr 1e-4, ..., with any ``--set oppu.FIELD=VALUE`` of
    :class:`~shared.training.TrainConfig` (e.g. ``oppu.gradient_checkpointing=true``)."""
    return _method_config(personal_train, runtime, "oppu", seed=runtime.seed,
                          epochs=runtime.option("personal_epochs", 2.0))


def stage1_train_config(runtime: Runtime) -> TrainConfig:
    """The stage-1 task LoRA's recipe: 3 epochs (or the run's ``stage1_epochs``), lr 1e-4,
    ..., with any ``--set stage1.FIELD=VALUE`` of :class:`~shared.training.TrainConfig`."""
    return _method_config(stage1_train, runtime, "stage1", seed=runtime.seed,
                          epochs=runtime.option("stage1_epochs", 3.0))


def perpcs_config(runtime: Runtime) -> PerPcsConfig:
    return _method_config(PerPcsConfig, runtime, "perpcs")


def piece_pool(runtime: Runtime) -> dict:
    """The sharers' side of PER-PCS, once per run: each sharer trains a personal LoRA (q,k,v,o)
    on the stage-1 model, splits it into pieces, trains their gates and shares the consented
    subset. Returns {"pool": shared gated pieces, "adapters": {sharer: all its pieces},
    "embeddings": {sharer: user embedding}, "seconds": {sharer: time}}."""
    if "perpcs_pool" in runtime.cache:
        return runtime.cache["perpcs_pool"]
    config = perpcs_config(runtime)
    train_config = personal_train_config(runtime)  # both checked before stage 1 trains
    model = stage1_model(runtime)
    store = runtime.cache.get("sharer_store")  # a folder: trained pieces kept between runs
    pool, adapters, embeddings, seconds = [], {}, {}, {}
    for sharer in runtime.roles.get("sharers", []):
        t0 = time.perf_counter()
        history = recent_history(sharer, runtime.option("max_history", None))
        key = sharer_pieces_key(runtime, history, config, train_config) if store else None
        gated = load_sharer_pieces(store, key) if store else None
        if gated is None:
            gated = train_sharer_pieces(model, runtime.tokenizer, runtime.task, history,
                                        config, train_config, sharer=sharer.id)
            if store:
                save_sharer_pieces(store, key, gated)
        else:
            log.info("sharer %s: %d trained pieces reused from %s", sharer.id, len(gated), store)
        pool += select_shared_pieces(gated, config.sharing_ratio, config.sharing_seed)
        adapters[sharer.id] = gated
        embeddings[sharer.id] = user_embedding(runtime.task, sharer)
        seconds[sharer.id] = time.perf_counter() - t0
    if not pool:
        raise ValueError("PER-PCS needs sharers: none were assigned")
    log.info("piece pool: %d pieces from %d sharers", len(pool), len(adapters))
    runtime.cache["perpcs_pool"] = {"pool": pool, "adapters": adapters,
                                    "embeddings": embeddings, "seconds": seconds,
                                    "lookup": {p.piece_id: p for ps in adapters.values()
                                               for p in ps}}
    return runtime.cache["perpcs_pool"]


#: PerPcsConfig fields that change what a sharer trains (the others only select or assemble).
SHARER_TRAINING_FIELDS = ("target_modules", "gate_steps", "gate_lr", "gate_batch_size")


def stage1_digest(runtime: Runtime) -> str:
    """sha256 over the stage-1 model's parameters (memoized in the run's cache)."""
    if "stage1_digest" not in runtime.cache:
        h = hashlib.sha256()
        for name, tensor in stage1_model(runtime).state_dict().items():
            h.update(name.encode() + b"\0")
            h.update(tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy())
        runtime.cache["stage1_digest"] = h.hexdigest()
    return runtime.cache["stage1_digest"]


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


def save_sharer_pieces(store: str | Path, key: str, pieces: list) -> Path:
    """Keep a sharer's gated pieces under ``store/key/`` (content bytes per piece, named by
    its id, and an index), written to a temporary folder and renamed into place."""
    from shared.serialization import content_bytes

    target = Path(store) / key
    if target.is_dir():
        return target
    Path(store).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key[:16]}.", dir=store))
    try:
        for piece in pieces:
            (tmp / f"{piece.piece_id}.bin").write_bytes(content_bytes(piece))
        (tmp / "index.json").write_text(json.dumps(
            {"sharer": pieces[0].sharer if pieces else "", "pieces": [p.piece_id for p in pieces]}))
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not target.is_dir():
            raise
    return target


def load_sharer_pieces(store: str | Path, key: str) -> list | None:
    """The pieces :func:`save_sharer_pieces` kept under ``key`` (each re-hashed against its
    id), or None when there are none or they do not check out."""
    from shared.serialization import InvalidPiece, piece_from_content_bytes

    folder = Path(store) / key
    try:
        index = json.loads((folder / "index.json").read_text())
        return [piece_from_content_bytes((folder / f"{pid}.bin").read_bytes(), index["sharer"],
                                         expected_id=pid) for pid in index["pieces"]]
    except (OSError, ValueError, KeyError, TypeError, InvalidPiece):
        return None


class PersonalPieces(Core):
    """PER-PCS: assemble each target's adapter from the sharers' pieces, without training.

    Per user only the recipe (piece ids and weights per layer and module) is stored."""

    name = "perpcs"
    shared_model = False

    def prepare(self, runtime, dataset, augmentation):
        piece_pool(runtime)

    def recipe(self, runtime, user, augmentation, profile):
        pool = piece_pool(runtime)
        return assemble(stage1_model(runtime), pool["pool"],
                        _examples(runtime, user, augmentation, profile),
                        pad_token_id(runtime.tokenizer), perpcs_config(runtime))

    def personalize(self, runtime, user, augmentation, profile):
        recipe = self.recipe(runtime, user, augmentation, profile)
        weights = sum(len(entries) for entries in recipe.entries.values())
        return PersonalState(params=weights, bytes=recipe.num_bytes, payload=recipe)

    @contextmanager
    def model_for(self, runtime, state):
        updates = rebuild(state.payload, piece_pool(runtime)["lookup"])
        model = stage1_model(runtime)
        with updates_installed(model, updates):
            yield model


class PeftRetrieval(PersonalPieces):
    """PEFT retrieval: the top-k sharers' whole adapters by user-embedding similarity,
    averaged with similarity weights (stored, like PER-PCS, as a recipe)."""

    name = "peft-retrieval"

    def recipe(self, runtime, user, augmentation, profile):
        pool = piece_pool(runtime)
        return peft_retrieval_recipe(user_embedding(runtime.task, user), pool["embeddings"],
                                     pool["adapters"], perpcs_config(runtime))


def perfit_config(runtime: Runtime) -> perfit.PerFitConfig:
    return _method_config(perfit.PerFitConfig, runtime, "perfit")


def perfit_stage1(runtime: Runtime):
    """PerFit stage 1 on the collective users: the collective shift and the shared stage 2."""
    if "perfit_stage1" not in runtime.cache:
        examples = [ex for u in runtime.roles.get("collective", []) for ex in _examples(runtime, u)]
        if not examples:
            raise ValueError("PerFit stage 1 needs collective users: none were assigned")
        config = perfit_config(runtime)
        stage1, stage2, stats = perfit.train_stage1(
            runtime.model, examples, config, pad_id=pad_token_id(runtime.tokenizer),
            train_config=config.train_config(seed=runtime.seed,
                                             epochs=runtime.option("stage1_epochs", 3.0)),
            seed=runtime.seed, progress=runtime.progress)
        runtime.cache["perfit_stage1"] = (stage1, stage2)
    return runtime.cache["perfit_stage1"]


class PersonalShift(Core):
    """PerFit: a collective LoReFT shift (stage 1) plus a small personal one per user."""

    name = "perfit"
    shared_model = False

    def prepare(self, runtime, dataset, augmentation):
        perfit_stage1(runtime)

    def personalize(self, runtime, user, augmentation, profile):
        config = perfit_config(runtime)
        stage1, shared_stage2 = perfit_stage1(runtime)
        personal, stats = perfit.train_stage2(
            runtime.model, _examples(runtime, user, augmentation, profile), config, stage1,
            shared_stage2, pad_id=pad_token_id(runtime.tokenizer),
            train_config=config.train_config(seed=runtime.seed))
        params = personal.num_parameters()
        return PersonalState(params=params, bytes=4 * params, payload=personal,
                             info={"steps": stats["steps"]})

    def answer(self, runtime, state, prompts, generation, *, desc="generate", progress=False):
        stage1, _ = perfit_stage1(runtime)
        with perfit.intervened(runtime.model, stage1, state.payload,
                               perfit_config(runtime).positions) as controller:
            return generate(runtime.model, runtime.tokenizer, prompts, generation, desc=desc,
                            progress=progress,
                            on_batch=lambda lengths, width: controller.set_prompts(
                                lengths, width, padding_side="left"))


for _core in (LoraCollective, PersonalLora, PersonalLoraNoStage1, PersonalPieces, PeftRetrieval,
              PersonalShift):
    register_core(_core.name, _core)
