"""Use an exported model where it runs: read `export.json`, preprocess image files exactly as
evaluation does, run the float or the int8 ONNX model (`kdslim predict`).

Only the export directory is read, never the training configuration, and neither torch nor
kdslim's data code is imported: a deployment host needs numpy, Pillow and onnxruntime. The
preprocessing is implemented from export.json's description alone, so the description is
complete by construction: tests compare this implementation with the evaluation pipeline.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from common.errors import DataError, ModelFileError

EXPORT_FILE = "export.json"
MODELS = {"float": "onnx", "int8": "onnx_int8"}
"""A `--model` choice -> its key in export.json's `files`."""
BATCH = 64
"""Images preprocessed and run at a time."""


def read_export(directory: str | Path) -> tuple[Path, dict]:
    """(the directory, its export.json), or a ModelFileError saying what to pass instead."""
    d = Path(directory)
    if not d.is_dir():
        raise ModelFileError(
            f"export directory {d} does not exist: pass the `export/` directory of a run "
            "(<run.out_dir>/export, with export.json beside model.onnx)"
        )
    path = d / EXPORT_FILE
    try:
        export = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelFileError(
            f"{path} is missing: {d} is not a finished export; pass <run.out_dir>/export, or "
            "run `python -m launch export --config FILE` to make one"
        ) from None
    except (OSError, ValueError) as e:
        raise ModelFileError(f"cannot read {path}: {e}; run the export stage again") from None
    if "resize" not in export.get("preprocess", {}):
        raise ModelFileError(
            f"{path} does not describe its preprocessing (an export made before kdslim wrote "
            "it): run the export stage again"
        )
    return d, export


def model_file(directory: Path, export: dict, model: str) -> Path:
    """The ONNX file of `model` ("float" or "int8") in an export directory."""
    rel = export["files"].get(MODELS[model])
    if rel is None:
        raise ModelFileError(
            f"{directory} has no {model} model (export.json lists none; the int8 model is "
            "written when `pipeline.int8_calibration` > 0): use --model float"
        )
    path = directory / rel
    if not path.is_file():
        raise ModelFileError(f"{path} is missing: copy the whole export directory")
    return path


def ort_session(path: Path, threads: int = 1, profile_prefix: str | None = None):
    """An ONNX Runtime CPU session with `threads` intra-op threads (1: the caller's thread
    only, what a shared or loaded CPU measures reproducibly)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3  # errors only: ORT warns about transforms it could not apply
    if profile_prefix:
        opts.enable_profiling, opts.profile_file_prefix = True, profile_prefix
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own exception types, one per failure kind
        raise ModelFileError(f"ONNX Runtime cannot load {path}: {e}") from None


def load_image(path: str | Path) -> np.ndarray:
    """uint8 [H, W, 3] RGB pixels of an image file (grey, palette, alpha: converted)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise DataError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(
            f"cannot read image {path} ({e}): pass PNG, JPEG or another format Pillow reads"
        ) from None


def resized_size(height: int, width: int, resize: dict) -> tuple[int, int]:
    """(H, W) after export.json's `resize`: `short_side` keeps the aspect ratio, `size` not."""
    if "size" in resize:
        return tuple(resize["size"])
    s = resize["short_side"]
    if height <= width:
        return s, max(s, round(width * s / height))
    return max(s, round(height * s / width)), s


def preprocess(rgb: np.ndarray, pre: dict) -> np.ndarray:
    """float32 [3, S, S] network input from uint8 [H, W, 3] pixels, as export.json says."""
    h, w = rgb.shape[:2]
    nh, nw = resized_size(h, w, pre["resize"])
    if (nh, nw) != (h, w):
        rgb = _resize(rgb, nh, nw)
    if pre.get("center_crop"):
        ch, cw = pre["center_crop"]
        top, left = (nh - ch) // 2, (nw - cw) // 2
        rgb = rgb[top : top + ch, left : left + cw]
    x = rgb.transpose(2, 0, 1).astype(np.float32) / np.float32(pre["divide_by"])
    mean, std = (np.asarray(pre[k], np.float32)[:, None, None] for k in ("mean", "std"))
    return (x - mean) / std  # float32 throughout, as the evaluation pipeline computes it


def _resize(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """Antialiased bilinear resize of each channel in float (Pillow's BILINEAR filter, which
    torch's `interpolate(antialias=True)` reproduces), rounded half to even into 0..255."""
    from PIL import Image

    out = [
        np.asarray(Image.fromarray(rgb[..., c].astype(np.float32)).resize((width, height), 2))
        for c in range(rgb.shape[-1])  # 2: Image.Resampling.BILINEAR
    ]
    return np.clip(np.round(np.stack(out, -1)), 0, 255).astype(np.uint8)


def logits(directory, images: list, model: str = "float", threads: int = 1) -> np.ndarray:
    """float32 [len(images), classes] logits of the exported `model` on image files."""
    d, export = read_export(directory)
    sess = ort_session(model_file(d, export, model), threads)
    out = []
    for i in range(0, len(images), BATCH):  # memory bounded by the batch, not the file list
        x = np.stack(
            [preprocess(load_image(p), export["preprocess"]) for p in images[i : i + BATCH]]
        )
        out.append(sess.run(None, {"image": x})[0])
    return np.concatenate(out)


def predict(directory, images: list, model: str = "float", top: int = 5) -> list[dict]:
    """For each image file: {"image", "top": [(class name, probability), ...]}, best first."""
    names = read_export(directory)[1]["classes"]
    z = logits(directory, images, model).astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    best = np.argsort(-p, axis=1, kind="stable")[:, :top]
    return [
        {"image": str(img), "top": [(names[j], float(p[i, j])) for j in best[i]]}
        for i, img in enumerate(images)
    ]


def format_predictions(results: list[dict]) -> str:
    lines = []
    for r in results:
        lines.append(r["image"])
        lines += [f"  {100 * prob:6.2f}%  {name}" for name, prob in r["top"]]
    return "\n".join(lines)
