"""kdslim's Trainer against a bare PyTorch loop, and 1 against 2 processes.

    python bench/bench_trainer.py                                   # Trainer vs bare, 1 process
    python bench/bench_trainer.py --procs 2                         # + 1 vs 2 processes

Trainer vs bare: the same model (`cifar_resnet20`), batch, SGD (momentum 0.9, Nesterov, weight
decay) and pre-loaded batches (images, labels, cached-style teacher logits: the loader is not
what is measured) go through `Trainer._train_step` (the CE task, and the cached-KD task with
its soft targets in the batch, as `CachedTargetDataset` delivers them) and through the bare
loop below, alternating over rounds; the median steps/s of each is reported and their ratio.

    for x, y, t in batches:                     # the bare loop
        set_lr(optimizer, lr_at(step, ...))
        out = model(x)
        loss = F.cross_entropy(out, y)          # or kd_loss(out, t, y, T, alpha)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

1 vs 2 processes (`--procs 2`): the Trainer's CE step at the same global batch, once in one
process and once under `ACCELERATE_USE_CPU=1 accelerate launch --num_processes 2`, one intra-op
thread per process (and one for the single process: the ratio is then what a second core buys).
The 2-process run also times steps under `no_sync` (no gradient all-reduce) and with plain
BatchNorm (no synchronised statistics), to say where the time goes. Epoch time ratio = 2-process
step time / 1-process step time (0.5 is perfect scaling).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from common.config import DataConfig, KDConfig, LoopConfig, OptimConfig, RunConfig
from common.data import build_splits
from common.logging import NullLogger
from common.models import build_model
from common.optim import build_optimizer, lr_at, set_lr
from common.runtime import StageContext
from common.trainer import CrossEntropyTask, Trainer
from distill.losses import kd_loss
from distill.task import CachedTeacher, KDTask

ROOT = Path(__file__).resolve().parents[1]
OPTIM = OptimConfig(lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, schedule="cosine")
T, ALPHA = 4.0, 0.9


def batches(n: int, batch: int, seed: int, rank: int = 0, world: int = 1) -> list[dict]:
    """`n` global batches (this rank's share of each), made once."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        b = {
            "image": torch.randn(batch, 3, 32, 32, generator=g),
            "label": torch.randint(10, (batch,), generator=g),
            "teacher_logits": 3 * torch.randn(batch, 10, generator=g),
        }
        per = batch // world
        out.append({k: v[rank * per : (rank + 1) * per] for k, v in b.items()})
    return out


def make_trainer(acc: Accelerator, task, batch: int, sync_bn: bool, tmp: Path) -> Trainer:
    splits = build_splits(DataConfig(name="digits", image_size=32, augment="none"), 0)
    torch.manual_seed(0)
    loop = LoopConfig(epochs=1000, batch_size=batch, optim=OPTIM, sync_bn=sync_bn, log_every=50)
    ctx = StageContext(acc, tmp / f"stage{time.monotonic_ns()}", NullLogger(), "bench")
    return Trainer(
        ctx=ctx,
        run=RunConfig(out_dir=str(tmp)),
        loop=loop,
        loop_key="bench.loop",
        model=build_model("cifar_resnet20", 10),
        spec={},
        task=task,
        splits=splits,
    )


def trainer_rate(trainer: Trainer, data: list[dict], no_sync: bool = False) -> float:
    trainer._train_step(iter(data[:1]))  # warm-up
    sync = trainer.acc.no_sync(trainer.model) if no_sync else nullcontext()
    with sync:
        t0 = time.perf_counter()
        for b in data:
            trainer._train_step(iter([b]))
        return len(data) / (time.perf_counter() - t0)


def bare_rate(data: list[dict], kd: bool) -> float:
    torch.manual_seed(0)
    model = build_model("cifar_resnet20", 10).train()
    optimizer = build_optimizer(model, OPTIM)
    total = 1000 * len(data)
    for step, b in enumerate([data[0], *data]):
        if step == 1:
            t0 = time.perf_counter()
        set_lr(optimizer, lr_at(step, total, len(data), OPTIM))
        out = model(b["image"])
        if kd:
            loss = kd_loss(out, b["teacher_logits"], b["label"], T, ALPHA)
        else:
            loss = F.cross_entropy(out, b["label"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return len(data) / (time.perf_counter() - t0)


def trainer_vs_bare(args, tmp: Path) -> dict:
    data = batches(args.steps, args.batch, 0)
    acc = Accelerator(cpu=True)
    rates: dict[str, list[float]] = {k: [] for k in ("ce", "bare_ce", "kd", "bare_kd")}
    for _ in range(args.rounds):
        ce = make_trainer(acc, CrossEntropyTask(), args.batch, False, tmp)
        rates["ce"].append(trainer_rate(ce, data))
        rates["bare_ce"].append(bare_rate(data, kd=False))
        task = KDTask(CachedTeacher(10), KDConfig(temperature=T, alpha=ALPHA))
        kd = make_trainer(acc, task, args.batch, False, tmp)
        rates["kd"].append(trainer_rate(kd, data))
        rates["bare_kd"].append(bare_rate(data, kd=True))
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {
        "steps_per_s": med,
        "each_round": rates,
        "trainer_over_bare": {"ce": med["ce"] / med["bare_ce"], "kd": med["kd"] / med["bare_kd"]},
    }


def worker(args) -> None:
    """One process of the scaling measurement (also run alone for the 1-process figure)."""
    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)
    rank, world = acc.process_index, acc.num_processes
    data = batches(args.steps, args.batch, 0, rank, world)
    with tempfile.TemporaryDirectory() as tmp:
        out = {}
        for _ in range(args.rounds):
            for name, sync_bn, no_sync in [
                ("trainer", True, False),
                ("plain_bn", False, False),
                ("no_allreduce", False, True),
            ]:
                if world == 1 and name != "trainer":
                    continue
                t = make_trainer(acc, CrossEntropyTask(), args.batch, sync_bn, Path(tmp))
                out.setdefault(name, []).append(trainer_rate(t, data, no_sync))
    if rank == 0:
        print("RESULT " + json.dumps({k: statistics.median(v) for k, v in out.items()}))


def scaling(args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    common = [
        "bench/bench_trainer.py",
        "--worker",
        f"--steps={args.steps}",
        f"--batch={args.batch}",
        f"--rounds={args.rounds}",
    ]
    runs = {}
    for procs in (1, 2):
        if procs == 1:
            cmd = [sys.executable, *common]
        else:
            cmd = [
                sys.executable,
                "-m",
                "accelerate.commands.launch",
                "--multi_gpu",
                "--num_processes=2",
                "--num_machines=1",
                "--mixed_precision=no",
                "--dynamo_backend=no",
                *common,
            ]
        done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=True)
        line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
        runs[procs] = json.loads(line.removeprefix("RESULT "))
    one, two = runs[1]["trainer"], runs[2]
    return {
        "steps_per_s": runs,
        "epoch_time_ratio_2_over_1": one / two["trainer"],
        "allreduce_share_of_2proc_step": 1 - two["trainer"] / two["no_allreduce"],
        "syncbn_share_of_2proc_step": 1 - two["trainer"] / two["plain_bn"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", type=int, default=128, help="global batch")
    p.add_argument("--procs", type=int, choices=[1, 2], default=1)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (trainer vs bare)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    if args.worker:
        worker(args)
        return
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        result = {"args": vars(args), "trainer_vs_bare": trainer_vs_bare(args, Path(tmp))}
    if args.procs == 2:
        result["scaling"] = scaling(args)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
