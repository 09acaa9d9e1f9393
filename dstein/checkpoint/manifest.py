"""A checkpoint's manifest: size and SHA-256 of every file, hashed by the ranks in shares, and
what a folder's files no longer match."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from dstein.distributed import gather_objects
from dstein.noise import split_evenly

MISSING = "missing"


def _digest(file: Path) -> dict[str, Any]:
    sha = hashlib.sha256()
    with open(file, "rb") as fh:
        while block := fh.read(1 << 22):
            sha.update(block)
    return {"bytes": file.stat().st_size, "sha256": sha.hexdigest()}


def shared_digests(path: Path, names: list[str], rank: int, world: int) -> dict[str, dict[str, Any] | str]:
    """Size and SHA-256 of each file, the ranks hashing a share each (every rank calls this);
    a file that cannot be read gives the reason instead."""
    mine: dict[str, dict[str, Any] | str] = {}
    for name in names[slice(*split_evenly(len(names), rank, world))]:
        try:
            mine[name] = _digest(path / name)
        except FileNotFoundError:
            mine[name] = MISSING
        except OSError as err:
            mine[name] = err.strerror or str(err)
    merged: dict[str, dict[str, Any] | str] = {}
    for part in gather_objects(mine):
        merged.update(part)
    return merged


def manifest_problem(path: Path, digests: dict[str, Any], expected: dict[str, Any]) -> str | None:
    """What does not match the manifest (missing, truncated or changed files), or None."""
    for name, want in sorted(expected.items()):
        got = digests.get(name, MISSING)
        if isinstance(got, str):
            return f"{name} is {'missing' if got == MISSING else 'unreadable (' + got + ')'}"
        if got["bytes"] != want["bytes"]:
            return f"{name} has {got['bytes']} bytes, {want['bytes']} were written"
        if got["sha256"] != want["sha256"]:
            return f"{name} does not match its SHA-256 (changed after it was written)"
    return None
