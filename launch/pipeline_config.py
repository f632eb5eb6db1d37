"""Config section of the whole run (`pipeline`): which stages it consists of, and export.

Composed into the root schema by `launch.config`; the stages themselves are `launch.graph`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from common.config import NON_NEGATIVE_INT, POSITIVE_INT, Range


@dataclass(kw_only=True)
class PipelineConfig:
    """`pipeline`: teachers -> cache -> verify -> students -> slimming -> export -> report."""

    ce_baseline: bool = True
    """Also train the label-only students (`distill-ce/`), the baseline KD is compared with."""
    stages: list[str] | None = None
    """The stages this run consists of (names from `python -m launch --help`, any order; they
    run in graph order); None: all. It also decides what stages read: `sparsity` starts from
    the KD student only when `distill` is among them."""
    slim_every_seed: bool = False
    """Slim every KD student: one sparsity -> prune -> finetune chain per `distill.seeds`
    entry (`sparsity/seed<S>/`, ...), each trained with its seed, so slimming's verdict is a
    t-interval over seed pairs like KD's. False: one chain (`sparsity/`), from the first KD
    student, whose verdict covers test-set noise only (a paired bootstrap)."""
    export: bool = True
    """Export the final student (TorchScript, ONNX, safetensors) into `<run.out_dir>/export/`."""
    export_batch: POSITIVE_INT = 4
    """Rows of the random batch each exported format is checked on."""
    export_atol: Annotated[float, Range(gt=0)] = 1e-4
    """Largest |exported - PyTorch| output difference an export check accepts, per unit of the
    largest |output| when that exceeds 1 (float32 rounding grows with the magnitude)."""
    onnx_opset: Annotated[int, Range(ge=17)] = 17
    """ONNX opset of the export."""
    int8_calibration: NON_NEGATIVE_INT = 512
    """Training views the int8 model (`export/model.int8.onnx`) is calibrated on: its
    activation ranges are the min and max over them. Drawn from the cache's samples x views
    with the cache's view recipe and seed, so they are inputs the student was trained on. More
    views narrow the int8 check's bound (derived from the disagreements among them) and cost
    two ONNX passes each; 0: no int8 model."""
