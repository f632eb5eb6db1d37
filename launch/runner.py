"""Run nodes of the stage graph: skip what is complete, set aside what is stale, refuse what
lacks its inputs, and mark success with the node's key (`launch.freshness`).

The same function runs one stage from the command line, a whole pipeline in one process (every
process, under `accelerate launch`) and one SLURM job of a plan, so the three agree on what
"done" means.
"""

from __future__ import annotations

import importlib
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from common.config import save_config
from common.errors import KdslimError, StageError
from common.runtime import Runtime
from launch import freshness, graph
from launch.graph import Node


def run_node(
    cfg, runtime: Runtime, node: Node, say: Callable[[str], None], named: bool = False
) -> dict:
    """Run `node` unless it is complete (a check whose stage the user `named` on the command
    line runs anyway); returns {"state": "skipped" | "ran", ...}."""
    acc = runtime.accelerator
    state = freshness.status(cfg, node)
    if state.state == "complete" and named and graph.BY_NAME[node.stage].check:
        state = freshness.Status("check", "asked for: a check runs whenever it is invoked")
    if state.state == "complete":
        say(f"[{node.name}] skipped: complete ({state.why})")
        return {"state": "skipped"}
    missing = [u.name for u in graph.upstream(cfg, node) if not freshness.is_complete(cfg, u)]
    if missing:
        raise StageError(
            f"`{node.name}` reads {', '.join(missing)}, not complete for this configuration: "
            f"run `python -m launch {missing[0]}` (or the whole `pipeline`) first"
        )
    acc.wait_for_everyone()  # every rank decided before rank 0 moves anything
    if state.state == "stale" and runtime.is_main:
        say(f"[{node.name}] stale ({state.why}); moved to {move_aside(cfg, node)}")
    acc.wait_for_everyone()
    say(f"[{node.name}] running ({state.why})")
    ident = freshness.identity(cfg, node)
    stage = graph.BY_NAME[node.stage]
    module = importlib.import_module(f"launch.stages.{stage.module_name}")
    d = graph.directory(cfg, node)
    made = first_missing(d)
    ctx = runtime.open(cfg, node.name, node.instance, d, ident.as_dict())
    start, refused = time.time(), False
    try:
        module.run(cfg, graph.resolve(cfg, node), ctx)
        acc.wait_for_everyone()
        if freshness.outputs_exist(cfg, node):
            if runtime.is_main:
                save_config(cfg, ctx.stage_dir / "config.yaml")
                freshness.mark_complete(cfg, node, ident)  # last: the node's success
        elif stage.resources != "array":  # an array task may finish only its own shard
            raise RuntimeError(f"{node.name} finished without its outputs {stage.outputs}")
    except KdslimError:  # refused: bad input the user can fix (common.errors)
        refused = True
        raise
    finally:
        runtime.close(ctx)
        in_array = "SLURM_ARRAY_TASK_ID" in os.environ  # the other tasks write there too
        if refused and runtime.is_main and not in_array:
            remove_if_refused(made, ctx.stage_dir)
    acc.wait_for_everyone()
    wall = round(time.time() - start, 1)
    say(f"[{node.name}] done in {wall} s")
    return {"state": "ran", "wall_s": wall}


def first_missing(directory: Path) -> Path | None:
    """The outermost of `directory` and its parents that does not exist yet (None: it does)."""
    missing = None
    for d in (directory, *directory.parents):
        if d.exists():
            return missing
        missing = d
    return missing


def remove_if_refused(made: Path | None, stage_dir: Path) -> None:
    """A stage refused its input before it saved anything: remove what this run created for
    it, so that the next run starts it afresh instead of "continuing from what is there"."""
    if made is not None and not any((stage_dir / "checkpoints").glob("ckpt-*")):
        shutil.rmtree(made, ignore_errors=True)


def move_aside(cfg, node: Node) -> Path:
    """Move a stale node directory to `<run.out_dir>/stale/` (kept, never deleted): only
    directories of this run's own `run.out_dir` are ever moved."""
    d = graph.directory(cfg, node)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    label = node.name.replace(":", "-")
    dest = Path(cfg.run.out_dir) / "stale" / f"{label}-{stamp}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(d), str(dest))
    return dest
