"""The LoReFT intervention (after stanfordnlp/pyreft): phi(h) = h + R^T (W h + b - R h).

R (r x d) has orthonormal rows: it spans the r-dimensional subspace being edited; W h + b is
the value the edited coordinates R h are moved to. R stays orthonormal *during* training by
torch's orthogonal parametrization; the intervention is kept in float32 whatever the model's
dtype. Trainable size per intervention: r * (2d + 1) floats (R, W, b).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from shared.training import seeded

#: How far R R^T may drift from I before :meth:`LoReftIntervention.load_arrays` repairs it.
ORTHONORMAL_TOL = 1e-4


def orthonormality_error(R: torch.Tensor | np.ndarray) -> float:
    """max |R R^T - I| (0 for a matrix with orthonormal rows)."""
    R = torch.as_tensor(R, dtype=torch.float64)
    return (R @ R.T - torch.eye(R.shape[0], dtype=R.dtype, device=R.device)).abs().max().item()


def reorthonormalize(R: torch.Tensor | np.ndarray) -> torch.Tensor:
    """The matrix with orthonormal rows nearest to ``R`` (polar factor U V^T of R = U S V^T).

    Needed after FedAvg: an average of matrices with orthonormal rows does not have
    orthonormal rows (the mean of two rotations is shrunk toward 0), so the aggregated R must be
    projected back before use. The polar factor is the closest such matrix in Frobenius norm
    and, unlike QR, does not depend on the order of the rows.
    """
    R64 = torch.as_tensor(R).to(torch.float64)
    U, _, Vh = torch.linalg.svd(R64, full_matrices=False)
    return (U @ Vh).to(torch.float32)


class LoReftIntervention(nn.Module):
    """phi(h) = h + R^T (W h + b - R h) on the last dimension of ``h`` (any leading shape).

    Initialisation follows pyreft: R a random orthonormal basis, W and b nn.Linear's default.
    ``init="identity"`` sets W = R and b = 0 instead, so that phi starts as the identity.
    """

    def __init__(self, hidden_size: int, rank: int, *, init: str = "random"):
        super().__init__()
        if not 0 < rank <= hidden_size:
            raise ValueError(f"rank must be in 1..{hidden_size}, got {rank}")
        self.hidden_size, self.rank = hidden_size, rank
        self.rotate = nn.Linear(hidden_size, rank, bias=False)          # R: weight (r, d)
        nn.init.orthogonal_(self.rotate.weight)
        orthogonal(self.rotate)                                          # rows stay orthonormal
        self.learned_source = nn.Linear(hidden_size, rank)               # W (r, d) and b (r)
        if init == "identity":
            with torch.no_grad():
                self.learned_source.weight.copy_(self.R)
                self.learned_source.bias.zero_()
        elif init != "random":
            raise ValueError(f"init must be 'random' or 'identity', got {init!r}")

    @property
    def R(self) -> torch.Tensor:
        """The (r, d) matrix with orthonormal rows."""
        self._restore_householder_signs()
        return self.rotate.weight

    @torch.no_grad()
    def _restore_householder_signs(self) -> None:
        # torch's Householder map (used for r < d) reads the diagonal of its raw tensor as
        # +-1 through .int() and gets no gradient there, but AdamW's decoupled weight decay
        # still shrinks it: -1 -> -0.9999 truncates to 0 and R would collapse to zero. Snap
        # the diagonal back to +-1 (a no-op when nothing decayed it).
        if self.rotate.parametrizations.weight[0].orthogonal_map.name != "householder":
            return
        raw = self.rotate.parametrizations.weight.original
        diagonal = raw.diagonal()
        if (diagonal.abs() != 1).any():
            diagonal.copy_(torch.where(diagonal < 0, -1.0, 1.0))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        R = self.R
        return h + (self.learned_source(h) - h @ R.T) @ R  # row-vector form of the formula

    def num_parameters(self) -> int:
        """r * (2d + 1): R, W and b."""
        return self.rank * (2 * self.hidden_size + 1)

    def export_arrays(self) -> dict[str, np.ndarray]:
        """{"R", "W", "b"} as plain float32 numpy arrays (what goes on the wire)."""
        with torch.no_grad():
            return {"R": self.R.detach().float().cpu().numpy().copy(),
                    "W": self.learned_source.weight.detach().float().cpu().numpy().copy(),
                    "b": self.learned_source.bias.detach().float().cpu().numpy().copy()}

    def load_arrays(self, R, W, b) -> None:
        """Set R, W, b from arrays or tensors (checked); R is re-orthonormalized if needed."""
        r, d = self.rank, self.hidden_size
        values = {}
        for name, value, shape in (("R", R, (r, d)), ("W", W, (r, d)), ("b", b, (r,))):
            tensor = torch.as_tensor(np.asarray(value) if not torch.is_tensor(value) else value)
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {shape}")
            tensor = tensor.detach().to(torch.float32)
            if not torch.isfinite(tensor).all():
                raise ValueError(f"{name} has non-finite values")
            values[name] = tensor
        if orthonormality_error(values["R"]) > ORTHONORMAL_TOL:  # e.g. a FedAvg of R's
            values["R"] = reorthonormalize(values["R"])
        device = self.learned_source.weight.device
        # Assigning R runs the orthogonal parametrization's right inverse, which completes the
        # (r, d) matrix to a square orthogonal "base" with torch.randn columns. Training moves
        # R through that base, so its values steer every later step: draw them from a fixed
        # seed (else a copy trains differently depending on the process' global RNG state).
        with torch.no_grad(), seeded(0, device):
            self.rotate.weight = values["R"].to(device)  # the parametrization's right inverse
            self.learned_source.weight.copy_(values["W"])
            self.learned_source.bias.copy_(values["b"])
