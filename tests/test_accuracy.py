"""The quickstart trains to the accuracy the accuracy issue promises (minutes: marked slow).

Measured times live in docs/benchmarks.md, not here: this checks the result only, beside the
baselines every run reports (a function of t alone scores 0.112 here, the terminal value 0.283
with gradient error 0.82).

Half the quickstart's steps (1500 of 3000), held to the same targets: the method reaches them
in half its budget (measured at 1500 steps: L2 0.0089, gradient 0.070 with stein-antithetic;
0.0061 and 0.056 with autograd; at 3000: 0.0044 and 0.048, docs/benchmarks.md), so the test
demands more of it for half the time.
"""

from __future__ import annotations

import pytest

from dstein.config import load_config
from dstein.train import run

#: training steps of the test (the quickstart's 3000 halved)
STEPS = 1500


@pytest.mark.slow
@pytest.mark.parametrize("method", ["stein-antithetic", "autograd"])
def test_quickstart_reaches_the_targets(method, root, tmp_path):
    overrides = [f"estimator.method={method}", f"run.dir={tmp_path}", f"train.steps={STEPS}"]
    config = load_config(root / "configs/quickstart.yaml", overrides)
    summary = run(config)
    assert summary["l2_rel"] <= 0.015, summary
    assert summary["grad_l2_rel"] <= 0.12, summary
    assert summary["l2_rel"] < summary["baselines"]["t_only"]["l2_rel"] / 5, summary
