"""PDEs by name, and a user's own PDE class from ``package.module:ClassName``."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from dstein.pdes.base import PDE, ControlProblem, ExactPDE, TestSet
from dstein.pdes.bsde import BSDEAllenCahn, BSDEDefaultRisk, BSDEDiffRate
from dstein.pdes.heat import Heat
from dstein.pdes.hjb import HJB
from dstein.pdes.hjb_aniso import HJBAniso
from dstein.pdes.poisson import Poisson
from dstein.pdes.twobody import AllenCahn, SineGordon

REGISTRY: dict[str, type[PDE]] = {
    cls.name: cls
    for cls in (Poisson, Heat, HJB, HJBAniso, SineGordon, AllenCahn, BSDEAllenCahn, BSDEDefaultRisk, BSDEDiffRate)
}

__all__ = ["PDE", "REGISTRY", "ControlProblem", "ExactPDE", "TestSet", "build_pde", "resolve_pde_class", "user_error"]


def resolve_pde_class(name: str, target: str | None = None) -> type[PDE]:
    """The PDE class for ``pde.target`` (an import path) if given, else ``pde.name``."""
    if target:
        module_name, _, attr = target.partition(":")
        if not module_name or not attr:
            raise ValueError(f"pde.target={target!r} must look like 'package.module:ClassName'")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name is None or not module_name.startswith(err.name):
                raise ValueError(f"pde.target={target!r}: importing {module_name} failed: {user_error(err)}") from err
            raise ValueError(f"pde.target={target!r} cannot be imported: no module named {err.name!r} on the "
                             "Python path (PYTHONPATH, or the directory the command runs in)") from err  # fmt: skip
        except Exception as err:  # the user's module: a SyntaxError or anything it raises at import
            raise ValueError(f"pde.target={target!r}: importing {module_name} failed: {user_error(err)}") from err
        try:
            cls = getattr(module, attr)
        except AttributeError as err:
            raise ValueError(f"pde.target={target!r}: module {module_name} has no {attr}") from err
        if not (isinstance(cls, type) and issubclass(cls, PDE)):
            raise ValueError(f"pde.target={target!r} is not a subclass of dstein.pdes.PDE")
        return cls
    if name not in REGISTRY:
        raise ValueError(f"pde.name={name!r} is not one of {sorted(REGISTRY)} (or set pde.target)")
    return REGISTRY[name]


def build_pde(
    name: str, dim: int, params: dict[str, Any] | None = None, target: str | None = None, process_share: float = 0.0,
    process_time_power: float = 1.0,
) -> PDE:  # fmt: skip
    """The PDE ``name`` (or a user's ``target``) with its ``params``; ``process_share`` of its
    training points along its forward process (refused where it declares none), at times
    t = T v^``process_time_power`` (refused where its ``sample_process`` takes no ``power``)."""
    pde = _construct(resolve_pde_class(name, target), name, dim, params, target)
    if process_share:
        if not pde.process_kinds:
            raise ValueError(
                f"pde.process_share={process_share}: pde {pde.name} declares no forward process from a start state "
                "(PDE.process_kinds and sample_process; hjb has one): set pde.process_share=0"
            )
        pde.process_share = float(process_share)
    if process_time_power != 1:
        if "power" not in inspect.signature(type(pde).sample_process).parameters:
            raise ValueError(
                f"pde.process_time_power={process_time_power}: {type(pde).__name__}.sample_process takes no power "
                "(the times t = T v^power of its domain points): add it, or set pde.process_time_power=1"
            )
        pde.process_time_power = float(process_time_power)
    return pde


def _construct(cls: type[PDE], name: str, dim: int, params: dict[str, Any] | None, target: str | None) -> PDE:
    try:
        return cls(dim, **(params or {}))
    except TypeError as err:
        raise ValueError(f"pde.params={dict(params or {})} do not fit {cls.__name__}: {err}") from err
    except ValueError as err:  # a built-in PDE's own check of its parameters
        if not target:
            raise
        raise ValueError(f"pde.target={target!r}: {cls.__name__}({dim}, **{dict(params or {})}) raised "
                         f"{user_error(err)}") from err  # fmt: skip
    except Exception as err:  # the user's constructor
        raise ValueError(f"pde.target={target or name!r}: {cls.__name__}({dim}, **{dict(params or {})}) raised "
                         f"{user_error(err)}") from err  # fmt: skip


def user_error(err: BaseException) -> str:
    """One line for an exception raised in a user's code: its type, first line, and where
    (file:line of the innermost frame; a SyntaxError's own file and line)."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if isinstance(err, SyntaxError) and err.filename:
        return f"SyntaxError: {err.msg} ({err.filename}:{err.lineno})"
    tb, where = err.__traceback__, ""
    while tb is not None:  # the innermost frame of real code (importlib's own frames are frozen)
        if not tb.tb_frame.f_code.co_filename.startswith("<"):
            where = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}"
        tb = tb.tb_next
    return f"{type(err).__name__}{': ' + first if first else ''}{f' ({where})' if where else ''}"
