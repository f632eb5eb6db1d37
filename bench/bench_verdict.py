"""What narrows the quickstart's KD-vs-CE interval: selection rule, validation size, seeds,
test split size (issue 25, point 2).

    python bench/bench_verdict.py --seeds 10 --out runs/bench_verdict

For each variant, runs the quickstart's `train`, `cache`, `distill-ce` and `distill` stages
in this process (its own run directory, so nothing is shared between variants) with
`--seeds` student seeds, then reads every student's per-epoch history. Because every epoch is
evaluated on validation and test (`loop.test_every_epoch`), one run gives the test accuracy
each selection rule would report: the first epoch with the best validation accuracy (`val`,
the trainer's rule) and the last epoch (`none`); of the weight average where the variant
keeps one (`loop.ema_decay`: the quickstart's teachers and students do). Printed per variant and
rule: the paired per-seed differences (KD - CE, points), their sd, and the 95% t-interval's
half-width over the first 3, 5, 8, ... seed pairs. The half-width over n pairs is
t(0.975, n-1) sd / sqrt(n), so the sd over all pairs is the number to compare; the widths are
what a report with that many seeds would show.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

OLD_TEACHERS = ["train.loop.ema_decay=null", "train.loop.selection_split=val"]
"""The teachers as the quickstart trained them before it averaged weights."""
RAW = [*OLD_TEACHERS, "distill.loop.ema_decay=null"]
"""The old quickstart: trained weights, not their average."""
VARIANTS: dict[str, list[str]] = {
    "val 10%": RAW,
    "val 20%": [*RAW, "data.val_fraction=0.2"],
    "val 30%": [*RAW, "data.val_fraction=0.3"],
    "val 0% (all 1,438 images train; last epoch)": [*RAW, "data.val_fraction=0"],
    "EMA 0.95 (students)": [*OLD_TEACHERS, "distill.loop.ema_decay=0.95"],
    "EMA 0.99 (quickstart)": [],
}


def histories(out: Path, stage: str, seeds: int) -> list[dict]:
    return [
        json.loads((out / stage / f"seed{s}" / "metrics.json").read_text()) for s in range(seeds)
    ]


def accuracy(metrics: dict, rule: str) -> float:
    """The test accuracy `rule` reports, from the per-epoch history: `val` the first epoch
    with the best validation accuracy (the trainer's rule), `last` the last epoch."""
    history = [h for h in metrics["history"] if "test_acc" in h]
    if rule == "val":
        return max(history, key=lambda h: h["val_acc"])["test_acc"]  # max: the first best
    return history[-1]["test_acc"]


def summary(diffs: list[float]) -> dict:
    from common.stats import paired_t_interval

    half = {}
    for n in range(3, len(diffs) + 1):
        low, high = paired_t_interval(diffs[:n])["ci95"]
        half[n] = round(100 * (high - low) / 2, 2)
    return {
        "diffs_points": [round(100 * d, 2) for d in diffs],
        "mean_points": round(100 * statistics.fmean(diffs), 2),
        "sd_points": round(100 * statistics.stdev(diffs), 2),
        "half_width_points": half,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--out", default="runs/bench_verdict")
    p.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    p.add_argument("--extra", nargs="*", default=[], help="overrides applied to every variant")
    p.add_argument("--digits-train", type=int, default=None, help="digits train images")
    args = p.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    if args.digits_train:  # a larger digits test split: fewer train images, more test ones
        from common.data.sources import DigitsSource

        DigitsSource.TRAIN = args.digits_train
    from launch.cli import main as kdslim

    seeds = "[" + ",".join(str(s) for s in range(args.seeds)) + "]"
    results = {}
    for name, overrides in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        out = Path(args.out) / re.sub(r"[^A-Za-z0-9.]+", "_", name).strip("_")
        t0 = time.perf_counter()
        rc = kdslim(
            [
                "pipeline",
                "--config",
                str(ROOT / "configs/quickstart.yaml"),
                f"run.out_dir={out}",
                f"distill.seeds={seeds}",
                "pipeline.stages=[train,cache,distill-ce,distill]",
                "logging.progress=false",
                *overrides,
                *args.extra,
            ]
        )
        if rc:
            raise SystemExit(f"variant {name!r} failed ({rc})")
        ce, kd = histories(out, "distill-ce", args.seeds), histories(out, "distill", args.seeds)
        rules = ["val", "last"] if ce[0]["splits"]["val"] else ["last"]
        results[name] = {
            "wall_s": round(time.perf_counter() - t0, 1),
            **{
                rule: summary([accuracy(k, rule) - accuracy(c, rule) for c, k in zip(ce, kd)])
                for rule in rules
            },
        }
        print(json.dumps({name: results[name]}), flush=True)
    print(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
