"""Render `report.json` as a console table, `report.md` and PNG figures (matplotlib Agg)."""

from __future__ import annotations

import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from common.logging import size_text


def _acc(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def _num(v) -> str:
    if v is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.2f}{unit}"
    return str(v)


def _lat(d: dict | None) -> str:
    return "-" if not d else ", ".join(f"bs{b}: {ms:.2f}" for b, ms in d.items())


def _seeds(s: dict) -> str:
    """The mean and the range over seeds, or the one value. No "± std": whether two rows
    differ is the paired interval's to say (the verdict), not two spreads side by side."""
    if s["mean"] is None:
        return "-"
    if s["std"] is None:
        return f"{s['mean']:.4f} (1 seed)"
    accs = [row["acc"] for row in s["seeds"] if row["acc"] is not None]
    return f"{s['mean']:.4f} ({s['n']} seeds: {min(accs):.4f}-{max(accs):.4f})"


def result_rows(r: dict) -> list[tuple[str, str, str, str, str]]:
    """(model, test acc, params, MACs, CPU latency ms) rows."""
    s = r["slim"]
    rows = [(f"teacher {t['name']}", _acc(t["acc"]), "-", "-", "-") for t in r["teachers"]]
    rows += [
        ("teacher ensemble", _acc(r["ensemble"]["acc"]), "-", "-", "-"),
        ("student CE (labels only)", _seeds(r["student_ce"]), "-", "-", "-"),
        ("student KD (cached)", _seeds(r["student_kd"]), "-", "-", "-"),
        *(
            (f"student {loss.upper()} (cached)", _seeds(s), "-", "-", "-")
            for loss, s in r["student_losses"].items()
        ),
        (
            "slim baseline (after L1)",
            _acc(s["baseline"]["acc"]),
            _num(s["baseline"]["params"]),
            _num(s["baseline"]["macs"]),
            _lat(s["baseline"]["latency_ms"]),
        ),
    ]
    same = s["baseline"].get("acc_bn_recalibrated")
    if same is not None:  # like for like with the pruned net's row below
        rows.append(("slim baseline, BN recalibrated", _acc(same), "-", "-", "-"))
    stale = s["pruned"].get("acc_before_finetune_stale_bn")
    if stale is not None:  # EagleEye: the pruned net with the unpruned net's BN statistics
        rows.append(("pruned, unpruned BN statistics", _acc(stale), "-", "-", "-"))
    rows += [
        (
            "pruned, before fine-tune (BN recalibrated)"
            if stale is not None
            else "pruned, before fine-tune",
            _acc(s["pruned"]["acc_before_finetune"]),
            _num(s["pruned"]["params"]),
            _num(s["pruned"]["macs"]),
            _lat(s["pruned"]["latency_ms"]),
        ),
        (
            "pruned + fine-tuned",
            _seeds(s["finetuned"]) if s["finetuned"]["n"] > 1 else _acc(s["pruned"]["acc"]),
            _num(s["pruned"]["params"]),
            _num(s["pruned"]["macs"]),
            _lat(s["pruned"]["latency_ms"]),
        ),
    ]
    return rows


HEADER = ("model", "test acc", "params", "MACs", "CPU latency (ms)")


def results_table(r: dict) -> str:
    """The short fixed-width table printed at the end of a pipeline, then the verdict."""
    rows = [HEADER, *result_rows(r)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if r["verdict"]:
        lines += ["", "verdict:", *(f"- {v}" for v in r["verdict"])]
    return "\n".join(lines)


def accuracy_curves(histories: dict[str, list[dict]], path: Path) -> Path | None:
    if not histories:
        return None
    split = "val" if all("val_acc" in h for hist in histories.values() for h in hist) else "test"
    name = {"val": "validation", "test": "test"}[split]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for label, hist in histories.items():
        ax.plot([h["epoch"] for h in hist], [h[f"{split}_acc"] for h in hist], ".-", label=label)
    ax.set_xlabel("epoch (of each stage)")
    ax.set_ylabel(f"{name} accuracy")
    ax.set_title(f"students: {name} accuracy per epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def collect_figures(
    sparsity_dir: Path, prune_dir: Path, fig_dir: Path, histories: dict
) -> dict[str, Path]:
    """Draw the accuracy curves; copy the sparsity and prune stages' own PNGs."""
    fig_dir.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Path] = {}
    curves = accuracy_curves(histories, fig_dir / "accuracy.png")
    if curves:
        figures["accuracy"] = curves
    sources = {
        "gamma_before": sparsity_dir / "gamma_hist_epoch000.png",
        "gamma_after": sparsity_dir / "gamma_hist_final.png",
        "widths": prune_dir / "widths.png",
    }
    for key, src in sources.items():
        if src.is_file():
            figures[key] = Path(shutil.copy2(src, fig_dir / f"{key}.png"))
    return figures


def _cell(value) -> str:
    """A Markdown table cell: floats to the digits they mean, `|` escaped (a bare one ends
    the cell: `|gamma|` broke the slimming table)."""
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text.replace("|", "\\|")


def _md_table(header: tuple, rows: list[tuple]) -> list[str]:
    return [
        "| " + " | ".join(map(_cell, header)) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(map(_cell, row)) + " |" for row in rows),
    ]


def markdown(r: dict, figures: dict[str, Path], md_path: Path) -> str:
    rel = {k: p.relative_to(md_path.parent).as_posix() for k, p in figures.items()}
    c, s, e = r["cache"], r["slim"], r["export"]
    sp = r["splits"] or {}
    lines = [f"# kdslim report: `{r['out_dir']}`", "", "## Verdict", ""]
    lines += [f"- {v}" for v in r["verdict"]] or ["(no stage results yet)"]
    d, arch = r["data"], r["student_architecture"]
    names = d["classes"] or []
    shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
    lines += [
        "",
        f"Data: `{d['name']}`" + (f" at `{d['root']}`" if d["root"] else "") + f", "
        f"{d['num_classes']} classes" + (f" ({shown})" if names else "") + f", chance "
        f"{100 * d['chance']:.1f}%, images {d['image_size']}x{d['image_size']}; the test split "
        f"reported below is {d['test_split']}. Students: `{arch['name']}`"
        + (f" {arch['kwargs']}" if arch["kwargs"] else "")
        + "; teachers: see their table.",
        "",
        f"Splits: {sp.get('train', '-')} training, {sp.get('val', '-')} validation (held out "
        f"from the training data), {sp.get('test', '-')} test samples. Each accuracy below "
        f"is the test accuracy of the weights each stage kept: {r['selection'] or '-'}.",
        "",
        "## Results",
        "",
    ]
    lines += _md_table(HEADER, result_rows(r))
    if r.get("verdicts"):
        lines += ["", "## Comparisons (paired, 95% intervals)", ""]
        lines += _md_table(
            (
                "comparison",
                "gain (points)",
                "95% CI (points)",
                "seed pairs",
                "test images",
                "method",
                "result",
            ),
            [
                (
                    v["comparison"],
                    f"{100 * v['gain']:+.2f}",
                    "[" + ", ".join(f"{100 * x:+.2f}" for x in v["ci95"]) + "]",
                    v["n_seeds"] or "-",
                    v["n_test"],
                    v["method"],
                    v["direction"],
                )
                for v in r["verdicts"]
            ],
        )
    lines += ["", "## Teachers and cache", ""]
    lines += _md_table(
        ("teacher", "model", "test acc", "val acc", "acc on cached views"),
        [
            (
                t["name"],
                t["model"],
                _acc(t["acc"]),
                _acc(t["val_acc"]),
                _acc(t["acc_on_cached_views"]),
            )
            for t in r["teachers"]
        ]
        + [
            (
                "ensemble",
                r["ensemble"]["mode"] or "-",
                _acc(r["ensemble"]["acc"]),
                "-",
                _acc(r["ensemble"]["acc_on_cached_views"]),
            )
        ],
    )
    lines += [
        "",
        *_md_table(
            ("cache", "value"),
            [
                ("directory", f"`{c['dir']}`"),
                ("samples", c["num_samples"]),
                ("views per sample", c["views_per_sample"]),
                ("size on disk", "-" if c["bytes"] is None else size_text(c["bytes"])),
                ("storage", c["storage"]),
                ("verify: top-1 agreement of re-scored rows", _acc(c["teacher_top1_agreement"])),
                ("verify: max abs diff", c["verify_max_abs_diff"]),
            ],
        ),
    ]
    lines += ["", "## Students: every seed", ""]
    seed_rows = []
    students = [("CE (labels)", r["student_ce"]), ("KD (cached)", r["student_kd"])]
    students += [(f"{loss.upper()} (cached)", s) for loss, s in r["student_losses"].items()]
    for label, summary in students:
        for row in summary["seeds"]:
            seed_rows.append(
                (
                    label,
                    row["seed"],
                    _acc(row["acc"]),
                    _acc(row["val_acc"]),
                    row["epoch"],
                    _acc(row.get("teacher_agreement")),
                )
            )
    lines += _md_table(
        ("student", "seed", "test acc", "val acc", "chosen epoch", "agreement with teachers"),
        seed_rows,
    )
    g = r["kd_gain"]
    if g is not None:
        lines += [
            "",
            f"CE {_seeds(r['student_ce'])}; KD {_seeds(r['student_kd'])}; KD gain "
            f"{100 * g['gain']:+.2f} points"
            + ("" if g["spread"] is None else f", seed spread {100 * g['spread']:.2f} points"),
        ]
    if "accuracy" in rel:
        lines += ["", f"![accuracy curves]({rel['accuracy']})"]
    lines += ["", "## Network slimming", ""]
    sep = (s["sparsity"] or {}).get("separation") or {}
    cut = s["threshold_separation"] or {}
    lines += _md_table(
        ("", "value"),
        [
            ("slimmed model", _slimmed(s)),
            ("L1 strength s / total shrinkage", _sparsity(s["sparsity"])),
            ("|gamma| below 1% of the largest", _acc(sep.get("below_1pct"))),
            ("histogram valley (Otsu) / bimodality", _valley(sep)),
            ("threshold / valley", _acc(cut.get("threshold_over_valley"))),
            (f"prune target ({s['target']})", s["prune_ratio"]),
            ("params kept", _acc(s["params_ratio"])),
            ("MACs kept", _acc(s["macs_ratio"])),
            (
                "channels kept",
                "-" if not s["channels"] else f"{s['channels']['kept']} / {s['channels']['total']}",
            ),
        ],
    )
    if len(s["chains"]) > 1:
        lines += [
            "",
            "Every slimmed KD student (one chain per seed; the table above and the figures are "
            "the first chain's):",
            "",
        ]
        lines += _md_table(
            ("slimmed", "unpruned acc", "pruned + fine-tuned acc", "difference", "MACs kept"),
            [
                (
                    c["model"],
                    _acc(c["unpruned_acc"]),
                    _acc(c["acc"]),
                    "-"
                    if None in (c["acc"], c["unpruned_acc"])
                    else f"{100 * (c['acc'] - c['unpruned_acc']):+.2f}",
                    _acc(c["macs_ratio"]),
                )
                for c in s["chains"]
            ],
        )
    for key, title in (
        ("gamma_before", "|gamma| before sparsity training"),
        ("gamma_after", "|gamma| after sparsity training"),
        ("widths", "kept width per layer"),
    ):
        if key in rel:
            lines += ["", f"![{title}]({rel[key]})"]
    lines += ["", "## Export", ""]
    if e is None:
        lines.append("not run")
    else:
        lines.append(f"from `{e['source']}`; all checks passed: **{e['ok']}**")
        lines += [
            "",
            *_md_table(
                ("format", "file", "max abs diff vs PyTorch", "ok"),
                [
                    (k, f"`export/{e['files'].get(k, '')}`", v.get("max_abs_diff", "-"), v["ok"])
                    for k, v in e["checks"].items()
                ],
            ),
        ]
    lines += deployment(r.get("deploy"))
    return "\n".join(lines) + "\n"


def deployment(d: dict | None) -> list[str]:
    """The costs of every exported format where it runs, with how each was measured."""
    if not d:
        return []
    per_batch = " / ".join(f"bs{b}" for b in d["batches"])
    lines = ["", "## Deployment: size, memory, latency, accuracy", ""]
    lines += _md_table(
        (
            "student",
            "runtime",
            "file",
            "size",
            f"peak memory {per_batch}",
            f"latency ms {per_batch}",
            "test acc",
        ),
        [
            (
                x["student"],
                f"{x['runtime']} {x['precision']}",
                f"`{x['file']}`",
                size_text(x["size_bytes"]),
                " / ".join(_bytes(x["peak_memory_bytes"].get(str(b))) for b in d["batches"]),
                " / ".join(f"{x['latency_ms'][str(b)]:.3g}" for b in d["batches"]),
                _acc(x["test_acc"]),
            )
            for x in d["rows"]
        ],
    )
    c, q = d["cpu"], d.get("int8") or {}
    isa = ", ".join(c["int8_isa"]) or "none"
    lines += [
        "",
        f"On {c['name'] or 'this CPU'} (int8 instruction sets: {isa}), "
        f"{d['threads']} thread(s). Latency: {d['latency_method']}. Peak memory: "
        f"{d['memory_method']}. PyTorch runs the float graph: its accuracy is the float ONNX "
        "model's.",
    ]
    if q:
        floats = ", ".join(f"{op} x{n}" for op, n in (q.get("float_layers") or {}).items())
        lines[-1] += f" int8: {q.get('method', '-')}; left in float: {floats or 'nothing'}."
    return lines


def _bytes(n: int | None) -> str:
    return "-" if n is None else size_text(n)


def _slimmed(s: dict) -> str:
    if not s["model"]:
        return "-"
    more = len(s["chains"]) - 1
    return s["model"] + (f" (and {more} more, one chain per KD seed)" if more > 0 else "")


def _sparsity(sp: dict | None) -> str:
    if not sp or sp.get("s") is None:
        return "-"
    return f"{sp['s']:.3g} / {sp['shrink']:.3g}"


def _valley(sep: dict) -> str:
    if "valley" not in sep:
        return "-"
    return f"{sep['valley']:.4g} / {sep['bimodality']:.2f}"
