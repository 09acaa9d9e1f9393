"""Counter-based, world-size-invariant Gaussian noise.

Every Monte Carlo sample belongs to a fixed-size *chunk*. The noise of a chunk is drawn from
a generator seeded by ``(seed, step, stream, chunk index)`` alone, so the same chunk holds
the same numbers whichever rank evaluates it and however many ranks there are (MATH.md
section 4). A rank only decides *which* chunks it evaluates; it never re-draws them.

Streams separate independent uses within one step (domain points, each condition, the
evaluation passes), so that adding a condition does not shift the noise of another. Every
random draw of dstein is keyed by counters that name its use; ``Streams`` is the one list
of them.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


class Streams:
    """The counters that name each random draw (changing one changes every run's numbers).

    Noise of the estimators, ``counter_seed(seed, step, stream, chunk)``:
    ``DOMAIN`` (the residual's points), ``CONDITION + k`` (condition set k), ``ATTACK + 10 j
    + (0: domain, 1 + k: condition k)`` (adversarial step j); the evaluation's noise is
    ``counter_seed(seed, EVAL, block)``, the residual histogram's estimates use
    ``RESIDUAL`` as their stream and the test block as their step. Other draws:
    ``POINTS`` (training points, ``counter_seed(seed, step, POINTS)``), ``MODEL_INIT``
    (initial weights, ``counter_seed(seed, MODEL_INIT)``), ``TEST_POINTS`` (block k of the
    test points, ``counter_seed(seed, k, TEST_POINTS)``), ``HUTCHINSON`` (the probes,
    ``counter_seed(seed, step, stream, HUTCHINSON)``), ``FEATURE_STATS`` (the training points
    that standardize the radial family's feature), ``DATA_SHUFFLE`` (an HDF5 file's
    epoch permutation), ``COLE_HOPF`` (the HJB truth's Monte Carlo, a NumPy seed),
    ``PROCESS_TEST`` (block k of the test points along the forward process, like TEST_POINTS)
    ``CONTROL`` (the closed-loop simulation's Brownian increments, ``counter_seed(seed,
    CONTROL)``) and ``START_BASELINES`` (block k of the Monte Carlo of a start state's
    baselines, ``counter_seed(0, k, START_BASELINES)``) and ``CONSISTENCY`` (the states of the
    Feynman-Kac consistency check, ``counter_seed(seed, CONSISTENCY, k)``: k = 0 along the
    process, k >= 1 the chunks of terminal states).
    """

    DOMAIN = 0
    CONDITION = 1
    ATTACK = 100
    EVAL = 1_000_000
    RESIDUAL = 2_000_000
    POINTS = 7
    MODEL_INIT = 0x4D4F44454C
    TEST_POINTS = 0x54455354
    HUTCHINSON = 0x48555443
    FEATURE_STATS = 0x46454154
    DATA_SHUFFLE = 0x4835
    COLE_HOPF = 0x484A42
    PROCESS_TEST = 0x50524F43
    CONTROL = 0x434F4E54
    START_BASELINES = 0x53544152
    CONSISTENCY = 0x434F4E53

    @classmethod
    def condition(cls, k: int) -> int:
        return cls.CONDITION + k

    @classmethod
    def attack(cls, step: int) -> int:
        """The base stream of adversarial step ``step`` (add DOMAIN or CONDITION + k)."""
        return cls.ATTACK + 10 * step


def _splitmix64(x: int) -> int:
    """One round of SplitMix64: a bijective scrambler of 64-bit integers."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def counter_seed(*counters: int) -> int:
    """Mix integer counters into one 63-bit seed (distinct tuples give unrelated seeds)."""
    h = 0x2545F4914F6CDD1D
    for c in counters:
        h = _splitmix64(h ^ (int(c) & _MASK64))
    return h & ((1 << 63) - 1)


def chunk_generator(seed: int, step: int, stream: int, chunk: int, device: torch.device) -> torch.Generator:
    """The generator of one noise chunk: its standard normal ``z`` are drawn first, then any
    other noise of its samples (``Space.draw_aux``); identical for identical counters."""
    gen = torch.Generator(device=device)
    gen.manual_seed(counter_seed(seed, step, stream, chunk))
    return gen


def num_chunks(samples: int, chunk: int) -> int:
    """Number of chunks for ``samples`` split into chunks of ``chunk``; both must divide."""
    if chunk <= 0 or samples <= 0 or samples % chunk:
        raise ValueError(
            f"estimator.samples={samples} must be a positive whole number of chunks of estimator.chunk={chunk}"
        )
    return samples // chunk


def default_chunk(samples: int, paired: bool = False, limit: int = 256, min_chunks: int = 4) -> int:
    """The chunk size used when none is configured.

    The largest whole number of terms (samples, or pairs when ``paired``) dividing the
    total that keeps a chunk at most ``limit`` samples and, where possible, makes at least
    ``min_chunks`` chunks, so that a few ranks can share the samples without reconfiguring.
    """
    unit = 2 if paired else 1
    terms = max(1, samples // unit)
    cap = max(1, min(limit // unit, terms // min_chunks))
    best = max(c for c in range(1, cap + 1) if terms % c == 0)
    return best * unit


def split_evenly(n: int, part: int, parts: int) -> tuple[int, int]:
    """Items ``start:stop`` of ``n`` for ``part`` of ``parts``; sizes differ by at most one."""
    base, extra = divmod(n, parts)
    start = part * base + min(part, extra)
    return start, start + base + (1 if part < extra else 0)
