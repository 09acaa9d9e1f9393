"""Count the checks of the suite per area (test file): test functions, parametrized cases,
``assert`` statements and ``pytest.raises`` blocks, for the working tree or a commit.

    python tests/scripts/count_checks.py [REV ...]

Prints one Markdown table (a column pair per tree), the one docs/testing.md keeps, so that a
test merged into another visibly keeps its checks. Counts are static (the source's statements,
not their executions); a case is one collected test (``pytest --collect-only``) of the tree that
is checked out, and is left out for other commits.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def sources(rev: str | None) -> dict[str, str]:
    """tests/test_*.py of the working tree (rev None) or of a commit: name -> source."""
    if rev is None:
        return {p.name: p.read_text() for p in sorted((ROOT / "tests").glob("test_*.py"))}
    names = subprocess.run(["git", "ls-tree", "--name-only", f"{rev}:tests"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()  # fmt: skip
    show = ["git", "show"]
    return {
        n: subprocess.run([*show, f"{rev}:tests/{n}"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        for n in names
        if re.fullmatch(r"test_.*\.py", n)
    }


def checks(source: str) -> Counter:
    counts: Counter = Counter()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assert):
            counts["asserts"] += 1
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test_"):
            counts["tests"] += 1
        elif isinstance(node, ast.withitem):
            call = node.context_expr
            if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "raises":
                counts["raises"] += 1
    return counts


def collected() -> Counter:
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-n", "0", "tests"],
                         cwd=ROOT, capture_output=True, text=True).stdout  # fmt: skip
    return Counter(line.split("::")[0].removeprefix("tests/") for line in out.splitlines() if "::" in line)


def main(argv: list[str]) -> int:
    revs: list[str | None] = [*argv, None]
    tables = {rev: {name: checks(src) for name, src in sources(rev).items()} for rev in revs}
    cases = collected()
    files = sorted(set().union(*tables.values()))
    head = ["area (file)"] + [f"{rev or 'now'}: tests / asserts + raises" for rev in revs] + ["cases now"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    totals = [Counter() for _ in revs]
    for name in files:
        cells = []
        for total, rev in zip(totals, revs, strict=True):
            c = tables[rev].get(name, Counter())
            total.update(c)
            cells.append(f"{c['tests']} / {c['asserts']} + {c['raises']}" if c else "-")
        print(f"| {name.removesuffix('.py')} | " + " | ".join(cells) + f" | {cases.get(name, 0)} |")
    cells = [f"{t['tests']} / {t['asserts']} + {t['raises']}" for t in totals]
    print("| **all** | " + " | ".join(cells) + f" | {sum(cases.values())} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
