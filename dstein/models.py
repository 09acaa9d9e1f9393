"""The base network g of the smoothed model f(X) = E[g(X + eps)]: the model families.

- ``mlp``: ``depth`` hidden layers of ``width`` units. Its input gradient lies in the row
  space of its first layer (at most ``width`` directions): where d > width it cannot
  represent a gradient that points in arbitrary directions, such as the radial gradients of
  HJB's solution (the gradient floor, about sqrt(1 - width/d)).
- ``radial``: the same MLP whose first layer also sees ``q = (|x|^2 - shift) / scale``
  (standardized over the training points). Its gradient lies in the row space plus the
  point's own direction x, so it represents functions of |x|^2 (and of ``Wx x``) in any d,
  with the same number of weights plus ``width``.
- ``quadratic``: the MLP whose first layer also sees the squares of x's coordinates through
  weights of its own, ``Q (x * x)``. Its gradient ``Wx' g + 2 (Q' g) * x`` lies, at each point,
  in the span of Wx's rows and of the rows of ``Q diag(x)``: gradients that turn with x and
  are not radial (``a * x`` for per-coordinate weights a) take one row of Q, in any d, for
  twice the first layer's weights (docs/MATH.md section 20).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class Sine(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x)


class Scale(nn.Module):
    """Multiply by a constant (``model.output_scale``: the body's last module; no state)."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = float(factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor:g}"


ACTIVATIONS = {"tanh": nn.Tanh, "sin": Sine, "gelu": nn.GELU, "silu": nn.SiLU, "softplus": nn.Softplus}
FAMILIES = ("mlp", "radial", "quadratic")


class MLP(nn.Module):
    """``depth`` hidden layers of ``width`` units with a smooth activation, scalar output.

    The first layer is a plain ``nn.Linear`` exposed as ``input_layer``: estimators that
    exploit its linearity (the subspace estimator) look for it there, and read the weights it
    applies to X from ``input_weight()``. ``input_scale`` multiplies the first ``dim``
    columns of X (x; time, if any, follows) before that layer: Adam moves each of the layer's
    weights by about the learning rate per step whatever its gradient, so with many inputs
    their random drift makes an input gradient that does not shrink with d; a scale of 1/d
    keeps a coherent update of the pre-activation at the learning rate's size and the drift
    negligible (the input-layer scaling of muP). ``output_scale`` multiplies the output (the
    body's last module, ``Scale``): Adam moves the last layer's weights by about the learning
    rate per step, so a solution that varies by tens (Deep BSDE's prices) would take
    thousands of steps to reach at scale 1.
    """

    #: ``model(X) == body(input_layer(X))``: what the subspace estimator relies on.
    linear_input = True
    #: Whether ``pre_activation(X) = input_weight() X + b (+ a * q(|x|^2))``, so that the
    #: full-space estimators may perturb the pre-activation instead of X (stein.layered).
    layered_input = True
    column_scale: torch.Tensor

    def __init__(
        self, in_dim: int, width: int, depth: int, activation: str = "tanh", input_scale: float = 1.0,
        dim: int | None = None, output_scale: float = 1.0,
    ):  # fmt: skip
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
        if output_scale != 1.0:
            layers.append(Scale(output_scale))
        self.body = nn.Sequential(*layers)
        self.input_scale = float(input_scale)
        scale = torch.ones(in_dim)
        scale[: in_dim if dim is None else dim] = self.input_scale
        self.register_buffer("column_scale", scale, persistent=False)  # follows the model's device and dtype

    def input_weight(self) -> torch.Tensor:
        """The weights the first layer applies to X (its weight, x's columns times input_scale)."""
        weight = self.input_layer.weight
        return weight if self.input_scale == 1.0 else weight * self.column_scale

    def pre_activation(self, X: torch.Tensor) -> torch.Tensor:
        """What the first activation sees."""
        return F.linear(X, self.input_weight(), self.input_layer.bias)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return self.body(self.pre_activation(X))

    def gradient_directions(self, X: torch.Tensor) -> torch.Tensor | None:
        """Directions of R^d, per point (B, m, d), that the input gradient may have beyond the
        row space of ``input_layer``'s spatial weights (None: none)."""
        return None

    def quadratic_feature(self) -> QuadraticFeature | None:
        """The first layer's quadratic input feature (None: the first layer is linear in x)."""
        return None


#: What of |x|^2 the radial family's first layer sees (model.radial_feature): each name is a
#: tuple of functions phi, one input column each (``both``: |x|^2 and log(1 + |x|^2) side by side).
RADIAL_KINDS = {"square": ("square",), "log": ("log",), "both": ("square", "log")}
RADIAL_FEATURES = tuple(RADIAL_KINDS)


def radial_phi(r2: torch.Tensor, kind: str) -> torch.Tensor:
    """``phi(|x|^2)`` of one radial function (``square`` or ``log``)."""
    return r2 if kind == "square" else torch.log1p(r2)


def _phi_change(kind: str, r2: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """``phi(r2 + step) - phi(r2)`` without cancellation (for the log: a log1p of the relative
    step, not a difference of two logarithms of about 5 that float32 would round away)."""
    return step if kind == "square" else torch.log1p(step / (1 + r2))


@dataclass(frozen=True)
class QuadraticFeature:
    """How ``|x|^2`` enters a first layer: ``pre_activation = input_layer(X) + weight q``,
    ``q_j = (phi_j(|x|^2) - shift_j) / scale_j``, x the first ``dim`` columns of X, ``phi_j``
    the functions named by ``kinds`` (the identity ``square``, ``log(1 + .)`` ``log``).
    ``weight`` (width, len(kinds)) is the live parameter (gradients flow through it); ``shift``
    and ``scale`` are scalars for one function, (len(kinds),) for several. What the Stein
    estimators need to follow a perturbation of x through the feature (estimators/stein.py,
    estimators/subspace.py)."""

    weight: torch.Tensor
    shift: torch.Tensor
    scale: torch.Tensor
    dim: int
    kinds: tuple[str, ...] = ("square",)

    def _slopes(self) -> torch.Tensor:
        return self.weight / self.scale  # (width, m): the pre-activation per unit of each phi

    @property
    def linear(self) -> bool:
        """The feature is |x|^2 itself: its change splits into an odd and an even part."""
        return self.kinds == ("square",)

    def slope(self) -> torch.Tensor:
        """(width,): the pre-activation per unit of |x|^2 (a ``linear`` feature only)."""
        assert self.linear
        return self._slopes()[:, 0]

    def at(self, r2: torch.Tensor) -> torch.Tensor:
        """The feature's share of the pre-activation at squared norms ``r2`` (B,): (B, width)."""
        phis = torch.stack([radial_phi(r2, k) for k in self.kinds], -1)
        return (phis - self.shift) @ self._slopes().T

    def change(self, r2: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """The pre-activation's change when ``|x|^2 = r2`` moves by ``step`` (shapes broadcast,
        the last of size 1): ``sum_j (weight_j / scale_j) (phi_j(r2 + step) - phi_j(r2))``."""
        slopes = self._slopes()
        out = _phi_change(self.kinds[0], r2, step) * slopes[:, 0]
        for j in range(1, len(self.kinds)):
            out = out + _phi_change(self.kinds[j], r2, step) * slopes[:, j]
        return out


def _per_function(value: float | Sequence[float], m: int) -> torch.Tensor:
    """A buffer of one number per radial function: a scalar for one function (the layout of
    every state saved before ``both``), shape (m,) for several; one number serves them all."""
    t = torch.as_tensor(value, dtype=torch.float32).reshape(-1)
    t = t.expand(m).clone() if t.numel() == 1 else t
    if t.numel() != m:
        raise ValueError(f"{t.numel()} standardization numbers for {m} radial functions")
    return t[0].clone() if m == 1 else t


class RadialMLP(MLP):
    """An MLP whose first layer also sees standardized functions of the squared norm of x
    (family ``radial``).

    ``dim``: the spatial columns of the input (time, if any, follows them); ``shift`` and
    ``scale`` standardize each phi(|x|^2) over the training points (buffers, saved with the
    model); ``feature``: phi, ``square`` (|x|^2 itself), ``log`` (log(1 + |x|^2): resolves small
    |x| where |x|^2 spans orders of magnitude, as HJB's points near the origin and at |x|^2 ~ d)
    or ``both`` (two columns: the log near the origin, the square on a shell |x|^2 ~ d where the
    log's standardized range is a few thousandths).
    """

    linear_input = False  # the squared norm enters the first layer too
    q_shift: torch.Tensor
    q_scale: torch.Tensor

    def __init__(
        self, in_dim: int, dim: int, width: int, depth: int, activation: str = "tanh",
        shift: float | Sequence[float] = 0.0, scale: float | Sequence[float] = 1.0, input_scale: float = 1.0,
        feature: str = "square", output_scale: float = 1.0,
    ):  # fmt: skip
        super().__init__(in_dim, width, depth, activation, input_scale, dim, output_scale)
        if feature not in RADIAL_KINDS:
            raise ValueError(f"model.radial_feature={feature!r} is not one of {RADIAL_FEATURES}")
        self.dim, self.kinds = dim, RADIAL_KINDS[feature]
        m = len(self.kinds)
        self.radial = nn.Linear(m, width, bias=False)
        self.register_buffer("q_shift", _per_function(shift, m))
        self.register_buffer("q_scale", _per_function(scale, m))

    def feature(self, X: torch.Tensor) -> torch.Tensor:
        x = X[:, : self.dim]
        r2 = (x * x).sum(1, keepdim=True)
        phis = torch.cat([radial_phi(r2, k) for k in self.kinds], 1)
        return (phis - self.q_shift) / self.q_scale

    def pre_activation(self, X: torch.Tensor) -> torch.Tensor:
        return super().pre_activation(X) + self.radial(self.feature(X))

    def gradient_directions(self, X: torch.Tensor) -> torch.Tensor:
        return X[:, : self.dim].unsqueeze(1)

    def quadratic_feature(self) -> QuadraticFeature:
        return QuadraticFeature(self.radial.weight, self.q_shift, self.q_scale, self.dim, self.kinds)


class QuadraticMLP(MLP):
    """An MLP whose first layer also sees the squares of x's coordinates (family ``quadratic``):
    ``pre_activation = input_layer(s x, t) + s quadratic(x * x)``, s = ``input_scale`` on the
    squares too (not s^2: they are all positive, so a change of Q by the learning rate in
    every entry moves the pre-activation by about s d lr, the same as a coherent change of W;
    muP's reason). ``dim``: the spatial columns of X (time, if any, follows).

    Neither estimator shortcut applies: the full-space estimators perturb X itself (the
    pre-activation's change holds ``Q (delta * delta)``), and stein-subspace is refused (that
    term depends on every coordinate of the perturbation, not on its projection onto a few
    directions)."""

    linear_input = False
    layered_input = False

    def __init__(
        self, in_dim: int, dim: int, width: int, depth: int, activation: str = "tanh", input_scale: float = 1.0,
        output_scale: float = 1.0,
    ):  # fmt: skip
        super().__init__(in_dim, width, depth, activation, input_scale, dim, output_scale)
        self.dim = dim
        self.quadratic = nn.Linear(dim, width, bias=False)

    def pre_activation(self, X: torch.Tensor) -> torch.Tensor:
        x = X[:, : self.dim]
        return super().pre_activation(X) + self.quadratic(x * x) * self.input_scale

    def gradient_directions(self, X: torch.Tensor) -> torch.Tensor:
        """The rows of ``Q diag(x)`` (B, width, d): with Wx's rows, the directions the input
        gradient can take at each point (``2 s (Q' g) * x``, g the gradient at the pre-activation)."""
        return self.quadratic.weight.unsqueeze(0) * X[:, : self.dim].unsqueeze(1)
