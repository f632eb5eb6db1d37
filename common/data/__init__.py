"""Datasets by registry name, replayable views and distributed, resumable loading."""

from __future__ import annotations

from dataclasses import dataclass

from common.config import DataConfig
from common.data.loader import (
    ReplayBatchSampler,
    ViewDataset,
    eval_batches,
    fresh_view_per_epoch,
    make_loader,
)
from common.data.sources import SOURCES, DataError, HeadSource, ImageSource, build_source
from common.data.views import ViewParams, ViewRecipe

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


@dataclass
class Splits:
    train: ViewDataset
    test: ViewDataset
    num_classes: int
    num_workers: int = 0


def build_splits(cfg: DataConfig, seed: int, plain_view_zero: bool = False) -> Splits:
    """Train and test datasets of `cfg` with one shared view recipe."""
    train, test = build_source(cfg, "train"), build_source(cfg, "test")
    if cfg.train_subset is not None and cfg.train_subset < len(train):
        train = HeadSource(train, cfg.train_subset)
    if cfg.test_subset is not None and cfg.test_subset < len(test):
        test = HeadSource(test, cfg.test_subset)
    recipe = ViewRecipe(cfg, train, seed, plain_view_zero=plain_view_zero)
    return Splits(
        ViewDataset(train, recipe), ViewDataset(test, recipe), train.num_classes, cfg.num_workers
    )
