"""Export the final student for deployment: safetensors + spec, TorchScript and ONNX.

The deployment formats (TorchScript, ONNX, `model_fused/`) hold the model with every BatchNorm
folded into the convolution before it (`common.models.fold`): one op where there were two,
which is where a pruned network's latency is lost to per-op overhead. `model/` keeps the
trainable form (BN separate), for fine-tuning further. Every format is loaded back and run on
the same random batch as the PyTorch model; the largest absolute output difference must stay
within `pipeline.export_atol` times max(1, the largest |output|). The files are written into a
temporary directory inside the stage directory and moved into place when all are done and
checked, with the check results in `export.json` (moved last).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import warnings
from pathlib import Path

import torch

from common.checkpoint import atomic_dir, load_model, write_model_files
from common.data import build_splits
from common.errors import KdslimError
from common.files import MODEL_FILE, SPEC_FILE
from common.logging import write_json
from common.models.fold import fold_batchnorm


def input_spec(cfg) -> tuple[tuple[int, int, int], dict]:
    """(C, H, W) of the network input and the preprocessing the exported graph expects."""
    test = build_splits(cfg.data, cfg.run.seed).test
    r = test.recipe
    pre = {
        "image_size": r.size,
        "scale": "RGB uint8 / 255, then (x - mean) / std per channel",
        "mean": r.mean.flatten().tolist(),
        "std": r.std.flatten().tolist(),
    }
    return tuple(test[(0, -1)]["image"].shape), pre


def export_student(cfg, model_dir: Path, out: Path) -> dict:
    p = cfg.pipeline
    model, spec = load_model(model_dir)
    model.float().eval()  # deployment precision, also for a model trained in float64
    gen = torch.Generator().manual_seed(cfg.run.seed)
    shape, preprocess = input_spec(cfg)
    x = torch.randn(p.export_batch, *shape, generator=gen)  # [B, C, H, W]
    x_other = torch.randn(p.export_batch + 3, *x.shape[1:], generator=gen)  # another batch size
    with torch.inference_mode():
        ref, ref_other = model(x), model(x_other)
    # float32 rounding grows with the outputs' magnitude: the bound is per unit of the
    # largest |logit| once that exceeds 1 (an untrained net's logits reach the hundreds)
    tol = p.export_atol * max(1.0, float(ref.abs().max()), float(ref_other.abs().max()))

    tmp = atomic_dir(out / "files")
    (tmp / "model").mkdir()
    write_model_files(tmp / "model", model, spec)
    checks = {"safetensors": _check(load_model(tmp / "model")[0].eval(), x, ref, tol)}
    fused, pairs = fold_batchnorm(model)
    (tmp / "model_fused").mkdir()
    write_model_files(tmp / "model_fused", fused, {**spec, "folded_bn": pairs})
    checks["safetensors_fused"] = _check(load_model(tmp / "model_fused")[0].eval(), x, ref, tol)
    checks["safetensors_fused"]["folded_bn"] = len(pairs)

    with warnings.catch_warnings():  # torch.jit is deprecated in favour of torch.export,
        warnings.simplefilter("ignore", FutureWarning)  # but remains the portable C++ format
        traced = torch.jit.trace(fused, x)
        torch.jit.save(traced, str(tmp / "model.torchscript.pt"))
        loaded = torch.jit.load(str(tmp / "model.torchscript.pt"))
    checks["torchscript"] = _check(loaded, x, ref, tol)

    checks["onnx"] = _export_onnx(fused, x, tmp / "model.onnx", p.onnx_opset)
    if checks["onnx"]["runtime"] == "onnxruntime":
        sess = _ort_session(tmp / "model.onnx")
        for name, (inp, want) in {"": (x, ref), "_other_batch": (x_other, ref_other)}.items():
            got = torch.from_numpy(sess.run(None, {"image": inp.numpy()})[0])
            checks["onnx"][f"max_abs_diff{name}"] = float((got - want).abs().max())
        checks["onnx"]["ok"] = all(
            v <= tol for k, v in checks["onnx"].items() if k.startswith("max_abs_diff")
        )

    result = {
        "source": str(model_dir),
        "spec": spec,
        "input_shape": [p.export_batch, *x.shape[1:]],
        "preprocess": preprocess,
        "atol": p.export_atol,
        "tolerance": tol,
        "files": {
            "safetensors": f"model/{MODEL_FILE}",
            "spec": f"model/{SPEC_FILE}",
            "safetensors_fused": f"model_fused/{MODEL_FILE}",
            "torchscript": "model.torchscript.pt",
            "onnx": "model.onnx",
        },
        "checks": checks,
        "ok": all(c["ok"] for c in checks.values()),
    }
    if not result["ok"]:
        write_json(out / "export_failed.json", result)
        raise ExportError(
            f"export check failed: {json.dumps(checks)} (see {out}/export_failed.json); a "
            f"model with data-dependent control flow cannot be traced"
        )
    write_json(tmp / "export.json", result)
    for path in sorted(tmp.rglob("*"), key=lambda p: p.name == "export.json"):
        if path.is_file():  # export.json last: its presence means the rest is in place
            dest = out / path.relative_to(tmp)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, dest)
    shutil.rmtree(tmp)
    return result


class ExportError(KdslimError):
    """An exported format does not reproduce the PyTorch model's outputs."""


def _check(module, x: torch.Tensor, ref: torch.Tensor, atol: float) -> dict:
    with torch.inference_mode():
        diff = float((module(x) - ref).abs().max())
    return {"max_abs_diff": diff, "ok": diff <= atol}


def _export_onnx(model, x: torch.Tensor, path: Path, opset: int) -> dict:
    """The TorchScript-based exporter (`dynamo=False`): the torch.export-based default needs
    the `onnxscript` package, which is not a dependency. Batch size is a dynamic axis."""
    import onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (x,),
            str(path),
            opset_version=opset,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            dynamo=False,
        )
    onnx.checker.check_model(onnx.load(str(path)))
    if importlib.util.find_spec("onnxruntime") is None:
        return {
            "opset": opset,
            "runtime": None,
            "ok": True,
            "note": "onnxruntime not installed: only onnx.checker ran",
        }
    return {"opset": opset, "runtime": "onnxruntime", "ok": False}


def _ort_session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
