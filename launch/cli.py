"""kdslim command line: `main(argv) -> exit status`, in process (the console script, `python
-m launch` and the tests call it; nothing here exits the interpreter).

    python -m launch STAGE[:INSTANCE] --config FILE [dotted.key=value ...]
    python -m launch pipeline --config FILE [...]     # every stage of the run, in order
    python -m launch plan --config FILE [--stages A,B] [...]   # the run as scheduler jobs
    python -m launch models
    python -m launch verify-cache --cache DIR                # a cache someone handed you
    python -m launch predict DIR IMAGE... [--model int8]     # an export directory alone
    python -m launch measure DIR [--threads N] [--json]

Also runs under `accelerate launch [flags] -m launch ...`: every process parses the same
arguments and finds its rank from the environment accelerate sets. The stages and their help
come from the stage graph (`launch.graph.STAGES`).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
from pathlib import Path

from launch.graph import STAGES

COMMANDS = {
    "pipeline": "the whole run: every stage in order, skipping the complete ones",
    "plan": "print the run as jobs with their dependencies (JSON; slurm/submit.sh submits it)",
    "models": "list the registered model names",
    "predict": "DIR IMAGE...: the classes of image files, by an export directory alone",
    "measure": "DIR: size, peak memory, latency and accuracy of an export, on this machine",
}
EXPORT_COMMANDS = ("predict", "measure")
"""Commands that read an export directory alone: no --config, no training setup."""
EXIT_PREEMPTED = 75
"""Exit status of a stage stopped by SIGUSR2/SIGTERM after saving a checkpoint (EX_TEMPFAIL)."""
EXIT_INTERRUPTED = 130
"""Exit status after Ctrl-C (128 + SIGINT, what a shell reports for it)."""
PREEMPT_FILE_ENV = "KDSLIM_PREEMPT_FILE"
"""Set by slurm/lib.sh: a preempted rank writes its step there and exits 0 (see `preempted`)."""


def parse(argv: list[str]) -> argparse.Namespace:
    stages = "\n".join(f"  {s.name:<13} {s.help}" for s in STAGES)
    commands = "\n".join(f"  {k:<13} {v}" for k, v in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="kdslim",
        description="Distil a teacher ensemble into a small student, then slim it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"stages (STAGE runs all its instances, STAGE:INSTANCE one):\n{stages}\n\n"
        f"commands:\n{commands}\n\nexample: kdslim train --config configs/quickstart.yaml "
        "train.loop.epochs=3\n(`python -m launch` is the same command)",
    )
    parser.add_argument("target", metavar="STAGE|COMMAND", help="a stage or a command below")
    parser.add_argument("--config", "-c", help="YAML run configuration (see configs/)")
    parser.add_argument("--stages", help="plan: a comma-separated subset of the run's stages")
    parser.add_argument(
        "--cache",
        metavar="DIR",
        help="verify-cache: check this cache directory alone, with no --config (re-scoring "
        "needs the data and teachers at the paths its manifest records)",
    )
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    """`kdslim ...` (the console script) and `python -m launch ...`."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in EXPORT_COMMANDS:
        return export_command(argv[0], argv[1:])
    try:
        args = parse(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed by argparse
        return e.code if isinstance(e.code, int) else 2
    if args.target == "models":
        from common.models import list_models

        print("\n".join(list_models()))
        print("tv_<name>: any torchvision classifier (model.pretrained: torchvision weights name)")
        print("timm_<name>: any timm model (model.pretrained: DEFAULT or a timm pretrained tag)")
        return 0

    from common.config import load_config
    from common.errors import KdslimError
    from common.trainer import Preempted
    from launch.config import Config

    try:
        if args.cache is not None:
            return verify_directory(args)
        cfg = load_config(Config, args.config, args.overrides)
        if args.target == "plan":
            from launch.plan import plan

            stages = args.stages.split(",") if args.stages else None
            config = str(Path(args.config).resolve()) if args.config else None
            print(json.dumps(plan(cfg, config, args.overrides, stages), indent=1))
            return 0
        return run(cfg, args.target)
    except KdslimError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # a file that cannot be read or written: its path is in the message
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        hint = "; free space there, then run the same command again to resume" if full else ""
        print(f"error: {e}{hint}", file=sys.stderr)
        return 1
    except Preempted as e:
        if e.signum == signal.SIGINT:
            return interrupted(f"interrupted at step {e.step}, checkpoint saved")
        return preempted(e.step)
    except KeyboardInterrupt:
        return interrupted("interrupted; the checkpoints already written are kept")


def interrupted(what: str) -> int:
    """Ctrl-C: one line (rank 0), and the shell's status for SIGINT."""
    if os.environ.get("RANK", "0") == "0":
        print(f"{what}; run the same command again to resume", file=sys.stderr)
    return EXIT_INTERRUPTED


def preempted(step: int) -> int:
    """The exit status of a stage stopped after its checkpoint at `step`.

    Under slurm/lib.sh ($KDSLIM_PREEMPT_FILE set): write the step there and exit 0, so that
    the launcher's elastic agent and srun see a clean end (a non-zero rank is a failure to
    them: a ChildFailedError traceback per node, "srun: error" lines, 75 lost); the batch
    shell turns the file into exit status 75, requeues and prints the one line. Elsewhere:
    one line (rank 0) and exit status 75.
    """
    marker = os.environ.get(PREEMPT_FILE_ENV)
    if marker:
        try:
            tmp = f"{marker}.tmp-{os.getpid()}"  # every rank writes the same step
            Path(tmp).write_text(f"{step}\n")
            os.replace(tmp, marker)
            return 0
        except OSError:
            pass  # cannot tell the batch shell: fall back to the exit status
    if os.environ.get("RANK", "0") == "0":
        print(
            f"preempted at step {step}, checkpoint saved; run the same command again to resume",
            file=sys.stderr,
        )
    return EXIT_PREEMPTED


def verify_directory(args: argparse.Namespace) -> int:
    """`verify-cache --cache DIR`: the cache's own checks, no configuration."""
    from common.errors import ConfigError
    from distill.cache.verify import verify_directory as verify

    if args.target != "verify-cache" or args.config or args.overrides or args.stages:
        raise ConfigError(
            "--cache DIR goes with `verify-cache` alone: `python -m launch verify-cache "
            "--cache DIR` (no --config, no overrides)"
        )
    report = verify(args.cache)
    line = f"verify-cache: OK: {report['rows']} rows complete, checksums match"
    if report["rescored"]:
        line += (
            f", {report['rows_checked']} re-scored rows agree (top-1 "
            f"{report['top1_agreement']:.2%}, max |diff| {report['max_abs_diff']:.2g})"
        )
    else:
        line += f"; re-scoring skipped: {report['skipped_because']}"
    print(line)
    return 0


def export_command(command: str, argv: list[str]) -> int:
    """`predict DIR IMAGE...` and `measure DIR`: what a deployment host runs, with the export
    directory alone (its own argument parser: no stage, config or overrides apply)."""
    parser = argparse.ArgumentParser(prog=f"kdslim {command}", description=COMMANDS[command])
    parser.add_argument("directory", metavar="DIR", help="an export directory (<out_dir>/export)")
    if command == "predict":
        parser.add_argument("images", metavar="IMAGE", nargs="+", help="image files")
        parser.add_argument(
            "--model", choices=("float", "int8"), default="float", help="which ONNX model runs"
        )
        parser.add_argument("--top", type=int, default=5, help="classes shown per image")
    else:
        parser.add_argument(
            "--threads", type=int, default=1, help="threads of both runtimes (default 1)"
        )
        parser.add_argument("--json", action="store_true", help="the measurements as JSON")
    try:
        args = parser.parse_args(argv)
        if getattr(args, "top", 1) < 1 or getattr(args, "threads", 1) < 1:
            parser.error("--top and --threads take a positive number")
    except SystemExit as e:  # --help (0) or a usage error (2), already printed by argparse
        return e.code if isinstance(e.code, int) else 2

    from common.errors import KdslimError

    try:
        if command == "predict":
            from launch.deploy import format_predictions, predict

            print(format_predictions(predict(args.directory, args.images, args.model, args.top)))
        else:
            from launch.measure import measure_export, render

            costs = measure_export(args.directory, args.threads)
            print(json.dumps(costs, indent=1) if args.json else render(costs))
    except KdslimError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


def run(cfg, target: str) -> int:
    """Run the pipeline, a stage (all its instances) or one node, in this process."""
    from common.runtime import Runtime
    from launch import graph
    from launch.runner import run_node

    if target == "pipeline":
        nodes = graph.nodes(cfg)
    else:
        node = graph.check_node(cfg, target)
        stage = graph.BY_NAME[node.stage]
        instances = [node.instance] if node.instance else stage.instances(cfg)
        nodes = [graph.Node(node.stage, i) for i in instances]
    runtime = Runtime(cfg)
    say = print if runtime.is_main else (lambda *a, **k: None)
    if target == "pipeline":
        names = ", ".join(n.name for n in nodes)
        say(f"pipeline: {len(nodes)} steps into {cfg.run.out_dir}: {names}")
    named = target != "pipeline"
    summary = {n.name: run_node(cfg, runtime, n, say, named) for n in nodes}
    if target in ("pipeline", "report"):
        _show_report(cfg, summary, say)
    runtime.end()
    return 0


def _show_report(cfg, summary: dict, say) -> None:
    from launch.graph import Node, directory
    from launch.report_render import results_table

    ran = [k for k, v in summary.items() if v["state"] == "ran"]
    say(f"{len(ran)} step(s) ran ({', '.join(ran) or 'none'}), {len(summary) - len(ran)} skipped")
    report = directory(cfg, Node("report")) / "report.json"
    if report.is_file():
        say(results_table(json.loads(report.read_text())))
        say(f"report: {report.resolve()} and {report.with_suffix('.md').resolve()}")
