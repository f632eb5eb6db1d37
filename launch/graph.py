"""The stage graph: every stage of a kdslim run, as data.

For each stage: its name and one-line help, the config values that decide what it produces
(`reads`), its named inputs (artifacts of other stages, or files given in the config), the
files that prove it finished (`outputs`), how SLURM should run it (`resources`) and, for
stages that run several times, its instances (one per teacher-ensemble member, one per
student seed). The command line's stage list, the pipeline's order, the default of every
`*.init`, the report's inputs and the SLURM plan are all read from `STAGES`; nothing else in
the code lists the stages.

A *node* is one instance of a stage (`train:cifar_resnet20-s1`, `distill:seed0`, `prune`); its
directory is `<run.out_dir>/<stage>[/<instance>]`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from common.config import ConfigError, ModelConfig, to_dict
from common.errors import KdslimError
from common.files import MODEL_FILE, SPEC_FILE
from distill.cache.layout import MANIFEST_FILE, identity_differences

Resources = Literal["train", "single", "array"]
"""How a node runs on a cluster: `train` on every node and GPU of a training job, `single` as
one process (prune, checks, export, report), `array` as a SLURM job array (cache shards)."""


@dataclass(frozen=True, order=True)
class Node:
    """One instance of a stage."""

    stage: str
    instance: str = ""

    @property
    def name(self) -> str:
        return f"{self.stage}:{self.instance}" if self.instance else self.stage

    @staticmethod
    def parse(text: str) -> Node:
        stage, _, instance = text.partition(":")
        return Node(stage, instance)


Input = Node | Path
"""What a node reads: another node's artifact, or a file or directory named in the config."""

MODEL_OUTPUTS = ("metrics.json", f"model/{MODEL_FILE}", f"model/{SPEC_FILE}")
RUNTIME_ONLY = (
    "run.out_dir",
    "data.num_workers",
    "data.decode_once",
    "data.decode_dir",
    "cache.batch_size",
    "cache.rows_per_part",
    "cache.num_shards",
    "cache.shard_index",
    "cache.verify_samples",
    "cache.dir",
    "cache.root",
    "prune.latency_batches",
    "prune.latency_repeats",
    "prune.latency_warmup",
    "prune.latency_threads",
    "*.loop.checkpoint_every_steps",
    "*.loop.keep_checkpoints",
    "*.loop.resume",
    "*.loop.log_every",
    "*.loop.test_every_epoch",
    "pipeline.stages",
)
"""Keys that change how a stage runs or where it writes, never what it produces: they are left
out of every node's key (`*` matches any section). `loop.test_every_epoch` changes only which
epochs `metrics.json` lists test numbers for; the model and the reported numbers are the same.
`cache.dir`/`cache.root` say where the cache lives; the cache's identity is its content (see
`distill.cache`)."""


@dataclass(frozen=True)
class Stage:
    name: str
    help: str
    reads: tuple[str, ...]
    """Dotted config paths whose values decide this stage's outputs."""
    inputs: Callable[[object, str], dict[str, Input | list[Input]]] = lambda cfg, i: {}
    """(cfg, instance) -> named inputs."""
    outputs: tuple[str, ...] = MODEL_OUTPUTS
    """Files (relative to the node's directory) a finished node has."""
    resources: Resources = "train"
    instances: Callable[[object], list[str]] = lambda cfg: [""]
    enabled: Callable[[object], bool] = lambda cfg: True
    """False: this configuration's run does not include the stage (e.g. no CE baseline)."""
    instance_reads: Callable[[object, str], dict] = lambda cfg, i: {}
    """Config values specific to one instance (a teacher member's model and seed)."""
    artifact: str = "model"
    """What other nodes read from this one, relative to its directory."""
    in_place: Callable[[object], bool] | None = None
    """For an artifact kept outside the node's directory (the cache): whether it is there and
    is what this configuration asks for. A node whose artifact is not in place is not
    complete, whatever its key says."""
    module: str = field(default="")
    """`launch.stages.<module>` holds `run(cfg, inputs, ctx)`; default: the name."""
    check: bool = False
    """A check of other nodes' outputs: it runs whenever its stage is named on the command
    line, complete or not (the user asked for the check)."""

    @property
    def module_name(self) -> str:
        return self.module or self.name.replace("-", "_")


# -- instances -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """One teacher of the ensemble `train` produces."""

    name: str
    model: ModelConfig
    seed: int


def members(cfg) -> list[Member]:
    """`train.members`, each completed from `train.model` and `run.seed`; one member (that
    model, that seed) when the list is empty."""
    t = cfg.train
    out = []
    for m in t.members or [None]:
        model = (m.model if m and m.model else None) or t.model
        seed = m.seed if m and m.seed is not None else cfg.run.seed
        out.append(Member((m.name if m else None) or f"{model.name}-s{seed}", model, seed))
    names = [m.name for m in out]
    if len(set(names)) != len(names):
        raise ConfigError(
            f"`train.members` names must differ, got {names}: give each a `name` or another "
            f"seed or model"
        )
    return out


def student_seeds(cfg) -> list[int]:
    """`distill.seeds`, default [run.seed]: one CE and one KD student per seed."""
    return list(cfg.distill.seeds or [cfg.run.seed])


def external_teachers(cfg) -> list[Path] | None:
    """The files of `cache.teachers` when the run is given its teachers, else None (it
    trains them)."""
    if not cfg.cache.teachers:
        return None
    return [Path(t.path if t.path is not None else t.weights) for t in cfg.cache.teachers]


# -- inputs ------------------------------------------------------------------------------------


def _teachers(cfg, _instance: str = "") -> list[Input]:
    """The ensemble: `cache.teachers` when given, else every member `train` produces."""
    external = external_teachers(cfg)
    if external is not None:
        return list(external)
    return [Node("train", m.name) for m in members(cfg)]


def _first_seed(cfg) -> str:
    return f"seed{student_seeds(cfg)[0]}"


def seed_of(cfg, instance: str) -> int:
    """The seed a node trains with (initialisation, batch order, choice of views): its
    instance's (`seed3`, `dkd-seed3`), or `run.seed` for a stage that runs once."""
    return int(instance.rpartition("seed")[2]) if instance else cfg.run.seed


def loss_of(instance: str) -> str:
    """The loss of a `distill-loss` node (`dkd-seed3` -> `dkd`)."""
    return instance.rpartition("-seed")[0]


def slim_instances(cfg) -> list[str]:
    """The slimming chains (sparsity -> prune -> finetune), by instance: one per KD student
    with `pipeline.slim_every_seed`, else one (`""`, from the first KD student or
    `sparsity.init`)."""
    if not cfg.pipeline.slim_every_seed:
        return [""]
    if cfg.sparsity.init or "distill" not in in_run(cfg):
        raise ConfigError(
            "`pipeline.slim_every_seed` slims every KD student, but this run "
            + ("starts slimming from `sparsity.init`" if cfg.sparsity.init else "has no `distill`")
            + ": set pipeline.slim_every_seed=false, or slim the KD students of this run"
        )
    return _seed_instances(cfg)


def first_slimmed(cfg, stage: str) -> Node:
    """The first chain's node of a slimming stage: the one the export and figures take."""
    return Node(stage, slim_instances(cfg)[0])


def _student(cfg, instance: str = "") -> Input:
    """The model network slimming starts from: the KD student of the chain's seed (the first
    seed for the one chain) when `distill` is in the run, else the first teacher member."""
    stages = in_run(cfg)
    if "distill" in stages:
        return Node("distill", instance or _first_seed(cfg))
    if "train" in stages:
        return Node("train", members(cfg)[0].name)
    raise ConfigError(
        "`sparsity.init` is not set and this run has neither `distill` nor `train` in "
        "`pipeline.stages`: set sparsity.init to a model directory"
    )


def _cache_inputs(cfg, _i: str = "") -> dict[str, Input | list[Input]]:
    return {"teachers": _teachers(cfg)}


def _distill_inputs(cfg, _i: str) -> dict[str, Input | list[Input]]:
    if cfg.distill.mode == "online":
        return {"teachers": _teachers(cfg)}
    return {"cache": Node("cache"), "teachers": _teachers(cfg)}


def _kd_cache(cfg, section) -> dict[str, Input | list[Input]]:
    if section.kd_from != "cache":
        return {}
    return {"cache": Node("cache"), "teachers": _teachers(cfg)}


def _sparsity_inputs(cfg, i: str) -> dict[str, Input | list[Input]]:
    sc = cfg.sparsity
    return {"model": Path(sc.init) if sc.init else _student(cfg, i), **_kd_cache(cfg, sc)}


def _prune_inputs(cfg, i: str) -> dict[str, Input | list[Input]]:
    pc = cfg.prune
    return {"model": Path(pc.init) if pc.init else Node("sparsity", i)}


def _finetune_inputs(cfg, i: str) -> dict[str, Input | list[Input]]:
    fc = cfg.finetune
    out: dict[str, Input | list[Input]] = {
        "model": Path(fc.init) if fc.init else Node("prune", i),
        **_kd_cache(cfg, fc),
    }
    if fc.kd_from == "live":  # the sparsity-trained network by default
        out["teacher"] = Path(fc.teacher) if fc.teacher else Node("sparsity", i)
    elif fc.kd_from == "unpruned":
        out["teacher"] = _sparsity_inputs(cfg, i)["model"]
    return out


def _export_inputs(cfg, _i: str) -> dict[str, Input | list[Input]]:
    """The final student (the first chain's fine-tuned one, else the first KD student) and,
    after slimming, the unpruned model that chain started from: the export measures what
    deploying each costs."""
    if "finetune" not in in_run(cfg):
        return {"model": Node("distill", _first_seed(cfg))}
    chain = first_slimmed(cfg, "sparsity").instance
    return {
        "model": first_slimmed(cfg, "finetune"),
        "unpruned": _sparsity_inputs(cfg, chain)["model"],
    }


def _report_inputs(cfg, _i: str) -> dict[str, Input | list[Input]]:
    return {
        stage.name: [Node(stage.name, i) for i in stage.instances(cfg)]
        for stage in STAGES
        if stage.name != "report" and stage.name in in_run(cfg)
    }


def _cache_teachers(cfg):
    """The teacher configs the cache is made from (this run's members' model directories, or
    `cache.teachers`): what names its request and, under `cache.dir: auto`, its directory."""
    from distill.cache.setup import teacher_configs  # imports torch: only when a run needs it

    trained = [artifact(cfg, t) for t in _teachers(cfg) if isinstance(t, Node)]
    return teacher_configs(cfg, trained)


def _cache_in_place(cfg) -> bool:
    """A complete cache equal to this configuration's request is in `cache_root`."""
    from distill.cache.setup import cache_root, request

    try:
        teachers = _cache_teachers(cfg)
        manifest = cache_root(cfg, teachers) / MANIFEST_FILE
        found = json.loads(manifest.read_text())
        return not identity_differences(found, request(cfg, teachers))
    except (OSError, ValueError, KdslimError):  # no teachers yet, no manifest, unreadable
        return False


def _cache_files(cfg) -> str:
    """The cache's files as they are on disk (names, sizes, modification times): a verify
    node is stale once a shard changes, rots or is replaced, though its request is the same."""
    try:
        root = artifact(cfg, Node("cache"))
        stats = sorted(
            (str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*")
            if p.is_file()
        )
    except (OSError, KdslimError):  # not written yet, or no teachers to name it by
        return "absent"
    digest = hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]
    return f"{len(stats)} files, {sum(s[1] for s in stats)} bytes (sizes and times {digest})"


def _member_reads(cfg, instance: str) -> dict:
    m = next(m for m in members(cfg) if m.name == instance)
    return {"member": {"model": to_dict(m.model), "seed": m.seed}}


def _seed_reads(cfg, instance: str) -> dict:
    return {"seed": int(instance.removeprefix("seed"))}


def _seed_instances(cfg) -> list[str]:
    return [f"seed{s}" for s in student_seeds(cfg)]


def _loss_instances(cfg) -> list[str]:
    return [f"{loss}-{seed}" for loss in cfg.distill.compare for seed in _seed_instances(cfg)]


def _loss_reads(cfg, instance: str) -> dict:
    return {"seed": seed_of(cfg, instance), "loss": loss_of(instance)}


def _chain_reads(cfg, instance: str) -> dict:
    """A chain of `slim_every_seed` trains with its seed; the one chain reads `run.seed`."""
    return _seed_reads(cfg, instance) if instance else {}


# -- the graph --------------------------------------------------------------------------------

_RUN = ("run", "data")
_KD_STUDENT = ("distill.student", "distill.kd", "distill.loop", "cache.views", "cache.plain_first")
# A node that reads the cache has the cache node's key among its inputs: the cache's content
# is covered there, so those nodes list only the cache settings they use themselves.

STAGES: tuple[Stage, ...] = (
    Stage(
        "train",
        "train the teacher ensemble: one model per `train.members` entry",
        reads=(*_RUN, "train.loop"),
        instances=lambda cfg: [m.name for m in members(cfg)],
        instance_reads=_member_reads,
        enabled=lambda cfg: external_teachers(cfg) is None,
    ),
    Stage(
        "cache",
        "write the teacher ensemble's soft targets for V views of every sample",
        reads=(*_RUN, "cache"),
        inputs=_cache_inputs,
        outputs=("metrics.json",),
        resources="array",
        artifact="",
        in_place=lambda cfg: _cache_in_place(cfg),
    ),
    Stage(
        "verify-cache",
        "check the cache: completeness, checksums, re-scored spot check",
        reads=(*_RUN, "cache"),
        inputs=lambda cfg, i: {"cache": Node("cache"), **_cache_inputs(cfg)},
        outputs=("metrics.json",),
        resources="single",
        instance_reads=lambda cfg, i: {"cache files": _cache_files(cfg)},
        artifact="",
        check=True,
    ),
    Stage(
        "distill-ce",
        "the label-only student (the baseline), one per `distill.seeds` entry",
        reads=(*_RUN, *_KD_STUDENT),
        instances=_seed_instances,
        instance_reads=_seed_reads,
        enabled=lambda cfg: cfg.pipeline.ce_baseline,
        module="distill",
    ),
    Stage(
        "distill",
        "the student on the ensemble's soft targets, one per `distill.seeds` entry",
        reads=(*_RUN, *_KD_STUDENT, "distill.mode", "cache.ensemble", "cache.ensemble_weights"),
        inputs=_distill_inputs,
        instances=_seed_instances,
        instance_reads=_seed_reads,
    ),
    Stage(
        "distill-loss",
        "students with the other losses of `distill.compare`, one per loss and seed",
        reads=(*_RUN, *_KD_STUDENT, "distill.mode", "cache.ensemble", "cache.ensemble_weights"),
        inputs=_distill_inputs,
        instances=_loss_instances,
        instance_reads=_loss_reads,
        enabled=lambda cfg: bool(cfg.distill.compare),
        module="distill",
    ),
    Stage(
        "sparsity",
        "network slimming: train with L1 on every BatchNorm scale",
        reads=(*_RUN, "sparsity"),
        inputs=_sparsity_inputs,
        instances=slim_instances,
        instance_reads=_chain_reads,
    ),
    Stage(
        "prune",
        "network slimming: global |gamma| threshold, remove coupled channels, shrink",
        reads=(*_RUN, "prune"),
        inputs=_prune_inputs,
        instances=slim_instances,
        resources="single",
    ),
    Stage(
        "finetune",
        "fine-tune the pruned model (labels, cached or live KD, or scratch-B)",
        reads=(*_RUN, "finetune"),
        inputs=_finetune_inputs,
        instances=slim_instances,
        instance_reads=_chain_reads,
    ),
    Stage(
        "export",
        "the final student as safetensors, TorchScript, ONNX and int8 ONNX, each checked, "
        "with its costs and the unpruned student's",
        reads=(
            "data",
            "run.seed",  # the check batch
            "pipeline.export_batch",
            "pipeline.export_atol",
            "pipeline.onnx_opset",
            "pipeline.int8_calibration",
            "cache.views",  # the int8 calibration views: the cache's recipe
            "cache.plain_first",
        ),
        inputs=_export_inputs,
        outputs=("export.json",),
        resources="single",
        enabled=lambda cfg: cfg.pipeline.export,
        artifact="",
    ),
    Stage(
        "report",
        "every stage's results in <out_dir>/report.json and report.md, with a verdict",
        reads=(),
        inputs=_report_inputs,
        outputs=("report.json", "report.md"),
        resources="single",
        artifact="",
    ),
)
BY_NAME = {s.name: s for s in STAGES}


def in_run(cfg) -> list[str]:
    """The stages this configuration's run consists of, in order: `pipeline.stages` (default
    all), less those the configuration switches off."""
    chosen = set(cfg.pipeline.stages or BY_NAME)
    return [s.name for s in STAGES if s.name in chosen and s.enabled(cfg)]


def nodes(cfg, stages: list[str] | None = None) -> list[Node]:
    """Every node of the run (or of `stages`), in an order where inputs come first."""
    names = in_run(cfg) if stages is None else stages
    return [Node(s.name, i) for s in STAGES if s.name in names for i in s.instances(cfg)]


def directory(cfg, node: Node) -> Path:
    d = Path(cfg.run.out_dir) / node.stage
    return d / node.instance if node.instance else d


def artifact(cfg, node: Node) -> Path:
    """The path another node reads from `node`: its model directory, or the cache itself."""
    if node.stage == "cache":
        from distill.cache.setup import cache_root

        return cache_root(cfg, _cache_teachers(cfg))
    stage = BY_NAME[node.stage]
    d = directory(cfg, node)
    return d / stage.artifact if stage.artifact else d


def inputs(cfg, node: Node) -> dict[str, Input | list[Input]]:
    return BY_NAME[node.stage].inputs(cfg, node.instance)


def upstream(cfg, node: Node) -> list[Node]:
    """The nodes `node` reads from (its dependencies), in graph order."""
    found: list[Node] = []
    for value in inputs(cfg, node).values():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, Node) and item not in found:
                found.append(item)
    return found


def resolve(cfg, node: Node) -> dict[str, Path | list[Path]]:
    """The node's inputs as paths."""

    def path(item: Input) -> Path:
        return artifact(cfg, item) if isinstance(item, Node) else item

    return {
        k: [path(x) for x in v] if isinstance(v, list) else path(v)
        for k, v in inputs(cfg, node).items()
    }


def check_node(cfg, text: str) -> Node:
    """A node named on the command line (`stage` or `stage:instance`), or a ConfigError."""
    node = Node.parse(text)
    if node.stage not in BY_NAME:
        raise ConfigError(f"unknown stage `{node.stage}`; stages: {', '.join(BY_NAME)}")
    if node.instance:
        known = BY_NAME[node.stage].instances(cfg)
        if node.instance not in known:
            raise ConfigError(
                f"`{node.stage}` has no instance `{node.instance}` in this configuration; "
                f"its instances: {', '.join(known)}"
            )
    return node
