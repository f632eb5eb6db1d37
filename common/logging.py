"""Rank-0 reporting: console, progress bars, wandb and the JSON metrics file.

Built once per stage; on every other rank the logger is a `NullLogger`, so training code never
asks "am I rank 0?" before logging. wandb is offline unless configured otherwise (compute
nodes rarely have internet; `wandb init` can hang 90 s without it) and resumes the same run id
after a restart. Nothing from the environment is logged (no WANDB_API_KEY in configs or files).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from common.config import LoggingConfig


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` under a temporary name, then rename: readers never see half a file."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, p)


def write_json(path: str | Path, data: Any) -> None:
    """Atomic JSON write (parent directories created): readers never see half a file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(p, json.dumps(data, indent=1, default=str))


def read_json_if_any(path: str | Path) -> Any:
    """A JSON file's content, or None when it is missing or unreadable (a stage that has not
    run, or was killed before its atomic write)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


class NullLogger:
    """What ranks other than 0 get."""

    run_id: str | None = None

    def info(self, msg: str) -> None:
        pass

    def log(self, metrics: dict, step: int | None = None) -> None:
        pass

    def log_image(self, key: str, path: str | Path, step: int | None = None) -> None:
        pass

    def append_jsonl(self, path: str | Path, record: dict) -> None:
        pass

    def progress(self, total: int, desc: str, initial: int = 0):
        return _NoBar()

    def close(self) -> None:
        pass


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kw) -> None:
        pass

    def close(self) -> None:
        pass


class RunLogger(NullLogger):
    def __init__(
        self,
        cfg: LoggingConfig,
        stage_dir: Path,
        name: str,
        config: dict,
        run_id: str | None = None,
    ):
        self.cfg = cfg
        self.stage_dir = stage_dir
        self._wandb = None
        self.run_id = run_id
        mode = os.environ.get("WANDB_MODE", cfg.wandb)  # the environment wins (tests, sites)
        if mode != "disabled":
            import wandb

            self._wandb = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                name=name,
                config=config,
                dir=str(stage_dir),
                mode=mode,
                id=run_id,
                resume="allow",
                settings=wandb.Settings(silent=True, console="off"),
            )
            self.run_id = self._wandb.id

    def info(self, msg: str) -> None:
        tqdm.write(msg, file=sys.stdout)
        sys.stdout.flush()

    def log(self, metrics: dict, step: int | None = None) -> None:
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def log_image(self, key: str, path: str | Path, step: int | None = None) -> None:
        if self._wandb is not None:
            import wandb

            self._wandb.log({key: wandb.Image(str(path))}, step=step)

    def append_jsonl(self, path: str | Path, record: dict) -> None:
        """One line per logged step (after a resume, steps since the checkpoint repeat)."""
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def progress(self, total: int, desc: str, initial: int = 0):
        if not self.cfg.progress:
            return _NoBar()
        return tqdm(
            total=total,
            desc=desc,
            initial=initial,
            dynamic_ncols=True,
            leave=False,
            file=sys.stderr,
        )

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
