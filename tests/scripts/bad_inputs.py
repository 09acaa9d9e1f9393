"""Run launch/train.py's main() on many bad inputs in one process (one start of torch and
DeepSpeed for all of them instead of one each).

Usage: bad_inputs.py CASES.json OUT.json. CASES.json maps a case name to the argument list
of ``launch/train.py`` (``--config FILE overrides...``). For each case OUT.json holds its
exit status and what it wrote to standard error; an exception that escapes main() (which a
real process would print as a traceback, exit 1) is recorded as status 1 with its traceback.
Cases run one after another in the order given; the run directory each names must be new.
"""

import contextlib
import io
import json
import os
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from launch.train import main  # noqa: E402


def run_case(argv: list[str]) -> dict:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = main(argv)
        except Exception:  # what a process would die of, with its traceback
            traceback.print_exc(file=err)
            status = 1
    return {"status": status, "stderr": err.getvalue()}


def run(cases: dict[str, list[str]], out: Path) -> None:
    results = {name: run_case(argv) for name, argv in cases.items()}
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    run(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)  # a process group may exist: skip its teardown at exit (dstein.distributed.exit_process)
