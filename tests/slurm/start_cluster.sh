#!/usr/bin/env bash
# Start a throw-away SLURM cluster for the test suite: one slurmctld and NNODES slurmd daemons on
# this machine, each slurmd acting as its own node (n1..nN, all on 127.0.0.1), plus a private
# munged. Needs root and Debian's packages (installed here with apt-get when missing).
#
#   tests/slurm/start_cluster.sh DIR [NNODES]     # then: SLURM_CONF=DIR/etc/slurm.conf sbatch ...
#   tests/slurm/stop_cluster.sh DIR               # stops exactly what this started (by pid)
#
# Everything lives under DIR (config, state, logs, pid files, the munge key and socket); nothing in
# /etc is written, so clusters of several checkouts can run side by side on one machine: ports
# are picked free, FirstJobId is random (the sbatch scripts derive MASTER_PORT from the job id),
# and munged listens on DIR's socket (slurm.conf AuthInfo) with DIR's key.
#
# Exit status: 0 = cluster up (nodes idle); 77 = this machine cannot host it (not root, no
# apt-get, packages not installable) -> the caller skips, reason on the last stderr line;
# anything else = the cluster failed to come up (logs printed) -> a real failure.
set -euo pipefail

DIR=${1:?usage: start_cluster.sh DIR [NNODES]}
NNODES=${2:-2}
export PATH="$PATH:/usr/sbin:/sbin"
T0=$(date +%s)
log() { echo "[start_cluster +$(($(date +%s) - T0))s] $*"; }
skip() { echo "SKIP: $*" >&2; exit 77; }
fail() { echo "ERROR: $*" >&2; exit 1; }

# ---- 1. can this machine host it? -------------------------------------------------------------
# sun_path holds 107 bytes; slurmd puts per-step sockets at DIR/spool/<node>/<node>_<job>.<step>
[ "${#DIR}" -le 60 ] || fail "DIR '$DIR' is too long for the unix sockets under it; use a short path like /tmp/x"
[ "$(id -u)" -eq 0 ] || skip "a local SLURM cluster needs root (apt-get, munged as the munge user, slurmd)"
PKGS=(slurmctld slurmd slurm-client munge)
missing() { for c in slurmctld slurmd sbatch srun scontrol munged; do command -v "$c" >/dev/null || return 0; done; return 1; }
mkdir -p "$DIR"
if missing; then
  command -v apt-get >/dev/null || skip "SLURM is not installed and there is no apt-get to install ${PKGS[*]}"
  log "installing ${PKGS[*]} with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt_install() { apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends "${PKGS[@]}"; }
  if ! apt_install >"$DIR/apt.log" 2>&1; then
    apt-get -o DPkg::Lock::Timeout=300 update -q >>"$DIR/apt.log" 2>&1 || true
    apt_install >>"$DIR/apt.log" 2>&1 || { tail -n 20 "$DIR/apt.log" >&2; skip "apt-get install ${PKGS[*]} failed (see above)"; }
  fi
  missing && skip "apt-get installed ${PKGS[*]} but slurmctld/slurmd/sbatch/munged are still not on PATH"
fi
getent passwd munge >/dev/null || skip "the munge package did not create the 'munge' user"
log "$(slurmctld -V), munge $(munged --version 2>&1 | awk '{print $1; exit}')"

# ---- 2. directories ---------------------------------------------------------------------------
mkdir -p "$DIR"
chmod 0755 "$DIR"  # the munge user must traverse it to its socket directory
rm -rf "${DIR:?}/etc" "$DIR/spool" "$DIR/log" "$DIR/pids" "$DIR/munge"
mkdir -p "$DIR/etc" "$DIR/spool/ctld" "$DIR/log" "$DIR/pids"
install -d -o munge -g munge -m 0711 "$DIR/munge"  # munged wants x for all on its socket dir

# ---- 3. a private munged (own key and socket; the system's munged, if any, is left alone) ----
MUNGE_SOCKET=$DIR/munge/munge.socket
dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
chown munge:munge "$DIR/munge/munge.key"
chmod 0400 "$DIR/munge/munge.key"
setpriv --reuid=munge --regid=munge --init-groups -- munged --foreground \
  --socket="$MUNGE_SOCKET" --key-file="$DIR/munge/munge.key" --pid-file="$DIR/munge/munged.pid" \
  --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed" \
  >"$DIR/log/munged.out" 2>&1 </dev/null &
echo $! >"$DIR/pids/munged.pid"
for _ in $(seq 50); do munge -S "$MUNGE_SOCKET" -n 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1 && break; sleep 0.1; done
munge -S "$MUNGE_SOCKET" -n | unmunge -S "$MUNGE_SOCKET" >/dev/null \
  || { cat "$DIR/log/munged.out" "$DIR/munge/munged.log" >&2 2>/dev/null; fail "munged did not start"; }
log "munged up (pid $(cat "$DIR/pids/munged.pid"), socket $MUNGE_SOCKET)"

# ---- 4. free ports (below 20000: the jobs use 20000 + job id % 10000) -------------------------
port_free() { ! ss -Hltn "sport = :$1" | grep -q .; }
pick_ports() {  # NNODES+1 consecutive free ports: slurmctld, then one slurmd per node
  local base i ok
  for _ in $(seq 200); do
    base=$((12000 + RANDOM % 7000)); ok=1
    for i in $(seq 0 "$NNODES"); do port_free $((base + i)) || { ok=0; break; }; done
    [ "$ok" = 1 ] && { echo "$base"; return 0; }
  done
  return 1
}
CTLD_PORT=$(pick_ports) || fail "no free ports found in 12000-19000"
BASE_PORT=$((CTLD_PORT + 1))
LAST_PORT=$((BASE_PORT + NNODES - 1))

# ---- 5. slurm.conf ----------------------------------------------------------------------------
# Hardware line of this machine, e.g. "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1
# CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105"; every simulated node claims the CPUs and
# a 1/NNODES share of the memory (a node claiming more than slurmd measures is drained).
HW=$(slurmd -C | head -n1)
hw() { sed -n "s/.*[[:space:]]$1=\([0-9]*\).*/\1/p" <<<"$HW"; }
if [ "$NNODES" -gt 1 ]; then NODES="n[1-$NNODES]" PORTS="$BASE_PORT-$LAST_PORT"; else NODES=n1 PORTS=$BASE_PORT; fi
CONF=$DIR/etc/slurm.conf
cat >"$CONF" <<EOF
# generated by tests/slurm/start_cluster.sh
ClusterName=dtvgtest
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job may start again only after its old credentials expired (default
# 120 s + 1); 10 s lets the tests see a requeued job restart by SLURM's own rules, quickly.
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
StateSaveLocation=$DIR/spool/ctld
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/spool/slurmctld.pid
SlurmdPidFile=$DIR/spool/slurmd.%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=1
MailProg=/bin/true
FirstJobId=$((1000 + RANDOM % 9000))
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=600
# Several slurmd on one host (Debian builds with multiple-slurmd support): each is started with
# -N <node>; NodeHostname is this host so every slurmd recognises itself, NodeAddr is loopback.
NodeName=$NODES NodeHostname=$(hostname -s) NodeAddr=127.0.0.1 Port=$PORTS CPUs=$(hw CPUs) Boards=$(hw Boards) SocketsPerBoard=$(hw SocketsPerBoard) CoresPerSocket=$(hw CoresPerSocket) ThreadsPerCore=$(hw ThreadsPerCore) RealMemory=$(($(hw RealMemory) / NNODES)) State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF=$CONF

# ---- 6. daemons (foreground mode, backgrounded, pids recorded for stop_cluster.sh) -----------
slurmctld -D -i -f "$CONF" >"$DIR/log/slurmctld.out" 2>&1 </dev/null &
echo $! >"$DIR/pids/slurmctld.pid"
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q 'is UP' && break; sleep 0.2; done
scontrol ping 2>/dev/null | grep -q 'is UP' \
  || { tail -n 30 "$DIR/log/slurmctld.out" "$DIR/log/slurmctld.log" >&2 2>/dev/null; fail "slurmctld did not come up"; }
log "slurmctld up on port $CTLD_PORT (pid $(cat "$DIR/pids/slurmctld.pid"))"
for i in $(seq 1 "$NNODES"); do
  mkdir -p "$DIR/spool/n$i"
  slurmd -D -N "n$i" -f "$CONF" >"$DIR/log/slurmd.n$i.out" 2>&1 </dev/null &
  echo $! >"$DIR/pids/slurmd.n$i.pid"
done

# ---- 7. wait until every node is idle ---------------------------------------------------------
idle() { sinfo -h -N -t idle -o '%N' 2>/dev/null | sort -u | wc -l; }
for _ in $(seq 120); do [ "$(idle)" -eq "$NNODES" ] && break; sleep 0.5; done
if [ "$(idle)" -ne "$NNODES" ]; then
  sinfo -N >&2 || true; scontrol show node >&2 || true
  tail -n 20 "$DIR"/log/*.log "$DIR"/log/*.out >&2 2>/dev/null || true
  fail "the $NNODES slurmd nodes did not become idle"
fi
echo "export SLURM_CONF=$CONF" >"$DIR/slurm.env"
log "cluster up: $NNODES nodes ($NODES) x $(hw CPUs) CPUs, slurmd ports $PORTS; SLURM_CONF=$CONF"
