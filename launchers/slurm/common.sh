# Shared body of launchers/slurm/stage1.sbatch and stage2.sbatch (sourced, not submitted).
#
# One torchrun launcher per node through `srun` (no SSH): torchrun starts NPROC_PER_NODE ranks on
# its node; the nodes meet at the head node's address on a per-job port. See docs/slurm.md.
#
# Environment (all optional):
#   DTVG_ROOT        the dtvg_ds checkout (default: the directory you ran sbatch from)
#   DTVG_PYTHON      its python (default: $DTVG_ROOT/.venv/bin/python if present, else python3)
#   DS_ACCELERATOR   unset = GPUs (NCCL); "cpu" = CPU ranks (gloo)
#   NPROC_PER_NODE   ranks per node (default: the GPUs SLURM gave the node; 1 with DS_ACCELERATOR=cpu)
#   DTVG_RESUME      value of --resume (default "auto": continue from the newest checkpoint in
#                    --output_dir, which is what makes a requeued job pick up where it stopped;
#                    set it empty to start fresh)
#   DTVG_MAX_REQUEUES  stop requeueing on the time-limit signal after this many restarts (default 20)
#   DTVG_MASTER_ADDR / DTVG_MASTER_PORT  override the rendezvous address / port
#   HF_HOME, HF_HUB_OFFLINE  passed to every node like the rest of the environment: for compute
#                    nodes without network, fetch on a login node with
#                    `HF_HOME=/shared/hf python -m dtvg_ds.fetch --model_name_or_path M --task T ...`
#                    and submit with HF_HOME=/shared/hf HF_HUB_OFFLINE=1 (README, "Offline nodes")
# Every argument after the script name is passed to launchers/train.py unchanged.

set -euo pipefail

_log() { echo "[dtvg-slurm $(date +%H:%M:%S)] $*"; }
_die() { echo "[dtvg-slurm] error: $*" >&2; exit 2; }

dtvg_slurm_launch() {  # dtvg_slurm_launch <train.py args...>
  [ -n "${SLURM_JOB_ID:-}" ] || _die "submit this with sbatch (no SLURM_JOB_ID in the environment)"
  trap '' USR1  # until training starts, the time-limit signal must not kill the job (see below)

  # ---- code and interpreter -------------------------------------------------------------------
  # sbatch runs a spooled copy of the script, so the checkout is found from the submit directory.
  export DTVG_ROOT=${DTVG_ROOT:-$SLURM_SUBMIT_DIR}
  [ -f "$DTVG_ROOT/launchers/train.py" ] \
    || _die "no launchers/train.py under DTVG_ROOT=$DTVG_ROOT; run sbatch from the dtvg_ds checkout or set DTVG_ROOT"
  if [ -z "${DTVG_PYTHON:-}" ]; then
    if [ -x "$DTVG_ROOT/.venv/bin/python" ]; then DTVG_PYTHON=$DTVG_ROOT/.venv/bin/python; else DTVG_PYTHON=python3; fi
  fi
  export DTVG_PYTHON

  # ---- ranks per node ---------------------------------------------------------------------------
  if [ "${DS_ACCELERATOR:-}" = cpu ]; then
    NPROC_PER_NODE=${NPROC_PER_NODE:-1}
  else
    NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
    if [ -z "$NPROC_PER_NODE" ] || [ "$NPROC_PER_NODE" = 0 ]; then
      _die "no GPUs in this allocation: request them (sbatch --gpus-per-node=G), or set \
NPROC_PER_NODE, or DS_ACCELERATOR=cpu for CPU ranks"
    fi
  fi
  export NPROC_PER_NODE

  # ---- rendezvous: the head node's address and a port of this job -----------------------------
  # The head node is the first of the allocation; its NodeAddr is how SLURM itself reaches it
  # (equal to the host name on most clusters). The port is derived from the job id so that two
  # jobs sharing a node do not both take 29500; a requeued job keeps its id and so its port.
  local nodes head addr
  mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
  head=${nodes[0]}
  addr=$(scontrol show node "$head" 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p') || true
  addr=${addr%%$'\n'*}
  export MASTER_ADDR=${DTVG_MASTER_ADDR:-${addr:-$head}}
  export MASTER_PORT=${DTVG_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 10000))}

  # ---- resume: a requeued job continues from the newest complete checkpoint -------------------
  local args=("$@")
  if [ -n "${DTVG_RESUME-auto}" ]; then args=(--resume "${DTVG_RESUME-auto}" "${args[@]}"); fi

  # The CPUs SLURM gave this job on a node all go to the node's one launcher task (srun does not
  # inherit sbatch's --cpus-per-task since Slurm 22.05, so pass it explicitly).
  local cpus=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}

  _log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) nodes $SLURM_JOB_NODELIST:" \
       "$SLURM_NNODES x $NPROC_PER_NODE ranks (${DS_ACCELERATOR:-gpu}), $cpus CPUs per node," \
       "rendezvous $MASTER_ADDR:$MASTER_PORT"
  _log "python $DTVG_PYTHON; train.py ${args[*]}"
  # What the ranks will read the backbone and data from (exported to every node by srun).
  _log "HF_HOME ${HF_HOME:-~/.cache/huggingface (default)}, HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-0}"
  if [ -n "${HF_HOME:-}" ]; then export HF_HOME; fi
  if [ -n "${HF_HUB_OFFLINE:-}" ]; then export HF_HUB_OFFLINE; fi

  # ---- the output directory must be one directory seen by every node --------------------------
  # (rank 0 writes the artifact and logs, every rank writes its checkpoint shard and group trace)
  local i
  _DTVG_OUT=""
  for ((i = 0; i < ${#args[@]}; i++)); do
    case ${args[i]} in
      --output_dir) _DTVG_OUT=${args[i + 1]:-} ;;
      --output_dir=*) _DTVG_OUT=${args[i]#*=} ;;
    esac
  done
  if [ -n "$_DTVG_OUT" ]; then
    mkdir -p "$_DTVG_OUT"
    local marker
    marker=$(cd "$_DTVG_OUT" && pwd)/.slurm-shared-check.$SLURM_JOB_ID
    touch "$marker"
    # shellcheck disable=SC2016  # expanded by the task on each node
    srun --kill-on-bad-exit=1 --nodes="$SLURM_NNODES" --ntasks-per-node=1 --cpus-per-task=1 \
      bash -c '[ -e "$1" ] || { echo "node $SLURMD_NODENAME cannot see $1" >&2; exit 1; }' _ "$marker" \
      || { rm -f "$marker"; _die "--output_dir $_DTVG_OUT is not on a filesystem shared by all nodes; \
put it on one (all ranks write checkpoints there)"; }
    rm -f "$marker"
  fi
  _DTVG_CKPT0=$(_dtvg_newest_checkpoint)
  [ -z "$_DTVG_CKPT0" ] || _log "newest checkpoint: ${_DTVG_CKPT0%/trainer_state.json} (--resume ${DTVG_RESUME-auto})"

  # ---- stop cleanly and requeue on the time-limit warning -------------------------------------
  # `#SBATCH --signal=B:USR1@<s>` sends SIGUSR1 to this shell <s> seconds before the time limit
  # (a job that reaches its limit ends as TIMEOUT for good). The shell then passes SIGUSR1 on to
  # the training step: every rank finishes its current step, they write a checkpoint together
  # and exit (launchers/train.py exits 3). Then the job is requeued under the same id; SLURM
  # starts it again (after ~2 minutes at the earliest) and it resumes (--resume auto) from that
  # checkpoint, so no step is lost. torchrun itself ignores SIGUSR1 (`trap '' USR1` before its
  # exec; an ignored signal stays ignored across exec), so it neither dies nor cuts the ranks'
  # checkpoint short with its own 30-s SIGTERM->SIGKILL shutdown. The job is not requeued if the
  # run finished anyway, or wrote no checkpoint since this job started (it would only repeat the
  # same work, e.g. when --time is shorter than the signal's lead time, which signals at once).
  _DTVG_STOPPING=0
  trap _dtvg_on_time_limit USR1

  # ---- one torchrun per node ------------------------------------------------------------------
  # The single quotes matter: $SLURM_NODEID must be expanded by each node's task, not once here.
  # torchrun runs as `python -m torch.distributed.run` of DTVG_PYTHON (same thing, right venv).
  # --kill-on-bad-exit: one failing node ends the whole step instead of leaving the others
  # waiting in a collective until the process-group timeout.
  # shellcheck disable=SC2016  # expanded by the task on each node
  srun --kill-on-bad-exit=1 --nodes="$SLURM_NNODES" --ntasks-per-node=1 --cpus-per-task="$cpus" --label \
    bash -c 'trap "" USR1; exec "$DTVG_PYTHON" -m torch.distributed.run \
      --nnodes="$SLURM_NNODES" --node_rank="$SLURM_NODEID" --nproc_per_node="$NPROC_PER_NODE" \
      --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" --max_restarts=0 \
      "$DTVG_ROOT/launchers/train.py" "$@"' dtvg-node "${args[@]}" &
  local srun_pid=$! rc=0
  # Wait in the background so the shell can run the USR1 trap while training runs; `wait`
  # returns early (status > 128) when a trapped signal arrives, so wait again until srun is gone.
  while :; do
    if wait "$srun_pid"; then rc=0; else rc=$?; fi
    kill -0 "$srun_pid" 2>/dev/null || break
  done
  trap '' USR1  # from here on a late signal changes nothing
  _log "srun exited with status $rc"
  if [ "$_DTVG_STOPPING" = 1 ] && [ "$rc" != 0 ] && _dtvg_requeue; then
    return 0  # SLURM ends this allocation and queues the job again
  fi
  return "$rc"
}

_dtvg_on_time_limit() {  # USR1 trap: ask every rank of the training step to checkpoint and stop
  _DTVG_STOPPING=1
  _log "SIGUSR1: the time limit is near; asking the ranks to checkpoint at the end of this step and stop"
  # without --batch/--full, scancel signals the job's steps only, not this shell
  scancel --signal=USR1 "$SLURM_JOB_ID" || _log "scancel --signal=USR1 $SLURM_JOB_ID failed"
}

_dtvg_newest_checkpoint() {  # newest complete checkpoint of the run (trainer_state.json is written last)
  [ -n "${_DTVG_OUT:-}" ] || return 0
  local f newest=""
  for f in "$_DTVG_OUT"/checkpoints/step-*/trainer_state.json; do [ -e "$f" ] && newest=$f; done
  echo "$newest"
}

_dtvg_requeue() {  # requeue this job if that makes progress; status 0 iff requeued
  if [ "${SLURM_RESTART_COUNT:-0}" -ge "${DTVG_MAX_REQUEUES:-20}" ]; then
    _log "not requeueing: the job was already restarted ${SLURM_RESTART_COUNT} times (DTVG_MAX_REQUEUES)"
    return 1
  fi
  local newest
  newest=$(_dtvg_newest_checkpoint)
  if [ -n "${_DTVG_OUT:-}" ] && [ "$newest" = "${_DTVG_CKPT0:-}" ]; then
    _log "not requeueing: no checkpoint was written since this job started, a restart would \
repeat the same work; raise --time or lower --save_steps"
    return 1
  fi
  _log "requeueing job $SLURM_JOB_ID; it will resume from ${newest%/trainer_state.json}"
  scontrol requeue "$SLURM_JOB_ID" && return 0
  _log "scontrol requeue $SLURM_JOB_ID failed (submitted with --no-requeue?)"
  return 1
}
