"""Read training batches and test sets from an HDF5 file written by ``dstein.data.writer``.

The file is opened lazily, in the process that reads (a handle opened before a fork reads
garbage). A batch is a pure function of the step: the step's positions ``step * B ... + B``
in an endless sequence of epochs, each epoch a permutation of the rows drawn from ``(seed,
epoch, kind)`` (or the identity when not shuffled). A point group reads only its slice of
each batch, as one hyperslab read of sorted rows.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import torch

from dstein.noise import Streams, counter_seed, split_evenly
from dstein.pdes import TestSet


class H5Collocation:
    """Batches of training points for one point group."""

    def __init__(
        self, path: str | Path, batch: dict[str, int], seed: int, shuffle: bool = True, part: int = 0, parts: int = 1
    ):
        self.path, self.batch, self.seed, self.shuffle = Path(path), dict(batch), seed, shuffle
        self.part, self.parts = part, parts
        self._fh: h5py.File | None = None
        self._perms: dict[tuple[str, int], np.ndarray] = {}
        self._rows: dict[str, int] | None = None

    def _file(self) -> h5py.File:
        if self._fh is None:
            self._fh = h5py.File(self.path, "r")
            self._rows = {kind: self._fh["train"][kind].shape[0] for kind in self.batch}
        return self._fh

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def rows(self, kind: str) -> int:
        self._file()
        assert self._rows is not None
        return self._rows[kind]

    def permutation(self, kind: str, epoch: int) -> np.ndarray:
        key = (kind, epoch)
        if key not in self._perms:
            n = self.rows(kind)
            if self.shuffle:
                kind_id = sorted(self.batch).index(kind)
                rng = np.random.default_rng(counter_seed(self.seed, epoch, kind_id, Streams.DATA_SHUFFLE))
                self._perms = {k: v for k, v in self._perms.items() if k[1] >= epoch - 1}  # keep a few
                self._perms[key] = rng.permutation(n)
            else:
                self._perms[key] = np.arange(n)
        return self._perms[key]

    def cursor(self, step: int) -> dict[str, int]:
        """Where the domain set stands at the start of ``step``: epoch and position in it."""
        at = step * self.batch["domain"]
        n = self.rows("domain")
        return {"epoch": at // n, "position": at % n}

    def indices(self, kind: str, step: int) -> tuple[np.ndarray, int, int]:
        """File rows of this point group's slice of the step's batch, its start and the batch size."""
        b = self.batch[kind]
        start, stop = split_evenly(b, self.part, self.parts)
        positions = step * b + np.arange(start, stop)
        n = self.rows(kind)
        epochs, within = np.divmod(positions, n)
        rows = np.empty(len(positions), dtype=np.int64)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            rows[mask] = self.permutation(kind, int(epoch))[within[mask]]
        return rows, start, b

    def read(self, kind: str, step: int) -> tuple[np.ndarray, int, int]:
        rows, start, b = self.indices(kind, step)
        unique, inverse = np.unique(rows, return_inverse=True)
        block = self._file()["train"][kind][unique]  # h5py reads increasing row lists
        return block[inverse], start, b


def read_test_set(path: str | Path, limit: int | None = None) -> TestSet:
    with h5py.File(path, "r") as fh:
        test = fh["test"]
        n = test["X"].shape[0] if limit is None else min(limit, test["X"].shape[0])
        u_se = torch.from_numpy(test["u_se"][:n]) if "u_se" in test else None
        return TestSet(
            X=torch.from_numpy(test["X"][:n]), u=torch.from_numpy(test["u"][:n]),
            grad=torch.from_numpy(test["grad"][:n]), u_se=u_se,
        )  # fmt: skip
