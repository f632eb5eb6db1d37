"""`export`: the final student (fine-tuned, else the first KD student) as safetensors,
TorchScript, ONNX and int8 ONNX, each loaded back and checked, with its test accuracy and
costs on this machine (`launch.export`); after slimming, also the unpruned student it was cut
from (float formats, in `export/unpruned/`), so the report sets what slimming and int8 save
against the model a user would otherwise deploy."""

from __future__ import annotations

from common.files import UNPRUNED_EXPORT
from launch.export import export_student
from launch.measure import render


def run(cfg, inputs, ctx) -> dict:
    result = {}
    if ctx.is_main:  # one process writes and checks the files
        if "unpruned" in inputs:  # first: the final export.json marks the stage complete
            before = export_student(cfg, inputs["unpruned"], ctx.stage_dir / UNPRUNED_EXPORT, False)
            if "costs" in before:
                ctx.logger.info("the unpruned student:\n" + render(before["costs"]))
        result = export_student(cfg, inputs["model"], ctx.stage_dir)
        ctx.logger.info(f"export: {', '.join(result['files'].values())} in {ctx.stage_dir}")
        if "costs" in result:
            ctx.logger.info(render(result["costs"]))
    ctx.barrier()
    return result
