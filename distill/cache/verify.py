"""Prove a cache is complete, intact and still what the teachers say.

Three independent checks: the shards' row ranges tile samples x views exactly and each shard
holds the rows of its range (a row's position is its (sample_id, view_id)); every shard file
matches the checksum recorded when it was written; and K random rows, re-scored by
the teachers on freshly replayed views, agree with the stored targets (top-1 and values within
float16 rounding). The last one catches what checksums cannot: a cache made from other pixels.
`verify_directory` runs them on a directory alone, rebuilding data and teachers from the paths
its manifest records (re-scoring is skipped, with the reason, when they are not there).
"""

from __future__ import annotations

import datasets
import numpy as np
import torch

from common.config import DataConfig, from_dict
from common.data import ViewDataset, build_splits
from common.errors import CacheError, KdslimError
from common.files import file_sha256
from common.precision import DTYPES
from distill.cache.layout import TOPK_EXTRAS, identity_of, shard_name
from distill.cache.reader import LogitCache
from distill.cache.writer import topk_extras
from distill.config import CacheConfig, TeacherConfig
from distill.teachers import Ensemble, build_ensemble, teacher_identity

# Relative tolerance of a re-scored value, by what limits it most. float16 storage keeps 11
# significant bits (step 9.8e-4 relative); teachers under bf16 autocast keep 8 (3.9e-3) and a
# re-scored batch of another size may round its products differently; float32 storage is
# limited by float32 arithmetic in batches of other sizes (~600-term sums per conv output,
# 20+ layers: well under 1e-4); float64 by float64 arithmetic (~1e-15 per operation).
TOLERANCE = {"float16": 2e-3, "float32": 1e-4, "float64": 1e-9}
AUTOCAST_TOLERANCE = {"bf16": 3e-2, "fp16": 2e-3}


def check_files_and_keys(cache: LogitCache) -> int:
    """Checksums (streamed) and row completeness of every shard; returns the rows covered."""
    m = cache.manifest
    problems = []
    expected_lo = 0
    for i, rec in enumerate(m["shards"]):
        path = cache.root / shard_name(i, m["num_shards"])
        lo, hi = rec["rows"]
        if lo != expected_lo or hi - lo != rec["num_rows"]:
            problems.append(f"{path}: rows {lo}..{hi} do not follow row {expected_lo}")
        expected_lo = hi
        before = len(problems)
        for f, meta in rec["files"].items():
            if not (path / f).is_file():
                problems.append(f"{path / f}: missing")
            elif file_sha256(path / f) != meta["sha256"]:
                problems.append(f"{path / f}: checksum mismatch (corrupt or truncated)")
        if len(problems) > before:  # this shard's files are bad: skip its row count
            continue
        try:
            rows = len(datasets.load_from_disk(str(path)))
        except Exception as e:  # any Arrow failure here means a damaged shard
            problems.append(f"{path}: unreadable ({e})")
            continue
        if rows != rec["num_rows"]:
            problems.append(f"{path}: {rows} rows, its range {lo}..{hi} needs {hi - lo}")
    covered = sum(r["num_rows"] for r in m["shards"])
    if covered != m["num_rows"] or m["num_rows"] != m["dataset"]["num_samples"] * cache.views:
        problems.append(
            f"shards cover {covered} rows; expected "
            f"{m['dataset']['num_samples']} samples x {cache.views} views"
        )
    if problems:
        raise CacheError("cache verification failed:\n  " + "\n  ".join(problems))
    return covered


def spot_check(
    cache: LogitCache,
    dataset: ViewDataset,
    ensemble: Ensemble,
    k: int,
    seed: int,
    device: torch.device,
) -> dict:
    """Re-score `k` random rows under the writer's autocast and compare with the cache."""
    precision = cache.manifest.get("precision", "no")
    stored_dtype = cache.manifest["storage"].get("logit_dtype", "float16")
    rtol = atol = max(TOLERANCE[stored_dtype], AUTOCAST_TOLERANCE.get(precision, 0.0))
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    autocast = torch.autocast(device.type, dtype=dtype, enabled=precision != "no")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(cache.num_rows, size=min(k, cache.num_rows), replace=False))
    sids, vids = rows // cache.views, rows % cache.views
    stored = cache.rows(sids, vids)
    items = [dataset[(int(s), int(v))] for s, v in zip(sids, vids)]
    images = torch.stack([item["image"] for item in items])
    dtype = next(ensemble.parameters()).dtype
    with torch.inference_mode(), autocast:
        fresh, _ = ensemble(images.to(device, dtype))
    fresh = fresh.cpu()
    row_atol = torch.full((len(rows), 1), atol, dtype=fresh.dtype)
    if cache.storage in ("full", "int8"):
        ref_vals, stored_vals = fresh, stored["logits"]
        scale = ref_vals.abs()
        stored_top1 = stored_vals.argmax(-1)
        if cache.storage == "int8":  # plus one quantisation step of the row's range
            span = fresh.max(-1, keepdim=True).values - fresh.min(-1, keepdim=True).values
            row_atol = row_atol + span * (1 + rtol) / 255
    else:
        idx = stored["topk_idx"]
        names = [n for n in TOPK_EXTRAS if n in stored]  # none in a cache from before them
        extras = topk_extras(fresh, torch.tensor([item["label"] for item in items]))
        # a row statistic moves by at most ~3x the error of the row's largest logit (the std
        # by 2 sqrt(C / (C - 1)) times it), plus its own rounding
        row_scale = 4 * fresh.abs().max(-1, keepdim=True).values
        fresh = torch.log_softmax(fresh, -1)  # top-k rows hold log-probabilities
        ref_vals = torch.cat([fresh.gather(1, idx), *(extras[n][:, None] for n in names)], 1)
        stored_vals = torch.cat([stored["topk_logp"], *(stored[n][:, None] for n in names)], 1)
        scale = torch.cat([ref_vals[:, : idx.shape[1]].abs(), row_scale.expand(-1, len(names))], 1)
        row_atol = row_atol * torch.tensor([1.0] * idx.shape[1] + [3.0] * len(names))
        stored_top1 = idx[:, 0]
    err = (ref_vals - stored_vals).abs()
    tol = row_atol + rtol * scale
    # A near-tie can flip the arg-max under float16 rounding: the stored top-1 must then be
    # within tolerance of the fresh maximum.
    fresh_top = fresh.max(-1).values
    at_stored = fresh.gather(1, stored_top1[:, None])[:, 0]
    top1_ok = (stored_top1 == fresh.argmax(-1)) | (
        (fresh_top - at_stored) <= row_atol[:, 0] + rtol * fresh_top.abs()
    )
    report = {
        "rows_checked": len(rows),
        "top1_agreement": float((stored_top1 == fresh.argmax(-1)).float().mean()),
        "max_abs_diff": float(err.max()),
        "tolerance": {
            "rtol": rtol,
            "atol": atol,
            "precision": precision,
            "logit_dtype": stored_dtype,
        },
        "within_tolerance": bool((err <= tol).all()),
    }
    if not (report["within_tolerance"] and bool(top1_ok.all())):
        bad = int((~(err <= tol).all(-1) | ~top1_ok).sum())
        raise CacheError(
            f"spot check failed: {bad} of {len(rows)} re-scored rows disagree with the cache "
            f"(max |diff| {report['max_abs_diff']:.4g}, top-1 agreement "
            f"{report['top1_agreement']:.2%}); the cache was not made from these views or "
            f"teachers: rebuild it"
        )
    return report


def verify_directory(root, samples: int = CacheConfig.verify_samples, seed: int = 0) -> dict:
    """Every check on the cache in `root` with no configuration: completeness and checksums
    always; re-scoring when the data and teachers are still where the manifest records them
    and are still what the cache was made from (`report["rescored"]` says which, and why not).
    Raises CacheError when a check fails."""
    cache = LogitCache(root)
    report = {"cache_dir": str(cache.root), "rows": check_files_and_keys(cache)}
    found = _recorded_source(cache.manifest)
    if isinstance(found, str):
        return {**report, "rescored": False, "skipped_because": found}
    dataset, teachers = found
    m = cache.manifest
    ensemble = build_ensemble(teachers, cache.num_classes, m["ensemble"], m.get("ensemble_weights"))
    ensemble.to(DTYPES[cache.manifest.get("dtype", "float32")])
    checked = spot_check(cache, dataset, ensemble, samples, seed, torch.device("cpu"))
    return {**report, **checked, "rescored": True}


def _recorded_source(manifest: dict) -> tuple[ViewDataset, list[TeacherConfig]] | str:
    """The training views and teachers a cache was made from, rebuilt from its manifest's
    `source`, or why they cannot be."""
    source = manifest.get("source")
    if source is None:
        return "the manifest does not record its data and teachers (an older cache)"
    try:
        data = from_dict(DataConfig, source["data"], src="manifest.json source.data")
        dataset = build_splits(data, source["seed"], manifest["views"]["plain_first"]).train
        teachers = [from_dict(TeacherConfig, t, src="manifest.json") for t in source["teachers"]]
        identities = [teacher_identity(t, manifest["num_classes"]) for t in teachers]
    except (KdslimError, OSError) as e:
        return f"the recorded data or teachers cannot be read ({e})"
    if dataset.source.fingerprint() != manifest["dataset"]:
        return f"the data at {data.root or data.name} is not the data the cache was made from"
    if dataset.recipe.fingerprint() != manifest["views"]["recipe_sha256"]:
        return "the recorded view recipe no longer gives the cached views (code changed)"
    if identities != identity_of(manifest)["teachers"]:
        return "the teachers at the recorded paths are not the ones the cache was made from"
    return dataset, teachers
