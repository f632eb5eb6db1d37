"""How the equivalence tests compare runs: in float64, against bounds derived here.

An N-process run must equal the 1-process run with the same global batch and seed. In float32
the two differ by summation order (BN statistics and gradients are summed per process, then
across), and which kernels a CPU picks for a micro-batch of 16 versus 32 decides how large that
is: measured here, 1.5e-2 after three steps on an AVX-512 machine, far less under AVX2. So the
tests run in float64 (`run.dtype=float64`), where the same dynamics cannot lift rounding to
anything near a real bug.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

F64 = ["run.dtype=float64"]

EXACT = 1e-9
"""Largest |weight difference| allowed between float64 runs that differ only in summation
order. float64 rounds at 2^-53 (1.1e-16); three early training steps amplify a rounding-sized
difference by at most ~2.5e5 (float32, 2^-24 = 6e-8, grows to 1.5e-2 on the same three steps),
so float64 runs can differ by ~3e-11: 1e-9 leaves a 30x margin. An unsynchronised BatchNorm or
a wrong batch split moves the weights by >1e-3 at the first step (tested)."""


def weights(stage_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(stage_dir / "model" / "model.safetensors"))


def max_weight_diff(a: dict, b: dict) -> float:
    """Largest |difference| over the floating tensors; integer buffers (BatchNorm's batch
    counter) must be equal."""
    assert a.keys() == b.keys()
    for k, x in a.items():
        if not x.is_floating_point():
            assert torch.equal(x, b[k]), k
    return max(
        (x.double() - b[k].double()).abs().max().item()
        for k, x in a.items()
        if x.is_floating_point()
    )


def assert_same_weights(a: dict, b: dict, atol: float) -> None:
    worst = max_weight_diff(a, b)
    assert worst <= atol, f"weights differ by up to {worst} (allowed {atol})"


def write_init(path: Path, model: torch.nn.Module, perturb: bool = False) -> Path:
    """Save `model`'s weights in float64 as a `*.model.weights` file, optionally with every
    floating value moved by one float32 rounding step (2^-24 relative, random sign)."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for k, v in model.state_dict().items():
        v = v.detach().clone()
        if v.is_floating_point():
            v = v.double()
            if perturb:
                sign = torch.randint(0, 2, v.shape, generator=g, dtype=torch.float64) * 2 - 1
                v = v * (1 + sign * 2.0**-24)
        state[k] = v.contiguous()
    save_file(state, str(path))
    return path


def float32_master_bound(reference: dict, perturbed: dict, steps: int) -> float:
    """Bound for a float64 run whose optimizer keeps float32 master weights (DeepSpeed ZeRO:
    its partitions are float32 whatever the model's dtype, so every step rounds the weights to
    float32). The floor is measured on this machine: the reference run against the same run
    started from weights moved by one float32 rounding (`write_init(perturb=True)`). Each of
    the `steps` roundings grows at most as much as the one at the start (it has fewer steps
    left to grow), so the total stays within steps x floor; x2 covers the gradient's float32
    communication, which is smaller still (lr x 2^-24 relative)."""
    floor = max_weight_diff(reference, perturbed)
    assert 0 < floor < 1e-4, f"noise floor {floor}: the perturbation did not take effect"
    return 2 * steps * floor
