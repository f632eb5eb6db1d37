"""`pipeline`: the whole run in one command, in one output directory.

teachers (`train`) -> `cache` -> `verify-cache` -> CE baseline (`distill-ce`) -> KD student
(`distill`) -> `sparsity` -> `prune` -> `finetune` -> `export` -> `report`. Each step runs
in this process with its own config built from the resolved one (`launch.pipeline_steps`);
complete steps are skipped, an interrupted one resumes from its checkpoints. Under
`accelerate launch` every process runs the same sequence; the stages handle ranks.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import time
from pathlib import Path
from unittest import mock

from accelerate.state import PartialState

from common.distributed import build_accelerator
from launch import pipeline_steps as steps
from launch.export import export_student


def run(cfg) -> dict:
    acc = build_accelerator(cfg.run)  # once: every stage's Accelerator shares this state
    say = print if acc.is_main_process else (lambda *a, **k: None)
    plan = steps.selected(cfg)
    say(f"pipeline: {len(plan)} steps into {cfg.run.out_dir}: {', '.join(s.name for s in plan)}")
    rerun: set[str] = set()
    summary: dict[str, dict] = {}
    with _keep_process_group():
        for step in plan:
            step_cfg = step.configure(cfg)
            acc.wait_for_everyone()
            state, why = steps.status(step, step_cfg, rerun)
            acc.wait_for_everyone()  # every rank decided before rank 0 moves anything
            if state == "complete":
                say(f"pipeline: [{step.name}] skipped: complete ({why})")
                summary[step.name] = {"state": "skipped"}
                continue
            if state == "stale" and step.keep_stale and acc.is_main_process:
                say(
                    f"pipeline: [{step.name}] stale ({why}); moved to "
                    f"{steps.move_aside(step, step_cfg)}"
                )
            acc.wait_for_everyone()
            say(f"pipeline: [{step.name}] running ({why})")
            start = time.time()
            _run_step(step, step_cfg, acc.is_main_process)
            acc.wait_for_everyone()
            rerun.add(step.name)
            summary[step.name] = {"state": "ran", "wall_s": round(time.time() - start, 1)}
            say(f"pipeline: [{step.name}] done in {summary[step.name]['wall_s']} s")
    _finish(cfg, summary, say)
    acc.end_training()  # the process group, kept alive between the stages, ends here
    return summary


def _run_step(step: steps.Step, cfg, is_main: bool) -> None:
    if step.name == "export":
        if is_main:  # one process writes and checks the files
            export_student(cfg, steps.final_student_dir(cfg), step.directory(cfg))
        return
    stage = importlib.import_module(f"launch.stages.{step.module}")
    if step.name == "report":
        stage.run(cfg, show=False)  # the pipeline prints the table once, at its end
    else:
        stage.run(cfg)


def _finish(cfg, summary: dict, say) -> None:
    from launch.report_render import results_table

    out = Path(cfg.run.out_dir)
    ran = [k for k, v in summary.items() if v["state"] == "ran"]
    say(
        f"pipeline: complete; {len(ran)} step(s) ran ({', '.join(ran) or 'none'}), "
        f"{len(summary) - len(ran)} skipped"
    )
    report = out / "report.json"
    if report.is_file():
        say(results_table(json.loads(report.read_text())))
        say(f"report: {report.resolve()} and {(out / 'report.md').resolve()}")


@contextlib.contextmanager
def _keep_process_group():
    """Each stage ends with `accelerator.end_training()`, which destroys the process group;
    the next stage's Accelerator reuses accelerate's (still initialised) shared state and
    would find no group. Keep it alive between stages; it is destroyed once at the end."""
    with mock.patch.object(PartialState, "destroy_process_group", lambda self, group=None: None):
        yield
