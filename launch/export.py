"""Export the final student for deployment: safetensors + spec, TorchScript, ONNX and int8 ONNX.

The deployment formats (TorchScript, ONNX, `model_fused/`) hold the model with every BatchNorm
folded into the convolution before it (`common.models.fold`): one op where there were two,
which is where a pruned network's latency is lost to per-op overhead. `model/` keeps the
trainable form (BN separate), for fine-tuning further. Every float format is loaded back and
run on the same random batch as the PyTorch model; the largest absolute output difference must
stay within `pipeline.export_atol` times max(1, the largest |output|). The int8 model
(`launch.quantize`) is checked on real images instead (the test split: a random batch's
activations lie outside the calibrated ranges, so its int8 top-1 says nothing): its top-1
must agree with the float ONNX model's as often as its calibration says it will
(`launch.quantize.agreement_bound`). export.json also says what a deployment needs without
the training setup: the class names, the evaluation preprocessing as data (`launch.deploy`
implements it from that alone), the test accuracy of the float and int8 ONNX models with
their paired interval, and the costs of each format on this machine (`launch.measure`). The
files are written into a temporary directory inside the stage directory and moved into place
when all are done and checked, with the check results in `export.json` (moved last).
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
from common.data import ViewRecipe, build_splits
from common.data.classes import class_names
from common.errors import KdslimError
from common.files import (
    INT8_PREDICTIONS,
    MODEL_FILE,
    PREDICTIONS_FILE,
    SPEC_FILE,
    save_predictions,
)
from common.logging import write_json
from common.models.fold import fold_batchnorm
from common.stats import paired_bootstrap_interval
from launch import quantize
from launch.deploy import ort_session
from launch.measure import measure_files


def input_spec(cfg) -> tuple[tuple[int, int, int], dict, list[str]]:
    """(C, H, W) of the network input, the preprocessing the exported graph expects and the
    class names."""
    test = build_splits(cfg.data, cfg.run.seed).test
    shape = tuple(test[(0, -1)]["image"].shape)
    return shape, preprocessing(test.recipe), class_names(test.source)


def preprocessing(r: ViewRecipe) -> dict:
    """What `ViewRecipe.plain` (evaluation) does to an image, as data that a deployment can
    implement without kdslim (`launch.deploy.preprocess` does, from this alone)."""
    if r.kind == "imagenet":  # the short side to size / 0.875, then the centre crop
        resize, crop = {"short_side": round(r.size / 0.875)}, [r.size, r.size]
    else:
        resize, crop = {"size": [r.size, r.size]}, None
    return {
        "image_size": r.size,
        "decode": "the file's pixels as 8-bit RGB (Pillow: Image.open(path).convert('RGB'))",
        "channel_order": "RGB",
        "resize": resize,
        "resize_rule": "short_side: the shorter side to that length, the longer one scaled "
        "alike (rounded half to even, at least as long); size: to [H, W], aspect ratio not "
        "kept; skipped when the image already has that size",
        "interpolation": "bilinear, antialiased (Pillow's BILINEAR filter on float pixels; "
        "torch's interpolate(antialias=True) computes the same), then rounded half to even "
        "and clipped to 0..255",
        "center_crop": crop,
        "divide_by": 255.0,
        "mean": r.mean.flatten().tolist(),
        "std": r.std.flatten().tolist(),
        "formula": "x = (pixel / 255 - mean) / std per channel, in float32, after resize and crop",
        "layout": "float32 [N, 3, H, W] (NCHW), the ONNX input `image`; output `logits`",
    }


def export_student(cfg, model_dir: Path, out: Path, int8: bool = True) -> dict:
    """Every deployment format of the model in `model_dir`, checked, into `out` (with an int8
    model unless `int8` is False or `pipeline.int8_calibration` is 0); export.json last."""
    p = cfg.pipeline
    model, spec = load_model(model_dir)
    model.float().eval()  # deployment precision, also for a model trained in float64
    gen = torch.Generator().manual_seed(cfg.run.seed)
    shape, preprocess, classes = input_spec(cfg)
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
        sess = ort_session(tmp / "model.onnx")
        for name, (inp, want) in {"": (x, ref), "_other_batch": (x_other, ref_other)}.items():
            got = torch.from_numpy(sess.run(None, {"image": inp.numpy()})[0])
            checks["onnx"][f"max_abs_diff{name}"] = float((got - want).abs().max())
        checks["onnx"]["ok"] = all(
            v <= tol for k, v in checks["onnx"].items() if k.startswith("max_abs_diff")
        )

    files = {
        "safetensors": f"model/{MODEL_FILE}",
        "spec": f"model/{SPEC_FILE}",
        "safetensors_fused": f"model_fused/{MODEL_FILE}",
        "torchscript": "model.torchscript.pt",
        "onnx": "model.onnx",
    }
    result = {
        "source": str(model_dir),
        "spec": spec,
        "input_shape": [p.export_batch, *x.shape[1:]],
        "classes": classes,
        "preprocess": preprocess,
        "atol": p.export_atol,
        "tolerance": tol,
        "files": files,
        "checks": checks,
        "ok": all(c["ok"] for c in checks.values()),
    }
    if result["ok"] and checks["onnx"]["runtime"] == "onnxruntime":
        result.update(_deployment(cfg, tmp, files, shape, int8))
        result["ok"] = result.get("int8", {}).get("check", {}).get("ok", True)
    if not result["ok"]:
        write_json(out / "export_failed.json", result)
        if not all(c["ok"] for c in checks.values()):
            raise ExportError(
                f"export check failed: {json.dumps(checks)} (see {out}/export_failed.json); a "
                f"model with data-dependent control flow cannot be traced"
            )
        raise ExportError(
            f"int8 check failed: {json.dumps(result['int8']['check'])} (see "
            f"{out}/export_failed.json): the int8 model's top-1 agrees with the float model's "
            "less often on the test images than on its calibration views; calibrate on more "
            "views (`pipeline.int8_calibration`), or set it to 0 to export no int8 model"
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


def _deployment(cfg, tmp: Path, files: dict, shape, int8: bool) -> dict:
    """The int8 model (`pipeline.int8_calibration` > 0), test accuracy of the ONNX models with
    their per-image predictions, and the costs of every format: export.json's `int8`,
    `accuracy` and `costs` (`files` gains the int8 model)."""
    out = {}
    if int8 and cfg.pipeline.int8_calibration:
        files["onnx_int8"] = "model.int8.onnx"
        out["int8"] = quantize.int8_model(cfg, tmp / files["onnx"], tmp / files["onnx_int8"])
    test = build_splits(cfg.data, cfg.run.seed).test
    preds = {
        k: quantize.predictions(tmp / files[k], quantize.test_batches(test, cfg.data.num_workers))
        for k in ("onnx", "onnx_int8")
        if k in files
    }
    correct = {k: v["pred"] == v["label"] for k, v in preds.items()}
    out["accuracy"] = {k: float(c.mean()) for k, c in correct.items()}
    out["accuracy"]["test_images"] = len(test)
    for k, name in (("onnx", PREDICTIONS_FILE), ("onnx_int8", INT8_PREDICTIONS)):
        if k in preds:
            save_predictions(tmp / name, {c: preds[k][c] for c in ("sample_id", "label", "pred")})
    if "int8" in out:
        out["accuracy"]["int8_minus_float"] = paired_bootstrap_interval(
            correct["onnx"], correct["onnx_int8"]
        )
        out["int8"]["check"] = quantize.check(
            out["int8"]["calibration"], preds["onnx"]["pred"], preds["onnx_int8"]["pred"]
        )
    out["costs"] = measure_files(tmp, shape, files, out["accuracy"])
    return out


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
