"""HDF5: writing and reading d = 10,000 training points; generating the HJB d = 250 test set."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from dstein.bench.measure import ROOT
from dstein.config import load_config
from dstein.data import H5Collocation, generate, read_test_set


def suite_data(args: argparse.Namespace) -> dict:
    """HDF5: write and read d = 10,000 training points; generate the HJB d = 250 test set."""

    tmp = Path(args.tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = load_config(ROOT / "configs/hjb_10k.yaml", ["eval.truth_samples=2"])
    path = tmp / "hjb_10k-train.h5"
    start = time.perf_counter()
    generate(cfg, path, steps=args.data_steps, test_points=0, truth_samples=2)
    write_s = time.perf_counter() - start
    rows = args.data_steps * cfg.train.domain_points
    out: dict = {"train_file": {"dim": 10000, "rows_per_kind": rows, "kinds": 2, "write_seconds": write_s,
                                "file_bytes": path.stat().st_size}}  # fmt: skip
    for shuffle in (False, True):
        reader = H5Collocation(path, {"domain": 50, "terminal": 50}, seed=0, shuffle=shuffle)
        start, points = time.perf_counter(), 0
        for step in range(args.data_steps):
            for kind in ("domain", "terminal"):
                points += reader.read(kind, step)[0].shape[0]
        seconds = time.perf_counter() - start
        out[f"read_{'shuffled' if shuffle else 'in_order'}"] = {"points": points, "seconds": seconds,
                                                                 "points_per_second": points / seconds}  # fmt: skip
        reader.close()
    cfg250 = load_config(ROOT / "configs/hjb_250.yaml")
    test_path = tmp / "hjb_250-test.h5"
    start = time.perf_counter()
    generate(cfg250, test_path, steps=0, test_points=1000, truth_samples=cfg250.eval.truth_samples)
    test = read_test_set(test_path)
    assert test.u_se is not None  # a Monte Carlo truth: its standard errors are stored
    out["hjb_250_test_set"] = {
        "points": 1000, "truth_samples": cfg250.eval.truth_samples, "seconds": time.perf_counter() - start,
        "max_u_se": float(test.u_se.max()), "max_relative_se": float((test.u_se / test.u.abs()).max()),
        "u_range": [float(test.u.min()), float(test.u.max())], "bytes": test_path.stat().st_size,
    }  # fmt: skip
    return {"suite": "data", **out}
