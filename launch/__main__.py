"""kdslim command line: `python -m launch <stage> --config FILE [dotted.key=value ...]`.

Also runs under `accelerate launch [flags] -m launch <stage> ...`: every process parses the
same arguments and the stage finds its rank from the environment accelerate sets.
"""

from __future__ import annotations

import argparse
import importlib
import sys

STAGES = {
    "train": "supervised training of a registered model (teachers, CE baselines)",
    "sparsity": "network slimming: train with L1 on every BatchNorm scale",
    "prune": "network slimming: global |gamma| threshold, remove coupled channels, shrink",
    "finetune": "fine-tune a pruned model (optional live KD, or the scratch-B baseline)",
    "cache": "write the teacher ensemble's soft targets for V views of every sample",
    "verify-cache": "check a cache: completeness, checksums, re-scored spot check",
    "distill": "train the student on cached (or live) soft targets, or labels (mode=ce)",
    "pipeline": "the whole run: teachers, cache, students, slimming, export, report",
    "report": "collect every stage's results into <out_dir>/report.json and report.md",
}

EXIT_FAILED, EXIT_USAGE, EXIT_PREEMPTED = 1, 2, 75


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m launch",
        description="Distil a teacher ensemble into a small student, then slim it.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="stages:\n"
        + "\n".join(f"  {k:<13} {v}" for k, v in STAGES.items())
        + "\n  models        list the registered model names"
        + "\n\nexample: python -m launch train --config configs/quickstart.yaml "
        "train.loop.epochs=3",
    )
    parser.add_argument(
        "stage",
        choices=[*STAGES, "models"],
        metavar="stage",
        help="one of: " + ", ".join([*STAGES, "models"]),
    )
    parser.add_argument("--config", "-c", help="YAML run configuration (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.stage == "models":
        from common.models import list_models

        print("\n".join(list_models()))
        print("tv_<name>: any torchvision classifier (weights from a local file)")
        return 0

    from common.config import ConfigError, load_config
    from common.data import DataError
    from common.trainer import Preempted
    from distill.cache import CacheError
    from launch.config import Config

    try:
        cfg = load_config(Config, args.config, args.overrides)
        stage = importlib.import_module(f"launch.stages.{args.stage.replace('-', '_')}")
        stage.run(cfg)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except CacheError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except Preempted as e:
        print(f"preempted: {e}; run the same command again to resume", file=sys.stderr)
        return EXIT_PREEMPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
