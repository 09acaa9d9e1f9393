"""Counter-based, world-size-invariant Gaussian noise.

Every Monte Carlo sample belongs to a fixed-size *chunk*. The noise of a chunk is drawn from
a generator seeded by ``(seed, step, stream, chunk index)`` alone, so the same chunk holds
the same numbers whichever rank evaluates it and however many ranks there are (MATH.md
section 4). A rank only decides *which* chunks it evaluates; it never re-draws them.

Streams separate independent uses within one step (domain points, each condition, the
evaluation passes), so that adding a condition does not shift the noise of another.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


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
    gen = torch.Generator(device=device)
    gen.manual_seed(counter_seed(seed, step, stream, chunk))
    return gen


def sample_chunk(
    seed: int,
    step: int,
    stream: int,
    chunk: int,
    shape: tuple[int, ...],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Standard normal noise of one chunk; identical for identical counters and shape."""
    device = torch.device(device)
    gen = chunk_generator(seed, step, stream, chunk, device)
    return torch.randn(shape, generator=gen, dtype=dtype, device=device)


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


def deal_chunks(num_chunks: int, rank: int, world: int) -> range:
    """The contiguous range of chunk indices that ``rank`` of a sample group of ``world`` evaluates.

    Chunks are dealt as evenly as possible; every rank must get at least one chunk.
    """
    if world > num_chunks:
        raise ValueError(
            f"{num_chunks} noise chunks cannot be dealt to {world} ranks: each rank of a sample "
            "group needs at least one chunk (lower estimator.chunk or raise estimator.samples)"
        )
    return range(*split_evenly(num_chunks, rank, world))
