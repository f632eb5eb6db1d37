#!/usr/bin/env bash
# Submit a whole kdslim run as SLURM jobs: exactly the plan of `python -m launch plan`, one job
# per node of the stage graph (teacher members and student seeds included, the cache as a job
# array), each linked to what it reads by --dependency=afterok. See launch/submit.py or run
# `slurm/submit.sh --help` for the options:
#
#   slurm/submit.sh --config configs/run.yaml [--nodes N --gpus-per-node G --partition P
#       --time T --cache-shards N --cache-parallel P --stages "A B" --dry-run ...] [-- key=value ...]
#
# Run from the repository root on a login node with the virtualenv built (`make install`);
# prints one "NAME JOBID" line per job. Logs: slurm-<jobname>-<jobid>.out.
set -euo pipefail
SLURM_DIR=$(cd "$(dirname "$0")" && pwd)
export KDSLIM_REPO=${KDSLIM_REPO:-$(dirname "$SLURM_DIR")}
PYTHON=${KDSLIM_VENV:-$KDSLIM_REPO/.venv}/bin/python
[[ -x $PYTHON ]] || { echo "submit.sh: no python at $PYTHON (run 'make install' or set KDSLIM_VENV)" >&2; exit 2; }
cd "$KDSLIM_REPO"
exec "$PYTHON" -m launch.submit "$@"
