"""Whether a checkpoint can be continued under the current config: the settings it fixes, and
the ZeRO stage its optimizer state is laid out for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dstein.checkpoint.layout import CheckpointError
from dstein.config import Config

# Settings that define the function being trained or the layout of the saved state: a
# checkpoint written under other values cannot be continued. Everything else (steps,
# samples, logging, evaluation, ...) may change between runs; the changes are reported.
FIXED = (
    "seed", "pde.", "model.", "run.dtype", "estimator.method", "estimator.sigma_x", "estimator.sigma_t",
    "deepspeed.zero_stage", "deepspeed.optimizer", "data.train_file",
)  # fmt: skip


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and prefix + key not in ("pde.params", "deepspeed.extra"):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def check_resumable(saved: Config, config: Config, saved_world: int, world: int, path: Path) -> list[str]:
    """Refuse a checkpoint written under settings that cannot be continued; return the
    harmless changes as 'key: old -> new' lines."""
    old, new = _flat(saved.to_dict()), _flat(config.to_dict())
    changed = [k for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]
    fatal = [k for k in changed if any(k == f or (f.endswith(".") and k.startswith(f)) for f in FIXED)]
    lines = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed]
    if fatal:
        what = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in fatal)
        raise CheckpointError(
            f"checkpoint {path} was written with other settings that it cannot continue under ({what}); "
            "restore them, or start a new run with checkpoint.resume=never in another run.dir"
        )
    if saved_world != world and config.deepspeed.zero_stage > 0:
        raise CheckpointError(
            f"checkpoint {path} was written by {saved_world} ranks with deepspeed.zero_stage="
            f"{config.deepspeed.zero_stage}: ZeRO optimizer shards load only on the world size that wrote "
            f"them (now {world}); resume with {saved_world} ranks (ZeRO 0 checkpoints load on any world size)"
        )
    return lines


def check_stage(marker: dict[str, Any], saved: Config, config: Config, world: int, path: Path) -> None:
    """Refuse a checkpoint whose optimizer state is laid out for another ZeRO stage than the
    engine now runs (the stage is the configured one, or 0 on one rank: DeepSpeedConfig.stage_on).
    Markers without a ``zero_stage`` were written when one rank ran the configured stage."""
    if int(marker["world_size"]) != world:
        return  # check_resumable decides
    saved_stage = int(marker.get("zero_stage", saved.deepspeed.zero_stage))
    stage = config.deepspeed.stage_on(world)
    if saved_stage != stage:
        raise CheckpointError(
            f"checkpoint {path} holds optimizer state of ZeRO stage {saved_stage}, and this run's engine would "
            f"run stage {stage} (deepspeed.zero_stage={config.deepspeed.zero_stage} on {world} "
            f"rank{'s' if world != 1 else ''}; one rank runs stage 0, there being nothing to partition): "
            f"continue it with +deepspeed.extra.zero_optimization.stage={saved_stage}"
        )
