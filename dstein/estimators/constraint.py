"""Hard constraints (output transforms): the solution is ``u = A + B f``.

``f`` is the (smoothed) network; ``A`` and ``B`` are functions the PDE knows in closed form,
chosen so that a condition holds exactly whatever ``f`` is (HJB: ``A = g(x)``, ``B = T - t``
makes ``u(x, T) = g(x)``; heat: the initial value and ``t``; a ball: ``1 - |x|^2``). This is
DeepXDE's ``apply_output_transform`` and STDE's ``(1 - |x|^2) N(x)``. The derivatives of A
and B are exact; they combine with the estimates of f by the product rule
(docs/MATH.md section 6), so every estimator works, stein-subspace included:

    u     = A + B f
    u_t   = A_t + B_t f + B f_t
    grad  = a + B grad f,                       a = grad A + f grad B
    |grad u|^2 = |a|^2 + 2 B (a . grad f) + B^2 |grad f|^2
    lap u = lap A + f lap B + 2 grad B . grad f + B lap f
    w . grad u = w . a + B w . grad f            (``along``, the PDE's own directions w)
    tr(W H_u) = tr(W H_A) + f tr(W H_B) + 2 (W grad B) . grad f + B tr(W H_f)
                                                (``trace``, W = diag(w): A_hess_diag, B_hess_diag)

The inner products with ``grad f`` are the estimator's ``along`` derivatives (directions
``grad A`` and ``grad B``), unbiased as estimates and, for stein-subspace, with the full
parameter gradient. Products of two estimates of the same samples (``f`` times
``grad B . grad f``, ``f^2 |grad B|^2``) carry a bias of their covariance; they arise only
when ``grad B`` is not zero, and ``f``'s estimate has a variance of order ``sx^2 / n``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dstein.estimators.base import Derivatives


@dataclass
class OutputTransform:
    """``u = A + B f`` at B points: A and B and their derivatives (None: identically zero).
    ``A_grad`` and ``B_grad`` are (B, d); the others (B,)."""

    A: torch.Tensor
    B: torch.Tensor
    A_t: torch.Tensor | None = None
    A_grad: torch.Tensor | None = None
    A_lap: torch.Tensor | None = None
    B_t: torch.Tensor | None = None
    B_grad: torch.Tensor | None = None
    B_lap: torch.Tensor | None = None
    #: The Hessians' diagonals (B, d), for ``trace``; None: zero (a transform that gives
    #: ``A_lap`` or ``B_lap`` but not these is refused where ``trace`` is needed).
    A_hess_diag: torch.Tensor | None = None
    B_hess_diag: torch.Tensor | None = None

    def directions(
        self, needs: frozenset[str], own: torch.Tensor | None = None, weights: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """The directions whose inner products with grad f the derivatives of u in ``needs``
        use: the PDE's own (``own``, (B, m, d), for ``along``), then grad A (for |grad u|^2),
        grad B (for |grad u|^2 and lap u) and ``weights * grad B`` (for ``trace``), where not zero."""
        out = list(own.unbind(1)) if own is not None and "along" in needs else []
        if "grad_sq" in needs and self.A_grad is not None:
            out.append(self.A_grad)
        if {"grad_sq", "lap"} & needs and self.B_grad is not None:
            out.append(self.B_grad)
        if "trace" in needs and self.B_grad is not None:
            if weights is None:
                raise ValueError("needs 'trace' but no weights were given")
            out.append(weights * self.B_grad)
        return out

    def needs_of_f(self, needs: frozenset[str], own: torch.Tensor | None = None) -> frozenset[str]:
        """The derivatives of f that the derivatives of u in ``needs`` are made of."""
        if "trace" in needs:
            for name in ("A", "B"):
                if getattr(self, f"{name}_hess_diag") is None and getattr(self, f"{name}_lap") is not None:
                    raise ValueError(
                        f"the PDE's output_transform gives {name}_lap but not {name}_hess_diag, the diagonal of "
                        f"{name}'s Hessian (B, d) that a diffusion's weighted trace ('trace') needs"
                    )
        out = set(needs & {"u_t", "grad", "grad_sq", "lap", "trace"})
        value = (
            "u" in needs
            or ("u_t" in needs and self.B_t is not None)
            or (bool({"grad", "grad_sq", "along"} & needs) and self.B_grad is not None)
            or ("lap" in needs and self.B_lap is not None)
            or ("trace" in needs and self.B_hess_diag is not None)
        )
        if value:
            out.add("u")
        if ((own is not None and "along" in needs) or ("grad_sq" in needs and self.A_grad is not None)
                or ({"grad_sq", "lap", "trace"} & needs and self.B_grad is not None)):  # fmt: skip
            out.add("along")  # some direction of ``directions``
        return frozenset(out)

    def apply(
        self,
        D: Derivatives,
        needs: frozenset[str],
        own: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> Derivatives:
        """The derivatives of u in ``needs`` from those of f (``D``, as ``needs_of_f`` asked);
        ``own`` and ``weights`` as given to ``directions``."""
        f = D.u
        columns = D.along.unbind(1) if D.along is not None else ()
        m = own.shape[1] if own is not None and "along" in needs else 0
        along_own, along = columns[:m], iter(columns[m:])
        along_A = next(along) if "grad_sq" in needs and self.A_grad is not None else None
        along_B = next(along) if {"grad_sq", "lap"} & needs and self.B_grad is not None else None
        along_WB = next(along) if "trace" in needs and self.B_grad is not None else None
        out = Derivatives()
        if "u" in needs:
            out.u = self.A + self.B * D.require("u")
        if "u_t" in needs:
            u_t = self.B * D.require("u_t")
            if self.A_t is not None:
                u_t = u_t + self.A_t
            if self.B_t is not None:
                u_t = u_t + self.B_t * D.require("u")
            out.u_t = u_t
        if "grad" in needs:
            out.grad = _plus(self._a(f), self.B.unsqueeze(1) * D.require("grad"))
        if "grad_sq" in needs:
            a = self._a(f)
            inner = _plus(along_A, None if along_B is None else f * along_B)  # type: ignore[operator]
            grad_sq = self.B * self.B * D.require("grad_sq")
            if a is not None:
                grad_sq = grad_sq + (a * a).sum(1)
            if inner is not None:
                grad_sq = grad_sq + 2 * self.B * inner
            out.grad_sq = grad_sq
        if "lap" in needs:
            lap = self.B * D.require("lap")
            if self.A_lap is not None:
                lap = lap + self.A_lap
            if self.B_lap is not None:
                lap = lap + self.B_lap * D.require("u")
            if along_B is not None:
                lap = lap + 2 * along_B
            out.lap = lap
        if m:
            assert own is not None
            along_u = self.B.unsqueeze(1) * torch.stack(along_own, 1)
            if self.A_grad is not None:
                along_u = along_u + torch.einsum("bmd,bd->bm", own, self.A_grad)
            if self.B_grad is not None:
                along_u = along_u + f.unsqueeze(1) * torch.einsum("bmd,bd->bm", own, self.B_grad)  # type: ignore[union-attr]
            out.along = along_u
        if "trace" in needs:
            assert weights is not None
            trace = self.B * D.require("trace")
            if self.A_hess_diag is not None:
                trace = trace + (weights * self.A_hess_diag).sum(1)
            if self.B_hess_diag is not None:
                trace = trace + D.require("u") * (weights * self.B_hess_diag).sum(1)
            if along_WB is not None:
                trace = trace + 2 * along_WB
            out.trace = trace
        return out

    def _a(self, f: torch.Tensor | None) -> torch.Tensor | None:
        """grad A + f grad B (None when both are zero)."""
        fB = None if self.B_grad is None else f.unsqueeze(1) * self.B_grad  # type: ignore[union-attr]
        return _plus(self.A_grad, fB)

    def value(self, f: torch.Tensor) -> torch.Tensor:
        """u from values of f (evaluation)."""
        return self.A + self.B * f


def _plus(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b
