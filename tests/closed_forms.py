"""Test functions whose Gaussian smoothing is known in closed form (float64).

``SinWave``: g(x, t) = sin(a.x + b t); smoothing multiplies by
exp(-(sx^2 |a|^2 + st^2 b^2) / 2), so f, its derivatives and |grad f|^2 are explicit.
``Quadratic``: g = x'Ax/2 + c.x + q t^2 / 2 + p t; f = g + sx^2 tr(A)/2 + q st^2 / 2.
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
