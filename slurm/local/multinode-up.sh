#!/bin/bash
# A SLURM cluster of N compute nodes (default 2) on this one machine, for dstein's multi-node
# tests: each slurmd runs in its own network namespace (its own address on a veth pair joined
# to a bridge) and UTS namespace (its own host name), as separate hosts would. slurmctld runs
# in the root namespace on the bridge's address. Root only; Debian/Ubuntu packages as up.sh.
#
#   slurm/local/multinode-up.sh [N]      then   SLURM_CONF=$STATE/slurm.conf sbatch ...
#   slurm/local/multinode-down.sh        stops the daemons, removes namespaces, links, host names
#
# What it mimics of a real cluster, and how:
# - hosts: dnode1..dnodeN at 10.77.0.2..; the controller dctl at 10.77.0.1 (bridge dstbr0);
#   the names resolve through /etc/hosts lines this script adds (marked, removed by down.sh);
# - traffic: between the namespaces only, over the bridge (no route out);
# - a cluster file system: all namespaces see the same files (only the network and the host
#   name are separate), so a run directory on it is shared by every node, as on NFS or Lustre;
# - the nodes share this machine's cores (each declares them all; tasks oversubscribe).
# It has its own config ($STATE/slurm.conf, ports 6917/6918), so the single-node cluster of
# up.sh can run beside it; pass SLURM_CONF to every client command.
set -euo pipefail
N=${1:-2}
STATE=${DSTEIN_SLURM_MULTI_STATE:-/tmp/dstein-slurm-multi}
BRIDGE=dstbr0
NET=10.77.0
MARK="# dstein multinode harness"
if [ "$(id -u)" != 0 ]; then echo "slurm/local/multinode-up.sh: needs root" >&2; exit 1; fi
HERE=$(cd "$(dirname "$0")" && pwd)
export SLURM_CONF=$STATE/slurm.conf
nodes_idle() { [ "$(sinfo -h -N -o %t 2>/dev/null | grep -c '^idle$')" = "$N" ]; }
if [ -s "$STATE/slurmctld.pid" ] && nodes_idle; then echo "multinode slurm already up ($N nodes)"; exit 0; fi
"$HERE/multinode-down.sh" >/dev/null 2>&1 || true  # leftovers of an earlier start
for cmd in slurmctld munged ip unshare nsenter; do
  command -v "$cmd" >/dev/null || { apt_needed=1; break; }
done
if [ -n "${apt_needed:-}" ] || [ ! -e /usr/lib/x86_64-linux-gnu/pmix2/lib/libpmix.so ]; then
  export DEBIAN_FRONTEND=noninteractive
  packages="slurm-wlm munge libpmix-dev iproute2 util-linux"
  apt-get install -y --no-install-recommends $packages >/dev/null \
    || { apt-get update >/dev/null && apt-get install -y --no-install-recommends $packages >/dev/null; }
fi
mkdir -p "$STATE/ctld" /run/munge /var/log/munge /var/lib/munge /etc/munge
[ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
chmod 700 /etc/munge; chmod 400 /etc/munge/munge.key; chmod 755 /run/munge
if ! pgrep -x munged >/dev/null; then  # started here: down.sh stops it again
  runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
  touch "$STATE/started-munged"
fi
for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done

# the network: a bridge in the root namespace, one namespace per node with eth0 on it
ip link add "$BRIDGE" type bridge
ip addr add "$NET.1/24" dev "$BRIDGE"
ip link set "$BRIDGE" up
hosts="$NET.1 dctl $MARK"
for i in $(seq "$N"); do
  ip netns add "dstein-node$i"
  ip link add "dsv$i" type veth peer name eth0 netns "dstein-node$i"
  ip link set "dsv$i" master "$BRIDGE"
  ip link set "dsv$i" up
  ip -n "dstein-node$i" addr add "$NET.$((i + 1))/24" dev eth0
  ip -n "dstein-node$i" link set eth0 up
  ip -n "dstein-node$i" link set lo up
  hosts="$hosts
$NET.$((i + 1)) dnode$i $MARK"
done
echo "$hosts" >> /etc/hosts

hardware=$(slurmd -C | head -1 | sed 's/^NodeName=[^ ]* //')
cat > "$SLURM_CONF" <<CONF
ClusterName=dsteinmulti
SlurmctldHost=dctl($NET.1)
SlurmctldPort=6917
SlurmdPort=6918
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=5
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool-%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd-%n.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=dnode[1-$N] NodeAddr=$NET.[2-$((N + 1))] $hardware State=UNKNOWN
PartitionName=multi Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
echo 'PMIxEnv=PMIX_MCA_psec=native' > "$STATE/mpi.conf"
# Each daemon gets the host name its config gives it (a UTS namespace of its own). nsenter
# enters only the node's network namespace: ip netns exec would also remount /sys, hiding
# the cgroup file system that slurmd needs.
unshare --uts sh -c "hostname dctl && exec slurmctld -i"
for i in $(seq "$N"); do
  mkdir -p "$STATE/spool-dnode$i"
  nsenter --net="/run/netns/dstein-node$i" unshare --uts sh -c "hostname dnode$i && exec slurmd -N dnode$i"
done
for _ in $(seq 120); do
  nodes_idle && { echo "multinode slurm up: $N nodes (SLURM_CONF=$SLURM_CONF)"; exit 0; }
  sleep 0.5
done
echo "slurm/local/multinode-up.sh: the nodes did not become idle; logs in $STATE" >&2
sinfo >&2 || true
tail -n 20 "$STATE"/*.log >&2 || true
exit 1
