"""`prune`: global |gamma| threshold, coupled channel removal, a physically smaller model.

Every rank prunes the same replicated weights (Torch-Pruning's DDP flow); the threshold is
computed on rank 0, broadcast, and each rank checks it against its own, and after pruning
each rank's weights + widths hash is gathered and compared, so a divergence stops the run
instead of silently training different networks. Iterative mode (`prune.iterative.rounds`)
repeats prune -> fine-tune, each round in `round_K/`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from accelerate.utils import broadcast
from torch import nn

from common.checkpoint import load_model, save_model
from common.data import build_splits, eval_batches, make_loader
from common.logging import write_json
from common.models import model_widths
from common.runtime import open_stage
from common.trainer import CrossEntropyTask, Trainer
from prune.l1 import SparsityTask, bn_layers, require_bn
from prune.measure import count_macs, count_params, latency_ms
from prune.plots import widths_plot
from prune.shrink import slim
from prune.threshold import all_gammas, global_threshold, layer_keep_masks


def run(cfg, stage: str = "prune", stage_dir=None) -> dict:
    rt = open_stage(cfg, stage, stage_dir)
    try:
        pc, acc = cfg.prune, rt.accelerator
        init = Path(pc.init or Path(cfg.run.out_dir) / "sparsity" / "model")
        original, spec = load_model(init)
        require_bn(original, "prune.init")
        splits = build_splits(cfg.data, cfg.run.seed)
        shape = tuple(splits.test[(0, -1)]["image"].shape)  # (3, H, W)
        gen = torch.Generator().manual_seed(cfg.run.seed)
        example = torch.randn(4, *shape, generator=gen)  # same on every rank
        eval_bs = max(1, cfg.finetune.loop.batch_size // acc.num_processes)

        before = _size_and_speed(original, shape, pc, rt.is_main)
        before["test_acc"] = evaluate(acc, original, splits, eval_bs)
        it = pc.iterative
        per_round = 1 - (1 - pc.ratio) ** (1 / it.rounds)
        current, rounds = original, []
        for k in range(it.rounds):
            rdir = rt.stage_dir if it.rounds == 1 else rt.stage_dir / f"round_{k + 1}"
            threshold = agreed_threshold(acc, current, per_round)
            masks = layer_keep_masks(current, threshold, pc.min_channels_ratio)
            pruned, _, report = slim(current, masks, example)
            digest = check_identical(acc, pruned, rdir)
            round_spec = {**spec, "widths": model_widths(pruned)}
            macs = count_macs(pruned, shape)
            record = {
                "round": k + 1,
                "ratio": per_round,
                "threshold": threshold,
                "macs": macs,
                "params": count_params(pruned),
                "test_acc_pruned": evaluate(acc, pruned, splits, eval_bs),
                "unfolded": report["unfolded"],
                "state_sha256": digest,
            }
            if rt.is_main and it.rounds > 1:
                save_model(rdir / "model", pruned, round_spec)
                write_json(rdir / "metrics.json", record)
            rounds.append(record)
            rt.logger.info(f"prune round {k + 1}: {record}")
            budget_met = it.macs_budget is not None and macs <= it.macs_budget * before["macs"]
            if k == it.rounds - 1 or budget_met:
                break
            current = _finetune_round(cfg, rt, pruned, round_spec, splits, rdir / "finetune")

        after = _size_and_speed(pruned, shape, pc, rt.is_main)
        after["test_acc"] = rounds[-1]["test_acc_pruned"]  # before fine-tuning
        per_layer = {
            name: {"kept": m.num_features, "total": original.get_submodule(name).num_features}
            for name, m in bn_layers(pruned)
        }
        metrics = {
            "ratio": pc.ratio,
            "min_channels_ratio": pc.min_channels_ratio,
            "threshold": rounds[-1]["threshold"],
            "conventions": "MACs: Conv2d+Linear multiply-accumulates per sample (batch 1); "
            "FLOPs = 2*MACs; BN, activations, pooling, additions not counted. "
            "Latency: median ms of eval forwards under torch.inference_mode on this CPU.",
            "before": before,
            "after": after,
            "params_ratio": after["params"] / before["params"],
            "macs_ratio": after["macs"] / before["macs"],
            "latency_ratio": {
                b: after["latency_ms"][b] / before["latency_ms"][b] for b in before["latency_ms"]
            }
            if rt.is_main
            else None,
            "channels": {
                "kept": sum(v["kept"] for v in per_layer.values()),
                "total": sum(v["total"] for v in per_layer.values()),
            },
            "per_layer": per_layer,
            "rounds": rounds,
            "world_size": acc.num_processes,
            "model_dir": str(rt.stage_dir / "model"),
            "source": str(init),
        }
        if rt.is_main:
            save_model(rt.stage_dir / "model", pruned, round_spec)
            widths_plot(per_layer, rt.stage_dir / "widths.png", f"kept channels ({init})")
            rt.logger.log_image("prune/widths", rt.stage_dir / "widths.png")
            write_json(rt.stage_dir / "metrics.json", metrics)
        acc.wait_for_everyone()
        rt.logger.info(
            f"{stage}: params {before['params']} -> {after['params']}, MACs {before['macs']} -> "
            f"{after['macs']}, test acc {before['test_acc']:.4f} -> {after['test_acc']:.4f} "
            f"(before fine-tuning); metrics in {rt.stage_dir / 'metrics.json'}"
        )
        return metrics
    finally:
        rt.close()


def agreed_threshold(acc, model: nn.Module, ratio: float) -> float:
    """Rank 0's global threshold, broadcast; every rank must hold the same gammas."""
    local = global_threshold(all_gammas(model), ratio)
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


@torch.no_grad()
def evaluate(acc, model: nn.Module, splits, batch_size: int) -> float:
    """Test accuracy, each rank on its share, summed over ranks."""
    was_training = model.training
    model.eval().to(acc.device)
    batches = eval_batches(len(splits.test), batch_size, acc.process_index, acc.num_processes)
    correct = count = 0
    for batch in make_loader(splits.test, batches, splits.num_workers):
        logits = model(batch["image"].to(acc.device, next(model.parameters()).dtype))
        correct += int((logits.argmax(1).cpu() == batch["label"]).sum())
        count += len(logits)
    model.train(was_training)
    total = acc.reduce(
        torch.tensor([correct, count], dtype=torch.float64, device=acc.device), "sum"
    )
    return float(total[0] / max(total[1], 1))


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


def _finetune_round(cfg, rt, model, spec, splits, directory: Path) -> nn.Module:
    """Fine-tune between rounds (with L1 kept on if `prune.iterative.s` > 0); reload the
    result from disk so every rank continues from the same plain (non-synced-BN) model."""
    it = cfg.prune.iterative
    task = CrossEntropyTask(it.loop.label_smoothing)
    if it.s > 0:
        task = SparsityTask(task, s=it.s, total_steps=1, steps_per_epoch=1)
    if rt.is_main:
        directory.mkdir(parents=True, exist_ok=True)
    rt.accelerator.wait_for_everyone()
    trainer = Trainer(
        accelerator=rt.accelerator,
        run=cfg.run,
        loop=it.loop,
        model=model,
        spec=spec,
        splits=splits,
        task=task,
        stage_dir=directory,
        logger=rt.logger,
    )
    trainer.fit()
    reloaded, _ = load_model(directory / "model")
    return reloaded
