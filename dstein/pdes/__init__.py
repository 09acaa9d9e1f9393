"""PDEs by name, and a user's own PDE class from ``package.module:ClassName``."""

from __future__ import annotations

import importlib
from typing import Any

from dstein.pdes.base import PDE, ExactPDE, TestSet
from dstein.pdes.heat import Heat
from dstein.pdes.hjb import HJB
from dstein.pdes.poisson import Poisson
from dstein.pdes.twobody import AllenCahn, SineGordon

REGISTRY: dict[str, type[PDE]] = {cls.name: cls for cls in (Poisson, Heat, HJB, SineGordon, AllenCahn)}

__all__ = ["PDE", "REGISTRY", "ExactPDE", "TestSet", "build_pde", "resolve_pde_class"]


def resolve_pde_class(name: str, target: str | None = None) -> type[PDE]:
    """The PDE class for ``pde.target`` (an import path) if given, else ``pde.name``."""
    if target:
        module_name, _, attr = target.partition(":")
        if not module_name or not attr:
            raise ValueError(f"pde.target={target!r} must look like 'package.module:ClassName'")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"pde.target={target!r} cannot be imported: {err}") from err
        if not (isinstance(cls, type) and issubclass(cls, PDE)):
            raise ValueError(f"pde.target={target!r} is not a subclass of dstein.pdes.PDE")
        return cls
    if name not in REGISTRY:
        raise ValueError(f"pde.name={name!r} is not one of {sorted(REGISTRY)} (or set pde.target)")
    return REGISTRY[name]


def build_pde(name: str, dim: int, params: dict[str, Any] | None = None, target: str | None = None) -> PDE:
    cls = resolve_pde_class(name, target)
    try:
        return cls(dim, **(params or {}))
    except TypeError as err:
        raise ValueError(f"pde.params={dict(params or {})} do not fit {cls.__name__}: {err}") from err
