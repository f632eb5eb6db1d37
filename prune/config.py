"""Config sections of the network-slimming stages: `sparsity`, `prune`, `finetune`.

Composed into the root schema by `launch.config`. Validation here names the key to change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from common.config import (
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    ConfigError,
    KDConfig,
    LoopConfig,
    Range,
)

DEFAULT_SHRINK = 0.6
"""NS's regime: s = 1e-4 over 160 epochs of lr 0.1/0.01/0.001 at batch 64 sums to s x sum(lr)
= 1e-4 x 6,600 = 0.66, about its initial |gamma| of 0.5."""


ROUND_TO = 16
"""Default `prune.round_to` (BENCHMARKS.md, "Latency after pruning")."""


@dataclass(kw_only=True)
class SparsityConfig:
    """`sparsity`: train with L1 on every BatchNorm scale (Liu et al. 2017, eq. 1)."""

    init: str | None = None
    """Model directory to start from; None: the KD student when `distill` is in the run (else
    the first teacher), as the stage graph says."""
    shrink: Annotated[float | None, Range(gt=0)] = None
    """The total L1 shrinkage s x sum_t lr_t the run applies to every |gamma|, from which s
    follows for this run's own schedule (`s = shrink / sum_t lr_t`). What makes |gamma|
    bimodal is this total, not s: NS's s=1e-4 over 160 epochs gives 0.66 (`DEFAULT_SHRINK`);
    a 5-epoch run needs a 30-50x larger s for the same regime. With SGD momentum m the
    steady-state pull is shrink / (1 - m). Default (neither set): 0.6."""
    s: Annotated[float | None, Range(ge=0)] = None
    """Or the L1 strength lambda itself (NS: 1e-4 for VGG, 1e-5 for ResNet/DenseNet); set one
    of `s` and `shrink`."""
    schedule: Literal["constant", "warmup", "decay"] = "constant"
    """How s moves over training: constant; warmup (0 -> s over `ramp_fraction` of the
    steps, then s); decay (s -> 0 linearly over all steps)."""
    ramp_fraction: Annotated[float, Range(gt=0, le=1)] = 0.1
    """Fraction of the optimizer steps the `warmup` schedule takes to reach s."""
    penalty_in_loss: bool = False
    """Add s*sum|gamma| to the loss instead of s*sign(gamma) to the gradient. Needed under
    DeepSpeed ZeRO, which frees `param.grad`; identical otherwise."""
    kd_from: Literal["none", "cache"] = "none"
    """Keep distilling from the cached soft targets while sparsifying (`kd`), or labels only."""
    kd: KDConfig = field(default_factory=KDConfig)
    """Temperature and weight of the KD term with `kd_from: cache`."""
    histogram_bins: Annotated[int, Range(ge=2)] = 60
    """Bins of the per-epoch |gamma| histogram (`gamma_hist_epochNNN.png`)."""
    loop: LoopConfig = field(default_factory=LoopConfig)
    """Schedule, batch and checkpoints of the sparsity training. The last epoch is kept
    whatever `selection_split` says: it is the sparsest, and what pruning is for."""

    def __post_init__(self) -> None:
        if self.s is not None and self.shrink is not None:
            raise ConfigError(
                f"set one of `sparsity.s` ({self.s}) and `sparsity.shrink` ({self.shrink}): "
                f"shrink is the total s x sum(lr) from which s follows"
            )


@dataclass(kw_only=True)
class IterativeConfig:
    """Several prune / fine-tune rounds instead of one shot (each round in `prune/round_K/`)."""

    rounds: POSITIVE_INT = 1
    """Prune rounds; 1 is one-shot. Round k removes 1-(1-ratio)^(1/rounds) of what is left of
    the target quantity, so the rounds compound to `prune.ratio` of the original."""
    macs_budget: Annotated[float | None, Range(gt=0, lt=1)] = None
    """Stop early once MACs <= this fraction of the unpruned MACs (e.g. 0.5)."""
    s: Annotated[float, Range(ge=0)] = 0.0
    """L1 strength kept on during the fine-tuning between rounds (0: plain fine-tune)."""
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(epochs=1))
    """Fine-tuning between rounds (not after the last one: that is the `finetune` stage)."""


@dataclass(kw_only=True)
class PruneConfig:
    """`prune`: one global |gamma| threshold, coupled channels removed together, then shrink."""

    init: str | None = None
    """Model directory to prune; None: the `sparsity` stage's model."""
    target: Literal["channels", "macs", "params"] = "channels"
    """What `ratio` is a fraction of. channels: NS's rule, the |gamma| at index int(N x ratio)
    of all sorted scales. macs / params: the global threshold that removes at least `ratio`
    of the model's MACs / parameters once coupling (a coupled channel stays while any of its
    BatchNorms keeps it) and floors are applied, found by bisection over the sorted |gamma|."""
    ratio: Annotated[float, Range(gt=0, lt=1)] = 0.5
    """Fraction of `target` to remove (NS: 0.7 of the channels for VGG-19). On residual nets
    a channel ratio removes fewer channels than it says (ResNet-56 at 0.7 loses 34%):
    `target: macs` says what a user gets."""
    min_channels_ratio: Annotated[float, Range(ge=0, le=1)] = 0.1
    """Per-layer floor: every BN keeps at least this fraction of its channels (and >= 1),
    so no layer vanishes (NS issues #27, #62, #80)."""
    round_to: POSITIVE_INT = ROUND_TO
    """Kept widths rounded to a multiple of this (coupled groups as one), to the nearest
    multiple but never under the floor: widths such as 157 or 117 fall off the SIMD and GEMM
    tiles, so a pruned net's latency falls less than its MACs. The threshold search of
    `target: macs|params` counts the rounding. metrics.json `per_layer` gives requested and
    rounded widths. 1: no rounding (NS)."""
    recalibrate_bn: NON_NEGATIVE_INT = 20
    """Batches of training images (of `recalibrate_batch_size`) over which the pruned
    network's BN statistics are re-estimated before it is measured and saved (EagleEye's
    adaptive BN: removing channels changes every later layer's input statistics, so the
    unpruned network's are stale). metrics.json gives the accuracy before and after, and the
    unpruned network's after the same re-estimation (`before.test_acc_bn_recalibrated`), so
    that the drop the report states compares like with like. 0: off."""
    recalibrate_batch_size: POSITIVE_INT = 128
    """Batch size of the recalibration passes."""
    latency_batches: Annotated[tuple[int, ...], Range(ge=1)] = (1, 64)
    """Batch sizes of the CPU latency measurement (before and after)."""
    latency_repeats: POSITIVE_INT = 20
    """Timed forward passes per batch size (median reported), after `latency_warmup`."""
    latency_warmup: NON_NEGATIVE_INT = 3
    """Untimed forward passes before timing."""
    latency_threads: Annotated[int | None, Range(ge=1)] = 1
    """torch intra-op threads while timing (None: leave torch's setting). 1 by default: on a
    shared, loaded CPU, multi-threaded timings are dominated by spin-waiting threads."""
    iterative: IterativeConfig = field(default_factory=IterativeConfig)
    """Iterative mode: several prune / fine-tune rounds."""

    def __post_init__(self) -> None:
        if not self.latency_batches:
            raise ConfigError("`prune.latency_batches` must list at least one batch size")


@dataclass(kw_only=True)
class FinetuneConfig:
    """`finetune`: train the pruned model (labels, KD, or scratch-B from random init)."""

    init: str | None = None
    """Pruned model directory; None: the `prune` stage's model."""
    kd_from: Literal["none", "cache", "live", "unpruned"] = "none"
    """none: labels only. cache: distil from the ensemble's cached soft targets on the views
    the teachers saw. live: distil from `teacher`, run live and frozen. unpruned: distil live
    from the model slimming started from (the KD student of the chain's seed, or
    `sparsity.init`): the pruned network learns to answer as the one it replaces."""
    teacher: str | None = None
    """Model directory of the live teacher (`kd_from: live`); None: the sparsity-trained
    network the pruned one was cut from (the `sparsity` stage's)."""
    kd: KDConfig = field(default_factory=KDConfig)
    """Temperature and weight of the KD term."""
    scratch_b: bool = False
    """Liu et al. 2019 scratch-B: re-initialise the pruned architecture and train for
    epochs x MACs_unpruned / MACs_pruned epochs (from the prune stage's metrics.json), the
    baseline that says whether the inherited weights matter."""
    loop: LoopConfig = field(default_factory=LoopConfig)
    """Schedule, batch and checkpoints of the fine-tuning."""

    def __post_init__(self) -> None:
        if self.teacher is not None and self.kd_from != "live":
            raise ConfigError("`finetune.teacher` is the live KD teacher: set `kd_from: live`")
