"""Shared fixtures, and how the suite is split and scheduled.

Markers (pyproject.toml): ``slow`` tests are left out of the fast tier (``pytest -m "not
slow"``); ``ranks`` tests start several ranks or a SLURM cluster. Under pytest-xdist
(``-n 2 --dist loadgroup``, the README's command) every ``ranks`` test runs in one xdist group,
so they run one after another on one worker while the other worker takes the single-process
tests, and each worker runs torch on one thread (two workers, two cores).
"""

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # user PDE example module

#: Under xdist: how many workers share the cores (each takes its share of threads).
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // WORKERS))

#: The xdist group of the ``ranks`` tests: they never run two at a time.
RANKS_GROUP = "ranks"
#: The group of the ``ranks`` tests also marked ``beside`` (free ports, no cluster, no
#: deadline): one at a time too, but beside the ranks group, on the other worker, so that
#: the ranks group (the critical path) is not the longest unit by far.
BESIDE_GROUP = "ranks-beside"


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which turns xdist_group marks into the groups
def pytest_collection_modifyitems(config, items):
    """``ranks`` tests into their groups; then the order the workers take work in: the ranks
    group and the group beside it first (the longest units), then the other slow tests, then
    the rest (each list in its collection order). Deterministic, as xdist requires every
    worker to collect alike."""
    for item in items:
        if item.get_closest_marker("ranks"):
            group = BESIDE_GROUP if item.get_closest_marker("beside") else RANKS_GROUP
            item.add_marker(pytest.mark.xdist_group(group))

    def rank(item) -> int:
        if item.get_closest_marker("ranks"):
            return 0
        return 1 if item.get_closest_marker("slow") else 2

    items.sort(key=rank)


def pytest_collection_finish(session):
    """On an xdist worker under --dist loadgroup: refuse to run if the ranks group did not
    take. xdist 3.8 names a group by rewriting ``item._nodeid``, which pytest 9 no longer reads
    (pyproject pins pytest < 9): the ranks tests were then dealt out to both workers, and the
    two-node cluster, a session fixture, was started by each and torn down by one while the
    other's jobs ran."""
    if not session.config.getoption("loadgroup", default=False):
        return
    lost = [item.nodeid for item in session.items if item.get_closest_marker("ranks")
            and not item.nodeid.endswith((f"@{RANKS_GROUP}", f"@{BESIDE_GROUP}"))]  # fmt: skip
    if lost:
        raise pytest.UsageError(
            f"xdist did not put {lost[0]} (and {len(lost) - 1} more) in the {RANKS_GROUP} "
            "group: is pytest >= 9 installed beside pytest-xdist 3.8? (pyproject: pytest < 9)"
        )


@pytest.fixture
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def slurm():
    """A SLURM node to submit to (see tests/slurm_cluster.py)."""
    from slurm_cluster import cluster

    yield from cluster()


@pytest.fixture(scope="session")
def multinode():
    """Two SLURM nodes, each in its own network namespace: the clients' environment."""
    from slurm_cluster import multinode_cluster

    yield from multinode_cluster(2)


class Runs(dict):
    """world size -> a run (its directory, or what was read of it), each made the first time it
    is asked for (``make``): a worker whose tests read one world size only runs that one."""

    def __init__(self, make):
        super().__init__()
        self.make = make

    def __missing__(self, world: int):
        self[world] = made = self.make(world)
        return made


@pytest.fixture(scope="session")
def straight(tmp_path_factory) -> Runs:
    """Uninterrupted runs of test_checkpoint's tiny config on 1 and 2 ranks (read by the
    checkpoint and reliability tests: each made once per session and worker)."""
    from test_checkpoint import train_to_end

    def make(world: int) -> Path:
        path = tmp_path_factory.mktemp(f"straight{world}")
        train_to_end(path, world)  # one rank: in this process
        return path

    return Runs(make)
