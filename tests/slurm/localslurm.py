"""Client-side helpers for the local SLURM cluster (see slurm/localcluster).

Kept out of conftest.py so that tests can import ``SlurmCluster`` under one
module name (``tests.slurm.localslurm``).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
UP_SH = REPO / "slurm" / "localcluster" / "up.sh"
DOWN_SH = REPO / "slurm" / "localcluster" / "down.sh"

# Variables that would make client commands think they run inside another
# allocation (e.g. when CI itself runs in a SLURM job) or pick another cluster.
STRIP_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "SQUEUE_", "SINFO_", "SCONTROL_")
STRIP_NAMES = {"KDSLIM_SLURM_CLUSTER_DIR"}  # down.sh's daemon marker, never on clients

_KV = re.compile(r"(\w[\w/:.]*)=(\S*)")


class SlurmJobTimeout(AssertionError):
    """A job did not leave the queue in time (it has been cancelled)."""


class SlurmDaemonDied(AssertionError):
    """A daemon of the local cluster died and could not be brought back."""


DAEMONS = {  # name in messages -> (pid file under the cluster dir, program, log file)
    "slurmctld": ("run/slurmctld.pid", "slurmctld", "log/slurmctld.log"),
    "slurmd n1": ("run/slurmd.n1.pid", "slurmd", "log/slurmd.n1.log"),
    "slurmd n2": ("run/slurmd.n2.pid", "slurmd", "log/slurmd.n2.log"),
}


def run_script(script: Path, cluster_dir: Path, timeout: float, env: dict[str, str]):
    """up.sh or down.sh on `cluster_dir`, with no variable of an enclosing allocation."""
    env = {k: v for k, v in env.items() if not k.startswith(STRIP_PREFIXES)}
    env.pop("KDSLIM_SLURM_CLUSTER_DIR", None)
    return subprocess.run(
        ["bash", str(script), str(cluster_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def parse_scontrol_records(text: str) -> list[dict[str, str]]:
    """Parse ``scontrol show job -o`` output: one ``Key=Value ...`` line per job.

    Values containing spaces are cut at the first space; fine for the ids,
    states, exit codes, counters and paths the tests look at.
    """
    return [dict(_KV.findall(line)) for line in text.splitlines() if line.strip()]


def client_env(env_sh: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(STRIP_PREFIXES) and k not in STRIP_NAMES
    }
    for line in env_sh.read_text().splitlines():
        m = re.match(r"export (\w+)=(.*)$", line.strip())
        if m:
            (value,) = shlex.split(m.group(2)) or [""]
            env[m.group(1)] = value
    if "SLURM_CONF" not in env:
        raise AssertionError(f"{env_sh} does not export SLURM_CONF")
    return env


@dataclass
class SlurmCluster:
    """Handle on the running local cluster."""

    dir: Path
    env: dict[str, str]
    restarted: set[str] = field(default_factory=set)
    """Daemons restarted by `watch` during the current test (each is restarted once)."""

    # ---------------------------------------------------------------- commands
    def run(
        self,
        *cmd: str,
        timeout: float = 60,
        check: bool = True,
        env_extra: dict[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a client command (sbatch, srun, scontrol, ...) against the cluster."""
        env = {**self.env, **(env_extra or {})}
        proc = subprocess.run(
            list(cmd), env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{shlex.join(cmd)} failed (rc={proc.returncode})\n"
                f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
        return proc

    def sbatch(
        self,
        script_path: str | os.PathLike[str],
        *args: str,
        env_extra: dict[str, str] | None = None,
        script_args: Sequence[str] = (),
        cwd: str | os.PathLike[str] | None = None,
    ) -> str:
        """Submit ``script_path`` with sbatch options ``args``; return the job id.

        For a job array this is the array job id (``%A``).
        """
        out = self.run(
            "sbatch",
            "--parsable",
            *args,
            str(script_path),
            *script_args,
            env_extra=env_extra,
            cwd=cwd,
            timeout=30,
        ).stdout.strip()
        job_id = out.splitlines()[-1].split(";")[0].strip() if out else ""
        if not job_id.isdigit():
            raise AssertionError(f"cannot parse job id from sbatch --parsable output {out!r}")
        return job_id

    def job_records(self, job_id: str) -> list[dict[str, str]]:
        """``scontrol show job -o`` records (one per array task); [] once purged.

        Finished jobs stay visible for MinJobAge (60 s) after they end.
        """
        proc = self.run("scontrol", "show", "job", "-o", str(job_id), check=False, timeout=30)
        if proc.returncode != 0:
            return []
        return parse_scontrol_records(proc.stdout)

    def in_queue(self, job_id: str) -> bool:
        """True while the job (or any task of an array) is pending/running/completing."""
        proc = self.run("squeue", "-h", f"--jobs={job_id}", "-o", "%i %T", check=False, timeout=30)
        if proc.returncode != 0:
            if "Invalid job id" in proc.stderr:
                return False
            raise AssertionError(f"squeue failed: {proc.stderr}")
        return bool(proc.stdout.strip())

    def wait(self, job_id: str, timeout: float = 60, poll: float = 0.25) -> list[dict[str, str]]:
        """Wait until the job has left the queue; return its final scontrol records.

        There is no accounting DB (sacct does not work), so the final state
        comes from ``scontrol show job -o`` (kept for MinJobAge after the end)
        and otherwise from the job's own output files. A requeued job stays in
        the queue (PENDING, Reason=BeginTime) and is waited for. On timeout the
        job is cancelled and SlurmJobTimeout is raised with diagnostics.
        """
        deadline = time.monotonic() + timeout
        last: list[dict[str, str]] = []
        while True:
            self.watch()
            if not self.in_queue(job_id):
                return self.job_records(job_id) or last
            last = self.job_records(job_id) or last
            if time.monotonic() > deadline:
                self.run("scancel", str(job_id), check=False, timeout=30)
                states = [
                    {k: r.get(k) for k in ("JobId", "JobState", "Reason", "Restarts")} for r in last
                ]
                raise SlurmJobTimeout(
                    f"job {job_id} still queued after {timeout:.0f}s (cancelled it); "
                    f"last records: {states}\n{self.log_tails()}"
                )
            time.sleep(poll)

    def log_tails(self, lines: int = 20) -> str:
        parts = []
        for log in sorted((self.dir / "log").glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"----- {log} -----\n" + "\n".join(tail))
        return "\n".join(parts)

    # ---------------------------------------------------------------- daemons
    def dead_daemons(self) -> list[str]:
        """The daemons of this cluster whose pid file names no live process of theirs."""
        dead = []
        for name, (pid_file, program, _) in DAEMONS.items():
            try:
                pid = int((self.dir / pid_file).read_text().strip())
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
                state = Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0]
            except (OSError, ValueError):
                dead.append(name)
                continue
            if not comm.startswith(program) or state == "Z":
                dead.append(name)
        return dead

    def watch(self) -> None:
        """Bring a dead daemon back once per test (up.sh restarts it and returns its node to
        service), with a line in the test output; a second death, or a restart that fails,
        fails the test at once with the daemon's name and the tail of its log."""
        dead = self.dead_daemons()
        if not dead:
            return
        again = [d for d in dead if d in self.restarted]
        if again:
            raise SlurmDaemonDied(
                f"{', '.join(again)} died again after its restart in this test\n"
                + self.daemon_log_tails(again)
            )
        line = f"local SLURM: {', '.join(dead)} died; restarting and resuming its node"
        print(line, file=sys.stderr)
        warnings.warn(line, stacklevel=2)
        tails = self.daemon_log_tails(dead)  # before the restart appends to them
        proc = run_script(UP_SH, self.dir, timeout=120, env=dict(os.environ))
        self.restarted.update(dead)
        still = self.dead_daemons()
        if proc.returncode != 0 or still:
            raise SlurmDaemonDied(
                f"could not restart {', '.join(still or dead)} (up.sh rc={proc.returncode})\n"
                f"{proc.stderr[-2000:]}\n{tails}"
            )

    def daemon_log_tails(self, names: list[str], lines: int = 15) -> str:
        parts = []
        for name in names:
            log = self.dir / DAEMONS[name][2]
            text = log.read_text(errors="replace") if log.is_file() else "(no log)"
            parts.append(f"----- {name}: {log} -----\n" + "\n".join(text.splitlines()[-lines:]))
        return "\n".join(parts)

    def cancel_all(self) -> list[str]:
        """Cancel every job still in the queue (a test's leftovers); returns their ids."""
        proc = self.run("squeue", "-h", "-o", "%A", check=False, timeout=30)
        jobs = sorted(set(proc.stdout.split())) if proc.returncode == 0 else []
        if jobs:
            self.run("scancel", *jobs, check=False, timeout=30)
        return jobs
