"""The base network g of the smoothed model f(X) = E[g(X + eps)]: the model families.

- ``mlp``: ``depth`` hidden layers of ``width`` units. Its input gradient lies in the row
  space of its first layer (at most ``width`` directions): where d > width it cannot
  represent a gradient that points in arbitrary directions, such as the radial gradients of
  HJB's solution (the gradient floor, about sqrt(1 - width/d)).
- ``radial``: the same MLP whose first layer also sees ``q = (|x|^2 - shift) / scale``
  (standardized over the training points). Its gradient lies in the row space plus the
  point's own direction x, so it represents functions of |x|^2 (and of ``Wx x``) in any d,
  with the same number of weights plus ``width``.
"""

from __future__ import annotations

import torch
from torch import nn


class Sine(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x)


ACTIVATIONS = {"tanh": nn.Tanh, "sin": Sine, "gelu": nn.GELU, "silu": nn.SiLU, "softplus": nn.Softplus}
FAMILIES = ("mlp", "radial")


class MLP(nn.Module):
    """``depth`` hidden layers of ``width`` units with a smooth activation, scalar output.

    The first layer is a plain ``nn.Linear`` exposed as ``input_layer``: estimators that
    exploit its linearity (the subspace estimator) look for it there.
    """

    #: ``model(X) == body(input_layer(X))``: what the subspace estimator relies on.
    linear_input = True

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

    def pre_activation(self, X: torch.Tensor) -> torch.Tensor:
        """What the first activation sees."""
        return self.input_layer(X)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return self.body(self.pre_activation(X))

    def gradient_directions(self, X: torch.Tensor) -> torch.Tensor | None:
        """Directions of R^d, per point (B, m, d), that the input gradient may have beyond the
        row space of ``input_layer``'s spatial weights (None: none)."""
        return None


class RadialMLP(MLP):
    """An MLP whose first layer also sees the standardized squared norm of x (family ``radial``).

    ``dim``: the spatial columns of the input (time, if any, follows them); ``shift`` and
    ``scale`` standardize |x|^2 over the training points (buffers, saved with the model).
    """

    linear_input = False  # the squared norm enters the first layer too
    q_shift: torch.Tensor
    q_scale: torch.Tensor

    def __init__(
        self, in_dim: int, dim: int, width: int, depth: int, activation: str = "tanh", shift: float = 0.0,
        scale: float = 1.0,
    ):  # fmt: skip
        super().__init__(in_dim, width, depth, activation)
        self.dim = dim
        self.radial = nn.Linear(1, width, bias=False)
        self.register_buffer("q_shift", torch.tensor(float(shift)))
        self.register_buffer("q_scale", torch.tensor(float(scale)))

    def feature(self, X: torch.Tensor) -> torch.Tensor:
        x = X[:, : self.dim]
        return ((x * x).sum(1, keepdim=True) - self.q_shift) / self.q_scale

    def pre_activation(self, X: torch.Tensor) -> torch.Tensor:
        return self.input_layer(X) + self.radial(self.feature(X))

    def gradient_directions(self, X: torch.Tensor) -> torch.Tensor:
        return X[:, : self.dim].unsqueeze(1)
