"""PER-PCS: personalized pieces (Tan et al. 2024), peft style.

- :mod:`.config`: :class:`PerPcsConfig` (modules, top-k, combination, gates, sharing, K).
- :mod:`.pieces`: the piece, gated-delta and combination math, and the
  :class:`PieceLinear` wrapper that installs pieces/updates on a model.
- :mod:`.training`: a sharer's LoRA split into pieces, then their gates.
- :mod:`.core`: the ``perpcs``, ``peft-retrieval`` and ``perpcs-loss`` cores and the run's piece pool (not
  imported here: it needs :mod:`shared.serialization`, which needs this package's pieces).
- :mod:`.gates`: sharer side: post-hoc gate training and the shared subset of pieces.
- :mod:`.assembly`: target side: auto-regressive assembly from the pool, no training.
- :mod:`.recipe`: what a target stores (piece ids + weights) and :func:`rebuild`.
- :mod:`.retrieval_baseline`: the PEFT-retrieval baseline and sharer selection.
- :mod:`.loss_selection`: ``perpcs-loss``, the sharer whose pieces fit the target's history
  loss best (a rating-aware alternative to the gates).

Typical flow::

    pieces = pieces_from_peft_state_dict(sharer_lora_state, scaling=alpha / r, sharer="s1")
    gated = train_gates(model, pieces, sharer_examples, pad_id, config).pieces
    pool += select_shared_pieces(gated, config.sharing_ratio, config.sharing_seed)
    recipe = assemble(model, pool, target_examples, pad_id, config)   # bytes: recipe.to_bytes()
    with updates_installed(model, rebuild(recipe, {p.piece_id: p for p in pool})):
        ...  # generate as the target
"""

from shared.methods.perpcs.assembly import assemble, group_candidates, scoring_mask
from shared.methods.perpcs.config import PerPcsConfig
from shared.methods.perpcs.gates import (GateTrainingResult, select_shared_pieces, train_gates,
                                         zero_gates)
from shared.methods.perpcs.pieces import (LoraUpdate, Piece, PieceLinear, combine,
                                        combine_factors, combine_sum_of_products, gated_delta,
                                        peft_state_dict_from_pieces, pieces_from_peft_state_dict,
                                        pieces_installed, updates_installed)
from shared.methods.perpcs.recipe import Recipe, rebuild
from shared.methods.perpcs.retrieval_baseline import (peft_retrieval_recipe, retrieve_sharers,
                                                      select_sharers_from_clusters,
                                                      select_sharers_kmeans,
                                                      select_sharers_most_active)
from shared.methods.perpcs.training import train_sharer_pieces

__all__ = [
    "GateTrainingResult", "LoraUpdate", "PerPcsConfig", "Piece", "PieceLinear", "Recipe",
    "assemble", "combine", "combine_factors", "combine_sum_of_products", "gated_delta",
    "group_candidates", "peft_retrieval_recipe", "peft_state_dict_from_pieces",
    "pieces_from_peft_state_dict", "pieces_installed", "rebuild", "retrieve_sharers",
    "scoring_mask", "select_shared_pieces", "select_sharers_from_clusters",
    "select_sharers_kmeans", "select_sharers_most_active", "train_gates", "updates_installed",
    "zero_gates", "train_sharer_pieces",
]
