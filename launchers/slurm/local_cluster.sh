#!/usr/bin/env bash
# A real 2-node SLURM cluster on this one machine, for the integration tests (`pytest -m slurm`).
# Usage: launchers/slurm/local_cluster.sh up|down|status   (as root; Debian packages)
# Two slurmd pose as nodes n1 and n2 on 127.0.0.1. `down` stops exactly the daemons `up` started,
# by the PIDs it recorded. State, logs and PIDs live in $DDRL_SLURM_STATE (default /tmp/ddrl-slurm).
set -euo pipefail
STATE=${DDRL_SLURM_STATE:-/tmp/ddrl-slurm}
CONF=/etc/slurm/slurm.conf
MARKER="# written by ddrl-scale launchers/slurm/local_cluster.sh"
HOST=$(hostname)

say() { echo "local_cluster: $*"; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
  if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
     || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
    say "installing slurmctld slurmd slurm-client munge"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      slurmctld slurmd slurm-client munge >/dev/null
  fi
}

write_config() {
  if [ -f "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
    say "$CONF exists and was not written by this script; refusing to replace it"; exit 1
  fi
  mkdir -p "$STATE"/{spool,log,run} /etc/slurm
  cat > "$CONF" <<CONF
$MARKER
ClusterName=ddrl-local
SlurmctldHost=$HOST
SlurmUser=root
AuthType=auth/munge
# a requeued job may start again after the job credential expires (default 120 s); short for tests
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/spool/ctld
SlurmdSpoolDir=$STATE/spool/d_%n
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd_%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd_%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
EnforcePartLimits=ALL
SlurmdParameters=config_overrides
MailProg=/bin/true
JobRequeue=1
SchedulerParameters=sched_interval=1
MessageTimeout=20
NodeName=n[1-2] NodeHostname=$HOST NodeAddr=127.0.0.1 Port=17001-17002 CPUs=2 RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP
CONF
  grep -qE '^127\.0\.0\.1.*\bn1\b' /etc/hosts || echo "127.0.0.1 n1 n2" >> /etc/hosts
}

up() {
  [ "$(id -u)" -eq 0 ] || { say "must run as root"; exit 1; }
  install_packages
  write_config
  if ! pgrep -x munged >/dev/null; then
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    [ -f /etc/munge/munge.key ] || { dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
    runuser -u munge -- munged
    sleep 0.5
    cp /run/munge/munged.pid "$STATE/run/munged.pid"
    echo "munged $(cat /run/munge/munged.pid)" >> "$STATE/run/started.pids"
  fi
  if ! alive "$STATE/run/slurmctld.pid"; then
    slurmctld; sleep 0.3; echo "slurmctld $(cat "$STATE/run/slurmctld.pid")" >> "$STATE/run/started.pids"
  fi
  for node in n1 n2; do
    if ! alive "$STATE/run/slurmd_$node.pid"; then
      slurmd -N "$node"; sleep 0.3
      echo "slurmd_$node $(cat "$STATE/run/slurmd_$node.pid")" >> "$STATE/run/started.pids"
    fi
  done
  for _ in $(seq 1 60); do
    if [ "$(sinfo -h -o '%t' 2>/dev/null | grep -cE '^idle')" -ge 1 ] \
       && ! sinfo -h -o '%t' | grep -qvE '^idle'; then
      say "up: $(sinfo -h -o '%D nodes %t in %P')"; return 0
    fi
    scontrol update nodename=n[1-2] state=resume >/dev/null 2>&1 || true
    sleep 0.5
  done
  say "nodes did not become idle:"; sinfo || true; tail -n 20 "$STATE/log/slurmctld.log" || true; exit 1
}

stop() {  # stop <name> <pid>: TERM, wait up to 10 s, then KILL
  kill "$2" 2>/dev/null || return 0
  for _ in $(seq 1 50); do kill -0 "$2" 2>/dev/null || { say "stopped $1 ($2)"; return 0; }; sleep 0.2; done
  kill -9 "$2" 2>/dev/null || true
  say "killed $1 ($2) after 10 s"
}

down() {
  # every PID `up` recorded (started.pids) and the daemons' own pidfiles
  local entries=()
  [ -f "$STATE/run/started.pids" ] && mapfile -t entries < "$STATE/run/started.pids"
  for pidfile in "$STATE"/run/slurmd_n1.pid "$STATE"/run/slurmd_n2.pid "$STATE"/run/slurmctld.pid \
                 "$STATE"/run/munged.pid; do
    [ -f "$pidfile" ] && entries+=("$(basename "$pidfile" .pid) $(cat "$pidfile")")
  done
  for entry in "${entries[@]}"; do stop ${entry}; done
  rm -f "$STATE"/run/*.pid "$STATE/run/started.pids"
}

status() {
  for pidfile in "$STATE"/run/*.pid; do
    [ -e "$pidfile" ] || continue
    if alive "$pidfile"; then echo "$(basename "$pidfile" .pid): running"; else echo "$(basename "$pidfile" .pid): dead"; fi
  done
  sinfo 2>/dev/null || say "slurmctld not answering"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status"; exit 2 ;;
esac
