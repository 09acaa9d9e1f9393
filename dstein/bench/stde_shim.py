"""Run STDE's two-body Sine-Gordon script (sail-sg/stde ``sine_gordon.py``) with dstein's
coefficients, timing its training loop: the floor suite's STDE column.

    STDE_PYTHON dstein/bench/stde_shim.py COEFFS.npy TIMES.json SCRIPT [SCRIPT'S OPTIONS]

STDE draws its coefficients unseeded (``np.random.randn(1, dim)``, the last one unused): its
first draw of that shape returns dstein's ``c_1 .. c_{d-1}`` (``pde.params.coeff_seed``) and
a zero, so both solve the same PDE. Its training loop is the tqdm loop of ``--epochs`` steps:
the time of each step is recorded and written to TIMES.json. Runs under STDE's interpreter
(jax, haiku, optax): this file imports only numpy, tqdm and the standard library.
"""

from __future__ import annotations

import json
import runpy
import sys
import time

import numpy as np
import tqdm


def main(argv: list[str]) -> None:
    coeffs_file, times_file, script, *options = argv
    coeffs = np.load(coeffs_file)
    dim = len(coeffs) + 1
    draw = np.random.randn

    def randn(*shape: int) -> np.ndarray:
        if shape == (1, dim):
            return np.concatenate([coeffs, [0.0]])[None, :]
        return draw(*shape)

    np.random.randn = randn  # type: ignore[assignment]
    epochs = int(options[options.index("--epochs") + 1])
    stamps: list[float] = []

    class Timed(tqdm.tqdm):
        def __iter__(self):
            for item in super().__iter__():
                yield item
                if self.total == epochs:
                    stamps.append(time.perf_counter())  # the end of a training step

    tqdm.tqdm = Timed  # type: ignore[misc]  # STDE's `from tqdm import tqdm` takes this one
    sys.argv = [script, *options]
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        with open(times_file, "w") as fh:
            json.dump({"step_ends": stamps}, fh)


if __name__ == "__main__":
    main(sys.argv[1:])
