"""OPPU's configuration: the LoRA shape and the training recipes of both stages.

Defaults are the papers' (the OPPU paper's shared recipe and its OPPU settings):

- stage 1 (task adaptation, LoRA-C): LoRA r=8, alpha=8, dropout 0.05 on q,k,v; 3 epochs, lr 1e-4;
- personal (OPPU on the stage-1 model, LoRA-P on the raw base): LoRA r=8, alpha=8, dropout 0.05
  on q_proj and v_proj; 2 epochs, lr 1e-4;
- both: AdamW weight decay 0.01, linear schedule with 10% warm-up, grad-norm clip 0.3 (carried
  by :class:`shared.training.TrainConfig`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.errors import PflError
from shared.settings import register_settings
from shared.training import TrainConfig

STAGE1_TARGETS = ("q_proj", "k_proj", "v_proj")
PERSONAL_TARGETS = ("q_proj", "v_proj")


@dataclass(frozen=True)
class LoraSpec:
    """The shape of a LoRA adapter: rank, scaling, dropout, which modules (and layers).

    ``target_modules`` are module-name suffixes as peft reads them (``q_proj`` matches every
    layer's ``self_attn.q_proj``); ``layers`` restricts them to some decoder layers (None: all).
    """

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = PERSONAL_TARGETS
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.r < 1:
            raise PflError(f"LoRA rank must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise PflError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise PflError("LoRA needs at least one target module")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(i) for i in self.layers))

    @property
    def scaling(self) -> float:
        """The factor on B @ A (alpha / r; no rsLoRA)."""
        return self.alpha / self.r

    def to_peft(self, *, inference_mode: bool = False):
        """The equivalent ``peft.LoraConfig`` (causal LM, no bias)."""
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=list(self.target_modules), bias="none",
                          task_type="CAUSAL_LM", inference_mode=inference_mode,
                          layers_to_transform=list(self.layers) if self.layers is not None
                          else None)

    @classmethod
    def from_peft(cls, config) -> "LoraSpec":
        """Read a ``peft.LoraConfig`` (e.g. from an adapter_config.json) back into a spec."""
        targets = config.target_modules
        targets = (targets,) if isinstance(targets, str) else tuple(sorted(targets))
        layers = config.layers_to_transform
        layers = (layers,) if isinstance(layers, int) else (tuple(layers) if layers else None)
        return cls(r=int(config.r), alpha=float(config.lora_alpha),
                   dropout=float(config.lora_dropout), target_modules=targets, layers=layers)


def stage1_lora() -> LoraSpec:
    """Stage-1 task LoRA: q,k,v, r=8, alpha=8, dropout 0.05."""
    return LoraSpec(target_modules=STAGE1_TARGETS)


def stage1_train(**overrides) -> TrainConfig:
    """Stage-1 recipe: 3 epochs, lr 1e-4 (AdamW wd 0.01, 10% warm-up, clip 0.3)."""
    return TrainConfig(**{"epochs": 3.0, "lr": 1e-4, **overrides})


def personal_lora() -> LoraSpec:
    """Personal LoRA (OPPU, LoRA-P): q_proj, v_proj, r=8, alpha=8, dropout 0.05."""
    return LoraSpec(target_modules=PERSONAL_TARGETS)


def personal_train(**overrides) -> TrainConfig:
    """Personal recipe: 2 epochs, lr 1e-4 (AdamW wd 0.01, 10% warm-up, clip 0.3)."""
    return TrainConfig(**{"epochs": 2.0, "lr": 1e-4, **overrides})


register_settings("stage1", stage1_train, "the stage-1 task LoRA's training (LoRA-C, the "
                  "base of OPPU), on the collective users")
register_settings("oppu", personal_train, "the personal LoRA's training (OPPU, LoRA-P, a "
                  "PER-PCS sharer's LoRA)")


@dataclass
class OppuConfig:
    """Both stages of OPPU in one object (each part replaceable)."""

    stage1_lora: LoraSpec = field(default_factory=stage1_lora)
    stage1_train: TrainConfig = field(default_factory=stage1_train)
    personal_lora: LoraSpec = field(default_factory=personal_lora)
    personal_train: TrainConfig = field(default_factory=personal_train)
