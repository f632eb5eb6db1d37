"""Config sections of the network-slimming stages: `sparsity`, `prune`, `finetune`.

Composed into the root schema by `launch.config`. Validation here names the key to change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from common.config import ConfigError, LoopConfig


@dataclass(kw_only=True)
class SparsityConfig:
    """`sparsity`: train with L1 on every BatchNorm scale (Liu et al. 2017, eq. 1)."""

    init: str | None = None
    """Model directory to start from; None takes `<run.out_dir>/train/model`."""
    s: float = 1e-4
    """L1 strength lambda (NS: 1e-4 for VGG, 1e-5 for ResNet/DenseNet)."""
    schedule: Literal["constant", "warmup", "decay"] = "constant"
    """How s moves over training: constant; warmup (0 -> s over `ramp_fraction` of the
    steps, then s); decay (s -> 0 linearly over all steps)."""
    ramp_fraction: float = 0.1
    """Fraction of the optimizer steps the `warmup` schedule takes to reach s."""
    penalty_in_loss: bool = False
    """Add s*sum|gamma| to the loss instead of s*sign(gamma) to the gradient. Needed under
    DeepSpeed ZeRO, which frees `param.grad`; identical otherwise."""
    histogram_bins: int = 60
    """Bins of the per-epoch |gamma| histogram (`gamma_hist_epochNNN.png`)."""
    loop: LoopConfig = field(default_factory=LoopConfig)
    """Schedule, batch and checkpoints of the sparsity training."""

    def __post_init__(self) -> None:
        if self.s < 0:
            raise ConfigError(f"`sparsity.s` must be >= 0, got {self.s}")
        if not 0 < self.ramp_fraction <= 1:
            raise ConfigError(
                f"`sparsity.ramp_fraction` must be in (0, 1], got {self.ramp_fraction}"
            )


@dataclass(kw_only=True)
class IterativeConfig:
    """Several prune / fine-tune rounds instead of one shot (each round in `prune/round_K/`)."""

    rounds: int = 1
    """Prune rounds; 1 is one-shot. Round k removes 1-(1-ratio)^(1/rounds) of the channels
    still present, so the rounds compound to `prune.ratio` of the original channels."""
    macs_budget: float | None = None
    """Stop early once MACs <= this fraction of the unpruned MACs (e.g. 0.5)."""
    s: float = 0.0
    """L1 strength kept on during the fine-tuning between rounds (0: plain fine-tune)."""
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(epochs=1))
    """Fine-tuning between rounds (not after the last one: that is the `finetune` stage)."""

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"`prune.iterative.rounds` must be >= 1, got {self.rounds}")
        if self.macs_budget is not None and not 0 < self.macs_budget < 1:
            raise ConfigError(
                f"`prune.iterative.macs_budget` must be in (0, 1), got {self.macs_budget}"
            )


@dataclass(kw_only=True)
class PruneConfig:
    """`prune`: one global |gamma| threshold, coupled channels removed together, then shrink."""

    init: str | None = None
    """Model directory to prune; None takes `<run.out_dir>/sparsity/model`."""
    ratio: float = 0.5
    """Fraction of all BN channels under the global threshold (NS: 0.7 for VGG-19)."""
    min_channels_ratio: float = 0.1
    """Per-layer floor: every BN keeps at least this fraction of its channels (and >= 1),
    so no layer vanishes (NS issues #27, #62, #80)."""
    latency_batches: tuple[int, ...] = (1, 64)
    """Batch sizes of the CPU latency measurement (before and after)."""
    latency_repeats: int = 20
    """Timed forward passes per batch size (median reported), after `latency_warmup`."""
    latency_warmup: int = 3
    """Untimed forward passes before timing."""
    latency_threads: int | None = 1
    """torch intra-op threads while timing (None: leave torch's setting). 1 by default: on a
    shared, loaded CPU, multi-threaded timings are dominated by spin-waiting threads."""
    iterative: IterativeConfig = field(default_factory=IterativeConfig)
    """Iterative mode: several prune / fine-tune rounds."""

    def __post_init__(self) -> None:
        if not 0 < self.ratio < 1:
            raise ConfigError(f"`prune.ratio` must be in (0, 1), got {self.ratio}")
        if not 0 <= self.min_channels_ratio <= 1:
            raise ConfigError(
                f"`prune.min_channels_ratio` must be in [0, 1], got {self.min_channels_ratio}"
            )
        if not self.latency_batches or min(self.latency_batches) < 1:
            raise ConfigError("`prune.latency_batches` must be positive batch sizes")


@dataclass(kw_only=True)
class FinetuneConfig:
    """`finetune`: train the pruned model (optionally with KD, or scratch-B from random init)."""

    init: str | None = None
    """Pruned model directory; None takes `<run.out_dir>/prune/model`."""
    teacher: str | None = None
    """Unpruned model directory for live KD (never DDP-wrapped, no grad); None: no KD."""
    kd_temperature: float = 4.0
    """KD softmax temperature T."""
    kd_alpha: float = 0.9
    """Weight of the KD term; (1 - alpha) goes to cross-entropy with the labels."""
    scratch_b: bool = False
    """Liu et al. 2019 scratch-B: re-initialise the pruned architecture and train for
    epochs * MACs_unpruned / MACs_pruned epochs (from the prune stage's metrics.json).
    Writes into `<run.out_dir>/scratch_b/`."""
    loop: LoopConfig = field(default_factory=LoopConfig)
    """Schedule, batch and checkpoints of the fine-tuning."""

    def __post_init__(self) -> None:
        if self.kd_temperature <= 0:
            raise ConfigError(f"`finetune.kd_temperature` must be > 0, got {self.kd_temperature}")
        if not 0 <= self.kd_alpha <= 1:
            raise ConfigError(f"`finetune.kd_alpha` must be in [0, 1], got {self.kd_alpha}")
