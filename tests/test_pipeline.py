"""`python -m launch pipeline`: the whole run end to end on digits with tiny budgets, its
report and export, skipping complete steps, and resuming after a lost or unfinished step."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from common.checkpoint import load_model
from common.config import ConfigError, load_config
from launch.config import Config
from launch.pipeline_config import PIPELINE_STEPS
from tests.conftest import ROOT, run_cli

TINY = [
    "data.train_subset=192",
    "data.test_subset=96",
    "data.image_size=12",
    "logging.progress=false",
    "cache.views=2",
    "cache.verify_samples=16",
    "prune.latency_repeats=2",
    "prune.latency_batches=[1]",
    *(
        f"{s}.loop.{k}"
        for s in ("train", "distill", "sparsity", "finetune")
        for k in ("max_steps=3", "batch_size=32")
    ),
]


def pipeline(out: Path, *extra: str, processes: int = 1):
    return run_cli(
        "pipeline",
        "--config",
        str(ROOT / "configs/quickstart.yaml"),
        f"run.out_dir={out}",
        *TINY,
        *extra,
        processes=processes,
        timeout=400,
    )


def steps_that_ran(stdout: str) -> list[str]:
    return re.findall(r"pipeline: \[([\w-]+)\] running", stdout)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("pipe") / "run"
    return out, pipeline(out).stdout


def test_first_run_runs_every_step_and_prints_report(run_dir):
    out, stdout = run_dir
    assert steps_that_ran(stdout) == list(PIPELINE_STEPS)
    assert f"report: {(out / 'report.json').resolve()}" in stdout
    assert "pruned + fine-tuned" in stdout and "student KD (cached)" in stdout


def test_report_has_every_field(run_dir):
    out, _ = run_dir
    r = json.loads((out / "report.json").read_text())
    accs = [t["acc"] for t in r["teachers"]] + [
        r["ensemble"]["acc"],
        r["student_ce"]["acc"],
        r["student_kd"]["acc"],
        r["slim"]["baseline"]["acc"],
        r["slim"]["pruned"]["acc_before_finetune"],
        r["slim"]["pruned"]["acc"],
        r["cache"]["teacher_top1_agreement"],
    ]
    assert len(r["teachers"]) == 1
    assert all(isinstance(a, float) and 0 <= a <= 1 for a in accs), accs
    assert r["cache"]["num_samples"] == 192 and r["cache"]["views_per_sample"] == 2
    assert r["cache"]["bytes"] > 0
    base, pruned = r["slim"]["baseline"], r["slim"]["pruned"]
    assert 0 < pruned["params"] < base["params"] and 0 < pruned["macs"] < base["macs"]
    assert base["latency_ms"]["1"] > 0 and pruned["latency_ms"]["1"] > 0
    assert r["slim"]["prune_ratio"] == 0.5
    md = (out / "report.md").read_text()
    for key in ("accuracy", "gamma_before", "gamma_after", "widths"):
        png = out / "report" / f"{key}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"(report/{key}.png)" in md


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_export_matches_pytorch(run_dir):
    out, _ = run_dir
    e = json.loads((out / "export" / "export.json").read_text())
    assert e["ok"] and e["source"] == str(out / "finetune" / "model")
    assert set(e["checks"]) == {"safetensors", "torchscript", "onnx"}
    # pipeline.export_atol: TorchScript and onnxruntime are other float32 kernels for the
    # same graph; ~1e-6 apart on logits of size ~10, 1e-4 is the documented export bound
    assert all(c["ok"] and c["max_abs_diff"] <= 1e-4 for c in e["checks"].values())
    assert e["checks"]["onnx"]["opset"] >= 17
    assert e["preprocess"]["image_size"] == 12 and len(e["preprocess"]["std"]) == 3
    # independently: each file gives the fine-tuned model's outputs
    model, _ = load_model(out / "finetune" / "model")
    model.eval()
    x = torch.randn(5, 3, 12, 12)
    with torch.inference_mode():
        ref = model(x)
        ts = torch.jit.load(str(out / "export" / "model.torchscript.pt"))(x)
    assert torch.allclose(ts, ref, atol=1e-4)
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(
        str(out / "export" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    got = torch.from_numpy(sess.run(None, {"image": x.numpy()})[0])
    assert torch.allclose(got, ref, atol=1e-4)


def test_rerun_skips_every_step(run_dir):
    out, _ = run_dir
    stdout = pipeline(out).stdout
    assert steps_that_ran(stdout) == []
    assert all(f"[{s}] skipped: complete" in stdout for s in PIPELINE_STEPS)
    assert "0 step(s) ran" in stdout and "pruned + fine-tuned" in stdout


def test_lost_or_unfinished_step_reruns_with_what_follows(run_dir):
    out, _ = run_dir
    before = (out / "distill" / "metrics.json").stat().st_mtime_ns
    shutil.rmtree(out / "prune")  # a late stage's outputs lost
    stdout = pipeline(out).stdout
    assert steps_that_ran(stdout) == ["prune", "finetune", "export", "report"]
    assert "[distill] skipped" in stdout
    assert (out / "distill" / "metrics.json").stat().st_mtime_ns == before
    assert any(p.name.startswith("finetune-") for p in (out / "stale").iterdir())

    # killed before the end: no metrics.json, config and checkpoints kept -> it resumes
    (out / "finetune" / "metrics.json").unlink()
    stdout = pipeline(out).stdout
    assert steps_that_ran(stdout) == ["finetune", "export", "report"]
    assert "[finetune] running (unfinished" in stdout
    assert json.loads((out / "report.json").read_text())["export"]["ok"]


@pytest.mark.slow
def test_two_processes_run_the_same_sequence(tmp_path):
    """Under `accelerate launch` every rank runs every step; the process group survives
    the stages' `end_training()` and the ranks agree on what to skip."""
    out = tmp_path / "run"
    slim = ("pipeline.ce_baseline=false", "pipeline.export=false")
    stdout = pipeline(out, *slim, processes=2).stdout
    assert steps_that_ran(stdout) == [
        s for s in PIPELINE_STEPS if s not in ("distill-ce", "export")
    ]
    assert json.loads((out / "finetune" / "metrics.json").read_text())["world_size"] == 2
    r = json.loads((out / "report.json").read_text())
    assert r["student_ce"]["acc"] is None and r["export"] is None  # not run: null
    assert r["slim"]["pruned"]["params"] < r["slim"]["baseline"]["params"]
    # a changed config: the ranks agree that only that step and those after it run again
    stdout = pipeline(out, *slim, "finetune.loop.optim.lr=0.01", processes=2).stdout
    assert steps_that_ran(stdout) == ["finetune", "report"]
    assert "[prune] skipped: complete" in stdout and "differs from the config" in stdout


def test_pipeline_config_is_validated():
    with pytest.raises(ConfigError, match="pipeline.stages"):
        load_config(Config, None, ["pipeline.stages=[train, distil]"])
    with pytest.raises(ConfigError, match="onnx_opset"):
        load_config(Config, None, ["pipeline.onnx_opset=13"])
