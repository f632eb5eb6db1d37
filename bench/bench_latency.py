"""Does latency fall as far as MACs after pruning? Unpruned vs pruned vs rounded vs fused.

    python bench/bench_latency.py                          # VGG-19 at 70% channels, ResNet-56
    python bench/bench_latency.py --rounds 5 --out lat.json   # at ~50% MACs; CPU (+ CUDA)

Two networks are pruned as the prune stage prunes them (`prune.shrink.slim`, coupled groups,
10% floors), from BN scales shaped like a sparsity-trained net's (|N(0, 1)| times a per-layer
factor that falls with depth, so widths come out uneven, as NS's do): `cifar_vgg19` at 70% of
the channels (NS's rule) and `cifar_resnet56` at 50% of the MACs (`prune.target: macs`).
Each is measured as
- `unpruned`: the dense network, BN separate;
- `pruned`: widths as the threshold leaves them (`round_to: 1`);
- `pruned_r8`, `pruned_r16`: widths rounded to multiples of 8 / 16 (`prune.round_to`);
- `..._fused`: the same with every BN folded into its conv (what export ships);
at batch 1 and 64, with 1 thread and all threads, on CPU (and CUDA when present). The models
are measured in turn within every round, so the load of a shared machine falls on all of them
alike; the median over rounds is reported, with `latency_ratio / macs_ratio` against the
unpruned network: 1.0 means latency fell exactly as far as MACs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics

import torch

from common.models import build_model
from common.models.fold import fold_batchnorm
from prune.l1 import bn_layers
from prune.measure import count_macs, latency_ms
from prune.shrink import slim
from prune.target import threshold_for
from prune.threshold import layer_keep_masks

SHAPE = (3, 32, 32)
CASES = {"cifar_vgg19": ("channels", 0.7), "cifar_resnet56": ("macs", 0.5)}


def sparsity_like(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """BN scales as after L1 training: deeper layers smaller, every layer its own spread."""
    gen = torch.Generator().manual_seed(seed)
    layers = bn_layers(model)
    with torch.no_grad():
        for i, (_, bn) in enumerate(layers):
            depth = i / max(len(layers) - 1, 1)
            factor = float(torch.exp(torch.tensor(-2.0 * depth))) * (
                0.6 + 0.8 * float(torch.rand(1, generator=gen))
            )
            bn.weight.copy_(torch.randn(bn.num_features, generator=gen).abs() * factor)
            bn.bias.copy_(0.1 * torch.randn(bn.num_features, generator=gen))
    return model.eval()


def variants(name: str, seed: int) -> dict[str, torch.nn.Module]:
    model = sparsity_like(build_model(name, 10), seed)
    target, ratio = CASES[name]
    example = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(seed))
    out = {"unpruned": model}
    for r in (1, 8, 16):
        t = threshold_for(model, target, ratio, 0.1, example, round_to=r)
        pruned, _, _ = slim(model, layer_keep_masks(model, t, 0.1), example, r, 0.1)
        key = "pruned" if r == 1 else f"pruned_r{r}"
        out[key] = pruned
        out[f"{key}_fused"] = fold_batchnorm(pruned)[0]
    return out


def measure(models: dict, device: str, batches, threads, rounds: int, repeats: int) -> dict:
    times: dict = {k: {} for k in models}
    for _ in range(rounds):
        for b in batches:
            for t in threads:
                for k, m in models.items():
                    ms = latency_ms(m.to(device), SHAPE, b, repeats, warmup=1, threads=t)
                    times[k].setdefault(f"bs{b}_t{t}", []).append(ms)
    return {k: {c: statistics.median(v) for c, v in d.items()} for k, d in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="passes over all models")
    p.add_argument("--repeats", type=int, default=3, help="timed forwards per model and pass")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args()
    threads = sorted({1, os.cpu_count() or 1})
    result: dict = {"args": vars(args), "threads": threads, "cpu": _cpu_name(), "models": {}}
    for name in CASES:
        models = variants(name, args.seed)
        macs = {k: count_macs(m, SHAPE) for k, m in models.items()}
        devices = {"cpu": threads} | ({"cuda": [None]} if torch.cuda.is_available() else {})
        entry: dict = {"macs": macs, "widths": {}}
        for k in ("pruned", "pruned_r8", "pruned_r16"):
            entry["widths"][k] = [bn.num_features for _, bn in bn_layers(models[k])]
        for dev, ts in devices.items():
            ms = measure(models, dev, args.batches, ts, args.rounds, args.repeats)
            base = ms["unpruned"]
            entry[dev] = {
                k: {
                    c: {
                        "ms": v,
                        "latency_ratio": v / base[c],
                        "over_macs_ratio": (v / base[c]) / (macs[k] / macs["unpruned"]),
                    }
                    for c, v in d.items()
                }
                for k, d in ms.items()
            }
        result["models"][name] = entry
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    text = json.dumps(result, indent=1)
    print(text)
    print(table(result))
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


def table(result: dict) -> str:
    """Markdown: per model and variant, MACs kept and latency kept / over-MACs per setting."""
    lines = []
    for name, e in result["models"].items():
        for dev in ("cpu", "cuda"):
            if dev not in e:
                continue
            cols = list(e[dev]["unpruned"])
            lines.append(f"\n{name} on {dev}: latency kept (latency ratio / MACs ratio)\n")
            lines.append("| variant | MACs kept | " + " | ".join(cols) + " |")
            lines.append("|---" * (len(cols) + 2) + "|")
            base = e["macs"]["unpruned"]
            for k, d in e[dev].items():
                cells = [
                    f"{d[c]['latency_ratio']:.2f} ({d[c]['over_macs_ratio']:.2f})" for c in cols
                ]
                lines.append(f"| {k} | {e['macs'][k] / base:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    main()
