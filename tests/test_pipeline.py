"""`python -m launch pipeline`: the whole run end to end on digits with tiny budgets (a teacher
ensemble, students over seeds), its report and export, freshness by content (what re-runs when
a value changes, when an output is lost), caches shared between runs, and the plan."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from common.checkpoint import load_model
from common.config import ConfigError, load_config
from common.stats import accuracy_interval
from launch import graph
from launch.config import Config
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
    "train.members=[{seed: 0}, {seed: 1}]",
    "distill.seeds=[0, 1]",
    *(
        f"{s}.loop.{k}"
        for s in ("train", "distill", "sparsity", "finetune")
        for k in ("max_steps=3", "batch_size=32")
    ),
]
MEMBERS = ["train:cifar_resnet20-s0", "train:cifar_resnet20-s1"]
EVERY = [
    *MEMBERS,
    "cache",
    "verify-cache",
    "distill-ce:seed0",
    "distill-ce:seed1",
    "distill:seed0",
    "distill:seed1",
    "sparsity",
    "prune",
    "finetune",
    "export",
    "report",
]


def pipeline(out: Path, *extra: str, processes: int = 1):
    return run_cli(
        "pipeline",
        "--config",
        str(ROOT / "tests/configs/base.yaml"),
        f"run.out_dir={out}",
        *TINY,
        *extra,
        processes=processes,
        timeout=600,
    )


def ran(stdout: str) -> list[str]:
    return re.findall(r"\[([\w:.-]+)\] running", stdout)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("pipe") / "run"
    return out, pipeline(out).stdout


def test_first_run_runs_every_node_of_the_graph_and_prints_the_verdict(run_dir):
    out, stdout = run_dir
    assert ran(stdout) == EVERY
    assert [
        n.name for n in graph.nodes(load_config(Config, ROOT / "tests/configs/base.yaml", TINY))
    ] == EVERY
    assert f"report: {(out / 'report' / 'report.json').resolve()}" in stdout
    assert "pruned + fine-tuned" in stdout and "student KD (cached)" in stdout
    assert "verdict:" in stdout and "points over CE (2 seed(s)), 95% CI [" in stdout
    for node in EVERY:  # each finished node records what it was made from
        key = json.loads(
            (graph.directory(_cfg(out), graph.Node.parse(node)) / "key.json").read_text()
        )
        assert len(key["key"]) == 64 and "values" in key and "inputs" in key


def _cfg(out: Path, *extra: str):
    return load_config(
        Config, ROOT / "tests/configs/base.yaml", [f"run.out_dir={out}", *TINY, *extra]
    )


def test_report_tables_render_and_numbers_are_rounded(run_dir):
    """Every Markdown table row has its header's cells (`|gamma|` once split a row), no
    number carries float noise, sizes have units, and the log says what a prune round did
    in words (it dumped a dict)."""
    out, stdout = run_dir
    md = (out / "report" / "report.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("|")]
    assert rows and "\\|gamma\\|" in md

    def cells(line: str) -> int:
        return len(re.findall(r"(?<!\\)\|", line)) - 1

    tables, current = [], []
    for line in [*md.splitlines(), ""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    for table in tables:
        assert len({cells(line) for line in table}) == 1, table
    assert not re.search(r"\d\.\d{7,}", md), re.findall(r"\S*\d\.\d{7,}\S*", md)
    # students: the mean and the range over seeds, never "± std" (the verdict compares them)
    r = json.loads((out / "report" / "report.json").read_text())
    kd = [x["acc"] for x in r["student_kd"]["seeds"]]
    shown = f"{r['student_kd']['mean']:.4f} (2 seeds: {min(kd):.4f}-{max(kd):.4f})"
    assert shown in md and shown in stdout and "±" not in md
    assert re.search(r"\| size on disk \| \d[\d.]* (B|kB|MB|GB) \|", md), md
    rounds = [line for line in stdout.splitlines() if line.startswith("prune round")]
    assert rounds and not any("{" in line for line in rounds), rounds
    assert re.search(r"cache: complete in .*\(\d+ rows, [\d.]+ (kB|MB)", stdout), stdout


def test_report_has_every_field(run_dir):
    out, _ = run_dir
    r = json.loads((out / "report" / "report.json").read_text())
    assert [t["name"] for t in r["teachers"]] == ["cifar_resnet20-s0", "cifar_resnet20-s1"]
    assert r["splits"] == {"train": 173, "val": 19, "test": 96}
    for key in ("student_ce", "student_kd"):
        s = r[key]
        assert [row["seed"] for row in s["seeds"]] == [0, 1] and s["n"] == 2
        accs = [row["acc"] for row in s["seeds"]]
        assert s["mean"] == pytest.approx(sum(accs) / 2, abs=0)
        assert s["std"] == pytest.approx(abs(accs[0] - accs[1]) / 2**0.5, rel=1e-12)
    g = r["kd_gain"]
    assert g["gain"] == r["student_kd"]["mean"] - r["student_ce"]["mean"]
    twins = zip(r["student_ce"]["seeds"], r["student_kd"]["seeds"])
    assert g["twins"] == 2 and g["ahead"] == sum(kd["acc"] > ce["acc"] for ce, kd in twins)
    # every comparison with its paired interval, recomputable from the saved predictions
    v = {x["comparison"]: x for x in r["verdicts"]}
    assert list(v) == [
        "ensemble vs best member",
        "KD vs CE",
        "pruned + fine-tuned vs unpruned",
        "int8 vs float",
    ]
    for x in v.values():
        assert x["n_test"] == 96 and x["ci95"][0] <= x["gain"] <= x["ci95"][1], x
        assert x["beyond_noise"] == (x["direction"] != "within noise"), x
        assert x["method"].startswith("paired bootstrap over test images"), x  # < 3 seeds
    assert (v["KD vs CE"]["n_seeds"], v["ensemble vs best member"]["n_seeds"]) == (2, None)

    def correct(stage: str, file: str = "test_predictions.npz"):
        table = np.load(out / stage / file)
        assert list(table["sample_id"]) == list(range(96))
        return table["pred"] == table["label"]

    kd_minus_ce = [
        correct(f"distill/seed{i}").mean() - correct(f"distill-ce/seed{i}").mean() for i in (0, 1)
    ]
    assert v["KD vs CE"]["gain"] == pytest.approx(np.mean(kd_minus_ce), abs=1e-12)
    assert v["KD vs CE"]["gain"] == pytest.approx(g["gain"], abs=1e-12)
    int8 = correct("export", "int8_test_predictions.npz").mean() - correct("export").mean()
    assert v["int8 vs float"]["gain"] == pytest.approx(int8, abs=1e-12)
    ensemble = correct("distill/seed0", "ensemble_test_predictions.npz").mean()
    assert ensemble == pytest.approx(r["ensemble"]["acc"], abs=1e-12)
    e = r["ensemble"]
    assert e["members"] == 2 and e["best_member_acc"] == max(t["acc"] for t in r["teachers"])
    assert e["gain_over_best_member"] == e["acc"] - e["best_member_acc"]
    accs = [t["acc"] for t in r["teachers"]] + [
        e["acc"],
        r["slim"]["baseline"]["acc"],
        r["slim"]["pruned"]["acc_before_finetune"],
        r["slim"]["pruned"]["acc"],
        r["cache"]["teacher_top1_agreement"],
    ]
    assert all(isinstance(a, float) and 0 <= a <= 1 for a in accs), accs
    assert r["cache"]["num_samples"] == 173 and r["cache"]["views_per_sample"] == 2
    s = r["slim"]
    assert s["model"] == "distill:seed0"  # the graph: slimming starts from the KD student
    assert 0 < s["pruned"]["params"] < s["baseline"]["params"]
    assert s["baseline"]["latency_ms"]["1"] > 0 and s["pruned"]["latency_ms"]["1"] > 0
    assert s["prune_ratio"] == 0.5 and s["target"] == "channels"
    assert {"below_1pct", "valley", "bimodality"} <= set(s["sparsity"]["separation"])
    # these tiny models sit at chance: said first, naming each (the Wilson interval of its
    # accuracy on the 96 test images reaches 10%)
    chance = [t["acc"] for t in r["teachers"]] + [x["acc"] for x in r["student_kd"]["seeds"]]
    assert any(accuracy_interval(a, 96)[0] <= 0.1 for a in chance), chance
    assert r["warnings"][0].startswith("AT CHANCE (10.0% with 10 classes")
    assert r["verdict"][: len(r["warnings"])] == r["warnings"]  # said before anything else
    verdict = r["verdict"][len(r["warnings"]) :]
    assert len(verdict) == 5
    assert verdict[0].startswith("ensemble of 2 teachers")
    assert verdict[1].startswith("KD ") and "95% CI [" in verdict[1]
    assert "over 2 seed pair(s), 96 test images; paired bootstrap" in verdict[1]
    assert verdict[2].startswith("slimming: params -")
    over = s["latency_ratio"]["1"] / s["macs_ratio"]  # how far latency fell against MACs
    assert f"latency kept / MACs kept {over:.2f}" in verdict[2]
    # before fine-tuning, like for like: both nets' BN statistics re-estimated alike
    same = s["baseline"]["acc_bn_recalibrated"]
    assert isinstance(same, float) and 0 <= same <= 1
    drop = s["pruned"]["acc_before_finetune"] - same
    assert (
        f"({100 * drop:+.1f} points; both with BN statistics re-estimated on the same"
        in (verdict[2])
    )
    # deploying: the pruned int8 model against the pruned float one and the unpruned student,
    # each format measured at export (export/ and export/unpruned/)
    assert verdict[3].startswith("deployable model `model.int8.onnx` (ONNX Runtime int8, 1 ")
    assert "the memory of the pruned float model" in verdict[3]
    assert "the memory of the unpruned student; int8 accuracy" in verdict[3]
    d = r["deploy"]
    assert [(x["student"], x["model"]) for x in d["rows"]] == [
        ("unpruned", "ONNX Runtime float"),
        ("unpruned", "PyTorch float"),
        ("pruned", "ONNX Runtime float"),
        ("pruned", "ONNX Runtime int8"),
        ("pruned", "PyTorch float"),
    ]
    sizes = {(x["student"], x["precision"], x["runtime"]): x["size_bytes"] for x in d["rows"]}
    assert sizes["pruned", "int8", "onnxruntime"] < sizes["pruned", "float", "onnxruntime"]
    assert sizes["pruned", "float", "onnxruntime"] < sizes["unpruned", "float", "onnxruntime"]
    md = (out / "report" / "report.md").read_text()
    assert "## Deployment: size, memory, latency, accuracy" in md
    assert "## Verdict" in md and "173 training, 19 validation" in md
    # the rule every stage's reported weights follow, read from each stage's metrics (the
    # sparsity stage keeps its last epoch whatever the loop says: L1 is still shrinking)
    best = "the epoch with the best validation accuracy, the trained weights"
    assert r["selection"] == (
        f"{best} (train:cifar_resnet20-s0, train:cifar_resnet20-s1, distill-ce:seed0, "
        "distill-ce:seed1, distill:seed0, distill:seed1, finetune); the last epoch, the "
        "trained weights (sparsity)"
    )
    assert f"weights each stage kept: {r['selection']}." in md
    assert r["data"] == {
        "name": "digits",
        "root": None,
        "num_classes": 10,
        "classes": None,
        "chance": 0.1,
        "image_size": 12,
        "test_split": "the digits test split",
    }
    assert "Data: `digits`, 10 classes, chance 10.0%, images 12x12; the test split" in md
    assert r["student_architecture"]["name"] == "cifar_vgg11" and "Students: `cifar_vgg11`" in md
    for key in ("accuracy", "gamma_before", "gamma_after", "widths"):
        png = out / "report" / f"{key}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"({key}.png)" in md


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_export_matches_pytorch(run_dir):
    out, _ = run_dir
    e = json.loads((out / "export" / "export.json").read_text())
    assert e["ok"] and e["source"] == str(out / "finetune" / "model")
    assert set(e["checks"]) == {"safetensors", "safetensors_fused", "torchscript", "onnx"}
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
    # the deployment graph has BatchNorm folded into the convolutions before it
    fused, spec = load_model(out / "export" / "model_fused")
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(spec["folded_bn"]) == e["checks"]["safetensors_fused"]["folded_bn"] > 0
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules()) == len(bns) - len(
        spec["folded_bn"]
    )
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(
        str(out / "export" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    got = torch.from_numpy(sess.run(None, {"image": x.numpy()})[0])
    assert torch.allclose(got, ref, atol=1e-4)


def test_rerun_skips_every_node(run_dir):
    out, _ = run_dir
    stdout = pipeline(out).stdout
    assert ran(stdout) == []
    assert all(f"[{s}] skipped: complete" in stdout for s in EVERY)
    assert "0 step(s) ran" in stdout and "pruned + fine-tuned" in stdout


def test_lost_or_unfinished_node_reruns_alone(run_dir):
    """Freshness is by content: a node whose outputs were lost runs again, and since it is
    made from the same values and inputs its key (and so everything downstream) stands."""
    out, _ = run_dir
    before = (out / "distill/seed0/key.json").read_text()
    shutil.rmtree(out / "prune")
    stdout = pipeline(out).stdout
    assert ran(stdout) == ["prune"]
    assert (out / "distill/seed0/key.json").read_text() == before

    # killed before the end: no metrics.json, checkpoints kept -> it resumes
    (out / "finetune" / "metrics.json").unlink()
    stdout = pipeline(out).stdout
    assert ran(stdout) == ["finetune"]
    assert "[finetune] running (outputs missing)" in stdout and "resumed from" in stdout
    assert json.loads((out / "report/report.json").read_text())["export"]["ok"]


def test_a_changed_value_reruns_what_reads_it_and_says_which(run_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run_dir[0], out)  # a node's key ignores run.out_dir: all complete here
    stdout = pipeline(out, "finetune.loop.optim.lr=0.01").stdout
    assert ran(stdout) == ["finetune", "export", "report"]
    assert "[finetune] stale (finetune.loop.optim.lr: 0.02 -> 0.01)" in stdout
    assert "[export] stale (input `model` changed)" in stdout
    assert any(p.name.startswith("finetune-") for p in (out / "stale").iterdir())
    # distill-ce reads cache.plain_first (the views it replays); the teachers do not
    stdout = pipeline(out, "finetune.loop.optim.lr=0.01", "cache.plain_first=true").stdout
    assert not any(n.startswith("train:") for n in ran(stdout))
    assert {"cache", "distill-ce:seed0", "distill-ce:seed1"} <= set(ran(stdout))
    assert "[distill-ce:seed0] stale (cache.plain_first: false -> true)" in stdout
    # in a run of the CE students alone, that change re-runs distill-ce only
    only = ["pipeline.stages=[train, distill-ce]"]
    assert ran(pipeline(out, *only, "cache.plain_first=true").stdout) == []
    stdout = pipeline(out, *only, "cache.plain_first=false").stdout
    assert ran(stdout) == ["distill-ce:seed0", "distill-ce:seed1"]


def test_two_runs_share_one_cache_and_nothing_is_moved(run_dir, tmp_path):
    first, _ = run_dir
    shared = first / "cache" / "data"
    files = {p: p.stat().st_mtime_ns for p in shared.rglob("*") if p.is_file()}
    out = tmp_path / "second"
    stdout = pipeline(out, f"cache.dir={shared}", "pipeline.stages=[train, cache]").stdout
    assert "reusing the complete cache" in stdout and "0 rows written" in stdout
    assert {p: p.stat().st_mtime_ns for p in shared.rglob("*") if p.is_file()} == files
    assert not (first / "stale").exists() or not any(
        p.name.startswith("cache") for p in (first / "stale").iterdir()
    )
    assert json.loads((out / "cache" / "metrics.json").read_text())["rows_written"] == 0


def test_another_loss_and_slimming_every_seed_add_only_their_nodes(run_dir, tmp_path):
    """On a finished run, `distill.compare` and `pipeline.slim_every_seed` run only their own
    nodes (students of the other loss, one slimming chain per KD seed), the export and the
    report. The other loss's students are paired by seed with the CE and KD students; each
    chain starts from its own seed's KD student, trains with that seed, and the slimming
    verdict pairs every chain with its student."""
    first, _ = run_dir
    out = tmp_path / "run"
    shutil.copytree(first, out)
    stdout = pipeline(out, "pipeline.slim_every_seed=true", "distill.compare=[dkd]").stdout
    chains = [f"{s}:seed{i}" for s in ("sparsity", "prune", "finetune") for i in (0, 1)]
    students = ["distill-loss:dkd-seed0", "distill-loss:dkd-seed1"]
    assert ran(stdout) == [*students, *chains, "export", "report"]
    r = json.loads((out / "report" / "report.json").read_text())
    assert [c["model"] for c in r["slim"]["chains"]] == ["distill:seed0", "distill:seed1"]
    # the seeds differ, so the two chains trained on other batches: other weights
    a, b = (load_model(out / "sparsity" / f"seed{i}" / "model")[0] for i in (0, 1))
    assert any(
        not torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values())
    )

    def correct(node: str):
        table = np.load(out / node / "test_predictions.npz")
        return table["pred"] == table["label"]

    v = {x["comparison"]: x for x in r["verdicts"]}["pruned + fine-tuned vs unpruned"]
    pairs = [
        correct(f"finetune/seed{i}").mean() - correct(f"distill/seed{i}").mean() for i in (0, 1)
    ]
    assert v["n_seeds"] == 2 and v["gain"] == pytest.approx(np.mean(pairs), abs=1e-12)
    assert v["method"].startswith("paired bootstrap over test images")  # < 3 chains
    assert json.loads((out / "export" / "export.json").read_text())["source"] == str(
        out / "finetune" / "seed0" / "model"
    )
    md = (out / "report" / "report.md").read_text()
    assert "distill:seed0 (and 1 more, one chain per KD seed)" in md
    assert "| distill:seed1 |" in md  # the table of every chain
    # the other loss: its terms logged, its students compared with CE and KD seed by seed
    assert (
        "train_tckd"
        in json.loads((out / "distill-loss/dkd-seed1/metrics.json").read_text())["last"]
    )
    dkd = [correct(f"distill-loss/dkd-seed{i}").mean() for i in (0, 1)]
    assert [x["acc"] for x in r["student_losses"]["dkd"]["seeds"]] == pytest.approx(dkd)
    for base, stage in (("CE", "distill-ce"), ("KD", "distill")):
        v = {x["comparison"]: x for x in r["verdicts"]}[f"DKD vs {base}"]
        diff = np.mean(dkd) - np.mean([correct(f"{stage}/seed{i}").mean() for i in (0, 1)])
        assert v["n_seeds"] == 2 and v["gain"] == pytest.approx(diff, abs=1e-12)
    assert any(line.startswith("DKD (2 seed(s)): ") for line in r["verdict"])
    assert "| student DKD (cached) |" in md and "| DKD (cached) | 1 |" in md


def test_plan_lists_every_node_with_its_dependencies():
    proc = run_cli("plan", "--config", str(ROOT / "tests/configs/base.yaml"), *TINY)
    jobs = {j["name"]: j for j in json.loads(proc.stdout)["jobs"]}
    assert list(jobs) == EVERY
    assert jobs["cache"]["after"] == MEMBERS and jobs["cache"]["resources"] == "array"
    assert jobs["distill-ce:seed1"]["after"] == []
    assert jobs["sparsity"]["after"] == ["distill:seed0"]  # the KD student, not a teacher
    assert jobs["export"]["after"] == ["finetune", "distill:seed0"]  # pruned and unpruned
    assert set(jobs["report"]["after"]) == set(EVERY) - {"report"}
    assert jobs["prune"]["args"][:2] == ["prune", "--config"]
    assert jobs["train:cifar_resnet20-s1"]["resources"] == "train"


@pytest.mark.slow
def test_two_processes_run_the_same_sequence(tmp_path):
    """Under `accelerate launch` every rank runs every node with one runtime per process;
    the ranks agree on what to skip and on what is stale."""
    out = tmp_path / "run"
    slim = ("pipeline.ce_baseline=false", "pipeline.export=false", "distill.seeds=[0]")
    stdout = pipeline(out, *slim, processes=2).stdout
    assert ran(stdout) == [
        *MEMBERS,
        "cache",
        "verify-cache",
        "distill:seed0",
        "sparsity",
        "prune",
        "finetune",
        "report",
    ]
    assert json.loads((out / "finetune" / "metrics.json").read_text())["world_size"] == 2
    r = json.loads((out / "report" / "report.json").read_text())
    assert r["student_ce"]["mean"] is None and r["export"] is None  # not run: null
    assert r["slim"]["pruned"]["params"] < r["slim"]["baseline"]["params"]
    stdout = pipeline(out, *slim, "finetune.loop.optim.lr=0.01", processes=2).stdout
    assert ran(stdout) == ["finetune", "report"]
    assert "[prune] skipped: complete" in stdout and "finetune.loop.optim.lr" in stdout


def test_pipeline_config_is_validated():
    with pytest.raises(ConfigError, match="pipeline.stages"):
        load_config(Config, None, ["pipeline.stages=[train, distil]"])
    with pytest.raises(ConfigError, match="onnx_opset"):
        load_config(Config, None, ["pipeline.onnx_opset=13"])
