"""What every method is made of, and how method names are read.

A method is a personalization **core** (how the model is adapted to the user: not at all,
a personal LoRA, assembled pieces, an intervention ...) combined with a **prompt
augmentation** (what of the user's own data goes into the prompt: RAG top-k, random k items,
a PAG profile). Names combine them with ``+``: ``rag1``, ``pag+rag1``, ``oppu``,
``oppu+rag1``, ``perfit+pag``. A new method is a new :class:`Core` registered with
:func:`register_core`, not a switch edited in ten places.

A method folder (``shared/methods/NAME/``) defines its cores and calls :func:`register_core`
for each; when a core builds on collective parameters that the federation trains with FedAvg
(stage 1), it names their kind in :attr:`Core.collective` and the folder registers that
:class:`Collective` with :func:`register_collective`. Importing :mod:`shared.methods` imports
every method folder, so the registries are full; this module itself imports no method.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import pkgutil
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch

from shared.errors import PflError
from shared.generation import engine_generate, generate
from shared.prompts import build_prompt
from shared.retrieval import BM25Retriever, random_k
from shared.training import history_examples
from shared.types import User, recent_history


@dataclass(frozen=True)
class PromptAugmentation:
    """What of the user's history goes into the prompt."""

    retrieval: str = "none"  # "none" | "bm25" | "random"
    k: int = 0
    profile: bool = False  # PAG

    @property
    def name(self) -> str:
        parts = ["pag"] if self.profile else []
        if self.retrieval == "bm25" and self.k:
            parts.append(f"rag{self.k}")
        if self.retrieval == "random" and self.k:
            parts.append(f"random{self.k}")
        return "+".join(parts)


@dataclass
class PersonalState:
    """What a core keeps for one user after personalization (on the device)."""

    params: int = 0  # trainable parameters of this user's personalization
    bytes: int = 0  # bytes stored for this user
    payload: Any = None  # the core's own per-user object (adapter, recipe, vectors ...)
    info: dict = field(default_factory=dict)


def options_section(options: Mapping[str, Any], cls, name: str, **defaults):
    """``cls`` built from the ``NAME`` section of resolved method ``options`` (``NAME.FIELD``
    settings, a recipe's ``NAME`` table) over ``defaults``; a bad setting is a clear error.
    What :meth:`Runtime.section` and a device's stage-1 training both build their settings
    with."""
    settings = options.get(name) or {}
    try:
        return cls(**{**defaults, **settings})
    except (TypeError, ValueError) as exc:
        raise PflError(f"bad {name} setting in {settings}: {exc}") from None


@dataclass
class RunState:
    """What the methods of one run share (``Runtime.cache``): collective parts built once by
    the first method that needs them, and the run's stores and engines. None: not there yet.
    """

    #: the stage-1 model (LoRA-C merged into a copy of the base), its LoRA factors by name,
    #: its training statistics, those factors as serving updates, and a (model, digest) memo
    stage1: Any = None
    stage1_state: dict | None = None
    stage1_stats: Any = None
    stage1_updates: dict | None = None
    stage1_digest: tuple | None = None
    #: PerFit's collective stage: (stage 1, the shared stage 2)
    perfit_stage1: tuple | None = None
    #: this run's PER-PCS piece pool (``perpcs.core.PiecePool``), and on a device where the
    #: pool is read from (``gates(modules)``, ``pieces(ids)``)
    perpcs_pool: Any = None
    perpcs_source: Any = None
    #: the base model's digest (keys of the trained-state store)
    base_digest: str | None = None
    #: folders of trained state and sharer pieces kept between runs (None: not kept)
    state_store: Any = None
    sharer_store: Any = None
    #: what answers instead of the PyTorch model (e.g. ONNX Runtime), None: the model
    answer_engine: Any = None
    #: training seconds saved by reusing stored state, this run
    reused_seconds: float = 0.0


@dataclass
class Runtime:
    """What a method runs with: the loaded base model, the task and run options."""

    loaded: Any  # shared.models.LoadedModel
    task: Any  # shared.tasks.TaskSpec
    seed: int = 0
    progress: bool = True
    options: dict = field(default_factory=dict)
    #: who plays which part: {"targets": [...], "sharers": [...], "collective": [...]} (Users)
    roles: dict = field(default_factory=dict)
    #: what the methods of the run share, typed (the stage-1 model, the piece pool ...)
    cache: RunState = field(default_factory=RunState)

    def option(self, key: str, default):
        return self.options.get(key, default)

    def section(self, cls, name: str, **defaults):
        """``cls`` built from the run's ``NAME.FIELD`` settings (``--set NAME.FIELD=VALUE``, a
        recipe's ``NAME`` table) over ``defaults``; a bad setting is a clear error."""
        return options_section(self.options, cls, name, **defaults)

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    @property
    def tokenizer(self):
        return self.loaded.tokenizer


class Core:
    """A personalization core. The base class is the non-personalized model itself.

    The interface every method implements: :meth:`prepare` (collective work), :meth:`personalize`
    (one user, from that user's history only), :meth:`answer` (or :meth:`model_for`), and
    :meth:`save_payload` / :meth:`load_payload` (the per-user state on a device's disk)."""

    name = "nonpersonalized"
    #: True when every user is served by the same model: queries are then batched across users.
    shared_model = True
    #: Kinds of collective parameters (:class:`Collective`) this core builds on, e.g. ("lora",).
    collective: tuple[str, ...] = ()
    #: True when the core reads the PER-PCS piece pool (a device then needs pool access).
    uses_pool = False
    #: False for cores a federation cannot run (they need what a device does not send).
    federated = True

    def prepare(self, runtime: Runtime, dataset, augmentation: PromptAugmentation) -> None:
        """Collective work before any user is personalized (stage 1, the piece pool ...)."""

    def personalize(self, runtime: Runtime, user, augmentation: PromptAugmentation,
                    profile: str | None) -> PersonalState:
        """Adapt to one user from that user's own history only."""
        return PersonalState()

    @contextmanager
    def model_for(self, runtime: Runtime, state: PersonalState) -> Iterator[torch.nn.Module]:
        """The model that answers this user's queries (restored on exit)."""
        yield runtime.model

    def answer(self, runtime: Runtime, state: PersonalState, prompts: list[str],
               generation, *, desc: str = "generate", progress: bool = False) -> list[str]:
        """Generate the answers to ``prompts`` for a user in ``state``: with the run's answer
        engine when it has one (``runtime.cache.answer_engine``, e.g. ONNX Runtime on the
        exported graph), which answers this core's :meth:`serving_adapter` row; else with
        PyTorch (:meth:`answer_torch`). A core whose answers are not a model's (the
        reference rows) overrides this method instead."""
        engine = runtime.cache.answer_engine
        if engine is not None:
            return engine_generate(engine, runtime.tokenizer, self.serving_adapter(runtime, state),
                                   prompts, generation, desc=desc, progress=progress)
        return self.answer_torch(runtime, state, prompts, generation, desc=desc,
                                 progress=progress)

    def answer_torch(self, runtime: Runtime, state: PersonalState, prompts: list[str],
                     generation, *, desc: str = "generate", progress: bool = False) -> list[str]:
        """:meth:`answer` with PyTorch, on :meth:`model_for`'s model."""
        with self.model_for(runtime, state) as model:
            return generate(model, runtime.tokenizer, prompts, generation, desc=desc,
                            progress=progress)

    def remote_personalization(self, runtime: Runtime, state: PersonalState) -> dict:
        """What a request to the cloud's inference service carries for this user
        (:meth:`edge_client.inference_client.InferenceClient.answer`): ``base``, a ``recipe``,
        ``perfit`` parameters, ``adapter_pieces`` to upload, or nothing (the stage-1 model).
        Raises PflError for a method the service cannot answer."""
        return {"base": True}

    def serving_adapter(self, runtime: Runtime, state: PersonalState):
        """This user's personalization as one row of a mixed batch on the *raw* base model
        (:class:`shared.serving.rows.RowAdapter`: low-rank updates and/or a PerFit
        intervention; None: the base model itself). :mod:`shared.serving` answers with it."""
        return None


    def save_payload(self, payload: Any, directory: Path) -> None:
        """Write the per-user payload of :meth:`personalize` under ``directory`` (nothing
        by default)."""

    def load_payload(self, directory: Path, runtime: Runtime) -> Any:
        """Inverse of :meth:`save_payload`, on ``runtime``'s device."""
        return None

    def save(self, state: PersonalState, directory: Path) -> None:
        """Write one user's state to a device's disk: the payload and ``state.json``."""
        directory.mkdir(parents=True, exist_ok=True)
        self.save_payload(state.payload, directory)
        (directory / "state.json").write_text(json.dumps({"params": state.params,
                                                          "bytes": state.bytes}))

    def load(self, directory: Path, runtime: Runtime) -> PersonalState:
        """Inverse of :meth:`save`."""
        facts_path = directory / "state.json"
        if not facts_path.is_file():
            raise PflError(f"no personal state for {self.name} in {directory}: "
                           "personalize first")
        facts = json.loads(facts_path.read_text())
        return PersonalState(params=facts["params"], bytes=facts["bytes"],
                             payload=self.load_payload(directory, runtime))


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


def user_examples(runtime: Runtime, user: User, augmentation: PromptAugmentation | None = None,
                  profile: str | None = None):
    """The user's (recent: ``max_history``) history as training/scoring examples, with
    RAG/PAG as asked."""
    user = recent_history(user, runtime.option("max_history", None))
    rag_k = augmentation.k if augmentation and augmentation.retrieval == "bm25" else 0
    return history_examples(runtime.task, user.history, runtime.tokenizer, rag_k=rag_k,
                            profile=profile)


Arrays = dict[str, np.ndarray]


class Collective:
    """Collective parameters the federation trains with FedAvg in stage 1 (one kind per
    method family: the stage-1 task LoRA ``lora``, PerFit's stage 1 ``perfit``).

    The server starts from :meth:`initial_arrays`, each collective device runs
    :meth:`local_update` from the global arrays, the server averages the replies and applies
    :meth:`after_aggregation`; a device personalizing a target gets the final arrays and
    :meth:`install` puts them where the cores look (``runtime.cache``). Arrays are plain
    float32 numpy; in phase messages their names carry the prefix ``KIND.``."""

    kind = ""
    #: the consent policy's upload kind (edge_client.consent.KINDS) of a device's update.
    consent_kind = ""

    def initial_arrays(self, loaded, seed: int, options: Mapping[str, Any]) -> Arrays:
        raise NotImplementedError

    def local_update(self, loaded, task, users: Sequence, arrays: Mapping[str, np.ndarray],
                     train_config, options: Mapping[str, Any]) -> tuple[Arrays, dict]:
        """(new arrays, stats with ``examples``, ``loss_first``, ``loss_last``, ``steps``)."""
        raise NotImplementedError

    def train_config(self, options: Mapping[str, Any]):
        """The local training recipe (:class:`shared.training.TrainConfig`) for ``options``
        (the run's method options)."""
        raise NotImplementedError

    def after_aggregation(self, arrays: Arrays) -> tuple[Arrays, dict]:
        """The averaged arrays made valid again, and :meth:`describe` of them."""
        return arrays, self.describe(arrays)

    def describe(self, arrays: Mapping[str, np.ndarray]) -> dict:
        """Facts about a set of arrays for the server's summaries (none by default)."""
        return {}

    def install(self, runtime: Runtime, arrays: Mapping[str, np.ndarray]) -> None:
        """Put the collective part built from ``arrays`` into ``runtime.cache``."""
        raise NotImplementedError


_CORES: dict[str, Callable[[], Core]] = {"nonpersonalized": Core}
_COLLECTIVES: dict[str, Collective] = {}
_DISCOVERED: set[str] = set()


def discover() -> None:
    """Import every method folder of :mod:`shared.methods` (and its ``core`` and ``wire``
    modules, if it has them), once: each registers its cores, collective kinds, settings
    and wire kinds where they are defined."""
    package = importlib.import_module("shared.methods")
    for folder in pkgutil.iter_modules(package.__path__):
        name = f"shared.methods.{folder.name}"
        if not folder.ispkg or name in _DISCOVERED:
            continue
        _DISCOVERED.add(name)
        importlib.import_module(name)
        for part in ("core", "wire"):
            if importlib.util.find_spec(f"{name}.{part}") is not None:
                importlib.import_module(f"{name}.{part}")
_CORE_ALIASES = {"base": "nonpersonalized", "none": "nonpersonalized", "k0": "nonpersonalized",
                 "non-personalized": "nonpersonalized"}
_AUGMENTATION = re.compile(r"^(rag|random)(\d+)$")


def register_core(name: str, factory: Callable[[], Core]) -> None:
    """Make a core available to method names (``name`` and ``name+rag1`` ...)."""
    _CORES[name] = factory


def core_names() -> list[str]:
    discover()
    return sorted(_CORES)


def core_class(name: str) -> Callable[[], Core]:
    """The registered core ``name`` (its class: attributes without building one)."""
    discover()
    if name not in _CORES:
        raise PflError(f"unknown core {name!r} (known: {', '.join(core_names())})")
    return _CORES[name]


def register_collective(collective: Collective) -> None:
    """Make a kind of collective parameters available to the federation's stage 1."""
    _COLLECTIVES[collective.kind] = collective


def collective(kind: str) -> Collective:
    """The registered collective parameters of ``kind`` (a clear error when unknown)."""
    discover()
    if kind not in _COLLECTIVES:
        raise PflError(f"unknown stage-1 method {kind!r} "
                       f"(known: {', '.join(sorted(_COLLECTIVES))})")
    return _COLLECTIVES[kind]


def collective_kinds() -> list[str]:
    discover()
    return sorted(_COLLECTIVES)


def split_arrays(arrays: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """{collective kind: its arrays without the ``KIND.`` prefix} of one message."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for key, value in arrays.items():
        kind, _, rest = key.partition(".")
        if kind in collective_kinds() and rest:
            out.setdefault(kind, {})[rest] = value
    return out


@dataclass(frozen=True)
class MethodSpec:
    """A parsed method name: which core, which prompt augmentation."""

    name: str
    core: str
    augmentation: PromptAugmentation

    def make_core(self) -> Core:
        return core_class(self.core)()


def parse_method(name: str) -> MethodSpec:
    """Read ``oppu+rag1``, ``pag``, ``random1`` ... into a :class:`MethodSpec`."""
    discover()
    core, retrieval, k, profile = None, "none", 0, False
    parts = [p for p in name.strip().lower().split("+") if p]
    if not parts:
        raise PflError("empty method name")
    for part in parts:
        part = _CORE_ALIASES.get(part, part)
        match = _AUGMENTATION.match(part)
        if part == "pag":
            profile = True
        elif match:
            if retrieval != "none":
                raise PflError(f"method {name!r} names two retrievals")
            retrieval = "bm25" if match.group(1) == "rag" else "random"
            k = int(match.group(2))
        elif part in _CORES:
            if core is not None:
                raise PflError(f"method {name!r} names two cores ({core}, {part})")
            core = part
        else:
            known = ", ".join(core_names() + ["rag<k>", "random<k>", "pag"])
            raise PflError(f"unknown method {name!r} (unknown part {part!r}); known: {known}")
    return MethodSpec(name=name.strip(), core=core or "nonpersonalized",
                      augmentation=PromptAugmentation(retrieval=retrieval, k=k, profile=profile))
