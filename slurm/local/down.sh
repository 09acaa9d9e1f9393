#!/bin/bash
# Stop the cluster started by up.sh: cancel jobs, stop the daemons, delete its state.
STATE=${DSTEIN_SLURM_STATE:-/tmp/dstein-slurm}
if [ -s "$STATE/slurmctld.pid" ]; then
  scancel --user="$(id -un)" 2>/dev/null || true
  for _ in $(seq 60); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.5; done
fi
pids=""
for f in "$STATE/slurmd.pid" "$STATE/slurmctld.pid" /run/munge/munged.pid; do
  [ -s "$f" ] && p=$(cat "$f") && kill -TERM "$p" 2>/dev/null && pids="$pids $p"
done
alive=""
for _ in $(seq 100); do
  alive=""; for p in $pids; do kill -0 "$p" 2>/dev/null && alive="$alive $p"; done
  [ -z "$alive" ] && break; sleep 0.1
done
for p in $alive; do kill -KILL "$p" 2>/dev/null; done
rm -rf "$STATE" /run/munge/munged.pid
