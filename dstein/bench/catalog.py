"""What the benchmark suites choose from, apart from their code (the command line lists these
without importing torch): the methods compared, the configs trained for accuracy, dstein's
methods on the peers' problems, the configs of the step's fixed cost."""

from __future__ import annotations

METHODS = ("autograd", "hutchinson", "stein-antithetic", "stein-subspace")
HUTCHINSON_PROBES = 64

ACCURACY_CONFIGS = ("quickstart", "hjb_100", "hjb_250")

#: dstein's methods on the peers' two-body problems (--suite peers): the config as it ships,
#: then the other estimators at equal points and steps; hutchinson's probes are the nearest
#: thing dstein has to STDE's sampled dimensions (16).
PEER_METHODS = {
    "config": [],
    "stein-subspace-32": ["estimator.method=stein-subspace", "estimator.samples=32"],
    "stein-antithetic": ["estimator.method=stein-antithetic", "estimator.samples=8"],
    "hutchinson-16": ["estimator.method=hutchinson", "estimator.samples=16"],
}

#: The step's fixed cost and the peers' small problems (issue 29): configs/sine_gordon_1k.yaml
#: with almost no arithmetic (d = 4, width 16, 4 + 2 points), the same config at d = 100 and
#: d = 1000 as it ships (STDE's two-body Sine-Gordon; its A100 table: 1834 and 1559 steps/s),
#: and the quickstart as it ships.
FLOOR = {
    "fixed-cost": ("configs/sine_gordon_1k.yaml",
                   ["pde.dim=4", "model.width=16", "train.domain_points=4", "train.condition_points=2"]),
    "sine_gordon/d=100": ("configs/sine_gordon_1k.yaml", ["pde.dim=100"]),
    "sine_gordon/d=1000": ("configs/sine_gordon_1k.yaml", []),
    "quickstart": ("configs/quickstart.yaml", []),
}  # fmt: skip
