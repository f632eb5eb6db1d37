"""One evaluation pass as the trainer runs it, timed: what `loop.test_every_epoch: false` saves.

    python bench/bench_eval.py --data-root ../shared/data/cifar10 MODEL_DIR [MODEL_DIR ...]

Each saved model (`<stage>/model/`) evaluates the test split `--repeats` times in
channels_last at the trainer's per-process batch with one loader worker, as
`common.trainer.Trainer.evaluate` does; prints the seconds of every pass and the accuracy.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
from accelerate import Accelerator

from common.checkpoint import load_model
from common.config import DataConfig
from common.data import build_splits
from common.evaluate import evaluate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("models", nargs="+", help="saved model directories")
    p.add_argument("--data-root", required=True)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    cfg = DataConfig(name="cifar10", root=args.data_root, num_workers=args.workers)
    test = build_splits(cfg, 0).test
    acc = Accelerator(cpu=True)
    out = {}
    for d in args.models:
        model = load_model(d)[0].to(memory_format=torch.channels_last)
        seconds = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            result = evaluate(
                model,
                test,
                acc,
                batch_size=args.batch,
                num_workers=args.workers,
                memory_format=torch.channels_last,
            )
            seconds.append(time.perf_counter() - t0)
        out[d] = {"seconds": seconds, "images": len(test), "acc": result["acc"]}
    out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
