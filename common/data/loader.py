"""Distributed, resumable loading of replayable views.

The sampler, not the DataLoader, owns distribution: each epoch has one global permutation
(from seed and epoch), cut into global batches of `batch_size`; each global batch is cut into
`grad_accum` micro-steps and each micro-step into one slice per process. So a run with W
processes sees, per optimizer step, exactly the samples a 1-process run with the same global
batch sees, and resuming at step s just skips s global batches without loading them.
Incomplete global batches are dropped (the same on every world size); evaluation shards the
test set without padding, so no sample is counted twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from common.data.seeding import mix
from common.data.sources import ImageSource
from common.data.views import ViewRecipe

_PERM_SALT = 0xE90C


class ViewDataset(Dataset):
    """Indexed by (sample_id, view_id) pairs; view_id -1 means the plain (evaluation) view."""

    def __init__(self, source: ImageSource, recipe: ViewRecipe):
        self.source, self.recipe = source, recipe

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        sample_id, view_id = (int(k) for k in key)
        img = self.source.image(sample_id)
        x = self.recipe.plain(img) if view_id < 0 else self.recipe.view(img, sample_id, view_id)
        item = {
            "image": x,
            "label": int(self.source.labels[sample_id]),
            "sample_id": sample_id,
            "view_id": view_id,
        }
        if self.recipe.mix_kind != "none" and view_id >= 0:  # every training item has the keys
            item["mix_label"], item["mix_lam"] = item["label"], 1.0
            if self.recipe.mixes(view_id):
                p = self.recipe.mix_params(sample_id, view_id, len(self.source))
                other = self.recipe.view(self.source.image(p.partner), p.partner, view_id)
                item["image"] = self.recipe.mixed(x, other, p)
                item["mix_label"], item["mix_lam"] = int(self.source.labels[p.partner]), p.lam
        return item


ViewChooser = Callable[[np.ndarray, int], np.ndarray]
"""(sample_ids, epoch) -> view_ids: which view of each sample a step trains on."""


def fresh_view_per_epoch(sample_ids: np.ndarray, epoch: int) -> np.ndarray:
    """Supervised training: view `epoch` of every sample (a new augmentation each epoch)."""
    return np.full(len(sample_ids), epoch, dtype=np.int64)


class ReplayBatchSampler:
    """Yields this process's micro-batches as lists of (sample_id, view_id)."""

    def __init__(
        self,
        num_samples: int,
        *,
        batch_size: int,
        grad_accum: int,
        rank: int,
        world_size: int,
        seed: int,
        choose_views: ViewChooser = fresh_view_per_epoch,
    ):
        per_step = grad_accum * world_size
        if batch_size % per_step:
            raise ValueError(
                f"batch_size {batch_size} (global) must be divisible by grad_accum x processes "
                f"= {grad_accum} x {world_size}; change loop.batch_size or loop.grad_accum"
            )
        self.steps_per_epoch = num_samples // batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"batch_size {batch_size} is larger than the training set ({num_samples}); "
                f"lower loop.batch_size"
            )
        self.num_samples, self.batch_size, self.grad_accum = num_samples, batch_size, grad_accum
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.micro = batch_size // per_step
        self.choose_views = choose_views
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch's permutation and skip `start_step` optimizer steps (resume)."""
        self.epoch, self.start_step = epoch, start_step

    def permutation(self, epoch: int) -> np.ndarray:
        g = torch.Generator().manual_seed(mix(self.seed, _PERM_SALT, epoch))
        return torch.randperm(self.num_samples, generator=g).numpy()

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.grad_accum

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        perm = self.permutation(self.epoch)
        for step in range(self.start_step, self.steps_per_epoch):
            batch = perm[step * self.batch_size : (step + 1) * self.batch_size]
            views = self.choose_views(batch, self.epoch)
            for a in range(self.grad_accum):
                lo = (a * self.world_size + self.rank) * self.micro
                ids, vids = batch[lo : lo + self.micro], views[lo : lo + self.micro]
                yield list(zip(ids.tolist(), vids.tolist()))


def eval_batches(num_samples: int, batch_size: int, rank: int, world_size: int):
    """This process's share of the test set (rank::world, no padding), plain views."""
    ids = list(range(rank, num_samples, world_size))
    return [[(i, -1) for i in ids[j : j + batch_size]] for j in range(0, len(ids), batch_size)]


def make_loader(dataset: ViewDataset, batch_sampler, num_workers: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
    )
