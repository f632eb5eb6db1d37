#!/usr/bin/env bash
# Submit a whole kdslim run as a chain of SLURM jobs linked by --dependency=afterok:
#
#   train (one job per teacher) -> cache (job array) -> verify-cache -> distill -> sparsity
#   -> prune -> finetune
#
#   slurm/submit.sh --config configs/run.yaml [options] [-- dotted.key=value ...]
#
# Options:
#   --config FILE          the run config every stage reads (required)
#   --teacher-config FILE  train one teacher from FILE (repeatable; default: one `train` job
#                          with --config). List the teachers' model dirs in cache.teachers.
#   --stages "A B ..."     stages to submit, in chain order (default: all of the above);
#                          e.g. --stages "distill sparsity prune finetune" after a cache exists
#   --after JOBID          make the first submitted stage wait for this job too
#   --nodes N              nodes per training job (default 1)
#   --gpus-per-node G      GPUs (= processes) per node (default 0: CPU, --procs-per-node)
#   --procs-per-node N     processes per node on CPU nodes (default 1)
#   --partition P          sbatch --partition
#   --time T               sbatch --time for every job (e.g. 1-00:00:00)
#   --cache-shards N       cache array size (default 8); --cache-parallel P: at most P at once (4)
#   --accelerate-config F  accelerate config for the training stages (e.g. DeepSpeed)
#   --venv DIR             virtualenv on the compute nodes (default .venv)
#   --sbatch "ARGS"        extra sbatch arguments for every job (e.g. "--account=x --qos=y")
#   --dry-run              print the sbatch commands with made-up job ids; submit nothing
# Anything after `--` is passed to every stage as dotted.key=value overrides.
#
# Prints one "STAGE JOBID" line per job. Logs: slurm-<jobname>-<jobid>.out in the current
# directory. Run from the repository root (the batch scripts find the code there).
set -euo pipefail

die() {
    echo "submit.sh: ERROR: $*" >&2
    exit 2
}
ALL_STAGES="train cache verify-cache distill sparsity prune finetune"
CONFIG="" TEACHERS=() STAGES=$ALL_STAGES AFTER="" NODES=1 GPUS=0 PPN=1 PARTITION="" TIME=""
SHARDS=8 PARALLEL=4 ACC_CFG="" VENV="" EXTRA="" DRY=0
while [[ $# -gt 0 ]]; do
    case $1 in
        --config) CONFIG=$2; shift 2 ;;
        --teacher-config) TEACHERS+=("$2"); shift 2 ;;
        --stages) STAGES=$2; shift 2 ;;
        --after) AFTER=$2; shift 2 ;;
        --nodes) NODES=$2; shift 2 ;;
        --gpus-per-node) GPUS=$2; shift 2 ;;
        --procs-per-node) PPN=$2; shift 2 ;;
        --partition) PARTITION=$2; shift 2 ;;
        --time) TIME=$2; shift 2 ;;
        --cache-shards) SHARDS=$2; shift 2 ;;
        --cache-parallel) PARALLEL=$2; shift 2 ;;
        --accelerate-config) ACC_CFG=$2; shift 2 ;;
        --venv) VENV=$2; shift 2 ;;
        --sbatch) EXTRA=$2; shift 2 ;;
        --dry-run) DRY=1; shift ;;
        -h | --help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        --) shift; break ;;
        *) die "unknown argument '$1' (overrides go after --)" ;;
    esac
done
OVERRIDES=("$@")
[[ -n $CONFIG ]] || die "--config FILE is required"
[[ -f $CONFIG ]] || die "config '$CONFIG' not found"
for t in "${TEACHERS[@]}"; do [[ -f $t ]] || die "teacher config '$t' not found"; done
for s in $STAGES; do
    [[ " $ALL_STAGES " == *" $s "* ]] || die "unknown stage '$s' (one of: $ALL_STAGES)"
done
for n in "$NODES" "$GPUS" "$PPN" "$SHARDS" "$PARALLEL"; do
    [[ $n =~ ^[0-9]+$ ]] || die "'$n' is not a non-negative integer"
done
SLURM_DIR=$(cd "$(dirname "$0")" && pwd)
# the batch scripts cd here and source slurm/lib.sh (sbatch exports the environment)
export KDSLIM_REPO=${KDSLIM_REPO:-$(dirname "$SLURM_DIR")}
abspath() { [[ $1 == /* ]] && echo "$1" || echo "$PWD/$1"; }
CONFIG=$(abspath "$CONFIG")
for i in "${!TEACHERS[@]}"; do TEACHERS[i]=$(abspath "${TEACHERS[i]}"); done
[[ $DRY -eq 1 ]] || command -v sbatch >/dev/null || die "sbatch not found (run on a login node)"

common=(--parsable)
[[ -n $PARTITION ]] && common+=(--partition="$PARTITION")
[[ -n $TIME ]] && common+=(--time="$TIME")
# shellcheck disable=SC2206
[[ -n $EXTRA ]] && common+=($EXTRA)
script_opts=()
[[ -n $VENV ]] && script_opts+=(--venv "$VENV")

FAKE_ID=1000
JOB=""
# submit NAME DEPENDENCY SBATCH-ARGS... -- SCRIPT ARGS...: sets JOB to the new job id
submit() {
    local name=$1 dep=$2
    shift 2
    local args=("${common[@]}" --job-name="kdslim-$name")
    [[ -n $dep ]] && args+=(--dependency="afterok:$dep" --kill-on-invalid-dep=yes)
    while [[ $1 != -- ]]; do args+=("$1"); shift; done
    shift
    if [[ $DRY -eq 1 ]]; then
        FAKE_ID=$((FAKE_ID + 1))
        printf 'sbatch' >&2
        printf ' %q' "${args[@]}" "$@" >&2
        echo >&2
        JOB=$FAKE_ID
    else
        JOB=$(sbatch "${args[@]}" "$@")
        JOB=${JOB%%;*}
        [[ $JOB =~ ^[0-9]+$ ]] || die "sbatch for $name did not return a job id: '$JOB'"
    fi
}

# resources of a training job
train_res=(--nodes="$NODES" --ntasks-per-node=1)
train_opts=("${script_opts[@]}")
if [[ $GPUS -gt 0 ]]; then
    train_res+=(--gpus-per-node="$GPUS")
else
    train_opts+=(--procs-per-node "$PPN")
fi
[[ -n $ACC_CFG ]] && train_opts+=(--accelerate-config "$ACC_CFG")
one_res=(--nodes=1 --ntasks-per-node=1)
[[ $GPUS -gt 0 ]] && one_res+=(--gpus-per-node=1)
one_opts=("${script_opts[@]}")
[[ $GPUS -gt 0 ]] || one_opts+=(--procs-per-node 1)

prev=$AFTER
for stage in $STAGES; do
    case $stage in
        train)
            ids=()
            cfgs=("${TEACHERS[@]}")
            ((${#cfgs[@]})) || cfgs=("$CONFIG")
            for c in "${cfgs[@]}"; do
                submit train "$prev" "${train_res[@]}" -- "$SLURM_DIR/stage.sbatch" \
                    "${train_opts[@]}" train --config "$c" "${OVERRIDES[@]}"
                id=$JOB
                echo "train $id ($c)"
                ids+=("$id")
            done
            prev=$(IFS=:; echo "${ids[*]}")
            ;;
        cache)
            submit cache "$prev" --array="0-$((SHARDS - 1))%$PARALLEL" "${one_res[@]}" -- \
                "$SLURM_DIR/cache_array.sbatch" "${script_opts[@]}" --config "$CONFIG" \
                "${OVERRIDES[@]}"
            id=$JOB
            echo "cache $id"
            prev=$id
            ;;
        verify-cache | prune)  # one process: checks / shrinks, no training
            submit "$stage" "$prev" "${one_res[@]}" -- "$SLURM_DIR/stage.sbatch" \
                "${one_opts[@]}" "$stage" --config "$CONFIG" "${OVERRIDES[@]}"
            id=$JOB
            echo "$stage $id"
            prev=$id
            ;;
        *)
            submit "$stage" "$prev" "${train_res[@]}" -- "$SLURM_DIR/stage.sbatch" \
                "${train_opts[@]}" "$stage" --config "$CONFIG" "${OVERRIDES[@]}"
            id=$JOB
            echo "$stage $id"
            prev=$id
            ;;
    esac
done
