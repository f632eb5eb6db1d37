"""The real `slurm/` scripts on the local two-node cluster: multi-node DDP, preemption ->
requeue -> resume, the cache job array and the dependency chain of `slurm/submit.sh`."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli
from tests.equivalence import EXACT, F64, assert_same_weights, weights
from tests.slurm.localslurm import SlurmCluster
from tests.test_train import SMALL

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

STAGE = ROOT / "slurm" / "stage.sbatch"
SUBMIT = ROOT / "slurm" / "submit.sh"
VENV = str(Path(sys.executable).parent.parent)
QUICK = str(ROOT / "configs/quickstart.yaml")
# What a site exports into its jobs; sbatch passes the submitting environment on.
JOB_ENV = {
    "KDSLIM_VENV": VENV,
    "GLOO_SOCKET_IFNAME": "lo",
    "OMP_NUM_THREADS": "1",  # same float reduction order as the local reference runs
    "WANDB_MODE": "disabled",
}


def _done(records: list[dict[str, str]], restarts: str = "0") -> None:
    assert records, "job vanished without a record"
    for r in records:
        assert (r.get("JobState"), r.get("ExitCode")) == ("COMPLETED", "0:0"), r
        assert r.get("Restarts") == restarts, r


def _out(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else "<no output file>"


@pytest.mark.numerics
def test_two_node_ddp_equals_one_process(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    args = [
        "train",
        "--config",
        QUICK,
        *SMALL,
        *F64,
        "train.loop.epochs=1",
        "train.loop.max_steps=3",
    ]
    log = tmp_path / "two.out"
    t0 = time.monotonic()
    job = slurm_cluster.sbatch(
        STAGE,
        "-N2",
        "--time=5",
        f"--output={log}",
        env_extra=JOB_ENV,
        script_args=[*args, f"run.out_dir={tmp_path / 'two'}"],
        cwd=ROOT,
    )
    run_cli(*args, f"run.out_dir={tmp_path / 'one'}")  # the reference, while the job runs
    records = slurm_cluster.wait(job, timeout=240)
    print(f"\ntwo-node job + one-process reference: {time.monotonic() - t0:.1f}s")
    out = _out(log)
    _done(records)
    assert "2 node(s) x 1 process(es), cpu" in out, out[-3000:]
    m2 = json.loads((tmp_path / "two/train/metrics.json").read_text())
    m1 = json.loads((tmp_path / "one/train/metrics.json").read_text())
    assert (m1["world_size"], m2["world_size"]) == (1, 2)
    # float64: only summation order differs (tests/equivalence.py derives the bound)
    assert_same_weights(weights(tmp_path / "one/train"), weights(tmp_path / "two/train"), EXACT)
    assert m1["last"]["test_num_samples"] == m2["last"]["test_num_samples"] == 359


def test_usr2_requeue_resume_equals_uninterrupted(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    """USR2 to the batch shell (what --signal=B:USR2@120 sends before the time limit) ->
    every rank checkpoints and stops -> `scontrol requeue` -> the job restarts, resumes from
    the checkpoint into the same wandb run, and ends with the weights of an uninterrupted run.
    """
    args = [
        "train",
        "--config",
        QUICK,
        "logging.progress=false",
        "train.loop.epochs=1",
        "train.loop.max_steps=12",
        "train.loop.checkpoint_every_steps=2",
        "train.loop.keep_checkpoints=1",
    ]
    out_dir, log = tmp_path / "pre", tmp_path / "pre.out"
    job = slurm_cluster.sbatch(
        STAGE,
        "-N2",
        "--time=5",
        f"--output={log}",
        env_extra={**JOB_ENV, "WANDB_MODE": "offline"},
        script_args=[*args, f"run.out_dir={out_dir}"],
        cwd=ROOT,
    )
    ckpts = out_dir / "train" / "checkpoints"
    deadline = time.monotonic() + 180
    while not any(ckpts.glob("ckpt-*")):
        assert slurm_cluster.in_queue(job), f"job ended before a checkpoint\n{_out(log)}"
        assert time.monotonic() < deadline, f"no checkpoint after 180 s\n{_out(log)}"
        time.sleep(0.1)
    t0 = time.monotonic()
    slurm_cluster.run("scancel", "--signal=USR2", "--batch", job)
    # the uninterrupted reference: the same two-rank gloo DDP, launched locally
    run_cli(*args, f"run.out_dir={tmp_path / 'straight'}", processes=2)
    records = slurm_cluster.wait(job, timeout=240)
    print(f"\nUSR2 -> requeued run finished: {time.monotonic() - t0:.1f}s")
    out = _out(log)
    _done(records, restarts="1")
    assert "requeueing" in out and "restart 1:" in out, out[-4000:]
    assert "resumed from" in out, out[-4000:]
    resumed_at = int(out.split("resumed from")[1].split("(step ")[1].split(",")[0])
    assert 2 <= resumed_at < 12, "the run was not interrupted mid-training"
    assert_same_weights(weights(tmp_path / "straight/train"), weights(out_dir / "train"), 0)
    history = json.loads((out_dir / "train/metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1]
    # both runs logged into one wandb run (offline: one directory per start, same id)
    runs = sorted((out_dir / "train" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, runs
    assert len({r.name.rsplit("-", 1)[1] for r in runs}) == 1, runs


def test_submit_chain_dry_run_links_every_stage() -> None:
    proc = subprocess.run(
        [
            "bash",
            str(SUBMIT),
            "--dry-run",
            "--config",
            QUICK,
            "--teacher-config",
            QUICK,
            "--teacher-config",
            QUICK,
            "--nodes",
            "2",
            "--gpus-per-node",
            "4",
            "--partition",
            "gpu",
            "--time",
            "2:00:00",
            "--cache-shards",
            "6",
            "--cache-parallel",
            "3",
            "--",
            "run.out_dir=runs/x",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    jobs = [line.split()[:2] for line in proc.stdout.splitlines()]
    assert [s for s, _ in jobs] == [
        "train",
        "train",
        "cache",
        "verify-cache",
        "distill",
        "sparsity",
        "prune",
        "finetune",
    ], proc.stdout
    cmds = [c for c in proc.stderr.splitlines() if c.startswith("sbatch ")]
    assert len(cmds) == len(jobs)
    ids = [i for _, i in jobs]
    assert "--dependency" not in cmds[0] and "--dependency" not in cmds[1]
    assert f"--dependency=afterok:{ids[0]}:{ids[1]}" in cmds[2]
    for k in range(3, len(cmds)):
        assert f"--dependency=afterok:{ids[k - 1]}" in cmds[k], cmds[k]
    assert "--array=0-5%3" in cmds[2] and "cache_array.sbatch" in cmds[2]
    for c in cmds:
        assert "--partition=gpu" in c and "--time=2:00:00" in c and "run.out_dir=runs/x" in c
    assert "--nodes=2" in cmds[4] and "--gpus-per-node=4" in cmds[4]  # distill: 2 x 4 GPUs
    assert "--nodes=1" in cmds[6] and "--gpus-per-node=1" in cmds[6]  # prune: one process


def _stage_exists(name: str) -> bool:
    from launch.__main__ import STAGES

    return name in STAGES


@pytest.mark.skipif(
    not (_stage_exists("cache") and _stage_exists("verify-cache")),
    reason="the cache / verify-cache stages are not in launch/__main__.py STAGES yet",
)
def test_cache_array_then_verify_via_submit_chain(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    """`slurm/submit.sh --stages "cache verify-cache"`: a 2-task array writes one shard each,
    the verify job runs only after both succeed (afterok) and finds the cache complete."""
    out_dir = tmp_path / "run"
    tiny = [*SMALL, "train.loop.epochs=1", "train.loop.max_steps=2", f"run.out_dir={out_dir}"]
    run_cli("train", "--config", QUICK, *tiny)  # the teacher (cache default: run's train)
    cache_opts = ["cache.views=2", "cache.batch_size=128", "cache.verify_samples=16"]
    proc = slurm_cluster.run(
        "bash",
        str(SUBMIT),
        "--config",
        QUICK,
        "--stages",
        "cache verify-cache",
        "--cache-shards",
        "2",
        "--cache-parallel",
        "2",
        "--time",
        "5",
        "--sbatch",
        f"--output={tmp_path}/%x-%A_%a.out",
        "--",
        *tiny,
        *cache_opts,
        env_extra=JOB_ENV,
        cwd=ROOT,
        timeout=60,
    )
    jobs = dict(line.split()[:2] for line in proc.stdout.splitlines())
    assert set(jobs) == {"cache", "verify-cache"}, proc.stdout
    for stage in ("cache", "verify-cache"):
        records = slurm_cluster.wait(jobs[stage], timeout=240)
        logs = "\n".join(_out(p) for p in sorted(tmp_path.glob("*.out")))
        assert records, logs[-4000:]
        for r in records:
            assert (r.get("JobState"), r.get("ExitCode")) == ("COMPLETED", "0:0"), (
                r,
                logs[-4000:],
            )
        if stage == "cache":
            assert len(records) == 2
    logs = "\n".join(_out(p) for p in sorted(tmp_path.glob("*.out")))
    assert "shard 0 of 2" in logs and "shard 1 of 2" in logs, logs[-3000:]
    assert "verify-cache: OK" in logs, logs[-3000:]
    report = json.loads((out_dir / "cache" / "verify" / "metrics.json").read_text())
    assert report["rows"] == 1438 * 2
