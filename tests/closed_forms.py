"""Test functions whose Gaussian smoothing is known in closed form (float64).

``SinWave``: g(x, t) = sin(a.x + b t); smoothing multiplies by
exp(-(sx^2 |a|^2 + st^2 b^2) / 2), so f, its derivatives and |grad f|^2 are explicit.
``Quadratic``: g = x'Ax/2 + c.x + q t^2 / 2 + p t; f = g + sx^2 tr(A)/2 + q st^2 / 2.
``hessian_diag(X, sx, st)``: the diagonal of the smoothed model's spatial Hessian (B, d), from
which the weighted trace ``sum_i w_i f_ii`` (``trace``) follows.
"""

from __future__ import annotations

import math

import torch


class SinWave(torch.nn.Module):
    def __init__(self, d: int, time: bool, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.a = torch.randn(d, generator=gen, dtype=torch.float64) / math.sqrt(d)
        self.b = 0.7 if time else 0.0
        self.time = time

    def phase(self, X):
        return X[:, : self.a.numel()] @ self.a + (self.b * X[:, -1] if self.time else 0.0)

    def forward(self, X):
        return torch.sin(self.phase(X)).unsqueeze(-1)

    def smoothed(self, X, sx, st):
        damp = math.exp(-(sx**2 * float(self.a @ self.a) + (st or 0.0) ** 2 * self.b**2) / 2)
        ph = self.phase(X)
        grad = damp * torch.cos(ph).unsqueeze(1) * self.a
        return {
            "u": damp * torch.sin(ph),
            "u_t": damp * self.b * torch.cos(ph),
            "grad": grad,
            "grad_sq": (grad * grad).sum(1),
            "lap": -float(self.a @ self.a) * damp * torch.sin(ph),
        }

    def exact(self, X):
        return self.smoothed(X, 0.0, 0.0)

    def hessian_diag(self, X, sx, st):
        return -self.smoothed(X, sx, st)["u"].unsqueeze(1) * (self.a * self.a)


class Quadratic(torch.nn.Module):
    def __init__(self, d: int, time: bool, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        m = torch.randn(d, d, generator=gen, dtype=torch.float64) / math.sqrt(d)
        self.A = (m + m.T) / 2
        self.c = torch.randn(d, generator=gen, dtype=torch.float64)
        self.q, self.p = (0.8, -0.3) if time else (0.0, 0.0)
        self.time = time
        self.d = d

    def forward(self, X):
        x = X[:, : self.d]
        g = 0.5 * ((x @ self.A) * x).sum(1) + x @ self.c
        if self.time:
            t = X[:, -1]
            g = g + 0.5 * self.q * t * t + self.p * t
        return g.unsqueeze(-1)

    def smoothed(self, X, sx, st):
        x = X[:, : self.d]
        grad = x @ self.A + self.c
        u = self.forward(X).squeeze(-1) + 0.5 * sx**2 * float(torch.trace(self.A))
        u_t = torch.zeros_like(u)
        if self.time:
            u = u + 0.5 * self.q * st**2
            u_t = self.q * X[:, -1] + self.p
        lap = torch.full_like(u, float(torch.trace(self.A)))
        return {"u": u, "u_t": u_t, "grad": grad, "grad_sq": (grad * grad).sum(1), "lap": lap}

    def exact(self, X):
        return self.smoothed(X, 0.0, 0.0)

    def hessian_diag(self, X, sx, st):
        return self.A.diagonal().expand(X.shape[0], self.d)


class LayeredQuadratic(torch.nn.Module):
    """g = |W x + w t + c|^2 / 2 with a linear input layer (W: k x d), for the subspace estimator.

    Smoothing adds sx^2 |W|_F^2 / 2 + st^2 |w|^2 / 2; grad f = W'h, u_t = w.h, lap = |W|_F^2,
    with h the unperturbed pre-activation."""

    def __init__(self, d: int, time: bool, k: int = 6, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.input_layer = torch.nn.Linear(d + (1 if time else 0), k).double()
        with torch.no_grad():
            self.input_layer.weight.copy_(torch.randn(k, d + (1 if time else 0), generator=gen) / math.sqrt(d))
            self.input_layer.bias.copy_(torch.randn(k, generator=gen) * 0.5)
        self.d, self.time = d, time

    def body(self, h):
        return 0.5 * (h * h).sum(-1, keepdim=True)

    def forward(self, X):
        return self.body(self.input_layer(X))

    def smoothed(self, X, sx, st):
        W = self.input_layer.weight.detach()
        Wx = W[:, : self.d]
        h = self.input_layer(X).detach()
        grad = h @ Wx
        out = {
            "u": self.body(h).squeeze(-1) + 0.5 * sx**2 * float((Wx * Wx).sum()),
            "grad": grad,
            "grad_sq": (grad * grad).sum(1),
            "lap": torch.full((X.shape[0],), float((Wx * Wx).sum()), dtype=X.dtype),
        }
        if self.time:
            w = W[:, self.d]
            out["u"] = out["u"] + 0.5 * st**2 * float(w @ w)
            out["u_t"] = h @ w
        return out

    def hessian_diag(self, X, sx, st):
        Wx = self.input_layer.weight.detach()[:, : self.d]
        return (Wx * Wx).sum(0).expand(X.shape[0], self.d)


class LayeredSin(torch.nn.Module):
    """SinWave written as a linear input layer (a rank-1 row space) followed by sin."""

    def __init__(self, d: int, time: bool, seed: int = 0):
        super().__init__()
        self.wave = SinWave(d, time, seed)
        self.input_layer = torch.nn.Linear(d + (1 if time else 0), 1, bias=False).double()
        with torch.no_grad():
            weight = torch.cat([self.wave.a, torch.tensor([self.wave.b])]) if time else self.wave.a
            self.input_layer.weight.copy_(weight.unsqueeze(0))

    def body(self, h):
        return torch.sin(h)

    def forward(self, X):
        return self.body(self.input_layer(X))

    def smoothed(self, X, sx, st):
        return self.wave.smoothed(X, sx, st)
