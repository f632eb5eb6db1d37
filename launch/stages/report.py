"""`report`: every stage's results in `<run.out_dir>/report.json` and `report.md`, figures in
`<run.out_dir>/report/` (also logged to wandb on rank 0)."""

from __future__ import annotations

from pathlib import Path

from common.logging import write_json, write_text_atomic
from common.runtime import open_stage
from launch.report_data import collect, histories, stage_metrics
from launch.report_render import collect_figures, markdown, results_table


def run(cfg, show: bool = True) -> dict:
    rt = open_stage(cfg, "report")
    try:
        metrics = stage_metrics(cfg)  # every stage's output files, read once
        report = collect(cfg, metrics)
        if rt.is_main:
            out = Path(cfg.run.out_dir)
            figures = collect_figures(out, rt.stage_dir, histories(metrics))
            report["figures"] = {k: str(p) for k, p in figures.items()}
            md = out / "report.md"
            write_text_atomic(md, markdown(report, figures, md))
            for key, path in figures.items():
                rt.logger.log_image(f"report/{key}", path)
            write_json(out / "report.json", report)  # last: the step's completion marker
            if show:
                rt.logger.info(results_table(report))
            rt.logger.info(f"report: {(out / 'report.json').resolve()} and {md.resolve()}")
        rt.accelerator.wait_for_everyone()
        return report
    finally:
        rt.close()
