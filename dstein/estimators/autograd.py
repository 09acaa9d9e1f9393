"""Derivatives of the unsmoothed network by back-propagation: the PINN baselines.

- ``autograd``: exact. The Laplacian is the trace of the input Hessian; for more than
  ``LOOP_MAX_DIM`` dimensions it comes from forward-over-reverse products ``H e_i``
  (``torch.func.jvp`` of the input gradient, vmapped over the basis vectors and the points),
  below that from one reverse pass per dimension, whichever measured faster here
  (docs/benchmarks.md: d = 250, width 128, 50 points: 1.2 s vs 6.3 s per step); at large d
  in blocks recomputed in the backward pass, so that its memory stays bounded.
- ``hutchinson``: the randomized-PINN family (SDGD / Hutchinson trace estimation): the
  Laplacian is estimated as the mean of ``v' H v`` over ``samples`` Rademacher probes ``v``,
  each one forward-over-reverse product; value, time derivative and gradient stay exact.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.func import functional_call, grad, jvp, vmap

from dstein.estimators.base import Derivatives, split_input
from dstein.noise import Streams, counter_seed

#: Up to this many dimensions the per-dimension reverse loop is faster than forward-over-reverse.
LOOP_MAX_DIM = 16
#: Elements per vmapped block of Hessian-vector products (bounds memory at large d).
HVP_BLOCK_ELEMENTS = 1 << 24
#: Probe tangents (B x probes x in_dim) above this are taken in blocks recomputed in backward.
RECOMPUTE_TANGENT_BYTES = 1 << 30


def _input_gradient(model: torch.nn.Module, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    Xg = X if X.requires_grad else X.detach().requires_grad_(True)
    u = model(Xg).reshape(-1)
    (first,) = torch.autograd.grad(u.sum(), Xg, create_graph=True)
    return Xg, u, first


def _forms(
    model: torch.nn.Module, params: dict[str, torch.Tensor], X: torch.Tensor, probes: torch.Tensor
) -> torch.Tensor:
    """``sum_j probes[b, j]' H_b probes[b, j]`` per point b (H_b: the input Hessian of the model
    at ``X[b]``) by forward-over-reverse products, vmapped in blocks of HVP_BLOCK_ELEMENTS."""

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


class _RecomputedForms(torch.autograd.Function):
    """``_forms`` of one block of probes whose graph is rebuilt in the backward pass.

    Keeping the graph of every block costs the probes' tangents through the first layer,
    B x probes x in_dim numbers (20 GB in float32 for the exact Laplacian at d = 10,000 and 50
    points). torch.utils.checkpoint cannot wrap torch.func transforms (saved-tensor hooks),
    hence this Function: forward without a graph, backward recomputes the block and
    differentiates it. First derivatives only (enough for training and adversarial steps).
    """

    @staticmethod
    def forward(ctx, model, names, X, probes, *params):  # type: ignore[override]
        ctx.model, ctx.names = model, names
        ctx.save_for_backward(X, probes, *params)
        return _forms(model, dict(zip(names, params, strict=True)), X, probes)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        X, probes, *params = ctx.saved_tensors
        with torch.enable_grad():
            Xd = X.detach().requires_grad_(ctx.needs_input_grad[2])
            ps = [p.detach().requires_grad_(need) for p, need in zip(params, ctx.needs_input_grad[4:], strict=True)]
            forms = _forms(ctx.model, dict(zip(ctx.names, ps, strict=True)), Xd, probes)
            wanted = [t for t in (Xd, *ps) if t.requires_grad]
            grads = iter(torch.autograd.grad(forms, wanted, grad_out, allow_unused=True))
        return (None, None, next(grads) if Xd.requires_grad else None, None,
                *(next(grads) if p.requires_grad else None for p in ps))  # fmt: skip


def _hvp_quadratic_forms(model: torch.nn.Module, X: torch.Tensor, probes: torch.Tensor) -> torch.Tensor:
    """``sum_j probes[b, j]' H_b probes[b, j]`` per point b, H_b the input Hessian of the model at
    ``X[b]``, by forward-over-reverse products; differentiable w.r.t. parameters and X.

    When the probes' tangents would exceed RECOMPUTE_TANGENT_BYTES they are taken in blocks
    whose graphs are recomputed in the backward pass (``_RecomputedForms``): memory of one
    block. Measured with the parameter gradient, width 128, depth 4, 50 points, d = 1000,
    8 blocks forced: 1.2x to 1.45x the time, 0.55 vs 1.29 GB peak; d = 10,000 (19 blocks),
    which the kept graph cannot hold in 16 GB: 2.3 GB."""
    params: dict[str, torch.Tensor] = dict(model.named_parameters())
    if probes.numel() * probes.element_size() <= RECOMPUTE_TANGENT_BYTES:
        return _forms(model, params, X, probes)
    names, tensors = tuple(params), tuple(params.values())
    block = max(1, RECOMPUTE_TANGENT_BYTES // (X.shape[0] * X.shape[1] * probes.element_size()))
    return sum(
        _RecomputedForms.apply(model, names, X, probes[:, start : start + block], *tensors)
        for start in range(0, probes.shape[1], block)
    )


def autograd_estimate(
    model: torch.nn.Module,
    X: torch.Tensor,
    needs: frozenset[str],
    time_dependent: bool,
    directions: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> Derivatives:
    """Value and input derivatives of ``model`` at ``X``, differentiable w.r.t. parameters;
    ``trace`` (``sum_i w_i H_ii``) with ``weights`` (B, d) or (B, 1).

    If ``X`` already requires grad (adversarial collocation differentiates the loss with
    respect to the points), it is used as is; otherwise a leaf copy is made.
    """
    d = split_input(X, time_dependent)
    if needs <= {"u"}:
        return Derivatives(u=model(X).reshape(-1))
    Xg, u, first = _input_gradient(model, X)
    out = _first_order(u, first, d, needs, time_dependent, directions)
    if not {"lap", "trace"} & needs:
        return out
    w = None
    if "trace" in needs:
        if weights is None:
            raise ValueError("needs 'trace' but no weights were given")
        w = weights.expand(X.shape[0], d)
    if d <= LOOP_MAX_DIM:
        diagonal = [torch.autograd.grad(first[:, i].sum(), Xg, create_graph=True)[0][:, i] for i in range(d)]
        if "lap" in needs:
            out.lap = sum(diagonal, torch.zeros_like(u))
        if w is not None:
            out.trace = sum((w[:, i] * h for i, h in enumerate(diagonal)), torch.zeros_like(u))
        return out
    basis = torch.eye(X.shape[1], dtype=X.dtype, device=X.device)[:d].expand(X.shape[0], d, X.shape[1])
    if "lap" in needs:
        out.lap = _hvp_quadratic_forms(model, Xg, basis)
    if w is not None:  # sum_i (sqrt(w_i) e_i)' H (sqrt(w_i) e_i)
        out.trace = _hvp_quadratic_forms(model, Xg, basis * w.sqrt().unsqueeze(2))
    return out


def _first_order(
    u: torch.Tensor,
    first: torch.Tensor,
    d: int,
    needs: frozenset[str],
    time_dependent: bool,
    directions: torch.Tensor | None = None,
) -> Derivatives:
    grad_x = first[:, :d]
    out = Derivatives(u=u if "u" in needs else None)
    if "along" in needs:
        if directions is None:
            raise ValueError("needs 'along' but no directions were given")
        out.along = torch.einsum("bmd,bd->bm", directions, grad_x)
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
    directions: torch.Tensor | None = None,
    halves: bool = False,
    weights: torch.Tensor | None = None,
) -> Derivatives | tuple[Derivatives, Derivatives]:
    """Exact value, time derivative and gradient; the Laplacian as a Hutchinson trace estimate
    over ``samples`` Rademacher probes per point drawn from ``(seed, step, stream)``, and
    ``trace`` (``sum_i w_i H_ii``, ``weights`` (B, d) or (B, 1)) from the same probes scaled
    by ``sqrt(w)``: ``E[(s o sqrt(w))' H (s o sqrt(w))] = sum_i w_i H_ii``.
    ``halves``: two estimates whose second derivatives come from the two halves of the probes
    (independent; the rest is exact and shared)."""
    d = split_input(X, time_dependent)
    if needs <= {"u"}:
        D = Derivatives(u=model(X).reshape(-1))
        return (D, D) if halves else D
    Xg, u, first = _input_gradient(model, X)
    out = _first_order(u, first, d, needs, time_dependent, directions)
    second_order = [k for k in ("lap", "trace") if k in needs]
    if not second_order:
        return (out, out) if halves else out
    if halves and samples < 2:
        raise ValueError(f"estimator.samples={samples}: two independent Laplacian estimates need at least 2 probes")
    if "trace" in needs and weights is None:
        raise ValueError("needs 'trace' but no weights were given")
    gen = torch.Generator(device=X.device).manual_seed(counter_seed(seed, step, stream, Streams.HUTCHINSON))
    signs = torch.randint(0, 2, (X.shape[0], samples, d), generator=gen, device=X.device).to(X.dtype) * 2 - 1
    probes = torch.zeros(X.shape[0], samples, X.shape[1], dtype=X.dtype, device=X.device)
    probes[..., :d] = signs
    scaled = {"lap": probes}
    if weights is not None and "trace" in needs:
        root = torch.cat([weights.expand(X.shape[0], d).sqrt(), weights.new_ones(X.shape[0], X.shape[1] - d)], 1)
        scaled["trace"] = probes * root.unsqueeze(1)
    if not halves:
        for key in second_order:
            setattr(out, key, _hvp_quadratic_forms(model, Xg, scaled[key]) / samples)
        return out
    half = samples // 2
    second = dataclasses.replace(out)
    for key in second_order:
        setattr(out, key, _hvp_quadratic_forms(model, Xg, scaled[key][:, :half]) / half)
        setattr(second, key, _hvp_quadratic_forms(model, Xg, scaled[key][:, half:]) / (samples - half))
    return out, second
