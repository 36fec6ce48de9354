"""PerFit: personalization as low-rank shifts of hidden representations (LoReFT, two stages).

Parts (peft style): :mod:`.config` (PerFitConfig), :mod:`.intervention` (the LoReFT math),
:mod:`.positions` (which tokens are intervened), :mod:`.model` (hooks, generation, training),
:mod:`.core` (the ``perfit`` core and the collective kind ``perfit``).
"""

from shared.methods.perfit.config import PerFitConfig, default_layers
from shared.methods.perfit.core import (CollectiveShift, PerFitStage1, PersonalShift,
                                        max_orthonormality_error, perfit_config, perfit_from_arrays, perfit_stage1,
                                        perfit_to_arrays, reorthonormalize_perfit)
from shared.methods.perfit.intervention import (LoReftIntervention, orthonormality_error,
                                                reorthonormalize)
from shared.methods.perfit.model import (InterventionController, PerFitStage, PrefixCache,
                                         evaluate_loss, generate, intervened, new_stages,
                                         train_stage1, train_stage2, window_start)
from shared.methods.perfit.positions import (intervention_mask, parse_positions,
                                             prompt_lengths_from_labels)

__all__ = [
    "PerFitConfig", "default_layers", "LoReftIntervention", "orthonormality_error",
    "reorthonormalize", "InterventionController", "PerFitStage", "PrefixCache",
    "evaluate_loss", "generate", "intervened", "new_stages", "train_stage1", "train_stage2",
    "window_start",
    "intervention_mask", "parse_positions", "prompt_lengths_from_labels",
    "CollectiveShift", "PerFitStage1", "PersonalShift", "max_orthonormality_error", "perfit_config",
    "perfit_from_arrays", "perfit_stage1", "perfit_to_arrays", "reorthonormalize_perfit",
]
