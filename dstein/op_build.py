"""DeepSpeed's CPU op (``deepspeed_shm_comm``): built once per environment, never waited on
after a killed build.

DeepSpeed JIT-builds the op at its first use on a CPU (g++ and ninja, about 30 s of two
cores), under torch's build lock: a plain file (``<build dir>/lock``) that names no owner. A
start killed during the build leaves it behind, and every later start waited silently until
torch gave up on it (10 minutes). So each rank, before DeepSpeed loads the op:

1. builds into this environment's own directory with this environment's ninja
   (``own_op_build``): sharing torch's default directory across environments, or switching
   ninja releases, rebuilt the op at every switch;
2. takes an exclusive ``flock`` on ``<TORCH_EXTENSIONS_DIR>/deepspeed_shm_comm.builder``
   (which names the holder): the ranks of this host build one after another, and a rank that
   waits longer than a few seconds says for whom;
3. holding it, looks at torch's lock: if no process builds in that directory (none has it
   as its working directory, as ninja and the compiler do) its owner is gone: the lock is
   removed at once, and said so in one line naming the file and its age; if one does, the
   line names that process, and torch waits for it;
4. loads the op (building it if needed); DeepSpeed then finds it loaded.

The flock is held only around the build, which involves no other rank, so it cannot wait
on a peer.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import sys
import time
from pathlib import Path

#: The op DeepSpeed builds on CPUs, and the name of its build directory.
SHM_OP = "deepspeed_shm_comm"
#: A rank that waits this long for another's build says so (once).
SAY_WAITING_AFTER_S = 5.0


def own_op_build() -> Path:
    """Before DeepSpeed builds its op: this environment's ninja first on PATH and a build
    directory of this environment's own (unless TORCH_EXTENSIONS_DIR is set); returns it.

    ninja records a hash of each build command and rebuilds when it changes. Two ninja
    releases hash differently (1.11 and 1.13 do), and two environments compile with their own
    include paths: with the op's build directory shared by every environment of the user
    (torch's default, ~/.cache/torch_extensions/py311_cpu), each start under another PATH or
    from another virtual environment rebuilt the op from scratch, about 30 s of two cores."""
    own = Path(sys.executable).parent
    path = os.environ.get("PATH", "")
    if (own / "ninja").is_file() and path.split(os.pathsep)[0] != str(own):
        os.environ["PATH"] = os.pathsep.join([str(own), path]) if path else str(own)
    if "TORCH_EXTENSIONS_DIR" not in os.environ:
        tag = hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        os.environ["TORCH_EXTENSIONS_DIR"] = str(cache / "torch_extensions" / f"dstein-{Path(sys.prefix).name}-{tag}")
    return Path(os.environ["TORCH_EXTENSIONS_DIR"])


def builder_pids(build_dir: Path) -> list[int]:
    """Processes working in ``build_dir`` (ninja and the compiler run there): a build alive."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cwd = Path(os.readlink(entry / "cwd"))
            if cwd == build_dir or build_dir in cwd.parents:
                found.append(int(entry.name))
    return found


def check_build_lock(build_dir: Path) -> str | None:
    """What to say of torch's build lock in ``build_dir`` (None: there is none): removed when
    no process builds there, else the builder named (call it holding the builder flock)."""
    lock = build_dir / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except OSError:
        return None
    alive = builder_pids(build_dir)
    if alive:
        return (f"note: the build lock {lock} ({age:.0f}s old) belongs to a build under way (pid "
                f"{', '.join(map(str, alive))}): waiting for it")  # fmt: skip
    try:
        lock.unlink()
    except FileNotFoundError:
        return None
    except OSError as err:
        return (
            f"note: the stale build lock {lock} ({age:.0f}s old) cannot be removed ({err.strerror}): remove it by hand"
        )
    return f"note: removed the stale build lock {lock} ({age:.0f}s old; the build that made it was killed)"


@contextlib.contextmanager
def builder_flock(path: Path):
    """Hold the flock that lets one rank of this host build at a time (see the module)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        begin, said = time.monotonic(), False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not said and time.monotonic() - begin > SAY_WAITING_AFTER_S:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                    print(f"note: waiting for {holder} to finish building DeepSpeed's CPU op", file=sys.stderr,
                          flush=True)  # fmt: skip
                    said = True
                time.sleep(0.1)
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing drops the flock


def prepare_op() -> None:
    """Steps 1 to 4 of the module's docstring; a problem in them is left to DeepSpeed's own
    load, which reports it as it would without dstein."""
    root = own_op_build()
    try:
        import deepspeed.ops
        from deepspeed.accelerator import get_accelerator

        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
            return
    except Exception:  # no op to prepare on this accelerator
        return
    with builder_flock(root / f"{SHM_OP}.builder"):
        note = check_build_lock(root / SHM_OP)
        if note:
            print(note, file=sys.stderr, flush=True)
        with contextlib.suppress(Exception):
            builder.load(verbose=False)
