"""Datasets by registry name, replayable views and distributed, resumable loading."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.config import DataConfig
from common.data.loader import (
    ReplayBatchSampler,
    ViewDataset,
    eval_batches,
    fresh_view_per_epoch,
    make_loader,
)
from common.data.seeding import rng_for
from common.data.sources import SOURCES, ImageSource, SubsetSource, build_source
from common.data.views import ViewParams, ViewRecipe
from common.errors import DataError

__all__ = [
    "SOURCES",
    "DataError",
    "ImageSource",
    "ReplayBatchSampler",
    "Splits",
    "ViewDataset",
    "ViewParams",
    "ViewRecipe",
    "build_source",
    "build_splits",
    "eval_batches",
    "fresh_view_per_epoch",
    "make_loader",
]


_VAL_SALT = 0x7A1


@dataclass
class Splits:
    train: ViewDataset
    val: ViewDataset | None
    """Held out from the training data (`data.val_fraction`); None when that is 0."""
    test: ViewDataset
    num_classes: int
    num_workers: int = 0

    def sizes(self) -> dict[str, int]:
        return {
            "train": len(self.train),
            "val": len(self.val) if self.val is not None else 0,
            "test": len(self.test),
        }


def carve_validation(
    source: ImageSource, fraction: float
) -> tuple[ImageSource, ImageSource | None]:
    """(train, val) parts of a training source: `fraction` of its samples, drawn once with a
    fixed seed (not `run.seed`, so every seed and stage holds out the same samples)."""
    n_val = round(len(source) * fraction)
    if n_val == 0:
        return source, None
    order = rng_for(_VAL_SALT, len(source)).permutation(len(source))
    val, train = np.sort(order[:n_val]), np.sort(order[n_val:])
    return (
        SubsetSource(source, train, f"train-minus-val{fraction:g}"),
        SubsetSource(source, val, f"val{fraction:g}"),
    )


def build_splits(cfg: DataConfig, seed: int, plain_view_zero: bool = False) -> Splits:
    """Train, validation and test datasets of `cfg` with one shared view recipe."""
    train, test = build_source(cfg, "train"), build_source(cfg, "test")
    if cfg.train_subset is not None and cfg.train_subset < len(train):
        train = SubsetSource(train, np.arange(cfg.train_subset), f"first{cfg.train_subset}")
    if cfg.test_subset is not None and cfg.test_subset < len(test):
        test = SubsetSource(test, np.arange(cfg.test_subset), f"first{cfg.test_subset}")
    train, val = carve_validation(train, cfg.val_fraction)
    recipe = ViewRecipe(cfg, train, seed, plain_view_zero=plain_view_zero)
    return Splits(
        ViewDataset(train, recipe),
        None if val is None else ViewDataset(val, recipe),
        ViewDataset(test, recipe),
        train.num_classes,
        cfg.num_workers,
    )
