"""An exponential moving average of a model's weights (`loop.ema_decay`).

The average is what a stage evaluates, selects and saves: an average over the last ~1/(1 -
decay) steps moves less from epoch to epoch than the raw weights, so the reported number
depends less on where training happened to stop (Polyak & Juditsky 1992; timm's ModelEmaV3).
BatchNorm running statistics are averaged with the weights they belong to (as timm and
`AveragedModel(use_buffers=True)` do); integer buffers (`num_batches_tracked`) are copied,
not averaged. Every rank holds the same weights after a step, so every rank's average is the
same without communication.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightAverage:
    def __init__(self, model: nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, n: int) -> float:
        """The decay of the update after `n` earlier ones: min(decay, 1 - (1 + n)^(-3/4)),
        timm's ModelEmaV3 warm-up (power 3/4, its choice for short runs). Without a warm-up
        the weights of the first steps (far from the end, in another region of the loss
        surface) keep a share decay^steps of the average: 13% after 200 steps at 0.99, which
        cost the quickstart's 200-step teachers a point each (BENCHMARKS.md). This one
        forgets them (~1% after 200 steps) yet ends as long as the decay asks: 0.981 after
        200 steps, 0.989 after 400."""
        return min(self.decay, 1 - (1 + n) ** -0.75)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """After an optimizer step: average = d * average + (1 - d) * weights, d =
        `decay_at(updates)` (the first update copies the weights)."""
        mine, theirs = self.module.state_dict(), model.state_dict()
        floats = [k for k, v in mine.items() if v.is_floating_point()]
        if self.updates == 0:
            for k, v in mine.items():
                v.copy_(theirs[k])
        else:
            weight = 1 - self.decay_at(self.updates)
            torch._foreach_lerp_([mine[k] for k in floats], [theirs[k] for k in floats], weight)
            for k, v in mine.items():
                if not v.is_floating_point():
                    v.copy_(theirs[k])
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights and the update count, as one flat tensor dict (safetensors)."""
        state = {f"module.{k}": v for k, v in self.module.state_dict().items()}
        return {**state, "updates": torch.tensor(self.updates, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(
            {k.removeprefix("module."): v for k, v in state.items() if k != "updates"}
        )
        self.updates = int(state["updates"])
