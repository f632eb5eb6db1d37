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
#      rank 0 writes a checkpoint
#   -> every rank writes the step into $KDSLIM_PREEMPT_FILE and exits 0 (launch/cli.py)
#   -> the batch shell finds the file: exit status 75 (EX_TEMPFAIL, "stopped after a
#      checkpoint"), `scontrol requeue`, one line "preempted at step N, checkpoint saved,
#      requeued", exit 75; the requeued job resumes from the newest checkpoint (same command,
#      same stage directory, same wandb run id).
#
# Why the ranks exit 0 and the batch shell alone says 75: a rank that exits non-zero is a
# failure to everything between it and the batch shell. The elastic agent of `accelerate
# launch`/torchrun raises ChildFailedError (a traceback on every node), exits 1 (so 75 was
# lost), srun prints "srun: error: ... exit code" for each task and, with
# --kill-on-bad-exit, kills the nodes still finishing (rank 0 closing wandb). A preempted
# rank is not a failure: it exits 0 after writing the marker, agents, wrappers and srun all
# succeed quietly, and the batch shell turns the marker into 75 and the requeue. The marker
# path is node-local (TMPDIR); every rank writes it, so the batch host (node 0) always has it.
# Without KDSLIM_PREEMPT_FILE (a run outside these scripts) a preempted stage exits 75 itself.
#
# Signals. The launcher (accelerate launch / torchrun's elastic agent) and its ranks (or the
# single python process) start with USR2 *and TERM ignored*: by default USR2 terminates a
# process, and the agent installs no handler for it; TERM the agent would turn into an
# exception (a SignalException traceback) and a shutdown of its ranks, so
# PET_SIGNALS_TO_HANDLE (torchrun's --signals-to-handle) leaves it out. The ranks keep the
# ignored dispositions until the trainer installs its handler (USR2 and TERM: checkpoint and
# stop), so a signal that arrives during start-up cannot kill a rank; the wrapper repeats the
# signal (as USR2) every 10 s until the stage exits, so such a rank still gets it once its
# handler is there.
# TERM comes from SLURM itself (scancel, `scontrol requeue`, preemption, the end of the time
# limit, srun --kill-on-bad-exit) to every process of the job or step at once, KillWait
# seconds (default 30) before KILL: the ranks checkpoint and stop if they can in that time,
# and SLURM, not the batch shell, decides whether the job comes back. A stage without a
# trainer (prune, report, ...) runs on until the KILL. The wandb service of rank 0 gets that
# TERM too and exits at once: common/logging.py then ends the stage's wandb logging with one
# line, where wandb used to raise ConnectionResetError.

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
# KD_FORWARD_SIGNAL=TERM is for stages without a checkpointing handler (the cache): they are
# stopped with TERM and start with TERM at its default.
# shellcheck disable=SC2016
KD_NODE_WRAPPER='
cmd=()
for a in "$@"; do
    [[ $a == @MACHINE_RANK@ ]] && a=$SLURM_NODEID
    cmd+=("$a")
done
sig=${KD_FORWARD_SIGNAL:-USR2}
if [[ $sig == USR2 ]]; then
    ( trap "" USR2 TERM; export PET_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT
      exec "${cmd[@]}" ) &
else
    ( trap "" USR2; exec "${cmd[@]}" ) &
fi
child=$!
resender=
forward() {
    # the single python process, or the launcher (ignores it) and its ranks
    kill -"$sig" "$child" $(pgrep -P "$child") 2>/dev/null
    if [[ -z $resender ]]; then
        ( while sleep 10; do
            kill -"$sig" "$child" $(pgrep -P "$child") 2>/dev/null || exit 0
        done ) 2>/dev/null &
        resender=$!
    fi
}
trap forward USR2 TERM
while :; do
    wait "$child"
    rc=$?
    kill -0 "$child" 2>/dev/null || break
done
[[ -n $resender ]] && kill "$resender" 2>/dev/null
exit "$rc"
'

# kd_job_id: this job's id for scontrol (an array task as ARRAYJOB_TASK).
kd_job_id() {
    if [[ -n ${SLURM_ARRAY_JOB_ID:-} ]]; then
        echo "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
    else
        echo "$SLURM_JOB_ID"
    fi
}

KD_GOT_USR2=0
KD_GOT_TERM=0
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
# shellcheck disable=SC2317  # invoked by the trap
kd_on_term() {
    # SLURM sends TERM to every process of the job itself; nothing to forward
    KD_GOT_TERM=1
    kd_log "TERM from SLURM (scancel, scontrol requeue, preemption or time limit): the training step saves a checkpoint if it can before the KILL"
}

# kd_requeue WHY: requeue this job (or array task) after a USR2 and exit 0.
kd_requeue() {
    local id
    id=$(kd_job_id)
    kd_log "$1; requeueing $id"
    scontrol requeue "$id" || {
        kd_log "scontrol requeue $id failed; resubmit the same command to resume"
        exit 1
    }
    exit 0
}

# kd_preempted STEP: the step stopped after its checkpoint at STEP (or "" if unknown): exit
# status 75. Requeue the job unless SLURM is ending it (TERM), say so in one line, exit 75.
kd_preempted() {
    local id at=${1:+ at step $1} restarts
    id=$(kd_job_id)
    kd_log "step exit status 75: stopped after a checkpoint${at}"
    if [[ $KD_GOT_TERM -eq 1 ]]; then
        # a requeue by SLURM (scontrol requeue, preemption) has already counted the restart
        restarts=$(scontrol show job -o "$id" 2>/dev/null | grep -o 'Restarts=[0-9]*' | cut -d= -f2)
        if [[ ${restarts:-0} -gt ${SLURM_RESTART_COUNT:-0} ]]; then
            echo "preempted${at}, checkpoint saved, requeued" >&2
        else
            echo "stopped${at} by SLURM, checkpoint saved; resubmit the same job to resume" >&2
        fi
        exit 75
    fi
    if ! scontrol requeue "$id"; then
        echo "preempted${at}, checkpoint saved, NOT requeued (scontrol requeue $id failed); resubmit the same job to resume" >&2
        exit 75
    fi
    echo "preempted${at}, checkpoint saved, requeued" >&2
    exit 75
}

# kd_run_step NODES CMD...: run CMD once per node under srun, forward USR2, requeue on it.
# Exits the batch script: 75 after a checkpoint and a requeue, 0 after a requeue without one
# (or success), the step's exit code otherwise.
kd_run_step() {
    local nodes=$1
    shift
    trap kd_on_usr2 USR2
    trap kd_on_term TERM
    [[ $KD_GOT_USR2 -eq 1 ]] && kd_requeue "USR2 before the step started"
    # node-local: every rank writes it, the batch shell reads the batch host's (node 0)
    local stem=${TMPDIR:-/tmp}/kdslim-preempted.$SLURM_JOB_ID
    rm -f "$stem".*  # an earlier run's, if KILL came before its batch shell read it
    export KDSLIM_PREEMPT_FILE=$stem.${SLURM_RESTART_COUNT:-0}
    # --kill-on-bad-exit: if one node's launcher fails, the other nodes are stopped too
    # instead of waiting for a peer that is gone.
    srun --nodes="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1 \
        bash -c "$KD_NODE_WRAPPER" node "$@" &
    KD_STEP_PID=$!
    [[ $KD_GOT_USR2 -eq 1 ]] && kill -USR2 "$KD_STEP_PID" 2>/dev/null
    local rc step=
    while :; do
        wait "$KD_STEP_PID"
        rc=$?
        kill -0 "$KD_STEP_PID" 2>/dev/null || break
    done
    trap "" USR2
    [[ -s $KDSLIM_PREEMPT_FILE ]] && step=$(<"$KDSLIM_PREEMPT_FILE")
    rm -f "$KDSLIM_PREEMPT_FILE"
    [[ $step =~ ^[0-9]+$ ]] || step=
    if [[ -n $step || $rc -eq 75 ]]; then
        kd_preempted "$step"
    fi
    if [[ $KD_GOT_USR2 -eq 1 && $KD_GOT_TERM -eq 0 && $rc -ne 0 ]]; then
        kd_requeue "step failed after USR2 (rc=$rc) before its checkpoint"
    fi
    kd_log "step finished rc=$rc"
    exit "$rc"
}

# From the moment this file is sourced: USR2's default action would kill the batch shell.
trap kd_on_usr2 USR2
