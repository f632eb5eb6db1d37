"""`report`: every stage's results in `<run.out_dir>/report/report.json` and `report.md`
(with the verdict), and the figures beside them (also logged to wandb on rank 0)."""

from __future__ import annotations

from common.logging import write_json, write_text_atomic
from launch import graph
from launch.report_data import collect, histories, node_metrics
from launch.report_render import collect_figures, markdown


def run(cfg, inputs, ctx) -> dict:
    metrics = node_metrics(cfg)  # every stage's output files, read once
    report = collect(cfg, metrics)
    if ctx.is_main:
        figures = collect_figures(
            graph.directory(cfg, graph.first_slimmed(cfg, "sparsity")),
            graph.directory(cfg, graph.first_slimmed(cfg, "prune")),
            ctx.stage_dir,
            histories(cfg, metrics),
        )
        report["figures"] = {k: str(p) for k, p in figures.items()}
        md = ctx.stage_dir / "report.md"
        write_text_atomic(md, markdown(report, figures, md))
        for key, path in figures.items():
            ctx.logger.log_image(f"report/{key}", path)
        write_json(ctx.stage_dir / "report.json", report)
    ctx.barrier()
    return report
