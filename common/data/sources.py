"""Dataset registry: raw images addressed by a stable integer `sample_id`.

A source returns undecorated uint8 images (3xHxW) and labels; augmentation lives in `views`.
`sample_id` is the row index in a fixed order (file order for Parquet and torchvision layouts,
sorted class and file names for image folders, a fixed permutation for digits), so the same
directory always yields the same ids and a logit cache can be keyed by them.

Large sources stay on disk: Parquet is memory-mapped through `datasets` (Arrow) and decoded per
sample; image folders keep only the list of paths. Only labels (one int per sample) are in RAM.
"""

from __future__ import annotations

import functools
import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from common.config import ConfigError, DataConfig
from common.data.decoded import decoded, default_dir
from common.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")


@dataclass(frozen=True)
class Stats:
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class ImageSource:
    """Base class: subclasses set the attributes and implement `image`."""

    name: str
    split: str
    num_classes: int
    native_size: int | None  # None: images differ in size (image folders)
    stats: Stats
    labels: np.ndarray  # int64 [N], sample_id -> label

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, sample_id: int) -> torch.Tensor:
        """uint8 tensor [3, H, W]."""
        raise NotImplementedError

    def fingerprint(self) -> dict:
        """Identity of this split for cache manifests: a cache is only valid for the same
        samples in the same order with the same labels."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.labels, dtype=np.int64).tobytes())
        return {
            "name": self.name,
            "split": self.split,
            "num_samples": len(self),
            "num_classes": self.num_classes,
            "labels_sha256": h.hexdigest(),
        }


def _decode(data: bytes, where: str) -> torch.Tensor:
    try:
        with Image.open(io.BytesIO(data)) as im:
            arr = np.asarray(im.convert("RGB"))
    except UnidentifiedImageError:  # its message names the in-memory buffer, not the file
        raise DataError(
            f"cannot decode image {where}: its {len(data)} bytes are in no image format PIL "
            "reads; remove or replace the file"
        ) from None
    except (OSError, ValueError) as e:
        raise DataError(f"cannot decode image {where}: {e}; remove or replace the file") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _load_digits():
    from sklearn.datasets import load_digits

    return load_digits()  # immutable, embedded in scikit-learn: read once per process


class DigitsSource(ImageSource):
    """scikit-learn's embedded 8x8 digits (1,797 images): the offline quickstart default.

    The split is a fixed permutation (seed 0): the first 1,438 images train, the last 359 test.
    """

    TRAIN = 1438

    def __init__(self, split: str):
        d = _load_digits()
        order = np.random.RandomState(0).permutation(len(d.target))
        idx = order[: self.TRAIN] if split == "train" else order[self.TRAIN :]
        # 0..16 intensities -> 0..255, grey replicated to 3 channels so every model applies.
        imgs = np.round(d.images[idx] * (255.0 / 16.0)).astype(np.uint8)
        self._images = torch.from_numpy(imgs)[:, None].expand(-1, 3, -1, -1).contiguous()
        self.labels = d.target[idx].astype(np.int64)
        self.name, self.split, self.num_classes, self.native_size = "digits", split, 10, 8
        self.stats = Stats((0.3054,) * 3, (0.3757,) * 3)  # measured on the train split

    def image(self, sample_id: int) -> torch.Tensor:
        return self._images[sample_id]


class ParquetSource(ImageSource):
    """Hugging Face Parquet layout (`train-*.parquet`, `test-*.parquet`), memory-mapped; with
    `decode_dir`, the images are decoded once into a memory-mapped uint8 file there
    (`common.data.decoded`) instead of per read."""

    def __init__(
        self,
        name,
        files: list[Path],
        split,
        num_classes,
        native_size,
        stats,
        decode_dir: Path | None = None,
    ):
        import datasets

        ds = datasets.load_dataset(
            "parquet", data_files={split: [str(f) for f in files]}, split=split
        )
        image_cols = [c for c, f in ds.features.items() if isinstance(f, datasets.Image)]
        if not image_cols:
            image_cols = [c for c in ("img", "image") if c in ds.column_names]
        label_cols = [c for c in ("label", "fine_label", "labels") if c in ds.column_names]
        if not image_cols or not label_cols:
            raise DataError(
                f"{files[0].parent}: Parquet files need an image column (img/image) and a "
                f"label column (label/fine_label); found {ds.column_names}"
            )
        self._img_col = image_cols[0]
        if isinstance(ds.features.get(self._img_col), datasets.Image):
            ds = ds.cast_column(self._img_col, datasets.Image(decode=False))
        self._ds = ds
        self.labels = ds.data.column(label_cols[0]).to_numpy().astype(np.int64)
        self.name, self.split, self.num_classes = name, split, num_classes
        self.native_size, self.stats = native_size, stats
        self._where = files[0].parent
        self._decoded = None
        if decode_dir is not None and native_size is not None:
            identity = {
                "files": [
                    [str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files
                ],
                "split": split,
                "column": self._img_col,
            }
            shape = (len(self.labels), 3, native_size, native_size)
            self._decoded = decoded(decode_dir, identity, shape, self._blobs, self._decode_at)

    def _bytes(self, sample_id: int) -> bytes:
        cell = self._ds.data.column(self._img_col)[int(sample_id)].as_py()
        return cell["bytes"] if isinstance(cell, dict) else cell

    def _blobs(self):
        for i in range(len(self.labels)):
            yield self._bytes(i)

    def _decode_at(self, data: bytes, sample_id: int) -> np.ndarray:
        return _decode(data, f"#{sample_id} in {self._where}").permute(1, 2, 0).numpy()

    def image(self, sample_id: int) -> torch.Tensor:
        if self._decoded is not None:
            return torch.from_numpy(np.array(self._decoded[int(sample_id)]))
        data = self._bytes(sample_id)
        return _decode(data, f"#{sample_id} in {self._where}")


class TorchvisionCifarSource(ImageSource):
    """torchvision's python layout (`cifar-10-batches-py/` or `cifar-100-python/`), held in
    memory (CIFAR is 150 MB). Read directly rather than through torchvision, whose md5 check
    rejects re-packed copies; the files are pickles, so only point this at data you trust."""

    FILES: ClassVar[dict] = {
        10: (
            {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
            b"labels",
        ),
        100: ({"train": ["train"], "test": ["test"]}, b"fine_labels"),
    }

    def __init__(self, name, folder: Path, split, num_classes, stats):
        import pickle

        files, label_key = self.FILES[num_classes]
        images, labels = [], []
        for fname in files[split]:
            path = folder / fname
            if not path.is_file():
                raise DataError(f"{path} is missing: {folder} is not a complete {name} copy")
            with path.open("rb") as f:
                entry = pickle.load(f, encoding="bytes")
            images.append(np.asarray(entry[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(entry[label_key], dtype=np.int64))
        self._images = torch.from_numpy(np.concatenate(images))
        self.labels = np.concatenate(labels)
        self.name, self.split, self.num_classes = name, split, num_classes
        self.native_size, self.stats = 32, stats

    def image(self, sample_id: int) -> torch.Tensor:
        return self._images[sample_id]


class ImageFolderSource(ImageSource):
    """`root/<split>/<class>/<image>`: one folder per class, any image size."""

    def __init__(self, root: Path, split: str, stats: Stats):
        split_dir = root / split
        if split == "test" and not split_dir.is_dir() and (root / "val").is_dir():
            split_dir = root / "val"
        if not split_dir.is_dir():
            raise DataError(
                f"image folder {split_dir} does not exist: expected {root}/train/<class>/... "
                f"and {root}/test/<class>/... (or val/)"
            )
        classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
        if not classes:
            raise DataError(f"{split_dir} has no class sub-folders (one folder per class)")
        if len(classes) == 1:  # trains to 100% with nothing learnt, and no validation split
            raise DataError(
                f"{split_dir} has one class folder ({classes[0]}): a classifier needs at least "
                "two, one folder per class"
            )
        paths, labels = [], []
        for c, cls_name in enumerate(classes):
            files = sorted(
                p for p in (split_dir / cls_name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
            )
            if not files:
                raise DataError(
                    f"class folder {split_dir / cls_name} has no images "
                    f"({', '.join(IMAGE_EXTENSIONS)}): add images or remove the folder"
                )
            paths += files
            labels += [c] * len(files)
        self.classes, self.folder = classes, split_dir
        self._paths = [str(p) for p in paths]
        self.labels = np.asarray(labels, dtype=np.int64)
        self.name, self.split, self.num_classes = "imagefolder", split, len(classes)
        self.native_size, self.stats = None, stats

    def image(self, sample_id: int) -> torch.Tensor:
        path = self._paths[sample_id]
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise DataError(f"cannot read image {path}: {e}") from None
        return _decode(data, path)

    def fingerprint(self) -> dict:
        fp = super().fingerprint()
        fp["classes"] = self.classes
        h = hashlib.sha256("\n".join(self._paths).encode())
        fp["paths_sha256"] = h.hexdigest()
        return fp


# --------------------------------------------------------------------------------------------

CIFAR10_STATS = Stats((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS = Stats((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
IMAGENET_STATS = Stats((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _require_root(cfg: DataConfig) -> Path:
    if cfg.root is None:
        raise ConfigError(f"data.root must be set for dataset `{cfg.name}` (a local directory)")
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DataError(
            f"data.root {root} does not exist or is not a directory: point it at the "
            f"dataset's local copy"
        )
    return root


def _cifar(num_classes: int, stats: Stats) -> Callable[[DataConfig, str], ImageSource]:
    tv_dir = "cifar-10-batches-py" if num_classes == 10 else "cifar-100-python"

    def build(cfg: DataConfig, split: str) -> ImageSource:
        root = _require_root(cfg)
        files = sorted(root.rglob(f"{split}-*.parquet"))
        if files:
            decode = None
            if cfg.decode_once:
                decode = str(cfg.decode_dir or default_dir())
            stamps = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
            return _parquet(cfg.name, stamps, split, num_classes, stats, decode)
        if (root / tv_dir).is_dir():
            return TorchvisionCifarSource(cfg.name, root / tv_dir, split, num_classes, stats)
        if root.name == tv_dir:
            return TorchvisionCifarSource(cfg.name, root, split, num_classes, stats)
        raise DataError(
            f"{root} holds neither Hugging Face Parquet files ({split}-*.parquet) nor "
            f"torchvision's {tv_dir}/ folder; point data.root at one of them"
        )

    return build


@functools.lru_cache(maxsize=8)
def _parquet(name, stamps: tuple, split, num_classes, stats, decode: str | None) -> ImageSource:
    """One ParquetSource per (files as they are now, split): freshness checks ask for the
    same dataset many times in a run, and opening it costs ~1 s; a changed file (its size or
    time) is another key."""
    files = [Path(f) for f, _, _ in stamps]
    return ParquetSource(name, files, split, num_classes, 32, stats, decode and Path(decode))


SOURCES: dict[str, Callable[[DataConfig, str], ImageSource]] = {
    "digits": lambda cfg, split: DigitsSource(split),
    "cifar10": _cifar(10, CIFAR10_STATS),
    "cifar100": _cifar(100, CIFAR100_STATS),
    "imagefolder": lambda cfg, split: ImageFolderSource(_require_root(cfg), split, IMAGENET_STATS),
}


def check_dataset(name: str) -> None:
    """A ConfigError unless `name` is a registered dataset."""
    if name not in SOURCES:
        raise ConfigError(f"data.name `{name}` is not a dataset; choose from {sorted(SOURCES)}")


def build_source(cfg: DataConfig, split: str) -> ImageSource:
    """The `split` ("train" or "test") of the dataset named in `cfg`."""
    check_dataset(cfg.name)
    return SOURCES[cfg.name](cfg, split)


class SubsetSource(ImageSource):
    """Some samples of another source, renumbered 0..n-1 in the given order: the first N
    (`data.train_subset`), or the train / validation parts of a training set. The fingerprint
    names the subset, so a cache made for one part is never read for another."""

    def __init__(self, base: ImageSource, indices: np.ndarray, tag: str):
        if len(indices) == 0:
            raise ConfigError(f"the {tag} subset of {base.name}/{base.split} is empty")
        self._base, self._indices, self.tag = base, np.asarray(indices, dtype=np.int64), tag
        self.labels = base.labels[self._indices]
        self.name, self.split, self.num_classes = base.name, base.split, base.num_classes
        self.native_size, self.stats = base.native_size, base.stats

    def image(self, sample_id: int) -> torch.Tensor:
        return self._base.image(int(self._indices[sample_id]))

    def fingerprint(self) -> dict:
        fp = self._base.fingerprint()
        fp.update(super().fingerprint())
        fp["subsets"] = [*fp.get("subsets", []), self.tag]
        return fp
