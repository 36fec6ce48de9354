"""PerFit settings (peft style: one dataclass, plain values, round-trips through a dict)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from shared.methods.perfit.positions import parse_positions
from shared.settings import register_settings
from shared.training import TrainConfig

#: Where the single default intervened layer sits, as a fraction of depth.
DEFAULT_LAYER_FRACTION = 0.25


def default_layers(num_layers: int) -> tuple[int, ...]:
    """One layer at round(0.25 * depth), kept off the last layer.

    The PerFit paper's layer study found early-to-middle layers (about 1/6..1/3 of depth) best and the
    last layer useless; 1/4 is the middle of that band (Llama-2-7B, 32 layers -> 8; SmolLM2, 30
    layers -> 8; the tiny 4-layer test model -> 1). The paper's best single runs used layers
    14-16 of 32 (~0.45 of depth); pass ``layers=`` explicitly to follow those instead.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be positive, got {num_layers}")
    layer = int(num_layers * DEFAULT_LAYER_FRACTION + 0.5)  # round half up
    return (max(0, min(layer, num_layers - 2)),)


@dataclass
class PerFitConfig:
    """Hyper-parameters of PerFit (defaults: the paper's best settings).

    ``layers`` = None means :func:`default_layers` of the model's depth (see
    :meth:`resolved_layers`). ``positions`` is "fN+lM", "lM" or "fN" (see positions.py).
    """

    layers: tuple[int, ...] | None = None
    collective_rank: int = 16
    personal_rank: int = 4
    positions: str = "f7+l7"
    epochs: float = 4.0
    lr: float = 1e-4
    weight_decay: float = 0.01

    def __post_init__(self) -> None:
        if self.layers is not None:
            self.layers = tuple(sorted({int(layer) for layer in self.layers}))
            if not self.layers or min(self.layers) < 0:
                raise ValueError(f"layers must be non-negative indices, got {self.layers}")
        for name in ("collective_rank", "personal_rank"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1")
        parse_positions(self.positions)  # raises on a malformed spec

    def resolved_layers(self, num_layers: int) -> tuple[int, ...]:
        """The intervened layers for a model of ``num_layers`` decoder layers (checked)."""
        layers = self.layers if self.layers is not None else default_layers(num_layers)
        if max(layers) >= num_layers:
            raise ValueError(f"layer {max(layers)} does not exist in a {num_layers}-layer model")
        return layers

    def train_config(self, **overrides) -> TrainConfig:
        """The shared training loop's settings: this config's epochs/lr/wd, plus ``overrides``."""
        base = dict(epochs=self.epochs, lr=self.lr, weight_decay=self.weight_decay)
        return TrainConfig(**{**base, **overrides})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (layers as a list or None)."""
        data = asdict(self)
        data["layers"] = list(self.layers) if self.layers is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PerFitConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error (typos should not pass)."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown PerFit config keys: {sorted(unknown)}")
        data = dict(data)
        if data.get("layers") is not None:
            data["layers"] = tuple(data["layers"])
        return cls(**data)


register_settings("perfit", PerFitConfig, "PerFit: intervened layers and positions, ranks, "
                  "training of both stages")
