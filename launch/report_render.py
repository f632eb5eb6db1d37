"""Render `report.json` as a console table, `report.md` and PNG figures (matplotlib Agg)."""

from __future__ import annotations

import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


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


def result_rows(r: dict) -> list[tuple[str, str, str, str, str]]:
    """(model, test acc, params, MACs, CPU latency ms) rows."""
    s = r["slim"]
    rows = [
        (f"teacher {i}: {t['name']}", _acc(t["acc"]), "-", "-", "-")
        for i, t in enumerate(r["teachers"])
    ]
    rows += [
        ("teacher ensemble", _acc(r["ensemble"]["acc"]), "-", "-", "-"),
        ("student CE (labels only)", _acc(r["student_ce"]["acc"]), "-", "-", "-"),
        ("student KD (cached)", _acc(r["student_kd"]["acc"]), "-", "-", "-"),
        (
            "slim baseline (after L1)",
            _acc(s["baseline"]["acc"]),
            _num(s["baseline"]["params"]),
            _num(s["baseline"]["macs"]),
            _lat(s["baseline"]["latency_ms"]),
        ),
        (
            "pruned, before fine-tune",
            _acc(s["pruned"]["acc_before_finetune"]),
            _num(s["pruned"]["params"]),
            _num(s["pruned"]["macs"]),
            _lat(s["pruned"]["latency_ms"]),
        ),
        (
            "pruned + fine-tuned",
            _acc(s["pruned"]["acc"]),
            _num(s["pruned"]["params"]),
            _num(s["pruned"]["macs"]),
            _lat(s["pruned"]["latency_ms"]),
        ),
    ]
    return rows


HEADER = ("model", "test acc", "params", "MACs", "CPU latency (ms)")


def results_table(r: dict) -> str:
    """The short fixed-width table printed at the end of a pipeline."""
    rows = [HEADER, *result_rows(r)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def accuracy_curves(histories: dict[str, list[dict]], path: Path) -> Path | None:
    if not histories:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, hist in histories.items():
        ax.plot([h["epoch"] for h in hist], [h["test_acc"] for h in hist], marker="o", label=label)
    ax.set_xlabel("epoch (of each stage)")
    ax.set_ylabel("test accuracy")
    ax.set_title("students: test accuracy per epoch")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def collect_figures(out_dir: Path, fig_dir: Path, histories: dict) -> dict[str, Path]:
    """Draw the accuracy curves; copy the sparsity and prune stages' own PNGs."""
    fig_dir.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Path] = {}
    curves = accuracy_curves(histories, fig_dir / "accuracy.png")
    if curves:
        figures["accuracy"] = curves
    sources = {
        "gamma_before": out_dir / "sparsity" / "gamma_hist_epoch000.png",
        "gamma_after": out_dir / "sparsity" / "gamma_hist_final.png",
        "widths": out_dir / "prune" / "widths.png",
    }
    for key, src in sources.items():
        if src.is_file():
            figures[key] = Path(shutil.copy2(src, fig_dir / f"{key}.png"))
    return figures


def _md_table(header: tuple, rows: list[tuple]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(str(c) for c in row) + " |" for row in rows),
    ]


def markdown(r: dict, figures: dict[str, Path], md_path: Path) -> str:
    rel = {k: p.relative_to(md_path.parent).as_posix() for k, p in figures.items()}
    c, s, e = r["cache"], r["slim"], r["export"]
    lines = [f"# kdslim report: `{r['out_dir']}`", "", "## Results", ""]
    lines += _md_table(HEADER, result_rows(r))
    lines += ["", "## Teachers and cache", ""]
    lines += _md_table(
        ("teacher", "source", "test acc", "acc on cached views"),
        [
            (t["name"], f"`{t['source']}`", _acc(t["acc"]), _acc(t["acc_on_cached_views"]))
            for t in r["teachers"]
        ],
    )
    lines += [
        "",
        *_md_table(
            ("cache", "value"),
            [
                ("samples", c["num_samples"]),
                ("views per sample", c["views_per_sample"]),
                ("bytes", _num(c["bytes"])),
                ("storage", c["storage"]),
                ("ensemble acc on cached views", _acc(r["ensemble"]["acc_on_cached_views"])),
                ("verify: top-1 agreement of re-scored rows", _acc(c["teacher_top1_agreement"])),
                ("verify: max abs diff", c["verify_max_abs_diff"]),
            ],
        ),
    ]
    lines += ["", "## Students", ""]
    lines += _md_table(
        ("student", "last acc", "best acc", "epochs", "agreement with teachers"),
        [
            (
                "CE (labels)",
                _acc(r["student_ce"]["acc"]),
                _acc(r["student_ce"]["best_acc"]),
                r["student_ce"]["epochs"],
                "-",
            ),
            (
                "KD (cached)",
                _acc(r["student_kd"]["acc"]),
                _acc(r["student_kd"]["best_acc"]),
                r["student_kd"]["epochs"],
                _acc(r["student_kd"]["teacher_agreement"]),
            ),
        ],
    )
    if "accuracy" in rel:
        lines += ["", f"![accuracy curves]({rel['accuracy']})"]
    lines += ["", "## Network slimming", ""]
    lines += _md_table(
        ("", "value"),
        [
            ("prune ratio (channels under the global threshold)", s["prune_ratio"]),
            ("params kept", _acc(s["params_ratio"])),
            ("MACs kept", _acc(s["macs_ratio"])),
            (
                "channels kept",
                "-" if not s["channels"] else f"{s['channels']['kept']} / {s['channels']['total']}",
            ),
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
    return "\n".join(lines) + "\n"
