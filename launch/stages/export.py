"""`export`: the final student (fine-tuned, else the first KD student) as safetensors,
TorchScript and ONNX, each loaded back and checked against PyTorch (`launch.export`)."""

from __future__ import annotations

from launch.export import export_student


def run(cfg, inputs, ctx) -> dict:
    result = {}
    if ctx.is_main:  # one process writes and checks the files
        result = export_student(cfg, inputs["model"], ctx.stage_dir)
        ctx.logger.info(f"export: {', '.join(result['files'].values())} in {ctx.stage_dir}")
    ctx.barrier()
    return result
