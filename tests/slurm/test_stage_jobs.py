"""The real `slurm/` scripts on the local two-node cluster: multi-node DDP, preemption ->
requeue -> resume, the cache job array and the dependency chain of `slurm/submit.sh`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli
from tests.equivalence import EXACT, F64, assert_same_weights, weights
from tests.slurm.localslurm import SlurmCluster
from tests.test_pipeline import TINY
from tests.test_train import SMALL, T

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.timeout(600),  # the first test also starts the cluster (up.sh may apt-get it)
]

STAGE = ROOT / "slurm" / "stage.sbatch"
SUBMIT = ROOT / "slurm" / "submit.sh"
VENV = str(Path(sys.executable).parent.parent)
QUICK = str(ROOT / "tests/configs/base.yaml")
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


# What a preemption must not look like (issue 16 point 5): the elastic agent's traceback for
# ranks that exit non-zero, srun's error per task, wandb's dead-socket errors.
NOISE = ("Traceback", "ChildFailedError", "SignalException", "srun: error", "ConnectionResetError")
# SLURM's own notice when a job is requeued while its batch shell still runs (an external
# `scontrol requeue` always; the batch shell's own requeue when it races the shell's exit)
REQUEUE_NOTICE = re.compile(
    r"slurmstepd-\S+: error: \*\*\* (JOB|STEP) \S+ ON \S+ CANCELLED AT \S+"
    r" DUE TO JOB REQUEUE \*\*\*"
)


def _resumed_at(out: str) -> int:
    assert "resumed from" in out, out[-4000:]
    return int(out.split("resumed from")[1].split("(step ")[1].split(",")[0])


def _assert_clean(out: str) -> None:
    """No traceback, no srun error; the only `error` lines are SLURM's requeue notice."""
    for noise in NOISE:
        assert noise not in out, f"{noise!r} in the job's output:\n{out[-6000:]}"
    errors = [line for line in out.splitlines() if "error" in line.lower()]
    assert all(REQUEUE_NOTICE.fullmatch(line) for line in errors), errors


def _assert_preempted_once(out: str, step: int) -> None:
    """One line for the user, printed once per preemption by the batch shell, and the step's
    exit status as the batch shell records it: 75 (stopped after a checkpoint), not 1."""
    said = [line for line in out.splitlines() if "preempted" in line]
    assert said == [f"preempted at step {step}, checkpoint saved, requeued"], said
    assert f"step exit status 75: stopped after a checkpoint at step {step}" in out, out[-4000:]


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
    m2 = json.loads((tmp_path / "two" / T / "metrics.json").read_text())
    m1 = json.loads((tmp_path / "one" / T / "metrics.json").read_text())
    assert (m1["world_size"], m2["world_size"]) == (1, 2)
    # float64: only summation order differs (tests/equivalence.py derives the bound)
    assert_same_weights(weights(tmp_path / "one" / T), weights(tmp_path / "two" / T), EXACT)
    assert m1["last"]["test_num_samples"] == m2["last"]["test_num_samples"] == 359


PREEMPTIBLE = [  # 12 steps, a checkpoint every 2: room to stop and resume mid-run
    "train",
    "--config",
    QUICK,
    "logging.progress=false",
    "train.loop.epochs=1",
    "train.loop.max_steps=12",
    "train.loop.checkpoint_every_steps=2",
    "train.loop.keep_checkpoints=1",
]


def _sbatch_train(
    cluster: SlurmCluster, args: list[str], out_dir: Path, log: Path, nodes: str, limit: str
) -> str:
    """stage.sbatch running `args` into `out_dir` with wandb offline, its output in `log`."""
    return cluster.sbatch(
        STAGE,
        nodes,
        limit,
        f"--output={log}",
        env_extra={**JOB_ENV, "WANDB_MODE": "offline"},
        script_args=[*args, f"run.out_dir={out_dir}"],
        cwd=ROOT,
    )


def test_usr2_requeue_resume_equals_uninterrupted(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    """USR2 to the batch shell (what --signal=B:USR2@120 sends before the time limit) ->
    every rank checkpoints and stops -> `scontrol requeue` -> the job restarts, resumes from
    the checkpoint into the same wandb run, and ends with the weights of an uninterrupted run.
    """
    args = PREEMPTIBLE
    out_dir, log = tmp_path / "pre", tmp_path / "pre.out"
    job = _sbatch_train(slurm_cluster, args, out_dir, log, "-N2", "--time=5")
    _wait_for_checkpoint(slurm_cluster, job, out_dir / T / "checkpoints", log)
    t0 = time.monotonic()
    slurm_cluster.run("scancel", "--signal=USR2", "--batch", job)
    # the uninterrupted reference: the same two-rank gloo DDP, launched locally
    run_cli(*args, f"run.out_dir={tmp_path / 'straight'}", processes=2)
    records = slurm_cluster.wait(job, timeout=240)
    print(f"\nUSR2 -> requeued run finished: {time.monotonic() - t0:.1f}s")
    out = _out(log)
    _done(records, restarts="1")
    assert "restart 1:" in out, out[-4000:]
    resumed_at = _resumed_at(out)
    assert 2 <= resumed_at < 12, "the run was not interrupted mid-training"
    # a clean preemption looks clean: one line, 75 kept, no traceback or srun error
    _assert_preempted_once(out, resumed_at)
    _assert_clean(out)
    assert_same_weights(weights(tmp_path / "straight" / T), weights(out_dir / T), 0)
    history = json.loads((out_dir / T / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1]
    # both runs logged into one wandb run (offline: one directory per start, same id)
    runs = sorted((out_dir / T / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, runs
    assert len({r.name.rsplit("-", 1)[1] for r in runs}) == 1, runs


def _wait_in_queue(cluster: SlurmCluster, job: str, log: Path, what: str, done, limit_s: int):
    """Poll `done()` while the job is queued; fail with its log if it ends or `limit_s` passes."""
    deadline = time.monotonic() + limit_s
    while not done():
        assert cluster.in_queue(job), f"job ended before {what}\n{_out(log)}"
        assert time.monotonic() < deadline, f"no {what} in {limit_s} s\n{_out(log)}"
        time.sleep(0.1)


def _wait_for_checkpoint(cluster: SlurmCluster, job: str, ckpts: Path, log: Path) -> None:
    _wait_in_queue(cluster, job, log, "checkpoint", lambda: any(ckpts.glob("ckpt-*")), 180)


def _elapsed_s(cluster: SlurmCluster, job: str) -> int:
    """The job's run time so far (squeue %M: [D-][H:]M:SS)."""
    text = cluster.run("squeue", "-h", "-j", job, "-o", "%M").stdout.strip()
    days, _, hms = text.rpartition("-")
    seconds = 0
    for part in hms.split(":"):
        seconds = 60 * seconds + int(part)
    return seconds + 86400 * int(days or 0)


@pytest.mark.extended  # the USR2 requeue test proves this path in the fast tier
@pytest.mark.timeout(900)
def test_time_limit_signal_checkpoints_requeues_and_resumes(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    """The real path of stage.sbatch's own `--signal=B:USR2@120`: slurmctld sends USR2 to the
    batch shell once less than 120 s are left. The time limit is cut to bring that moment
    near (slurmctld checks every ~30 s), and raised again once the job is requeued so the
    restart runs to the end. One process, no launcher; wandb offline (its service, a child of
    the training process, also gets the wrapper's USR2 and must ignore it)."""
    args = [
        "train",
        "--config",
        QUICK,
        "logging.progress=false",
        "train.loop.epochs=25",  # 20 steps each: 500, >= 50 s of training on 2 idle cores
        "train.loop.checkpoint_every_steps=20",
        "train.loop.keep_checkpoints=1",
    ]
    out_dir, log = tmp_path / "tl", tmp_path / "tl.out"
    job = _sbatch_train(slurm_cluster, args, out_dir, log, "-N1", "--time=10")
    _wait_for_checkpoint(slurm_cluster, job, out_dir / T / "checkpoints", log)
    # whole minutes leaving between 60 and 120 s: USR2 at the next time-limit check
    minutes = (_elapsed_s(slurm_cluster, job) + 120) // 60
    slurm_cluster.run("scontrol", "update", f"JobId={job}", f"TimeLimit={minutes}")
    t0 = time.monotonic()
    _wait_in_queue(
        slurm_cluster, job, log, "preemption", lambda: "preempted at step" in _out(log), 120
    )
    print(f"\ntime limit cut -> preempted and requeued: {time.monotonic() - t0:.1f}s")
    slurm_cluster.run("scontrol", "update", f"JobId={job}", "TimeLimit=10")
    records = slurm_cluster.wait(job, timeout=300)
    out = _out(log)
    _done(records, restarts="1")
    assert "USR2: asking the training step to checkpoint and stop" in out, out[-4000:]
    resumed_at = _resumed_at(out)
    assert 20 <= resumed_at < 500, "the run was not interrupted mid-training"
    _assert_preempted_once(out, resumed_at)
    _assert_clean(out)
    assert json.loads((out_dir / T / "metrics.json").read_text())["history"][-1]["epoch"] == 25


@pytest.mark.extended  # the USR2 requeue test proves the requeue path in the fast tier
def test_scontrol_requeue_with_wandb_offline_is_clean(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    """`scontrol requeue JOB`: SLURM itself sends TERM to every process of the job (wandb's
    service included, which exits at once) and KILL after KillWait (5 s here, 30 s by
    default), then starts the job again. The ranks checkpoint if they can in that time; no
    traceback (elastic agent, wandb's ConnectionResetError) either way, and the restarted
    job resumes into the same wandb run and completes."""
    args = PREEMPTIBLE
    out_dir, log = tmp_path / "rq", tmp_path / "rq.out"
    job = _sbatch_train(slurm_cluster, args, out_dir, log, "-N2", "--time=5")
    _wait_for_checkpoint(slurm_cluster, job, out_dir / T / "checkpoints", log)
    slurm_cluster.run("scontrol", "requeue", job)
    records = slurm_cluster.wait(job, timeout=240)
    out = _out(log)
    _done(records, restarts="1")
    assert "TERM from SLURM" in out and "restart 1:" in out, out[-4000:]
    resumed_at = _resumed_at(out)
    assert 2 <= resumed_at < 12, "the run was not interrupted mid-training"
    _assert_clean(out)
    # the batch shell had KillWait seconds to tell; if it did, it told the truth
    said = [line for line in out.splitlines() if "preempted" in line]
    assert said in ([], [f"preempted at step {resumed_at}, checkpoint saved, requeued"]), said
    history = json.loads((out_dir / T / "metrics.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1]
    runs = sorted((out_dir / T / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({r.name.rsplit("-", 1)[1] for r in runs}) == 1, runs


def _submit(*args: str, cluster: SlurmCluster | None = None, cwd: Path = ROOT):
    cmd = ["bash", str(SUBMIT), *args]
    if cluster is None:
        return subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=cwd)
    return cluster.run(*cmd, env_extra=JOB_ENV, cwd=cwd, timeout=120)


def test_submit_dry_run_submits_exactly_the_plan() -> None:
    """One sbatch per node of `python -m launch plan` (teacher members and seeds included),
    each waiting for the jobs it reads from; the cache as an array."""
    overrides = ["--", "run.out_dir=runs/x", *TINY]
    proc = _submit(
        "--dry-run",
        "--config",
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
        *overrides,
    )
    jobs = dict(line.split()[:2] for line in proc.stdout.splitlines())
    plan = json.loads(
        subprocess.run(
            [sys.executable, "-m", "launch", "plan", "--config", QUICK, *overrides[1:]],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        ).stdout
    )["jobs"]
    assert list(jobs) == [j["name"] for j in plan]
    cmds = {c.split("--job-name=kdslim-")[1].split()[0]: c for c in proc.stderr.splitlines()}
    assert len(cmds) == len(plan)
    for job in plan:
        cmd = cmds[job["name"].replace(":", "-")]
        if job["after"]:
            ids = ":".join(jobs[a] for a in job["after"])
            assert f"--dependency=afterok:{ids}" in cmd, cmd
        else:
            assert "--dependency" not in cmd, cmd
        assert "--partition=gpu" in cmd and "--time=2:00:00" in cmd and "run.out_dir=runs/x" in cmd
    assert "--array=0-5%3" in cmds["cache"] and "cache_array.sbatch" in cmds["cache"]
    assert "--nodes=2" in cmds["distill-seed1"] and "--gpus-per-node=4" in cmds["distill-seed1"]
    assert "--nodes=1" in cmds["prune"] and "--gpus-per-node=1" in cmds["prune"]
    assert "stage.sbatch train:cifar_resnet20-s1 --config" in cmds["train-cifar_resnet20-s1"]


def test_cache_array_then_verify_via_submit_chain(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    """`slurm/submit.sh --stages "cache verify-cache"`: a 2-task array writes one shard each,
    the verify job runs only after both succeed (afterok) and finds the cache complete."""
    out_dir = tmp_path / "run"
    tiny = [*SMALL, "train.loop.epochs=1", "train.loop.max_steps=2", f"run.out_dir={out_dir}"]
    run_cli("train", "--config", QUICK, *tiny)  # the teacher (cache default: run's train)
    cache_opts = ["cache.views=2", "cache.batch_size=128", "cache.verify_samples=16"]
    proc = _submit(
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
        f"--sbatch=--output={tmp_path}/%x-%A_%a.out",
        "--",
        *tiny,
        *cache_opts,
        cluster=slurm_cluster,
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
    report = json.loads((out_dir / "verify-cache" / "metrics.json").read_text())
    assert report["rows"] == 1294 * 2


@pytest.mark.extended  # the cache -> verify chain runs submit.sh in the fast tier
@pytest.mark.timeout(1200)
def test_whole_chain_on_two_nodes_reports_like_the_pipeline(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    """`slurm/submit.sh` with no --stages: every node of the graph as a job on the two-node
    cluster, in dependency order; the report has the pipeline's fields, and slimming starts
    from the KD student (the bug this replaced: it pruned the teacher)."""
    out_dir = tmp_path / "chain"
    proc = _submit(
        "--config",
        QUICK,
        "--nodes",
        "2",
        "--time",
        "10",
        "--cache-shards",
        "2",
        f"--sbatch=--output={tmp_path}/%x-%j.out",
        "--",
        f"run.out_dir={out_dir}",
        *TINY,
        cluster=slurm_cluster,
    )
    jobs = dict(line.split()[:2] for line in proc.stdout.splitlines())
    assert "report" in jobs and "sparsity" in jobs and "distill-ce:seed1" in jobs, proc.stdout
    records = slurm_cluster.wait(jobs["report"], timeout=900)
    logs = "\n".join(_out(p) for p in sorted(tmp_path.glob("*.out")))
    _done(records) if records else pytest.fail(logs[-4000:])
    chain = json.loads((out_dir / "report" / "report.json").read_text())
    local = tmp_path / "local"
    run_cli("pipeline", "--config", QUICK, f"run.out_dir={local}", *TINY, timeout=900)
    pipe = json.loads((local / "report" / "report.json").read_text())

    def keys(d, prefix=""):
        if not isinstance(d, dict):
            return set()
        return {prefix + k for k in d} | {
            x for k, v in d.items() for x in keys(v, f"{prefix}{k}.") if k != "per_layer"
        }

    assert keys(chain) == keys(pipe)
    assert chain["slim"]["model"] == "distill:seed0"
    sparsity_in = json.loads((out_dir / "sparsity" / "key.json").read_text())["inputs"]["model"]
    distill_key = json.loads((out_dir / "distill" / "seed0" / "key.json").read_text())["key"]
    assert sparsity_in == distill_key
    assert chain["student_kd"]["n"] == 2 and len(chain["teachers"]) == 2
    assert chain["export"]["ok"]
