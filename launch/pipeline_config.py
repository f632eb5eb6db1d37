"""Config section of the `pipeline` stage: which steps of the whole run to take.

Composed into the root schema by `launch.config`; the steps themselves are defined in
`launch.pipeline_steps`.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.config import ConfigError

PIPELINE_STEPS = (
    "train",
    "cache",
    "verify-cache",
    "distill-ce",
    "distill",
    "sparsity",
    "prune",
    "finetune",
    "export",
    "report",
)
"""Every step of `python -m launch pipeline`, in the order they run."""


@dataclass(kw_only=True)
class PipelineConfig:
    """`pipeline`: teachers -> cache -> verify -> students -> slimming -> export -> report."""

    ce_baseline: bool = True
    """Also train the label-only student (`distill-ce/`), the baseline KD is compared with."""
    stages: list[str] | None = None
    """Run only these steps (names from PIPELINE_STEPS, any order; they run in pipeline
    order); None runs them all. Steps left out are neither run nor checked."""
    export: bool = True
    """Export the final student (TorchScript, ONNX, safetensors) into `<run.out_dir>/export/`."""
    export_batch: int = 4
    """Rows of the random batch each exported format is checked on."""
    export_atol: float = 1e-4
    """Largest |exported - PyTorch| output difference an export check accepts."""
    onnx_opset: int = 17
    """ONNX opset of the export (>= 17)."""

    def __post_init__(self) -> None:
        if self.stages is not None:
            unknown = [s for s in self.stages if s not in PIPELINE_STEPS]
            if unknown or not self.stages:
                raise ConfigError(
                    f"`pipeline.stages` has unknown step(s) {unknown or '(empty list)'}; "
                    f"valid: {', '.join(PIPELINE_STEPS)}"
                )
        if self.export_batch < 1:
            raise ConfigError(f"`pipeline.export_batch` must be >= 1, got {self.export_batch}")
        if self.export_atol <= 0:
            raise ConfigError(f"`pipeline.export_atol` must be > 0, got {self.export_atol}")
        if self.onnx_opset < 17:
            raise ConfigError(f"`pipeline.onnx_opset` must be >= 17, got {self.onnx_opset}")
