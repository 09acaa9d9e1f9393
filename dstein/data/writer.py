"""Write collocation and test sets to one HDF5 file, from one or several ranks.

Training points are the online sampler's, step by step (``data.points.collocation``), so a file
with ``steps`` steps read in order reproduces an online run exactly; shuffled, it is a fixed
collocation set. Ranks split the steps and the test points; each writes a part file, then
rank 0 copies the parts block by block into one file written under a temporary name and
renamed when complete. Nothing holds the whole set in memory.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import torch

import dstein
from dstein.config import Config
from dstein.data.points import collocation, point_counts
from dstein.data.schema import SCHEMA_VERSION
from dstein.faults import fault
from dstein.files import atomic_path
from dstein.noise import split_evenly
from dstein.pdes import PDE, build_pde

ROW_BYTES_PER_CHUNK = 1 << 16  # ~64 KiB chunks: a shuffled read decompresses little beyond its rows


def _chunk_rows(columns: int) -> int:
    return max(1, min(4096, ROW_BYTES_PER_CHUNK // (8 * max(1, columns))))


def _create(group: h5py.Group, name: str, rows: int, tail: tuple[int, ...]) -> h5py.Dataset:
    """A float64 dataset, chunked by rows and compressed (an empty one is left plain)."""
    if rows == 0:
        return group.create_dataset(name, shape=(0, *tail), dtype="f8")
    cols = int(np.prod(tail)) if tail else 1
    return group.create_dataset(
        name, shape=(rows, *tail), dtype="f8", chunks=(min(rows, _chunk_rows(cols)), *tail),
        compression="gzip", compression_opts=1, shuffle=True,
    )  # fmt: skip


def _halt(stop: Callable[[], bool] | None) -> None:
    """Raise KeyboardInterrupt where the caller recorded an interrupt (``stop``), between blocks.
    make_dataset's Ctrl-C handler records instead of raising: a KeyboardInterrupt raised from
    a signal handler that lands in a finalizer or weakref callback (h5py's objects, often) is
    printed and swallowed by Python, and the write went on to replace the file (exit 0, seen
    in a clean-clone run)."""
    if stop is not None and stop():
        raise KeyboardInterrupt


def _write_part(
    path: Path, pde: PDE, config: Config, steps: range, test_rows: tuple[int, int], truth_samples: int, progress: bool,
    stop: Callable[[], bool] | None = None,
) -> None:  # fmt: skip
    """This rank's share: training points of ``steps`` and the test points ``test_rows`` with
    their truth, written block by block."""
    from tqdm import tqdm

    kinds = point_counts(pde, config)
    with h5py.File(path, "w") as fh:
        dsets = {k: _create(fh, k, len(steps) * b, (pde.in_dim,)) for k, b in kinds.items()}
        for i, step in enumerate(tqdm(steps, desc="train points", disable=not progress, unit="step")):
            _halt(stop)
            for kind, batch in collocation(pde, config, step, torch.float64, torch.device("cpu")).items():
                b = kinds[kind]
                dsets[kind][i * b : (i + 1) * b] = batch.X.numpy()
        lo, hi = test_rows
        if hi <= lo:
            return
        tails = {"X": (pde.in_dim,), "u": (), "grad": (pde.dim,), "u_se": ()}
        test = {}
        rows = pde.test_block
        for start in tqdm(range(lo, hi, rows), desc="test truth", disable=not progress, unit="block"):
            _halt(stop)
            end = min(hi, start + rows)
            truth = pde.truth(pde.test_points(start, end, config.eval.seed), truth_samples, config.eval.seed)
            values = {"X": truth.X, "u": truth.u, "grad": truth.grad, "u_se": truth.u_se}
            for name, value in values.items():
                if value is None:
                    continue
                if name not in test:
                    test[name] = _create(fh, name, hi - lo, tails[name])
                test[name][start - lo : end - lo] = value.numpy()


def _root_attrs(fh: h5py.File, pde: PDE, config: Config, steps: int) -> None:
    fh.attrs.update(
        schema_version=SCHEMA_VERSION, dstein_version=dstein.__version__,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), pde=pde.name, dim=pde.dim, in_dim=pde.in_dim,
        time_dependent=pde.time_dependent, pde_params=json.dumps(pde.params(), sort_keys=True),
        sampler=f"{type(pde).__module__}.{type(pde).__name__}", seed=config.seed, steps=steps,
        batch=json.dumps(point_counts(pde, config)),
    )  # fmt: skip


def _copy_rows(
    parts: list[Path], name: str, dset: h5py.Dataset, block: int = 16384, stop: Callable[[], bool] | None = None
) -> None:
    """Concatenate dataset ``name`` of the part files into ``dset``, block by block."""
    at = 0
    for part in parts:
        with h5py.File(part, "r") as src:
            if name not in src:
                continue
            n = src[name].shape[0]
            for lo in range(0, n, block):
                _halt(stop)
                rows = src[name][lo : lo + block]
                dset[at + lo : at + lo + rows.shape[0]] = rows
            at += n


def _assemble(
    out: Path, parts: list[Path], pde: PDE, config: Config, steps: int, test_points: int, truth_samples: int,
    stop: Callable[[], bool] | None = None,
) -> None:  # fmt: skip
    kinds = point_counts(pde, config)
    with atomic_path(out) as tmp:  # a failure before the rename leaves `out` as it was
        with h5py.File(tmp, "w") as fh:
            _root_attrs(fh, pde, config, steps)
            if steps:
                train = fh.create_group("train")
                for kind, b in kinds.items():
                    dset = _create(train, kind, steps * b, (pde.in_dim,))
                    _copy_rows(parts, kind, dset, stop=stop)
                    if kind != "domain":
                        target = _create(train, f"{kind}_target", steps * b, ())
                        for lo in range(0, steps * b, 65536):
                            X = torch.from_numpy(dset[lo : lo + 65536])
                            target[lo : lo + X.shape[0]] = pde.condition_target(kind, X).numpy()
            if test_points:
                test = fh.create_group("test")
                test.attrs.update(truth_samples=truth_samples, seed=config.eval.seed)
                with h5py.File(parts[0], "r") as first:
                    names = ["X", "u", "grad"] + (["u_se"] if "u_se" in first else [])
                tails = {"X": (pde.in_dim,), "u": (), "grad": (pde.dim,), "u_se": ()}
                for name in names:
                    dset = _create(test, name, test_points, tails[name])
                    _copy_rows(parts, name, dset, stop=stop)
        fault("fail-dataset", 0)
        _halt(stop)  # the last moment before the rename: an interrupt until here leaves `out` as it was


def generate(
    config: Config,
    out: str | Path,
    *,
    steps: int,
    test_points: int,
    truth_samples: int,
    rank: int = 0,
    world_size: int = 1,
    barrier=lambda: None,
    progress: bool = False,
    stop: Callable[[], bool] | None = None,
) -> Path:
    """Write ``out``: ``steps`` steps of training points and ``test_points`` test points.
    ``stop``: whether an interrupt was recorded (checked between blocks; KeyboardInterrupt)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    p = config.pde
    pde = build_pde(p.name, p.dim, dict(p.params), p.target, p.process_share, p.process_time_power)
    parts = [out.with_name(f".{out.name}.part{r}-of-{world_size}") for r in range(world_size)]
    try:
        _write_part(
            parts[rank], pde, config, range(*split_evenly(steps, rank, world_size)),
            split_evenly(test_points, rank, world_size), truth_samples, progress and rank == 0, stop,
        )  # fmt: skip
        barrier()
        if rank == 0:
            _assemble(out, parts, pde, config, steps, test_points, truth_samples, stop)
        barrier()
    finally:
        if parts[rank].exists():
            parts[rank].unlink()
    return out
