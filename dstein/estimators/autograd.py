"""Exact derivatives of the unsmoothed network by stacked back-propagation (the PINN baseline)."""

from __future__ import annotations

import torch

from dstein.estimators.base import Derivatives, split_input


def autograd_estimate(
    model: torch.nn.Module, X: torch.Tensor, needs: frozenset[str], time_dependent: bool
) -> Derivatives:
    """Value and input derivatives of ``model`` at ``X``, differentiable w.r.t. parameters.

    If ``X`` already requires grad (adversarial collocation differentiates the loss with
    respect to the points), it is used as is; otherwise a leaf copy is made.
    """
    d = split_input(X, time_dependent)
    Xg = X if X.requires_grad else X.detach().requires_grad_(True)
    u = model(Xg).reshape(-1)
    out = Derivatives(u=u if "u" in needs else None)
    if needs <= {"u"}:
        return out
    (first,) = torch.autograd.grad(u.sum(), Xg, create_graph=True)
    grad = first[:, :d]
    if time_dependent and "u_t" in needs:
        out.u_t = first[:, d]
    if "grad" in needs:
        out.grad = grad
    if "grad_sq" in needs:
        out.grad_sq = (grad * grad).sum(-1)
    if "lap" in needs:
        lap = torch.zeros_like(u)
        for i in range(d):
            (second,) = torch.autograd.grad(grad[:, i].sum(), Xg, create_graph=True)
            lap = lap + second[:, i]
        out.lap = lap
    return out
