"""Where a checkpoint lives and when it counts: the folder names, the commit marker, the
files a manifest covers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dstein.config import ConfigError

MARKER = "COMMITTED"
MANIFEST = "MANIFEST.json"
DAMAGED = ".damaged"
PREFIX = "step-"
RNG_DIR = "rng"
CONFIG_FILE = "config.yaml"


class CheckpointError(ConfigError):
    """A checkpoint cannot be used as asked; the message says which and why."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:08d}"


def is_step_dir(path: Path) -> bool:
    return path.name.startswith(PREFIX) and path.name[len(PREFIX) :].isdigit()


def step_of(path: Path) -> int:
    """The step of a checkpoint folder (``is_step_dir``)."""
    return int(path.name[len(PREFIX) :])


def scan(root: Path) -> tuple[list[Path], list[Path]]:
    """Complete and incomplete checkpoint folders under ``root``, oldest first."""
    found = sorted((p for p in root.glob(PREFIX + "*") if p.is_dir() and is_step_dir(p)), key=step_of)
    complete = [p for p in found if (p / MARKER).is_file()]
    return complete, [p for p in found if not (p / MARKER).is_file()]


def read_marker(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / MARKER).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path}: unreadable {MARKER} marker ({err})") from err


def files_of(path: Path) -> list[str]:
    """The files of a checkpoint folder that its manifest covers (relative, sorted)."""
    skip = {MARKER, MANIFEST}
    files = (p for p in path.rglob("*") if p.is_file() and p.name not in skip and not p.name.startswith("."))
    return sorted(str(p.relative_to(path)) for p in files)
