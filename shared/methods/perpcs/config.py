"""PER-PCS settings (the PER-PCS paper's defaults)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from shared.methods.perpcs.pieces import COMBINATIONS, MODULE_PARENT
from shared.settings import register_settings

SCORE_POSITIONS = ("output", "target_tokens", "all")
#: how a target chooses pieces: the papers' gates, or the sharer whose pieces fit its history
ROUTINGS = ("gates", "loss")


@dataclass
class PerPcsConfig:
    """Everything PER-PCS can be told: pieces, gates, sharing, sharer selection, assembly.

    - ``target_modules``: modules that carry pieces (the authors' code: q, k, v, o).
    - ``top_k``: pieces kept per layer and module at assembly (1..3 in the paper).
    - ``combination``: "sum_of_products" (paper, Delta W = sum w_s B_s A_s) or "factors"
      (authors' code, A = sum w A_s, B = sum w B_s).
    - ``gate_steps`` / ``gate_lr``: post-hoc gate training (paper: 50-100 steps,
      lr 1e-5..2e-5; tiny random test models need a far larger lr to move at all).
      ``gate_steps=0``: no gate training, every piece shared with a zero gate (a pool only
      loss routing reads: a sharer's cost drops to its LoRA's).
    - ``sharing_ratio``: fraction of a sharer's pieces submitted to the pool (seeded subset).
    - ``num_clusters``: K of sharer k-means (50 in the paper), capped at the population;
      ``small_cluster_items``: a cluster whose most active user has at most this many
      history items contributes no sharer.
    - ``score_positions``: "output" = positions that produce the item's output tokens (as the
      loss and the authors' code), "target_tokens" = the output tokens' own positions (both
      fall back to every token of an item with no output), "all" = every token.
    - ``autoregressive``: score layer l on activations that already include the assembled
      layers < l (the paper); False scores every layer on the stage-1 model (ablation).
    - ``routing``: "gates" (the papers': cosine of each piece's gate with the module input,
      top-k per layer and module) or "loss" (the one sharer whose pieces give the lowest loss
      on the target's selection items; reads the whole pool).
    - ``check_items``: the target's latest this many history items (at most half of it) are
      held out of selection and the assembled adapter must not do worse than stage 1 on them,
      else sharers are pruned (``prune_rounds`` at most) or the recipe is refused (stage 1);
      0: no check (:mod:`shared.methods.perpcs.check`). ``check_margin``: the adapter passes
      when its held-out loss is at most (1 + margin) x stage 1's (0: no worse at all; a few
      held-out items are a noisy measure, and an honest sharer's adapter can lose to stage 1
      on them by a little).
    - ``max_sharer_share``: where several sharers were selected at a (layer, module), one
      sharer's weight is cut to at most this share (gate routing; 1: no cap).
    - ``max_norm_ratio``: a piece whose update norm exceeds this multiple of the median at
      its (layer, module) is not used (0: off).
    - ``loss_items``: ``perpcs-loss`` and loss routing score each sharer on the target's latest this many
      history items (0: all of them). Its cost is one forward pass per sharer over them, so
      on long items (news articles) this bounds the time an author takes.
    """

    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    top_k: int = 2
    combination: str = "sum_of_products"
    gate_steps: int = 100
    gate_lr: float = 2e-5
    gate_batch_size: int = 4
    sharing_ratio: float = 1.0
    sharing_seed: int = 0
    num_clusters: int = 50
    small_cluster_items: int = 10
    assembly_batch_size: int = 4
    score_positions: str = "output"
    autoregressive: bool = True
    loss_items: int = 0
    routing: str = "gates"
    check_items: int = 4
    check_margin: float = 0.0
    prune_rounds: int = 2
    max_sharer_share: float = 0.5
    max_norm_ratio: float = 10.0

    def __post_init__(self):
        self.target_modules = tuple(self.target_modules)
        unknown = [m for m in self.target_modules if m not in MODULE_PARENT]
        if not self.target_modules or unknown:
            raise ValueError(f"target_modules must be among {', '.join(MODULE_PARENT)}; "
                             f"got {self.target_modules}")
        if not 1 <= self.top_k <= 16:
            raise ValueError(f"top_k must be in 1..16 (the paper uses 1..3), got {self.top_k}")
        if self.combination not in COMBINATIONS:
            raise ValueError(f"combination must be one of {', '.join(COMBINATIONS)}, "
                             f"got {self.combination!r}")
        if self.gate_steps < 0 or self.gate_lr <= 0 or self.gate_batch_size < 1:
            raise ValueError("gate_lr and gate_batch_size must be positive and gate_steps "
                             ">= 0 (0: zero gates, no gate training)")
        if not 0.0 < self.sharing_ratio <= 1.0:
            raise ValueError(f"sharing_ratio must be in (0, 1], got {self.sharing_ratio}")
        if self.num_clusters < 1 or self.assembly_batch_size < 1:
            raise ValueError("num_clusters and assembly_batch_size must be >= 1")
        if self.score_positions not in SCORE_POSITIONS:
            raise ValueError(f"score_positions must be one of {SCORE_POSITIONS}")
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {', '.join(ROUTINGS)}, "
                             f"got {self.routing!r}")
        if self.check_items < 0 or self.prune_rounds < 0:
            raise ValueError("check_items and prune_rounds must be >= 0")
        if not 0.0 <= self.check_margin <= 10.0:
            raise ValueError(f"check_margin must be in 0..10, got {self.check_margin}")
        if not 0.0 < self.max_sharer_share <= 1.0:
            raise ValueError(f"max_sharer_share must be in (0, 1], got {self.max_sharer_share}")
        if not (self.max_norm_ratio == 0 or 1.0 <= self.max_norm_ratio <= 1e6):
            raise ValueError(f"max_norm_ratio must be 0 (off) or in 1..1e6, "
                             f"got {self.max_norm_ratio}")
        if self.loss_items < 0:
            raise ValueError(f"loss_items must be >= 0 (0: every history item), "
                             f"got {self.loss_items}")

    def clusters_for(self, population: int) -> int:
        """K for k-means over ``population`` users: ``num_clusters`` scaled down to fit."""
        return max(1, min(self.num_clusters, int(population)))

    def to_dict(self) -> dict:
        """Plain JSON-able dict (tuples become lists)."""
        out = asdict(self)
        out["target_modules"] = list(self.target_modules)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "PerPcsConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown PER-PCS settings: {', '.join(sorted(unknown))}")
        return cls(**data)


register_settings("perpcs", PerPcsConfig, "PER-PCS: pieces, gates, sharing, sharer selection, "
                  "assembly and the target's check")
