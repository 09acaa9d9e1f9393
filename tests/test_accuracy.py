"""The quickstart trains to the accuracy the accuracy issue promises (minutes: marked slow).

Measured times live in docs/benchmarks.md, not here: this checks the result only, beside the
baselines every run reports (a function of t alone scores 0.112 here, the terminal value 0.283
with gradient error 0.82).

Fewer than the quickstart's 3000 steps, held to the same targets: the methods reach them in
a part of the budget (measured: stein-antithetic at 1200 steps L2 0.0077, gradient 0.075, at
1500 0.0089 and 0.070; autograd at 1000 steps 0.0079 and 0.074; at 3000: 0.0044 and 0.048,
docs/benchmarks.md), so
the test demands more of them for less time.
"""

from __future__ import annotations

import pytest

from dstein.config import load_config
from dstein.train import run

#: training steps of the test per method (the quickstart trains 3000)
STEPS = {"stein-antithetic": 1200, "autograd": 1000}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["stein-antithetic", "autograd"])
def test_quickstart_reaches_the_targets(method, root, tmp_path):
    overrides = [f"estimator.method={method}", f"run.dir={tmp_path}", f"train.steps={STEPS[method]}"]
    config = load_config(root / "configs/quickstart.yaml", overrides)
    summary = run(config)
    assert summary["l2_rel"] <= 0.015, summary
    assert summary["grad_l2_rel"] <= 0.12, summary
    assert summary["l2_rel"] < summary["baselines"]["t_only"]["l2_rel"] / 5, summary
