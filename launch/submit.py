"""Submit a whole kdslim run to SLURM: exactly the jobs of `python -m launch plan`.

    slurm/submit.sh --config configs/run.yaml [options] [-- dotted.key=value ...]

One job per node of the stage graph (one per teacher-ensemble member, one per student seed),
the cache as a job array, each job waiting (`--dependency=afterok`) for the jobs it reads
from, so a failed job cancels what depends on it. Training nodes run on `--nodes` x
`--gpus-per-node` through `slurm/stage.sbatch`; the rest as one process. Prints one
`NAME JOBID` line per job; `--dry-run` prints the sbatch commands instead of submitting.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

SLURM_DIR = Path(__file__).resolve().parents[1] / "slurm"


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="slurm/submit.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="the run config every job reads")
    p.add_argument("--stages", help='a subset of the run\'s stages, e.g. "distill sparsity"')
    p.add_argument("--after", help="make the first jobs wait for this job id too")
    p.add_argument("--nodes", type=int, default=1, help="nodes per training job")
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (0: CPU)")
    p.add_argument("--procs-per-node", type=int, default=1, help="processes per CPU node")
    p.add_argument("--partition", help="sbatch --partition")
    p.add_argument("--time", help="sbatch --time for every job")
    p.add_argument("--cache-shards", type=int, default=8, help="cache array size (default 8)")
    p.add_argument("--cache-parallel", type=int, default=4, help="array tasks at once (4)")
    p.add_argument("--accelerate-config", help="accelerate config for training jobs")
    p.add_argument("--venv", help="virtualenv on the compute nodes (default .venv)")
    p.add_argument(
        "--sbatch",
        default="",
        help='extra sbatch arguments, written with "=": --sbatch="--account=x --qos=y"',
    )
    p.add_argument("--dry-run", action="store_true", help="print the sbatch commands only")
    p.add_argument("overrides", nargs="*", help="dotted.key=value overrides (after --)")
    return p.parse_args(argv)


def plan(args) -> list[dict]:
    cmd = [sys.executable, "-m", "launch", "plan", "--config", args.config, *args.overrides]
    if args.stages:
        cmd += ["--stages", ",".join(args.stages.split())]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"submit.sh: the plan failed: {proc.stderr.strip()}")
    return json.loads(proc.stdout)["jobs"]


def sbatch_command(job: dict, args, after: list[str]) -> list[str]:
    name = job["name"].replace(":", "-")
    cmd = ["sbatch", "--parsable", f"--job-name=kdslim-{name}"]
    cmd += [f"--partition={args.partition}"] if args.partition else []
    cmd += [f"--time={args.time}"] if args.time else []
    cmd += shlex.split(args.sbatch)
    if after:
        cmd += [f"--dependency=afterok:{':'.join(after)}", "--kill-on-invalid-dep=yes"]
    venv = ["--venv", args.venv] if args.venv else []
    gpu = [f"--gpus-per-node={args.gpus_per_node if job['resources'] == 'train' else 1}"]
    gpu = gpu if args.gpus_per_node else []
    if job["resources"] == "array":
        shards = job["array"] or args.cache_shards
        cmd += [f"--array=0-{shards - 1}%{args.cache_parallel}", "--nodes=1"]
        cmd += ["--ntasks-per-node=1", *gpu, str(SLURM_DIR / "cache_array.sbatch"), *venv]
        return [*cmd, "--num-shards", str(shards), *job["args"][1:]]
    script = [str(SLURM_DIR / "stage.sbatch"), *venv]
    if job["resources"] == "train":
        cmd += [f"--nodes={args.nodes}", "--ntasks-per-node=1", *gpu]
        if not args.gpus_per_node:
            script += ["--procs-per-node", str(args.procs_per_node)]
        if args.accelerate_config:
            script += ["--accelerate-config", args.accelerate_config]
    else:
        cmd += ["--nodes=1", "--ntasks-per-node=1", *gpu]
        script += ["--procs-per-node", "1"] if not args.gpus_per_node else []
    return [*cmd, *script, *job["args"]]


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if not Path(args.config).is_file():
        sys.exit(f"submit.sh: config {args.config} not found")
    args.config = str(Path(args.config).resolve())
    ids: dict[str, str] = {}
    for n, job in enumerate(plan(args)):
        after = [ids[a] for a in job["after"]]
        if args.after and not after:
            after = [args.after]
        cmd = sbatch_command(job, args, after)
        if args.dry_run:
            print(shlex.join(cmd), file=sys.stderr)
            ids[job["name"]] = str(1001 + n)
        else:
            proc = subprocess.run(cmd, capture_output=True, text=True)
            job_id = proc.stdout.strip().split(";")[0]
            if proc.returncode != 0 or not job_id.isdigit():
                sys.exit(f"submit.sh: sbatch for {job['name']} failed: {proc.stderr.strip()}")
            ids[job["name"]] = job_id
        print(f"{job['name']} {ids[job['name']]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
