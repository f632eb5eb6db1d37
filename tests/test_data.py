"""Dataset registry and replayable views on real files."""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from common.config import ConfigError, DataConfig
from common.data import (
    DataError,
    ReplayBatchSampler,
    ViewDataset,
    ViewRecipe,
    build_source,
    build_splits,
    eval_batches,
    make_loader,
    randaugment,
    views,
)
from common.data.seeding import rng_for
from common.trainer import CrossEntropyTask
from tests.cli import assert_one_line_error
from tests.conftest import ROOT, random_images, run_cli


def test_digits_is_embedded_with_fixed_split():
    train, test = build_source(DataConfig(), "train"), build_source(DataConfig(), "test")
    assert (len(train), len(test)) == (1438, 359)
    assert train.image(0).shape == (3, 8, 8) and train.image(0).dtype == torch.uint8
    assert train.fingerprint() == build_source(DataConfig(), "train").fingerprint()
    assert train.fingerprint()["labels_sha256"] != test.fingerprint()["labels_sha256"]


def test_parquet_layout(parquet_cifar):
    cfg = DataConfig(name="cifar10", root=str(parquet_cifar))
    src = build_source(cfg, "train")
    assert len(src) == 40 and src.num_classes == 10
    assert src.labels[:12].tolist() == [i % 10 for i in range(12)]
    expected = random_images(40, 32, 0)[5]
    assert torch.equal(src.image(5), torch.from_numpy(expected).permute(2, 0, 1))
    assert len(build_source(cfg, "test")) == 12


def test_torchvision_python_layout(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    imgs = random_images(12, 32, 3)
    flat = imgs.transpose(0, 3, 1, 2).reshape(12, -1)
    for i in range(1, 6):
        chunk = slice((i - 1) * 2, i * 2)
        blob = {b"data": flat[chunk], b"labels": list(range(i * 2 - 2, i * 2))}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(blob))
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": flat[10:], b"labels": [1, 2]}))
    src = build_source(DataConfig(name="cifar10", root=str(tmp_path)), "train")
    assert len(src) == 10 and src.labels.tolist() == list(range(10))
    assert torch.equal(src.image(3), torch.from_numpy(imgs[3]).permute(2, 0, 1))


def test_image_folder_and_errors(image_folder):
    cfg = DataConfig(name="imagefolder", root=str(image_folder), image_size=24, augment="imagenet")
    src = build_source(cfg, "train")
    assert src.classes == ["clear", "fire", "smoke"] and len(src) == 18
    splits = build_splits(cfg, seed=0)
    assert splits.train[(4, 2)]["image"].shape == (3, 24, 24)
    assert splits.test[(0, -1)]["image"].shape == (3, 24, 24)

    (image_folder / "train" / "fire" / "000.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"fire/000\.png: its 12 bytes are in no image") as bad:
        src.image(int(np.flatnonzero(src.labels == 1)[0]))
    assert "BytesIO" not in str(bad.value) and "remove or replace the file" in str(bad.value)
    (image_folder / "train" / "empty").mkdir()
    with pytest.raises(DataError, match="empty has no images"):
        build_source(cfg, "train")


def test_a_one_class_image_folder_is_refused_before_anything_is_written(image_folder, tmp_path):
    """One class trains to 100% test accuracy with nothing learnt (and leaves no validation
    split to choose an epoch on): refused, naming the folder, with no directory left."""
    for c in ("fire", "smoke"):
        shutil.rmtree(image_folder / "train" / c)
    out = tmp_path / "run"
    args = ["--config", str(ROOT / "tests/configs/base.yaml"), f"run.out_dir={out}"]
    args += ["data.name=imagefolder", f"data.root={image_folder}", "data.image_size=16"]
    proc = run_cli("train", *args, check=False)
    assert_one_line_error(
        proc, 2, f"{image_folder / 'train'} has one class folder (clear)", "at least two"
    )
    assert not out.exists()


def test_missing_root_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_source(DataConfig(name="cifar10", root=str(tmp_path / "nope")), "train")
    with pytest.raises(DataError, match="neither Hugging Face Parquet"):
        build_source(DataConfig(name="cifar10", root=str(tmp_path)), "train")
    with pytest.raises(ConfigError, match="data.root must be set"):
        build_source(DataConfig(name="cifar100"), "train")
    with pytest.raises(ConfigError, match="not a dataset"):
        build_source(DataConfig(name="mnist"), "train")


@pytest.mark.parametrize("augment", ["cifar", "imagenet"])
def test_views_are_pure_functions_of_seed_sample_view(parquet_cifar, augment):
    cfg = DataConfig(name="cifar10", root=str(parquet_cifar), augment=augment)
    a, b = build_splits(cfg, seed=7).train, build_splits(cfg, seed=7).train
    other_seed = build_splits(cfg, seed=8).train
    x = a[(3, 5)]["image"]
    assert torch.equal(x, b[(3, 5)]["image"])
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    differs = [not torch.equal(a[(3, v)]["image"], x) for v in range(6, 12)]
    assert any(differs)
    assert any(
        not torch.equal(other_seed[(3, v)]["image"], a[(3, v)]["image"]) for v in range(5, 12)
    )


def test_cifar_view_is_pad_crop_flip_of_the_image(parquet_cifar):
    cfg = DataConfig(name="cifar10", root=str(parquet_cifar))
    ds = build_splits(cfg, seed=1).train
    src, recipe = ds.source, ds.recipe
    img = src.image(2)
    for v in range(8):
        p = recipe.params(2, v, 32, 32)
        padded = torch.nn.functional.pad(img, (4, 4, 4, 4))
        ref = padded[:, p.top : p.top + 32, p.left : p.left + 32]
        ref = ref.flip(-1) if p.flip else ref
        expected = (ref.float() / 255 - recipe.mean) / recipe.std
        assert torch.equal(ds[(2, v)]["image"], expected)  # the same elementwise operations
        assert 0 <= p.top <= 8 and 0 <= p.left <= 8


def test_recipe_fingerprint_tracks_everything_that_changes_pixels(parquet_cifar):
    src = build_source(DataConfig(name="cifar10", root=str(parquet_cifar)), "train")
    base = ViewRecipe(DataConfig(name="cifar10"), src, seed=0).fingerprint()
    assert base == ViewRecipe(DataConfig(name="cifar10"), src, seed=0).fingerprint()
    for cfg, seed in [
        (DataConfig(pad=2), 0),
        (DataConfig(hflip=False), 0),
        (DataConfig(mean=(0.5, 0.5, 0.5)), 0),
        (DataConfig(), 1),
        (DataConfig(augment="imagenet"), 0),
    ]:
        assert ViewRecipe(cfg, src, seed=seed).fingerprint() != base


def _render(dataset: ViewDataset, world: int, rank: int, workers: int, batch: int, accum: int):
    sampler = ReplayBatchSampler(
        len(dataset), batch_size=batch, grad_accum=accum, rank=rank, world_size=world, seed=3
    )
    out = {}
    for epoch in range(2):
        sampler.set_epoch(epoch)
        for b in make_loader(dataset, sampler, workers):
            for s, v, x in zip(b["sample_id"].tolist(), b["view_id"].tolist(), b["image"]):
                out[(epoch, s, v)] = x
    return out


RECIPES = {
    "crop": {},
    "mixup": {"mix": "mixup"},
    "cutmix": {"mix": "cutmix"},
    "randaugment": {"randaugment": 2, "mix": "cutmix"},
    "imagenet-randaugment": {"augment": "imagenet", "randaugment": 3, "randaugment_magnitude": 15},
}


def _render_rank(rank, world, root, recipe, queue):
    cfg = DataConfig(name="cifar10", root=root, val_fraction=0.0, **RECIPES[recipe])
    ds = build_splits(cfg, seed=0).train
    queue.put({k: v.numpy() for k, v in _render(ds, world, rank, 2, 8, 2).items()})


@pytest.mark.parametrize("recipe", RECIPES)
def test_views_identical_across_workers_and_processes(parquet_cifar, recipe):
    """Every recipe, mixed and RandAugment ones included, gives the same pixels for a (sample,
    view) with 0 or 2 loader workers and 1 or 2 processes: what a cache stored is what the
    student sees."""
    ds = build_splits(
        DataConfig(name="cifar10", root=str(parquet_cifar), val_fraction=0.0, **RECIPES[recipe]),
        seed=0,
    ).train
    single = _render(ds, world=1, rank=0, workers=0, batch=8, accum=1)
    assert len(single) == 2 * 40  # 5 global batches of 8 per epoch, every sample once
    two_workers = _render(ds, world=1, rank=0, workers=2, batch=8, accum=2)
    assert single.keys() == two_workers.keys()
    assert all(torch.equal(single[k], two_workers[k]) for k in single)

    ctx = mp.get_context("fork")  # ranks with torch imported already (spawn re-imports it)
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_render_rank, args=(r, 2, str(parquet_cifar), recipe, queue))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    parts = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert not parts[0].keys() & parts[1].keys()  # no sample twice
    merged = {**parts[0], **parts[1]}
    assert merged.keys() == single.keys()
    assert all(np.array_equal(merged[k], single[k].numpy()) for k in single)


@pytest.mark.parametrize("mix", ["mixup", "cutmix"])
def test_mixed_views_are_pure_functions_of_sample_and_view(parquet_cifar, mix):
    cfg = DataConfig(name="cifar10", root=str(parquet_cifar), val_fraction=0.0, mix=mix)
    ds = build_splits(cfg, seed=0).train
    recipe, n = ds.recipe, len(ds)
    lams = []
    for s, v in [(3, 0), (3, 1), (7, 2), (0, 5)]:
        item = ds[(s, v)]
        p = recipe.mix_params(s, v, n)
        assert p == recipe.mix_params(s, v, n) and p.partner != s and 0 <= p.lam <= 1
        own = recipe.view(ds.source.image(s), s, v)
        other = recipe.view(ds.source.image(p.partner), p.partner, v)
        if mix == "mixup":
            expected = own * p.lam + other * (1 - p.lam)
        else:
            top, left, h, w = p.box
            expected = own.clone()
            expected[:, top : top + h, left : left + w] = other[:, top : top + h, left : left + w]
            assert p.lam == pytest.approx(1 - h * w / 32**2, abs=1e-12)
        assert torch.equal(item["image"], expected)
        assert (item["mix_label"], item["mix_lam"]) == (ds.source.labels[p.partner], p.lam)
        lams.append(p.lam)
    assert len(set(lams)) == len(lams)  # drawn per (sample, view)
    assert "mix_lam" not in ds[(3, -1)]  # evaluation views are never mixed
    assert (
        recipe.fingerprint()
        != build_splits(
            DataConfig(name="cifar10", root=str(parquet_cifar), val_fraction=0.0), seed=0
        ).train.recipe.fingerprint()
    )


def test_randaugment_ops_are_drawn_from_the_views_key(parquet_cifar):
    def split(**kw):
        cfg = DataConfig(name="cifar10", root=str(parquet_cifar), val_fraction=0.0, **kw)
        return build_splits(cfg, seed=0).train

    plain, ra = split(), split(randaugment=2, randaugment_magnitude=20)
    keys = [(s, v) for s in range(12) for v in range(2)]
    changed = [not torch.equal(plain[k]["image"], ra[k]["image"]) for k in keys]
    assert sum(changed) >= len(keys) // 2  # most draws include an op that moves pixels
    ops = {k: tuple(randaugment.choose(rng_for(0, views._RA_SALT, *k), 2)) for k in keys}
    assert len(set(ops.values())) > len(keys) // 2  # drawn per (sample, view)
    assert torch.equal(ra[keys[5]]["image"], ra[keys[5]]["image"])
    assert ra.recipe.fingerprint() != plain.recipe.fingerprint()


def test_mixed_labels_train_towards_the_same_mixture():
    torch.manual_seed(0)
    logits = torch.randn(4, 10, dtype=torch.float64)
    batch = {
        "label": torch.tensor([1, 2, 3, 4]),
        "mix_label": torch.tensor([5, 2, 0, 9]),
        "mix_lam": torch.tensor([0.25, 0.5, 1.0, 0.0], dtype=torch.float64),
    }
    model = lambda x: logits  # noqa: E731 - the task only needs a callable
    got = CrossEntropyTask().losses(model, {**batch, "image": None})["loss"]
    lam = batch["mix_lam"]
    per = lam * F.cross_entropy(logits, batch["label"], reduction="none") + (1 - lam) * (
        F.cross_entropy(logits, batch["mix_label"], reduction="none")
    )
    torch.testing.assert_close(got, per.mean(), atol=1e-12, rtol=0)


def test_sampler_global_batches_do_not_depend_on_world_or_accum():
    def global_steps(world, accum):
        steps = []
        samplers = [
            ReplayBatchSampler(
                50, batch_size=12, grad_accum=accum, rank=r, world_size=world, seed=5
            )
            for r in range(world)
        ]
        for s in samplers:
            s.set_epoch(1)
        iters = [iter(s) for s in samplers]
        for _ in range(samplers[0].steps_per_epoch):
            step = []
            for _ in range(accum):
                for it in iters:
                    step += next(it)
            steps.append(sorted(step))
        return steps

    ref = global_steps(1, 1)
    assert len(ref) == 4  # 50 // 12, the incomplete batch dropped
    assert global_steps(2, 1) == ref == global_steps(2, 3) == global_steps(1, 2)
    resumed = ReplayBatchSampler(50, batch_size=12, grad_accum=1, rank=0, world_size=1, seed=5)
    resumed.set_epoch(1, start_step=2)
    assert [sorted(b) for b in resumed] == ref[2:]
    with pytest.raises(ValueError, match="divisible"):
        ReplayBatchSampler(50, batch_size=12, grad_accum=5, rank=0, world_size=1, seed=5)


def test_eval_batches_cover_the_test_set_once():
    shards = [eval_batches(11, 4, r, 3) for r in range(3)]
    ids = sorted(i for shard in shards for batch in shard for i, v in batch)
    assert ids == list(range(11))


def test_validation_split_is_carved_once_from_training_data():
    """Best epochs are chosen on validation, never on test: `data.val_fraction` of the
    training samples, the same draw for every seed and stage, disjoint from what trains."""
    cfg = DataConfig(val_fraction=0.1)
    a, b = build_splits(cfg, seed=0), build_splits(cfg, seed=7)
    assert (len(a.train), len(a.val), len(a.test)) == (1294, 144, 359)
    assert a.sizes() == {"train": 1294, "val": 144, "test": 359}
    full = build_source(cfg, "train")
    train_ids, val_ids = a.train.source._indices, a.val.source._indices
    assert set(train_ids).isdisjoint(val_ids) and len(set(train_ids) | set(val_ids)) == len(full)
    assert (val_ids == b.val.source._indices).all()  # not run.seed's draw
    assert torch.equal(a.val.source.image(3), full.image(int(val_ids[3])))
    assert a.train.source.fingerprint() != full.fingerprint()  # a cache knows which part
    assert a.val[(3, 0)]["label"] == full.labels[val_ids[3]]
    none = build_splits(DataConfig(val_fraction=0.0), seed=0)
    assert none.val is None and len(none.train) == 1438


def test_augment_none_training_view_is_the_plain_image():
    """`augment: none` trains on the image itself (it was once shifted by `pad`)."""
    ds = build_splits(DataConfig(name="digits", image_size=8, augment="none", pad=4), 0).train
    for key in [(0, 0), (5, 3), (17, 1)]:
        assert torch.equal(ds[key]["image"], ds[(key[0], -1)]["image"])
