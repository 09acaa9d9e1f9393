"""Mutation check of the suite's strength: apply one deliberate bug at a time to a copy of the
working tree and show that the tests fail on each.

    .venv/bin/python tests/scripts/mutate.py [--tier fast|full] [--only NAME ...] [--out FILE.json]

For every mutation the copy's tier (``fast``: ``-m "not slow"``; ``full``: everything) runs under
the project's interpreter (to its end, or with ``--first`` to the first failure); a mutation is
*caught* when pytest fails, and the failing tests are listed. The unmutated copy runs first (it
must pass, or nothing is shown). Exit status 0 when every mutation is caught, 1 otherwise, 2
when a mutation no longer applies (the code it edits has changed: edit MUTATIONS).
docs/testing.md records the last result.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: name -> (what the bug is, [(file, text, replacement), ...]); each text must occur once.
MUTATIONS: dict[str, tuple[str, list[tuple[str, str, str]]]] = {
    "stein-weight": (
        "Stein's Laplacian weight |z|^2 - d off by one (|z|^2 - d + 1)",
        [("dstein/estimators/base.py", "        return zx_sq - self.rank\n", "        return zx_sq - self.rank + 1\n")],
    ),
    "dropped-all-reduce": (
        "the partial Stein sums of the ranks of a sample group not all-reduced",
        [("dstein/estimators/sharded.py", "        if self.size == 1:\n            return sums\n",
          "        if True:\n            return sums\n")],
    ),
    "checkpoint-before-step": (
        "the checkpoint after step N written before step N's update is applied",
        [
            ("dstein/train.py",
             "            result = train_step(tr, step, preemption.critical)\n",
             "            if checkpoints.due(step + 1):\n"
             "                checkpoints.save(tr.engine, step + 1, client_state(tr, step + 1, clock()))\n"
             "            result = train_step(tr, step, preemption.critical)\n"),
            ("dstein/train.py", "            if checkpoints.due(done) or stop:\n", "            if stop:\n"),
        ],
    ),
    "unverified-manifest": (
        "a checkpoint's files not checked against its manifest (sizes and SHA-256)",
        [("dstein/checkpoint/resume.py",
          "        bad = manifest_problem(path, digests, expected) if self.rank == 0 else None\n",
          "        bad = None\n")],
    ),
    "lost-rng-state": (
        "the RNG state of a checkpoint read but not put back on resume",
        [("dstein/checkpoint/resume.py", "            set_rng_state(safe_load(rng_file))\n",
          "            safe_load(rng_file)\n")],
    ),
    "hard-constraint-derivative": (
        "the hard constraint's Laplacian without the factor 2 of the product rule (2 grad B . grad f)",
        [("dstein/estimators/constraint.py", "                lap = lap + 2 * along_B\n",
          "                lap = lap + along_B\n")],
    ),
    "trace-weight": (
        "a diffusion's weighted trace without Stein's weight on the deviations from the mean weight",
        [("dstein/estimators/stein.py", "            if deviation is not None:\n",
          "            if False:\n")],
    ),
    "control-drift": (
        "HJB's control problem with the drift of dX = 2 m dt + sqrt(2) dW halved (the closed loop's cost)",
        [("dstein/pdes/hjb.py", "T=self.T, drift=2.0,", "T=self.T, drift=1.0,")],
    ),
    "process-law": (
        "HJB's points along the process drawn as x0 + sqrt(t) Z instead of x0 + sqrt(2 t) Z",
        [("dstein/pdes/hjb.py", "X[:, :-1] = self.x0 + torch.sqrt(2 * X[:, -1:]) * z",
          "X[:, :-1] = self.x0 + torch.sqrt(X[:, -1:]) * z")],
    ),
}  # fmt: skip


def copy_tree(dest: Path) -> None:
    """The working tree's files that git tracks or would track (not .venv, caches, runs)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                            check=True).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def apply(tree: Path, edits: list[tuple[str, str, str]]) -> str | None:
    """Apply the edits to ``tree``; the first that no longer applies, or None."""
    for file, text, replacement in edits:
        path = tree / file
        source = path.read_text()
        if source.count(text) != 1:
            return f"{file}: the text to replace occurs {source.count(text)} times, not once"
        path.write_text(source.replace(text, replacement))
    return None


def run_tier(tree: Path, tier: str, workers: int, first: bool) -> tuple[int, float, list[str], str]:
    """pytest on the copy: exit status, seconds, the failing tests, the output's tail."""
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", str(workers), "tests"]
    if first:
        args.append("-x")
    if tier == "fast":
        args += ["-m", "not slow"]
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    begin = time.time()
    done = subprocess.run(args, cwd=tree, env=env, capture_output=True, text=True)
    seconds = time.time() - begin
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", done.stdout, re.M)
    return done.returncode, seconds, failed, (done.stdout + done.stderr)[-3000:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tier", choices=["fast", "full"], default="fast", help="the tests to run (default fast)")
    parser.add_argument("--only", nargs="+", choices=sorted(MUTATIONS), help="these mutations only")
    parser.add_argument("--workers", type=int, default=2, help="xdist workers (default 2)")
    parser.add_argument("--first", action="store_true", help="stop each run at its first failure (-x)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    names = args.only or list(MUTATIONS)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="dstein-mutate-") as scratch:
        clean = Path(scratch) / "clean"
        copy_tree(clean)
        status, seconds, failed, tail = run_tier(clean, args.tier, args.workers, args.first)
        print(f"unmutated: exit {status} in {seconds:.0f} s", flush=True)
        if status != 0:
            print(tail, file=sys.stderr)
            print("error: the unmutated tree does not pass its tests; nothing to show", file=sys.stderr)
            return 1
        results["unmutated"] = {"exit": status, "seconds": round(seconds, 1)}
        for name in names:
            what, edits = MUTATIONS[name]
            tree = Path(scratch) / name
            shutil.copytree(clean, tree)
            problem = apply(tree, edits)
            if problem:
                print(f"error: mutation {name} no longer applies ({problem})", file=sys.stderr)
                return 2
            status, seconds, failed, tail = run_tier(tree, args.tier, args.workers, args.first)
            caught = status != 0
            results[name] = {"bug": what, "caught": caught, "exit": status, "failed": failed,
                             "seconds": round(seconds, 1)}  # fmt: skip
            verdict = f"caught by {len(failed)} tests: {', '.join(failed)}" if caught else "NOT CAUGHT"
            print(f"{name}: {verdict} (exit {status}, {seconds:.0f} s)", flush=True)
            if caught and not failed:
                print(tail, file=sys.stderr)
            shutil.rmtree(tree)
    if args.out:
        args.out.write_text(json.dumps({"tier": args.tier, "results": results}, indent=2) + "\n")
    return 0 if all(r.get("caught", True) for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
