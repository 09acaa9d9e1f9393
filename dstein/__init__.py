"""dstein: physics-informed neural networks trained with Stein derivative estimators.

Importing the package itself loads nothing heavy (torch comes with the modules that need
it), so that an entry point can install its signal handlers first (``dstein.early``)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: name -> (module, attribute or None for the module itself), imported on first use
_LAZY = {
    "models": ("dstein.models", None),
    "pdes": ("dstein.pdes", None),
    "METHODS": ("dstein.estimators", "METHODS"),
    "Derivatives": ("dstein.estimators", "Derivatives"),
    "estimate": ("dstein.estimators", "estimate"),
    "load": ("dstein.solution", "load"),
    "Solution": ("dstein.solution", "Solution"),
}

if TYPE_CHECKING:
    from dstein import models, pdes
    from dstein.estimators import METHODS, Derivatives, estimate


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'dstein' has no attribute {name!r}")
    module, attribute = _LAZY[name]
    value = importlib.import_module(module)
    return value if attribute is None else getattr(value, attribute)


__all__ = ["METHODS", "Derivatives", "Solution", "__version__", "estimate", "load", "models", "pdes"]
