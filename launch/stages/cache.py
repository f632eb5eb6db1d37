"""`cache`: score the teacher ensemble on V replayable views of every training sample.

The cache lives in its own directory (`cache.dir`, see `distill.cache.setup.cache_root`); this
stage's directory holds only its config, logs and metrics. A complete cache that equals this
run's request is reused as it is (0 rows written), whichever run made it; one made for another
request is refused with the differences, never moved or rebuilt in place.
"""

from __future__ import annotations

from common.logging import size_text
from common.precision import DTYPES, memory_format
from distill.cache.layout import (
    MANIFEST_FILE,
    check_format,
    identity_differences,
    mismatch,
    read_json,
)
from distill.cache.setup import (
    cache_root,
    cached_splits,
    request,
    shard_assignment,
    teacher_configs,
)
from distill.cache.writer import ShardWriter, build_spec, claim_spec, try_write_manifest
from distill.teachers import build_ensemble


def run(cfg, inputs, ctx) -> dict:
    teachers = teacher_configs(cfg, inputs["teachers"])
    root = cache_root(cfg, teachers)
    wanted = request(cfg, teachers)
    manifest_path = root / MANIFEST_FILE
    if manifest_path.is_file():
        manifest = read_json(manifest_path)
        check_format(root, manifest)
        diffs = identity_differences(manifest, wanted)
        if diffs:
            raise mismatch(
                root,
                "a complete cache made for another request",
                diffs,
                "Point cache.dir elsewhere, or use `cache.dir: auto` (one directory per "
                "request); kdslim never moves or rebuilds a cache in place.",
            )
        ctx.logger.info(f"cache: reusing the complete cache in {root} (0 rows written)")
        return _finish(ctx, manifest, root, rows_written=0)

    acc = ctx.accelerator
    dataset = cached_splits(cfg).train
    c = cfg.cache
    ensemble = build_ensemble(
        teachers, dataset.source.num_classes, c.ensemble, c.ensemble_weights
    ).to(acc.device, DTYPES[cfg.run.dtype], memory_format=memory_format(cfg.run))
    num_shards, mine = shard_assignment(cfg, acc.process_index, acc.num_processes)
    spec = build_spec(wanted, cfg, num_shards, teachers)
    # rank 0 writes (or checks) spec.json first; then every other process (and array task)
    # checks it continues the same cache
    if ctx.is_main:
        claim_spec(root, spec)
    ctx.barrier()
    if not ctx.is_main:
        claim_spec(root, spec)
    writer = ShardWriter.for_config(
        cfg,
        root,
        spec,
        dataset,
        ensemble,
        num_shards,
        device=acc.device,
        autocast=acc.autocast,
        logger=ctx.logger,
    )
    for index in mine:
        writer.write(index)
    written = writer.rows_written
    ctx.barrier()
    manifest = try_write_manifest(root, writer.plan) if ctx.is_main else None
    if manifest is None:
        if ctx.is_main:
            ctx.logger.info(
                f"cache: shards {mine} of {num_shards} done in {root}; the manifest is "
                f"written when the last shard finishes"
            )
        return {"rows_written": written}
    return _finish(ctx, manifest, root, rows_written=written)


def _finish(ctx, manifest: dict, root, rows_written: int) -> dict:
    metrics = {
        "cache_dir": str(root),
        "rows_written": rows_written,
        "num_samples": manifest["dataset"]["num_samples"],
        "views_per_sample": manifest["views"]["count"],
        "bytes": manifest["bytes"],
        "teachers": [{"acc": t["acc_on_cached_views"]} for t in manifest["teachers"]],
        "ensemble_acc": manifest["ensemble_acc_on_cached_views"],
    }
    return ctx.publish(
        metrics,
        f"cache: complete in {root} ({manifest['num_rows']} rows, "
        f"{size_text(manifest['bytes'])}, {rows_written} written now); ensemble accuracy on "
        f"the cached views {metrics['ensemble_acc']:.4f}",
    )
