"""Derivatives of the unsmoothed network by back-propagation: the PINN baselines.

- ``autograd``: exact. The Laplacian is the trace of the input Hessian; for more than
  ``LOOP_MAX_DIM`` dimensions it comes from forward-over-reverse products ``H e_i``
  (``torch.func.jvp`` of the input gradient, vmapped over the basis vectors and the points),
  below that from one reverse pass per dimension, whichever measured faster here
  (docs/benchmarks.md: d = 250, width 128, 50 points: 1.2 s vs 6.3 s per step).
- ``hutchinson``: the randomized-PINN family (SDGD / Hutchinson trace estimation): the
  Laplacian is estimated as the mean of ``v' H v`` over ``samples`` Rademacher probes ``v``,
  each one forward-over-reverse product; value, time derivative and gradient stay exact.
"""

from __future__ import annotations

import torch
from torch.func import functional_call, grad, jvp, vmap

from dstein.estimators.base import Derivatives, split_input
from dstein.noise import counter_seed

#: Up to this many dimensions the per-dimension reverse loop is faster than forward-over-reverse.
LOOP_MAX_DIM = 16
#: Elements per vmapped block of Hessian-vector products (bounds memory at large d).
HVP_BLOCK_ELEMENTS = 1 << 24


def _input_gradient(model: torch.nn.Module, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    Xg = X if X.requires_grad else X.detach().requires_grad_(True)
    u = model(Xg).reshape(-1)
    (first,) = torch.autograd.grad(u.sum(), Xg, create_graph=True)
    return Xg, u, first


def _hvp_quadratic_forms(model: torch.nn.Module, X: torch.Tensor, probes: torch.Tensor) -> torch.Tensor:
    """``sum_j probes[b, j]' H_b probes[b, j]`` per point b, H_b the input Hessian of the model at
    ``X[b]``, by forward-over-reverse products; differentiable w.r.t. parameters and X."""
    params: dict[str, torch.Tensor] = dict(model.named_parameters())

    def value(x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, params, (x.unsqueeze(0),)).reshape(())

    gradient = grad(value)

    def per_point(x: torch.Tensor, vs: torch.Tensor) -> torch.Tensor:
        def form(v: torch.Tensor) -> torch.Tensor:
            return (jvp(gradient, (x,), (v,))[1] * v).sum()

        width = max([x.numel()] + [p.shape[0] for p in params.values() if p.dim() == 2])
        chunk = max(1, HVP_BLOCK_ELEMENTS // (X.shape[0] * width))
        return vmap(form, chunk_size=min(chunk, vs.shape[0]))(vs).sum()

    return vmap(per_point)(X, probes)


def autograd_estimate(
    model: torch.nn.Module, X: torch.Tensor, needs: frozenset[str], time_dependent: bool
) -> Derivatives:
    """Value and input derivatives of ``model`` at ``X``, differentiable w.r.t. parameters.

    If ``X`` already requires grad (adversarial collocation differentiates the loss with
    respect to the points), it is used as is; otherwise a leaf copy is made.
    """
    d = split_input(X, time_dependent)
    if needs <= {"u"}:
        return Derivatives(u=model(X).reshape(-1))
    Xg, u, first = _input_gradient(model, X)
    out = _first_order(u, first, d, needs, time_dependent)
    if "lap" in needs:
        if d <= LOOP_MAX_DIM:
            lap = torch.zeros_like(u)
            for i in range(d):
                (second,) = torch.autograd.grad(first[:, i].sum(), Xg, create_graph=True)
                lap = lap + second[:, i]
            out.lap = lap
        else:
            basis = torch.eye(X.shape[1], dtype=X.dtype, device=X.device)[:d]
            out.lap = _hvp_quadratic_forms(model, Xg, basis.expand(X.shape[0], d, X.shape[1]))
    return out


def _first_order(
    u: torch.Tensor, first: torch.Tensor, d: int, needs: frozenset[str], time_dependent: bool
) -> Derivatives:
    grad_x = first[:, :d]
    out = Derivatives(u=u if "u" in needs else None)
    if time_dependent and "u_t" in needs:
        out.u_t = first[:, d]
    if "grad" in needs:
        out.grad = grad_x
    if "grad_sq" in needs:
        out.grad_sq = (grad_x * grad_x).sum(-1)
    return out


def hutchinson_estimate(
    model: torch.nn.Module,
    X: torch.Tensor,
    needs: frozenset[str],
    time_dependent: bool,
    samples: int,
    seed: int,
    step: int,
    stream: int,
) -> Derivatives:
    """Exact value, time derivative and gradient; the Laplacian as a Hutchinson trace estimate
    over ``samples`` Rademacher probes per point drawn from ``(seed, step, stream)``."""
    d = split_input(X, time_dependent)
    if needs <= {"u"}:
        return Derivatives(u=model(X).reshape(-1))
    Xg, u, first = _input_gradient(model, X)
    out = _first_order(u, first, d, needs, time_dependent)
    if "lap" in needs:
        gen = torch.Generator(device=X.device).manual_seed(counter_seed(seed, step, stream, 0x48555443))
        signs = torch.randint(0, 2, (X.shape[0], samples, d), generator=gen, device=X.device).to(X.dtype) * 2 - 1
        probes = torch.zeros(X.shape[0], samples, X.shape[1], dtype=X.dtype, device=X.device)
        probes[..., :d] = signs
        out.lap = _hvp_quadratic_forms(model, Xg, probes) / samples
    return out
