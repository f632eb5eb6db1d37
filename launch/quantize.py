"""The int8 model of an export: static post-training quantization of the BN-folded ONNX graph.

ONNX Runtime's `quantize_static` in the QDQ format: int8 weights per output channel, uint8
activations (U8S8), min-max ranges over calibration images. Chosen over torch.ao's PT2E with
the x86 Inductor quantizer by measurement (exp/int8_notes.md): both kept the float model's
top-1 on every quickstart test image; PT2E under Inductor was faster at batch 64 on this AMX
CPU (ResNet-20 15 ms against 31), ONNX Runtime 3-16x faster at batch 1, but PT2E's int8 graph
runs only under `torch.compile` (torch, Inductor and a C++ compiler on the deployment host,
9-14 s of compilation per process) and does not leave PyTorch with kdslim's ONNX exporter,
while the QDQ file runs in the runtime the float model ships in (and is TensorRT's
explicit-quantization format). U8S8 rather than ORT's default S8S8: with int8 activations ONNX
Runtime left 12 of ResNet-20's 21 convolutions and MobileNetV3's 28 hard-swish and
squeeze-excitation multiplies in float (1.6x and 5x slower than float at batch 64); with uint8
all became QLinear ops. The graph is first simplified by `quant_pre_process` (shape inference,
Identity nodes removed), without which ONNX Runtime fused 3 of ResNet-20's 21 convolutions.

Calibration uses training views drawn with the cache's view recipe (same seed, same recipe, the
plain first view when `cache.plain_first`): the inputs the student was trained on, whose ranges
cover the evaluation views. Which layers stay in float is read from what ONNX Runtime actually
executes (its profile of one run on this CPU), not from the quantizer's intent: BatchNorms that
precede their convolution (DenseNet's, pre-activation ResNets') cannot be folded and stay float,
as do MobileNetV3's hard-sigmoids.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from common.data import eval_batches, make_loader
from common.data.seeding import rng_for
from distill.cache.setup import cached_splits
from launch.deploy import ort_session

BATCH = 64
"""Images per calibration and evaluation batch."""
AGREEMENT_RISK = 1e-3
"""Chance, per side, that the int8 check fails a model that quantizes as its calibration says."""
_CALIBRATION_SALT = 0x18A8
METHOD = (
    "onnxruntime.quantization.quantize_static after quant_pre_process: QDQ, int8 weights per "
    "output channel, uint8 activations, min-max ranges over the calibration views"
)


def int8_model(cfg, float_path: Path, int8_path: Path) -> dict:
    """Write the int8 model of `float_path` to `int8_path`, calibrated on
    `pipeline.int8_calibration` training views; {"method", "calibration": {"images",
    "views", "disagreements": images whose int8 top-1 differs from float}, "float_layers"}."""
    train = cached_splits(cfg).train  # the cache's recipe, seed and plain-first rule
    views = cfg.cache.views
    keys = calibration_keys(train, views, cfg.pipeline.int8_calibration, cfg.run.seed)

    def batches() -> Iterator[dict]:
        return image_batches(train, keys, cfg.data.num_workers)

    quantize(float_path, int8_path, batches)
    f, q = (predictions(p, batches()) for p in (float_path, int8_path))
    return {
        "method": METHOD,
        "calibration": {
            "images": len(keys),
            "views": f"training views 0..{views - 1} of the cache's recipe (run.seed "
            f"{cfg.run.seed}), {len(keys)} of {len(train) * views} (sample, view) rows",
            "disagreements": int((f["pred"] != q["pred"]).sum()),
        },
        "float_layers": float_layers(int8_path, next(batches())["image"]),
    }


def calibration_keys(dataset, views: int, count: int, seed: int) -> list[tuple[int, int]]:
    """`count` (sample_id, view_id) rows of the cache's samples x views, drawn without
    replacement with a fixed seed: a spread over samples and views, the same every run."""
    total = len(dataset) * views
    rows = np.sort(rng_for(seed, _CALIBRATION_SALT).choice(total, min(count, total), False))
    return [(int(r // views), int(r % views)) for r in rows]


def image_batches(dataset, keys: list, num_workers: int = 0) -> Iterator[dict]:
    """Batches of `dataset[key]` for `keys` in order, as numpy (`image` float32 [B, C, H, W])."""
    batches = [keys[i : i + BATCH] for i in range(0, len(keys), BATCH)]
    for batch in make_loader(dataset, batches, num_workers):
        yield {k: v.numpy() for k, v in batch.items() if k in ("image", "label", "sample_id")}


def quantize(float_path: Path, int8_path: Path, batches: Callable[[], Iterator[dict]]) -> None:
    """Write the int8 model of `float_path`, its activation ranges taken over `batches()`."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = batches()

        def get_next(self):
            return next(({"image": b["image"]} for b in self.it), None)

    root = logging.getLogger()  # the quantizer warns through the root logger
    level = root.level
    with tempfile.TemporaryDirectory(dir=int8_path.parent) as tmp:
        simple = Path(tmp) / "simplified.onnx"
        try:
            root.setLevel(logging.ERROR)
            quant_pre_process(str(float_path), str(simple))
            quantize_static(
                str(simple),
                str(int8_path),
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
        finally:
            root.setLevel(level)


def float_layers(path: Path, example: np.ndarray) -> dict[str, int]:
    """{op type: count} of the nodes ONNX Runtime runs on float activations (an input of two
    or more dimensions in float32), quantize/dequantize excepted, in one profiled run of
    `example` on this CPU: the layers that did not quantize."""
    with tempfile.TemporaryDirectory() as tmp:
        sess = ort_session(path, profile_prefix=str(Path(tmp) / "profile"))
        sess.run(None, {"image": example})
        events = json.loads(Path(sess.end_profiling()).read_text())
    ops = Counter()
    for e in events:
        args = e.get("args", {})
        if e.get("cat") != "Node" or args.get("op_name") in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if any(len(s) >= 2 for t in args.get("input_type_shape", []) for s in _floats(t)):
            ops[args["op_name"]] += 1
    return dict(sorted(ops.items()))


def _floats(type_shape: dict) -> list:
    return [shape for dtype, shape in type_shape.items() if dtype == "float"]


def predictions(path: Path, batches: Iterator[dict]) -> dict[str, np.ndarray]:
    """{"sample_id", "label", "pred", "logits"} of the ONNX model at `path` over `batches`."""
    sess = ort_session(path)
    rows = {"sample_id": [], "label": [], "logits": []}
    for b in batches:
        rows["logits"].append(sess.run(None, {"image": b["image"]})[0])
        rows["sample_id"].append(b["sample_id"])
        rows["label"].append(b["label"])
    out = {k: np.concatenate(v) for k, v in rows.items()}
    out["pred"] = out["logits"].argmax(1)
    return out


def test_batches(dataset, num_workers: int = 0) -> Iterator[dict]:
    """The evaluation views of every image of `dataset` (the test split), in sample order."""
    keys = [k for batch in eval_batches(len(dataset), BATCH, 0, 1) for k in batch]
    return image_batches(dataset, keys, num_workers)


def check(calibration: dict, float_pred: np.ndarray, int8_pred: np.ndarray) -> dict:
    """The int8 check: top-1 agreement of the int8 model with the float one on images it was
    not calibrated on, against the bound its calibration allows (`agreement_bound`)."""
    agreement = float((float_pred == int8_pred).mean())
    n = len(float_pred)
    bound = agreement_bound(calibration["disagreements"], calibration["images"], n)
    return {"images": n, "top1_agreement": agreement, "bound": bound, "ok": agreement >= bound}


def agreement_bound(disagreements: int, calibrated: int, checked: int) -> float:
    """The lowest int8-vs-float top-1 agreement on `checked` images that is still consistent
    with the calibration, where the int8 model disagreed with the float one on
    `disagreements` of `calibrated` images.

    Each image is taken to flip its top-1 independently with one probability p. The
    calibration bounds p from above (Clopper-Pearson, one-sided, risk AGREEMENT_RISK:
    p_hi = Beta(1 - risk; k + 1, n - k)); with p <= p_hi, the flips among the checked images
    are at most the (1 - risk) quantile of Binomial(checked, p_hi). So a model that quantizes
    on new images as it did on its calibration images fails with probability < 2 x risk,
    whatever its accuracy; an untrained net's small margins flip often in calibration and are
    allowed to flip as often later. What fails it: inputs whose activations leave the
    calibrated ranges (clipped), i.e. calibration images unlike the inputs, or a broken graph.
    The calibration images set the ranges they are then measured on, so p is if anything
    underestimated there: the bound is strict, not lenient, on that count.
    """
    from scipy.stats import beta, binom

    k, n = disagreements, calibrated
    p_hi = 1.0 if k >= n else float(beta.ppf(1 - AGREEMENT_RISK, k + 1, n - k))
    allowed = float(binom.ppf(1 - AGREEMENT_RISK, checked, p_hi))
    return max(0.0, 1.0 - allowed / checked)
