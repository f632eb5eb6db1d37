"""Fixtures for tests that run on a real (local, two-node) SLURM cluster.

The session fixture ``slurm_cluster`` starts the cluster with
``slurm/localcluster/up.sh`` in a temp dir and stops it with ``down.sh`` at the
end of the session. Knobs (environment variables):

* ``KDSLIM_SLURM_DIR``: use this cluster dir. If a cluster is already up there
  it is reused and left running; otherwise up.sh starts one there (and the
  session stops it again unless ``KDSLIM_SLURM_KEEP=1``).
* ``KDSLIM_SLURM_KEEP=1``: do not run down.sh at the end.
* ``KDSLIM_SLURM_PORT_BASE``: ports BASE..BASE+2 (default: first free base
  from 26817 upward, so parallel sessions do not collide).

If SLURM cannot be installed or started the fixture FAILS (it never skips):
CI is supposed to have a real SLURM.

Every test on the cluster is watched (``SlurmCluster.watch``): before it starts and while it
waits on the queue, a dead ``slurmctld`` or ``slurmd`` is restarted and its node resumed, once,
with a line in the output; if that fails the test fails at once, naming the daemon with the
tail of its log. Whatever a test leaves in the queue (a failed test's jobs) is cancelled.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.slurm.localslurm import DOWN_SH, UP_SH, SlurmCluster, client_env, run_script


def _cluster_is_up(cluster_dir: Path) -> bool:
    conf = cluster_dir / "etc" / "slurm.conf"
    if not (cluster_dir / "env.sh").is_file() or not conf.is_file():
        return False
    env = client_env(cluster_dir / "env.sh")
    try:
        proc = subprocess.run(
            ["scontrol", "ping"], env=env, capture_output=True, text=True, timeout=15
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0 and "is UP" in proc.stdout


def _port_base_free(base: int) -> bool:
    for port in range(base, base + 3):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def _pick_port_base() -> str:
    if os.environ.get("KDSLIM_SLURM_PORT_BASE"):
        return os.environ["KDSLIM_SLURM_PORT_BASE"]
    for base in range(26817, 27817, 10):
        if _port_base_free(base):
            return str(base)
    pytest.fail("no free port triple found in 26817..27817 for the local SLURM cluster")


def _run_script(script: Path, cluster_dir: Path, timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if script == UP_SH:
        env["KDSLIM_SLURM_PORT_BASE"] = _pick_port_base()
    try:
        return run_script(script, cluster_dir, timeout, env)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(
            f"{script.name} {cluster_dir} timed out after {timeout}s\n"
            f"stdout:\n{exc.stdout}\nstderr:\n{exc.stderr}"
        )


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    given = os.environ.get("KDSLIM_SLURM_DIR")
    keep = os.environ.get("KDSLIM_SLURM_KEEP") == "1"
    if given and _cluster_is_up(Path(given)):
        cluster_dir, started = Path(given).resolve(), False
    else:
        cluster_dir = Path(given).resolve() if given else tmp_path_factory.mktemp("slurm")
        t0 = time.monotonic()
        # generous: on a fresh machine up.sh first apt-get installs SLURM + munge
        proc = _run_script(UP_SH, cluster_dir, timeout=900)
        if proc.returncode != 0:
            pytest.fail(
                "could not start the local SLURM cluster (slurm/localcluster/up.sh "
                f"{cluster_dir}, rc={proc.returncode}); these tests need a real SLURM "
                "(Debian packages slurmctld slurmd slurm-client munge, installed by up.sh "
                "via apt-get when missing; see up.sh's stderr below)\n"
                f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}",
                pytrace=False,
            )
        print(f"\nlocal SLURM cluster up in {time.monotonic() - t0:.1f}s at {cluster_dir}")
        started = True
    cluster = SlurmCluster(dir=cluster_dir, env=client_env(cluster_dir / "env.sh"))
    try:
        yield cluster
    finally:
        if started and not keep:
            proc = _run_script(DOWN_SH, cluster_dir, timeout=120)
            if proc.returncode != 0:
                print(f"down.sh failed (rc={proc.returncode}):\n{proc.stderr}")


@pytest.fixture(autouse=True)
def _watched_cluster(request: pytest.FixtureRequest) -> Iterator[None]:
    """Daemons alive before a cluster test, its leftover jobs cancelled after it."""
    if "slurm_cluster" not in request.fixturenames:
        yield
        return
    cluster: SlurmCluster = request.getfixturevalue("slurm_cluster")
    cluster.restarted.clear()
    cluster.watch()
    try:
        yield
    finally:
        left = cluster.cancel_all()
        if left:
            print(f"cancelled jobs left in the queue: {' '.join(left)}")
