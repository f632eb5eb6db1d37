"""Collect a finished (or partly finished) run's results into one dict: `report.json`.

Every number is read from a stage's own output files; a field is null where its stage did
not run, never filled in from elsewhere.
"""

from __future__ import annotations

import json
from pathlib import Path

from common.config import ConfigError
from distill.cache.setup import cache_root, teacher_configs


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _last(metrics: dict | None, key: str = "test_acc"):
    return ((metrics or {}).get("last") or {}).get(key)


def _best(metrics: dict | None, key: str = "test_acc"):
    return ((metrics or {}).get("best") or {}).get(key)


def stage_metrics(cfg) -> dict[str, dict | None]:
    out, croot = Path(cfg.run.out_dir), cache_root(cfg)
    files = {
        "train": out / "train" / "metrics.json",
        "cache": croot / "metrics.json",
        "manifest": croot / "manifest.json",
        "verify": croot / "verify" / "metrics.json",
        "distill-ce": out / "distill-ce" / "metrics.json",
        "distill": out / "distill" / "metrics.json",
        "sparsity": out / "sparsity" / "metrics.json",
        "prune": out / "prune" / "metrics.json",
        "finetune": out / "finetune" / "metrics.json",
        "export": out / "export" / "export.json",
    }
    return {k: read_json(p) for k, p in files.items()}


def collect(cfg, m: dict[str, dict | None]) -> dict:
    """The report from `m`, the `stage_metrics(cfg)` of the same run."""
    manifest, kd, prune = m["manifest"] or {}, m["distill"], m["prune"]
    before, after = (prune or {}).get("before") or {}, (prune or {}).get("after") or {}
    return {
        "out_dir": str(cfg.run.out_dir),
        "teachers": _teachers(cfg, manifest),
        "ensemble": {
            "acc": _last(kd, "test_teacher_acc"),  # on the test split, measured by `distill`
            "acc_on_cached_views": manifest.get("ensemble_acc_on_cached_views"),
            "mode": manifest.get("ensemble"),
        },
        "cache": {
            "num_samples": (manifest.get("dataset") or {}).get("num_samples"),
            "views_per_sample": (manifest.get("views") or {}).get("count"),
            "bytes": manifest.get("bytes"),
            "storage": (manifest.get("storage") or {}).get("mode"),
            "teacher_top1_agreement": (m["verify"] or {}).get("top1_agreement"),
            "verify_max_abs_diff": (m["verify"] or {}).get("max_abs_diff"),
            "verify_rows_checked": (m["verify"] or {}).get("rows_checked"),
        },
        "student_ce": _student(m["distill-ce"]),
        "student_kd": {
            **_student(kd),
            "teacher_agreement": _last(kd, "test_teacher_agreement"),
            "teacher_kl": _last(kd, "test_teacher_kl"),
        },
        "slim": {
            "sparsity_acc": _last(m["sparsity"]),
            "baseline": {
                "params": before.get("params"),
                "macs": before.get("macs"),
                "acc": before.get("test_acc"),
                "latency_ms": before.get("latency_ms"),
            },
            "pruned": {
                "params": after.get("params"),
                "macs": after.get("macs"),
                "acc_before_finetune": after.get("test_acc"),
                "acc": _last(m["finetune"]),
                "latency_ms": after.get("latency_ms"),
            },
            "prune_ratio": (prune or {}).get("ratio"),
            "params_ratio": (prune or {}).get("params_ratio"),
            "macs_ratio": (prune or {}).get("macs_ratio"),
            "channels": (prune or {}).get("channels"),
            "per_layer": (prune or {}).get("per_layer"),
        },
        "export": None
        if m["export"] is None
        else {
            "ok": m["export"]["ok"],
            "source": m["export"]["source"],
            "files": m["export"]["files"],
            "checks": m["export"]["checks"],
        },
    }


def _student(metrics: dict | None) -> dict:
    return {
        "acc": _last(metrics),
        "best_acc": _best(metrics),
        "epochs": len((metrics or {}).get("history") or []) or None,
    }


def _teachers(cfg, manifest: dict) -> list[dict]:
    """Per teacher: test accuracy (from the metrics.json next to its model directory, when
    it was trained by a stage) and accuracy on the cached training views (from the cache)."""
    try:
        cfgs = teacher_configs(cfg)
    except ConfigError:
        cfgs = []
    cached = manifest.get("teachers") or []
    out = []
    for i in range(max(len(cfgs), len(cached))):
        c = cfgs[i] if i < len(cfgs) else None
        ident = cached[i] if i < len(cached) else {}
        source = (c.path or c.model) if c else None
        trained = read_json(Path(c.path).parent / "metrics.json") if c and c.path else None
        out.append(
            {
                "name": (ident.get("spec") or {}).get("name") or (c.model if c else None),
                "source": source,
                "acc": _last(trained),
                "acc_on_cached_views": ident.get("acc_on_cached_views"),
            }
        )
    return out


def histories(m: dict[str, dict | None]) -> dict[str, list[dict]]:
    """Per-epoch test accuracy of every trained student, for the accuracy-curve figure, from
    `m`, the run's `stage_metrics`."""
    names = {
        "distill-ce": "student CE",
        "distill": "student KD",
        "sparsity": "sparsity (L1)",
        "finetune": "pruned + fine-tuned",
    }
    return {
        label: [h for h in m[k]["history"] if "test_acc" in h]
        for k, label in names.items()
        if m[k] and m[k].get("history")
    }
