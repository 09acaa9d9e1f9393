"""What a checkpoint's files hold besides the weights, and how every one of them is read without
running code.

A ``.pt`` file is a pickle, and a pickle can name any callable (``os.system`` among them) to be
called while it loads; ``torch.load(weights_only=False)`` calls it. dstein reads every file of
a checkpoint, and model.pt, with ``weights_only=True``: tensors, containers and numbers, plus
the few classes the files DeepSpeed writes hold (``SAFE_GLOBALS``, each a plain record).
DeepSpeed itself loads its files with ``weights_only=False`` on purpose (DeepSpeed#6751), so
the engine's checkpoint engine is replaced by ``SafeCheckpointEngine`` (``make_loading_safe``,
called where the engine is built). A file that needs anything else is refused by torch with
an ``UnpicklingError`` before anything in it runs, and the checkpoint counts as damaged.

The RNG file of a rank holds every global generator's state in tensors and numbers (numpy's
key as an int64 tensor); files written before this format, with numpy arrays, load through
numpy's array reconstruction, which torch's own documentation lists as safe to allow.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from dstein.config import ConfigError

try:  # numpy 2 (numpy.core is a deprecated alias there)
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1
    from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]

#: The classes, besides torch's own, that DeepSpeed's files hold (ZeRO 1 and 2 optimizer
#: shards: the stage, the loss scaler's settings, the fragments' addresses), and numpy's array
#: reconstruction (RNG files of the earlier format).
SAFE_GLOBALS: list[Any] = [
    ZeroStageEnum, LossScaler, fragment_address, np.ndarray, np.dtype, np.dtypes.UInt32DType, _reconstruct,
]  # fmt: skip


def safe_load(path: str | Path, map_location: Any = None) -> Any:
    """``torch.load`` that runs no code: tensors, containers, numbers and ``SAFE_GLOBALS`` only
    (anything else raises ``pickle.UnpicklingError`` before it is called)."""
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        return torch.load(path, map_location=map_location, weights_only=True)


class SafeCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, reading its files through ``safe_load``."""

    def load(self, path: str, map_location: Any = None) -> Any:
        return safe_load(path, map_location)


def make_loading_safe(engine: Any) -> None:
    """Make a DeepSpeed engine read its checkpoints through ``safe_load`` (every load of
    ``engine.load_checkpoint`` goes through ``engine.checkpoint_engine``)."""
    current = engine.checkpoint_engine
    if type(current) is not TorchCheckpointEngine:  # another engine would unpickle with weights_only=False
        raise ConfigError(
            f"deepspeed.extra selects DeepSpeed's {type(current).__name__}: dstein reads checkpoints only through "
            "its safe torch engine (weights_only=True); remove the checkpoint-engine setting from deepspeed.extra"
        )
    engine.checkpoint_engine = SafeCheckpointEngine(engine._config)


def rng_state() -> dict[str, Any]:
    """Every global generator's state, in types ``safe_load`` reads."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    if isinstance(keys, torch.Tensor):
        keys = keys.numpy().astype(np.uint32)
    np.random.set_state((kind, keys, *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
