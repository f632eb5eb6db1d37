"""The steps of `python -m launch pipeline`: what each reads and writes, and when it is done.

A step is *complete* when (1) its output files exist, (2) its marker (the file it writes
last, e.g. `metrics.json`) is newer than the `config.yaml` it wrote when it started (so a
crashed re-run under a new config is not mistaken for the old, finished one), (3) that
`config.yaml` equals the resolved config on the sections the step reads (runtime-only keys
such as `data.num_workers` or checkpoint intervals excepted), and (4) its marker is newer than
the marker of every step it reads from. A complete step is skipped.

An incomplete step whose `config.yaml` matches and is newer than its inputs *resumes* (the
stage continues from its own checkpoints: the crash case). Otherwise its directory is
*stale*: it is moved to `<run.out_dir>/stale/<step>-<time>/` (never deleted; `export` and
`report`, cheap to redo, are simply overwritten) and the step runs from scratch. Once a step
runs, every step that reads from it runs from scratch too.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from common.checkpoint import MODEL_FILE, SPEC_FILE
from common.config import to_dict
from distill.cache.setup import cache_root
from launch.pipeline_config import PIPELINE_STEPS

RUNTIME_ONLY = {
    "data.num_workers",
    "cache.verify_samples",
    "loop.checkpoint_every_steps",
    "loop.keep_checkpoints",
    "loop.resume",
    "loop.log_every",
    "loop.eval_every",
}
"""Keys (or dotted suffixes) that change how a step runs, not what it produces."""


@dataclass(frozen=True)
class Step:
    name: str
    module: str
    """`launch.stages.<module>.run(cfg)` runs it (None: run by the pipeline itself)."""
    directory: Callable[[object], Path]
    outputs: tuple[str, ...]
    """Files (relative to `directory`) it leaves when done; the first is its marker."""
    sections: tuple[str, ...]
    """Config sections (dotted) it reads; compared with its `config.yaml`."""
    deps: tuple[str, ...]
    """Steps whose outputs it reads."""
    configure: Callable[[object], object] = lambda cfg: cfg
    """Builds this step's config from the pipeline's resolved config."""
    keep_stale: bool = True
    """Move a stale directory aside (False: cheap outputs, simply overwritten)."""

    def marker(self, cfg) -> Path:
        return self.directory(cfg) / self.outputs[0]


def _out(sub: str) -> Callable[[object], Path]:
    return lambda cfg: Path(cfg.run.out_dir) / sub


def _distill(mode: str):
    return lambda cfg: dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, mode=mode))


def _sparsity_of_student(cfg):
    """Network slimming starts from the KD student unless `sparsity.init` says otherwise."""
    init = cfg.sparsity.init or str(Path(cfg.run.out_dir) / "distill" / "model")
    return dataclasses.replace(cfg, sparsity=dataclasses.replace(cfg.sparsity, init=init))


def final_student_dir(cfg) -> Path:
    """The model the pipeline exports: finetune's if it exists, else the KD student's."""
    out = Path(cfg.run.out_dir)
    for sub in ("finetune", "distill"):
        if (out / sub / "model" / MODEL_FILE).is_file():
            return out / sub / "model"
    raise FileNotFoundError(f"no student model in {out}/finetune/model or {out}/distill/model")


MODEL = (f"model/{MODEL_FILE}", f"model/{SPEC_FILE}")
STEPS: tuple[Step, ...] = (
    Step("train", "train", _out("train"), ("metrics.json", *MODEL), ("run", "data", "train"), ()),
    Step(
        "cache",
        "cache",
        cache_root,
        ("metrics.json", "manifest.json"),
        ("run", "data", "cache"),
        ("train",),
    ),
    Step(
        "verify-cache",
        "verify_cache",
        lambda cfg: cache_root(cfg) / "verify",
        ("metrics.json",),
        ("run", "data", "cache"),
        ("cache",),
    ),
    Step(
        "distill-ce",
        "distill",
        _out("distill-ce"),
        ("metrics.json", *MODEL),
        ("run", "data", "distill"),
        (),
        _distill("ce"),
    ),
    Step(
        "distill",
        "distill",
        _out("distill"),
        ("metrics.json", *MODEL),
        ("run", "data", "cache", "distill"),
        ("train", "cache"),
        _distill("cached"),
    ),
    Step(
        "sparsity",
        "sparsity",
        _out("sparsity"),
        ("metrics.json", *MODEL),
        ("run", "data", "sparsity"),
        ("distill",),
        _sparsity_of_student,
    ),
    Step(
        "prune",
        "prune",
        _out("prune"),
        ("metrics.json", *MODEL),
        ("run", "data", "prune"),
        ("sparsity",),
    ),
    Step(
        "finetune",
        "finetune",
        _out("finetune"),
        ("metrics.json", *MODEL),
        ("run", "data", "finetune"),
        ("prune",),
    ),
    Step(
        "export",
        None,
        _out("export"),
        ("export.json",),
        ("pipeline",),
        ("distill", "finetune"),
        keep_stale=False,
    ),
    # report.json / report.md sit in <run.out_dir> itself; figures and config in report/
    Step(
        "report",
        "report",
        _out("report"),
        ("../report.json", "../report.md"),
        ("pipeline",),
        PIPELINE_STEPS[: PIPELINE_STEPS.index("report")],  # the report reads every step before it
        keep_stale=False,
    ),
)
assert tuple(s.name for s in STEPS) == PIPELINE_STEPS, (
    "launch.pipeline_steps.STEPS and launch.pipeline_config.PIPELINE_STEPS disagree: "
    f"{[s.name for s in STEPS]} vs {list(PIPELINE_STEPS)}"
)
BY_NAME = {s.name: s for s in STEPS}


def selected(cfg) -> list[Step]:
    """The steps this configuration runs, in pipeline order."""
    p = cfg.pipeline
    names = set(p.stages or BY_NAME)
    if not p.ce_baseline:
        names.discard("distill-ce")
    if not p.export:
        names.discard("export")
    if teachers_are_external(cfg):
        names.discard("train")
    return [s for s in STEPS if s.name in names]


def teachers_are_external(cfg) -> bool:
    """`cache.teachers` lists models from elsewhere: this run trains no teacher."""
    own = (Path(cfg.run.out_dir) / "train" / "model").resolve()
    teachers = cfg.cache.teachers
    return bool(teachers) and all(t.path is None or Path(t.path).resolve() != own for t in teachers)


def _relevant(data: dict, sections: tuple[str, ...]) -> dict:
    out = {}
    for sec in sections:
        node = data
        for k in sec.split("."):
            node = (node or {}).get(k)
        out[sec] = _strip(node, sec)
    return out


def _strip(node, prefix: str):
    if not isinstance(node, dict):
        return node
    return {
        k: _strip(v, f"{prefix}.{k}")
        for k, v in node.items()
        if f"{prefix}.{k}" not in RUNTIME_ONLY
        and not any(f"{prefix}.{k}".endswith("." + r) for r in RUNTIME_ONLY)
    }


def status(step: Step, cfg, rerun: set[str]) -> tuple[str, str]:
    """("complete" | "resume" | "stale" | "new", why) for `step` under its resolved `cfg`;
    `rerun` names the steps this invocation (re)runs before it."""
    d = step.directory(cfg)
    cfg_file = d / "config.yaml"
    if not d.exists():
        return "new", "no outputs yet"
    if rerun.intersection(step.deps):
        return "stale", f"its input {sorted(rerun.intersection(step.deps))} is re-run"
    if not cfg_file.is_file():
        return "resume", "no config.yaml: continuing what is there"
    started = cfg_file.stat().st_mtime_ns
    stored = yaml.safe_load(cfg_file.read_text()) or {}
    if _relevant(stored, step.sections) != _relevant(to_dict(cfg), step.sections):
        return "stale", f"{cfg_file} differs from the config on {', '.join(step.sections)}"
    for dep in step.deps:
        dm = BY_NAME[dep].marker(cfg)
        if dm.is_file() and dm.stat().st_mtime_ns > started:
            return "stale", f"it started before its input {dep} finished ({dm})"
    missing = [o for o in step.outputs if not (d / o).is_file()]
    if missing or step.marker(cfg).stat().st_mtime_ns < started:
        return "resume", f"unfinished (missing {missing or step.outputs[:1]})"
    return "complete", f"{step.marker(cfg)}"


def move_aside(step: Step, cfg) -> Path:
    """Move a stale step directory out of the way (kept, never deleted)."""
    d = step.directory(cfg)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    out = Path(cfg.run.out_dir)
    inside = out.resolve() in d.resolve().parents
    dest = (
        out / "stale" / f"{step.name}-{stamp}" if inside else d.with_name(f"{d.name}.stale-{stamp}")
    )
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(d), str(dest))
    return dest
