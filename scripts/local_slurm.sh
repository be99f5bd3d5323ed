#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the tests that run jobs through a real scheduler
# (sbatch, srun, scontrol requeue) and for trying hydra/launcher=slurm without a cluster.
#
#   scripts/local_slurm.sh start    # install (Debian, root) when missing, write the config, start, wait for the node
#   scripts/local_slurm.sh status   # sinfo of the local cluster; exit 1 when it does not answer
#   scripts/local_slurm.sh stop     # stop the daemons this script started
#   scripts/local_slurm.sh env      # the line to paste: export SLURM_CONF=<dir>/slurm.conf
#
# Everything lives in $LOCAL_SLURM_DIR (default /tmp/recsys-slurm): slurm.conf, the munge key and socket,
# state, spool, logs, pid files. The SLURM commands find the cluster through SLURM_CONF (the tests set it
# from this folder). The node has the machine's CPUs (nproc) and memory; process tracking by
# /proc (proctrack/linuxproc), no task binding (task/none): nothing needs cgroups or systemd, so it runs
# in a container. Daemons run as root (slurmd must start jobs as their user), so start needs root.
set -euo pipefail

DIR=${LOCAL_SLURM_DIR:-/tmp/recsys-slurm}
CONF=$DIR/slurm.conf
PORT=${LOCAL_SLURM_PORT:-6817}   # slurmctld's port; slurmd's is the next one
PACKAGES="slurmctld slurmd slurm-client munge"

say() { echo "local_slurm: $*" >&2; }

cluster_env() {
  export SLURM_CONF=$CONF
}

answers() {  # the node is up (idle, mixed or allocated) in this cluster
  cluster_env
  [ -f "$CONF" ] && timeout 10 sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated|completing)'
}

install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
      && command -v munged >/dev/null; then
    return 0
  fi
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    say "cannot start: SLURM is not installed and installing it needs root and apt-get ($PACKAGES)"
    return 1
  fi
  say "installing $PACKAGES"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $PACKAGES >/dev/null
}

write_config() {
  local host cpus mem_mb
  host=$(hostname -s)
  cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc alone honours OMP_NUM_THREADS (.ci/run sets 1)
  mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
  mkdir -p "$DIR"/{state,spool,log,run}
  chmod 700 "$DIR"
  if [ ! -f "$DIR/munge.key" ]; then
    dd if=/dev/urandom of="$DIR/munge.key" bs=1024 count=1 status=none
    chmod 400 "$DIR/munge.key"
  fi
  cat >"$CONF" <<EOF
# written by scripts/local_slurm.sh: a one-node cluster on $host
ClusterName=recsys-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/run/munge.socket
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SwitchType=switch/none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
MaxJobCount=100000
MinJobAge=600
JobRequeue=1
SchedulerParameters=sched_interval=2
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
KillWait=10
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
  if answers; then
    say "already running ($CONF)"
    return 0
  fi
  install
  if [ "$(id -u)" != 0 ]; then
    say "cannot start: the daemons (slurmd starts jobs as their user) need root"
    return 1
  fi
  stop >/dev/null 2>&1 || true
  write_config
  munged --force --key-file="$DIR/munge.key" --socket="$DIR/run/munge.socket" --pid-file="$DIR/run/munged.pid" \
    --log-file="$DIR/log/munged.log" --seed-file="$DIR/run/munged.seed"
  slurmctld -f "$CONF" -i   # -i: ignore state left by an earlier start
  slurmd -f "$CONF"
  cluster_env
  for _ in $(seq 1 60); do
    if answers; then
      say "node idle after starting: export SLURM_CONF=$CONF"
      sinfo >&2
      return 0
    fi
    if sinfo -h -o '%T' 2>/dev/null | grep -qE '^(down|drain)'; then
      scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true
    fi
    sleep 1
  done
  say "the node did not come up within 60 s; logs in $DIR/log:"
  tail -n 20 "$DIR"/log/*.log >&2 || true
  return 1
}

stop_pid() {  # stop the daemon whose pid file this script's config names
  local file=$DIR/run/$1.pid
  [ -f "$file" ] || return 0
  local pid
  pid=$(cat "$file")
  if kill "$pid" 2>/dev/null; then
    for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  fi
  rm -f "$file"
}

stop() {
  stop_pid slurmd
  stop_pid slurmctld
  stop_pid munged
  say "stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) if answers; then sinfo; else say "not running ($CONF)"; exit 1; fi ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
