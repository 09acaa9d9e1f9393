"""What every estimator returns, and the names of the derivatives one can ask for."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

#: The derivatives an estimator can be asked for.
#: ``u``: value; ``u_t``: time derivative; ``grad``: spatial gradient (B, d);
#: ``grad_sq``: squared norm of the spatial gradient; ``lap``: spatial Laplacian.
ALL_NEEDS = frozenset({"u", "u_t", "grad", "grad_sq", "lap"})


@dataclass
class Derivatives:
    """Derivatives of the (smoothed) model at B points; ``None`` where not requested."""

    u: torch.Tensor | None = None
    u_t: torch.Tensor | None = None
    grad: torch.Tensor | None = None
    grad_sq: torch.Tensor | None = None
    lap: torch.Tensor | None = None

    def require(self, name: str) -> torch.Tensor:
        value = getattr(self, name)
        if value is None:
            raise KeyError(f"derivative {name!r} was not estimated; add it to the PDE's needs")
        return value

    def available(self) -> frozenset[str]:
        return frozenset(f.name for f in fields(self) if getattr(self, f.name) is not None)


def check_needs(needs) -> frozenset[str]:
    needs = frozenset(needs)
    unknown = needs - ALL_NEEDS
    if unknown or not needs:
        raise ValueError(f"needs={sorted(needs)} is not a non-empty subset of {sorted(ALL_NEEDS)}")
    return needs


def split_input(X: torch.Tensor, time_dependent: bool) -> int:
    """Spatial dimension d of inputs X of shape (B, d) or (B, d + 1) with time last."""
    if X.dim() != 2:
        raise ValueError(f"inputs must have shape (B, d) or (B, d+1), got {tuple(X.shape)}")
    d = X.shape[1] - (1 if time_dependent else 0)
    if d < 1:
        raise ValueError(f"inputs of shape {tuple(X.shape)} leave no spatial dimension")
    return d
