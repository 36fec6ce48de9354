"""What every method is made of, and how method names are read.

A method is a personalization **core** (how the model is adapted to the user: not at all,
a personal LoRA, assembled pieces, an intervention ...) combined with a **prompt
augmentation** (what of the user's own data goes into the prompt: RAG top-k, random k items,
a PAG profile). Names combine them with ``+``: ``rag1``, ``pag+rag1``, ``oppu``,
``oppu+rag1``, ``perfit+pag``. A new method is a new :class:`Core` registered with
:func:`register_core`, not a switch edited in ten places.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from shared.errors import PflError


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
    #: collective results shared by methods within one run (e.g. the stage-1 merged model)
    cache: dict = field(default_factory=dict)

    def option(self, key: str, default):
        return self.options.get(key, default)

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    @property
    def tokenizer(self):
        return self.loaded.tokenizer


class Core:
    """A personalization core. The base class is the non-personalized model itself."""

    name = "nonpersonalized"
    #: True when every user is served by the same model: queries are then batched across users.
    shared_model = True

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
        """Generate the answers to ``prompts`` for a user in ``state``."""
        from shared.generation import generate

        with self.model_for(runtime, state) as model:
            return generate(model, runtime.tokenizer, prompts, generation, desc=desc,
                            progress=progress)


_CORES: dict[str, Callable[[], Core]] = {"nonpersonalized": Core}
_CORE_ALIASES = {"base": "nonpersonalized", "none": "nonpersonalized", "k0": "nonpersonalized",
                 "non-personalized": "nonpersonalized"}
_AUGMENTATION = re.compile(r"^(rag|random)(\d+)$")


def register_core(name: str, factory: Callable[[], Core]) -> None:
    """Make a core available to method names (``name`` and ``name+rag1`` ...)."""
    _CORES[name] = factory


def core_names() -> list[str]:
    return sorted(_CORES)


@dataclass(frozen=True)
class MethodSpec:
    """A parsed method name: which core, which prompt augmentation."""

    name: str
    core: str
    augmentation: PromptAugmentation

    def make_core(self) -> Core:
        return _CORES[self.core]()


def parse_method(name: str) -> MethodSpec:
    """Read ``oppu+rag1``, ``pag``, ``random1`` ... into a :class:`MethodSpec`."""
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
