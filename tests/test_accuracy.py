"""The quickstart trains to the accuracy its issues promise (minutes: marked slow).

Measured times live in docs/benchmarks.md, not here: this checks the result only, beside the
baselines every run reports (a function of t alone scores 0.112 on the test set and 0.114 along
the process, the terminal value 0.283 with gradient error 0.82).

Fewer than the quickstart's 3000 steps, held to the same targets: on the test set L2 <= 0.015
and gradient <= 0.12; u(0, 0) within 1% of its Cole-Hopf reference; along the process from the
start state a third of the best function of t and gradient <= 0.2. Measured with the
quickstart's pde.process_share=0.5 (one thread): stein-antithetic at 1500 steps L2 0.0124,
gradient 0.111, u(0, 0) 0.58% off, along the process 0.0071 / 0.112 (at 1200 steps the gradient
was 0.118, too near its target); autograd at 1000 steps 0.0094 / 0.104, 0.50%, 0.0060 / 0.090;
at 3000 steps, docs/benchmarks.md.
"""

from __future__ import annotations

import pytest

from dstein.config import load_config
from dstein.train import run

#: training steps of the test per method (the quickstart trains 3000)
STEPS = {"stein-antithetic": 1500, "autograd": 1000}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["stein-antithetic", "autograd"])
def test_quickstart_reaches_the_targets(method, root, tmp_path):
    overrides = [f"estimator.method={method}", f"run.dir={tmp_path}", f"train.steps={STEPS[method]}"]
    config = load_config(root / "configs/quickstart.yaml", overrides)
    summary = run(config)
    assert summary["l2_rel"] <= 0.015, summary
    assert summary["grad_l2_rel"] <= 0.12, summary
    assert summary["l2_rel"] < summary["baselines"]["t_only"]["l2_rel"] / 5, summary
    assert summary["start_rel_error"] <= 0.01, summary
    assert summary["process_l2_rel"] <= summary["process_baselines"]["t_only"]["l2_rel"] / 3, summary
    assert summary["process_grad_l2_rel"] <= 0.2, summary
