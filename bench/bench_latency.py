"""Median CPU latency of saved models at batch 1 and 64, and each one's ratio to the first.

    python bench/bench_latency.py runs/x/sparsity/model runs/x/prune/model --threads 1

Uses the same measurement as the prune stage (`prune.measure.latency_ms`: eval mode,
`torch.inference_mode`, warm-up, median of repeats), run back to back in one process.
"""

from __future__ import annotations

import argparse
import json

from common.checkpoint import load_model
from prune.measure import latency_ms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("models", nargs="+", help="model directories (model.json + safetensors)")
    p.add_argument("--size", type=int, default=32, help="input side")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    out: dict = {}
    for d in args.models:
        model, _ = load_model(d)
        out[d] = {
            b: latency_ms(
                model,
                (3, args.size, args.size),
                b,
                repeats=args.repeats,
                warmup=args.warmup,
                threads=args.threads,
            )
            for b in args.batches
        }
    base = out[args.models[0]]
    ratios = {d: {b: out[d][b] / base[b] for b in args.batches} for d in args.models}
    print(json.dumps({"latency_ms": out, "ratio_to_first": ratios, "args": vars(args)}, indent=1))


if __name__ == "__main__":
    main()
