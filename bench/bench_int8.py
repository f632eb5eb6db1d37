"""int8 against float in ONNX Runtime for one export: latency, file size, accuracy, op by op.

    python bench/bench_int8.py runs/quickstart/export            # an export with its int8 model
    python bench/bench_int8.py runs/quickstart/export --rounds 5 --out int8.json

An export made before kdslim wrote int8 models is exported again, from the model and the run
configuration it records (`source` in export.json, config.yaml beside it), into a temporary
directory: the run itself is only read. Latency is measured as `kdslim measure` does
(`prune.measure.median_ms`, 1 thread by default), float and int8 in turn within every round
so that a shared machine's load falls on both alike; the median over rounds is reported. The
op-by-op table (ONNX Runtime's profile of one batch, summed per op type) says where int8 time
goes: a latency goal that is missed is missed by Q/DQ, layout transposes or float ops here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from launch.deploy import model_file, ort_session, read_export
from launch.measure import cpu
from prune.measure import median_ms


def with_int8(directory: Path, tmp: Path) -> tuple[Path, dict]:
    """The export at `directory`, or, when it has no int8 model, the same export made again
    into `tmp`."""
    export = json.loads((directory / "export.json").read_text())  # read_export: new ones
    if "onnx_int8" in export["files"]:
        return read_export(directory)
    from common.config import load_config
    from launch.config import Config
    from launch.export import export_student

    cfg = load_config(Config, directory / "config.yaml", [])
    print(f"{directory} has no int8 model: exporting {export['source']} again into {tmp}")
    return tmp, export_student(cfg, Path(export["source"]), tmp)


def op_times(path: Path, x: np.ndarray, threads: int) -> Counter:
    """Microseconds per op type in one profiled run of `x` (after one unprofiled run)."""
    with tempfile.TemporaryDirectory() as tmp:
        sess = ort_session(path, threads, profile_prefix=str(Path(tmp) / "p"))
        for _ in range(2):
            sess.run(None, {"image": x})
        events = json.loads(Path(sess.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"]
    last = runs[-1]["ts"] if runs else 0
    ops = Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= last:
            ops[e["args"]["op_name"]] += e["dur"]
    return ops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export", type=Path, help="an export directory (<run.out_dir>/export)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        d, export = with_int8(args.export, Path(tmp) / "export")
        paths = {m: model_file(d, export, m) for m in ("float", "int8")}
        shape = export["input_shape"][1:]
        rng = np.random.default_rng(0)
        inputs = {b: rng.standard_normal((b, *shape), dtype=np.float32) for b in args.batches}
        sessions = {m: ort_session(p, args.threads) for m, p in paths.items()}
        times = {m: {b: [] for b in args.batches} for m in paths}
        for _ in range(args.rounds):
            for b, x in inputs.items():
                for m, sess in sessions.items():
                    ms = median_ms(lambda s=sess, x=x: s.run(None, {"image": x}), args.threads)
                    times[m][b].append(ms)
        big = max(args.batches)
        ops = {m: op_times(p, inputs[big], args.threads) for m, p in paths.items()}
        sizes = {m: p.stat().st_size for m, p in paths.items()}

    latency = {m: {b: statistics.median(v) for b, v in t.items()} for m, t in times.items()}
    acc = export.get("accuracy", {})
    result = {
        "export": str(args.export),
        "cpu": cpu(),
        "threads": args.threads,
        "rounds": args.rounds,
        "size_bytes": sizes,
        "size_ratio": sizes["int8"] / sizes["float"],
        "latency_ms": latency,
        "latency_ratio": {b: latency["int8"][b] / latency["float"][b] for b in args.batches},
        "accuracy": acc,
        "float_layers": export.get("int8", {}).get("float_layers"),
        "op_us": {m: dict(v.most_common()) for m, v in ops.items()},
    }
    c = result["cpu"]
    print(f"CPU: {c['name']}; int8 instruction sets: {', '.join(c['int8_isa']) or 'none'}")
    ratio = result["size_ratio"]
    print(f"size: float {sizes['float']:,} B, int8 {sizes['int8']:,} B, ratio {ratio:.3f}")
    for b in args.batches:
        print(
            f"latency bs{b} ({args.threads} thread(s), median of {args.rounds} rounds): float "
            f"{latency['float'][b]:.3f} ms, int8 {latency['int8'][b]:.3f} ms, ratio "
            f"{result['latency_ratio'][b]:.3f}"
        )
    if acc:
        gain = acc.get("int8_minus_float", {})
        print(
            f"test accuracy ({acc['test_images']} images): float {acc['onnx']:.4f}, int8 "
            f"{acc['onnx_int8']:.4f}, int8 - float {100 * gain['gain']:+.2f} points, 95% CI "
            f"[{100 * gain['ci95'][0]:+.2f}, {100 * gain['ci95'][1]:+.2f}]"
        )
    print(f"layers left in float: {result['float_layers'] or 'none'}")
    print(f"op by op at batch {big} (us, one profiled run):")
    for m, v in ops.items():
        print(
            f"  {m}: total {sum(v.values())}: " + ", ".join(f"{k} {t}" for k, t in v.most_common())
        )
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
