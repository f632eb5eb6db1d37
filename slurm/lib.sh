# shellcheck shell=bash
# Shared by slurm/stage.sbatch and slurm/cache_array.sbatch (sourced, not run).
#
# sbatch copies a batch script into the spool directory, so the scripts find the repository
# through KDSLIM_REPO or the submit directory and source this file from there.
#
# Preemption protocol (FIELD_NOTES §4):
#   SLURM --signal=B:USR2@120 -> the batch shell (trap in kd_run_step)
#   -> srun (forwards USR2 to every task, i.e. to the per-node wrapper below)
#   -> the wrapper signals the training processes (the launcher's children, or the single
#      python process) -> every rank sets its stop flag, the ranks agree through an all-reduce,
#      rank 0 writes a checkpoint, the stage exits (75 = preempted after checkpointing)
#   -> the batch shell runs `scontrol requeue` and exits 0; the requeued job resumes from the
#      newest checkpoint (same command, same stage directory, same wandb run id).
#
# The launcher (accelerate launch / torchrun's elastic agent) is started with USR2 *ignored*:
# by default USR2 terminates a process, and the agent installs no handler for it. Its workers
# inherit the ignored disposition until the trainer installs its handler, so a signal that
# arrives during start-up cannot kill a rank; the wrapper repeats the signal every 10 s until
# the stage exits, so such a rank still gets it once its handler is installed.

kd_log() { echo "kdslim-slurm: $(date -u +%FT%TZ) $*" >&2; }
kd_die() {
    echo "kdslim-slurm: ERROR: $*" >&2
    exit 2
}

# kd_activate VENV: activate the virtual environment (path relative to the repo or absolute).
kd_activate() {
    local venv=$1
    [[ -f $venv/bin/activate ]] \
        || kd_die "no virtualenv at '$venv' (run 'make install' in the repo, or pass --venv DIR / set KDSLIM_VENV)"
    # shellcheck disable=SC1091
    source "$venv/bin/activate"
    command -v python >/dev/null || kd_die "'$venv' has no python"
}

# kd_is_cpu: true when no GPU is visible (nvidia-smi); KDSLIM_CPU=1/0 forces it.
kd_is_cpu() {
    case ${KDSLIM_CPU:-auto} in
        1) return 0 ;;
        0) return 1 ;;
    esac
    ! nvidia-smi -L >/dev/null 2>&1
}

# The per-task wrapper run by srun on every node (as `bash -c "$KD_NODE_WRAPPER" node CMD...`).
# A literal "@MACHINE_RANK@" argument is replaced by $SLURM_NODEID *here, inside the task*, so
# every node gets its own rank (accelerate#2816: expanded in the batch shell, every node would
# be rank 0 and the rendezvous would hang).
# shellcheck disable=SC2016
KD_NODE_WRAPPER='
cmd=()
for a in "$@"; do
    [[ $a == @MACHINE_RANK@ ]] && a=$SLURM_NODEID
    cmd+=("$a")
done
( trap "" USR2; exec "${cmd[@]}" ) &
child=$!
sig=${KD_FORWARD_SIGNAL:-USR2}
resender=
forward() {
    # the single python process, or the launcher (ignores USR2) and its workers;
    # KD_FORWARD_SIGNAL=TERM for stages without a checkpointing handler (cache)
    kill -"$sig" "$child" $(pgrep -P "$child") 2>/dev/null
    if [[ -z $resender ]]; then
        ( while sleep 10; do
            kill -"$sig" "$child" $(pgrep -P "$child") 2>/dev/null || exit 0
        done ) &
        resender=$!
    fi
}
trap forward USR2
while :; do
    wait "$child"
    rc=$?
    kill -0 "$child" 2>/dev/null || break
done
[[ -n $resender ]] && kill "$resender" 2>/dev/null
exit "$rc"
'

KD_GOT_USR2=0
KD_STEP_PID=
# shellcheck disable=SC2317  # invoked by the trap
kd_on_usr2() {
    KD_GOT_USR2=1
    if [[ -n $KD_STEP_PID ]]; then
        kd_log "USR2: asking the training step to checkpoint and stop"
        kill -USR2 "$KD_STEP_PID" 2>/dev/null
    else
        kd_log "USR2 before the step started"
    fi
}

# kd_requeue RC: requeue this job (or array task) after a USR2 and exit 0.
kd_requeue() {
    local id=$SLURM_JOB_ID
    [[ -n ${SLURM_ARRAY_JOB_ID:-} ]] && id=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
    kd_log "step stopped after USR2 (rc=$1; 75 = checkpointed); requeueing $id"
    scontrol requeue "$id" || {
        kd_log "scontrol requeue $id failed; resubmit the same command to resume"
        exit 1
    }
    exit 0
}

# kd_run_step NODES CMD...: run CMD once per node under srun, forward USR2, requeue on it.
# Exits the batch script: 0 after a requeue (or success), the step's exit code otherwise.
kd_run_step() {
    local nodes=$1
    shift
    trap kd_on_usr2 USR2
    [[ $KD_GOT_USR2 -eq 1 ]] && kd_requeue "not started"
    # --kill-on-bad-exit: if one node's launcher fails, the other nodes are stopped too
    # instead of waiting for a peer that is gone.
    srun --nodes="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1 \
        bash -c "$KD_NODE_WRAPPER" node "$@" &
    KD_STEP_PID=$!
    [[ $KD_GOT_USR2 -eq 1 ]] && kill -USR2 "$KD_STEP_PID" 2>/dev/null
    local rc
    while :; do
        wait "$KD_STEP_PID"
        rc=$?
        kill -0 "$KD_STEP_PID" 2>/dev/null || break
    done
    trap - USR2
    if [[ $KD_GOT_USR2 -eq 1 && $rc -ne 0 ]]; then
        kd_requeue "$rc"
    fi
    kd_log "step finished rc=$rc"
    exit "$rc"
}

# From the moment this file is sourced: USR2's default action would kill the batch shell.
trap kd_on_usr2 USR2
