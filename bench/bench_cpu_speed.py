"""What makes training fit on a small CPU: memory format, autocast precision and the data path.

    python bench/bench_cpu_speed.py --data-root ../shared/data/cifar10 [--model cifar_airnet]

In one process, back to back and alternating over rounds (this machine is shared and noisy):
- training steps/s of one model at one batch: float32 NCHW, float32 channels_last
  (`run.channels_last`), bf16 autocast (`run.mixed_precision=bf16`; fast only on CPUs with
  AVX-512 bf16 or AMX, emulated elsewhere), `torch.compile` (inductor, default mode) of the
  NCHW and channels_last models, each as a ratio to float32 NCHW (compilation happens in the
  untimed warm-up steps of the first round and is reported apart);
- inference images/s (eval mode, `torch.inference_mode`, the cache's batch of 500): float32
  NCHW against channels_last, as the cache's teachers and every evaluation run;
- training-view images/s of the data path: a PNG decode per read against the decoded-once
  memory-mapped file (`data.decode_once`), both through the replayable view recipe.
Peak resident memory is reported beside the rates.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch
import torch.nn.functional as F

from common.config import DataConfig
from common.data import build_splits
from common.models import build_model


def step_rate(model, x, y, steps: int, cl: bool, bf16: bool) -> float:
    """Training steps per second (SGD) after two warm-up steps."""
    fmt = torch.channels_last if cl else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x = x.contiguous(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for i in range(steps + 2):
        if i == 2:
            t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps / (time.perf_counter() - t0)


def infer_rate(model, x, steps: int, cl: bool) -> float:
    """Forward-only images per second in eval mode after one warm-up batch."""
    fmt = torch.channels_last if cl else torch.contiguous_format
    model, x = model.eval().to(memory_format=fmt), x.contiguous(memory_format=fmt)
    with torch.inference_mode():
        model(x)
        t0 = time.perf_counter()
        for _ in range(steps):
            model(x)
    return steps * len(x) / (time.perf_counter() - t0)


def view_rate(dataset, n: int) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        dataset[(i, 1)]
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-root", required=True)
    p.add_argument("--model", default="cifar_airnet")
    p.add_argument("--kwargs", default='{"channels": [32, 128, 128], "stem": 16}')
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--infer-batch", type=int, default=500)
    p.add_argument(
        "--parts", default="train,infer,views", help="comma-separated subset of what to time"
    )
    args = p.parse_args()
    parts = set(args.parts.split(","))
    out: dict = {"args": vars(args), "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if "train" in parts:
        out.update(train_section(args))
    if "infer" in parts:
        out.update(infer_section(args))
    if "views" in parts:
        out.update(view_section(args))
    out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out, indent=1))


def train_section(args) -> dict:
    torch.manual_seed(0)
    modes = {  # (channels_last, bf16, compile)
        "float32": (False, False, False),
        "channels_last": (True, False, False),
        "bf16": (False, True, False),
        "compile": (False, False, True),
        "compile_channels_last": (True, False, True),
    }
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    models = {}
    compile_s = {}
    for mode, (cl, _, comp) in modes.items():  # built (and compiled) once, timed every round
        model = build_model(args.model, 10, **json.loads(args.kwargs))
        model = model.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
        models[mode] = torch.compile(model) if comp else model
        if comp:
            t0 = time.perf_counter()
            step_rate(models[mode], x, y, 1, cl, False)
            compile_s[mode] = time.perf_counter() - t0
    rates: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.rounds):
        for mode, (cl, bf16, _) in modes.items():
            rates[mode].append(step_rate(models[mode], x, y, args.steps, cl, bf16))
    steps = {m: statistics.median(v) for m, v in rates.items()}
    return {
        "train_steps_per_s": steps,
        "train_steps_per_s_each_round": rates,
        "over_float32": {m: v / steps["float32"] for m, v in steps.items()},
        "train_images_per_s": {m: v * args.batch for m, v in steps.items()},
        "compile_seconds": compile_s,
    }


def infer_section(args) -> dict:
    torch.manual_seed(0)
    x = torch.randn(args.infer_batch, 3, 32, 32)
    models = {cl: build_model(args.model, 10, **json.loads(args.kwargs)) for cl in (False, True)}
    rates: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        for cl, model in models.items():
            rates[cl].append(infer_rate(model, x, args.steps, cl))
    nchw, cl = statistics.median(rates[False]), statistics.median(rates[True])
    return {
        "infer_images_per_s": {"float32": nchw, "channels_last": cl},
        "infer_channels_last_over_float32": cl / nchw,
    }


def view_section(args) -> dict:
    paths = {}
    for once in (False, True):
        cfg = DataConfig(name="cifar10", root=args.data_root, decode_once=once)
        paths["decode_once" if once else "decode_per_read"] = build_splits(cfg, 0).train
    views: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(args.rounds):
        for k, ds in paths.items():
            views[k].append(view_rate(ds, args.images))
    view_s = {k: statistics.median(v) for k, v in views.items()}
    return {
        "view_images_per_s": view_s,
        "decode_once_over_per_read": view_s["decode_once"] / view_s["decode_per_read"],
    }


if __name__ == "__main__":
    main()
