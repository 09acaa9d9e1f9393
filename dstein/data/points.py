"""The training points of a step, as data: from the online sampler or an HDF5 file.

``collocation`` is the online sampler: every set of a step (``domain`` and one per
condition) from ``(seed, step)`` alone, so a resumed or re-sharded run sees the same points.
Every rank draws the full batch and keeps its point group's rows (a ``Batch``). The HDF5
writer stores exactly these points, step by step; ``PointStream`` reads a step from the file
when the run has one, else from the sampler.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dstein.config import Config
from dstein.data.reader import H5Collocation
from dstein.noise import Streams, counter_seed, split_evenly
from dstein.pdes import PDE

# Training points are drawn in float32 (the training precision), then converted where a
# caller wants another type (the HDF5 writer stores them as float64, same values): drawing
# 10^7 normals in float64 costs four times as much (250 vs 60 ms, HJB d = 100,000, 100 points).
POINTS_DTYPE = torch.float32


@dataclass(frozen=True)
class Batch:
    """This point group's rows of one kind of points: ``X[start:start+len]`` of ``total``."""

    X: torch.Tensor
    start: int
    total: int

    @property
    def rows(self) -> tuple[int, int]:
        return (self.start, self.total)

    def with_points(self, X: torch.Tensor) -> Batch:
        return Batch(X, self.start, self.total)


def point_counts(pde: PDE, config: Config) -> dict[str, int]:
    """Points per step of each kind the configured losses use (a condition that the hard
    constraint makes hold exactly has none)."""
    return pde.point_counts(config.train.domain_points, config.train.condition_points, config.model.hard_constraint)


def collocation(
    pde: PDE, config: Config, step: int, dtype: torch.dtype, device: torch.device, part: int = 0, parts: int = 1
) -> dict[str, Batch]:
    """The step's points (``domain`` and one set per condition) from ``(seed, step)`` alone;
    point group ``part`` of ``parts`` keeps its rows of each set."""
    gen = torch.Generator().manual_seed(counter_seed(config.seed, step, Streams.POINTS))
    counts = point_counts(pde, config)
    points = {kind: pde.training_points(kind, n, gen, POINTS_DTYPE) for kind, n in counts.items()}
    out = {}
    for kind, X in points.items():
        start, stop = split_evenly(X.shape[0], part, parts)
        out[kind] = Batch(X[start:stop].to(device=device, dtype=dtype), start, X.shape[0])
    return out


@dataclass
class PointStream:
    """A point group's training points, step by step: from ``reader`` (an HDF5 file) when
    there is one, else from the online sampler."""

    pde: PDE
    config: Config
    dtype: torch.dtype
    device: torch.device
    part: int = 0
    parts: int = 1
    reader: H5Collocation | None = None

    def __call__(self, step: int) -> dict[str, Batch]:
        if self.reader is None:
            return collocation(self.pde, self.config, step, self.dtype, self.device, self.part, self.parts)
        out = {}
        for kind in self.reader.batch:
            X, start, total = self.reader.read(kind, step)
            out[kind] = Batch(torch.from_numpy(X).to(device=self.device, dtype=self.dtype), start, total)
        return out
