"""HDF5 collocation and test sets: round trip, sharded reads, training from a file, bad files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from distributed_utils import run_command, spawn_ranks, wait_all

from dstein.config import load_config
from dstein.data import DataFileError, H5Collocation, generate, read_test_set, validate
from dstein.data.points import collocation
from dstein.metrics import read_metrics
from dstein.pdes import build_pde
from dstein.train import run

SMALL = [
    "train.steps=4", "train.log_every=1", "eval.every=2", "eval.points=10", "eval.samples=8",
    "eval.truth_samples=500", "estimator.samples=16", "train.domain_points=6", "train.condition_points=5",
    "model.width=16", "model.depth=2",
    "model.hard_constraint=false",  # files with condition points: the terminal condition as a loss
    "pde.process_share=0",  # the points of the PDE's own sampler (test_a_file_records_its_process_share)
]  # fmt: skip


@pytest.fixture
def config(root, tmp_path):
    return load_config(root / "configs/quickstart.yaml", [*SMALL, f"run.dir={tmp_path / 'run'}"])


@pytest.fixture
def datafile(config, tmp_path):
    return generate(config, tmp_path / "set.h5", steps=4, test_points=10, truth_samples=500)


def test_round_trip_points_attributes_and_truth(config, datafile):
    pde = build_pde("hjb", 10, {"mu": 1.0, "T": 1.0})
    with h5py.File(datafile) as fh:
        attrs = dict(fh.attrs)
        assert attrs["pde"] == "hjb" and attrs["dim"] == 10 and attrs["in_dim"] == 11 and attrs["schema_version"] == 1
        assert json.loads(attrs["pde_params"]) == {"mu": 1.0, "T": 1.0} and attrs["seed"] == 0
        assert json.loads(attrs["batch"]) == {"domain": 6, "terminal": 5} and attrs["steps"] == 4
        for step in range(4):
            online = collocation(pde, config, step, torch.float64, torch.device("cpu"))
            assert np.array_equal(fh["train/domain"][step * 6 : (step + 1) * 6], online["domain"].X.numpy())
            assert np.array_equal(fh["train/terminal"][step * 5 : (step + 1) * 5], online["terminal"].X.numpy())
        assert fh["train/domain"].compression == "gzip" and fh["train/domain"].chunks is not None
        assert fh["test"].attrs["truth_samples"] == 500
    test = read_test_set(datafile)
    expected = pde.test_set(10, config.eval.seed, 500)
    for name in ("X", "u", "grad", "u_se"):
        assert torch.equal(getattr(test, name), getattr(expected, name)), name


def test_a_file_records_its_process_share(root, tmp_path):
    """Points drawn with pde.process_share: the file holds them (the online sampler's, step by
    step) and its stored parameters say so, so a config without the share refuses the file."""
    config = load_config(root / "configs/quickstart.yaml", [*SMALL, "pde.process_share=0.5"])
    path = generate(config, tmp_path / "along.h5", steps=2, test_points=4, truth_samples=100)
    pde = build_pde("hjb", 10, {"mu": 1.0, "T": 1.0}, process_share=0.5)
    with h5py.File(path) as fh:
        assert json.loads(fh.attrs["pde_params"]) == {"mu": 1.0, "T": 1.0, "process_share": 0.5}
        online = collocation(pde, config, 1, torch.float64, torch.device("cpu"))
        assert np.array_equal(fh["train/domain"][6:12], online["domain"].X.numpy())
    with pytest.raises(DataFileError, match=r"written for PDE parameters .*'process_share': 0\.5.*the config has"):
        _validate(path)
    _validate(path, pde_params={"mu": 1.0, "T": 1.0, "process_share": 0.5})


def test_two_point_groups_read_disjoint_slices_that_cover_the_batch(datafile):
    batch = {"domain": 6, "terminal": 5}
    whole = H5Collocation(datafile, batch, seed=3, shuffle=True)
    halves = [H5Collocation(datafile, batch, seed=3, shuffle=True, part=p, parts=2) for p in range(2)]
    for step in range(7):  # crosses epoch boundaries (4 steps per epoch)
        for kind in batch:
            full = whole.read(kind, step)[0]
            parts = [h.read(kind, step) for h in halves]
            assert [p[1] for p in parts] == [0, (batch[kind] + 1) // 2]
            assert np.array_equal(np.concatenate([p[0] for p in parts]), full)
            rows = [h.indices(kind, step)[0] for h in halves]
            assert not set(rows[0]) & set(rows[1])


def test_shuffling_is_a_seeded_permutation_per_epoch(datafile):
    reader = H5Collocation(datafile, {"domain": 6}, seed=3)
    epoch0 = np.concatenate([reader.indices("domain", s)[0] for s in range(4)])
    epoch1 = np.concatenate([reader.indices("domain", s)[0] for s in range(4, 8)])
    assert sorted(epoch0) == list(range(24)) and sorted(epoch1) == list(range(24))
    assert not np.array_equal(epoch0, epoch1) and not np.array_equal(epoch0, np.arange(24))
    again = H5Collocation(datafile, {"domain": 6}, seed=3)
    assert np.array_equal(np.concatenate([again.indices("domain", s)[0] for s in range(4)]), epoch0)
    assert reader.cursor(5) == {"epoch": 1, "position": 6}
    plain = H5Collocation(datafile, {"domain": 6}, seed=3, shuffle=False)
    assert np.array_equal(np.concatenate([plain.indices("domain", s)[0] for s in range(4)]), np.arange(24))


def test_training_from_the_file_reproduces_the_online_run(root, datafile, tmp_path):
    online = load_config(root / "configs/quickstart.yaml", [*SMALL, f"run.dir={tmp_path / 'online'}"])
    from_file = load_config(
        root / "configs/quickstart.yaml",
        [
            *SMALL,
            f"run.dir={tmp_path / 'file'}",
            f"data.train_file={datafile}",
            "data.shuffle=false",
            f"data.test_file={datafile}",
        ],
    )
    a, b = run(online), run(from_file)
    rows_a = [r for r in read_metrics(tmp_path / "online/metrics.jsonl") if "loss" in r]
    rows_b = [r for r in read_metrics(tmp_path / "file/metrics.jsonl") if "loss" in r]
    assert len(rows_a) == len(rows_b) == 4
    for ra, rb in zip(rows_a, rows_b, strict=True):
        for key in ("loss", "residual", "terminal"):
            assert abs(ra[key] - rb[key]) <= 1e-6 * abs(ra[key]), (key, ra, rb)
    assert abs(a["l2_rel"] - b["l2_rel"]) <= 1e-6 * a["l2_rel"]


@pytest.mark.ranks
def test_generation_on_two_ranks_writes_the_same_file(config, datafile, tmp_path, root):
    out = tmp_path / "two.h5"
    args = ["launch/make_dataset.py", "--config", "configs/quickstart.yaml", "--out", str(out), "--steps", "4",
            "--test-points", "10", "--truth-samples", "500", *SMALL]  # fmt: skip
    for rc, _, err in wait_all(spawn_ranks(args, 2)):
        assert rc == 0, err[-2000:]
    with h5py.File(out) as two, h5py.File(datafile) as one:
        for name in (
            "train/domain",
            "train/terminal",
            "train/terminal_target",
            "test/X",
            "test/u",
            "test/grad",
            "test/u_se",
        ):
            assert np.array_equal(two[name][:], one[name][:]), name
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no parts or temporaries left


def _validate(path, **kw):
    args = dict(
        pde_name="hjb",
        dim=10,
        pde_params={"mu": 1.0, "T": 1.0},
        groups={"train": ["domain", "terminal"], "test": ["X", "u", "grad"]},
    )
    args.update(kw)
    validate(path, **args)


def _replace(fh, name: str, data: np.ndarray) -> None:
    del fh[name]
    fh[name] = data


def _copy(src: Path, dst: Path, edit) -> Path:
    dst.write_bytes(src.read_bytes())
    with h5py.File(dst, "a") as fh:
        edit(fh)
    return dst


BAD_FILES = [
    ("other dimension", lambda fh: None, dict(dim=11), "written for dim 10, the config has pde.dim=11"),
    ("other PDE", lambda fh: None, dict(pde_name="heat"), "written for PDE 'hjb', the config has pde.name='heat'"),
    ("other parameters", lambda fh: None, dict(pde_params={"mu": 2.0, "T": 1.0}), "written for PDE parameters"),
    ("missing dataset", lambda fh: fh["train"].__delitem__("terminal"), {}, "/train/terminal: missing dataset"),
    ("missing group", lambda fh: fh.__delitem__("test"), {}, "/test: missing group"),
    ("missing attribute", lambda fh: fh.attrs.__delitem__("pde"), {}, "missing attribute 'pde'"),
    ("unknown schema", lambda fh: fh.attrs.__setitem__("schema_version", 99), {}, "schema_version 99 is not supported"),
    ("NaN row", lambda fh: fh["train/domain"].__setitem__((3, 2), np.nan), {}, "/train/domain: row 3 holds NaN or Inf"),
    ("Inf in test", lambda fh: fh["test/u"].__setitem__(7, np.inf), {}, "/test/u: row 7 holds NaN or Inf"),
    ("wrong shape", lambda fh: _replace(fh, "test/grad", np.zeros((10, 3))), {},
     "/test/grad: has shape (10, 3), expected (rows, 10)"),
    # the reliability round: each of these was a traceback, or accepted
    ("integer training points", lambda fh: _replace(fh, "train/domain", fh["train/domain"][:].astype(np.int32)), {},
     "/train/domain: holds int32 values, expected float64 numbers (the schema's)"),
    ("single-precision test points", lambda fh: _replace(fh, "test/X", fh["test/X"][:].astype(np.float32)), {},
     "/test/X: holds float32 values, expected float64"),
    ("strings for the solution", lambda fh: _replace(fh, "test/u", np.array([b"1.5"] * fh["test/u"].shape[0])), {},
     "/test/u: holds strings, expected float64 numbers"),
    ("fewer values than points", lambda fh: _replace(fh, "test/u", fh["test/u"][:-3]), {},
     "/test/u: has {n} rows, /test/X has {N}: each row belongs to the point in the same row"),
    ("fewer standard errors than points", lambda fh: _replace(fh, "test/u_se", fh["test/u_se"][:5]), {},
     "/test/u_se: has 5 rows, /test/X has {N}"),
    ("external link to a missing file",
     lambda fh: (fh["test"].__delitem__("grad"), fh["test"].__setitem__("grad", h5py.ExternalLink("gone.h5", "/g"))),
     {}, "/test/grad: cannot be opened (an external link to gone.h5:/g): "),
    ("a group in place of a dataset",
     lambda fh: (fh["train"].__delitem__("domain"), fh["train"].create_group("domain")),
     {}, "/train/domain: is a group, expected a dataset"),
    ("parameters that are not JSON", lambda fh: fh.attrs.__setitem__("pde_params", "{mu: 1.0, T"), {},
     "/: attribute 'pde_params' is not a JSON object of the PDE's parameters ("),
    ("dimension that is not a number", lambda fh: fh.attrs.__setitem__("dim", "ten"), {},
     "/: attribute 'dim' is not an integer ("),
    ("a dataset in place of a group", lambda fh: (fh.__delitem__("test"), fh.__setitem__("test", np.zeros(3))), {},
     "/test: is a dataset, expected a group"),
    ("points of another width", lambda fh: fh.attrs.__setitem__("in_dim", 10), dict(in_dim=11),
     "/: attribute 'in_dim' is 10, the PDE's points have 11 columns"),
]  # fmt: skip


@pytest.mark.parametrize("name, edit, kw, message", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_files_give_one_clear_error(datafile, tmp_path, name, edit, kw, message):
    bad = _copy(datafile, tmp_path / "bad.h5", edit)
    with h5py.File(datafile, "r") as fh:
        points = fh["test/X"].shape[0]
    message = message.replace("{N}", str(points)).replace("{n}", str(points - 3))
    with pytest.raises(DataFileError) as err:
        _validate(bad, **kw)
    assert message in str(err.value) and str(bad) in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_truncated_and_missing_files(datafile, tmp_path):
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(datafile.read_bytes()[: datafile.stat().st_size // 2])
    with pytest.raises(DataFileError, match="truncated or corrupted"):
        _validate(truncated)
    with pytest.raises(DataFileError, match="no such file"):
        _validate(tmp_path / "absent.h5")
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not hdf5 at all" * 100)
    with pytest.raises(DataFileError, match="not a readable HDF5 file"):
        _validate(garbage)


def test_command_line_refuses_a_file_of_another_dimension(datafile, tmp_path, root):
    out = run_command([sys.executable, "launch/train.py", "--config", "configs/quickstart.yaml", *SMALL, "pde.dim=12",
                       f"data.train_file={datafile}", f"run.dir={tmp_path / 'r'}"])  # fmt: skip
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert "written for dim 10, the config has pde.dim=12" in lines[-1] and "Traceback" not in out.stderr


def test_a_hard_constrained_run_writes_and_reads_no_condition_points(root, tmp_path):
    """Under model.hard_constraint the terminal set is never drawn, stored or read."""
    overrides = [*(o for o in SMALL if not o.startswith("model.hard_constraint")), "model.hard_constraint=true"]
    cfg = load_config(root / "configs/quickstart.yaml", [*overrides, f"run.dir={tmp_path / 'run'}"])
    path = generate(cfg, tmp_path / "hard.h5", steps=4, test_points=10, truth_samples=500)
    with h5py.File(path) as fh:
        assert list(fh["train"]) == ["domain"] and json.loads(fh.attrs["batch"]) == {"domain": 6}
    cfg = load_config(root / "configs/quickstart.yaml", [*overrides, f"run.dir={tmp_path / 'run'}",
                                                          f"data.train_file={path}", "data.shuffle=false"])  # fmt: skip
    run(cfg)
    rows = [r for r in read_metrics(tmp_path / "run/metrics.jsonl") if "loss" in r]
    assert rows and all(set(r) == {"step", "loss", "residual", "lr", "seconds"} for r in rows)


@pytest.mark.parametrize("at", ["first step", "test block", "copy", "rename"])
def test_a_recorded_interrupt_stops_the_write_and_leaves_the_file_as_it_was(config, datafile, tmp_path, at):
    """make_dataset records Ctrl-C instead of raising it in the handler: a KeyboardInterrupt that
    lands in a finalizer is printed and swallowed by Python, and the write went on to replace
    the file (exit 0, a clean-clone run). The record is checked at every step, every test block,
    every block copied into the file and just before the rename; wherever it is seen, the file
    is left as it was and no part or temporary file remains."""
    checks: list[int] = []
    generate(config, tmp_path / "other.h5", steps=4, test_points=10, truth_samples=500,
             stop=lambda: bool(checks.append(1)))  # fmt: skip
    where = {"first step": 1, "test block": 5, "copy": 6, "rename": len(checks)}[at]  # 4 steps, 1 test block, ...
    before = datafile.read_bytes()
    calls: list[int] = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) == where

    with pytest.raises(KeyboardInterrupt):
        generate(config, datafile, steps=4, test_points=10, truth_samples=500, stop=stop)
    assert datafile.read_bytes() == before and len(calls) == where
    assert sorted(p.name for p in datafile.parent.iterdir() if "set" in p.name) == ["set.h5"]
