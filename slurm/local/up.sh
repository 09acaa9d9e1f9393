#!/bin/bash
# A single-node SLURM cluster on loopback, for dstein's tests and for trying the batch scripts
# on one machine. Needs root and Debian/Ubuntu packages (installed here if missing).
# State and logs: $DSTEIN_SLURM_STATE (default /tmp/dstein-slurm). Stop it with down.sh.
#
# Why each odd setting (measured on Debian 12, SLURM 22.05):
# - the node is called localhost (slurmd -N) at 127.0.0.1: the hostname may not resolve;
# - AuthInfo=cred_expire=5 + a fast scheduler: a requeued job restarts after ~7 s, not 150 s;
# - PMIx with PMIX_MCA_psec=native: pip's Open MPI has no munge security component.
set -euo pipefail
STATE=${DSTEIN_SLURM_STATE:-/tmp/dstein-slurm}
if [ "$(id -u)" != 0 ]; then echo "slurm/local/up.sh: needs root" >&2; exit 1; fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null \
   || [ ! -e /usr/lib/x86_64-linux-gnu/pmix2/lib/libpmix.so ]; then
  export DEBIAN_FRONTEND=noninteractive
  packages="slurm-wlm munge libpmix-dev"   # libpmix-dev: the unversioned libpmix.so SLURM's mpi/pmix loads
  apt-get install -y --no-install-recommends $packages >/dev/null \
    || { apt-get update >/dev/null && apt-get install -y --no-install-recommends $packages >/dev/null; }
fi
if [ "$(sinfo -h -n localhost -o %t 2>/dev/null)" = idle ]; then echo "slurm already up"; exit 0; fi
mkdir -p "$STATE/ctld" "$STATE/spool" /run/munge /var/log/munge /var/lib/munge /etc/munge /etc/slurm
[ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
chmod 700 /etc/munge; chmod 400 /etc/munge/munge.key; chmod 755 /run/munge
pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
munge -n | unmunge >/dev/null
hardware=$(slurmd -C | head -1 | sed 's/^NodeName=[^ ]* //')
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=dstein
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=5
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
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
NodeName=localhost NodeAddr=127.0.0.1 $hardware State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
echo 'PMIxEnv=PMIX_MCA_psec=native' > /etc/slurm/mpi.conf
slurmctld -i
slurmd -N localhost
for _ in $(seq 120); do
  [ "$(sinfo -h -n localhost -o %t 2>/dev/null)" = idle ] && { echo "slurm up (state in $STATE)"; exit 0; }
  sleep 0.5
done
echo "slurm/local/up.sh: the node did not become idle; logs in $STATE" >&2
tail -n 20 "$STATE"/*.log >&2 || true
exit 1
