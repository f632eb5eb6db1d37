"""Training speed of the student with cached KD, plain CE and online-ensemble KD.

    python bench/bench_distill.py --data-root ../shared/data/cifar10 --steps 10 --rounds 3

Runs the real `cache` and `distill` stages in this process, in alternating rounds, on the same
student, data and batch, and reads the step times from each stage's steps.jsonl (the first
two steps are warm-up and not counted). Also reports the forward cost of the teacher ensemble
relative to the student, which bounds what online KD can cost. Teachers have random weights:
speed does not depend on what they learned.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common.checkpoint import model_spec, save_model
from common.config import load_config
from common.models import build_model
from common.runtime import Runtime
from launch.config import Config
from launch.graph import Node, directory
from launch.runner import run_node

ROOT = Path(__file__).resolve().parents[1]


def steps_per_s(stage_dir: Path) -> float:
    rows = [json.loads(x) for x in (stage_dir / "steps.jsonl").read_text().splitlines()]
    rows = rows[2:]
    return (len(rows) - 1) / (rows[-1]["time"] - rows[0]["time"])


def forward_ms(model: torch.nn.Module, x: torch.Tensor, repeats: int = 5) -> float:
    model.eval()
    with torch.inference_mode():
        model(x)
        t0 = time.perf_counter()
        for _ in range(repeats):
            model(x)
    return (time.perf_counter() - t0) / repeats * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-root", required=True)
    p.add_argument("--samples", type=int, default=4096)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--teachers", default="cifar_resnet56,cifar_resnet56,cifar_resnet56")
    p.add_argument("--student", default="cifar_resnet20")
    args = p.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        teacher_dirs = []
        for i, name in enumerate(args.teachers.split(",")):
            torch.manual_seed(i)
            teacher_dirs.append(
                str(save_model(tmp / f"t{i}", build_model(name, 10), model_spec(name, 10)))
            )
        overrides = [
            f"run.out_dir={tmp}",
            "data.name=cifar10",
            f"data.root={args.data_root}",
            f"data.train_subset={args.samples}",
            "data.test_subset=256",
            "logging.progress=false",
            "cache.teachers=[" + ",".join(f"{{path: {d}}}" for d in teacher_dirs) + "]",
            "cache.views=2",
            f"distill.student.name={args.student}",
            "distill.student.kwargs={}",
            f"distill.loop.batch_size={args.batch}",
            f"distill.loop.max_steps={args.steps}",
            "distill.loop.log_every=1",
            "distill.loop.epochs=1",
        ]
        overrides += [f"cache.dir={tmp / 'cache'}", "pipeline.stages=[cache, distill-ce, distill]"]
        cfg = load_config(Config, ROOT / "configs/quickstart.yaml", overrides)
        runtime = Runtime(cfg)
        t0 = time.perf_counter()
        run_node(cfg, runtime, Node("cache"), print)
        cache_s = time.perf_counter() - t0
        # Modes alternate over rounds (ce, cached, online, ce, ...) so a change in the
        # machine's load hits all of them alike; the median round per mode is reported.
        runs: dict[str, list[float]] = {"ce": [], "cached": [], "online": []}
        for r in range(args.rounds):
            for mode in runs:
                kd_mode = "online" if mode == "online" else "cached"
                cfg = load_config(
                    Config,
                    ROOT / "configs/quickstart.yaml",
                    [*overrides, f"distill.mode={kd_mode}", f"run.out_dir={tmp / f'round{r}'}"],
                )
                run_node(cfg, runtime, Node("cache"), print)  # complete: reused, 0 rows
                node = Node("distill-ce" if mode == "ce" else "distill", f"seed{cfg.run.seed}")
                run_node(cfg, runtime, node, print)
                runs[mode].append(steps_per_s(directory(cfg, node)))
        rates = {mode: statistics.median(v) for mode, v in runs.items()}

        x = torch.randn(args.batch, 3, 32, 32)
        student_ms = forward_ms(build_model(args.student, 10), x)
        teacher_ms = sum(forward_ms(build_model(n, 10), x) for n in args.teachers.split(","))
    result = {
        "args": vars(args),
        "steps_per_s": rates,
        "steps_per_s_each_round": runs,
        "cached_kd_over_ce": rates["cached"] / rates["ce"],
        "cached_kd_over_online_kd": rates["cached"] / rates["online"],
        "teacher_over_student_forward_cost": teacher_ms / student_ms,
        "cache_build_s": cache_s,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
