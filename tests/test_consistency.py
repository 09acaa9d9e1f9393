"""The Feynman-Kac consistency along the process (dstein/consistency.py, docs/MATH.md section 19).

With the exact solution frozen in the nonlinearity, E[g(X_T)] + T E[f(S, X_S)] is u(0, x0)
within its standard error; a solution with a wrong gradient is far from it. The frozen driver
is each PDE's residual less u_t and L u (L the generator of its process).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dstein.consistency import consistency, frozen_driver, supported
from dstein.estimators.base import Derivatives
from dstein.pdes import build_pde
from dstein.pdes.hjb import cole_hopf_radial


def hjb_truth(pde, scale: float = 1.0):
    def solution(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, t = X[:, :-1].double().numpy(), X[:, -1].double().numpy()
        u, grad, _ = cole_hopf_radial(x, t, pde.mu, pde.T, 4000, seed=3)
        return torch.from_numpy(u), scale * torch.from_numpy(grad)

    return solution


def test_the_exact_hjb_solution_is_consistent_and_a_wrong_gradient_is_not():
    pde = build_pde("hjb", 10)
    exact = consistency(pde, hjb_truth(pde), 3000, seed=0)
    reference = pde.start()[2]
    # the truth's own Monte Carlo error at x0 is below 1e-3 (4000 samples, common numbers)
    assert abs(exact["value"] - reference) < 4 * exact["se"] + 2e-3
    assert exact["se"] < 0.01 and exact["reference"] == reference
    assert abs(exact["model"] - reference) < 5e-3
    wrong = consistency(pde, hjb_truth(pde, 1.3), 3000, seed=0)  # |grad u|^2 1.69 times too large
    assert wrong["model"] - wrong["value"] > 8 * wrong["se"]


@pytest.mark.parametrize("name, params", [
    ("hjb", {}), ("bsde_allen_cahn", {}), ("bsde_default_risk", {}), ("bsde_diff_rate", {}),
    ("bsde_default_risk", {"coordinates": "log"}), ("bsde_diff_rate", {"coordinates": "log"}),
])  # fmt: skip
def test_the_frozen_driver_is_the_residual_less_its_linear_part(name, params):
    d = 6
    pde = build_pde(name, d, params)
    assert supported(pde)
    gen = torch.Generator().manual_seed(0)
    X = pde.sample_process("domain", 16, gen)
    u = 50 + 10 * torch.rand(16, generator=gen, dtype=torch.float64)
    grad = torch.randn(16, d, generator=gen, dtype=torch.float64)
    directions, weights = pde.coefficients(X)

    def noise() -> torch.Tensor:
        return torch.randn(16, generator=gen, dtype=torch.float64)

    D = Derivatives(u=u, grad=grad, grad_sq=(grad * grad).sum(1), u_t=noise(), lap=noise(), trace=noise())
    if directions is not None:
        D.along = torch.einsum("bmd,bd->bm", directions, grad)
    linear = D.u_t + (pde.generator(D) if weights is not None else D.lap)
    assert torch.allclose(frozen_driver(pde, X, u, grad), pde.residual(X, D) - linear, rtol=1e-12, atol=1e-9)


def test_pdes_without_a_process_are_refused():
    pde = build_pde("poisson", 2)
    assert not supported(pde)
    with pytest.raises(ValueError, match="pde poisson has no forward process"):
        consistency(pde, lambda X: (X[:, 0], X), 10)
    assert np.isfinite(build_pde("hjb", 3).start()[2])
