"""Typed run configuration: YAML files, dotted command-line overrides, strict validation.

Every section is a keyword-only dataclass. Loading walks the YAML mapping against the dataclass
fields, so a misspelt key or a wrong type fails at start-up with the key, the file and the
accepted values, instead of silently falling back to a default half-way through a long run
(timm's YAML-over-argparse merge lets typos pass; we do not).

Stage sections (`distill`, `prune`, ...) live with their stage and are composed into the root
schema in `launch.config`; this module holds the machinery and the sections every stage shares.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from common.errors import ConfigError

__all__ = ["ConfigError", "Range", "from_dict", "load_config", "save_config", "to_dict"]


@dataclass(frozen=True)
class Range:
    """The allowed interval of a numeric field (of each element, for tuples and lists),
    checked when a config is loaded: `epochs: Annotated[int, Range(ge=1)]`. Every int and
    float field carries one, so every value is checked once, at start-up."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def holds(self, v: float) -> bool:
        return (
            (self.ge is None or v >= self.ge)
            and (self.gt is None or v > self.gt)
            and (self.le is None or v <= self.le)
            and (self.lt is None or v < self.lt)
        )

    def __str__(self) -> str:
        parts = [
            f"{op} {bound:g}"
            for op, bound in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
            if bound is not None
        ]
        return " and ".join(parts) or "any number"


def _n(lo=None, hi=None, *, open_lo=False, open_hi=False) -> Range:
    """Range shorthand: [lo, hi], with either end open or absent."""
    return Range(
        ge=None if open_lo else lo,
        gt=lo if open_lo else None,
        le=None if open_hi else hi,
        lt=hi if open_hi else None,
    )


POSITIVE_INT = Annotated[int, _n(1)]
NON_NEGATIVE_INT = Annotated[int, _n(0)]
UNIT = _n(0, 1)  # [0, 1]

# --------------------------------------------------------------------------------------------
# Shared sections
# --------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class RunConfig:
    out_dir: str = "runs/default"
    """Every stage writes into `<out_dir>/<stage>/`; re-running resumes from what is there."""
    seed: NON_NEGATIVE_INT = 0
    """Seeds the replayable views, and model init and batch order unless a stage has its own
    seeds (`train.members[].seed`, `distill.seeds`)."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms(True): bit-reproducible runs at some speed cost."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Autocast precision for the student; losses are always computed in float32."""
    channels_last: bool = False
    """NHWC memory format for the trained model and its images: ~1.4x faster convolutions with
    oneDNN on CPU (measured, BENCHMARKS.md) and with cuDNN on tensor-core GPUs. The cache's
    teachers run in it too (1.5x faster ensemble forwards on CPU)."""
    compile: bool = False
    """torch.compile (inductor) of the trained model, through accelerate's dynamo backend:
    the first steps compile (tens of seconds on CPU), later ones may run faster; measured step
    ratios in BENCHMARKS.md ("CPU training speed"). Off by default: it pays only on long runs
    and on some models."""
    dtype: Literal["float32", "float64"] = "float32"
    """Parameter and arithmetic precision. float64 is a debugging and testing mode (several
    times slower): N processes then equal one process to ~1e-12 (see common/precision.py)."""

    def __post_init__(self) -> None:
        if self.dtype == "float64" and self.mixed_precision != "no":
            raise ConfigError(
                f"`run.dtype: float64` runs everything in float64; it cannot be combined with "
                f"`run.mixed_precision: {self.mixed_precision}` (set it to no)"
            )


@dataclass(kw_only=True)
class DataConfig:
    name: str = "digits"
    """Registered dataset: digits | cifar10 | cifar100 | imagefolder."""
    root: str | None = None
    """Local directory (Parquet HF layout, torchvision python layout, or class folders)."""
    image_size: Annotated[int | None, _n(1)] = None
    """Side of the square network input; None takes the dataset's native size."""
    augment: Literal["cifar", "imagenet", "none"] = "cifar"
    """Replayable training view recipe: pad+crop+flip (cifar) or resized crop+flip."""
    pad: NON_NEGATIVE_INT = 4
    """Zero padding of the cifar recipe before the random crop."""
    crop_scale: Annotated[tuple[float, float], _n(0, 1, open_lo=True)] = (0.08, 1.0)
    """Area range of the imagenet recipe's resized crop."""
    crop_ratio: Annotated[tuple[float, float], _n(0, open_lo=True)] = (0.75, 4.0 / 3.0)
    """Aspect-ratio range of the imagenet recipe's resized crop."""
    hflip: bool = True
    """Random horizontal flip (p=0.5) in either recipe."""
    randaugment: NON_NEGATIVE_INT = 0
    """RandAugment ops per training view (0: off), chosen with their signs from (seed,
    sample_id, view_id) so that a cached view can be rebuilt; torchvision's 14 ops."""
    randaugment_magnitude: Annotated[int, _n(0, 30)] = 9
    """RandAugment magnitude bin of 31, as torchvision's `magnitude`."""
    mix: Literal["none", "mixup", "cutmix"] = "none"
    """Mix every training view with a view of a partner sample: mixup blends the two images,
    cutmix pastes a box of the partner's. The partner, the coefficient and the box are
    functions of (seed, sample_id, view_id) alone, never of the batch, so a cached soft
    target belongs to exactly the mixed image the student sees (the "consistent teaching" of
    Beyer et al. 2022). The label becomes the same mixture. Evaluation views are not mixed."""
    mix_alpha: Annotated[float, _n(0, open_lo=True)] = 1.0
    """The mixing coefficient is drawn from Beta(mix_alpha, mix_alpha)."""
    mean: Annotated[tuple[float, float, float] | None, UNIT] = None
    """Normalisation mean (of pixels in [0, 1]); None takes the dataset's own statistics."""
    std: Annotated[tuple[float, float, float] | None, _n(0, open_lo=True)] = None
    """Normalisation std; None takes the dataset's own statistics."""
    train_subset: Annotated[int | None, _n(1)] = None
    """Use only the first N training samples (experiments on a budget)."""
    test_subset: Annotated[int | None, _n(1)] = None
    """Use only the first N test samples."""
    val_fraction: Annotated[float, _n(0, 0.5)] = 0.1
    """Share of the training samples held out as the validation split, on which every stage
    chooses its best epoch (never on test). A fixed draw, the same for every seed and stage;
    0 disables it (then the last epoch is reported)."""
    num_workers: NON_NEGATIVE_INT = 0
    """DataLoader workers per process; views do not depend on it."""
    decode_once: bool = True
    """Fixed-size Parquet datasets (CIFAR): decode every image once into a memory-mapped uint8
    file in `decode_dir` and read from it (see common/data/decoded.py), instead of decoding
    each image at every read. Pixels are the same either way."""
    decode_dir: str | None = None
    """Where decoded images are kept; None: $XDG_CACHE_HOME/kdslim/decoded (~/.cache)."""

    def __post_init__(self) -> None:
        if self.crop_scale[0] > self.crop_scale[1] or self.crop_ratio[0] > self.crop_ratio[1]:
            raise ConfigError("`data.crop_scale` and `data.crop_ratio` must be (low, high) pairs")


@dataclass(kw_only=True)
class LoggingConfig:
    wandb: Literal["offline", "online", "disabled"] = "offline"
    """offline by default: compute nodes rarely have internet (`wandb sync` later)."""
    project: str = "kdslim"
    """wandb project name."""
    entity: str | None = None
    """wandb entity (team); None uses the account default."""
    progress: bool = True
    """Progress on rank 0: a tqdm bar on a terminal; where the output is not a terminal
    (SLURM .out files, CI, nohup) plain lines instead, no carriage returns."""
    progress_every_s: Annotated[float, _n(0, open_lo=True)] = 60.0
    """Without a terminal: a progress line this often, and at every 10% of a task that has
    run this long (shorter tasks print only their summary)."""


@dataclass(kw_only=True)
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    """Optimizer."""
    lr: Annotated[float, _n(0, open_lo=True)] = 0.1
    """Peak learning rate, reached after warmup."""
    momentum: Annotated[float, _n(0, 1, open_hi=True)] = 0.9
    """SGD momentum."""
    nesterov: bool = False
    """SGD Nesterov momentum."""
    weight_decay: Annotated[float, _n(0)] = 1e-4
    """Decoupled for AdamW, L2 for SGD."""
    betas: Annotated[tuple[float, float], _n(0, 1, open_hi=True)] = (0.9, 0.999)
    """AdamW betas."""
    schedule: Literal["step", "cosine", "constant"] = "cosine"
    """Learning-rate decay after warmup."""
    milestones: Annotated[tuple[float, ...], _n(0, 1, open_lo=True, open_hi=True)] = (0.5, 0.75)
    """Step schedule: fractions of training at which lr is multiplied by `gamma`."""
    gamma: Annotated[float, _n(0, 1, open_lo=True)] = 0.1
    """Step schedule decay factor."""
    warmup_epochs: Annotated[float, _n(0)] = 0.0
    """Linear warmup from 0 over this many epochs."""
    clip_grad_norm: Annotated[float | None, _n(0, open_lo=True)] = None
    """Clip the global gradient norm (after unscaling) when set."""


@dataclass(kw_only=True)
class ModelConfig:
    name: str = "cifar_resnet20"
    """Registered model name (see `python -m launch models`), tv_<torchvision name> or
    timm_<timm name>."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra factory arguments."""
    weights: str | None = None
    """Local state dict (safetensors or torch) to start from; never downloaded."""
    pretrained: str | None = None
    """tv_ models: torchvision's weights by name (DEFAULT, IMAGENET1K_V1, ...) from the torch
    hub cache ($TORCH_HOME/hub/checkpoints); timm_<name> models: timm's pretrained tag
    (DEFAULT, a1_in1k, ...) from the Hugging Face hub cache ($HF_HUB_CACHE, default
    $HF_HOME/hub), repo timm/<name>.<tag>. Downloaded there unless KDSLIM_OFFLINE=1 or
    HF_HUB_OFFLINE=1; the head is re-initialised for the run's classes."""


@dataclass(kw_only=True)
class LoopConfig:
    """Settings of the shared training loop: every training stage embeds one."""

    epochs: POSITIVE_INT = 10
    """Passes over the training set."""
    batch_size: POSITIVE_INT = 128
    """GLOBAL batch per optimizer step, whatever the number of processes and accumulation."""
    grad_accum: POSITIVE_INT = 1
    """Micro-batches per optimizer step; per-process micro-batch = batch/(processes*accum)."""
    label_smoothing: Annotated[float, _n(0, 1, open_hi=True)] = 0.0
    """Cross-entropy label smoothing."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    eval_every: POSITIVE_INT = 1
    """Evaluate on the validation and test splits every N epochs (and always after the last)."""
    selection_split: Literal["val", "none"] = "val"
    """Which evaluated epoch's weights the stage keeps as its `model/`: the one with the best
    validation accuracy (`val`), or the last (`none`). Never chosen on test; the test
    accuracy reported is the chosen epoch's."""
    test_every_epoch: bool = True
    """Evaluate the test split at every evaluation, for per-epoch test curves. False (with a
    validation split): validation only during training, then the test split once for the
    selected epoch's saved weights and once for the last epoch's. The reported numbers are
    the same for two test passes instead of one per epoch (~5% of the CIFAR-10 CPU run), and
    there is no per-epoch test curve to be tempted by."""
    recalibrate_bn: NON_NEGATIVE_INT = 0
    """Before each evaluation, re-estimate the BatchNorm running statistics over this many
    training batches (cumulative average, train mode, no gradient; `common.bnstats`). For
    short runs of models with a small BN momentum (torchvision's MobileNetV3 and EfficientNet:
    0.01), whose running statistics are still near their initial values when evaluated and
    whose eval-mode outputs then collapse to one class. 0: off (the trainer still warns when
    it sees that collapse)."""
    ema_decay: Annotated[float | None, _n(0, 1, open_lo=True, open_hi=True)] = None
    """Evaluate, select and save an exponential moving average of the weights (and BN
    statistics), updated after every optimizer step with this decay: 0.99 averages over about
    the last 100 steps (`common.ema`). None: the raw weights."""
    log_every: POSITIVE_INT = 10
    """Log the loss terms every N optimizer steps (wandb and `<stage>/steps.jsonl`)."""
    checkpoint_every_steps: NON_NEGATIVE_INT = 0
    """Also checkpoint every N optimizer steps (0: only at epoch end)."""
    keep_checkpoints: POSITIVE_INT = 2
    """Resumable checkpoints kept on disk (oldest deleted first)."""
    resume: Literal[True, False, "force"] = True
    """Continue from the newest complete checkpoint in the stage directory. A checkpoint made
    under another configuration is refused with the differing keys; `force` resumes anyway
    (recorded in metrics.json)."""
    sync_bn: bool = True
    """Synchronise BatchNorm statistics across processes (CUDA SyncBN or the CPU all-reduce)."""
    max_steps: Annotated[int | None, _n(1)] = None
    """Stop after this many optimizer steps in total (smoke tests, budgets)."""


LossName = Literal["kd", "dkd", "ls", "dist"]
"""The registered distillation losses (`distill.losses.LOSSES`)."""
TEMPERATURE = _n(0, 100, open_lo=True)
WEIGHT = _n(0)


@dataclass(kw_only=True)
class DKDConfig:
    """Decoupled KD (Zhao et al., CVPR 2022): ce_weight CE + ramp T^2 (alpha TCKD + beta NCKD),
    with mdistiller's published values (`distillers/DKD.py`, `engine/cfg.py`)."""

    alpha: Annotated[float, WEIGHT] = 1.0
    """Weight of TCKD, the KL between the binary [p_true, 1 - p_true] distributions."""
    beta: Annotated[float, WEIGHT] = 8.0
    """Weight of NCKD, the KL over the non-target classes renormalised (6 for VGG pairs)."""
    temperature: Annotated[float, TEMPERATURE] = 4.0
    """Softmax temperature of both sides."""
    ce_weight: Annotated[float, WEIGHT] = 1.0
    """Weight of cross-entropy with the labels."""
    warmup_epochs: Annotated[float | None, _n(0)] = None
    """The DKD term's weight ramps linearly from 0 to 1 over this many epochs (mdistiller's
    min(epoch / 20, 1), per step instead of per epoch; 0: no ramp). None: 1/12 of the stage's
    epochs, the published 20 of 240, so a 20-epoch student ramps over 1.7 epochs instead of
    spending its whole schedule warming up."""


@dataclass(kw_only=True)
class LSConfig:
    """Logit standardisation (Sun et al., CVPR 2024): classic KD on (z - mean) / std of each row,
    both sides, with the authors' published base temperature and weights (tools/train.py:
    `--base-temp 2 --kd-weight 9`, CE weight 0.1 from mdistiller's KD)."""

    temperature: Annotated[float, TEMPERATURE] = 2.0
    """Base temperature applied to the standardised logits."""
    kd_weight: Annotated[float, WEIGHT] = 9.0
    """Weight of T^2 KL (9 is part of the published gain: plain KD uses 0.9)."""
    ce_weight: Annotated[float, WEIGHT] = 0.1
    """Weight of cross-entropy with the labels."""


@dataclass(kw_only=True)
class DISTConfig:
    """DIST (Huang et al., NeurIPS 2022): ce_weight CE + tau^2 (beta (1 - Pearson over the
    classes of each row) + gamma (1 - Pearson over the batch of each class)) of the softmax at
    tau, with the published ImageNet values (torchdistill's and the authors' `DIST`)."""

    beta: Annotated[float, WEIGHT] = 1.0
    """Weight of the inter-class relation (each image's class ranking)."""
    gamma: Annotated[float, WEIGHT] = 1.0
    """Weight of the intra-class relation (each class's ranking over the batch's images)."""
    tau: Annotated[float, TEMPERATURE] = 1.0
    """Softmax temperature of both sides."""
    ce_weight: Annotated[float, WEIGHT] = 1.0
    """Weight of cross-entropy with the labels."""


@dataclass(kw_only=True)
class KDConfig:
    """Knowledge distillation: which loss (`distill.losses.LOSSES`) and its settings. One
    section type for every stage that distils (`distill`, `sparsity`, `finetune`).

    `temperature` and `alpha` are classic KD's (`loss: kd`), as they always were; every other
    loss reads only its own subsection (`dkd`, `ls`, `dist`), whose defaults are the published
    values. So switching `loss` alone runs that loss as published, whatever T and alpha a
    configuration sets for KD (every shipped one sets T = 4, alpha = 0.9), instead of running
    it with KD's T or a weight whose meaning differs from loss to loss."""

    loss: LossName = "kd"
    """kd: Hinton's KD; dkd: decoupled KD; ls: KD on standardised logits; dist: DIST. Each
    reads a different part of a top-k cache row (see `distill.losses`); dist needs the whole
    vector and is refused on `cache.storage: topk`."""
    temperature: Annotated[float, TEMPERATURE] = 4.0
    """loss kd: softmax temperature T of both sides (KD papers: 1-20; 4-5 on CIFAR)."""
    alpha: Annotated[float, UNIT] = 0.9
    """loss kd: alpha T^2 KL(teacher_T || student_T) + (1 - alpha) CE with the labels."""
    dkd: DKDConfig = field(default_factory=DKDConfig)
    """loss dkd: its weights, temperature and warm-up."""
    ls: LSConfig = field(default_factory=LSConfig)
    """loss ls: its base temperature and weights."""
    dist: DISTConfig = field(default_factory=DISTConfig)
    """loss dist: its weights and temperature."""


@dataclass(kw_only=True)
class MemberConfig:
    """One teacher of the ensemble; unset fields come from `train.model` and `run.seed`."""

    name: str | None = None
    """Directory under `<out_dir>/train/`; default `<model name>-s<seed>`."""
    model: ModelConfig | None = None
    """The network; default `train.model`."""
    seed: Annotated[int | None, _n(0)] = None
    """Initialisation and batch-order seed; default `run.seed`."""


@dataclass(kw_only=True)
class TrainConfig:
    """`train`: supervised training of the teacher ensemble (and of any registered model)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The network of every member that does not name its own."""
    members: list[MemberConfig] = field(default_factory=list)
    """The ensemble: one trained model per entry (different seeds and/or models), each in
    `<out_dir>/train/<member>/`; empty: one member, `model` with `run.seed`."""
    loop: LoopConfig = field(default_factory=LoopConfig)
    """Schedule, batch and checkpoint settings (shared by all members)."""


# --------------------------------------------------------------------------------------------
# Loading machinery
# --------------------------------------------------------------------------------------------


_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _type_name(typing.get_args(tp)[0])
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', origin)}[{args}]"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, src: str) -> Any:
    """Check `value` against the annotation `tp`, converting only lossless cases (int->float,
    list->tuple); anything else is a ConfigError naming the key and the file."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def fail() -> typing.NoReturn:
        raise ConfigError(
            f"{src}: `{key}` must be {_type_name(tp)}, got {type(value).__name__} {value!r}"
        )

    if tp is Any:
        return value
    if origin is Annotated:
        base, *meta = args
        value = _coerce(value, base, key, src)
        numbers = value if isinstance(value, tuple | list) else [value]
        for rule in meta:
            if value is not None and not all(rule.holds(v) for v in numbers):
                raise ConfigError(f"{src}: `{key}` must be {rule}, got {value!r}")
        return value
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads `no`, `off`, `yes`, `on` as booleans
            words = ("yes", "on", "true") if value else ("no", "off", "false")
            value = next((w for w in words if w in args), value)
        if any(type(value) is type(a) and value == a for a in args):  # 1 is not True
            return value
        fail()
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, src)
            except ConfigError:
                continue
        fail()
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            fail()
        return from_dict(tp, value, src=src, prefix=f"{key}.")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            fail()
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]", src) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{src}: `{key}` needs {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]", src) for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        if not isinstance(value, list | tuple):
            fail()
        return [_coerce(v, args[0], f"{key}[{i}]", src) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            fail()
        return {str(k): _coerce(v, args[1], f"{key}.{k}", src) for k, v in value.items()}
    if tp is float:
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads `1e-4` (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, int | float):
            fail()
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail()
        return value
    if tp is bool or tp is str:
        if not isinstance(value, tp):
            fail()
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a schema bug, not user error


def from_dict(cls: type, data: dict, *, src: str = "<config>", prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls, include_extras=True)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in data if k not in names]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), names, n=1)
        hint = f"; did you mean `{prefix}{close[0]}`?" if close else ""
        raise ConfigError(
            f"{src}: unknown key `{prefix}{key}`{hint} (valid keys here: {', '.join(names)})"
        )
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}", src) for k, v in data.items()}
    try:
        obj = cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{src}: {e}") from None
    return obj


ADDED_LATER = {
    "*.loop.recalibrate_bn": 0,
    "*.loop.ema_decay": None,
    "*.kd.loss": "kd",
    "*.kd.dkd": dataclasses.asdict(DKDConfig()),
    "*.kd.ls": dataclasses.asdict(LSConfig()),
    "*.kd.dist": dataclasses.asdict(DISTConfig()),
    "cache.ensemble_weights": None,
}
"""Keys added after finished runs existed, with the value that reproduces the behaviour from
before they existed. At that value a key is left out of a node's key (`launch.freshness`), so
upgrading kdslim does not make finished work stale; any other value enters the key as usual.
A new key that changes what a stage produces at its default must not be listed here."""


def added_later(path: str) -> tuple[bool, Any]:
    """(True, the value that reproduces older behaviour) for a key listed in ADDED_LATER."""
    for pattern, neutral in ADDED_LATER.items():
        if fnmatch.fnmatchcase(path, pattern):
            return True, neutral
    return False, None


def describe_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """`key: old -> new` for every leaf value that differs between two nested mappings (a
    key added later, absent from a record made without it, had its neutral value there)."""
    out = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k), new.get(k)
        listed, neutral = added_later(f"{prefix}{k}")
        if listed:
            a = neutral if k not in old else a
            b = neutral if k not in new else b
        if isinstance(a, dict) and isinstance(b, dict):
            out += describe_changes(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {_short(a)} -> {_short(b)}")
    return out


def identity_changes(old: dict, new: dict) -> list[str]:
    """What differs between two node identities (`{"key", "values", "inputs"}`, see
    `launch.freshness`): changed values, then changed inputs; [] when the keys agree."""
    if not old or old.get("key") == new.get("key"):
        return []
    diff = describe_changes(old.get("values", {}), new.get("values", {}))
    ins_old, ins_new = old.get("inputs", {}), new.get("inputs", {})
    diff += [
        f"input `{k}` changed"
        for k in sorted(set(ins_old) | set(ins_new))
        if ins_old.get(k) != ins_new.get(k)
    ]
    return diff or ["the configuration key changed"]


def _short(v: Any) -> str:
    text = json.dumps(v, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def to_dict(cfg: Any) -> dict:
    """Plain, JSON/YAML-serialisable mapping (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def apply_override(data: dict, dotted: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML (safe_load:
    numbers, booleans, lists, null), never evaluated as code."""
    if "=" not in dotted:
        raise ConfigError(f"override `{dotted}` is not of the form dotted.key=value")
    path, raw = dotted.split("=", 1)
    keys = path.strip().split(".")
    if not all(keys):
        raise ConfigError(f"override `{dotted}` has an empty key")
    node = data
    for k in keys[:-1]:
        child = node.get(k)
        if child is None:
            child = node[k] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override `{dotted}`: `{k}` is not a section")
        node = child
    node[keys[-1]] = _yaml(raw, f"the value of override `{dotted}`") if raw.strip() else ""


def _yaml(text, where: str) -> Any:
    """`yaml.safe_load`, with a syntax error as a ConfigError naming where, line and column."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}, column {mark.column + 1}:" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        start = getattr(e, "context_mark", None)
        if start and getattr(e, "context", None) and (not mark or start.line != mark.line):
            problem += f"; {e.context} at line {start.line + 1}, column {start.column + 1}"
        raise ConfigError(
            f"{where}:{at} not valid YAML ({problem}); fix the syntax there (quote a value "
            "that holds `:`, `[` or `{`, close every bracket)"
        ) from None


def load_config(cls: type, path: str | Path | None, overrides: list[str] = ()) -> Any:
    """Read YAML `path` (or start from defaults), apply dotted overrides, validate into `cls`."""
    data: dict = {}
    src = "<defaults>"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist (see configs/ for examples)")
        src = str(p)
        with p.open() as f:
            data = _yaml(f, src) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{src}: the top level must be a mapping of sections")
    for ov in overrides:
        apply_override(data, ov)
    if overrides:
        src = f"{src} (with command-line overrides)"
    return from_dict(cls, data, src=src)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config next to a stage's outputs (atomically)."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(p)
