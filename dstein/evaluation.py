"""The trained solution at test points, and its errors against the ground truth.

Autograd-trained models are evaluated as the network itself. Stein-trained models are
evaluated as the smoothed model ``f = E[g(X + eps)]``: its value averaged over
``eval.samples`` perturbations and its gradient by differentiating that average with respect
to the points (pathwise, far less noisy than the Stein gradient; this is evaluation, not
training). Test points go in blocks of ``EVAL_BLOCK``; block ``b``'s noise is keyed by
``(seed, Streams.EVAL, b)``, so that any rank can evaluate any block and the errors do not
depend on the number of ranks.
"""

from __future__ import annotations

import math

import torch
from tqdm import tqdm

from dstein.config import Config
from dstein.distributed import DistInfo, sum_values
from dstein.estimators import STEIN_METHODS, SteinSpec
from dstein.estimators.stein import FullSpace
from dstein.metrics import error_sums, errors_from_sums
from dstein.noise import Streams, counter_seed, split_evenly
from dstein.pdes import TestSet

#: Test points are evaluated in blocks of this size; a block's noise is keyed by its index.
EVAL_BLOCK = 64


def _smoothing(config: Config, X: torch.Tensor) -> SteinSpec:
    """The evaluation's perturbations of points ``X`` (time, if any, in the last column)."""
    n = config.eval.samples
    sigma_t = config.estimator.time_sigma if X.shape[1] > config.pde.dim else None
    return SteinSpec(
        antithetic=False, needs=frozenset({"u"}), samples=n, chunk=n, sigma_x=config.estimator.sigma_x,
        sigma_t=sigma_t, seed=config.seed,
    )  # fmt: skip


def predict(
    model: torch.nn.Module, X: torch.Tensor, config: Config, first_block: int = 0, progress: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The trained solution and its spatial gradient at test points (blocks of EVAL_BLOCK;
    block ``b``'s noise keyed by ``first_block + b``). ``progress`` shows a bar over the
    blocks (on standard error)."""
    d = config.pde.dim
    us, grads = [], []
    stein = config.estimator.method in STEIN_METHODS
    spec = _smoothing(config, X)
    starts = range(0, X.shape[0], EVAL_BLOCK)
    for b, lo in enumerate(tqdm(starts, desc="evaluating", unit="block", disable=not progress, leave=False)):
        Xb = X[lo : lo + EVAL_BLOCK].detach().requires_grad_(True)
        if stein:
            key = counter_seed(config.seed, Streams.EVAL, first_block + b)
            gen = torch.Generator(device=X.device).manual_seed(key)
            z = torch.randn((Xb.shape[0], spec.samples, Xb.shape[1]), generator=gen, dtype=X.dtype, device=X.device)
            g, _ = FullSpace(model, Xb, spec).values(z, antithetic=False)
            u = g.mean(1)
        else:
            u = model(Xb).reshape(-1)
        (g,) = torch.autograd.grad(u.sum(), Xb)
        us.append(u.detach())
        grads.append(g[:, :d].detach())
    return torch.cat(us), torch.cat(grads)


def test_errors(
    model: torch.nn.Module, test: TestSet, config: Config, device: torch.device, dtype: torch.dtype
) -> dict[str, float]:
    """The test errors in one process, with the same noise as the distributed evaluation."""
    u, grad = predict(model, test.X.to(device=device, dtype=dtype), config)
    return errors_from_sums(error_sums(u, grad, test.u, test.grad))


def evaluate(
    model: torch.nn.Module, test: TestSet, config: Config, info: DistInfo, dtype: torch.dtype
) -> dict[str, float]:
    """Errors on the test set; its blocks are dealt to all ranks and the error sums added."""
    n = test.X.shape[0]
    blocks = math.ceil(n / EVAL_BLOCK)
    first, last = split_evenly(blocks, info.rank, info.world_size)
    lo, hi = first * EVAL_BLOCK, min(n, last * EVAL_BLOCK)
    sums = torch.zeros(6, dtype=torch.float64, device=info.device)
    if hi > lo:
        X = test.X[lo:hi].to(device=info.device, dtype=dtype)
        u, grad = predict(model, X, config, first_block=first)
        sums = error_sums(u, grad, test.u[lo:hi], test.grad[lo:hi]).to(info.device)
    return errors_from_sums(sum_values(sums).cpu())
