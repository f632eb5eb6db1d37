"""Rank-0 reporting: console, progress bars, wandb and the JSON metrics file.

Built once per stage; on every other rank the logger is a `NullLogger`, so training code never
asks "am I rank 0?" before logging. wandb is offline unless configured otherwise (compute
nodes rarely have internet; `wandb init` can hang 90 s without it) and resumes the same run id
after a restart. Nothing from the environment is logged (no WANDB_API_KEY in configs or files).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from common.config import LoggingConfig


def size_text(n_bytes: float) -> str:
    """A byte count as people read it: 28.3 kB, 1.24 GB (decimal units)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.3g} {unit}"
    return f"{int(n_bytes)} B"


@contextlib.contextmanager
def writing(path: str | Path):
    """An OSError while writing `path` names it: a failed `write` (a full disk, a quota)
    raises without a file name, and the user must learn which file system is full."""
    try:
        yield
    except OSError as e:
        if e.filename is not None:
            raise
        raise OSError(e.errno, f"{e.strerror} (while writing)", str(path)) from e


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` under a temporary name, then rename: readers never see half a file."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    with writing(p):
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

    def progress(self, total: int, desc: str, initial: int = 0, unit="steps", images=None):
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


class LineProgress:
    """Progress as whole lines, for output that is not a terminal: a bar's carriage-return
    frames pile up in a SLURM .out file, interleave with messages mid-line and, cut inside a
    multi-byte block character, leave the file invalid UTF-8. One line every `every_s` seconds
    and, once the task has run that long, at every 10%, through the same writer as the
    messages:

        epoch 3/10: 120/391 (30%), loss 1.2345, lr 0.1, 4.1 steps/s, 525 images/s, ETA 1m06s
    """

    def __init__(self, total, desc, initial, every_s, write, unit="steps", images=None) -> None:
        self.total, self.desc, self.n, self.every_s = total, desc, initial, every_s
        self.write, self.unit, self.images = write, unit, images
        self.start_n, self.postfix = initial, ""
        self.t0 = self.last_t = time.monotonic()
        self.last_tenth = self._tenth()

    def _tenth(self) -> int:
        return 10 * self.n // max(self.total, 1)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        long = now - self.t0 >= self.every_s  # short tasks stay quiet: their summary says it
        if now - self.last_t >= self.every_s or (long and self._tenth() > self.last_tenth):
            self.last_t, self.last_tenth = now, self._tenth()
            self.write(self.line(now))

    def line(self, now: float) -> str:
        rate = (self.n - self.start_n) / max(now - self.t0, 1e-9)
        eta = (self.total - self.n) / rate if rate > 0 else float("nan")
        pct = 100 * self.n // max(self.total, 1)
        post = f", {self.postfix}" if self.postfix else ""
        imgs = f", {rate * self.images:.0f} images/s" if self.images else ""
        return (
            f"{self.desc}: {self.n}/{self.total} ({pct}%){post}, {rate:.3g} {self.unit}/s"
            f"{imgs}, ETA {_duration(eta)}"
        )

    def set_postfix(self, **kw) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in kw.items())

    def close(self) -> None:
        pass


def _duration(seconds: float) -> str:
    if seconds != seconds:  # NaN: no rate yet
        return "?"
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


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
            try:
                self._wandb.log(metrics, step=step)
            except ConnectionError:
                self._wandb_gone()

    def log_image(self, key: str, path: str | Path, step: int | None = None) -> None:
        if self._wandb is not None:
            import wandb

            try:
                self._wandb.log({key: wandb.Image(str(path))}, step=step)
            except ConnectionError:
                self._wandb_gone()

    def _wandb_gone(self) -> None:
        """The wandb service process is gone: SLURM's TERM (scancel, `scontrol requeue`,
        preemption) reaches every process of a job, and wandb-core exits on it at once
        (wandb/wandb#9963) while this process still saves its checkpoint. Every later call
        would raise ConnectionResetError, wandb's own exit hook too: stop using wandb for this
        stage and say so in one line. Records the service had not yet written are lost (it
        writes in blocks); a resumed run continues the same run id.
        """
        import wandb

        self._wandb = None
        with contextlib.suppress(Exception):  # it raises on the dead socket too
            wandb.teardown()  # and unregisters the exit hook that would print a traceback
        self.info(
            "wandb: its service process was stopped by a signal; no more wandb logging in this "
            f"stage (what the service had written is in {self.stage_dir / 'wandb'})"
        )

    def append_jsonl(self, path: str | Path, record: dict) -> None:
        """One line per logged step (after a resume, steps since the checkpoint repeat)."""
        with writing(path), open(path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def progress(self, total: int, desc: str, initial: int = 0, unit="steps", images=None):
        """A bar (terminal) or `LineProgress` (anything else) over `total` `unit`s, each of
        `images` images when given (for images/s)."""
        if not self.cfg.progress:
            return _NoBar()
        if not sys.stderr.isatty():
            every = self.cfg.progress_every_s
            return LineProgress(total, desc, initial, every, self.info, unit, images)
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
            try:
                self._wandb.finish()
            except ConnectionError:
                self._wandb_gone()
            self._wandb = None
