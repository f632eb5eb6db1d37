"""What sharding a live teacher with ZeRO-3 costs and saves, against the same teacher held whole.

    python bench/bench_zero3_teacher.py --teacher cifar_wrn28_10 --batch 32 --steps 5 --rounds 2

Launches itself under `accelerate launch` with `--processes` processes, alternating
configs/accelerate/deepspeed_zero2.yaml (the teacher whole on every process, as online
distillation holds it without ZeRO-3) and deepspeed_zero3.yaml (the teacher sharded by
`common.distributed.place_frozen`), and times the teacher's forward pass on a fixed batch per
process. Reported per process: the teacher parameters it stores, the forward time per batch
(median over rounds) and the peak memory: on CUDA the peak allocated device memory, which is
what sharding is for; on CPU the peak RSS, which also counts the whole teacher that every
process reads before it is sharded, so there it shows no saving. Ratios are within one run
(the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"whole": "deepspeed_zero2.yaml", "zero3": "deepspeed_zero3.yaml"}


def worker(args) -> None:
    import torch

    from common.config import RunConfig
    from common.distributed import build_accelerator, parameter_share, place_frozen
    from common.models import build_model
    from distill.teachers import Ensemble

    acc = build_accelerator(RunConfig(mixed_precision=args.precision))
    torch.manual_seed(0)
    model = build_model(args.teacher, 10)
    teacher = place_frozen(Ensemble([model], [{}], "logits"), acc, lambda _: None)
    local, total = parameter_share(getattr(teacher, "module", teacher))
    x = torch.randn(args.batch, 3, 32, 32, device=acc.device)
    with torch.no_grad():
        for _ in range(2):  # warm-up: allocator, first all-gathers
            teacher(x)
        acc.wait_for_everyone()
        start = time.perf_counter()
        for _ in range(args.steps):
            teacher(x)
        if acc.device.type == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - start) / args.steps * 1e3
    peak_mb = (
        torch.cuda.max_memory_allocated() / 2**20
        if acc.device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    row = {"rank": acc.process_index, "params_local": local, "params_total": total}
    row |= {"forward_ms": ms, "peak_mb": peak_mb, "device": acc.device.type}
    print("RESULT " + json.dumps(row), flush=True)
    acc.wait_for_everyone()
    acc.end_training()


def launch(mode: str, args) -> list[dict]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "configs" / "accelerate" / CONFIGS[mode]),
        "--num_processes",
        str(args.processes),
        "--main_process_port",
        str(port),
        __file__,
        "--worker",
        *("--teacher", args.teacher, "--batch", str(args.batch), "--steps", str(args.steps)),
        *("--precision", args.precision),
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT), GLOO_SOCKET_IFNAME="lo")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{mode} run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    rows = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    return sorted(rows, key=lambda r: r["rank"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", default="cifar_wrn28_10")
    ap.add_argument("--batch", type=int, default=32, help="images per process")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--precision", default="no", choices=["no", "bf16"])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    runs: dict[str, list[list[dict]]] = {m: [] for m in CONFIGS}
    for _ in range(args.rounds):  # alternate, so load on a shared machine hits both alike
        for mode in CONFIGS:
            runs[mode].append(launch(mode, args))
    out: dict = {"teacher": args.teacher, "processes": args.processes, "batch": args.batch}
    for mode, rounds in runs.items():
        rank0 = [r[0] for r in rounds]
        out[mode] = {
            "device": rank0[0]["device"],
            "params_per_process": rank0[0]["params_local"],
            "params_total": rank0[0]["params_total"],
            "forward_ms": statistics.median(r["forward_ms"] for r in rank0),
            "forward_ms_rounds": [round(r["forward_ms"], 1) for r in rank0],
            "peak_mb": max(r["peak_mb"] for rows in rounds for r in rows),
        }
    w, z = out["whole"], out["zero3"]
    out["ratios"] = {
        "params_per_process_zero3_over_whole": z["params_per_process"] / w["params_per_process"],
        "forward_time_zero3_over_whole": z["forward_ms"] / w["forward_ms"],
        "peak_memory_zero3_over_whole": z["peak_mb"] / w["peak_mb"],
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
