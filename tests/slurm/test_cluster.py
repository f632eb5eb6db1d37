"""Real jobs on the local two-node SLURM cluster (slurm/localcluster).

These check the SLURM behaviour the launcher relies on: multi-node steps,
throttled job arrays, and the signal -> requeue -> restart cycle.
"""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from tests.slurm.localslurm import SlurmCluster, SlurmDaemonDied

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.timeout(600),  # the first test also starts the cluster (up.sh may apt-get it)
]


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\n" + textwrap.dedent(body).lstrip())
    path.chmod(0o755)
    return path


def _assert_completed(records: list[dict[str, str]], n: int = 1) -> None:
    assert len(records) == n, records
    for r in records:
        assert r.get("JobState") == "COMPLETED", r
        assert r.get("ExitCode") == "0:0", r


def test_cluster_has_two_idle_nodes(slurm_cluster: SlurmCluster) -> None:
    out = slurm_cluster.run("sinfo", "-h", "-N", "-p", "debug", "-o", "%N %t").stdout
    nodes = dict(line.split() for line in out.splitlines())
    assert set(nodes) == {"n1", "n2"}, out
    assert all(s in {"idle", "mix", "alloc"} for s in nodes.values()), out


def test_srun_two_nodes_sees_node_ids_0_and_1(slurm_cluster: SlurmCluster) -> None:
    proc = slurm_cluster.run(
        "srun",
        "-N2",
        "--ntasks-per-node=1",
        "bash",
        "-c",
        'echo "$SLURM_NODEID $SLURMD_NODENAME $SLURM_NNODES"',
        timeout=60,
    )
    rows = sorted(line.split() for line in proc.stdout.splitlines() if line.strip())
    assert rows == [["0", "n1", "2"], ["1", "n2", "2"]], proc.stdout + proc.stderr


def test_batch_job_on_two_nodes(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    script = _script(
        tmp_path / "two.sh",
        """
        #SBATCH --nodes=2
        #SBATCH --ntasks-per-node=1
        #SBATCH --output=two.out
        echo "batch $SLURM_JOB_NUM_NODES $SLURM_JOB_NODELIST"
        srun bash -c 'echo "task $SLURM_PROCID $SLURM_NODEID $SLURMD_NODENAME"'
        """,
    )
    job = slurm_cluster.sbatch(script, f"--chdir={tmp_path}")
    _assert_completed(slurm_cluster.wait(job, timeout=60))
    lines = (tmp_path / "two.out").read_text().splitlines()
    assert "batch 2 n[1-2]" in lines, lines
    tasks = sorted(line.split()[1:] for line in lines if line.startswith("task "))
    assert tasks == [["0", "0", "n1"], ["1", "1", "n2"]], lines


def test_job_array_throttled(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    script = _script(
        tmp_path / "array.sh",
        """
        #SBATCH --array=0-3%2
        #SBATCH --output=array_%A_%a.out
        t0=$(date +%s.%N)
        sleep 1
        ids="$SLURM_ARRAY_TASK_ID $SLURM_ARRAY_TASK_COUNT $SLURM_ARRAY_JOB_ID"
        echo "$ids $t0 $(date +%s.%N)" > "task_${SLURM_ARRAY_TASK_ID}.txt"
        """,
    )
    job = slurm_cluster.sbatch(script, f"--chdir={tmp_path}")
    _assert_completed(slurm_cluster.wait(job, timeout=90), n=4)

    spans = []
    for task in range(4):
        f = tmp_path / f"task_{task}.txt"
        assert f.is_file(), sorted(p.name for p in tmp_path.iterdir())
        task_id, count, array_job, start, end = f.read_text().split()
        assert (task_id, count, array_job) == (str(task), "4", job)
        spans.append((float(start), float(end)))
    # %2: never more than two tasks at the same time
    for start, _ in spans:
        running = sum(s <= start < e for s, e in spans)
        assert running <= 2, spans


REQUEUE_SCRIPT = """
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=requeue.out
{extra}
now() {{ date +%s.%N; }}
echo "start restart_count=${{SLURM_RESTART_COUNT:-unset}} t=$(now)"
if [ "${{SLURM_RESTART_COUNT:-0}}" -ge 1 ]; then
    echo "$SLURM_RESTART_COUNT $(now)" > restarted
    echo "resumed"
    exit 0
fi
on_usr2() {{
    now > marker
    echo "got USR2 t=$(cat marker)"
    kill "$child" 2>/dev/null
    scontrol requeue "$SLURM_JOB_ID"
    echo "requeue rc=$?"
    exit 0
}}
trap on_usr2 USR2
sleep 600 &
child=$!
touch ready
wait "$child"
echo "sleep ended without USR2"
exit 1
"""


def _check_requeued(cluster: SlurmCluster, tmp_path: Path, job: str, records) -> float:
    """Common assertions; returns seconds from USR2 to the restarted run."""
    out = (tmp_path / "requeue.out").read_text()
    _assert_completed(records)
    assert records[0].get("Restarts") == "1", records
    assert (tmp_path / "marker").is_file(), out
    restart_count, t_restart = (tmp_path / "restarted").read_text().split()
    assert restart_count == "1", out
    # --open-mode=append: both runs in one file; the first run saw no restart count
    assert out.count("start restart_count=") == 2, out
    assert "start restart_count=unset" in out, out
    assert "start restart_count=1" in out, out
    assert "resumed" in out, out
    return float(t_restart) - float((tmp_path / "marker").read_text())


def test_requeue_cycle_via_batch_signal(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """USR2 to the batch shell (as --signal=B:USR2 would) -> requeue -> restart."""
    script = _script(
        tmp_path / "requeue.sh", REQUEUE_SCRIPT.format(extra="#SBATCH --signal=B:USR2@100")
    )
    job = slurm_cluster.sbatch(script, f"--chdir={tmp_path}")
    deadline = time.monotonic() + 30
    while not (tmp_path / "ready").exists():
        assert time.monotonic() < deadline, f"job {job} did not start\n{slurm_cluster.log_tails()}"
        time.sleep(0.1)
    t0 = time.monotonic()
    slurm_cluster.run("scancel", "--signal=USR2", "--batch", job)
    records = slurm_cluster.wait(job, timeout=60)
    total = time.monotonic() - t0
    delay = _check_requeued(slurm_cluster, tmp_path, job, records)
    print(f"\nrequeue cycle: USR2 -> restarted run {delay:.1f}s, signal -> job gone {total:.1f}s")
    # BeginTime of a requeued job = requeue time + AuthInfo cred_expire (5 s here)
    assert delay < 30, "requeue hold longer than expected: is cred_expire set?"


@pytest.mark.extended  # the batch-signal cycle above proves the requeue cycle
def test_requeue_cycle_via_time_limit_signal(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    """The real path: --time=2 with --signal=B:USR2@100 fires ~20-50 s after start.

    slurmctld checks time limits about every 30 s, so the signal comes late
    by up to that much; the 100 s margin keeps it well before the limit.
    """
    script = _script(
        tmp_path / "requeue.sh",
        REQUEUE_SCRIPT.format(extra="#SBATCH --time=2\n#SBATCH --signal=B:USR2@100"),
    )
    t0 = time.monotonic()
    job = slurm_cluster.sbatch(script, f"--chdir={tmp_path}")
    records = slurm_cluster.wait(job, timeout=150)
    total = time.monotonic() - t0
    delay = _check_requeued(slurm_cluster, tmp_path, job, records)
    print(f"\ntime-limit signal: submit -> done {total:.1f}s, USR2 -> restarted run {delay:.1f}s")


def test_no_sacct_but_scontrol_keeps_finished_jobs(slurm_cluster: SlurmCluster) -> None:
    """Documents the setup: no accounting DB, finished jobs visible via scontrol."""
    proc = slurm_cluster.run(
        "sbatch", "--parsable", "--output=/dev/null", "--wrap=exit 3", timeout=30
    )
    job = proc.stdout.strip().split(";")[0]
    records = slurm_cluster.wait(job, timeout=30)
    assert [(r["JobState"], r["ExitCode"]) for r in records] == [("FAILED", "3:0")]
    sacct = subprocess.run(
        ["sacct", "-j", job, "-n"], env=slurm_cluster.env, capture_output=True, text=True
    )
    assert job not in sacct.stdout


def test_a_slurmd_killed_mid_job_is_restarted_and_the_cluster_goes_on(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    """What Debian's slurmd 22.05 once did mid-suite (glibc "double free" abort in a thread
    exit): the node went DOWN and every later test waited on it until its time limit. The
    watch restarts the dead daemon once, its node returns to service, and jobs run again."""
    script = _script(
        tmp_path / "busy.sh",
        """
        #SBATCH --nodes=2
        #SBATCH --output=busy.out
        srun bash -c 'sleep 6; echo "task $SLURM_NODEID"'
        """,
    )
    job = slurm_cluster.sbatch(script, f"--chdir={tmp_path}", "--time=2")
    deadline = time.monotonic() + 60
    while "RUNNING" not in {r.get("JobState") for r in slurm_cluster.job_records(job)}:
        assert time.monotonic() < deadline, slurm_cluster.job_records(job)
        time.sleep(0.2)
    pid = int((slurm_cluster.dir / "run" / "slurmd.n1.pid").read_text())
    os.kill(pid, signal.SIGABRT)
    while slurm_cluster.dead_daemons() != ["slurmd n1"]:
        assert time.monotonic() < deadline, slurm_cluster.dead_daemons()
        time.sleep(0.1)
    with pytest.warns(UserWarning, match="slurmd n1 died; restarting"):
        slurm_cluster.wait(job, timeout=120)  # the job may end either way; the queue moves
    assert slurm_cluster.restarted == {"slurmd n1"} and slurm_cluster.dead_daemons() == []
    again = slurm_cluster.sbatch(
        _script(tmp_path / "after.sh", "srun hostname\n"), "-N2", f"--chdir={tmp_path}"
    )
    _assert_completed(slurm_cluster.wait(again, timeout=90))
    # a second death in the same test is not papered over: it fails, naming the daemon
    os.kill(int((slurm_cluster.dir / "run" / "slurmd.n1.pid").read_text()), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while slurm_cluster.dead_daemons() != ["slurmd n1"]:
        assert time.monotonic() < deadline, slurm_cluster.dead_daemons()
        time.sleep(0.1)
    with pytest.raises(SlurmDaemonDied, match=r"slurmd n1 died again[\s\S]*slurmd\.n1\.log"):
        slurm_cluster.watch()
    slurm_cluster.restarted.clear()
    slurm_cluster.watch()  # back for the next test
    assert slurm_cluster.dead_daemons() == []
