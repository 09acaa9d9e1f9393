#!/bin/bash
# Stop the cluster of multinode-up.sh and remove everything it made: jobs, daemons (munged
# too if it started it), the processes left in its namespaces, the namespaces, the veth
# links, the bridge, the /etc/hosts lines and the state folder. Safe to run when nothing (or
# only part) is up.
STATE=${DSTEIN_SLURM_MULTI_STATE:-/tmp/dstein-slurm-multi}
MARK="# dstein multinode harness"
export SLURM_CONF=$STATE/slurm.conf
if [ -s "$STATE/slurmctld.pid" ]; then
  scancel --user="$(id -un)" 2>/dev/null || true
  for _ in $(seq 40); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.5; done
fi
for f in "$STATE"/slurmd-*.pid "$STATE/slurmctld.pid"; do
  [ -s "$f" ] && kill -TERM "$(cat "$f")" 2>/dev/null
done
for ns in $(ip netns list 2>/dev/null | awk '/^dstein-node/ {print $1}'); do
  pids=$(ip netns pids "$ns" 2>/dev/null)
  [ -n "$pids" ] && kill -TERM $pids 2>/dev/null
done
for _ in $(seq 50); do
  left=""
  for ns in $(ip netns list 2>/dev/null | awk '/^dstein-node/ {print $1}'); do left="$left$(ip netns pids "$ns" 2>/dev/null)"; done
  [ -s "$STATE/slurmctld.pid" ] && kill -0 "$(cat "$STATE/slurmctld.pid")" 2>/dev/null && left="${left}ctld"
  [ -z "$left" ] && break
  sleep 0.1
done
for ns in $(ip netns list 2>/dev/null | awk '/^dstein-node/ {print $1}'); do
  pids=$(ip netns pids "$ns" 2>/dev/null)
  [ -n "$pids" ] && kill -KILL $pids 2>/dev/null
  ip netns del "$ns" 2>/dev/null
done
[ -s "$STATE/slurmctld.pid" ] && kill -KILL "$(cat "$STATE/slurmctld.pid")" 2>/dev/null
for link in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | sed 's/@.*//' | grep -E '^dsv[0-9]+$'); do
  ip link del "$link" 2>/dev/null
done
ip link del dstbr0 2>/dev/null
if grep -q "$MARK" /etc/hosts 2>/dev/null; then
  grep -v "$MARK" /etc/hosts > /etc/hosts.dstein-tmp && cat /etc/hosts.dstein-tmp > /etc/hosts
  rm -f /etc/hosts.dstein-tmp
fi
if [ -e "$STATE/started-munged" ] && [ -s /run/munge/munged.pid ]; then
  kill -TERM "$(cat /run/munge/munged.pid)" 2>/dev/null && rm -f /run/munge/munged.pid
fi
rm -rf "$STATE"
exit 0
