"""One initialization for every launcher, the rank grid, and the named collectives.

Launchers recognised (first match wins):
- ``deepspeed`` and ``torchrun``: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
  ``MASTER_PORT`` in the environment (deepspeed also appends ``--local_rank``);
- ``mpirun`` (Open MPI, or any MPI through mpi4py): ``OMPI_COMM_WORLD_*`` / ``PMI_*`` /
  ``PMIX_RANK``; rank 0 picks the rendezvous port and broadcasts it over MPI;
- ``srun``: ``SLURM_PROCID`` with ``SLURM_STEP_NUM_TASKS`` (set for job steps only, so a
  plain ``python`` in a batch script is not mistaken for one rank of many);
- plain ``python``: one process, an in-memory store, no network.

Every rank then joins one torch.distributed group (NCCL with GPUs, gloo otherwise) with a
short, configurable timeout, and DeepSpeed adopts it.

The rank grid (MATH.md section 4): ranks ``p*S .. p*S+S-1`` form sample group ``p`` (``S`` =
``parallel.sample_group_size``). A sample group evaluates the same points, each rank its own
noise chunks (how they share the samples: ``dstein/estimators/sharded.py``). Point groups
split the points of a step.

The collectives below are the only ones dstein calls itself (DeepSpeed has its own): named
for what they compute, no-ops in one process, and a failure of any of them is a
``PeerLost`` (``collective_failure`` tells such failures from other errors).
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dstein.errors import DistributedError, PeerLost
from dstein.op_build import prepare_op
from dstein.watchdog import posted_verdict, start_watchdog, stop_watchdog


@dataclass(frozen=True)
class Launch:
    """Where this process sits, as its launcher describes it."""

    launcher: str
    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None = None
    master_port: int | None = None


@dataclass
class DistInfo:
    """This process's place in the run: ranks, groups, device. Read-only after init."""

    launch: Launch
    backend: str
    device: torch.device
    sample_group_size: int
    sample_group: Any = field(default=None, repr=False)
    peers: list[tuple[str, int]] = field(default_factory=list, repr=False)

    @property
    def rank(self) -> int:
        return self.launch.rank

    @property
    def world_size(self) -> int:
        return self.launch.world_size

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    @property
    def num_point_groups(self) -> int:
        return self.world_size // self.sample_group_size

    @property
    def point_group(self) -> int:
        return self.rank // self.sample_group_size

    @property
    def sample_rank(self) -> int:
        return self.rank % self.sample_group_size


def free_port() -> int:
    """A TCP port free on this host now (for a rendezvous on loopback or this node)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _first_slurm_host(nodelist: str) -> str:
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30, check=True
        )
        return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return nodelist.split(",")[0].split("[")[0]


def detect_launch(env: dict[str, str] | None = None) -> Launch:
    """Which launcher started this process, and this process's rank in it."""
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in env else "deepspeed/env"
        return Launch(
            launcher,
            int(env["RANK"]),
            int(env["WORLD_SIZE"]),
            int(env.get("LOCAL_RANK", "0")),
            env.get("MASTER_ADDR", "127.0.0.1"),
            int(env.get("MASTER_PORT", "29500")),
        )
    if any(k in env for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")):
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        rank, size = comm.Get_rank(), comm.Get_size()
        local = int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", env.get("MPI_LOCALRANKID", "0")))
        addr = env.get("MASTER_ADDR") or (socket.gethostname() if size > 1 else "127.0.0.1")
        port = int(env["MASTER_PORT"]) if "MASTER_PORT" in env else (free_port() if rank == 0 else 0)
        addr, port = comm.bcast((addr, port) if rank == 0 else None, root=0)
        return Launch("mpirun", rank, size, local, addr, port)
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        size = int(env["SLURM_STEP_NUM_TASKS"])
        addr = env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_STEP_NODELIST", "127.0.0.1"))
        job = int(env.get("SLURM_JOB_ID", "0"))
        step = int(env.get("SLURM_STEP_ID", "0")) if env.get("SLURM_STEP_ID", "0").isdigit() else 0
        port = int(env.get("MASTER_PORT", 20000 + (job * 7 + step) % 20000))
        return Launch("srun", int(env["SLURM_PROCID"]), size, int(env.get("SLURM_LOCALID", "0")), addr, port)
    return Launch("python", 0, 1, 0)


def ranks_on_this_node(env: dict[str, str] | None = None) -> int:
    """The launcher's count of ranks on this node (torchrun/deepspeed, mpirun, srun), else 1."""
    env = dict(os.environ if env is None else env)
    for key in ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "SLURM_STEP_TASKS_PER_NODE"):
        digits = env.get(key, "").split("(")[0].split(",")[0]  # srun writes e.g. "4(x2)"
        if digits.isdigit() and int(digits) > 0:
            return int(digits)
    return 1


def check_layout(launch: Launch, expected_world: int, sample_group_size: int | None) -> int:
    """The sample-group size for this world, or a clear error naming the options."""
    world = launch.world_size
    if expected_world and expected_world != world:
        raise DistributedError(
            f"parallel.world_size={expected_world} but the launcher ({launch.launcher}) started {world} "
            "ranks: change the launcher's process count or the config (0 accepts any)"
        )
    size = sample_group_size or world
    if size < 1 or world % size:
        raise DistributedError(
            f"parallel.sample_group_size={sample_group_size} does not divide the world size {world}: "
            f"use a divisor of {world} (or 0 for all ranks in one sample group)"
        )
    return size


def init_distributed(
    sample_group_size: int | None = None, expected_world: int = 0, timeout_s: float = 300.0, device: str = "auto"
) -> DistInfo:
    """Join (or create) the process group for this launcher and build the rank grid."""
    launch = detect_launch()
    size = check_layout(launch, expected_world, sample_group_size)
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise DistributedError("run.device='cuda' but no CUDA device is available (use auto or cpu)")
    backend = "nccl" if use_cuda else "gloo"
    dev = torch.device("cuda", launch.local_rank % torch.cuda.device_count()) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    timeout = timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        os.environ.setdefault("LOCAL_RANK", str(launch.local_rank))
        if launch.world_size == 1 and launch.master_addr is None:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            os.environ.update(
                RANK=str(launch.rank),
                WORLD_SIZE=str(launch.world_size),
                MASTER_ADDR=str(launch.master_addr),
                MASTER_PORT=str(launch.master_port),
            )
            dist.init_process_group(
                backend, init_method="env://", rank=launch.rank, world_size=launch.world_size, timeout=timeout
            )
    elif dist.get_world_size() != launch.world_size:
        raise DistributedError(
            f"a process group of {dist.get_world_size()} ranks exists but the launcher says {launch.world_size}"
        )
    prepare_op()  # DeepSpeed's CPU op: built once per environment, a killed build's lock cleared
    import deepspeed  # slow to import; only where a process group is built

    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout, verbose=False)
    group = None
    for start in range(0, launch.world_size, size):  # every rank must create every group
        ranks = list(range(start, start + size))
        g = dist.new_group(ranks, timeout=timeout) if size < launch.world_size else dist.group.WORLD
        if launch.rank in ranks:
            group = g
    peers: list[tuple[str, int]] = [("", 0)] * launch.world_size
    dist.all_gather_object(peers, (socket.gethostname(), os.getpid()))
    if launch.world_size > 1:  # a stopped peer ends every rank within timeout_s (dstein/watchdog.py)
        token = from_rank0(secrets.token_hex(8))  # this start's keys in a store that may outlive it
        start_watchdog(launch.rank, peers, str(launch.master_addr), int(launch.master_port or 0), timeout_s, token)
    return DistInfo(launch, backend, dev, size, group, peers)


#: The kernel's flag of a process that is exiting (``PF_EXITING``, field 9 of /proc/PID/stat):
#: a killed process closes its sockets (its peers' collectives fail) before it is a zombie.
PF_EXITING = 0x4


def _process_alive(pid: int) -> bool:
    """Whether a local process runs (one exiting, or a zombie, dead but not yet reaped, counts
    as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return fields[0] not in ("Z", "X") and not int(fields[6]) & PF_EXITING
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True


def lost_ranks(info: DistInfo, wait_s: float = 1.0) -> list[int]:
    """Ranks on this host whose process is gone (what can be known after a failed collective),
    looked for during up to ``wait_s`` (a peer's connection can fail a moment before the
    kernel shows its process exiting)."""
    host = socket.gethostname()
    local = [(rank, pid) for rank, (peer_host, pid) in enumerate(info.peers)
             if rank != info.rank and peer_host == host and pid]  # fmt: skip
    deadline = time.monotonic() + wait_s
    while True:
        gone = [rank for rank, pid in local if not _process_alive(pid)]
        if gone or not local or time.monotonic() >= deadline:
            return gone
        time.sleep(0.05)


#: Where a collective's failure surfaces: torch.distributed and DeepSpeed's communication
#: code (gloo raises a plain RuntimeError there; NCCL a torch.distributed.DistError).
_COMMUNICATION_CODE = (
    str(Path(dist.__file__).parent),
    *(os.sep + os.path.join("deepspeed", part) + os.sep for part in ("comm", "runtime")),
)


def collective_failure(err: BaseException) -> bool:
    """Whether ``err`` is a failed collective (a lost or stuck peer) rather than this rank's
    own error: a ``torch.distributed.DistError``, or a RuntimeError raised inside the
    communication code. Memory exhaustion never counts (it is this rank's)."""
    if isinstance(err, torch.OutOfMemoryError) or not isinstance(err, RuntimeError):
        return False
    if isinstance(err, dist.DistError):
        return True
    tb, innermost = err.__traceback__, ""
    while tb is not None:
        innermost, tb = tb.tb_frame.f_code.co_filename, tb.tb_next
    return any(part in innermost for part in _COMMUNICATION_CODE)


def ranks_at(info: DistInfo, text: str) -> tuple[str, list[int]] | None:
    """The host, and its ranks, whose address a communication error names ("Connection
    closed by peer [10.0.0.3]:1234"); None when it names none of the ranks' hosts."""
    addresses = set(re.findall(r"\[([0-9a-fA-F.:]+)\]:\d+", text))
    if not addresses:
        return None
    hosts: dict[str, list[int]] = {}
    for rank, (host, _) in enumerate(info.peers):
        hosts.setdefault(host, []).append(rank)
    for host, ranks in hosts.items():
        try:
            if socket.gethostbyname(host) in addresses:
                return host, ranks
        except OSError:
            continue
    return None


def peer_lost(info: DistInfo, err: BaseException, timeout_s: float) -> PeerLost:
    """The error to stop with after a failed collective, naming what can be known of the
    peer: the ranks on this host whose process is gone, else the host (and its ranks) that
    the communication error names."""
    verdict = posted_verdict()
    if verdict is not None:  # a watchdog found a stopped rank; the collective failed as its finder exited
        return PeerLost(f"rank {info.rank}: {verdict}; stopping")
    gone = lost_ranks(info)
    who = f"rank {', '.join(map(str, gone))} is gone" if gone else "a peer rank died or stopped answering"
    at = None if gone else ranks_at(info, str(err))
    if at is not None:
        who = f"a rank on host {at[0]} (ranks {', '.join(map(str, at[1]))}) died or stopped answering"
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return PeerLost(
        f"rank {info.rank}: a collective failed: {who} (collective timeout {timeout_s:g}s, "
        f"parallel.timeout_s); stopping. Cause: {first}"
    )


@contextmanager
def stop_on_lost_peer(info: DistInfo, timeout_s: float) -> Iterator[None]:
    """Turn a failed collective inside the block into ``PeerLost`` (with more than one rank)."""
    try:
        yield
    except RuntimeError as err:
        if info.world_size > 1 and collective_failure(err):
            raise peer_lost(info, err, timeout_s) from err
        raise


# ----- collectives: no-ops in one process -------------------------------------------------


def _spread(group: Any = None) -> bool:
    """Whether a collective over ``group`` involves other processes."""
    return dist.is_initialized() and dist.get_world_size(group) > 1


def this_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _on_backend(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    """``tensor`` where the group's backend can reduce it (NCCL: the current CUDA device)."""
    if dist.get_backend(group) == "nccl" and not tensor.is_cuda:
        return tensor.cuda()
    return tensor


def sum_in_place(tensor: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Sum ``tensor`` across ``group`` in place (the tensor itself, for autograd functions)."""
    if _spread(group):
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def sum_values(values: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Non-differentiable sum across a group (metrics, flags)."""
    return sum_in_place(values.detach().clone(), group)


def max_values(values: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Non-differentiable maximum across a group (flags that any rank may raise)."""
    values = values.detach().clone()
    if _spread(group):
        on = _on_backend(values, group)
        dist.all_reduce(on, op=dist.ReduceOp.MAX, group=group)
        values = on.to(values.device)
    return values


def from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a picklable object; decisions rank 0 takes alone)."""
    if not _spread():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank (picklable objects)."""
    if not _spread():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def barrier() -> None:
    if _spread():
        dist.barrier()


def exit_process(status: int, barrier: bool = True) -> None:
    """End an entry point's process: wait for the peers, flush, and exit at once.

    Tearing down gloo process groups at interpreter exit races with the peers closing their
    connections and can abort the process ("terminate called without an active exception")
    after all work is done; with everything written and flushed, skipping the teardown is
    safe. Without a process group this is a plain exit.
    """
    if barrier and _spread():
        dist.barrier()
        stop_watchdog()  # after the last collective: a peer stopped during it is still found;
        dist.barrier()  # and no rank's watchdog asks the store (in rank 0) once rank 0 is gone
    stop_watchdog()
    sys.stdout.flush()
    sys.stderr.flush()
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()  # mpirun treats an exit without it as an abnormal termination
    if dist.is_initialized():
        os._exit(status)
    sys.exit(status)
