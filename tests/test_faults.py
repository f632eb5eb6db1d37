"""Faults: a dead rank must not hang the others; a half-written or damaged checkpoint must
never be resumed from."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from common.checkpoint import CheckpointManager
from common.files import MANIFEST_FILE, MODEL_FILE, PREDICTIONS_FILE, verify_manifest
from tests.cli import assert_one_line_error
from tests.conftest import PY, ROOT, cli_command, cli_env, interrupt, run_cli
from tests.equivalence import assert_same_weights, weights
from tests.test_train import SMALL, T

# --------------------------------------------------------------------------------------------
# checkpoint directory hygiene (unit level: CheckpointManager only)
# --------------------------------------------------------------------------------------------


def _save(mgr: CheckpointManager, step: int) -> Path:
    torch.manual_seed(step)
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    spec = {"name": "linear", "num_classes": 3, "kwargs": {}, "widths": None}
    mgr.save(step, model, spec, opt, {"step": step})
    return mgr.root / f"ckpt-{step:09d}"


def test_leftover_temp_dir_and_unmarked_dir_are_ignored(tmp_path):
    mgr = CheckpointManager(tmp_path / "checkpoints", keep=5, is_main=True)
    good = _save(mgr, 2)
    # a writer killed mid-write leaves its temp dir (another pid) ...
    tmp = mgr.root / ".ckpt-000000004.tmp-999999"
    tmp.mkdir()
    (tmp / MODEL_FILE).write_bytes(b"\0" * 10)
    # ... and a newer directory without the manifest (the completion marker)
    unmarked = mgr.root / "ckpt-000000006"
    unmarked.mkdir()
    for f in good.iterdir():
        if f.name != MANIFEST_FILE:
            (unmarked / f.name).write_bytes(f.read_bytes())
    assert mgr.latest() == good
    blob = CheckpointManager.load(mgr.latest())
    assert blob["state"] == {"step": 2}
    # the next save clears stale temp dirs of killed writers
    _save(mgr, 8)
    assert not tmp.exists()
    assert mgr.latest().name == "ckpt-000000008"


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_newest_checkpoint_is_skipped(tmp_path, damage):
    mgr = CheckpointManager(tmp_path / "checkpoints", keep=5, is_main=True)
    older, newest = _save(mgr, 2), _save(mgr, 4)
    assert verify_manifest(newest) is None
    target = newest / MODEL_FILE
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "flip":  # same size, one byte changed: only the checksum sees it
        target.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    else:
        target.unlink()
    assert verify_manifest(newest) is not None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert mgr.latest() == older
    assert any("ignoring corrupt checkpoint" in str(w.message) for w in caught)


def test_no_valid_checkpoint_means_fresh_start(tmp_path):
    mgr = CheckpointManager(tmp_path / "checkpoints", keep=5, is_main=True)
    assert mgr.latest() is None
    only = _save(mgr, 2)
    (only / MANIFEST_FILE).write_text("{not json")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert mgr.latest() is None


# --------------------------------------------------------------------------------------------
# end to end through the CLI
# --------------------------------------------------------------------------------------------

TINY = [
    "train",
    "--config",
    str(ROOT / "tests/configs/base.yaml"),
    *SMALL,
    "train.loop.epochs=1",
    "train.loop.checkpoint_every_steps=2",
    "train.loop.keep_checkpoints=3",
]


@pytest.mark.slow
def test_resume_skips_truncated_newest_checkpoint_and_matches_straight_run(tmp_path):
    run_cli(*TINY, "train.loop.max_steps=6", f"run.out_dir={tmp_path / 'straight'}")
    out = tmp_path / "damaged"
    run_cli(*TINY, "train.loop.max_steps=6", f"run.out_dir={out}")
    interrupt(out / T, after_step=4)  # killed after the step-4 checkpoint ...
    ckpts = sorted((out / T / "checkpoints").glob("ckpt-*"))
    assert [p.name for p in ckpts] == ["ckpt-000000002", "ckpt-000000004"]
    model_file = ckpts[-1] / MODEL_FILE
    model_file.write_bytes(model_file.read_bytes()[:1000])  # a write cut short
    proc = run_cli(*TINY, "train.loop.max_steps=6", f"run.out_dir={out}")
    assert "resumed from" in proc.stdout and "ckpt-000000002" in proc.stdout, proc.stdout
    assert "ignoring corrupt checkpoint" in proc.stderr, proc.stderr[-2000:]
    assert_same_weights(weights(tmp_path / "straight" / T), weights(out / T), atol=0)
    # killed after its last checkpoint: the resumed run only finishes, and the chosen epoch's
    # per-image test predictions (tested before the kill) come from testing the saved model
    interrupt(out / T, after_step=6)
    run_cli(*TINY, "train.loop.max_steps=6", f"run.out_dir={out}")
    want, got = (np.load(d / T / PREDICTIONS_FILE) for d in (tmp_path / "straight", out))
    assert all(np.array_equal(want[k], got[k]) for k in ("sample_id", "label", "pred"))


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for kv in env:
        if kv.startswith(b"RANK="):
            return int(kv[5:])
    return None


@pytest.mark.slow
@pytest.mark.parametrize("victim", [0, 1])
def test_killed_rank_stops_the_group_within_bounded_time(tmp_path, victim):
    """SIGKILL one rank's python mid-training: the launcher must fail, not hang.

    torchrun's elastic agent (inside `accelerate launch`) polls its workers every 0.1 s; when
    one dies it SIGTERMs the others (SIGKILL after its grace period) and exits non-zero. The
    survivor may also notice first: gloo raises on a closed peer socket. The collective
    timeout (KDSLIM_COLLECTIVE_TIMEOUT_S) is the last resort for a peer that hangs without
    dying, e.g. on another node whose agent is gone.
    """
    out = tmp_path / "run"
    cmd = cli_command(*TINY, "train.loop.epochs=20", f"run.out_dir={out}", processes=2)
    env = cli_env(KDSLIM_COLLECTIVE_TIMEOUT_S="60")
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 300
        ckpts = out / T / "checkpoints"
        while not any(ckpts.glob("ckpt-*")):  # training is under way on both ranks
            assert proc.poll() is None, proc.communicate()[0][-4000:]
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.1)
        ranks = {_rank_of(p): p for p in _children(proc.pid)}
        assert set(ranks) == {0, 1}, ranks
        os.kill(ranks[victim], signal.SIGKILL)
        t0 = time.monotonic()
        try:
            output, _ = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the launcher still runs 90 s after rank {victim} was killed")
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    print(f"\nrank {victim} SIGKILLed: launcher exited {proc.returncode} after {elapsed:.1f}s")
    assert proc.returncode != 0, output[-3000:]
    assert elapsed < 60, f"took {elapsed:.1f}s\n{output[-3000:]}"
    assert "Signals.SIGKILL" in output or "exitcode  : -9" in output, output[-3000:]
    for pid in ranks.values():  # no orphaned rank keeps running
        assert not Path(f"/proc/{pid}").exists() or _zombie(pid), f"rank pid {pid} survives"
    assert not (out / T / "model").exists()
    assert not (out / T / "metrics.json").exists()
    # whatever was saved is still a valid checkpoint to resume from
    mgr = CheckpointManager(out / T / "checkpoints", keep=3, is_main=False)
    latest = mgr.latest()
    assert latest is not None
    assert json.loads((latest / "trainer_state.json").read_text())["step"] >= 2


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
    except OSError:
        return True


# --------------------------------------------------------------------------------------------
# preemption without SLURM (with it: tests/slurm/test_stage_jobs.py): one line, exit status 75
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("under_slurm_script", [False, True])
def test_sigusr2_checkpoints_and_stops_with_one_line(tmp_path, under_slurm_script):
    """SIGUSR2 to a single `python -m launch` process: it saves a checkpoint and exits 75 with
    one line naming the step. Under slurm/lib.sh (KDSLIM_PREEMPT_FILE set) it writes the step
    to that file and exits 0 instead: the batch shell says 75 and requeues (see lib.sh)."""
    out, marker = tmp_path / "run", tmp_path / "preempted"
    extra = {"KDSLIM_PREEMPT_FILE": str(marker)} if under_slurm_script else {}
    cmd = cli_command(*TINY, "train.loop.epochs=20", f"run.out_dir={out}")
    with open(tmp_path / "stdout", "w") as so, open(tmp_path / "stderr", "w") as se:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=cli_env(**extra), stdout=so, stderr=se)
        try:
            deadline = time.monotonic() + 300
            while not any((out / T / "checkpoints").glob("ckpt-*")):  # training under way
                assert proc.poll() is None, (tmp_path / "stderr").read_text()[-3000:]
                assert time.monotonic() < deadline, "no checkpoint after 300 s"
                time.sleep(0.1)
            proc.send_signal(signal.SIGUSR2)
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stderr = (tmp_path / "stderr").read_text()
    latest = CheckpointManager(out / T / "checkpoints", keep=3, is_main=False).latest()
    step = json.loads((latest / "trainer_state.json").read_text())["step"]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert not (out / T / "model").exists(), "stopped early, yet wrote the final model"
    said = [line for line in stderr.splitlines() if "preempted" in line]
    if under_slurm_script:
        assert (rc, marker.read_text(), said) == (0, f"{step}\n", []), stderr[-2000:]
    else:
        line = f"preempted at step {step}, checkpoint saved; run the same command again to resume"
        assert (rc, said) == (75, [line]), stderr[-2000:]
        assert not marker.exists()


LONG = [*TINY, "train.loop.epochs=20", "train.loop.max_steps=80"]
"""Long enough for a signal sent at the first checkpoint to find the run still training."""


def _start_training(tmp_path, out):
    """`python -m launch train` (a new process: its signals and exit status are the point),
    returned once its first checkpoint is on disk."""
    cmd = cli_command(*LONG, f"run.out_dir={out}")
    err = open(tmp_path / "stderr", "w")  # noqa: SIM115 - the child's
    proc = subprocess.Popen(cmd, cwd=ROOT, env=cli_env(), stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 300
    while not any((out / T / "checkpoints").glob("ckpt-*")):  # training under way
        assert proc.poll() is None, (tmp_path / "stderr").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.05)
    return proc


def _ctrl_c(proc: subprocess.Popen, times: int) -> int:
    """Press Ctrl-C `times` times (SIGINT, as a terminal sends it); the exit status."""
    try:
        for _ in range(times):
            proc.send_signal(signal.SIGINT)
        return proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_stops_with_one_line_a_second_stops_at_once(tmp_path):
    """Ctrl-C behaves like a preemption: the step under way finishes, a checkpoint is saved,
    one line, exit status 130, and the same command resumes. A second Ctrl-C stops at once
    (exit status 130, one line, no traceback); the checkpoints already written stay valid."""
    out = tmp_path / "run"
    rc = _ctrl_c(_start_training(tmp_path, out), times=1)
    stderr = (tmp_path / "stderr").read_text()
    latest = CheckpointManager(out / T / "checkpoints", keep=3, is_main=False).latest()
    step = json.loads((latest / "trainer_state.json").read_text())["step"]
    line = f"interrupted at step {step}, checkpoint saved; run the same command again to resume"
    said = [x for x in stderr.splitlines() if x.startswith("interrupted")]
    assert (rc, said) == (130, [line]) and "Traceback" not in stderr, stderr[-3000:]
    assert not (out / T / "model").exists()
    resumed = run_cli(*LONG, f"run.out_dir={out}")  # the same command
    assert f"resumed from {latest}" in resumed.stdout, resumed.stdout[-2000:]

    twice = tmp_path / "twice"
    rc = _ctrl_c(_start_training(tmp_path, twice), times=2)
    stderr = (tmp_path / "stderr").read_text()
    assert rc == 130 and "Traceback" not in stderr, stderr[-3000:]
    assert len([x for x in stderr.splitlines() if x.startswith("interrupted")]) == 1, stderr
    assert CheckpointManager(twice / T / "checkpoints", keep=3, is_main=False).latest()


@pytest.mark.slow
def test_wandb_service_killed_by_a_signal_ends_wandb_logging_in_one_line(tmp_path):
    """SLURM's TERM (scancel, `scontrol requeue`) reaches wandb-core too, which exits at once;
    the stage goes on to its checkpoint, so its next wandb call, `finish` and wandb's own exit
    hook met a dead socket (ConnectionResetError tracebacks). Now: one line, no traceback."""
    script = f"""
import os, signal, subprocess, time
from pathlib import Path
from common.config import LoggingConfig
from common.logging import RunLogger

log = RunLogger(LoggingConfig(wandb="offline"), Path({str(tmp_path)!r}), "t", {{}})
log.log({{"a": 1.0}}, step=1)
ps = subprocess.run(["pgrep", "-P", str(os.getpid())], capture_output=True, text=True)
core = [int(p) for p in ps.stdout.split()]
assert core, "no wandb service process"
for pid in core:
    os.kill(pid, signal.SIGTERM)
def alive(pid):
    try:
        return Path(f"/proc/{{pid}}/stat").read_text().split(")")[1].split()[0] != "Z"
    except OSError:
        return False
while any(alive(pid) for pid in core):
    time.sleep(0.05)
for step in (2, 3):
    log.log({{"a": float(step)}}, step=step)
log.close()
print("closed")
"""
    proc = subprocess.run(
        [PY, "-c", script],
        cwd=ROOT,
        env=cli_env(WANDB_MODE="offline"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    both = proc.stdout + proc.stderr
    assert proc.returncode == 0, both[-3000:]
    assert "Traceback" not in both and "ConnectionResetError" not in both, both[-3000:]
    assert both.count("wandb: its service process was stopped by a signal") == 1, both
    assert proc.stdout.rstrip().endswith("closed"), both


# --------------------------------------------------------------------------------------------
# bad input: one clear line, a non-zero exit, nothing that looks like output
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_bad_inputs_fail_with_one_line_and_leave_no_output(tmp_path):
    quick = ["--config", str(ROOT / "tests/configs/base.yaml"), *SMALL]
    out = tmp_path / "run"
    # a value outside its range: named with its key and range, before anything starts
    proc = run_cli("distill", *quick, f"run.out_dir={out}", "distill.kd.alpha=3", check=False)
    assert_one_line_error(proc, 2, "`distill.kd.alpha` must be >= 0 and <= 1, got 3")
    assert not out.exists()
    # a batch larger than the training split: refused at the stage's start
    proc = run_cli("train", *quick, f"run.out_dir={out}", "train.loop.batch_size=4096", check=False)
    assert_one_line_error(proc, 2, "`train.loop.batch_size` 4096 is larger than the training split")
    assert not out.exists()  # no directory left that the next run would "continue from"
    # a truncated model file given as an input: the file is named
    model = tmp_path / "given"
    run_cli("train", *quick, f"run.out_dir={model}", "train.loop.max_steps=1")
    weights_file = model / T / "model" / MODEL_FILE
    weights_file.write_bytes(weights_file.read_bytes()[:100])
    proc = run_cli(
        "sparsity",
        *quick,
        f"run.out_dir={out}",
        f"sparsity.init={model / T / 'model'}",
        check=False,
    )
    assert_one_line_error(proc, 2, str(weights_file))
    assert not out.exists()
    # a stage whose input stage has not run: says which and what to run
    proc = run_cli("prune", *quick, f"run.out_dir={out}", check=False)
    assert_one_line_error(proc, 1, "`prune` reads sparsity", "python -m launch sparsity")


def test_a_full_disk_names_the_file_and_what_to_do(tmp_path):
    """Writing a step's log line to a full file system: the message names the file (a failed
    write raises without one) and says to free space and rerun."""
    quick = ["--config", str(ROOT / "tests/configs/base.yaml"), *SMALL, "train.loop.log_every=1"]
    steps = tmp_path / T / "steps.jsonl"
    steps.parent.mkdir(parents=True)
    steps.symlink_to("/dev/full")  # every write: ENOSPC
    proc = run_cli(
        "train", *quick, f"run.out_dir={tmp_path}", "train.loop.max_steps=2", check=False
    )
    assert_one_line_error(
        proc, 1, "No space left on device", str(steps), "free space there, then run the same"
    )


def test_outputs_honour_the_umask_weights_included(tmp_path):
    """Everything a stage writes gets the permissions the user's umask asks for: the
    safetensors writer made model files 0600, unreadable to colleagues on a shared disk."""
    quick = ["--config", str(ROOT / "tests/configs/base.yaml"), *SMALL, "train.loop.max_steps=2"]
    old = os.umask(0o002)  # a group-shared project directory
    try:
        run_cli("train", *quick, "train.loop.checkpoint_every_steps=1", f"run.out_dir={tmp_path}")
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / T).rglob("*") if p.is_file()]
    assert tmp_path / T / "model" / MODEL_FILE in files
    modes = {oct(p.stat().st_mode & 0o777) for p in files}
    assert modes == {"0o664"}, {str(p): oct(p.stat().st_mode & 0o777) for p in files}
