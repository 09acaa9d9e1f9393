"""Run under N ranks: the parameter gradient of the training loss at step 0, summed over ranks.

Usage: grad_check.py CASES.json OUT_DIR. CASES.json maps a case name to ``[CONFIG,
overrides...]``; every case of one launch shares its ranks and its
``parallel.sample_group_size`` (one process group, one start of torch and DeepSpeed for
all of them), and rank 0 writes OUT_DIR/NAME.pt for each.

Uses the trainer's own pieces (points, sharded estimator, loss terms, adversarial moves) in
float64; each rank back-propagates its local loss and the shares are summed across all ranks,
which is what DeepSpeed's gradient averaging of ``world_size * L_p`` amounts to (MATH.md
section 4). Also saves rank 0's gradient of the loss with respect to its points, summed over
its sample group (what the adversarial steps take the sign of), with the row where its
points start.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dstein.build import build_estimator, build_model
from dstein.config import Config, load_config
from dstein.data.points import collocation
from dstein.distributed import DistInfo, exit_process, init_distributed, sum_values
from dstein.output_init import fit_output_bias
from dstein.pdes import build_pde
from dstein.train import adversarial_points, loss_terms, total_loss


def gradients(cfg: Config, info: DistInfo) -> dict:
    """One case: the summed parameter gradient and loss, and rank 0's point gradients."""
    pde = build_pde(cfg.pde.name, cfg.pde.dim, dict(cfg.pde.params))
    estimator = build_estimator(cfg, pde, info)
    model = build_model(cfg, pde, torch.float64, torch.device("cpu"))
    if cfg.model.output_init == "fit":  # as build_trainer does, on the first step's points
        first = collocation(pde, cfg, 0, torch.float64, torch.device("cpu"), info.point_group, info.num_point_groups)
        fit_output_bias(model, pde, estimator, first, cfg.train.condition_weight)
    points = collocation(pde, cfg, 3, torch.float64, torch.device("cpu"), info.point_group, info.num_point_groups)
    # the gradient of the loss with respect to the points, summed over the sample group, as the
    # adversarial steps use it (before its sign is taken)
    moving = {k: b.X.detach().requires_grad_(True) for k, b in points.items()}
    unbiased = cfg.train.unbiased_at(3)
    attack = loss_terms(model, pde, estimator, {k: points[k].with_points(X) for k, X in moving.items()}, 3,
                        unbiased=unbiased)  # fmt: skip
    point_grads = torch.autograd.grad(total_loss(attack, cfg.train.condition_weight), list(moving.values()))
    point_grad = {
        k: (sum_values(g, info.sample_group), points[k].start) for k, g in zip(moving, point_grads, strict=True)
    }
    if cfg.train.adversarial.steps:
        points = adversarial_points(model, pde, estimator, points, cfg, 3)
    terms = loss_terms(model, pde, estimator, points, 3, unbiased=unbiased)
    loss = total_loss(terms, cfg.train.condition_weight)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    flat = sum_values(torch.cat([g.reshape(-1) for g in grads]))
    loss_total = sum_values(loss.detach().reshape(1)) / info.sample_group_size
    return {"grad": flat, "loss": loss_total, "world": info.world_size, "point_grad": point_grad}


cases_file, out_dir = sys.argv[1:]
listed = json.loads(Path(cases_file).read_text())
cases = {name: load_config(config, overrides) for name, (config, *overrides) in listed.items()}
groups = {cfg.parallel.sample_group_size for cfg in cases.values()}
assert len(groups) == 1, f"the cases of one launch share parallel.sample_group_size, not {groups}"
info = init_distributed(groups.pop(), timeout_s=60, device="cpu")
for name, cfg in cases.items():
    result = gradients(cfg, info)
    if info.rank == 0:
        torch.save(result, Path(out_dir) / f"{name}.pt")
exit_process(0)
