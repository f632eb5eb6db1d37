"""Accuracy and loss of a model on an evaluation split, summed over processes.

One function, used by the training loop after each epoch and by the prune stage before and
after removing channels, so every accuracy kdslim reports is computed the same way: plain
views, each process on its own share of the split (rank::world, no padding, no sample counted
twice), float64 sums all-reduced.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from common.data import ViewDataset, eval_batches, make_loader
from common.precision import at_least_float32, cast_floating

ExtraTerms = Callable[[torch.Tensor, dict], dict[str, torch.Tensor]]
"""(logits, batch) -> extra per-split sums (e.g. agreement with the teachers)."""


def _logits(
    model: nn.Module,
    dataset: ViewDataset,
    accelerator: Accelerator,
    batch_size: int,
    num_workers: int,
    autocast: Callable[[], AbstractContextManager],
    memory_format: torch.memory_format,
) -> Iterator[tuple[dict, torch.Tensor]]:
    """(batch, float32-or-wider logits) over this process's share of `dataset`, in eval mode
    (the model's mode is restored afterwards)."""
    was_training = model.training
    model.eval()
    dtype = next(model.parameters()).dtype
    batches = eval_batches(
        len(dataset), batch_size, accelerator.process_index, accelerator.num_processes
    )
    try:
        for batch in make_loader(dataset, batches, num_workers):
            batch = cast_floating(batch, dtype, accelerator.device)
            images = batch["image"].contiguous(memory_format=memory_format)
            with autocast():
                yield batch, at_least_float32(model(images))
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: ViewDataset,
    accelerator: Accelerator,
    *,
    batch_size: int,
    num_workers: int = 0,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    memory_format: torch.memory_format = torch.contiguous_format,
    extra: ExtraTerms | None = None,
    per_image: bool = False,
) -> dict:
    """{"acc", "loss", <extra terms>, "num_samples"} over the whole `dataset`; with
    `per_image`, also "per_image": every image's {"sample_id", "label", "pred"} (int64, in
    sample order, gathered from every process), what paired comparisons over test images
    need (`common.stats`), taken from the same forward passes as the accuracy."""
    sums: dict[str, torch.Tensor] = {}
    rows: list[torch.Tensor] = []
    shares = _logits(model, dataset, accelerator, batch_size, num_workers, autocast, memory_format)
    for batch, logits in shares:
        terms = {
            "correct": (logits.argmax(1) == batch["label"]).sum(),
            "loss": F.cross_entropy(logits, batch["label"], reduction="sum"),
            "count": torch.tensor(len(logits), device=logits.device),
            **(extra(logits, batch) if extra else {}),
        }
        for k, v in terms.items():  # float64 sums: counts stay exact at any size
            sums[k] = sums.get(k, 0) + v.detach().double()
        if per_image:
            rows.append(torch.stack([batch["sample_id"], batch["label"], logits.argmax(1)], 1))
    keys = sorted(sums) if sums else ["correct", "count", "loss"]
    vec = torch.stack(
        [torch.as_tensor(sums.get(k, 0.0), device=accelerator.device).double() for k in keys]
    )
    total = dict(zip(keys, accelerator.reduce(vec, reduction="sum").tolist()))
    count = max(total.pop("count"), 1.0)
    out = {"acc": total.pop("correct") / count, "loss": total.pop("loss") / count}
    out.update({k: v / count for k, v in total.items()})
    out["num_samples"] = int(count)
    if per_image:
        out["per_image"] = _gathered(rows, accelerator)
    return out


def _gathered(rows: list[torch.Tensor], accelerator: Accelerator) -> dict[str, np.ndarray]:
    """This process's (sample_id, label, pred) rows and every other process's, in sample
    order."""
    mine = torch.cat(rows) if rows else torch.empty(0, 3, dtype=torch.long)
    mine = mine.to(accelerator.device, torch.long)
    if accelerator.num_processes > 1:  # shares differ by at most one image: pad with -1
        mine = accelerator.pad_across_processes(mine, dim=0, pad_index=-1)
        mine = accelerator.gather(mine)
    table = mine[mine[:, 0] >= 0].cpu().numpy()
    table = table[np.argsort(table[:, 0], kind="stable")]
    return {"sample_id": table[:, 0], "label": table[:, 1], "pred": table[:, 2]}
