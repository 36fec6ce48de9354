"""PerFit's core and its collective part, as every caller runs them (``pfl eval`` in one
process, a device in the federation).

- :func:`perfit_stage1`: the collective LoReFT shift and the shared stage 2, trained on the
  collective users (on a device: from the federation's arrays, :class:`PerFitStage1`).
- :class:`PersonalShift` (``perfit``): a small personal stage 2 per user.
- :class:`PerFitStage1` (collective kind ``perfit``): stage 1 + the shared stage 2 as the
  federation trains them with FedAvg; every R is re-orthonormalized after averaging.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from shared.config import options_from_message
from shared.errors import PflError
from shared.generation import generate
from shared.methods.base import (Collective, Core, PersonalState, Runtime, options_section,
                                 register_collective, register_core, user_examples)
from shared.methods.perfit.config import PerFitConfig
from shared.methods.perfit.intervention import orthonormality_error, reorthonormalize
from shared.methods.perfit.model import (PerFitStage, intervened, new_stages, train_stage1,
                                         train_stage2)
from shared.methods.store import arrays_digest, trained_once
from shared.prompts import pad_token_id
from shared.training import LazyExamples, history_examples
from shared.types import recent_history

#: The two parts of PerFit's collective arrays: ``stage1.layers.N.R|W|b``, ``stage2.*``.
STAGE_PREFIXES = ("stage1", "stage2")


def perfit_config(runtime: Runtime) -> PerFitConfig:
    """PerFit's settings for this run: :class:`PerFitConfig` with ``--set perfit.FIELD=VALUE``."""
    return runtime.section(PerFitConfig, "perfit")


def perfit_stage1(runtime: Runtime):
    """PerFit stage 1 on the collective users: the collective shift and the shared stage 2."""
    if runtime.cache.perfit_stage1 is None:
        collective = [recent_history(u, runtime.option("max_history", None))
                      for u in runtime.roles.get("collective", [])]
        examples = [ex for u in collective for ex in user_examples(runtime, u)]
        if not examples:
            raise ValueError("PerFit stage 1 needs collective users: none were assigned")
        config = perfit_config(runtime)
        train_config = config.train_config(seed=runtime.seed,
                                           epochs=runtime.option("stage1_epochs", 3.0))

        def train():
            stage1, stage2, stats = train_stage1(
                runtime.model, examples, config, pad_id=pad_token_id(runtime.tokenizer),
                train_config=train_config, seed=runtime.seed, progress=runtime.progress)
            return perfit_to_arrays(stage1, stage2), stats

        arrays, _ = trained_once(runtime, "perfit-stage1", collective, examples,
                                 {"perfit": config.to_dict(), "train": train_config}, train)
        runtime.cache.perfit_stage1 = perfit_from_arrays(arrays, device=runtime.loaded.device)
    return runtime.cache.perfit_stage1


def answer_with(runtime: Runtime, stage2, prompts, generation, *, desc: str, progress: bool):
    """Generate with PerFit's collective stage 1 and ``stage2`` (a user's personal stage or
    the shared one) hooked into the model."""
    stage1, _ = perfit_stage1(runtime)
    with intervened(runtime.model, stage1, stage2, perfit_config(runtime).positions) as ctl:
        return generate(runtime.model, runtime.tokenizer, prompts, generation, desc=desc,
                        progress=progress,
                        on_batch=lambda lengths, width: ctl.set_prompts(
                            lengths, width, padding_side="left"))


def serving_row(runtime: Runtime, stage2, name: str):
    """PerFit's collective stage 1 and ``stage2`` as one row of a mixed batch."""
    from shared.serving.rows import RowAdapter, RowIntervention  # cycle: shared.serving imports the methods

    stage1, _ = perfit_stage1(runtime)
    return RowAdapter(intervention=RowIntervention((stage1, stage2),
                                                   perfit_config(runtime).positions), name=name)


class CollectiveShift(Core):
    """PerFit-C: PerFit's collective part only (stage 1 and the shared stage 2, trained on
    the collective users), no per-user state: what PerFit's personal stage adds is PerFit
    against this row, as OPPU against LoRA-C."""

    name = "perfit-c"
    collective = ("perfit",)

    def prepare(self, runtime, dataset, augmentation):
        perfit_stage1(runtime)

    def answer_torch(self, runtime, state, prompts, generation, *, desc="generate",
                     progress=False):
        return answer_with(runtime, perfit_stage1(runtime)[1], prompts, generation, desc=desc,
                           progress=progress)

    def remote_personalization(self, runtime, state):
        return {"perfit": perfit_stage1(runtime)[1]}  # the shared stage 2, inline

    def serving_adapter(self, runtime, state):
        return serving_row(runtime, perfit_stage1(runtime)[1], self.name)


class PersonalShift(Core):
    """PerFit: a collective LoReFT shift (stage 1) plus a small personal one per user."""

    name = "perfit"
    shared_model = False
    collective = ("perfit",)

    def prepare(self, runtime, dataset, augmentation):
        perfit_stage1(runtime)

    def personalize(self, runtime, user, augmentation, profile):
        config = perfit_config(runtime)
        stage1, shared_stage2 = perfit_stage1(runtime)
        examples = user_examples(runtime, user, augmentation, profile)
        train_config = config.train_config(seed=runtime.seed)

        def train():
            trained, stats = train_stage2(runtime.model, examples, config, stage1,
                                          shared_stage2, pad_id=pad_token_id(runtime.tokenizer),
                                          train_config=train_config)
            return trained.export_arrays(), stats

        # kept per user when the run has a store: a resumed run trains only the users missing
        arrays, stats = trained_once(
            runtime, "perfit-personal", [user], examples,
            lambda: {"perfit": config.to_dict(), "train": train_config,
                     "stage1": arrays_digest(perfit_to_arrays(stage1, shared_stage2))}, train)
        personal = PerFitStage.from_arrays(arrays, device=runtime.loaded.device)
        params = personal.num_parameters()
        return PersonalState(params=params, bytes=4 * params, payload=personal,
                             info={"steps": stats["steps"]})

    def answer_torch(self, runtime, state, prompts, generation, *, desc="generate",
                     progress=False):
        return answer_with(runtime, state.payload, prompts, generation, desc=desc,
                           progress=progress)

    def remote_personalization(self, runtime, state):
        return {"perfit": state.payload}

    def serving_adapter(self, runtime, state):
        return serving_row(runtime, state.payload, self.name)

    def save_payload(self, payload, directory):
        np.savez(directory / "stage2.npz", **payload.export_arrays())

    def load_payload(self, directory, runtime):
        with np.load(directory / "stage2.npz") as data:
            return PerFitStage.from_arrays({k: data[k] for k in data.files},
                                           device=runtime.loaded.device)


def perfit_to_arrays(stage1, stage2) -> dict[str, np.ndarray]:
    """PerFit stage 1 + shared stage 2 as one flat float32 dict ``stageK.layers.N.R|W|b``."""
    out = {}
    for prefix, stage in zip(STAGE_PREFIXES, (stage1, stage2)):
        for key, value in stage.export_arrays().items():
            out[f"{prefix}.{key}"] = np.asarray(value, dtype=np.float32)
    return out


def perfit_from_arrays(arrays: Mapping[str, Any], device="cpu"):
    """Inverse of :func:`perfit_to_arrays`: (stage 1, shared stage 2) as PerFitStage modules
    (an R that is not orthonormal, e.g. a raw average, is re-orthonormalized on load)."""
    parts: dict[str, dict] = {prefix: {} for prefix in STAGE_PREFIXES}
    for key, value in arrays.items():
        prefix, _, rest = key.partition(".")
        if prefix not in parts or not rest:
            raise PflError(f"PerFit arrays: unexpected key {key!r} (want stage1.* / stage2.*)")
        parts[prefix][rest] = value
    if not all(parts.values()):
        raise PflError("PerFit arrays need both stage1.* and stage2.* keys")
    return tuple(PerFitStage.from_arrays(parts[p], device=device) for p in STAGE_PREFIXES)


def is_rotation_key(name: str) -> bool:
    """True for a PerFit R matrix ("stage1/layers.3.R", "layers.3.R", ...)."""
    return name.rsplit(".", 1)[-1] == "R"


def reorthonormalize_perfit(arrays: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A copy of PerFit ``arrays`` with every R replaced by the nearest matrix with
    orthonormal rows (polar factor, :func:`shared.methods.perfit.reorthonormalize`).

    Needed after every FedAvg of PerFit stages: the average of matrices with orthonormal rows
    is NOT a matrix with orthonormal rows (averaging two different rotations shrinks it toward
    0), so the averaged R would no longer be a projection onto an r-dimensional subspace.
    W and b are plain linear parameters and stay as averaged.
    """
    out: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        array = np.asarray(value, dtype=np.float32)
        if is_rotation_key(name):
            if array.ndim != 2 or array.shape[0] > array.shape[1]:
                raise ValueError(f"{name}: shape {array.shape} is not an (r, d) rotation, r <= d")
            array = reorthonormalize(array).numpy().astype(np.float32)
        out[name] = array
    return out


def max_orthonormality_error(arrays: Mapping[str, Any]) -> float:
    """max over every R in ``arrays`` of max|R R^T - I| (0.0 when there is no R)."""
    errors = [orthonormality_error(np.asarray(v)) for k, v in arrays.items()
              if is_rotation_key(k)]
    return max(errors, default=0.0)


#: Run-config keys that shape PerFit's collective arrays, and their PerFitConfig fields.
STAGE_OPTIONS = (("collective-rank", "collective_rank"), ("personal-rank", "personal_rank"),
                 ("positions", "positions"))


class PerFitStage1(Collective):
    """PerFit stage 1 (the collective LoReFT shift) trained jointly with the shared stage 2:
    fresh seeded stages on the server, :func:`train_stage1` on each collective device."""

    kind = "perfit"
    consent_kind = "perfit_stage1"

    @staticmethod
    def config(options: Mapping[str, Any]) -> PerFitConfig:
        """What :func:`perfit_config` gives ``pfl eval`` and the targets: the run's
        ``perfit.*`` settings (the message's ``options.*``), with the run config's own
        ``collective-rank``, ``personal-rank`` and ``positions`` on top when set."""
        method_options = options_from_message(options)
        own = {field: options[key] for key, field in STAGE_OPTIONS
               if options.get(key) not in (None, "", 0)}  # 0, "": unset
        return options_section({"perfit": {**(method_options.get("perfit") or {}), **own}},
                               PerFitConfig, "perfit")

    def initial_arrays(self, loaded, seed, options):
        stage1, stage2 = new_stages(self.config(options), loaded.num_layers, loaded.hidden_size,
                                    seed=seed)
        return perfit_to_arrays(stage1, stage2)

    def train_config(self, options):
        """PerFit stage 1's recipe as ``pfl eval`` trains it (:func:`perfit_stage1`): the
        PerFit settings' lr and weight decay, ``stage1_epochs`` epochs (default 3)."""
        epochs = options_from_message(options).get("stage1_epochs", 3.0)
        return self.config(options).train_config(epochs=epochs)

    def local_update(self, loaded, task, users, arrays, train_config, options):
        stage1, stage2 = perfit_from_arrays(arrays, device=loaded.device)
        examples = LazyExamples.concat(history_examples(
            task, user.history, loaded.tokenizer, max_prompt_tokens=train_config.max_prompt_tokens,
            max_target_tokens=train_config.max_target_tokens) for user in users)
        if not examples:
            raise PflError("no history to train on")
        stage1, stage2, stats = train_stage1(loaded.model, examples, self.config(options),
                                             pad_id=pad_token_id(loaded.tokenizer),
                                             stage1=stage1, stage2=stage2,
                                             train_config=train_config, seed=train_config.seed)
        return perfit_to_arrays(stage1, stage2), {**stats, "examples": len(examples)}

    def after_aggregation(self, arrays):
        # The average of matrices with orthonormal rows is not orthonormal: project each
        # averaged R back to the nearest matrix with orthonormal rows before it is used.
        arrays = reorthonormalize_perfit(arrays)
        return arrays, self.describe(arrays)

    def describe(self, arrays):
        return {"orthonormality_error": max_orthonormality_error(arrays)}

    def install(self, runtime, arrays):
        runtime.cache.perfit_stage1 = perfit_from_arrays(arrays, device=runtime.loaded.device)


for _core in (CollectiveShift, PersonalShift):
    register_core(_core.name, _core)
register_collective(PerFitStage1())
