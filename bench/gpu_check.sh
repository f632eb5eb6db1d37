#!/usr/bin/env bash
# GPU checks that CPU-only CI cannot run. Sized for ONE GPU: each phase has its own `timeout`
# and the whole script is capped at BUDGET_S (default 780 s), so it ends inside a 15-minute
# lease with time to start the machine; phases past the cap are recorded as skipped. Not yet
# timed on a GPU. Run from the repository root with the venv built:
#
#     OUT=/path/to/results DATA_ROOT=/data/cifar10 bash bench/gpu_check.sh
#
# DATA_ROOT: a CIFAR-10 copy (Hugging Face Parquet or cifar-10-batches-py) for the `table_*`
# phases, whose numbers are then real; without it they run on the synthetic set below (the
# code paths and timings hold, the accuracies mean nothing, and table.log says so).
#
# Phases (each writes <phase>.log and, where it measures something, <phase>.json under $OUT;
# summary.json lists every phase's exit code and wall time; the script exits non-zero if any
# phase failed):
#   1. env        nvidia-smi, torch/CUDA versions, bf16 support.
#   2. data       a synthetic CIFAR-10 (32x32, 10 classes) in the Hugging Face Parquet layout,
#                 2048 train / 512 test images: no download needed.
#   3. table_kd   the original CIFAR-10 table's shape at a reduced schedule, one command
#                 (configs/cifar10/kd_resnet18_ensemble.yaml): an ensemble of two strong
#                 teachers (WRN-28-10, ResNeXt-29 8x64d, 5 epochs each) -> cache (8 views) ->
#                 ResNet-18 CE and KD students over 2 seeds (5 epochs) -> slimming at 50% MACs
#                 -> report with the verdict (copied to $OUT/table_kd/). ~5 minutes planned.
#      table_slim VGG-19 network slimming at 70% of the channels (configs/cifar10/
#                 slim_vgg19.yaml: train 5, sparsity 3 at NS's total shrinkage, prune,
#                 fine-tune 3 epochs) -> $OUT/table_slim/. ~2 minutes planned.
#   4. pipeline   `python -m launch pipeline` on the synthetic set with run.mixed_precision=bf16 (autocast on
#                 CUDA): teacher train, cache (bf16 teacher forward), CE and KD students,
#                 sparsity, prune, finetune, export, report. Step times are in pipeline.log;
#                 report.json, report.md, the figures and export.json are copied to $OUT.
#   4. verify_bf16 `verify-cache` on that bf16-written cache: the spot check re-scores under
#                 the bf16 autocast recorded in the manifest (exact on CPU, measured).
#   5. rerun      the same command again: every step must be skipped.
#   5b. deepspeed_zero3_online  20 steps of online KD under deepspeed_zero3.yaml with bf16:
#                 the pipeline's teacher in a ZeRO-3 engine, the student under ZeRO-2, both
#                 under DeepSpeed's torch autocast (CPU tests cover the sharding itself).
#   6. bench      bench/bench_cache.py and bench/bench_distill.py (cache writer / reader and
#                 cached-KD vs CE vs online-KD step throughput) on the synthetic data.
#   7. pytest_gpu `pytest -m gpu` when tests carry that marker (skipped, not failed, if none).
# Multi-GPU SyncBatchNorm needs >= 2 GPUs and is not covered here.
# PHASES="env data pipeline" runs only those (data is needed by pipeline, rerun and bench).
# GPU_CHECK_OVERRIDES="key=value ..." is appended to the pipeline's overrides; ALLOW_CPU=1
# runs without CUDA (a smoke test of this script; the numbers then mean nothing).
set -uo pipefail

cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=${WORK:-$(mktemp -d)}
export WANDB_MODE=${WANDB_MODE:-disabled} PYTHONPATH=${PYTHONPATH:-$PWD}
declare -A RC WALL

ALL="env data table_kd table_slim pipeline verify_bf16 rerun deepspeed_zero3_online bench_cache bench_distill pytest_gpu"
want() { [[ " ${PHASES:-$ALL} " == *" $1 "* ]]; }

BUDGET_S=${BUDGET_S:-780}  # hard cap on the whole check: 13 minutes, inside a 15-minute lease

phase() {  # phase NAME TIMEOUT_S CMD...: run CMD, log to $OUT/NAME.log, record rc and wall time
    local name=$1 limit=$2
    shift 2
    want "$name" || return 0
    local left=$((BUDGET_S - SECONDS))  # the whole script stays inside BUDGET_S seconds
    if [ "$left" -le 5 ]; then
        echo "== $name: skipped, the ${BUDGET_S} s budget is spent" | tee "$OUT/$name.log"
        RC[$name]=124
        WALL[$name]=0
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local t0=$SECONDS
    echo "== $name: $*" | tee "$OUT/$name.log"
    timeout "$limit" "$@" >>"$OUT/$name.log" 2>&1
    RC[$name]=$?
    WALL[$name]=$((SECONDS - t0))
    echo "== $name: exit ${RC[$name]} in ${WALL[$name]} s"
}

phase env 60 bash -c "nvidia-smi; $PY -c 'import torch, json; print(json.dumps({
    \"torch\": torch.__version__, \"cuda\": torch.version.cuda,
    \"available\": torch.cuda.is_available(),
    \"device\": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    \"bf16\": torch.cuda.is_available() and torch.cuda.is_bf16_supported()}))' \
    | tee $OUT/env.json"

if want env && ! grep -q '"available": true' "$OUT/env.json" && [ "${ALLOW_CPU:-0}" != 1 ]; then
    echo "no CUDA device (see $OUT/env.log); set ALLOW_CPU=1 to run on CPU anyway" >&2
    exit 2
fi

phase data 120 "$PY" - "$WORK/cifar10" <<'PYEOF'
import io, sys
from pathlib import Path
import datasets, numpy as np
from PIL import Image
root = Path(sys.argv[1]); root.mkdir(parents=True, exist_ok=True)
features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
rng = np.random.default_rng(0)
for split, n in (("train", 2048), ("test", 512)):
    labels = rng.integers(0, 10, n)
    imgs = []
    for y in labels:  # class-dependent colour so the models can learn something
        a = rng.integers(0, 96, (32, 32, 3)).astype(np.uint8)
        a[..., y % 3] += np.uint8(16 * y)
        buf = io.BytesIO(); Image.fromarray(a).save(buf, format="PNG")
        imgs.append({"bytes": buf.getvalue(), "path": None})
    ds = datasets.Dataset.from_dict({"img": imgs, "label": labels.tolist()}, features=features)
    ds.to_parquet(str(root / f"{split}-00000-of-00001.parquet"))
print("wrote", root)
PYEOF

# The table's shape at a reduced schedule, on real CIFAR-10 when DATA_ROOT has it.
TABLE_DATA=${DATA_ROOT:-$WORK/cifar10}
[ -n "${DATA_ROOT:-}" ] || echo "table phases: no DATA_ROOT, synthetic data: accuracies are meaningless" | tee "$OUT/table.log"
TABLE=(data.name=cifar10 "data.root=$TABLE_DATA" data.num_workers=8 logging.progress=false
       run.mixed_precision=bf16 run.channels_last=true)
phase table_kd 330 "$PY" -m launch pipeline --config configs/cifar10/kd_resnet18_ensemble.yaml \
    "run.out_dir=$WORK/table_kd" "${TABLE[@]}" \
    "train.members=[{model: {name: cifar_wrn28_10}}, {model: {name: cifar_resnext29_8x64d}}]" \
    train.loop.epochs=5 train.loop.batch_size=256 train.loop.optim.lr=0.2 cache.views=8 \
    "distill.seeds=[0, 1]" distill.loop.epochs=5 distill.loop.batch_size=256 \
    distill.loop.optim.lr=0.2 sparsity.loop.epochs=2 finetune.loop.epochs=2
cp -r "$WORK/table_kd/report" "$OUT/table_kd" 2>/dev/null
phase table_slim 150 "$PY" -m launch pipeline --config configs/cifar10/slim_vgg19.yaml \
    "run.out_dir=$WORK/table_slim" "${TABLE[@]}" train.loop.epochs=5 train.loop.batch_size=256 \
    sparsity.s=null sparsity.shrink=0.6 sparsity.loop.epochs=3 finetune.loop.epochs=3
cp -r "$WORK/table_slim/report" "$OUT/table_slim" 2>/dev/null

# verify-cache runs as its own phase (after the pipeline, which skips it here): it re-scores
# rows under the bf16 autocast recorded in the manifest, with bf16 tolerances.
STEPS="[train,cache,distill-ce,distill,sparsity,prune,finetune,export,report]"
ARGS=(--config configs/quickstart.yaml "run.out_dir=$WORK/pipe" run.mixed_precision=bf16
      "pipeline.stages=$STEPS"
      data.name=cifar10 "data.root=$WORK/cifar10" data.image_size=32 data.pad=4
      logging.progress=false train.loop.epochs=3 distill.loop.epochs=3 sparsity.loop.epochs=2
      finetune.loop.epochs=2 cache.views=4)
# shellcheck disable=SC2206  # word splitting of the overrides is intended
ARGS+=(${GPU_CHECK_OVERRIDES:-})
phase pipeline 300 "$PY" -m launch pipeline "${ARGS[@]}"
cp "$WORK/pipe/export/export.json" "$OUT/" 2>/dev/null
cp -r "$WORK/pipe/report" "$OUT/report" 2>/dev/null

phase verify_bf16 120 "$PY" -m launch verify-cache "${ARGS[@]}"

phase rerun 120 "$PY" -m launch pipeline "${ARGS[@]}"
if [ "${RC[rerun]:-}" = 0 ] && grep -q "running (" "$OUT/rerun.log"; then
    echo "rerun: a step ran again although everything was complete" | tee -a "$OUT/rerun.log"
    RC[rerun]=1
fi

# DeepSpeed on CUDA with bf16: the teacher from the pipeline sharded by ZeRO-3 and the student
# under ZeRO-2, both under torch autocast (one process: the engines' code paths, not sharding).
phase deepspeed_zero3_online 150 "$PY" -m accelerate.commands.launch \
    --config_file configs/accelerate/deepspeed_zero3.yaml --num_processes 1 \
    -m launch distill "${ARGS[@]}" distill.mode=online distill.loop.max_steps=20

# bench_distill loads configs/quickstart.yaml, whose student carries VGG `cfg` kwargs: its
# default --student cifar_resnet20 then fails to build, so the quickstart's VGG is named.
phase bench_cache 150 bash -c "$PY bench/bench_cache.py --data-root $WORK/cifar10 \
    --samples 2048 --views 2 > $OUT/bench_cache.json"
phase bench_distill 150 bash -c "$PY bench/bench_distill.py --data-root $WORK/cifar10 \
    --samples 2048 --steps 20 --student cifar_vgg11 > $OUT/bench_distill.json"

if want pytest_gpu &&
    [ "$("$PY" -m pytest -q -m gpu --collect-only 2>/dev/null | grep -c '::')" -gt 0 ]; then
    phase pytest_gpu 240 "$PY" -m pytest -q -m gpu
else
    echo "== pytest_gpu: no tests marked gpu; skipped"
fi

status=0
{
    echo "{"
    first=1
    for name in "${!RC[@]}"; do
        [ $first = 1 ] || echo ","
        first=0
        printf '  "%s": {"rc": %s, "wall_s": %s}' "$name" "${RC[$name]}" "${WALL[$name]}"
        [ "${RC[$name]}" = 0 ] || status=1
    done
    echo ""
    echo "}"
} >"$OUT/summary.json"
cat "$OUT/summary.json"
echo "results in $OUT (work files in $WORK)"
exit $status
