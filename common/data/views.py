"""Replayable augmentation views.

A view is fully determined by (seed, sample_id, view_id): its parameters (crop box, flip,
RandAugment's ops, and with `data.mix` the partner sample, mixing coefficient and pasted box)
are drawn from
generators seeded with exactly those integers. Teachers scored view v of sample i;
the student later rebuilds the same pixels from the same three numbers (Beyer et al. 2022:
teacher and student must see the same view; FKD replays stored crop boxes the same way).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from common.config import DataConfig
from common.data import randaugment
from common.data.seeding import mix, rng_for
from common.data.sources import ImageSource

_VIEW_SALT = 0x51EE
_MIX_SALT = 0x313C
_RA_SALT = 0x4A0D


@dataclass(frozen=True)
class ViewParams:
    """Crop box in pixels of the (padded) source image and a flip flag."""

    top: int
    left: int
    height: int
    width: int
    flip: bool


@dataclass(frozen=True)
class MixParams:
    """The partner sample, the weight `lam` of the sample's own label, and for cutmix the
    pasted box (rows top..top+height, columns left..left+width of the partner's view)."""

    partner: int
    lam: float
    box: tuple[int, int, int, int] | None = None


class ViewRecipe:
    """Turns (image, sample_id, view_id) into a normalised float tensor [3, S, S]."""

    def __init__(self, cfg: DataConfig, source: ImageSource, seed: int, plain_view_zero=False):
        self.kind = cfg.augment
        self.size = cfg.image_size or source.native_size
        if self.size is None:
            raise ValueError("data.image_size must be set for datasets of mixed image sizes")
        self.pad = cfg.pad
        self.scale, self.ratio, self.hflip = cfg.crop_scale, cfg.crop_ratio, cfg.hflip
        self.mean = torch.tensor(cfg.mean or source.stats.mean).view(3, 1, 1)
        self.std = torch.tensor(cfg.std or source.stats.std).view(3, 1, 1)
        self.seed = seed
        self.plain_view_zero = plain_view_zero
        self.mix_kind, self.mix_alpha = cfg.mix, cfg.mix_alpha
        self.ra_ops, self.ra_magnitude = cfg.randaugment, cfg.randaugment_magnitude

    def fingerprint(self) -> str:
        """Hash of everything that decides a view's pixels (for cache manifests)."""
        spec = {
            "kind": self.kind,
            "size": self.size,
            "pad": self.pad,
            "scale": list(self.scale),
            "ratio": list(self.ratio),
            "hflip": self.hflip,
            "mean": self.mean.flatten().tolist(),
            "std": self.std.flatten().tolist(),
            "seed": self.seed,
            "plain_view_zero": self.plain_view_zero,
            **(
                {"mix": self.mix_kind, "mix_alpha": self.mix_alpha}
                if self.mix_kind != "none"
                else {}
            ),
            **({"randaugment": [self.ra_ops, self.ra_magnitude]} if self.ra_ops else {}),
            # bump when the sampling code below changes the pixels of a recipe; 3 only for
            # `none` (its views were shifted by `pad` under 2), so other caches stay valid
            "algorithm": 3 if self.kind == "none" else 2,
        }
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()

    # ---------------------------------------------------------------------------------------

    def _base(self, img: torch.Tensor) -> torch.Tensor:
        """The image at network resolution (cifar/none recipes crop from this)."""
        if img.shape[-2:] != (self.size, self.size):
            img = _resize(img, self.size, self.size)
        return img

    def params(self, sample_id: int, view_id: int, height: int, width: int) -> ViewParams:
        """Parameters of a view of an image of the given (source) size."""
        if self.kind == "imagenet":
            rng = rng_for(self.seed, _VIEW_SALT, sample_id, view_id)
            flip = bool(self.hflip and rng.random() < 0.5)
            return _random_resized_crop(rng, height, width, self.scale, self.ratio, flip)
        if self.kind == "none":  # the image itself: the crop at the centre of the padding
            return ViewParams(self.pad, self.pad, self.size, self.size, False)
        # cifar: three small integers straight from one 63-bit hash (a numpy Generator per
        # view cost more than the crop itself)
        h = mix(self.seed, _VIEW_SALT, sample_id, view_id)
        span = 2 * self.pad + 1
        top, left = (h >> 1) % span, (h >> 21) % span
        return ViewParams(top, left, self.size, self.size, bool(self.hflip and h & 1))

    def mixes(self, view_id: int) -> bool:
        """Whether training view `view_id` is mixed (never the plain view)."""
        return (
            self.mix_kind != "none" and view_id >= 0 and not (self.plain_view_zero and view_id == 0)
        )

    def mix_params(self, sample_id: int, view_id: int, num_samples: int) -> MixParams:
        """Partner, coefficient and box of view `view_id` of `sample_id`: a pure function of
        (seed, sample_id, view_id); the partner is never the sample itself."""
        rng = rng_for(self.seed, _MIX_SALT, sample_id, view_id)
        partner = (sample_id + 1 + int(rng.integers(max(num_samples - 1, 1)))) % num_samples
        lam = float(rng.beta(self.mix_alpha, self.mix_alpha))
        if self.mix_kind == "mixup":
            return MixParams(partner, lam)
        s = self.size  # cutmix: a box of area (1 - lam) S^2, clipped at the borders
        cut = math.sqrt(1.0 - lam)
        cy, cx = int(rng.integers(s)), int(rng.integers(s))
        h, w = round(s * cut), round(s * cut)
        top, bottom = max(cy - h // 2, 0), min(cy - h // 2 + h, s)
        left, right = max(cx - w // 2, 0), min(cx - w // 2 + w, s)
        box = (top, left, max(bottom - top, 0), max(right - left, 0))
        return MixParams(partner, 1.0 - box[2] * box[3] / (s * s), box)

    def mixed(self, own: torch.Tensor, other: torch.Tensor, p: MixParams) -> torch.Tensor:
        """The sample's view mixed with its partner's view."""
        if p.box is None:
            return own * p.lam + other * (1.0 - p.lam)
        top, left, h, w = p.box
        out = own.clone()
        out[:, top : top + h, left : left + w] = other[:, top : top + h, left : left + w]
        return out

    def view(self, img: torch.Tensor, sample_id: int, view_id: int) -> torch.Tensor:
        """Training view `view_id` of sample `sample_id` (uint8 [3,H,W] -> float [3,S,S])."""
        if self.plain_view_zero and view_id == 0:
            return self.plain(img)
        if self.kind == "imagenet":
            p = self.params(sample_id, view_id, img.shape[-2], img.shape[-1])
            out = img[:, p.top : p.top + p.height, p.left : p.left + p.width]
            out = _resize(out, self.size, self.size)
            out = out.flip(-1) if p.flip else out
        else:
            p = self.params(sample_id, view_id, self.size, self.size)
            out = _shifted(self._base(img).numpy(), p.top - self.pad, p.left - self.pad)
            out = torch.from_numpy(np.ascontiguousarray(out[:, :, ::-1] if p.flip else out))
        if self.ra_ops:
            ops = randaugment.choose(rng_for(self.seed, _RA_SALT, sample_id, view_id), self.ra_ops)
            out = randaugment.apply(out, ops, self.ra_magnitude)
        return self._normalise(out)

    def plain(self, img: torch.Tensor) -> torch.Tensor:
        """The evaluation view: resize (imagenet: short side to S/0.875, centre crop)."""
        if self.kind == "imagenet":
            h, w = img.shape[-2:]
            short = round(self.size / 0.875)
            nh, nw = (
                (short, max(short, round(w * short / h)))
                if h <= w
                else (
                    max(short, round(h * short / w)),
                    short,
                )
            )
            img = _resize(img, nh, nw)
            top, left = (nh - self.size) // 2, (nw - self.size) // 2
            img = img[:, top : top + self.size, left : left + self.size]
        else:
            img = self._base(img)
        return self._normalise(img)

    def _normalise(self, img: torch.Tensor) -> torch.Tensor:
        return (img.float().div_(255.0) - self.mean) / self.std


def _shifted(img: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """The image moved by (-dy, -dx) with zeros shifted in: the pad-then-crop of the cifar
    recipe in one copy, without materialising the padded image."""
    _, h, w = img.shape
    out = np.zeros_like(img)
    ys, ye, xs, xe = max(dy, 0), min(dy + h, h), max(dx, 0), min(dx + w, w)
    if ys < ye and xs < xe:
        out[:, ys - dy : ye - dy, xs - dx : xe - dx] = img[:, ys:ye, xs:xe]
    return out


def _resize(img: torch.Tensor, h: int, w: int) -> torch.Tensor:
    out = F.interpolate(
        img[None].float(), size=(h, w), mode="bilinear", antialias=True, align_corners=False
    )[0]
    return out.round_().clamp_(0, 255).to(torch.uint8)


def _random_resized_crop(rng, height, width, scale, ratio, flip) -> ViewParams:
    """torchvision's RandomResizedCrop.get_params, driven by our seeded generator."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return ViewParams(top, left, h, w, flip)
    in_ratio = width / height  # fallback: the centre crop torchvision takes
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        w, h = width, height
    return ViewParams((height - h) // 2, (width - w) // 2, h, w, flip)
