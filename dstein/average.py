"""``train.average``: an exponential moving average of the weights (Polyak-Ruppert averaging),
what evaluations, the saved model (model.pt, ``dstein.load``), the closed loop and the run's
summary use; training itself steps the raw weights.

Why: with fresh points and fresh noise every step, the weights at the last step carry the
noise of the last steps' gradients. A value at one point, such as u(0, x0), moved by 1 % to
1.5 % between evaluations 500 steps apart at the end of a linearly decayed schedule (Deep
BSDE's Allen-Cahn at d = 100, docs/benchmarks.md); the average over the last few hundred
steps has that noise averaged out.

After update ``n`` the average is ``a <- a + r (w - a)`` with ``r = 1 - min(decay, (1 + n) / (10
+ n))``: the first updates follow the weights closely, so the starting weights are forgotten
within a few dozen steps, and the average then spans about 1 / (1 - decay) steps. Every rank
holds the same weights after a step (ZeRO stages 0 and 1) and so the same average; it is saved
in each checkpoint (``state``) and put back on resume, so a resumed run averages exactly what
the uninterrupted one does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


class WeightAverage:
    """The running average of ``model``'s parameters (``decay`` in (0, 1))."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"train.average={decay!r} must be in (0, 1) (0 in the config: no average)")
        self.decay = float(decay)
        self.params = [p for p in model.parameters()]
        self.average = [p.detach().clone() for p in self.params]
        self.updates = 0

    def rate(self) -> float:
        """The weight of the newest weights in the next update."""
        return 1.0 - min(self.decay, (1 + self.updates) / (10 + self.updates))

    def update(self) -> None:
        """Fold in the weights of a step that was applied."""
        rate = self.rate()
        self.updates += 1
        with torch.no_grad():
            torch._foreach_lerp_(self.average, [p.detach() for p in self.params], rate)

    def _swap(self) -> None:
        with torch.no_grad():
            for p, a in zip(self.params, self.average, strict=True):
                held = p.detach().clone()
                p.copy_(a)
                a.copy_(held)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in the model for the block, the trained ones back after it
        (exactly: the two are exchanged, twice)."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    def install(self) -> None:
        """Put the averaged weights into the model for good (after the last step)."""
        with torch.no_grad():
            for p, a in zip(self.params, self.average, strict=True):
                p.copy_(a)

    def state(self) -> dict[str, Any]:
        """What a checkpoint holds of it (``client_state["average"]``)."""
        return {"updates": self.updates, "weights": [a.detach().clone() for a in self.average]}

    def load(self, state: dict[str, Any]) -> None:
        weights = state["weights"]
        shapes = [tuple(w.shape) for w in weights]
        if shapes != [tuple(a.shape) for a in self.average]:
            raise ValueError("the checkpoint's weight average does not fit this model")
        with torch.no_grad():
            for a, w in zip(self.average, weights, strict=True):
                a.copy_(w)
        self.updates = int(state["updates"])
