"""What a deployment gets from an export, on a tiny trained digits student: an int8 model that
loads, runs and agrees with the float one within the bound its calibration derives; an
export.json that names the classes and describes the evaluation preprocessing completely
enough that `kdslim predict`, implemented from it alone, gives the evaluation pipeline's
logits on image files; `kdslim measure` printing the costs table; clear errors on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from common.checkpoint import load_model, model_spec, save_model
from common.config import load_config
from common.data import build_splits
from common.files import INT8_PREDICTIONS, PREDICTIONS_FILE, load_predictions
from common.models import build_model
from launch import deploy, quantize
from launch.config import Config
from launch.export import export_student, input_spec
from tests.artifacts import DATA
from tests.cli import ROOT, assert_one_line_error, run_cli

CALIBRATION = 256


def config(out: Path, *extra: str):
    args = [f"run.out_dir={out}", *DATA, f"pipeline.int8_calibration={CALIBRATION}", *extra]
    return load_config(Config, ROOT / "tests/configs/base.yaml", args)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, dict, object]:
    """(export directory, export.json, config) of a small VGG trained for 40 steps on 8x8
    digits: trained, so its logit margins are those of a model, not of noise."""
    root = tmp_path_factory.mktemp("deploy")
    cfg = config(root / "run")
    train = build_splits(cfg.data, cfg.run.seed).train
    x = torch.stack([train[(i, 0)]["image"] for i in range(len(train))])  # [135, 3, 8, 8]
    y = torch.as_tensor(train.source.labels)
    torch.manual_seed(0)
    kwargs = {"cfg": [16, "M", 32]}
    model = build_model("cifar_vgg11", 10, **kwargs)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    save_model(root / "student", model.eval(), model_spec("cifar_vgg11", 10, kwargs))
    result = export_student(cfg, root / "student", root / "export")
    return root / "export", result, cfg


def test_export_json_names_the_classes_and_describes_preprocessing(exported):
    out, _, cfg = exported
    on_disk = json.loads((out / "export.json").read_text())
    assert on_disk["classes"] == [str(d) for d in range(10)]
    pre = on_disk["preprocess"]
    recipe = build_splits(cfg.data, cfg.run.seed).test.recipe
    assert pre["resize"] == {"size": [8, 8]} and pre["center_crop"] is None
    assert pre["mean"] == recipe.mean.flatten().tolist() and pre["divide_by"] == 255.0
    assert pre["channel_order"] == "RGB" and on_disk["input_shape"][1:] == [3, 8, 8]
    # the per-image predictions of both ONNX models, paired over the whole test split
    n = on_disk["accuracy"]["test_images"]
    for name, key in ((PREDICTIONS_FILE, "onnx"), (INT8_PREDICTIONS, "onnx_int8")):
        table = load_predictions(out / name)
        assert list(table["sample_id"]) == list(range(n))
        assert on_disk["accuracy"][key] == pytest.approx((table["pred"] == table["label"]).mean())
    assert on_disk["accuracy"]["onnx"] > 0.5  # trained: far above chance (0.1)
    gain = on_disk["accuracy"]["int8_minus_float"]
    assert gain["n"] == n and gain["ci95"][0] <= gain["gain"] <= gain["ci95"][1]


def test_int8_model_runs_and_agrees_with_float_within_the_calibrated_bound(exported):
    out, result, cfg = exported
    int8 = result["int8"]
    assert (out / "model.int8.onnx").stat().st_size < 0.6 * (out / "model.onnx").stat().st_size
    assert int8["calibration"]["images"] == CALIBRATION
    assert isinstance(int8["float_layers"], dict)  # op type -> count, empty when all quantized
    # independently: both models on the test images, through the deployed files
    test = build_splits(cfg.data, cfg.run.seed).test
    x = np.stack([test[(i, -1)]["image"].numpy() for i in range(len(test))])
    float_pred, int8_pred = (
        deploy.ort_session(out / f).run(None, {"image": x})[0].argmax(1)
        for f in ("model.onnx", "model.int8.onnx")
    )
    agreement = float((float_pred == int8_pred).mean())
    bound = quantize.agreement_bound(int8["calibration"]["disagreements"], CALIBRATION, len(test))
    assert agreement == int8["check"]["top1_agreement"] >= bound == int8["check"]["bound"]
    assert 0.9 < bound < 1  # 256 calibration views of a trained net: a bound that binds


def test_agreement_bound_follows_the_calibration():
    """More flips in calibration allow more later; more calibration views tighten it."""
    assert quantize.agreement_bound(0, 512, 359) > quantize.agreement_bound(5, 512, 359)
    assert quantize.agreement_bound(0, 4096, 359) > quantize.agreement_bound(0, 128, 359)
    assert quantize.agreement_bound(128, 128, 359) == 0.0  # every image flipped: no bound
    # no flips in 512 views: p < 1.34% (99.9%), so at most 13 of 359 test images may flip
    assert quantize.agreement_bound(0, 512, 359) == pytest.approx(1 - 13 / 359)
    # an int8 model that flips 72 test images when its calibration flipped none fails
    flipped = (np.arange(359) % 5 == 0).astype(np.int64)
    result = quantize.check({"disagreements": 0, "images": 512}, np.zeros(359), flipped)
    assert not result["ok"] and result["top1_agreement"] == pytest.approx(1 - 72 / 359)


def write_pngs(dataset, directory: Path, ids) -> list[Path]:
    paths = []
    for i in ids:
        path = directory / f"{i}.png"
        Image.fromarray(dataset.source.image(i).permute(1, 2, 0).numpy()).save(path)
        paths.append(path)
    return paths


def test_predict_gives_the_evaluation_pipelines_logits(exported, tmp_path):
    out, result, cfg = exported
    test = build_splits(cfg.data, cfg.run.seed).test
    ids = [0, 1, 2, 57]
    paths = write_pngs(test, tmp_path, ids)
    # the preprocessing export.json describes, implemented from it alone: the same pixels
    for i, path in zip(ids, paths):
        want = test[(i, -1)]["image"].numpy()
        got = deploy.preprocess(deploy.load_image(path), result["preprocess"])
        assert got.dtype == np.float32 and np.array_equal(got, want)
    model, _ = load_model(out / "model")
    with torch.inference_mode():  # what evaluation computes: the model on the plain views
        want = model.eval()(torch.stack([test[(i, -1)]["image"] for i in ids])).numpy()
    got = deploy.logits(out, paths)
    np.testing.assert_allclose(got, want, rtol=0, atol=result["tolerance"])

    proc = run_cli("predict", str(out), *map(str, paths[:2]), "--model", "int8", "--top", "3")
    lines = proc.stdout.splitlines()
    assert lines[0] == str(paths[0]) and len(lines) == 8  # a name, then 3 classes, twice
    best = lines[1].split()
    assert best[1] == result["classes"][int(want[0].argmax())] and best[0].endswith("%")


def test_imagenet_preprocessing_is_described_exactly(image_folder):
    """The resize-then-centre-crop recipe (image folders): export.json's description, run
    by `launch.deploy`, gives evaluation's pixels (the same geometry; Pillow's filter and
    torch's differ in float rounding only, by one grey level on a few pixels)."""
    cfg = config(
        image_folder.parent / "run",
        f"data.root={image_folder}",
        "data.name=imagefolder",
        "data.augment=imagenet",
        "data.image_size=16",
    )
    shape, pre, classes = input_spec(cfg)
    assert classes == ["clear", "fire", "smoke"] and shape == (3, 16, 16)
    assert pre["resize"] == {"short_side": 18} and pre["center_crop"] == [16, 16]
    test = build_splits(cfg.data, cfg.run.seed).test
    exact = test.source.folder / "clear" / "exact.png"  # short side 18 already: crop only
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (18, 30, 3), np.uint8)).save(exact)
    test = build_splits(cfg.data, cfg.run.seed).test
    std = np.asarray(pre["std"], np.float32)[:, None, None]
    for i, path in enumerate(test.source._paths):
        want = test[(i, -1)]["image"].numpy()
        got = deploy.preprocess(deploy.load_image(path), pre)
        levels = np.abs(got - want) * std * 255  # in grey levels
        if Path(path) == exact:
            assert np.array_equal(got, want)
        assert levels.max() < 1.001 and (levels > 0.5).mean() < 0.01, path


def test_measure_prints_the_costs_table(exported, tmp_path):
    out, result, _ = exported
    costs = result["costs"]  # what the export stage measured: every format, both batches
    assert [r["model"] for r in costs["rows"]] == [
        "ONNX Runtime float",
        "ONNX Runtime int8",
        "PyTorch float",
    ]
    for r in costs["rows"]:
        assert r["size_bytes"] > 0 and set(r["latency_ms"]) == {"1", "64"}
        assert all(v > 0 for v in r["latency_ms"].values())
        assert all(v is None or v > 0 for v in r["peak_memory_bytes"].values())
    # on a deployment host: the ONNX files and export.json alone (no PyTorch model)
    for name in ("export.json", "model.onnx", "model.int8.onnx"):
        (tmp_path / name).write_bytes((out / name).read_bytes())
    proc = run_cli("measure", str(tmp_path))
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:2] == ["model", "file"] and "latency ms bs1 / bs64" in lines[0]
    assert lines[2].startswith("ONNX Runtime float  model.onnx")
    assert lines[3].startswith("ONNX Runtime int8") and lines[4] == ""
    assert f"{result['accuracy']['onnx_int8']:.4f}" in lines[3]
    assert "1 thread(s)" in proc.stdout and "int8 instruction sets:" in proc.stdout


def test_bad_input_is_one_clear_error(exported, tmp_path):
    out, _, _ = exported
    (tmp_path / "not-an-image.png").write_text("hello")
    (tmp_path / "empty").mkdir()
    cases = [
        (("predict", str(tmp_path / "missing"), "x.png"), "does not exist"),
        (("predict", str(tmp_path / "empty"), "x.png"), "export.json is missing"),
        (("predict", str(out), str(tmp_path / "not-an-image.png")), "cannot read image"),
        (("predict", str(out), str(tmp_path / "absent.png")), "absent.png does not exist"),
        (("measure", str(tmp_path / "empty")), "export.json is missing"),
    ]
    for args, needle in cases:
        assert_one_line_error(run_cli(*args, check=False), 2, needle)
    assert run_cli("predict", str(out), "x.png", "--top", "0", check=False).returncode == 2
