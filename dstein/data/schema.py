"""The HDF5 collocation/test file: layout, attributes, and validation before training.

Layout (schema version 1)::

    /                  attrs: schema_version, dstein_version, created, pde, dim, in_dim,
                              time_dependent, pde_params (JSON), sampler, seed, steps,
                              batch (JSON: points per step of each kind)
    /train/<kind>      (N_kind, in_dim) float64: domain, and one per condition
                       (boundary / initial / terminal); rows in step order: step s holds
                       rows s*B_kind .. (s+1)*B_kind - 1 of the online sampler
    /train/<kind>_target  (N_kind,) condition values (conditions only)
    /test/X            (M, in_dim) float64, /test/u (M,), /test/grad (M, dim),
    /test/u_se         (M,) Monte Carlo standard error of u (estimated truths only);
                       attrs: truth, truth_samples, seed
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dstein.errors import ConfigError

SCHEMA_VERSION = 1
SUPPORTED_SCHEMAS = (1,)
ROOT_ATTRS = ("schema_version", "dstein_version", "created", "pde", "dim", "in_dim", "pde_params", "seed")


class DataFileError(ConfigError):
    """A data file that cannot be used; the message names the file, the dataset and what was expected."""


def _fail(path: Path | str, where: str, message: str) -> DataFileError:
    return DataFileError(f"data file {path}: {where}: {message}")


def open_checked(path: str | Path):
    """Open an HDF5 file read-only, turning missing/corrupt files into one clear error."""
    import h5py

    path = Path(path)
    if not path.is_file():
        return None, _fail(path, "/", "no such file")
    try:
        return h5py.File(path, "r"), None
    except OSError as err:
        first = str(err).splitlines()[0]
        return None, _fail(path, "/", f"not a readable HDF5 file (truncated or corrupted?): {first}")


def expected_columns(name: str, in_dim: int, dim: int) -> tuple[int, ...]:
    """Trailing shape of a dataset: points have in_dim columns, gradients dim, values none."""
    if name == "grad":
        return (dim,)
    if name in ("u", "u_se") or name.endswith("_target"):
        return ()
    return (in_dim,)


def _check_attrs(path, attrs, pde_name: str, dim: int, pde_params: dict[str, Any]) -> None:
    for name in ROOT_ATTRS:
        if name not in attrs:
            raise _fail(path, "/", f"missing attribute {name!r} (not a dstein data file?)")
    version = int(attrs["schema_version"])
    if version not in SUPPORTED_SCHEMAS:
        raise _fail(path, "/", f"schema_version {version} is not supported (this dstein reads {SUPPORTED_SCHEMAS})")
    if attrs["pde"] != pde_name:
        raise _fail(path, "/", f"written for PDE {attrs['pde']!r}, the config has pde.name={pde_name!r}")
    if int(attrs["dim"]) != dim:
        raise _fail(path, "/", f"written for dim {int(attrs['dim'])}, the config has pde.dim={dim}")
    stored = json.loads(attrs["pde_params"])
    if stored != pde_params:
        raise _fail(path, "/", f"written for PDE parameters {stored}, the config has {pde_params}")


def _check_values(path, where: str, dset, block_rows: int) -> None:
    import numpy as np

    try:
        for lo in range(0, dset.shape[0], block_rows):
            block = dset[lo : lo + block_rows]
            finite = np.isfinite(block).reshape(block.shape[0], -1).all(1)
            if not finite.all():
                raise _fail(path, where, f"row {lo + int(np.argmin(finite))} holds NaN or Inf")
    except OSError as err:
        first = str(err).splitlines()[0]
        raise _fail(path, where, f"cannot be read (truncated or corrupted?): {first}") from err


def validate(
    path: str | Path,
    *,
    pde_name: str,
    dim: int,
    pde_params: dict[str, Any],
    groups: dict[str, list[str]],
    check_values: bool = True,
    block_rows: int = 65536,
) -> None:
    """Check a data file against what the run needs; raise DataFileError naming the problem.

    ``groups`` maps an HDF5 group to the datasets the run will read from it.
    """
    fh, error = open_checked(path)
    if error is not None:
        raise error
    with fh:
        _check_attrs(path, fh.attrs, pde_name, dim, pde_params)
        in_dim = int(fh.attrs["in_dim"])
        for group, names in groups.items():
            if group not in fh:
                raise _fail(path, f"/{group}", "missing group")
            for name in names:
                where = f"/{group}/{name}"
                if name not in fh[group]:
                    raise _fail(path, where, "missing dataset")
                dset = fh[group][name]
                want = expected_columns(name, in_dim, dim)
                if dset.shape[0] < 1:
                    raise _fail(path, where, "has no rows")
                if tuple(dset.shape[1:]) != want:
                    expected = ", ".join(["rows", *map(str, want)])
                    raise _fail(path, where, f"has shape {dset.shape}, expected ({expected})")
                if check_values:
                    _check_values(path, where, dset, block_rows)
