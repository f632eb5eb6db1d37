"""Collect a finished (or partly finished) run's results into one dict: `report.json`.

Every number is read from a stage's own output files; a field is null where its stage did not
run, never filled in from elsewhere. Accuracies are test accuracies of the epoch each stage
chose on its validation split. Comparisons are claims: every seed is listed with the mean and
the spread, and the verdict says whether a difference exceeds the seeds' noise.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

from common.files import (
    ENSEMBLE_PREDICTIONS,
    INT8_PREDICTIONS,
    PREDICTIONS_FILE,
    UNPRUNED_EXPORT,
    load_predictions,
)
from common.logging import read_json_if_any, size_text
from common.stats import (
    RESAMPLES,
    accuracy_interval,
    direction,
    paired_bootstrap_interval,
    paired_t_interval,
)
from distill.cache.layout import MANIFEST_FILE
from launch import graph
from launch.graph import Node


def chosen(metrics: dict | None, key: str = "test_acc"):
    """A value of the epoch the stage chose (on validation), else None."""
    return ((metrics or {}).get("selected") or {}).get(key)


def node_metrics(cfg) -> dict[Node, dict | None]:
    """Every node of the run's own metrics file, read once."""
    names = {"export": "export.json"}
    return {
        n: read_json_if_any(graph.directory(cfg, n) / names.get(n.stage, "metrics.json"))
        for n in graph.nodes(cfg)
        if n.stage != "report"
    }


def _of(m: dict[Node, dict | None], stage: str) -> list[tuple[Node, dict | None]]:
    return [(n, v) for n, v in m.items() if n.stage == stage]


def seeds_summary(rows: list[dict]) -> dict:
    """{"seeds": rows, "mean", "std" (sample, n-1; null below 2 seeds), "n"} of `acc`."""
    accs = [r["acc"] for r in rows if r["acc"] is not None]
    return {
        "seeds": rows,
        "n": len(accs),
        "mean": statistics.fmean(accs) if accs else None,
        "std": statistics.stdev(accs) if len(accs) >= 2 else None,
    }


def _students(m: dict, stage: str, loss: str = "") -> dict:
    """The students of `stage` (of `distill-loss`: those of `loss`), every seed."""
    rows = []
    for node, metrics in _of(m, stage):
        if graph.loss_of(node.instance) != loss:
            continue
        row = {
            "seed": int(node.instance.rpartition("seed")[2]),
            "acc": chosen(metrics),
            "val_acc": chosen(metrics, "val_acc"),
            "epoch": chosen(metrics, "epoch"),
        }
        if stage != "distill-ce":
            row["teacher_agreement"] = chosen(metrics, "test_teacher_agreement")
        rows.append(row)
    return seeds_summary(rows)


def kd_gain(ce: dict, kd: dict) -> dict | None:
    """KD minus CE, in accuracy, with the seeds' spread (the larger of the two sample stds).
    A CE and a KD student of one seed share initialisation and batch order, so `ahead`
    counts the seeds on which KD beat its own twin. Whether the gain is beyond noise is the
    paired interval's to say (`verdicts`)."""
    if ce["mean"] is None or kd["mean"] is None:
        return None
    spreads = [s for s in (ce["std"], kd["std"]) if s is not None]
    ce_by_seed = {r["seed"]: r["acc"] for r in ce["seeds"] if r["acc"] is not None}
    twins = [(ce_by_seed[r["seed"]], r["acc"]) for r in kd["seeds"] if r["seed"] in ce_by_seed]
    return {
        "gain": kd["mean"] - ce["mean"],
        "spread": max(spreads) if len(spreads) == 2 else None,
        "n": min(ce["n"], kd["n"]),
        "ahead": sum(k > c for c, k in twins if k is not None),
        "twins": len(twins),
    }


T_METHOD = "paired t-interval over seed pairs"
BOOTSTRAP_METHOD = (
    f"paired bootstrap over test images ({RESAMPLES:,} resamples; seed noise not covered)"
)


def _correct(cfg, node: Node, file: str = PREDICTIONS_FILE):
    """Per test image, whether `node`'s saved model got it right (None: no predictions)."""
    table = load_predictions(graph.directory(cfg, node) / file)
    return None if table is None else table["pred"] == table["label"]


def comparison(name: str, pairs: list[tuple], n_test: int | None, seeds: bool) -> dict | None:
    """One `verdicts` entry from `pairs` of (accuracy A, accuracy B, correct A, correct B):
    the t-interval of the per-seed differences with >= 3 seed pairs, else the paired
    bootstrap over test images (all pairs' images, averaged per resample)."""
    pairs = [p for p in pairs if p[0] is not None and p[1] is not None]
    if seeds and len(pairs) >= 3:
        stat, method = paired_t_interval([b - a for a, b, _, _ in pairs]), T_METHOD
    elif pairs and all(p[2] is not None and p[3] is not None for p in pairs):
        a, b = np.stack([p[2] for p in pairs]), np.stack([p[3] for p in pairs])
        stat, method = paired_bootstrap_interval(a, b), BOOTSTRAP_METHOD
    else:
        return None
    return {
        "comparison": name,
        "gain": stat["gain"],
        "ci95": stat["ci95"],
        "n_seeds": len(pairs) if seeds else None,
        "n_test": n_test,
        "method": method,
        "beyond_noise": (said := direction(stat["ci95"])) != "within noise",
        "direction": said,
    }


SLIM = "pruned + fine-tuned vs unpruned"
KEPT_MARGIN = 0.005
"""Slimming "keeps the accuracy" when its paired interval's lower end is above minus this
(half a point): a non-inferiority margin, stated with the verdict. An interval that merely
holds 0 says only that no loss was detected."""


def kept_words(v: dict | None) -> str:
    """Whether the slimming interval shows the accuracy kept within the margin."""
    if v is None or "accuracy_kept" not in v:
        return ""
    bar = f"{-100 * v['kept_margin']:.1f} points"
    if v["accuracy_kept"]:
        return f"; its lower end is above {bar}: accuracy kept"
    return f"; its lower end reaches {bar}: not shown to keep the accuracy"


def _seed_pairs(cfg, a: tuple, b: tuple) -> list[tuple]:
    """`comparison`'s pairs for students A and B of the same seeds: each of `a`, `b` is (the
    `seeds_summary`, seed -> its node)."""
    (summary_a, node_a), (summary_b, node_b) = a, b
    accs = {row["seed"]: row["acc"] for row in summary_a["seeds"]}
    return [
        (
            accs[row["seed"]],
            row["acc"],
            _correct(cfg, node_a(row["seed"])),
            _correct(cfg, node_b(row["seed"])),
        )
        for row in summary_b["seeds"]
        if row["seed"] in accs
    ]


def verdicts(cfg, r: dict) -> list[dict]:
    """Every comparison the report makes, each with its paired 95% interval (`common.stats`)."""
    n_test = (r["splits"] or {}).get("test")
    out = []
    e = r["ensemble"]
    trained = graph.external_teachers(cfg) is None  # (given teachers have no predictions)
    if trained and e["best_member"] is not None and e["acc"] is not None and e["members"] >= 2:
        member = next(m for m in graph.members(cfg) if m.name == e["best_member"])
        kd = [Node("distill", f"seed{s}") for s in graph.student_seeds(cfg)]
        ensemble = next(
            (c for n in kd if (c := _correct(cfg, n, ENSEMBLE_PREDICTIONS)) is not None), None
        )
        best = _correct(cfg, Node("train", member.name))
        pair = (e["best_member_acc"], e["acc"], best, ensemble)
        out.append(comparison("ensemble vs best member", [pair], n_test, seeds=False))

    def node(stage: str, loss: str = ""):
        return lambda seed: Node(stage, f"{loss}-seed{seed}" if loss else f"seed{seed}")

    ce, kd = (r["student_ce"], node("distill-ce")), (r["student_kd"], node("distill"))
    out.append(comparison("KD vs CE", _seed_pairs(cfg, ce, kd), n_test, seeds=True))
    for loss, students in r["student_losses"].items():
        other = (students, node("distill-loss", loss))
        for name, base in (("CE", ce), ("KD", kd)):
            pairs = _seed_pairs(cfg, base, other)
            out.append(comparison(f"{loss.upper()} vs {name}", pairs, n_test, seeds=True))
    pairs = [
        (
            c["unpruned_acc"],
            c["acc"],
            _correct(cfg, Node.parse(c["model"])),
            _correct(cfg, Node("finetune", c["instance"])),
        )
        for c in r["slim"]["chains"]
        if c["from_run"]
    ]
    slim = comparison(SLIM, pairs, n_test, seeds=True)
    if slim is not None:
        slim["kept_margin"] = KEPT_MARGIN
        slim["accuracy_kept"] = slim["ci95"][0] > -KEPT_MARGIN
    out.append(slim)
    accuracy = ((r.get("export") or {}).get("accuracy")) or {}
    if "onnx_int8" in accuracy:
        e = Node("export")
        pair = (accuracy["onnx"], accuracy["onnx_int8"], _correct(cfg, e))
        pair += (_correct(cfg, e, INT8_PREDICTIONS),)
        out.append(comparison("int8 vs float", [pair], n_test, seeds=False))
    return [v for v in out if v is not None]


def deployment(cfg, m: dict) -> dict | None:
    """What deploying costs, as the export measured it on its machine: every format of the
    exported student and, after slimming, of the unpruned student it was cut from (`rows`,
    each with its `student`), how each column was measured, and the int8 model's recipe."""
    e = m.get(Node("export"))
    if not e or "costs" not in e:
        return None
    before = read_json_if_any(
        graph.directory(cfg, Node("export")) / UNPRUNED_EXPORT / "export.json"
    )
    rows = [
        {"student": "unpruned", **x} for x in ((before or {}).get("costs") or {}).get("rows", [])
    ]
    rows += [{"student": "pruned" if before else "exported", **x} for x in e["costs"]["rows"]]
    keep = ("threads", "batches", "cpu", "memory_method", "latency_method")
    return {**{k: e["costs"][k] for k in keep}, "rows": rows, "int8": e.get("int8")}


def _teachers(cfg, m: dict, manifest: dict) -> list[dict]:
    """One row per ensemble member: this run's `train` nodes, or the `cache.teachers` given
    (their accuracy from the `metrics.json` beside each model directory, if there is one)."""
    cached = manifest.get("teachers") or []
    if graph.external_teachers(cfg) is None:
        found = [(t.name, t.model.name, m.get(Node("train", t.name))) for t in graph.members(cfg)]
    else:
        found = [
            (
                t.path or t.model,
                ((cached[i] if i < len(cached) else {}).get("spec") or {}).get("name"),
                read_json_if_any(Path(t.path).parent / "metrics.json") if t.path else None,
            )
            for i, t in enumerate(cfg.cache.teachers)
        ]
    return [
        {
            "name": name,
            "model": model,
            "acc": chosen(metrics),
            "val_acc": chosen(metrics, "val_acc"),
            "acc_on_cached_views": (cached[i] if i < len(cached) else {}).get(
                "acc_on_cached_views"
            ),
        }
        for i, (name, model, metrics) in enumerate(found)
    ]


def _ensemble(teachers: list[dict], kd_rows: list[dict | None], manifest: dict) -> dict:
    acc = next((chosen(r, "test_teacher_acc") for r in kd_rows if r), None)
    members = [t for t in teachers if t["acc"] is not None]
    best = max(members, key=lambda t: t["acc"]) if members else None
    return {
        "members": len(teachers),
        "acc": acc,  # on the test split, measured by `distill` (the same for every seed)
        "acc_on_cached_views": manifest.get("ensemble_acc_on_cached_views"),
        "mode": manifest.get("ensemble"),
        "best_member": best["name"] if best else None,
        "best_member_acc": best["acc"] if best else None,
        "gain_over_best_member": None if acc is None or best is None else acc - best["acc"],
    }


def _slimmed(cfg, instance: str):
    """What a slimming chain started from: the node (or model directory) its sparsity stage
    reads."""
    return graph.inputs(cfg, Node("sparsity", instance)).get("model")


def chains(cfg, m: dict) -> list[dict]:
    """Every slimming chain that ran: the unpruned model it started from against its pruned
    + fine-tuned end, with what was cut (`pipeline.slim_every_seed`: one per KD seed)."""
    out = []
    for i in graph.slim_instances(cfg) if "sparsity" in graph.in_run(cfg) else []:
        if m.get(Node("sparsity", i)) is None:
            continue
        source, prune = _slimmed(cfg, i), m.get(Node("prune", i)) or {}
        out.append(
            {
                "instance": i,
                "model": getattr(source, "name", str(source)),
                "from_run": isinstance(source, Node),  # (a given model has no predictions)
                "unpruned_acc": chosen(m.get(source)) if isinstance(source, Node) else None,
                "acc": chosen(m.get(Node("finetune", i))),
                "macs_ratio": prune.get("macs_ratio"),
                "params_ratio": prune.get("params_ratio"),
            }
        )
    return out


def _slim(cfg, m: dict) -> dict:
    """The first slimming chain in full (what the figures and the export show), and the
    summary of every chain (`chains`)."""
    first = graph.slim_instances(cfg)[0] if "sparsity" in graph.in_run(cfg) else ""
    sparsity, finetune = m.get(Node("sparsity", first)), m.get(Node("finetune", first))
    prune = m.get(Node("prune", first)) or {}
    before, after = prune.get("before") or {}, prune.get("after") or {}
    source = _slimmed(cfg, first) if sparsity else None
    unpruned = m.get(source) if isinstance(source, Node) else None
    every = chains(cfg, m)
    return {
        "chains": every,
        "finetuned": seeds_summary(
            [{"seed": graph.seed_of(cfg, c["instance"]), "acc": c["acc"]} for c in every]
        ),
        "model": None if source is None else getattr(source, "name", str(source)),
        "unpruned_acc": chosen(unpruned),
        "sparsity": None
        if sparsity is None
        else {
            "acc": chosen(sparsity),
            "s": sparsity.get("s"),
            "shrink": sparsity.get("shrink"),
            "separation": (sparsity.get("separation") or {}).get("after"),
            "median_gamma_before": ((sparsity.get("separation") or {}).get("before") or {}).get(
                "median"
            ),
        },
        "baseline": {
            "params": before.get("params"),
            "macs": before.get("macs"),
            "acc": before.get("test_acc"),
            "acc_bn_recalibrated": before.get("test_acc_bn_recalibrated"),
            "latency_ms": before.get("latency_ms"),
        },
        "pruned": {
            "params": after.get("params"),
            "macs": after.get("macs"),
            "acc_before_finetune": after.get("test_acc"),
            "acc_before_finetune_stale_bn": ((prune.get("rounds") or [{}])[-1]).get(
                "test_acc_stale_bn"
            ),
            "acc": chosen(finetune),
            "latency_ms": after.get("latency_ms"),
        },
        "target": prune.get("target"),
        "prune_ratio": prune.get("ratio"),
        "threshold_separation": prune.get("separation"),
        "params_ratio": prune.get("params_ratio"),
        "macs_ratio": prune.get("macs_ratio"),
        "latency_ratio": prune.get("latency_ratio"),
        "channels": prune.get("channels"),
        "per_layer": prune.get("per_layer"),
    }


def _rule(metrics: dict) -> str:
    epoch = (
        "the last epoch"
        if metrics["selection_split"] == "none"
        else "the epoch with the best validation accuracy"
    )
    decay = metrics.get("ema_decay")
    weights = (
        f"an exponential moving average of the weights (decay {decay})"
        if decay
        else "the trained weights"
    )
    return f"{epoch}, {weights}"


def selection_rule(m: dict[Node, dict | None]) -> str | None:
    """Which weights every trained stage reports, as each stage's metrics say: one rule for
    all, or each rule with the stages that used it."""
    rules: dict[str, list[str]] = {}
    for n, v in m.items():
        if v and "selection_split" in v:
            rules.setdefault(_rule(v), []).append(n.name)
    if len(rules) <= 1:
        return next(iter(rules), None)
    return "; ".join(f"{rule} ({', '.join(names)})" for rule, names in rules.items())


def data_description(cfg) -> dict:
    """What the accuracies are of: the dataset, its classes and chance level, the image size,
    and which folder the reported "test" split is (a user's `val/` is reported as test)."""
    from common.data.sources import build_source

    d = cfg.data
    test = build_source(d, "test")
    folder = getattr(test, "folder", None)
    return {
        "name": d.name,
        "root": d.root,
        "num_classes": test.num_classes,
        "classes": getattr(test, "classes", None),
        "chance": 1 / test.num_classes,
        "image_size": d.image_size,
        "test_split": str(folder) if folder else f"the {d.name} test split",
    }


def collect(cfg, m: dict[Node, dict | None]) -> dict:
    """The report from `m`, the `node_metrics(cfg)` of the same run."""
    cache_metrics = m.get(Node("cache")) or {}
    manifest = (
        read_json_if_any(Path(cache_metrics["cache_dir"]) / MANIFEST_FILE)
        if cache_metrics.get("cache_dir")
        else None
    ) or {}
    verify = m.get(Node("verify-cache")) or {}
    teachers = _teachers(cfg, m, manifest)
    ce, kd = _students(m, "distill-ce"), _students(m, "distill")
    splits = next((v["splits"] for v in m.values() if v and "splits" in v), None)
    student = cfg.distill.student
    report = {
        "out_dir": str(cfg.run.out_dir),
        "data": data_description(cfg),
        "student_architecture": {"name": student.name, "kwargs": student.kwargs},
        "splits": splits,
        "selection": selection_rule(m),
        "teachers": teachers,
        "ensemble": _ensemble(teachers, [v for _, v in _of(m, "distill")], manifest),
        "cache": {
            "dir": cache_metrics.get("cache_dir"),
            "num_samples": (manifest.get("dataset") or {}).get("num_samples"),
            "views_per_sample": (manifest.get("views") or {}).get("count"),
            "bytes": manifest.get("bytes"),
            "storage": (manifest.get("storage") or {}).get("mode"),
            "teacher_top1_agreement": verify.get("top1_agreement"),
            "verify_max_abs_diff": verify.get("max_abs_diff"),
            "verify_rows_checked": verify.get("rows_checked"),
        },
        "student_ce": ce,
        "student_kd": kd,
        "student_losses": {
            loss: _students(m, "distill-loss", loss) for loss in cfg.distill.compare
        },
        "kd_gain": kd_gain(ce, kd),
        "slim": _slim(cfg, m),
        "export": None
        if m.get(Node("export")) is None
        else {k: m[Node("export")].get(k) for k in ("ok", "source", "files", "checks", "accuracy")},
        "deploy": deployment(cfg, m),
    }
    report["verdicts"] = verdicts(cfg, report)
    report["warnings"] = warnings_first(m, report)
    report["verdict"] = verdict(report)
    return report


def _pts(x: float) -> str:
    """A difference of accuracies in percentage points."""
    return f"{100 * x:+.1f}"


def _pct(ratio: float) -> str:
    """The change a kept/total ratio means, in percent."""
    return f"{100 * (ratio - 1):+.0f}%"


def interval_words(v: dict | None, what: str) -> str:
    """ "95% CI [lo, hi] points over N seed pairs (method): beyond noise, A better than B" or
    "...: within noise"; "" without an interval."""
    if v is None:
        return ""
    lo, hi = (f"{100 * x:+.1f}" for x in v["ci95"])
    over = f"over {v['n_seeds']} seed pair(s), " if v["n_seeds"] else ""
    said = {"better": "beyond noise: {} better", "worse": "beyond noise: {} worse"}
    words = said.get(v["direction"], "within noise").format(what)
    return f", 95% CI [{lo}, {hi}] ({over}{v['n_test']} test images; {v['method']}): {words}"


UNSEPARATED = 0.1
"""A sparsity phase whose total L1 shrinkage is under this share of the median |gamma| it
started from cannot have separated the scales (Liu et al.'s recipe applies ~0.6, about the
initial |gamma| of 0.5; FIELD_NOTES "NS arithmetic")."""


def warnings_first(m: dict[Node, dict | None], r: dict) -> list[str]:
    """What makes other numbers meaningless, said before them: a model at chance (its test
    accuracy's 95% interval holds 1 / classes), a sparsity phase too weak to separate the
    scales, and evaluation outputs that collapsed."""
    n_test, classes = (r["splits"] or {}).get("test"), r["data"]["num_classes"]
    out = []
    if n_test and classes:
        chance = 1 / classes
        models = [(f"teacher {t['name']}", t["acc"]) for t in r["teachers"]]
        models.append(("the teacher ensemble", r["ensemble"]["acc"]))
        for label, key in (("CE student", "student_ce"), ("KD student", "student_kd")):
            models += [(f"{label} seed {x['seed']}", x["acc"]) for x in r[key]["seeds"]]
        for loss, students in r.get("student_losses", {}).items():
            models += [
                (f"{loss.upper()} student seed {x['seed']}", x["acc"]) for x in students["seeds"]
            ]
        models += [
            (f"the pruned + fine-tuned student {c['instance']}".rstrip(), c["acc"])
            for c in r["slim"]["chains"]
        ]
        at_chance = [
            f"{label} ({100 * acc:.1f}%)"
            for label, acc in models
            if acc is not None and accuracy_interval(acc, n_test)[0] <= chance
        ]
        if at_chance:
            out.append(
                f"AT CHANCE ({100 * chance:.1f}% with {classes} classes; the 95% interval of "
                f"each accuracy on {n_test} test images reaches it): {', '.join(at_chance)}. "
                "Comparisons involving them say nothing about the method; train longer or "
                "check the data"
            )
    sp = r["slim"]["sparsity"] or {}
    shrink, median = sp.get("shrink"), sp.get("median_gamma_before")
    if shrink is not None and median and shrink < UNSEPARATED * median:
        out.append(
            f"SPARSITY DID NOT SEPARATE THE SCALES: its L1 budget s x sum(lr) = {shrink:.2g} is "
            f"{100 * shrink / median:.2g}% of the median |gamma| before it ({median:.2g}), so no "
            "scale could move far and the |gamma| histogram describes the weights it started "
            "from; set `sparsity.shrink` near that median (default 0.6) or raise `sparsity.s`"
        )
    collapsed = [
        f"{n.name} (epoch {v['eval_collapsed_epochs'][0]})"
        for n, v in m.items()
        if v and v.get("eval_collapsed_epochs")
    ]
    if collapsed:
        out.append(
            "EVALUATION COLLAPSED (eval-mode outputs constant over a batch: stale BatchNorm "
            f"statistics) in {', '.join(collapsed)}: their test accuracies are not the "
            "networks'; set `loop.recalibrate_bn` or train longer"
        )
    return out


def verdict(r: dict) -> list[str]:
    """Plain statements of what the numbers show, and only that: each comparison with its
    paired 95% interval and which way it points when the interval excludes 0."""
    lines = list(r.get("warnings") or [])
    by_name = {v["comparison"]: v for v in r.get("verdicts") or []}
    e = r["ensemble"]
    if e["members"] >= 2 and e["gain_over_best_member"] is not None:
        lines.append(
            f"ensemble of {e['members']} teachers: test acc {100 * e['acc']:.1f}%, "
            f"{_pts(e['gain_over_best_member'])} points over its best member "
            f"({e['best_member']}, {100 * e['best_member_acc']:.1f}%)"
            + interval_words(by_name.get("ensemble vs best member"), "the ensemble")
        )
    elif e["members"] == 1:
        lines.append("one teacher: no ensemble to compare with a member")
    g = r["kd_gain"]
    if g is not None:
        twins = f"; KD ahead of its CE twin on {g['ahead']} of {g['twins']} seeds"
        lines.append(
            f"KD {_pts(g['gain'])} points over CE ({g['n']} seed(s))"
            + interval_words(by_name.get("KD vs CE"), "KD")
            + (twins if g["twins"] > 1 else "")
        )
    for loss, students in r["student_losses"].items():
        name = loss.upper()
        if students["mean"] is None:
            continue
        against = [
            f"{_pts(v['gain'])} points against {base}" + interval_words(v, name)
            for base in ("CE", "KD")
            if (v := by_name.get(f"{name} vs {base}")) is not None
        ]
        lines.append(f"{name} ({students['n']} seed(s)): " + "; ".join(against))
    s = r["slim"]
    p = s["pruned"]
    if s["params_ratio"] is not None:
        lat = s["latency_ratio"] or {}
        batch = max(lat, key=int) if lat else None
        macs = f"MACs {_pct(s['macs_ratio'])}"
        done = [c for c in s["chains"] if None not in (c["acc"], c["unpruned_acc"])]
        if len(done) > 1:  # the figures are the first chain's; the cuts of all
            kept = [c["macs_ratio"] for c in done if c["macs_ratio"] is not None]
            macs += f" ({_pct(max(kept))} to {_pct(min(kept))} over {len(done)} chains)"
        parts = [f"params {_pct(s['params_ratio'])}", macs]
        if batch is not None:
            parts.append(
                f"CPU latency {_pct(lat[batch])} (batch {batch}; latency kept / MACs kept "
                f"{lat[batch] / s['macs_ratio']:.2f}, 1.00 if latency fell as far as MACs)"
            )
        if done:
            ref = statistics.fmean(c["unpruned_acc"] for c in done)
            against = (
                f"the unpruned student {s['model']} ({100 * ref:.1f}%)"
                if len(done) == 1
                else f"the unpruned KD students, each slimmed ({len(done)} seeds, mean "
                f"{100 * ref:.1f}%)"
            )
            gain = statistics.fmean(c["acc"] for c in done) - ref
            parts.append(
                f"accuracy {_pts(gain)} points after fine-tune against {against}"
                + interval_words(by_name.get(SLIM), "the pruned student")
                + kept_words(by_name.get(SLIM))
            )
        if p["acc_before_finetune"] is not None and s["baseline"]["acc"] is not None:
            parts.append(before_finetune(p, s["baseline"]))
        lines.append("slimming: " + ", ".join(parts))
    if r.get("deploy"):
        lines += [x for x in [deploy_words(r["deploy"], by_name.get("int8 vs float"))] if x]
    c = r["cache"]
    if c["verify_rows_checked"]:
        lines.append(
            "the students trained on exactly the views the teachers scored (the cache replays "
            f"(seed, sample, view)); verify-cache re-scored {c['verify_rows_checked']} rows, "
            f"top-1 agreement {100 * c['teacher_top1_agreement']:.1f}%"
        )
    return lines


def deploy_words(d: dict, int8: dict | None) -> str | None:
    """The deployable model (the exported student in int8, else float, in ONNX Runtime) with
    its size, latency and peak memory at the largest batch, as ratios to the float model and
    to the unpruned student, and the int8 model's accuracy against the float one's."""
    rows = {(x["student"], x["runtime"], x["precision"]): x for x in d["rows"]}
    student = "pruned" if ("pruned", "onnxruntime", "float") in rows else "exported"
    best = rows.get((student, "onnxruntime", "int8")) or rows.get((student, "onnxruntime", "float"))
    if best is None:
        return None
    b = str(max(d["batches"]))

    def costs(x: dict) -> tuple:
        return x["size_bytes"], x["latency_ms"].get(b), x["peak_memory_bytes"].get(b)

    size, ms, mem = costs(best)
    said = (
        f"deployable model `{best['file']}` (ONNX Runtime {best['precision']}, {d['threads']} "
        f"thread(s)): {size_text(size)}, {ms:.3g} ms at batch {b}"
        + ("" if mem is None else f", peak memory {size_text(mem)}")
    )
    for key, name in (
        ((student, "onnxruntime", "float"), f"the {student} float model"),
        (("unpruned", "onnxruntime", "float"), "the unpruned student"),
    ):
        ref = rows.get(key)
        if ref is None or ref is best:
            continue
        ratios = [f"{a / r:.2f}x" if a and r else "-" for a, r in zip(costs(best), costs(ref))]
        said += f"; {ratios[0]} the size, {ratios[1]} the latency, {ratios[2]} the memory of {name}"
    if int8 is not None:
        said += f"; int8 accuracy {_pts(int8['gain'])} points against float" + interval_words(
            int8, "int8"
        )
    return said


def before_finetune(pruned: dict, unpruned: dict) -> str:
    """The pruned network before fine-tuning against the one it was cut from, both with the
    same BatchNorm treatment (prune re-estimates the pruned net's statistics; where it did,
    the unpruned net's are re-estimated on the same batches too)."""
    same = unpruned.get("acc_bn_recalibrated")
    ref, how = (
        (same, "both with BN statistics re-estimated on the same training batches")
        if same is not None and pruned.get("acc_before_finetune_stale_bn") is not None
        else (unpruned["acc"], "both with their own BN statistics")
    )
    return (
        f"before fine-tuning {100 * pruned['acc_before_finetune']:.1f}% against "
        f"{100 * ref:.1f}% for the sparsity-trained network it was cut from "
        f"({_pts(pruned['acc_before_finetune'] - ref)} points; {how})"
    )


def histories(cfg, m: dict[Node, dict | None]) -> dict[str, list[dict]]:
    """The evaluated epochs of every trained student (of slimming, the first chain's), for
    the accuracy-curve figure: the validation curve (what selects the epoch, evaluated every
    epoch) where there is one."""
    first = graph.slim_instances(cfg)[0]
    labels = {
        "distill-ce": "student CE",
        "distill": "student KD",
        "distill-loss": "student",
        "sparsity": "sparsity (L1)",
        "finetune": "pruned + fine-tuned",
    }
    return {
        f"{labels[n.stage]} {n.instance}".strip(): [
            h for h in v["history"] if "val_acc" in h or "test_acc" in h
        ]
        for n, v in m.items()
        if n.stage in labels and v and v.get("history")
        if n.stage not in ("sparsity", "finetune") or n.instance == first
    }
