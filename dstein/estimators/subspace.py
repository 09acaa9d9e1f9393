"""The subspace (Rao-Blackwellized) Stein estimator (MATH.md section 3).

For a model ``g(x, t) = body(Wx x + wt t + b)`` whose first layer is linear, ``g`` sees a
spatial perturbation ``delta`` only through ``Wx delta``. With ``Wx = U diag(s) V^T`` (rank
r <= width), split ``delta = V xi + delta_perp``: ``g`` depends on ``xi ~ N(0, sx^2 I_r)``
alone, and averaging over ``delta_perp`` analytically leaves the Stein estimators of
``stein.py`` with ``d`` replaced by ``r``: noise ``z`` of width r (+1 for time), Laplacian
weights ``|z|^2 - r``, gradient coordinates in the basis V. Per sample the first layer costs
O(width * r) instead of O(width * d); no d-dimensional noise is drawn or stored. Only the
basis (O(width^2 d), once per estimate) and ``Wx X`` grow with d.

The basis comes from the width x width Gram matrix ``Wx Wx^T = U diag(s^2) U^T`` (a float32
product, its eigendecomposition in float64).
Parameter gradients flow through ``M = Wx V`` with V held constant (MATH.md: this is the
conditional expectation of the full estimator's gradient for value, time derivative,
Laplacian and gradient norm). A gradient along a fixed direction is not supported
(``provides`` excludes nothing else: ``grad`` values are given, for evaluation, but a loss on
them would get a first-order parameter gradient only).

``RadialSubspace`` extends this to a first layer that also sees a function of ``|x|^2`` (the
radial family, docs/MATH.md section 10): the basis gains x's own direction, and one
chi-square number per sample stands for the squared norm of the rest of the perturbation.
"""

from __future__ import annotations

import torch
from torch import nn

from dstein.estimators.base import NoiseOfZ, SteinSpec, body_at, body_at_signs, split_input

#: Eigenvalues of the Gram matrix below this fraction of the largest are dropped (rank r).
RANK_RTOL = 1e-6


def split_model(model: nn.Module, feature: bool = False) -> tuple[nn.Linear, nn.Module]:
    """The model's linear input layer and the rest (``model(X) == body(input_layer(X))``, or
    with ``feature``: ``body(input_layer(X) + weight * q(x))``, ``model.quadratic_feature()``)."""
    layer, body = getattr(model, "input_layer", None), getattr(model, "body", None)
    if not feature and not getattr(model, "linear_input", True):
        raise ValueError(
            f"{type(model).__name__} feeds more than a linear map of x to its first layer and exposes no "
            "quadratic_feature(): estimator.method=stein-subspace cannot follow a perturbation through it"
        )
    if not isinstance(layer, nn.Linear) or not callable(body):
        raise ValueError(
            f"estimator.method=stein-subspace needs a model whose first layer is linear, exposed as "
            f"input_layer (torch.nn.Linear) with the rest as body; {type(model).__name__} has "
            f"{'no input_layer' if layer is None else 'input_layer of type ' + type(layer).__name__}"
            f"{'' if callable(body) else ' and no body'} (dstein.models.MLP qualifies)"
        )
    return layer, body


def input_weight(model: nn.Module, layer: nn.Linear) -> torch.Tensor:
    """The weights the first layer applies to X: ``model.input_weight()`` where the model
    scales its inputs (dstein.models.MLP), else the layer's own."""
    weight = getattr(model, "input_weight", None)
    return weight() if callable(weight) else layer.weight


def input_scales(model: nn.Module, d: int) -> tuple[float, torch.Tensor | None]:
    """The factor the model applies to x's columns before its first layer (one number: an
    MLP's ``column_scale`` is ``input_scale`` on all of them) and the factors of the columns
    after them (None: 1)."""
    scale = getattr(model, "column_scale", None)
    if scale is None:
        return 1.0, None
    return float(scale[0]), scale[d:]


class FirstLayer(torch.autograd.Function):
    """The first layer's products that grow with d, without forming ``c * W`` or slicing W in
    the graph (each a fresh width x d buffer per step, and its gradient another: at
    d = 100,000 they were most of a step; docs/benchmarks.md, "Cost versus d").

    ``apply(W, Y, d, c, ct, gram)`` for the layer's weight W (width x (d + n)), rows Y whose
    first d columns are points of R^d, x's factor c and the other columns' factors ct
    (None: 1) gives ``P = c Y_x Wx^T`` (Wx: W's first d columns), ``wt = ct * W[:, d:]`` and,
    with ``gram``, ``G = c^2 Wx Wx^T``. G's gradient flows through its left factor only (the
    subspace estimator's rule: V held constant). Backward writes W's gradient once:
    ``c dP^T Y_x + c^2 dG Wx`` into its first d columns, ``ct dwt`` into the rest."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, W: torch.Tensor, Y: torch.Tensor, d: int, c: float,
        ct: torch.Tensor | None, gram: bool,
    ) -> tuple[torch.Tensor, ...]:  # fmt: skip
        Wx, Yx = W[:, :d], Y[:, :d]
        P = (Yx @ Wx.T) * c
        wt = W[:, d:] if ct is None else W[:, d:] * ct
        ctx.save_for_backward(W, Y)
        ctx.d, ctx.c, ctx.ct = d, c, ct  # type: ignore[attr-defined]
        if not gram:
            return P, wt.clone()
        return P, wt.clone(), (Wx @ Wx.T) * (c * c)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, dP: torch.Tensor, dwt: torch.Tensor, dG=None):  # type: ignore[override]
        W, Y = ctx.saved_tensors  # type: ignore[attr-defined]
        d, c, ct = ctx.d, ctx.c, ctx.ct  # type: ignore[attr-defined]
        Wx, Yx = W[:, :d], Y[:, :d]
        dW = dY = None
        if ctx.needs_input_grad[0]:  # type: ignore[attr-defined]
            dW = torch.empty_like(W)
            dW[:, :d].addmm_(dP.T, Yx, beta=0, alpha=c)
            if dG is not None:
                dW[:, :d].addmm_(dG, Wx, alpha=c * c)
            dW[:, d:] = dwt if ct is None else dwt * ct
        if ctx.needs_input_grad[1]:  # type: ignore[attr-defined]
            dY = torch.zeros_like(Y)
            dY[:, :d] = (dP @ Wx) * c
        return dW, dY, None, None, None, None


def row_basis(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``U`` (width x r) and ``s`` (r) of ``Wx = U diag(s) V^T`` from the Gram matrix
    ``Wx Wx^T`` (eigendecomposition in float64; directions with s^2 below RANK_RTOL of the
    largest are dropped). No gradient."""
    with torch.no_grad():
        s2, U = torch.linalg.eigh(gram.detach().double())
        keep = s2 > RANK_RTOL * s2.max().clamp_min(torch.finfo(torch.float64).tiny)
        return U[:, keep].to(gram.dtype), s2[keep].sqrt().to(gram.dtype)


def scaled_basis(gram: torch.Tensor, columns: int | None = None) -> torch.Tensor:
    """``B`` (width x r) such that ``V = Wx^T B`` is an orthonormal basis of the row space of
    ``Wx``, from the Gram matrix ``G = Wx Wx^T`` (float64 inside; no gradient).

    Where every eigenvalue of G is above ``RANK_RTOL`` times the largest (``row_basis`` would
    keep all of them), ``B = L^-T`` for the Cholesky factor ``G = L L^T``: ``V^T V = L^-1 G
    L^-T = I``. That is certain once ``1 / |B|_F^2`` (at most the smallest eigenvalue) exceeds
    ``RANK_RTOL tr G`` (at least that fraction of the largest); a Cholesky factorization and a
    triangular inverse cost about a seventh of the eigendecomposition at width 128
    (docs/benchmarks.md). Otherwise (a first layer of lower rank, d < width, or a
    poorly conditioned one) ``U / s`` from ``row_basis``. Both span the same space; the
    basis differs by a rotation, under which z ~ N(0, I_r) has the same law (docs/MATH.md
    section 10). ``columns``: Wx's, where known (fewer than its rows: no full rank, no Cholesky)."""
    with torch.no_grad():
        G = gram.detach().double()
        if columns is None or columns >= G.shape[0]:
            L, info = torch.linalg.cholesky_ex(G)
            if not int(info):
                eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
                B = torch.linalg.solve_triangular(L, eye, upper=False).T  # L^-T
                if 1.0 / float((B * B).sum()) > RANK_RTOL * float(G.diagonal().sum()):
                    return B.to(gram.dtype)
        U, s = row_basis(G)
        return (U / s).to(gram.dtype)


class InputSubspace(NoiseOfZ):
    """The space of the subspace estimator (a ``base.Space``, like ``stein.FullSpace``)."""

    def __init__(self, model: nn.Module, X: torch.Tensor, spec: SteinSpec, cache: dict | None = None, shares: int = 1):
        layer, self.body = split_model(model)
        self._basis(model, layer, X, spec, cache, shares)
        self.width = self.rank + (1 if spec.time_dependent else 0)
        bias = 0.0 if layer.bias is None else layer.bias
        self.h0 = self.P + X[:, self.d :] @ self.wt.T + bias  # (B, width of the layer): the unperturbed pre-activations
        M = self.Mx
        if spec.sigma_t is not None:
            M = torch.cat([M, self.wt * spec.sigma_t], dim=1)
        self.M = M  # pre-activation change per unit of z

    def _basis(
        self, model: nn.Module, layer: nn.Linear, X: torch.Tensor, spec: SteinSpec, cache: dict | None, shares: int
    ) -> None:
        """The row-space basis of the first layer's spatial weights, shared by the estimates
        of one loss through ``cache``; ``Mx = Wx V sx`` (differentiable in Wx, V constant)."""
        self.X = X
        self.d = split_input(X, spec.time_dependent)
        if layer.in_features != X.shape[1]:
            raise ValueError(f"the input layer takes {layer.in_features} inputs, the points have {X.shape[1]}")
        # G = Wx Wx^T with the gradient of Wx @ V for V = Wx^T U / s held constant: then
        # M = Wx V = G U / s, and V itself (d x r) is only formed when a gradient is asked for.
        # FirstLayer gives G with Wx x (and the time columns' weights): one gradient buffer
        # of the weight's size in the backward pass, written once.
        param = self.param = layer.weight
        self.c, self.ct = input_scales(model, self.d)
        if cache is not None and cache.get("weight") is param and cache.get("version") == param._version:
            G, Us = cache["basis"]  # computed for another set of points of the same loss
            self.P, self.wt = FirstLayer.apply(param, X, self.d, self.c, self.ct, False)
        else:
            self.P, self.wt, G = FirstLayer.apply(param, X, self.d, self.c, self.ct, True)
            Us = scaled_basis(G, self.d)  # G: the only O(k^2 d) product
            if cache is not None:
                cache.update(weight=param, version=param._version, basis=(G, Us))
        self.Us, self.G = Us, G
        self._along: tuple | None = None  # (directions, what along() needs of them alone)
        self._trace: tuple | None = None  # (trace weights' deviations, the matrix weighted_sq needs of them)
        self.shares = shares  # ranks that each compute the whole of what follows from the summed estimates
        self.rank = Us.shape[1]
        self.Mx = (G @ self.Us) * spec.sigma_x  # (k, r): differentiable in Wx, V constant

    def center(self) -> torch.Tensor:
        return self.body(self.h0).reshape(-1)

    def values(
        self, z: torch.Tensor, antithetic: bool, aux: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        shift = z @ self.M.T  # (B, n, k): O(k r) per sample
        return body_at_signs(self.body, self.h0, shift, None, antithetic)

    def _body_of(self, plus: torch.Tensor, minus: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """g at pre-activations ``h0 + plus`` (and ``h0 + minus``), (B, n) each."""
        return body_at(self.body, self.h0, plus, minus)

    @property
    def Wx(self) -> torch.Tensor:
        """The spatial weights the first layer applies (width x d; formed on each call, no gradient)."""
        return self.param.detach()[:, : self.d] * self.c

    def times_Wx(self, Y: torch.Tensor) -> torch.Tensor:
        """``Y Wx^T`` for rows Y (..., d), without forming Wx (no gradient)."""
        return torch.matmul(Y, self.param.detach()[:, : self.d].T) * self.c

    @property
    def V(self) -> torch.Tensor:
        """The orthonormal basis (d x r) of the row space of Wx."""
        return self.Wx.T @ self.Us

    def spatial(self, coords: torch.Tensor) -> torch.Tensor:
        """Gradient coordinates in the basis V as vectors in R^d."""
        return coords @ self.V.T

    def weighted_sq(self, zx: torch.Tensor, aux: torch.Tensor | None, v: torch.Tensor) -> torch.Tensor:
        """``z' M z - tr(M)``, ``M = V' diag(v) V`` per point: with ``delta / sx = V z + delta_perp``,
        ``E[delta_perp_j^2] = 1 - (V V')_jj``, so ``sum_j v_j (E[delta_j^2 | z] - 1) = z' M z - tr(M)``.
        M costs O(d r^2) per point, once per set of weights (both halves of a pair share it)."""
        M = self._trace_matrix(v)
        return torch.einsum("bnr,brs,bns->bn", zx, M, zx) - M.diagonal(dim1=1, dim2=2).sum(-1, keepdim=True)

    def _trace_matrix(self, v: torch.Tensor) -> torch.Tensor:
        if self._trace is None or self._trace[0] is not v:
            V = self.V
            self._trace = (v, (V.T.unsqueeze(0) * v.detach().unsqueeze(1)) @ V)  # (B, r, r)
        return self._trace[1]

    def along(self, coords: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
        """Inner products (B, m) of the gradient ``V coords`` with ``directions`` w (B, m, d).

        The value is ``(V' w) . coords``; O(width d) per direction, V is never formed. Its
        parameter gradient with V held constant misses one term of the full estimator's
        expected gradient (docs/MATH.md section 6): ``d(w . grad f)/dWx`` also holds
        ``grad_h f w_perp'``, w_perp the part of w outside the row space, because a change of
        Wx lets the model see that direction. ``grad_h f = U (coords / s)`` (from
        ``grad_x f = Wx' grad_h f = V coords``), so the term is the gradient of
        ``coords' diag(1/s) U' (Wx - sg(Wx)) w_perp``, whose value is zero. Every rank of a
        sample group computes that term from the summed coordinates, so its gradient enters
        with weight 1 / shares (the shares of the group's gradient are summed)."""
        if self._along is None or self._along[0] is not directions:  # the same for both halves of a pair
            inside = self.times_Wx(directions) @ self.Us  # V' w = Us' Wx w: (B, m, r)
            w_perp = directions - (inside @ self.Us.T) @ self.Wx
            B, m, d = w_perp.shape
            # w_perp detached: the term is zero for every w (and its gradient along the points,
            # Wx' g projected out of the row space, too), so none is computed
            live = FirstLayer.apply(self.param, w_perp.detach().reshape(B * m, d), d, self.c, self.ct, False)[0]
            self._along = (directions, inside, (live - live.detach()).reshape(B, m, -1))
        _, inside, change = self._along  # change: (Wx - sg(Wx)) w_perp, zero, with a gradient
        correction = torch.einsum("bmk,kr,br->bm", change, self.Us, coords.detach()) / self.shares
        return torch.einsum("bmr,br->bm", inside, coords) + correction


class RadialSubspace(InputSubspace):
    """The subspace estimator for a first layer that also sees ``q = (|x|^2 - shift) / scale``
    (``model.family=radial``; docs/MATH.md section 10).

    A perturbation ``delta`` of x reaches that layer through ``Wx delta``, ``x . delta`` and
    ``|delta|^2``. With V the row-space basis (r columns) and ``e`` the unit vector of x's part
    outside it (one per point), ``delta = V xi + e eta + delta_perp``, and at the current
    weights

        Wx delta = Wx V xi,   x . delta = (V'x) . xi + rho eta,   |delta|^2 = |xi|^2 + eta^2 + c

    (``rho = |x - V V'x|``), with ``c = |delta_perp|^2 ~ sx^2 chi^2(d - r - 1)``: one number per
    sample (``draw_aux``), shared by the two members of a pair. So g depends on delta only
    through ``(xi, eta, c)`` and the estimators of stein.py hold with noise ``z`` of width
    ``r + 1`` (the coordinates along V and e; ``r`` when the row space is all of R^d); the
    gradient lies in ``span(V, x)``. Stein's Laplacian weight is the full one,
    ``|z|^2 + c / sx^2 - d`` (its variance grows like d, as in full space); the difference
    Laplacian has no spatial weight and the full-space variance, which the feature's
    ``1 / scale`` keeps O(1). Per sample the work is O(width r); per point, ``Wx x`` and ``|x|^2``.

    Parameter gradients: V and e are held constant; ``Wx e eta`` enters the pre-activation with
    value 0 and its gradient (``eta`` moves ``x . delta``, so that term has a non-zero
    conditional mean), computed as ``(Wx - sg(Wx)) (x - V V'x) / rho`` from ``Wx x`` and
    ``Wx V`` without another O(width d) product per point. ``along`` takes directions in
    ``span(V, x)`` only (the hard constraints' ``grad A``, ``grad B`` are along x): for those
    the value is exact and no term is missing from its parameter gradient (section 6)."""

    def __init__(self, model: nn.Module, X: torch.Tensor, spec: SteinSpec, cache: dict | None = None, shares: int = 1):
        layer, self.body = split_model(model, feature=True)
        feature = model.quadratic_feature()  # type: ignore[operator]
        self._basis(model, layer, X, spec, cache, shares)
        if feature.dim != self.d:
            raise ValueError(f"the model's quadratic feature reads {feature.dim} columns, the points have {self.d}")
        self.sx, self.r = spec.sigma_x, self.rank
        x = X[:, : self.d]
        xW = self.P  # (B, k): Wx x, the only O(width d) product per point
        x_sq = (x * x).sum(1)
        self.feature = feature
        bias = 0.0 if layer.bias is None else layer.bias
        self.h0 = xW + bias + feature.at(x_sq)
        self.x_sq = x_sq.detach().reshape(-1, 1, 1)
        if X.shape[1] > self.d:
            self.h0 = self.h0 + X[:, self.d :] @ self.wt.T
        self.proj = xW.detach() @ self.Us  # V'x: (B, r)
        self.extra = 1 if self.r < self.d else 0  # the direction e, where the row space is not all of R^d
        self.dof = max(self.d - self.r - 1, 0)  # of c
        self.rank = self.r + self.extra
        self.width = self.rank + (1 if spec.time_dependent else 0)
        self.wt_st = None if spec.sigma_t is None else self.wt[:, 0] * spec.sigma_t
        if self.extra:
            self.rho = (x_sq.detach() - (self.proj * self.proj).sum(1)).clamp_min(0).sqrt()
            change = (xW - xW.detach()) - self.proj @ ((self.G - self.G.detach()) @ self.Us).T  # (Wx - sg Wx) x_perp
            self.We = change * (self.sx / self.rho.clamp_min(1e-30)).unsqueeze(1)  # (B, k): zero, with a gradient

    def draw_aux(self, gen: torch.Generator, shape: tuple[int, int]) -> torch.Tensor | None:
        """``c / sx^2 ~ chi^2(d - r - 1)`` per sample (None when delta_perp has no dimension)."""
        if not self.dof:
            return None
        alpha = torch.full(shape, self.dof / 2, dtype=self.X.dtype, device=self.X.device)
        return 2 * torch._standard_gamma(alpha, generator=gen)

    def lap_weight(self, zx_sq: torch.Tensor, aux: torch.Tensor | None) -> torch.Tensor:
        return zx_sq + (0 if aux is None else aux) - self.d

    def values(
        self, z: torch.Tensor, antithetic: bool, aux: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        r, sx = self.r, self.sx
        zx = z[..., :r]
        odd = zx @ self.Mx.T  # (B, n, k): Wx V xi
        x_delta = zx @ self.proj.unsqueeze(2)  # (B, n, 1): (V'x) . xi / sx
        sq = (zx * zx).sum(-1, keepdim=True)
        if self.extra:
            ze = z[..., r : r + 1]
            odd = odd + ze * self.We.unsqueeze(1)
            x_delta = x_delta + ze * self.rho.reshape(-1, 1, 1)
            sq = sq + ze * ze
        if self.wt_st is not None:
            odd = odd + z[..., self.rank : self.rank + 1] * self.wt_st
        if aux is not None:
            sq = sq + aux.unsqueeze(-1)
        # |x +- delta|^2 - |x|^2 = +-2 x . delta (odd) + |delta|^2 (even)
        x_delta, sq = (2 * sx) * x_delta, (sx * sx) * sq
        if self.feature.linear:
            a = self.feature.slope()
            return body_at_signs(self.body, self.h0, odd + x_delta * a, sq * a, antithetic)
        plus = odd + self.feature.change(self.x_sq, sq + x_delta)
        if not antithetic:
            return self._body_of(plus, None)
        return self._body_of(plus, -odd + self.feature.change(self.x_sq, sq - x_delta))

    def weighted_sq(self, zx: torch.Tensor, aux: torch.Tensor | None, v: torch.Tensor) -> torch.Tensor:
        """``sum_j v_j (E[delta_j^2 | xi, eta, c] / sx^2 - 1)``: with ``Q = [V, e]`` and ``M = Q' diag(v) Q``,
        ``z' M z`` from the coordinates along Q and, for ``delta_perp`` (m dimensions, squared
        norm c), ``E[delta_perp_j^2 | c] = (c / m) (1 - (Q Q')_jj)``: ``(c / (m sx^2)) (sum v - tr M)``."""
        if not self.extra:
            return super().weighted_sq(zx, aux, v)
        if self._trace is None or self._trace[0] is not v:
            V, e, w = self.V, self._e(), v.detach()
            Vw = V.T.unsqueeze(0) * w.unsqueeze(1)  # (B, r, d)
            Ve = Vw @ e.unsqueeze(2)  # (B, r, 1): V' diag(w) e
            ee = (w * e * e).sum(1).reshape(-1, 1, 1)
            M = torch.cat([torch.cat([Vw @ V, Ve], 2), torch.cat([Ve.transpose(1, 2), ee], 2)], 1)  # (B, r+1, r+1)
            self._trace = (v, M)
        M = self._trace[1]
        total, tr = v.detach().sum(1, keepdim=True), M.diagonal(dim1=1, dim2=2).sum(-1, keepdim=True)
        out = torch.einsum("bnr,brs,bns->bn", zx, M, zx) - total
        return out if aux is None else out + aux * ((total - tr) / self.dof)

    def _e(self) -> torch.Tensor:
        """e per point (B, d): the unit vector of x's part outside the row space."""
        x = self.X[:, : self.d].detach()
        return (x - (self.proj @ self.Us.T) @ self.Wx) / self.rho.clamp_min(1e-30).unsqueeze(1)

    def spatial(self, coords: torch.Tensor) -> torch.Tensor:
        """Coordinates along V (and e) as vectors in R^d."""
        out = coords[:, : self.r] @ self.V.T
        return out + coords[:, self.r :] * self._e() if self.extra else out

    def along(self, coords: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
        """Inner products (B, m) of the gradient with directions w in span(V, x) (B, m, d):
        ``(V'w) . coords_V + (e . w) coords_e``, with ``e . w = (x . w - (V'x) . (V'w)) / rho``."""
        if self._along is None or self._along[0] is not directions:  # the same for both halves of a pair
            inside = self.times_Wx(directions) @ self.Us  # V'w: (B, m, r)
            along_e = None
            if self.extra:
                x_w = torch.einsum("bd,bmd->bm", self.X[:, : self.d].detach(), directions)
                along_e = (x_w - torch.einsum("bmr,br->bm", inside, self.proj)) / self.rho.clamp_min(1e-30).unsqueeze(1)
            self._along = (directions, inside, along_e)
        _, inside, along_e = self._along
        value = torch.einsum("bmr,br->bm", inside, coords[:, : self.r])
        return value if along_e is None else value + along_e * coords[:, self.r : self.r + 1]
