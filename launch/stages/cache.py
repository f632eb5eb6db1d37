"""`cache`: score the teacher ensemble on V replayable views of every training sample."""

from __future__ import annotations

from common.logging import write_json
from common.precision import DTYPES
from common.runtime import open_stage
from distill.cache.layout import ShardPlan
from distill.cache.setup import cache_root, cached_splits, shard_assignment, teacher_configs
from distill.cache.writer import ShardWriter, build_spec, claim_spec, try_write_manifest
from distill.teachers import build_ensemble


def run(cfg) -> dict:
    root = cache_root(cfg)
    rt = open_stage(cfg, "cache", stage_dir=root)
    acc = rt.accelerator
    try:
        dataset = cached_splits(cfg).train
        ensemble = build_ensemble(
            teacher_configs(cfg), dataset.source.num_classes, cfg.cache.ensemble
        ).to(acc.device, DTYPES[cfg.run.dtype])
        num_shards, mine = shard_assignment(cfg, acc.process_index, acc.num_processes)
        spec = build_spec(dataset=dataset, ensemble=ensemble, cfg=cfg, seed=cfg.run.seed)
        spec["layout"]["num_shards"] = num_shards
        # main writes (or checks) spec.json first; then every other process (and array task)
        # checks it resumes the same cache
        if rt.is_main:
            claim_spec(root, spec)
        acc.wait_for_everyone()
        if not rt.is_main:
            claim_spec(root, spec)
        plan = ShardPlan(len(dataset) * cfg.cache.views, cfg.cache.batch_size, num_shards)
        writer = ShardWriter(
            root=root,
            spec=spec,
            dataset=dataset,
            ensemble=ensemble,
            plan=plan,
            views=cfg.cache.views,
            device=acc.device,
            autocast=acc.autocast,
            num_workers=cfg.data.num_workers,
            rows_per_part=cfg.cache.rows_per_part,
            logger=rt.logger,
        )
        for index in mine:
            writer.write(index)
        acc.wait_for_everyone()
        manifest = try_write_manifest(root, plan) if rt.is_main else None
        if manifest is None:
            if rt.is_main:
                rt.logger.info(
                    f"cache: shards {mine} of {num_shards} done in {root}; the "
                    f"manifest is written when the last shard finishes"
                )
            return {}
        metrics = {
            "num_samples": manifest["dataset"]["num_samples"],
            "views_per_sample": manifest["views"]["count"],
            "bytes": manifest["bytes"],
            "teachers": [{"acc": t["acc_on_cached_views"]} for t in manifest["teachers"]],
            "ensemble_acc": manifest["ensemble_acc_on_cached_views"],
        }
        write_json(root / "metrics.json", metrics)
        rt.logger.info(
            f"cache: complete in {root} ({manifest['num_rows']} rows, "
            f"{manifest['bytes'] / 1e6:.1f} MB); ensemble accuracy on cached views "
            f"{metrics['ensemble_acc']:.4f}"
        )
        return metrics
    finally:
        rt.close()
