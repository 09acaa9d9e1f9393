"""The subspace (Rao-Blackwellized) Stein estimator (MATH.md section 3).

For a model ``g(x, t) = body(Wx x + wt t + b)`` whose first layer is linear, ``g`` sees a
spatial perturbation ``delta`` only through ``Wx delta``. With ``Wx = U diag(s) V^T`` (rank
r <= width), split ``delta = V xi + delta_perp``: ``g`` depends on ``xi ~ N(0, sx^2 I_r)``
alone, and averaging over ``delta_perp`` analytically leaves the Stein estimators of
``stein.py`` with ``d`` replaced by ``r``: noise ``z`` of width r (+1 for time), Laplacian
weights ``|z|^2 - r``, gradient coordinates in the basis V. Per sample the first layer costs
O(width * r) instead of O(width * d); no d-dimensional noise is drawn or stored. Only the
basis (O(width^2 d), once per estimate) and ``Wx X`` grow with d.

The basis comes from the width x width Gram matrix ``Wx Wx^T = U diag(s^2) U^T`` (a float32
product, its eigendecomposition in float64).
Parameter gradients flow through ``M = Wx V`` with V held constant (MATH.md: this is the
conditional expectation of the full estimator's gradient for value, time derivative,
Laplacian and gradient norm). A gradient along a fixed direction is not supported
(``provides`` excludes nothing else: ``grad`` values are given, for evaluation, but a loss on
them would get a first-order parameter gradient only).
"""

from __future__ import annotations

import torch
from torch import nn

from dstein.estimators.base import SteinSpec, split_input

#: Eigenvalues of the Gram matrix below this fraction of the largest are dropped (rank r).
RANK_RTOL = 1e-6


def split_model(model: nn.Module) -> tuple[nn.Linear, nn.Module]:
    """The model's linear input layer and the rest (``model(X) == body(input_layer(X))``)."""
    layer, body = getattr(model, "input_layer", None), getattr(model, "body", None)
    if not getattr(model, "linear_input", True):
        raise ValueError(
            f"estimator.method=stein-subspace needs a model whose first layer is linear in x; {type(model).__name__} "
            "(model.family=radial) also feeds |x|^2 to it: use stein-antithetic, or model.family=mlp"
        )
    if not isinstance(layer, nn.Linear) or not callable(body):
        raise ValueError(
            f"estimator.method=stein-subspace needs a model whose first layer is linear, exposed as "
            f"input_layer (torch.nn.Linear) with the rest as body; {type(model).__name__} has "
            f"{'no input_layer' if layer is None else 'input_layer of type ' + type(layer).__name__}"
            f"{'' if callable(body) else ' and no body'} (dstein.models.MLP qualifies)"
        )
    return layer, body


def row_basis(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``U`` (width x r) and ``s`` (r) of ``Wx = U diag(s) V^T`` from the Gram matrix
    ``Wx Wx^T`` (eigendecomposition in float64; directions with s^2 below RANK_RTOL of the
    largest are dropped). No gradient."""
    with torch.no_grad():
        s2, U = torch.linalg.eigh(gram.detach().double())
        keep = s2 > RANK_RTOL * s2.max().clamp_min(torch.finfo(torch.float64).tiny)
        return U[:, keep].to(gram.dtype), s2[keep].sqrt().to(gram.dtype)


class InputSubspace:
    """The space of the subspace estimator (a ``base.Space``, like ``stein.FullSpace``)."""

    def __init__(self, model: nn.Module, X: torch.Tensor, spec: SteinSpec, cache: dict | None = None, shares: int = 1):
        layer, self.body = split_model(model)
        self.X = X
        self.d = split_input(X, spec.time_dependent)
        if layer.in_features != X.shape[1]:
            raise ValueError(f"the input layer takes {layer.in_features} inputs, the points have {X.shape[1]}")
        # G = Wx Wx^T with the gradient of Wx @ V for V = Wx^T U / s held constant: then
        # M = Wx V = G U / s, and V itself (d x r) is only formed when a gradient is asked for.
        # The weight is split once per loss (one gradient buffer of the weight's size in the
        # backward pass instead of one zero-filled buffer per slice: 20 ms each at d = 100,000).
        weight = layer.weight
        if cache is not None and cache.get("weight") is weight and cache.get("version") == weight._version:
            Wx, wt, G, U, s = cache["basis"]  # computed for another set of points of the same loss
        else:
            Wx, wt = weight.split([self.d, weight.shape[1] - self.d], dim=1)
            G = Wx @ Wx.detach().T  # (k, k): the only O(k^2 d) product
            U, s = row_basis(G)
            if cache is not None:
                cache.update(weight=weight, version=weight._version, basis=(Wx, wt, G, U, s))
        self.Wx, self.Us, self.live = Wx.detach(), U / s, Wx
        self.shares = shares  # ranks that each compute the whole of what follows from the summed estimates
        self.rank = U.shape[1]
        self.width = self.rank + (1 if spec.time_dependent else 0)
        self.h0 = layer(X)  # (B, width of the layer): the unperturbed pre-activations
        M = (G @ self.Us) * spec.sigma_x  # (k, r): differentiable in Wx, V constant
        if spec.sigma_t is not None:
            M = torch.cat([M, wt * spec.sigma_t], dim=1)
        self.M = M  # pre-activation change per unit of z

    def center(self) -> torch.Tensor:
        return self.body(self.h0).reshape(-1)

    def values(self, z: torch.Tensor, antithetic: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, n, _ = z.shape
        shift = z @ self.M.T  # (B, n, k): O(k r) per sample
        h = self.h0.unsqueeze(1)
        if antithetic:
            g = self.body(torch.cat([(h + shift).reshape(B * n, -1), (h - shift).reshape(B * n, -1)]))
            g = g.reshape(2, B, n)
            return g[0], g[1]
        return self.body((h + shift).reshape(B * n, -1)).reshape(B, n), None

    @property
    def V(self) -> torch.Tensor:
        """The orthonormal basis (d x r) of the row space of Wx."""
        return self.Wx.T @ self.Us

    def spatial(self, coords: torch.Tensor) -> torch.Tensor:
        """Gradient coordinates in the basis V as vectors in R^d."""
        return coords @ self.V.T

    def along(self, coords: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
        """Inner products (B, m) of the gradient ``V coords`` with ``directions`` w (B, m, d).

        The value is ``(V' w) . coords``; O(width d) per direction, V is never formed. Its
        parameter gradient with V held constant misses one term of the full estimator's
        expected gradient (docs/MATH.md section 6): ``d(w . grad f)/dWx`` also holds
        ``grad_h f w_perp'``, w_perp the part of w outside the row space, because a change of
        Wx lets the model see that direction. ``grad_h f = U (coords / s)`` (from
        ``grad_x f = Wx' grad_h f = V coords``), so the term is the gradient of
        ``coords' diag(1/s) U' (Wx - sg(Wx)) w_perp``, whose value is zero. Every rank of a
        sample group computes that term from the summed coordinates, so its gradient enters
        with weight 1 / shares (the shares of the group's gradient are summed)."""
        Wx_w = torch.einsum("kd,bmd->bmk", self.Wx, directions)  # (B, m, k)
        inside = Wx_w @ self.Us  # V' w = Us' Wx w: (B, m, r)
        w_perp = directions - torch.einsum("kd,bmr,kr->bmd", self.Wx, inside, self.Us)
        change = torch.einsum("kd,bmd->bmk", self.live - self.Wx, w_perp)  # zero, with a gradient
        correction = torch.einsum("bmk,kr,br->bm", change, self.Us, coords.detach()) / self.shares
        return torch.einsum("bmr,br->bm", inside, coords) + correction
