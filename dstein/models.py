"""The base network g of the smoothed model f(X) = E[g(X + eps)]."""

from __future__ import annotations

import torch
from torch import nn


class Sine(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x)


ACTIVATIONS = {"tanh": nn.Tanh, "sin": Sine, "gelu": nn.GELU, "silu": nn.SiLU, "softplus": nn.Softplus}


class MLP(nn.Module):
    """``depth`` hidden layers of ``width`` units with a smooth activation, scalar output.

    The first layer is a plain ``nn.Linear`` exposed as ``input_layer``: estimators that
    exploit its linearity (the subspace estimator) look for it there.
    """

    def __init__(self, in_dim: int, width: int, depth: int, activation: str = "tanh"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"model.activation={activation!r} is not one of {sorted(ACTIVATIONS)}")
        if width < 1 or depth < 1:
            raise ValueError(f"model.width={width} and model.depth={depth} must be >= 1")
        act = ACTIVATIONS[activation]
        self.input_layer = nn.Linear(in_dim, width)
        layers: list[nn.Module] = [act()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), act()]
        layers.append(nn.Linear(width, 1))
        self.body = nn.Sequential(*layers)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return self.body(self.input_layer(X))
