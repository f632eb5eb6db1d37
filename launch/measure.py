"""What an exported model costs where it runs: file size, peak memory and latency at batch 1
and 64, in ONNX Runtime (float and int8) and PyTorch, with the accuracy export measured
(`kdslim measure DIR`, and `costs` in export.json).

Reads the export directory alone (export.json for the input shape and accuracy), so a user
measures on the deployment host itself, without the training setup.

- Latency: `torch.utils.benchmark.Timer` around one call (`prune.measure.median_ms`: its
  warm-up, thread setting and `blocked_autorange`), on random inputs of the input shape, with
  the same number of threads in both runtimes (ORT intra-op threads, torch threads), each
  format loaded afresh in this process.
- Peak memory: in a fresh subprocess per runtime and precision (a process's peak cannot be
  shared), after the runtime and the inputs are in memory, the peak resident set size is
  reset (Linux /proc/self/clear_refs); what is reported is that peak, once the model is loaded
  and has run at the batch size, less the resident size before loading: weights, runtime
  arena and activations, without the interpreter and libraries every deployment carries
  anyway. Batch 64 runs after batch 1 in the same process, so its peak includes what batch 1
  left allocated, as a server's would. The ONNX Runtime probes import no torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from launch.deploy import ort_session, read_export

BATCHES = (1, 64)
THREADS = 1
"""Threads by default: one, as prune's latency (`prune.latency_threads`): on a shared, loaded
CPU several threads spin-wait and time the machine's load more than the model."""
MEMORY_METHOD = (
    "peak RSS above the RSS before loading, in a fresh process per row (runtime and inputs "
    "already loaded; /proc/self/clear_refs resets the peak)"
)
ROWS = (  # name, runtime, precision, key in export.json `files`
    ("ONNX Runtime float", "onnxruntime", "float", "onnx"),
    ("ONNX Runtime int8", "onnxruntime", "int8", "onnx_int8"),
    ("PyTorch float", "pytorch", "float", "safetensors_fused"),
)


def measure_export(directory, threads: int = THREADS, batches=BATCHES) -> dict:
    """The costs of the export in `directory` (see `measure_files`)."""
    d, export = read_export(directory)
    return measure_files(
        d, export["input_shape"][1:], export["files"], export.get("accuracy"), threads, batches
    )


def measure_files(
    directory: Path, shape, files: dict, accuracy: dict | None, threads=THREADS, batches=BATCHES
) -> dict:
    """{"threads", "batches", "cpu", "memory_method", "latency_method", "rows": [{"model",
    "runtime", "precision", "file", "size_bytes", "peak_memory_bytes": {batch: bytes},
    "latency_ms": {batch: ms}, "test_acc"}]} for the formats of an export directory (`files`
    as export.json lists them; `accuracy` its `accuracy`: test accuracy per format key)."""
    rows = []
    for name, runtime, precision, key in ROWS:
        if key not in files or not (directory / files[key]).is_file():
            continue
        path = directory / files[key]
        size = path.stat().st_size
        if runtime == "pytorch":  # the weights and the architecture they need
            size += (path.parent / "model.json").stat().st_size
        acc = (accuracy or {}).get("onnx_int8" if precision == "int8" else "onnx")
        rows.append(
            {
                "model": name,
                "runtime": runtime,
                "precision": precision,
                "file": files[key],
                "size_bytes": size,
                "peak_memory_bytes": _memory(runtime, path, shape, batches, threads),
                "latency_ms": _latency(runtime, path, shape, batches, threads),
                "test_acc": acc,
            }
        )
    return {
        "threads": threads,
        "batches": list(batches),
        "cpu": cpu(),
        "memory_method": MEMORY_METHOD,
        "latency_method": (
            f"median of torch.utils.benchmark.Timer.blocked_autorange, {threads} thread(s), "
            "random input; PyTorch: the BN-folded model (model_fused/), eager, inference mode"
        ),
        "rows": rows,
    }


def cpu() -> dict:
    """The CPU's name and the instruction sets int8 kernels use (Linux /proc/cpuinfo)."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break  # the end of the first processor's entry
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    except OSError:
        pass
    flags = set(fields.get("flags", "").split())
    isa = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16")
    return {"name": fields.get("model name"), "int8_isa": [f for f in isa if f in flags]}


def _latency(runtime: str, path: Path, shape, batches, threads: int) -> dict:
    """{batch: median ms} of the model at `path`, loaded here."""
    from prune.measure import latency_ms, median_ms

    if runtime == "pytorch":
        model = _torch_model(path)
        return {str(b): latency_ms(model, shape, b, threads=threads) for b in batches}
    sess = ort_session(path, threads)
    latency = {}
    for b, x in _inputs(shape, batches).items():
        latency[str(b)] = median_ms(lambda x=x: sess.run(None, {"image": x}), threads)
    return latency


def _memory(runtime: str, path: Path, shape, batches, threads: int) -> dict:
    """{batch: peak bytes} measured in a fresh `python -m launch.measure` process."""
    args = [sys.executable, "-m", "launch.measure", runtime, str(path)]
    args += [json.dumps(list(shape)), json.dumps(list(batches)), str(threads)]
    root = str(Path(__file__).resolve().parents[1])  # kdslim, wherever the caller runs
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(args, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"measuring the memory of {path} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _run_probe(runtime: str, path: Path, shape, batches, threads: int) -> dict:
    """In the probe process: load the model and run it once at each batch size."""
    inputs = _inputs(shape, batches)
    if runtime == "pytorch":
        import torch

        import common.checkpoint  # noqa: F401 (the model code in memory before the baseline)

        torch.set_num_threads(threads)
        base = _reset_peak()
        model = _torch_model(path)
        with torch.inference_mode():
            return {str(b): _peak(base, model, torch.from_numpy(x)) for b, x in inputs.items()}
    import onnxruntime  # noqa: F401 (its library in memory before the baseline)

    base = _reset_peak()
    sess = ort_session(path, threads)
    return {str(b): _peak(base, sess.run, None, {"image": x}) for b, x in inputs.items()}


def _inputs(shape, batches) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(0)
    return {b: rng.standard_normal((b, *shape), dtype=np.float32) for b in batches}


def _torch_model(path: Path):
    from common.checkpoint import load_model

    return load_model(path.parent)[0].float().eval()


def _peak(base: int | None, fn, *args) -> int | None:
    """The peak resident size while `fn(*args)` ran and before, less `base`."""
    fn(*args)
    return None if base is None else _status("VmHWM") - base


def _reset_peak() -> int | None:
    """The resident size now, after resetting the peak to it; None where Linux's
    /proc/self/clear_refs is not available (no peak can then be measured from here on)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return None
    return _status("VmRSS")


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def render(costs: dict) -> str:
    """The costs as a text table, with how each column was measured."""
    header = ("model", "file", "size", "peak mem bs1 / bs64", "latency ms bs1 / bs64", "test acc")
    rows = [header]
    for r in costs["rows"]:
        mem = " / ".join(_size(r["peak_memory_bytes"].get(str(b))) for b in costs["batches"])
        lat = " / ".join(f"{r['latency_ms'][str(b)]:.3g}" for b in costs["batches"])
        acc = "-" if r["test_acc"] is None else f"{r['test_acc']:.4f}"
        rows.append((r["model"], r["file"], _size(r["size_bytes"]), mem, lat, acc))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    c = costs["cpu"]
    return "\n".join(
        [
            *lines,
            "",
            f"batch sizes {', '.join(map(str, costs['batches']))}; CPU: {c['name'] or '?'} "
            f"(int8 instruction sets: {', '.join(c['int8_isa']) or 'none'})",
            f"latency: {costs['latency_method']}",
            f"peak memory: {costs['memory_method']}",
            "test acc: as measured at export (the test split); PyTorch runs the float graph",
        ]
    )


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    if n < 1024:
        return f"{n} B"
    return f"{n / 1024:.1f} KiB" if n < 1024**2 else f"{n / 1024**2:.1f} MiB"


if __name__ == "__main__":  # the probe: runtime path shape batches threads
    runtime, path, shape, batches, threads = sys.argv[1:6]
    result = _run_probe(runtime, Path(path), json.loads(shape), json.loads(batches), int(threads))
    print(json.dumps(result))
