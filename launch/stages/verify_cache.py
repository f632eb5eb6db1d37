"""`verify-cache`: completeness, checksums, and a re-scoring spot check of the cache."""

from __future__ import annotations

from common.logging import write_json
from common.precision import DTYPES
from common.runtime import open_stage
from distill.cache import LogitCache, consumer_expectation
from distill.cache.setup import cache_root, cached_splits, teacher_configs
from distill.cache.verify import check_files_and_keys, spot_check
from distill.teachers import build_ensemble


def run(cfg) -> dict:
    root = cache_root(cfg)
    rt = open_stage(cfg, "verify-cache", stage_dir=root / "verify")
    try:
        dataset = cached_splits(cfg).train
        ensemble = build_ensemble(
            teacher_configs(cfg), dataset.source.num_classes, cfg.cache.ensemble
        ).to(rt.accelerator.device, DTYPES[cfg.run.dtype])
        cache = LogitCache(
            root, consumer_expectation(dataset, cfg.cache.views, ensemble.identities)
        )
        report = {"rows": check_files_and_keys(cache)}
        report.update(
            spot_check(
                cache,
                dataset,
                ensemble,
                cfg.cache.verify_samples,
                cfg.run.seed,
                rt.accelerator.device,
            )
        )
        if rt.is_main:
            write_json(rt.stage_dir / "metrics.json", report)
            rt.logger.info(
                f"verify-cache: OK: {report['rows']} rows complete, checksums match, "
                f"{report['rows_checked']} re-scored rows agree (top-1 "
                f"{report['top1_agreement']:.2%}, max |diff| {report['max_abs_diff']:.2g})"
            )
        return report
    finally:
        rt.close()
