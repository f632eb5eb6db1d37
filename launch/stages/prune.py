"""`prune`: a global |gamma| threshold, coupled channels removed, a physically smaller model.

Every rank prunes the same replicated weights (Torch-Pruning's DDP flow): the threshold is
computed on rank 0, broadcast and checked against every rank's own, and each rank's pruned
weights + widths digest is compared, so a divergence stops the run instead of silently
training different networks. The schedule (`prune.schedule`) and the threshold for a target
(`prune.target`) are pure functions; this module runs one round of them at a time and measures
before and after with the trainer's own evaluation (`common.evaluate`).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from pathlib import Path

import torch
from accelerate.utils import broadcast
from torch import nn

from common.bnstats import recalibrate_bn
from common.checkpoint import load_model, save_model
from common.data import build_splits
from common.errors import ConfigError
from common.evaluate import evaluate
from common.logging import write_json
from common.models import model_widths
from common.trainer import CrossEntropyTask, Trainer
from prune.l1 import SparsityTask, bn_layers, require_bn
from prune.measure import count_macs, count_params, latency_ms
from prune.plots import widths_plot
from prune.schedule import last_round, round_ratio
from prune.shrink import slim
from prune.target import threshold_for
from prune.threshold import all_gammas, layer_keep_masks, separation

CONVENTIONS = (
    "MACs: Conv2d+Linear multiply-accumulates per sample (batch 1); FLOPs = 2*MACs; BN, "
    "activations, pooling, additions not counted. Latency: median ms of eval forwards under "
    "torch.inference_mode on this CPU."
)


def run(cfg, inputs, ctx) -> dict:
    pc, acc = cfg.prune, ctx.accelerator
    original, spec = load_model(inputs["model"])
    require_bn(original, "prune.init")
    splits = build_splits(cfg.data, cfg.run.seed)
    shape = tuple(splits.test[(0, -1)]["image"].shape)  # (3, H, W)
    example = torch.randn(4, *shape, generator=torch.Generator().manual_seed(cfg.run.seed))
    example = example.to(next(original.parameters()).dtype)  # the same on every rank

    def accuracy(model: nn.Module, split: str) -> float:
        dataset = getattr(splits, split)
        return evaluate(model.to(acc.device), dataset, acc, batch_size=256)["acc"]

    def recalibrate(model: nn.Module) -> dict:
        """EagleEye's adaptive BN: the accuracy with the unpruned net's statistics, then
        statistics re-estimated on training batches (the same on every rank)."""
        if not pc.recalibrate_bn:
            return {}
        stale = accuracy(model, "test")
        used = recalibrate_bn(model, splits.train, pc.recalibrate_bn, pc.recalibrate_batch_size)
        return {"test_acc_stale_bn": stale, "bn_recalibrated_on": used}

    before = _size_and_speed(original, shape, pc, ctx.is_main)
    before.update(test_acc=accuracy(original, "test"))
    if pc.recalibrate_bn:  # like for like: the pruned net is measured after re-estimation
        same = copy.deepcopy(original)
        recalibrate_bn(same, splits.train, pc.recalibrate_bn, pc.recalibrate_batch_size)
        before.update(test_acc_bn_recalibrated=accuracy(same, "test"))
    per_round = round_ratio(pc.ratio, pc.iterative.rounds)
    current, rounds = original, []
    for k in range(pc.iterative.rounds):
        rdir = ctx.stage_dir if pc.iterative.rounds == 1 else ctx.stage_dir / f"round_{k + 1}"
        pruned, record = prune_round(acc, current, pc, per_round, example, rdir, recalibrate)
        record.update(round=k + 1, test_acc_pruned=accuracy(pruned, "test"))
        rounds.append(record)
        recal = record.get("bn_recalibrated_on")
        ctx.logger.info(
            f"prune round {k + 1}: channels with |gamma| <= {record['threshold']:.4g} removed; "
            f"params {record['params']}, MACs {record['macs']}, test acc "
            f"{record['test_acc_pruned']:.4f}"
            + (f" (BN statistics re-estimated on {recal} images)" if recal else "")
        )
        round_spec = {**spec, "widths": model_widths(pruned)}
        if ctx.is_main and pc.iterative.rounds > 1:
            save_model(rdir / "model", pruned, round_spec)
            write_json(rdir / "metrics.json", record)
        if last_round(
            k, pc.iterative.rounds, record["macs"] / before["macs"], pc.iterative.macs_budget
        ):
            break
        current = _finetune_between(cfg, ctx, pruned, round_spec, splits, rdir / "finetune")

    after = _size_and_speed(pruned, shape, pc, ctx.is_main)
    after.update(test_acc=rounds[-1]["test_acc_pruned"])  # before fine-tuning
    requested = rounds[-1]["requested"]
    per_layer = {
        name: {
            "kept": m.num_features,
            "requested": requested.get(name, m.num_features),
            "total": original.get_submodule(name).num_features,
        }
        for name, m in bn_layers(pruned)
    }
    metrics = {
        "target": pc.target,
        "ratio": pc.ratio,
        "min_channels_ratio": pc.min_channels_ratio,
        "round_to": pc.round_to,
        "threshold": rounds[-1]["threshold"],
        "separation": separation(all_gammas(original), rounds[0]["threshold"]),
        "conventions": CONVENTIONS,
        "before": before,
        "after": after,
        "params_ratio": after["params"] / before["params"],
        "macs_ratio": after["macs"] / before["macs"],
        "latency_ratio": {
            b: after["latency_ms"][b] / before["latency_ms"][b] for b in before["latency_ms"]
        }
        if ctx.is_main
        else None,
        "channels": {
            "kept": sum(v["kept"] for v in per_layer.values()),
            "total": sum(v["total"] for v in per_layer.values()),
        },
        "per_layer": per_layer,
        "rounds": rounds,
        "world_size": acc.num_processes,
        "source": str(inputs["model"]),
    }
    if ctx.is_main:
        save_model(ctx.stage_dir / "model", pruned, {**spec, "widths": model_widths(pruned)})
        widths_plot(per_layer, ctx.stage_dir / "widths.png", f"kept channels ({inputs['model']})")
        ctx.logger.log_image("prune/widths", ctx.stage_dir / "widths.png")
        write_json(ctx.stage_dir / "metrics.json", metrics)
    ctx.barrier()
    ctx.logger.info(
        f"prune: params {before['params']} -> {after['params']}, MACs {before['macs']} -> "
        f"{after['macs']}, test acc {before['test_acc']:.4f} -> {after['test_acc']:.4f} "
        f"(before fine-tuning)"
    )
    return metrics


def prune_round(acc, model: nn.Module, pc, ratio: float, example, rdir: Path, settle=None):
    """One round: the agreed threshold for `ratio` of `pc.target`, coupled masks with floors,
    the shrunk model (after `settle(model)`, which returns record entries: the BN
    recalibration), checked identical on every rank, and the round's record."""
    floor = pc.min_channels_ratio
    threshold = agreed_threshold(acc, model, pc.target, ratio, floor, example, pc.round_to)
    masks = layer_keep_masks(model, threshold, floor)
    pruned, _, report = slim(model, masks, example, pc.round_to, floor)
    if model_widths(pruned) == model_widths(model):
        raise ConfigError(
            f"`prune.ratio` {ratio} of the {pc.target} removes no channel: the per-layer floor "
            f"`prune.min_channels_ratio` {floor} (and `prune.round_to` {pc.round_to}) keep every "
            "channel of every layer; lower the floor or raise the ratio"
        )
    settled = settle(pruned) if settle is not None else {}
    record = {
        "ratio": ratio,
        "threshold": threshold,
        "macs": count_macs(pruned, tuple(example.shape[1:])),
        "params": count_params(pruned),
        "unfolded": report["unfolded"],
        "requested": report["requested"],
        **settled,
        "state_sha256": check_identical(acc, pruned, rdir),
    }
    return pruned, record


def agreed_threshold(acc, model, target, ratio, floor, example, round_to=1) -> float:
    """Rank 0's global threshold, broadcast; every rank must find the same one."""
    local = threshold_for(model, target, ratio, floor, example, round_to)
    if acc.num_processes == 1:
        return local
    value = torch.tensor([local if acc.is_main_process else 0.0], dtype=torch.float64)
    value = broadcast(value.to(acc.device), from_process=0)
    both = acc.gather(torch.tensor([[float(value.item()), local]], dtype=torch.float64))
    if not torch.all(both == both[0, 0]):
        raise RuntimeError(f"ranks disagree on the pruning threshold: {both.tolist()}")
    return float(value.item())


def state_digest(model: nn.Module) -> str:
    """sha256 of the widths and every tensor of the state dict, in name order."""
    h = hashlib.sha256(json.dumps(model_widths(model), sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def check_identical(acc, model: nn.Module, directory: Path) -> str:
    """Each rank records its pruned-model digest; all must match (else RuntimeError)."""
    digest = state_digest(model)
    out = directory / "rank_digests"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{acc.process_index}.json").write_text(
        json.dumps({"sha256": digest, "widths": model_widths(model)})
    )
    if acc.num_processes > 1:
        mine = torch.tensor([[int(digest[i : i + 12], 16) for i in range(0, 48, 12)]])
        every = acc.gather(mine.to(acc.device)).cpu()
        if not torch.all(every == every[0]):
            raise RuntimeError("ranks hold different pruned models; see " + str(out))
    return digest


def _size_and_speed(model: nn.Module, shape, pc, is_main: bool) -> dict:
    macs = count_macs(model, shape)
    out = {"params": count_params(model), "macs": macs, "flops": 2 * macs}
    if is_main:  # latency on rank 0 only: the other ranks would compete for the same cores
        out["latency_threads"] = pc.latency_threads or torch.get_num_threads()
        out["latency_ms"] = {
            str(b): latency_ms(
                model, shape, b, pc.latency_repeats, pc.latency_warmup, pc.latency_threads
            )
            for b in pc.latency_batches
        }
    return out


def _finetune_between(cfg, ctx, model, spec, splits, directory: Path) -> nn.Module:
    """Fine-tune between rounds (with L1 kept on if `prune.iterative.s` > 0); reload the
    result from disk so every rank continues from the same plain (non-synced-BN) model."""
    it = cfg.prune.iterative
    task = CrossEntropyTask(it.loop.label_smoothing)
    if it.s > 0:
        task = SparsityTask(task, s=it.s, total_steps=1, steps_per_epoch=1)
    if ctx.is_main:
        directory.mkdir(parents=True, exist_ok=True)
    ctx.barrier()
    Trainer(
        ctx=dataclasses.replace(ctx, stage_dir=directory),
        run=cfg.run,
        loop=it.loop,
        loop_key="prune.iterative.loop",
        model=model,
        spec=spec,
        splits=splits,
        task=task,
    ).fit()
    reloaded, _ = load_model(directory / "model")
    return reloaded
