"""Checkpoints and preemption: save and resume through DeepSpeed, commit markers, signals.

One concern a module: ``layout`` (folders, the commit marker), ``manifest`` (sizes and
SHA-256), ``state`` (the RNG states, and loading every file without running its code),
``compat`` (what a config change allows), ``checkpointer`` (the save protocol, pruning),
``resume`` (choosing, verifying, loading, setting aside), ``preemption`` (signals).

Layout of ``checkpoint.dir`` (default ``RUN_DIR/checkpoints``)::

    step-00000500/                 the state after 500 optimizer steps
        mp_rank_00_model_states.pt DeepSpeed: model (and, at ZeRO 0, the optimizer)
        zero_pp_rank_R_*.pt        DeepSpeed: optimizer shards (ZeRO 1 and 2)
        rng/rank-00000.pt          every RNG state of each rank
        config.yaml                the resolved config that wrote it
        MANIFEST.json              size and SHA-256 of every file above
        COMMITTED                  JSON; the folder counts only once this exists

Save protocol (every rank calls ``save``): rank 0 checks the free space against the last
checkpoint's size and clears a stale folder of the same step; every rank calls
``engine.save_checkpoint`` and writes its RNG file; the ranks hash the files (each a share)
and rank 0 writes ``MANIFEST.json``; rank 0 flushes the files to disk, writes ``COMMITTED``
under a temporary name and renames it, then deletes all but the newest ``checkpoint.keep``
complete folders. A write that fails on any rank (an OSError, or the RuntimeError torch
raises for a full disk) stops every rank alike (``RunStopped``) after the unfinished folder
is removed. A process killed at any moment leaves complete folders and at most one without
``COMMITTED``, which resume skips and reports.

Resume (``checkpoint.resume``): rank 0 lists the candidates (newest first) and broadcasts
them, so all ranks load the same one. A candidate is verified against its manifest (the
ranks hash shares of it), then loaded; one that fails either (damaged or truncated files,
non-finite weights, a loading error of any kind) is reported in one line, renamed
``step-NNNNNNNN.damaged`` and, with ``checkpoint.fallback`` (the default), the next one is
tried. The saved config is compared with the current one first (``check_resumable``).
A batch and its noise are pure functions of the step and the learning rate is a function of
the step, so model + optimizer + step is the whole training state; the RNG states and the
data cursor are saved as well, the cursor to check that the data file reads on as before.

Preemption: SIGTERM and ``checkpoint.signal`` (SIGUSR1) only set a flag (saving inside a
handler can deadlock a collective). Once per step the ranks agree on the flag with one
all-reduce; then every rank saves at the step boundary and the run raises
``errors.Preempted``, which ``launch/train.py`` turns into exit status 4 for the batch script
to requeue.
"""

from dstein.checkpoint.checkpointer import Checkpointer
from dstein.checkpoint.layout import (
    CONFIG_FILE,
    DAMAGED,
    MANIFEST,
    MARKER,
    RNG_DIR,
    CheckpointError,
    files_of,
    is_step_dir,
    read_marker,
    scan,
    step_dir,
    step_of,
)
from dstein.checkpoint.manifest import manifest_problem, shared_digests
from dstein.checkpoint.preemption import Interrupted, Preemption
from dstein.checkpoint.resume import Resume, Resumer

__all__ = [
    "CONFIG_FILE", "DAMAGED", "MANIFEST", "MARKER", "RNG_DIR", "CheckpointError", "Checkpointer", "Interrupted",
    "Preemption", "Resume", "Resumer", "files_of", "is_step_dir", "manifest_problem", "read_marker", "scan",
    "shared_digests", "step_dir", "step_of",
]  # fmt: skip
