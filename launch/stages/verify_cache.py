"""`verify-cache`: completeness, checksums, and a re-scoring spot check of the cache."""

from __future__ import annotations

from common.precision import DTYPES
from distill.cache import LogitCache
from distill.cache.setup import cached_splits, request, teacher_configs
from distill.cache.verify import check_files_and_keys, spot_check
from distill.teachers import build_ensemble


def run(cfg, inputs, ctx) -> dict:
    teachers = teacher_configs(cfg, inputs["teachers"])
    dataset = cached_splits(cfg).train
    cache = LogitCache(inputs["cache"], request(cfg, teachers))
    c = cfg.cache
    ensemble = build_ensemble(
        teachers, dataset.source.num_classes, c.ensemble, c.ensemble_weights
    ).to(ctx.accelerator.device, DTYPES[cfg.run.dtype])
    report = {"cache_dir": str(inputs["cache"]), "rows": check_files_and_keys(cache)}
    report.update(
        spot_check(
            cache,
            dataset,
            ensemble,
            cfg.cache.verify_samples,
            cfg.run.seed,
            ctx.accelerator.device,
        )
    )
    return ctx.publish(
        report,
        f"verify-cache: OK: {report['rows']} rows complete, checksums match, "
        f"{report['rows_checked']} re-scored rows agree (top-1 "
        f"{report['top1_agreement']:.2%}, max |diff| {report['max_abs_diff']:.2g})",
    )
