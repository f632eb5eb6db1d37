"""Running the command line from tests: in this process, in forked workers, or as a new process.

A new interpreter spends seconds importing torch, torchvision and the rest before it does any
work, and the suite runs the CLI about a hundred times. So, as accelerate tests its own CLI:
- one process (`run_cli(...)`): `launch.cli.main(argv)` in this process, with the environment,
  working directory, signal handlers, warning filters and accelerate's singletons of a fresh
  process, stdout and stderr captured, an uncaught exception turned into its traceback on
  stderr and exit status 1, as the interpreter would;
- N processes (`run_cli(..., processes=N)` or `flags=[...]`): workers forked from this process
  (they have torch imported already, as `accelerate.debug_launcher`'s are) with the
  environment `accelerate launch` computes for its workers, one gloo group over loopback;
- `launcher="subprocess"`: the real thing, a new `python -m launch` or `accelerate launch`
  process, for the tests whose point is the process boundary (exit codes on signals, the
  launcher's handling of a dead rank, the console script) and for the N-process proofs that
  go through `accelerate launch` itself.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
STOPPING_SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(
        WANDB_MODE="disabled",
        GLOO_SOCKET_IFNAME="lo",
        ACCELERATE_USE_CPU="1",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(ROOT),
    )
    env.update(extra)
    return env


def launch_flags(processes: int) -> list[str]:
    """`accelerate launch` flags for N CPU processes on this machine (README's recipe)."""
    return [
        "--multi_gpu",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]


def cli_command(*args: str, processes: int = 1, flags: list[str] | None = None) -> list[str]:
    """`python -m launch ...`, or the same under `accelerate launch` (N CPU processes, or
    the launcher `flags` given, e.g. `--config_file F`)."""
    if processes == 1 and flags is None:
        return [PY, "-m", "launch", *args]
    flags = flags or launch_flags(processes)
    port = ["--main_process_port", str(free_port())]
    return [PY, "-m", "accelerate.commands.launch", *flags, *port, "-m", "launch", *args]


def run_cli(
    *args: str,
    processes: int = 1,
    flags: list[str] | None = None,
    timeout: float = 600,
    check: bool = True,
    env: dict | None = None,
    launcher: str = "inprocess",
) -> subprocess.CompletedProcess:
    """Run `kdslim *args` to completion; raise with its output on failure (`check`).

    `processes`, or `accelerate launch` flags (`flags`, e.g. a DeepSpeed `--config_file`),
    make it a multi-process run. `timeout` bounds new processes and forked ranks; a run in
    this process is bounded by the test's own time limit (pytest-timeout). `launcher`:
    "inprocess" (this process, or workers forked from it with the environment `accelerate
    launch` would give them) or "subprocess" (a real `python -m launch`, or a real
    `accelerate launch`).
    """
    env = env or cli_env()
    multi = processes > 1 or flags is not None
    if launcher == "inprocess":
        if multi:
            proc = _forked(list(args), flags or launch_flags(processes), env, timeout)
        else:
            proc = _in_process(list(args), env)
    else:
        assert launcher == "subprocess", launcher
        cmd = cli_command(*args, processes=processes, flags=flags)
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"kdslim {' '.join(args)} ({launcher}, {flags or processes}) exited "
            f"{proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
            f"\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def assert_one_line_error(proc: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    """What bad input must give: exit status `code`, no traceback, one `error: ` line, and
    each of `needles` in what it says."""
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-2000:]
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr[-2000:])


def _main(argv: list[str]) -> int:
    """`launch.cli.main` as the interpreter runs it: an uncaught exception prints its
    traceback on stderr and makes the exit status 1."""
    from launch.cli import main

    try:
        return main(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    except Exception:
        traceback.print_exc()
        return 1


def _reset_accelerate() -> None:
    """accelerate keeps its state in process-wide singletons: a new process starts without."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _fresh_warnings() -> None:
    """Python's default filters, each warning printed on (this call's) stderr: pytest records
    warnings instead, and a warning seen by an earlier run must show again, as it would in a
    new process."""
    warnings.resetwarnings()
    warnings.simplefilter("default")
    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
        warnings.simplefilter("ignore", category)

    def show(message, category, filename, lineno, file=None, line=None):
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    warnings.showwarning = show


@contextlib.contextmanager
def _as_a_new_process(env: dict):
    """Environment, working directory, signal handlers, torch's global switches and
    accelerate's state as a new process would have them; all restored afterwards."""
    saved_env, cwd = dict(os.environ), os.getcwd()
    handlers = {s: signal.getsignal(s) for s in STOPPING_SIGNALS}
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    os.environ.clear()
    os.environ.update(env)
    os.chdir(ROOT)
    _reset_accelerate()
    try:
        with warnings.catch_warnings():
            _fresh_warnings()
            yield
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(cwd)
        for s, h in handlers.items():
            signal.signal(s, h)
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        _reset_accelerate()


def _in_process(argv: list[str], env: dict) -> subprocess.CompletedProcess:
    out, err = io.StringIO(), io.StringIO()
    with _as_a_new_process(env), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = _main(argv)
    return subprocess.CompletedProcess(["kdslim", *argv], code, out.getvalue(), err.getvalue())


def _forked(
    argv: list[str], flags: list[str], env: dict, timeout: float
) -> subprocess.CompletedProcess:
    """The ranks of one gloo group, forked from this process, each with the environment
    `accelerate launch FLAGS` prepares for its workers (accelerate's own parser and
    `prepare_*_env`, DeepSpeed configs included) and the rank variables torchrun adds. As the
    launcher does, the first rank to fail brings the others down (after a grace period in
    which they may finish or fail on their own), so a dead rank never leaves a hang."""
    launch_env, processes = _accelerate_env(flags, env)
    logs = Path(tempfile.mkdtemp(prefix="kdslim-ranks-"))
    pids = {}
    sys.stdout.flush()
    sys.stderr.flush()
    for rank in range(processes):
        rank_env = {
            **launch_env,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(processes),
            "LOCAL_WORLD_SIZE": str(processes),
            "GROUP_RANK": "0",
        }
        pid = os.fork()
        if pid == 0:  # the worker: never returns into pytest
            code = 1
            try:
                _become_worker(logs / f"{rank}", rank_env)
                code = _main(argv)
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        pids[pid] = rank
    codes = _wait_for_ranks(pids, timeout)
    out = "".join((logs / f"{r}.out").read_text() for r in range(processes))
    err = "".join((logs / f"{r}.err").read_text() for r in range(processes))
    failed = [c for c in codes if c != 0]
    return subprocess.CompletedProcess(["kdslim", *argv], failed[0] if failed else 0, out, err)


def _accelerate_env(flags: list[str], env: dict) -> tuple[dict, int]:
    """What `accelerate launch FLAGS -m launch` puts in its workers' environment, computed
    by accelerate's own code under `env`; and the number of processes it would start."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    port = ["--main_process_port", str(free_port())]
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        parsed = launch_command_parser().parse_args([*flags, *port, "-m", "launch"])
        parsed, defaults, mp_from_config = _validate_launch_command(parsed)
        if parsed.use_deepspeed and not parsed.cpu:  # as accelerate's `launch_command`
            fields = list(defaults.deepspeed_config) if defaults else []
            parsed.deepspeed_fields_from_accelerate_config = ",".join(
                [*fields, "mixed_precision"] if mp_from_config else fields
            )
            _, launch_env = prepare_deepspeed_cmd_env(parsed)
        else:
            launch_env = prepare_multi_gpu_env(parsed)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    launch_env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(parsed.main_process_port))
    return launch_env, int(parsed.num_processes)


def _become_worker(log: Path, env: dict) -> None:
    """Point fds 1 and 2 at this rank's files, take its environment and a new process's
    state; no handler of pytest's survives into the worker."""
    for fd, suffix in ((1, ".out"), (2, ".err")):
        f = os.open(f"{log}{suffix}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - the worker's own
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    for s in (*STOPPING_SIGNALS, signal.SIGALRM):
        signal.signal(s, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(ROOT)
    _reset_accelerate()
    _fresh_warnings()


GRACE_S = 20
"""How long the other ranks may take to finish or fail on their own after one rank failed."""


def _wait_for_ranks(pids: dict[int, int], timeout: float) -> list[int]:
    codes: dict[int, int] = {}
    deadline, failed_at = time.monotonic() + timeout, None
    try:
        while len(codes) < len(pids):
            for pid, rank in pids.items():
                if rank in codes:
                    continue
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    codes[rank] = os.waitstatus_to_exitcode(status)
                    if codes[rank] != 0 and failed_at is None:
                        failed_at = time.monotonic()
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError(f"forked ranks still running after {timeout} s")
            if failed_at is not None and now - failed_at > GRACE_S:
                break  # a rank failed and the others wait on it: stop them
            time.sleep(0.02)
    finally:
        for pid, rank in pids.items():
            if rank not in codes:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                codes[rank] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    return [codes[r] for r in sorted(codes)]
