"""The custom-data recipe, `configs/imagefolder/pretrained.yaml`, end to end on a generated
ImageFolder: ImageNet-"pretrained" torchvision weights (made here, under the names torchvision
expects, in a temporary torch hub cache) -> teacher fine-tune -> cache -> CE and KD students
-> slimming -> export -> report. Only sizes and epochs are overridden: the recipe's models,
pretrained weights, augmentation and stages are what runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from common.models.pretrained import cached_file, torchvision_weights
from tests.conftest import ROOT, cli_env, png_bytes, run_cli

RECIPE = ROOT / "configs/imagefolder/pretrained.yaml"
TEACHER, STUDENT = "resnext50_32x4d", "mobilenet_v3_large"


def colour_folder(root: Path) -> Path:
    """Three classes told apart by their dominant colour, images of several sizes."""
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 16), ("val", 4)):
        for c, name in enumerate(("red", "green", "blue")):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(per_class):
                h, w = (int(v) for v in rng.integers(36, 56, size=2))
                arr = rng.integers(0, 120, size=(h, w, 3), dtype=np.uint8)
                arr[..., c] += 120
                (d / f"{i:03d}.png").write_bytes(png_bytes(arr))
    return root


def hub_cache(torch_home: Path) -> dict[str, Path]:
    """torchvision's DEFAULT weight files of both recipe models, made locally (recognisable
    values: each a freshly initialised 1,000-class network of a fixed seed)."""
    files = {}
    for seed, name in enumerate((TEACHER, STUDENT)):
        torch.manual_seed(seed)
        model = torchvision.models.get_model(name, weights=None)
        path = (
            torch_home
            / "hub"
            / "checkpoints"
            / cached_file(torchvision_weights(name, "DEFAULT")).name
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
        files[name] = path
    return files


SMALL = [
    "data.image_size=32",
    "data.num_workers=0",
    "train.loop.epochs=2",
    "train.loop.batch_size=16",
    "cache.views=2",
    "cache.batch_size=32",
    "distill.seeds=[0]",
    "distill.loop.epochs=2",
    "distill.loop.batch_size=16",
    "distill.loop.recalibrate_bn=2",
    "sparsity.loop.epochs=1",
    "sparsity.loop.batch_size=16",
    "sparsity.loop.recalibrate_bn=2",
    "finetune.loop.epochs=1",
    "finetune.loop.batch_size=16",
    "finetune.loop.recalibrate_bn=2",
    "prune.recalibrate_bn=2",
    "prune.recalibrate_batch_size=16",
    "prune.latency_repeats=2",
    "prune.latency_batches=[1]",
]


@pytest.mark.timeout(600)
def test_recipe_runs_end_to_end_on_your_own_images(tmp_path):
    data = colour_folder(tmp_path / "images")
    files = hub_cache(tmp_path / "torch")
    env = cli_env(TORCH_HOME=str(tmp_path / "torch"), KDSLIM_OFFLINE="1")
    out = tmp_path / "run"
    args = ["pipeline", "--config", str(RECIPE), f"data.root={data}", f"run.out_dir={out}"]
    proc = run_cli(*args, *SMALL, env=env, timeout=1500)
    log = proc.stdout + proc.stderr

    # the pretrained files were read, and the replaced heads named
    assert "kept freshly initialised" in log and "fc.weight" in log and "classifier.3" in log
    teacher_dir = out / "train" / f"tv_{TEACHER}-s0"
    assert teacher_dir.is_dir()
    stem = torch.load(files[TEACHER], weights_only=True)["conv1.weight"]
    assert not torch.equal(stem, torch.zeros_like(stem))
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["teachers"][0]["name"] == f"tv_{TEACHER}-s0"
    # 16 x 3 training images: 10% held out for validation; val/ is the test split
    assert report["splits"] == {"train": 43, "val": 5, "test": 12}
    slim = report["slim"]
    assert slim["target"] == "macs" and slim["macs_ratio"] < 0.75  # 40% asked, rounded
    assert slim["pruned"]["params"] < slim["baseline"]["params"]
    text = (out / "report" / "report.md").read_text()
    assert "## Verdict" in text and "tv_resnext50_32x4d-s0" in text
    # the report names its data: classes, chance, and that the user's val/ is the "test" split
    assert report["data"]["classes"] == ["blue", "green", "red"]  # sorted folder names
    assert report["data"]["chance"] == 1 / 3
    assert f"the test split reported below is {data / 'val'}" in text
    assert "3 classes (blue, green, red), chance 33.3%" in text
    assert "Students: `tv_mobilenet_v3_large`" in text
    spec = json.loads((out / "finetune" / "model" / "model.json").read_text())
    assert spec["name"] == "tv_mobilenet_v3_large" and spec["widths"]  # pruned: stored widths
    export = json.loads((out / "export" / "export.json").read_text())
    assert export["ok"] and set(export["checks"]) == {
        "safetensors",
        "safetensors_fused",
        "torchscript",
        "onnx",
    }

    # offline, with an empty hub cache: the error names the file and where it goes
    empty = cli_env(TORCH_HOME=str(tmp_path / "empty"), KDSLIM_OFFLINE="1")
    refused = run_cli(*args, f"run.out_dir={tmp_path / 'run2'}", *SMALL, env=empty, check=False)
    assert refused.returncode != 0
    assert files[TEACHER].name in refused.stderr and str(tmp_path / "empty") in refused.stderr
    assert "Traceback" not in refused.stderr
