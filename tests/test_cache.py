"""The offline logit cache on real `datasets` shards: distributed equality, resume, refusal of
mismatches, corruption detection, top-k storage and third-party readability."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pytest
import torch

from common.config import load_config
from distill.cache import CacheError, LogitCache
from distill.cache.layout import TOPK_EXTRAS
from distill.cache.setup import cached_splits, request, teacher_configs
from distill.cache.verify import verify_directory
from distill.cache.writer import topk_extras
from distill.losses import LOSSES
from launch.config import Config
from tests.artifacts import N, cache_args, cdir, copy_of
from tests.conftest import PY, ROOT, cli_env, run_cli


def all_rows(root: Path) -> dict[str, np.ndarray]:
    m = LogitCache(root).manifest
    shards = [datasets.load_from_disk(str(root / r["name"])) for r in m["shards"]]
    table = datasets.concatenate_datasets(shards).with_format("arrow")[:]
    out = {}
    for name in table.column_names:  # through Arrow: numpy/torch formatters upcast float16
        col = table.column(name).combine_chunks()
        if pa.types.is_fixed_size_list(col.type):
            out[name] = col.flatten().to_numpy().reshape(len(col), col.type.list_size)
        else:
            out[name] = col.to_numpy()
    return out


def assert_same_rows(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


@pytest.mark.slow
def test_two_processes_write_exactly_the_rows_of_one(tmp_path, teachers, reference_cache):
    run_cli("cache", *cache_args(tmp_path / "two", teachers), processes=2)
    one, two = all_rows(reference_cache), all_rows(cdir(tmp_path / "two"))
    assert_same_rows(one, two)
    # no sampler padding, every (sample, view) once at row sample * 3 + view, and nothing but
    # the targets stored: the keys are the positions
    assert set(one) == {"logits", "t0_logits", "t1_logits"} and len(one["logits"]) == N * 3
    assert one["logits"].dtype == np.float16 and one["logits"].shape == (N * 3, 10)
    m = LogitCache(cdir(tmp_path / "two")).manifest
    assert m["num_shards"] == 2 and len(m["teachers"]) == 2
    assert all(0 <= t["acc_on_cached_views"] <= 1 for t in m["teachers"])
    # The stored target is the ensemble: log of the mean of the teachers' probabilities. Each
    # stored logit is float16-rounded (relative 2^-11 = 4.9e-4 of logits up to ~5 here, so
    # ~2.5e-3 absolute), which moves a probability p by at most ~2 x 2.5e-3 x p <= 3e-3.
    per = np.stack([one["t0_logits"], one["t1_logits"]]).astype(np.float32)
    mean_p = torch.softmax(torch.from_numpy(per), -1).mean(0)
    torch.testing.assert_close(
        torch.softmax(torch.tensor(one["logits"]).float(), -1), mean_p, atol=3e-3, rtol=0
    )

    verify = run_cli(
        "verify-cache", *cache_args(tmp_path / "two", teachers, "cache.verify_samples=20")
    )
    assert "verify-cache: OK" in verify.stdout


@pytest.mark.slow
def test_job_array_tasks_build_the_same_cache(tmp_path, teachers, reference_cache):
    args = cache_args(tmp_path / "arr", teachers)
    for task in (1, 0):  # array tasks finish in any order; the last one writes the manifest
        proc = run_cli(
            "cache",
            *args,
            env=cli_env(
                SLURM_ARRAY_TASK_ID=str(task), SLURM_ARRAY_TASK_COUNT="2", SLURM_ARRAY_TASK_MIN="0"
            ),
        )
        assert ("complete in" in proc.stdout) == (task == 0)
    assert_same_rows(all_rows(reference_cache), all_rows(cdir(tmp_path / "arr")))


@pytest.mark.slow
def test_killed_cache_resumes_missing_parts_only(tmp_path, teachers, reference_cache):
    args = cache_args(tmp_path / "k", teachers, "cache.rows_per_part=32")
    proc = subprocess.Popen(
        [PY, "-m", "launch", "cache", *args],
        cwd=ROOT,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    parts = cdir(tmp_path / "k") / "parts/shard-00000-of-00001"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(parts.glob("part-*"))) < 2:
        assert proc.poll() is None, "the cache run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    done = sorted(parts.glob("part-*"))
    assert len(done) >= 2 and not (cdir(tmp_path / "k") / "manifest.json").exists()
    files = [f for p in done for f in p.iterdir()]
    stamps = {f: (f.stat().st_ino, f.stat().st_mtime_ns) for f in files}
    with pytest.raises(CacheError, match="incomplete"):
        LogitCache(cdir(tmp_path / "k"))

    # Watch which parts the resumed run writes: the finished ones must not be redone.
    proc = subprocess.Popen(
        [PY, "-m", "launch", "cache", *args],
        cwd=ROOT,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    while proc.poll() is None:
        for f in files:
            try:
                st = f.stat()
            except FileNotFoundError:  # merged into the shard and cleaned up: fine
                continue
            assert (st.st_ino, st.st_mtime_ns) == stamps[f], f"{f} rewritten"
        time.sleep(0.02)
    assert proc.returncode == 0, proc.stderr[-3000:]

    assert_same_rows(all_rows(cdir(tmp_path / "k")), all_rows(reference_cache))
    manifest = (cdir(tmp_path / "k") / "manifest.json").stat().st_mtime_ns
    again = run_cli("cache", *args)  # complete: a no-op
    assert "[cache] skipped: complete" in again.stdout
    assert (cdir(tmp_path / "k") / "manifest.json").stat().st_mtime_ns == manifest
    assert not (cdir(tmp_path / "k") / "parts").exists()


@pytest.mark.slow
def test_mismatched_caches_are_refused(tmp_path, teachers, reference_cache):
    shutil.copytree(reference_cache, tmp_path / "shared")
    root = tmp_path / "shared"

    def expectation(*overrides):
        cfg = load_config(
            Config, ROOT / "tests/configs/base.yaml", cache_args(tmp_path, teachers, *overrides)[2:]
        )
        return request(cfg, teacher_configs(cfg, []))

    LogitCache(root, expectation())  # the matching consumer opens it
    for override, what in [
        ("run.seed=1", "views.seed"),
        ("data.pad=2", "recipe_sha256"),
        ("data.train_subset=140", "dataset.num_samples"),
        ("cache.views=2", "views.count"),
    ]:
        with pytest.raises(CacheError, match=what):
            LogitCache(root, expectation(override))
    # `cache` into that directory with other teachers is refused, naming them; nothing moves
    before = sorted(p.name for p in root.iterdir())
    proc = run_cli("cache", *cache_args(tmp_path, teachers[:1], f"cache.dir={root}"), check=False)
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "teachers" in proc.stderr and "another request" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in root.iterdir()) == before


@pytest.mark.slow
def test_verify_catches_a_truncated_shard(tmp_path, teachers, reference_cache):
    copy_of(reference_cache, tmp_path)
    [arrow] = list(cdir(tmp_path).glob("shard-*/*.arrow"))
    data = arrow.read_bytes()
    arrow.write_bytes(data[: len(data) // 2])
    proc = run_cli("verify-cache", *cache_args(tmp_path, teachers), check=False)
    assert proc.returncode == 1
    assert "checksum mismatch" in proc.stderr and arrow.name in proc.stderr
    with pytest.raises(CacheError, match="truncated"):
        LogitCache(cdir(tmp_path)).rows(np.array([0]), np.array([0]))


def test_verify_runs_whenever_asked_and_again_once_a_shard_changed(
    tmp_path, teachers, reference_cache
):
    """A check the user asks for runs: `verify-cache --config` verifies the bytes each time
    (a complete node used to be skipped, even with `cache.dir` pointing at a rotten copy), and
    in a pipeline it runs again when a shard's size or modification time changed."""
    args = cache_args(tmp_path, teachers, "cache.verify_samples=8")
    copy_of(reference_cache, tmp_path)
    for _ in range(2):
        again = run_cli("verify-cache", *args)
        assert "verify-cache: OK" in again.stdout and "skipped" not in again.stdout
    rotten = tmp_path / "rotten"
    shutil.copytree(cdir(tmp_path), rotten)
    [arrow] = list(rotten.glob("shard-*/*.arrow"))
    data = bytearray(arrow.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    arrow.write_bytes(bytes(data))
    bad = run_cli("verify-cache", *args, f"cache.dir={rotten}", check=False)
    assert bad.returncode == 1 and "checksum mismatch" in bad.stderr, bad.stderr[-2000:]

    stages = "pipeline.stages=[cache, verify-cache]"
    run_cli("pipeline", *args, stages)  # verifies the run's own cache again (the rotten
    # copy's check set the node aside as stale: other files)
    assert "[verify-cache] skipped: complete" in run_cli("pipeline", *args, stages).stdout
    [arrow] = list(cdir(tmp_path).glob("shard-*/*.arrow"))
    arrow.write_bytes(data)  # the run's own cache rots
    rerun = run_cli("pipeline", *args, stages, check=False)
    assert "[cache] skipped: complete" in rerun.stdout, rerun.stdout
    assert "[verify-cache] stale (cache files:" in rerun.stdout, rerun.stdout
    assert rerun.returncode == 1 and "checksum mismatch" in rerun.stderr


def test_verify_cache_checks_a_directory_alone(tmp_path, reference_cache):
    """`verify-cache --cache DIR` needs no configuration: checksums and keys always, re-scoring
    from the data and teachers the manifest records while they are still there."""
    good = run_cli("verify-cache", "--cache", str(reference_cache))
    assert f"verify-cache: OK: {N * 3} rows complete, checksums match, 64 re-scored" in good.stdout
    copy = cdir(copy_of(reference_cache, tmp_path))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["source"]["teachers"][1]["path"] = str(tmp_path / "moved")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    moved = run_cli("verify-cache", "--cache", str(copy))
    assert "checksums match; re-scoring skipped" in moved.stdout and "moved" in moved.stdout
    [arrow] = list(copy.glob("shard-*/*.arrow"))
    data = bytearray(arrow.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    arrow.write_bytes(bytes(data))
    bad = run_cli("verify-cache", "--cache", str(copy), check=False)
    assert bad.returncode == 1 and "checksum mismatch" in bad.stderr and arrow.name in bad.stderr
    misuse = run_cli("verify-cache", "--cache", str(copy), "cache.views=2", check=False)
    assert misuse.returncode == 2 and "--cache DIR goes with `verify-cache` alone" in misuse.stderr


@pytest.mark.slow
def test_topk_storage_keeps_top_classes_and_tail_mass(tmp_path, teachers, reference_cache):
    topk = ["cache.storage=topk", "cache.topk=3", "cache.per_teacher=false"]
    run_cli("cache", *cache_args(tmp_path / "top", teachers, *topk))
    full, top = all_rows(reference_cache), all_rows(cdir(tmp_path / "top"))
    assert top["topk_idx"].dtype == np.int16 and top["topk_logp"].shape == (N * 3, 3)
    ref = torch.log_softmax(torch.from_numpy(full["logits"].copy()).float(), -1)
    vals, idx = ref.topk(3, -1)
    assert np.array_equal(np.sort(top["topk_idx"], -1), np.sort(idx.numpy(), -1))
    # `ref` comes from the full cache's float16 copy of the same float32 logits (each within
    # 2^-11 relative of logits up to ~5: 2.4e-3 absolute, twice that through the log-softmax);
    # the stored log-probabilities are float16-rounded once more
    torch.testing.assert_close(
        torch.from_numpy(top["topk_logp"].copy()).float(), vals, atol=1e-2, rtol=2e-3
    )
    # 3 of 10 classes stored: the tail mass 1 - sum(p) is what the other 7 hold
    tail = 1 - torch.from_numpy(top["topk_logp"].copy()).float().exp().sum(1)
    torch.testing.assert_close(tail, 1 - vals.exp().sum(1), atol=1e-2, rtol=0)
    cache = LogitCache(cdir(tmp_path / "top"))
    got = cache.rows(np.array([5, 7]), np.array([2, 0]))
    assert set(got) == {"topk_idx", "topk_logp", *TOPK_EXTRAS} and got["topk_idx"].shape == (2, 3)
    # the whole row is 3 int16 indices, 3 float16 log-probabilities and 4 float16 extras: 20
    # bytes, no keys
    assert (
        datasets.load_from_disk(str(cdir(tmp_path / "top") / "shard-00000-of-00001")).data.nbytes
        == N * 3 * 20
    )
    # The extras are the whole row's statistics, from the unrounded logits: within the full
    # cache's float16 rounding of the same logits (2.4e-3 at ~5, at most that through a
    # mean, std or log-sum-exp), the extras' own (2^-11 relative) and the label's logit
    cfg = config(tmp_path / "top", teachers, *topk)
    labels = torch.as_tensor(cached_splits(cfg).train.source.labels).repeat_interleave(3)
    want = topk_extras(torch.from_numpy(full["logits"].copy()).double(), labels)
    for name in TOPK_EXTRAS:
        stored = torch.from_numpy(top[name].copy()).double()
        torch.testing.assert_close(stored, want[name], atol=1e-2, rtol=2e-3)
    verify = run_cli(
        "verify-cache",
        *cache_args(tmp_path / "top", teachers, *topk),
    )
    assert "verify-cache: OK" in verify.stdout  # the spot check re-scores the extras too

    # A top-k cache from before the extras serves the losses that read none (KD) and is
    # refused, saying what to do, to those that do; no top-k cache serves DIST.
    old = tmp_path / "old"
    shutil.copytree(cdir(tmp_path / "top"), old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["storage"]["extras"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    wanted = request(cfg, teacher_configs(cfg, []))
    kd = LogitCache(old, wanted, needs=LOSSES["kd"].topk_extras)
    assert set(kd.rows(np.array([5]), np.array([2]))) == {"topk_idx", "topk_logp"}
    with pytest.raises(CacheError, match="without target_logit, lse .* write the cache again"):
        LogitCache(old, wanted, needs=LOSSES["dkd"].topk_extras)
    with pytest.raises(CacheError, match="needs every class's logit"):
        LogitCache(cdir(tmp_path / "top"), wanted, needs=LOSSES["dist"].topk_extras)
    LogitCache(cdir(tmp_path / "top"), wanted, needs=LOSSES["ls"].topk_extras)


@pytest.mark.slow
def test_weighted_ensemble_cache_records_its_weights_and_refuses_others(tmp_path, teachers):
    """`cache.ensemble_weights`: the stored target is the weighted mean of the teachers'
    probabilities, the normalised weights are in the cache's identity, a request with other
    weights (or none) is refused, and verify-cache re-scores with the recorded weights."""
    small = ["data.train_subset=40"]
    run_cli("cache", *cache_args(tmp_path, teachers, *small, "cache.ensemble_weights=[1, 3]"))
    root = cdir(tmp_path)
    assert LogitCache(root).manifest["ensemble_weights"] == [0.25, 0.75]
    rows = all_rows(root)
    per = torch.from_numpy(np.stack([rows["t0_logits"], rows["t1_logits"]]).astype(np.float32))
    mean_p = 0.25 * torch.softmax(per[0], -1) + 0.75 * torch.softmax(per[1], -1)
    # float16 logits: each probability within ~3e-3 (as for the unweighted mean)
    stored_p = torch.softmax(torch.from_numpy(rows["logits"].copy()).float(), -1)
    torch.testing.assert_close(stored_p, mean_p, atol=3e-3, rtol=0)

    def expect(*weights):
        cfg = config(tmp_path, teachers, *small, *weights)
        return request(cfg, teacher_configs(cfg, []))

    LogitCache(root, expect("cache.ensemble_weights=[2, 6]"))  # the same weights, normalised
    for other in (["cache.ensemble_weights=[1, 1]"], []):
        with pytest.raises(CacheError, match="ensemble_weights"):
            LogitCache(root, expect(*other))
    report = verify_directory(root, samples=16)
    assert report["rescored"] and report["within_tolerance"]


@pytest.mark.slow
def test_int8_storage_is_within_a_step_of_full_logits(tmp_path, teachers, reference_cache):
    """int8 rows: every class's logit as a uint8 step of the row's own range, C + 4 bytes."""
    int8 = ["cache.storage=int8", "cache.per_teacher=false"]
    run_cli("cache", *cache_args(tmp_path / "q", teachers, *int8))
    root = cdir(tmp_path / "q")
    stored = all_rows(root)
    assert stored["logits_q"].dtype == np.uint8 and stored["logits_q"].shape == (N * 3, 10)
    assert datasets.load_from_disk(str(root / "shard-00000-of-00001")).data.nbytes == N * 3 * 14
    full = torch.from_numpy(all_rows(reference_cache)["logits"].copy()).float()
    got = LogitCache(root).rows(np.arange(N).repeat(3), np.tile(np.arange(3), N))["logits"]
    step = torch.from_numpy(stored["logits_step"].copy()).float()[:, None]
    # half a step of quantisation, plus the float16 rounding of the reference_cache (2^-11 relative
    # of logits up to ~5) and of the row's lower end
    assert ((got - full).abs() <= step / 2 + 5e-3).all()
    assert (got.argmax(-1) == full.argmax(-1)).float().mean() > 0.99
    verify = run_cli("verify-cache", *cache_args(tmp_path / "q", teachers, *int8))
    assert "verify-cache: OK" in verify.stdout


def config(out: Path, teachers: list[str], *overrides: str) -> Config:
    """The configuration `cache_args(out, teachers, *overrides)` runs with."""
    args = cache_args(out, teachers, *overrides)
    return load_config(Config, ROOT / "tests/configs/base.yaml", args[2:])


def test_reader_reads_by_position_refuses_old_formats_and_third_party_loaders_work(
    tmp_path, reference_cache
):
    root = reference_cache
    cache = LogitCache(root)
    sids, vids = np.array([N - 1, 0, 17, 17]), np.array([0, 2, 1, 2])
    got = cache.rows(sids, vids)["logits"]
    ds = datasets.load_from_disk(str(root / "shard-00000-of-00001"))  # a plain reader
    assert ds.features["logits"].length == 10
    for i, (s, v) in enumerate(zip(sids, vids)):
        row = ds[int(s * 3 + v)]  # sample s, view v is row s * views + v
        assert np.array_equal(np.asarray(row["logits"], dtype=np.float32), got[i].numpy())
    with pytest.raises(CacheError, match="view ids"):
        cache.rows(np.array([0]), np.array([3]))
    with pytest.raises(CacheError, match="sample ids"):
        cache.rows(np.array([N]), np.array([0]))
    old = cdir(copy_of(reference_cache, tmp_path))
    manifest = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({**manifest, "format": 2}))
    with pytest.raises(CacheError, match="format-2 logit cache; this kdslim reads format 3"):
        LogitCache(old)


@pytest.mark.slow
def test_bf16_cache_verifies_under_its_recorded_precision(tmp_path, teachers):
    args = cache_args(tmp_path, teachers, "data.train_subset=40", "run.mixed_precision=bf16")
    run_cli("cache", *args)
    assert LogitCache(cdir(tmp_path)).manifest["precision"] == "bf16"
    verify = run_cli("verify-cache", *args, "cache.verify_samples=16")
    assert "verify-cache: OK" in verify.stdout


@pytest.mark.slow
def test_auto_cache_dir_is_named_by_content_and_shared(tmp_path, teachers, reference_cache):
    """`cache.dir: auto`: one directory per request under `cache.root`, so runs that ask for
    the same cache share it (the second writes nothing) and another request gets its own."""
    auto = ["cache.dir=auto", f"cache.root={tmp_path / 'caches'}"]
    first = run_cli("cache", *cache_args(tmp_path / "a", teachers, *auto))
    [made] = list((tmp_path / "caches").iterdir())
    assert "complete in" in first.stdout and str(made) in first.stdout
    assert_same_rows(all_rows(made), all_rows(reference_cache))
    second = run_cli("cache", *cache_args(tmp_path / "b", teachers, *auto))
    assert "0 rows written" in second.stdout and str(made) in second.stdout
    run_cli("cache", *cache_args(tmp_path / "c", teachers, *auto, "cache.views=2"))
    assert len(list((tmp_path / "caches").iterdir())) == 2
    assert not (tmp_path / "a" / "cache" / "data").exists()  # the stage dir holds no cache
    assert (tmp_path / "a" / "cache" / "config.yaml").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("mix", ["mixup", "cutmix"])
def test_mixed_view_cache_holds_the_mixed_images_scores(tmp_path, teachers, mix):
    """With `data.mix`, the teachers score the mixed image: verify-cache, which rebuilds a
    sample of mixed views from (seed, sample_id, view_id) alone and re-scores them, agrees
    with the cache, and the rows differ from those of the same views unmixed."""
    small = ["data.train_subset=40", "cache.verify_samples=16"]
    run_cli("cache", *cache_args(tmp_path / "plain", teachers, *small))
    mixed = [*small, f"data.mix={mix}"]
    run_cli("cache", *cache_args(tmp_path / "mixed", teachers, *mixed))
    verify = run_cli("verify-cache", *cache_args(tmp_path / "mixed", teachers, *mixed))
    assert "verify-cache: OK" in verify.stdout
    plain, got = all_rows(cdir(tmp_path / "plain")), all_rows(cdir(tmp_path / "mixed"))
    differ = (plain["logits"] != got["logits"]).any(axis=1)
    assert differ.mean() > 0.9  # every view is mixed; a box can miss only with lam near 1
