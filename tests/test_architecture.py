"""The shape of the package: dstein/ imports downward only (no cycle in its import graph),
and no module imports another dstein module inside a function body, where a cycle would
hide (docs/architecture.md)."""

from __future__ import annotations

import ast
import pickle
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dstein"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def dstein_imports(node: ast.AST, package: str) -> set[str]:
    """The dstein modules an import statement names (``from dstein.x import y`` names
    dstein.x, and dstein.x.y when that is a module)."""
    found: set[str] = set()
    if isinstance(node, ast.Import):
        found = {alias.name for alias in node.names if alias.name.startswith("dstein")}
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dstein") and not node.level:
        found = {node.module}
        for alias in node.names:
            candidate = f"{node.module}.{alias.name}"
            if (PACKAGE.parent / candidate.replace(".", "/")).with_suffix(".py").exists() or (
                PACKAGE.parent / candidate.replace(".", "/") / "__init__.py"
            ).exists():
                found.add(candidate)
    return found - {package}


def parse(path: Path) -> ast.Module:
    """``ast.parse`` of a file. CPython 3.11.7 can raise "AST constructor recursion depth
    mismatch" (a SystemError, seen once in a full CI run) depending on the state of the process;
    then the file is parsed again in a fresh interpreter."""
    try:
        return ast.parse(path.read_text())
    except SystemError:
        code = "import ast, pickle, sys; sys.stdout.buffer.write(pickle.dumps(ast.parse(open(sys.argv[1]).read())))"
        out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, check=True)
        return pickle.loads(out.stdout)


def graph() -> tuple[dict[str, set[str]], list[str]]:
    """Module -> the dstein modules it imports (at module level or not); and every import of
    a dstein module inside a function body, as 'module:line'."""
    edges: dict[str, set[str]] = {}
    nested: list[str] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        tree = parse(path)
        edges[name] = set()
        for node in tree.body:
            if isinstance(node, ast.If):  # TYPE_CHECKING blocks and the like: still module level
                for inner in ast.walk(node):
                    edges[name] |= dstein_imports(inner, "dstein")
            edges[name] |= dstein_imports(node, "dstein")
        for func in ast.walk(tree):
            if isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
                for node in ast.walk(func):
                    inner = dstein_imports(node, "dstein")
                    edges[name] |= inner
                    nested += [f"{name}:{node.lineno}"] if inner else []
    return edges, nested


def test_no_import_cycle():
    edges, _ = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in edges:
                continue
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_no_dstein_import_inside_a_function():
    _, nested = graph()
    assert nested == [], nested


def test_sample_sharding_lives_in_one_module():
    """The partial-sum all-reduce, the chunk dealing and the gradient-share rule are in
    dstein/estimators/sharded.py, and only the generic collectives in distributed.py."""
    sharded = (PACKAGE / "estimators" / "sharded.py").read_text()
    for name in ("def deal_chunks", "class _AllReduceSum", "def loss_scale", "def direct", "class Shard"):
        assert name in sharded, name
    for path in PACKAGE.rglob("*.py"):
        if path.name in ("sharded.py",):
            continue
        text = path.read_text()
        # autograd Functions elsewhere are local (subspace.FirstLayer: the first layer's
        # products); none of those files talks to other ranks
        local = ("autograd.py", "faults.py", "subspace.py")
        assert "autograd.Function" not in text or path.name in local, path
        if path.name in ("subspace.py", "models.py"):
            assert "distributed" not in text, path
        assert "deal_chunks" not in text or path.name == "__init__.py", path
