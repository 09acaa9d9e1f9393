"""A trained solution as an object: ``dstein.load(run_dir)``.

    import dstein, torch
    sol = dstein.load("runs/quickstart")             # a finished run (model.pt), or checkpoint=...
    x, t = torch.zeros(4, sol.dim), torch.zeros(4)
    sol.u(x, t), sol.grad(x, t)                      # shapes (4,) and (4, d)
    sol.control(x, t)                                # HJB: the optimal feedback -mu grad u

The solution is what the run evaluated: for Stein methods the smoothed model
``E[g(x + sigma_x eps)]`` averaged over ``eval.samples`` antithetic pairs (the run's
``sigma_x``, its evaluation noise keyed by block, so the same points give the same values),
its gradient by differentiating that average; for autograd methods the network itself; with
the hard constraint ``u = A + B f``. Points go through in blocks, on the device asked for.
Loading runs no code from the files (``weights_only=True``) and leaves the caller's random
generators as they were.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dstein.build import build_model, build_pde, output_transform
from dstein.checkpoint.layout import CONFIG_FILE, MARKER, is_step_dir, scan
from dstein.checkpoint.state import safe_load
from dstein.config import Config, ConfigError, load_resolved
from dstein.evaluation import predict
from dstein.pdes import PDE

#: The final model of a finished run (``dstein.report.MODEL_FILE``).
MODEL_FILE = "model.pt"
#: DeepSpeed's file of the module's weights in a checkpoint folder (rank 0 writes it).
MODEL_STATES = "mp_rank_00_model_states.pt"


class Solution:
    """u, grad u (and a control, where the PDE defines one) of a trained run at points (x, t)."""

    def __init__(self, model: torch.nn.Module, config: Config, pde: PDE, device: torch.device, source: Path):
        self.model, self.config, self.pde, self.device, self.source = model.eval(), config, pde, device, source
        self.dtype = next(model.parameters()).dtype
        self.transform = output_transform(config, pde)

    @property
    def dim(self) -> int:
        return self.pde.dim

    @property
    def time_dependent(self) -> bool:
        return self.pde.in_dim > self.pde.dim

    def points(self, x: torch.Tensor, t: torch.Tensor | float | None = None) -> torch.Tensor:
        """The model's input rows for ``x`` (B, d) and ``t`` (B,), a number, or None (stationary)."""
        x = torch.as_tensor(x, dtype=self.dtype, device=self.device)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x has shape {tuple(x.shape)}, expected (points, {self.dim})")
        if not self.time_dependent:
            if t is not None:
                raise ValueError(f"pde {self.pde.name} is stationary: pass x alone")
            return x
        if t is None:
            raise ValueError(f"pde {self.pde.name} depends on t: pass t (a number, or one per point)")
        t = torch.as_tensor(t, dtype=self.dtype, device=self.device).reshape(-1)
        if t.numel() == 1:
            t = t.expand(x.shape[0])
        if t.shape[0] != x.shape[0]:
            raise ValueError(f"t has {t.shape[0]} values for {x.shape[0]} points")
        return torch.cat([x, t.unsqueeze(1)], 1)

    def u(self, x: torch.Tensor, t: torch.Tensor | float | None = None) -> torch.Tensor:
        u, _ = predict(self.model, self.points(x, t), self.config, transform=self.transform, gradient=False)
        return u

    __call__ = u

    def grad(self, x: torch.Tensor, t: torch.Tensor | float | None = None) -> torch.Tensor:
        """The spatial gradient (B, d)."""
        _, grad = predict(self.model, self.points(x, t), self.config, transform=self.transform)
        assert grad is not None
        return grad

    def control(self, x: torch.Tensor, t: torch.Tensor | float | None = None) -> torch.Tensor:
        """The PDE's feedback control from the gradient (``PDE.control``; HJB: -mu grad u)."""
        X = self.points(x, t)
        _, grad = predict(self.model, X, self.config, transform=self.transform)
        assert grad is not None
        control = self.pde.control(X, grad)
        if control is None:
            raise ValueError(f"pde {self.pde.name} defines no control")
        return control


def load(run_dir: str | Path, checkpoint: str | Path | None = None, device: str | torch.device = "cpu") -> Solution:
    """The trained solution of ``run_dir``: its final model, or with ``checkpoint`` a checkpoint
    folder (``"latest"``: the run's newest complete one; or a step-NNNNNNNN path). Raises
    ``ConfigError`` naming the file when something is missing or damaged."""
    run_dir = Path(run_dir)
    if checkpoint is None:
        config_file, weights = run_dir / "config.yaml", run_dir / MODEL_FILE
        if not weights.is_file():
            raise ConfigError(f"{run_dir}: no {MODEL_FILE} there (the run has not finished: pass checkpoint='latest')")
    else:
        folder = _checkpoint_folder(run_dir, checkpoint)
        config_file, weights = folder / CONFIG_FILE, folder / MODEL_STATES
    if not config_file.is_file():
        raise ConfigError(f"{config_file}: no such file (not a dstein run directory or checkpoint)")
    config = load_resolved(config_file)
    pde = build_pde(config)
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):  # building the model seeds torch: not the caller's generators
        model = build_model(config, pde, getattr(torch, config.run.dtype), device, loaded=True)
    try:
        state = safe_load(weights, map_location=device)
        state = state["module"] if checkpoint is not None else state
        model.load_state_dict(state)
    except Exception as err:  # truncated, of another model, or a pickle that would run code
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{weights} cannot be loaded ({type(err).__name__}: {first})") from err
    return Solution(model, config, pde, device, weights)


def _checkpoint_folder(run_dir: Path, checkpoint: str | Path) -> Path:
    if str(checkpoint) == "latest":
        root = run_dir / "checkpoints"
        complete, _ = scan(root) if root.is_dir() else ([], [])
        if not complete:
            raise ConfigError(f"{root}: no complete checkpoint there")
        return complete[-1]
    folder = Path(checkpoint)
    if not (is_step_dir(folder) and (folder / MARKER).is_file()):
        raise ConfigError(f"checkpoint {folder}: not a complete checkpoint folder (step-NNNNNNNN with {MARKER})")
    return folder
