#!/usr/bin/env bash
# Stop the cluster that tests/slurm/start_cluster.sh DIR started: cancel its jobs, then stop its
# slurmd's, slurmctld and munged by the pids recorded in DIR/pids (never by process name, so other
# clusters and daemons on this machine are untouched). Safe to run twice or on a half-started DIR.
#
#   tests/slurm/stop_cluster.sh DIR
set -uo pipefail

DIR=${1:?usage: stop_cluster.sh DIR}
export PATH="$PATH:/usr/sbin:/sbin"
export SLURM_CONF=$DIR/etc/slurm.conf
[ -d "$DIR/pids" ] || { echo "stop_cluster: nothing to stop in $DIR"; exit 0; }

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# 1. cancel every job of this cluster and wait (<= 30 s) until its queue is empty, so that the
#    job steps (slurmstepd + the training processes) end through SLURM itself
if alive "$DIR/pids/slurmctld.pid" && [ -f "$SLURM_CONF" ]; then
  jobs=$(squeue -h -o %i 2>/dev/null)
  if [ -n "$jobs" ]; then
    echo "stop_cluster: cancelling jobs ${jobs//$'\n'/ }"
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null
    for _ in $(seq 60); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.5; done
  fi
fi

stop_pid() {  # stop_pid NAME PIDFILE: SIGTERM, up to 10 s, then SIGKILL
  local name=$1 f=$2 pid
  alive "$f" || return 0
  pid=$(cat "$f")
  echo "stop_cluster: stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
  echo "stop_cluster: $name (pid $pid) ignored SIGTERM; SIGKILL"
  kill -KILL "$pid" 2>/dev/null
}

# 2. slurmd's first (they report to slurmctld), then slurmctld, then munged (used by both)
for f in "$DIR"/pids/slurmd.*.pid; do
  [ -e "$f" ] || continue
  n=${f##*/slurmd.}
  stop_pid "slurmd ${n%.pid}" "$f"
done
stop_pid slurmctld "$DIR/pids/slurmctld.pid"
stop_pid munged "$DIR/pids/munged.pid"

# 3. job steps outlive slurmd by design; a slurmstepd of ours is one whose open files are in DIR
#    (its step socket). Normally step 1 ended them all; if not (e.g. slurmd died first), stop them
#    together with the job processes below them (found before they are orphaned).
ours() {
  local p fd
  for p in /proc/[0-9]*; do
    [ "$(cat "$p/comm" 2>/dev/null)" = slurmstepd ] || continue
    for fd in "$p"/fd/*; do
      if [[ "$(readlink "$fd" 2>/dev/null)" == "$DIR/"* ]]; then echo "${p#/proc/}"; break; fi
    done
  done
}
below() {  # below PID: every descendant of PID
  local k
  for k in $(ps -o pid= --ppid "$1" 2>/dev/null); do echo "$k"; below "$k"; done
}
started() { sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | awk '{print $20}'; }  # start time
left=()
for pid in $(ours); do
  tree="$pid $(below "$pid" | tr '\n' ' ')"
  echo "stop_cluster: stopping leftover slurmstepd $pid and its processes: $tree"
  for p in $tree; do left+=("$p:$(started "$p")"); kill -TERM "$p" 2>/dev/null; done
done
if [ "${#left[@]}" -gt 0 ]; then
  sleep 2
  for e in "${left[@]}"; do  # SIGKILL only the same processes (pid and start time) still there
    [ -n "${e#*:}" ] && [ "$(started "${e%%:*}")" = "${e#*:}" ] && kill -KILL "${e%%:*}" 2>/dev/null
  done
fi
for f in "$DIR"/pids/*.pid; do
  [ -e "$f" ] || continue
  if alive "$f"; then echo "stop_cluster: WARNING: pid $(cat "$f") ($f) still running" >&2; exit 1; fi
done
rm -f "$DIR"/pids/*.pid
echo "stop_cluster: stopped"
