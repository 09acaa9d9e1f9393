import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # user PDE example module

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


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
