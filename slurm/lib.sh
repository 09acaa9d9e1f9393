# Shared by train.sbatch and multinode.sbatch (sourced, not run): settings, the preemption
# signal, requeue. Variables are documented in the two scripts' headers.
#
# Preemption, as it happens: SLURM sends SIGUSR1 to this batch shell (--signal=B:USR1@SECONDS,
# or `scancel -b --signal=USR1 JOBID`); bash runs a trap only between commands, so the
# training runs in the background and the shell waits for it; the trap forwards the signal
# to the ranks (the caller's forward_signal), which finish the step, save a checkpoint and exit
# with status 4; the shell then requeues the job, which starts again with the same job id,
# hence the same run directory, and resumes from the checkpoint (checkpoint.resume=auto).

set -euo pipefail
DSTEIN=${DSTEIN:-$SLURM_SUBMIT_DIR}
CONFIG=${CONFIG:-configs/hjb_250.yaml}
OVERRIDES=${OVERRIDES:-}
RUN_ROOT=${RUN_ROOT:-runs}
RUN_DIR=${RUN_DIR:-$RUN_ROOT/slurm-$SLURM_JOB_ID}
MAX_RESTARTS=${MAX_RESTARTS:-20}
VENV=${VENV:-$DSTEIN/.venv}
PREEMPTED_EXIT=4   # launch/train.py: a checkpoint was saved; the same command continues the run
cd "$DSTEIN"
echo "dstein job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $(hostname) at $(date -Is): run.dir=$RUN_DIR"

# run_and_requeue forward_signal CMD...: start CMD, forward SIGUSR1 with forward_signal, wait,
# requeue the job if CMD was preempted.
run_and_requeue() {
  local forward=$1 child status
  shift
  "$@" &
  child=$!
  # shellcheck disable=SC2064  # expand $forward and $child now
  trap "echo \"dstein: SIGUSR1 at \$(date -Is): asking the ranks to save and stop\"; $forward $child" USR1
  while true; do
    status=0
    wait "$child" || status=$?
    kill -0 "$child" 2>/dev/null || break  # else a trap interrupted the wait: wait again
  done
  trap - USR1
  if [ "$status" -eq "$PREEMPTED_EXIT" ]; then
    if [ "${SLURM_RESTART_COUNT:-0}" -ge "$MAX_RESTARTS" ]; then
      echo "dstein: preempted, but not requeued: MAX_RESTARTS=$MAX_RESTARTS reached; resubmit to continue"
      exit "$status"
    fi
    echo "dstein: checkpoint saved; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  exit "$status"
}
