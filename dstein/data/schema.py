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

import numpy as np

from dstein.errors import ConfigError

SCHEMA_VERSION = 1
SUPPORTED_SCHEMAS = (1,)
ROOT_ATTRS = ("schema_version", "dstein_version", "created", "pde", "dim", "in_dim", "pde_params", "seed")


#: Datasets read when present, and then checked like the required ones.
OPTIONAL = {"test": ("u_se",)}


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


def _attr(path, attrs, name: str, kind: type, what: str) -> Any:
    """Root attribute ``name`` as ``kind`` (int, str, or dict from JSON), or one DataFileError."""
    value = attrs[name]
    try:
        if kind is dict:
            text = value.decode() if isinstance(value, bytes) else value
            if not isinstance(text, str):
                raise TypeError(f"a {type(value).__name__}")
            out = json.loads(text)
            if not isinstance(out, dict):
                raise TypeError(f"JSON of a {type(out).__name__}")
            return out
        if kind is str:
            out = value.decode() if isinstance(value, bytes) else value
            if not isinstance(out, str):
                raise TypeError(f"a {type(value).__name__}")
            return out
        if isinstance(value, (str, bytes, float)) and not float(value).is_integer():
            raise TypeError(f"{value!r}")
        return int(value)
    except (TypeError, ValueError, UnicodeDecodeError) as err:
        raise _fail(path, "/", f"attribute {name!r} is not {what} ({_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _check_attrs(path, attrs, pde_name: str, dim: int, pde_params: dict[str, Any]) -> None:
    for name in ROOT_ATTRS:
        if name not in attrs:
            raise _fail(path, "/", f"missing attribute {name!r} (not a dstein data file?)")
    version = _attr(path, attrs, "schema_version", int, "an integer")
    if version not in SUPPORTED_SCHEMAS:
        raise _fail(path, "/", f"schema_version {version} is not supported (this dstein reads {SUPPORTED_SCHEMAS})")
    pde = _attr(path, attrs, "pde", str, "a PDE name")
    if pde != pde_name:
        raise _fail(path, "/", f"written for PDE {pde!r}, the config has pde.name={pde_name!r}")
    stored_dim = _attr(path, attrs, "dim", int, "an integer")
    if stored_dim != dim:
        raise _fail(path, "/", f"written for dim {stored_dim}, the config has pde.dim={dim}")
    _attr(path, attrs, "in_dim", int, "an integer")
    stored = _attr(path, attrs, "pde_params", dict, "a JSON object of the PDE's parameters")
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
    in_dim: int | None = None,
    check_values: bool = True,
    block_rows: int = 65536,
) -> None:
    """Check a data file against what the run needs; raise DataFileError naming the problem.

    ``groups`` maps an HDF5 group to the datasets the run will read from it.
    """
    import h5py

    fh, error = open_checked(path)
    if error is not None:
        raise error
    with fh:
        _check_attrs(path, fh.attrs, pde_name, dim, pde_params)
        stored_in_dim = int(fh.attrs["in_dim"])
        if in_dim is not None and stored_in_dim != in_dim:
            raise _fail(path, "/", f"attribute 'in_dim' is {stored_in_dim}, the PDE's points have {in_dim} columns")
        in_dim = stored_in_dim
        for group, names in groups.items():
            if group not in fh:
                raise _fail(path, f"/{group}", "missing group")
            if not isinstance(fh[group], h5py.Group):
                raise _fail(path, f"/{group}", f"is a {type(fh[group]).__name__.lower()}, expected a group")
            rows: dict[str, int] = {}
            optional = [n for n in OPTIONAL.get(group, ()) if n in fh[group] and n not in names]
            for name in [*names, *optional]:
                where = f"/{group}/{name}"
                dset = _dataset(path, fh, group, name)
                want = expected_columns(name, in_dim, dim)
                if dset.dtype != np.float64:
                    raise _fail(path, where, f"holds {_kind(dset.dtype)}, expected float64 numbers (the schema's)")
                if dset.ndim < 1 or dset.shape[0] < 1:
                    raise _fail(path, where, "has no rows")
                if tuple(dset.shape[1:]) != want:
                    expected = ", ".join(["rows", *map(str, want)])
                    raise _fail(path, where, f"has shape {dset.shape}, expected ({expected})")
                rows[name] = dset.shape[0]
                if check_values:
                    _check_values(path, where, dset, block_rows)
            for name, n in rows.items():  # values and gradients belong to the points row by row
                owner = "X" if group == "test" else name.removesuffix("_target")
                if owner != name and owner in rows and n != rows[owner]:
                    raise _fail(path, f"/{group}/{name}", f"has {n} rows, /{group}/{owner} has {rows[owner]}: "
                                "each row belongs to the point in the same row")  # fmt: skip


def _dataset(path, fh, group: str, name: str):
    """``/group/name`` as a dataset, or one DataFileError (missing, not a dataset, or a link
    that cannot be followed: an external link to a missing file, a dangling soft link)."""
    import h5py

    where = f"/{group}/{name}"
    link = fh[group].get(name, getlink=True)
    if link is None:
        raise _fail(path, where, "missing dataset")
    try:
        dset = fh[group][name]
    except (KeyError, OSError) as err:
        target = ""
        if isinstance(link, h5py.ExternalLink):
            target = f" (an external link to {link.filename}:{link.path})"
        elif isinstance(link, h5py.SoftLink):
            target = f" (a soft link to {link.path})"
        raise _fail(path, where, f"cannot be opened{target}: {_first_line(err)}") from None
    if not isinstance(dset, h5py.Dataset):
        raise _fail(path, where, f"is a {type(dset).__name__.lower()}, expected a dataset")
    return dset


def _kind(dtype) -> str:
    if dtype.kind in "SUO":
        return "strings"
    return f"{dtype} values"
