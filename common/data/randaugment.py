"""RandAugment whose random choices come from the view's key.

torchvision's `RandAugment` draws its ops from the global generator, so a view could not be
rebuilt after the fact and a cached soft target would belong to another image. Here the ops,
their signs and nothing else are drawn from a generator seeded with (seed, sample_id,
view_id); the magnitudes follow torchvision's 31-bin table (Cubuk et al. 2020), so
`randaugment_magnitude: 9` means what it means there.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

_BINS = 31


def _affine(img: torch.Tensor, **kw) -> torch.Tensor:
    base = {"angle": 0.0, "translate": [0, 0], "scale": 1.0, "shear": [0.0, 0.0]}
    return TF.affine(img, **{**base, **kw}, interpolation=InterpolationMode.NEAREST, fill=0)


def _shear(axis: int):
    def op(img, m):
        shear = [0.0, 0.0]
        shear[axis] = math.degrees(math.atan(m))
        return _affine(img, shear=shear, center=[0, 0])

    return op


def _translate(axis: int):
    def op(img, m):
        shift = [0, 0]
        shift[axis] = int(m * img.shape[-1 - axis])
        return _affine(img, translate=shift)

    return op


# name -> (op(img, signed magnitude), magnitude at bin 30, signed)
_OPS = {
    "identity": (lambda img, m: img, 0.0, False),
    "shear_x": (_shear(0), 0.3, True),
    "shear_y": (_shear(1), 0.3, True),
    "translate_x": (_translate(0), 150.0 / 331.0, True),
    "translate_y": (_translate(1), 150.0 / 331.0, True),
    "rotate": (lambda img, m: TF.rotate(img, m, fill=0), 30.0, True),
    "brightness": (lambda img, m: TF.adjust_brightness(img, 1.0 + m), 0.9, True),
    "color": (lambda img, m: TF.adjust_saturation(img, 1.0 + m), 0.9, True),
    "contrast": (lambda img, m: TF.adjust_contrast(img, 1.0 + m), 0.9, True),
    "sharpness": (lambda img, m: TF.adjust_sharpness(img, 1.0 + m), 0.9, True),
    "posterize": (lambda img, m: TF.posterize(img, int(m)), None, False),
    "solarize": (lambda img, m: TF.solarize(img, m), None, False),
    "autocontrast": (lambda img, m: TF.autocontrast(img), 0.0, False),
    "equalize": (lambda img, m: TF.equalize(img), 0.0, False),
}
NAMES = tuple(_OPS)


def _magnitude(name: str, bin_: int) -> float:
    if name == "posterize":  # 8 bits at bin 0 down to 4 at bin 30, as torchvision
        return 8 - round(bin_ / ((_BINS - 1) / 4))
    if name == "solarize":  # threshold 255 (nothing) down to 0 (everything inverted)
        return 255.0 * (1 - bin_ / (_BINS - 1))
    return _OPS[name][1] * bin_ / (_BINS - 1)


def choose(rng: np.random.Generator, num_ops: int) -> list[tuple[str, bool]]:
    """`num_ops` (op name, negate) pairs drawn from `rng`: a view's whole randomness."""
    picks = rng.integers(len(NAMES), size=num_ops)
    signs = rng.integers(2, size=num_ops)
    return [(NAMES[int(i)], bool(s)) for i, s in zip(picks, signs)]


def apply(img: torch.Tensor, ops: list[tuple[str, bool]], magnitude: int) -> torch.Tensor:
    """`ops` applied in order to a uint8 [3, H, W] image."""
    for name, negate in ops:
        op, _, signed = _OPS[name]
        m = _magnitude(name, magnitude)
        img = op(img, -m if signed and negate else m)
    return img
