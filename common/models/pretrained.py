"""Pretrained torchvision weights, the ecosystem's way: torchvision's weight enums and the torch
hub cache (`$TORCH_HOME/hub/checkpoints/`), so a file a user (or another tool) already has is
found where torchvision itself would look. Offline (`KDSLIM_OFFLINE=1` or `HF_HUB_OFFLINE=1`,
as on most compute nodes) nothing is downloaded and a missing file is an error that names the
file and where to put it.

The classifier head is sized for the run's classes: every tensor whose shape matches is
loaded, the others (the 1,000-class head) keep their fresh initialisation and are listed.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from common.errors import ConfigError


def offline() -> bool:
    return any(os.environ.get(k, "") not in ("", "0") for k in ("KDSLIM_OFFLINE", "HF_HUB_OFFLINE"))


def torchvision_weights(tv_name: str, pretrained: str):
    """torchvision's weights enum member `pretrained` (e.g. DEFAULT, IMAGENET1K_V2)."""
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(tv_name)
    except (ValueError, KeyError):
        raise ConfigError(f"torchvision has no pretrained weights for {tv_name!r}") from None
    try:
        return enum[pretrained]
    except KeyError:
        names = ", ".join(["DEFAULT", *enum.__members__])
        raise ConfigError(
            f"`model.pretrained: {pretrained}`: {tv_name} has the weights {names}"
        ) from None


def cached_file(weights) -> Path:
    """Where torchvision keeps (and looks for) the file of `weights`."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)


def missing_offline(weights) -> str | None:
    """Offline with the file of torchvision's `weights` (a weights enum member) not in the
    torch hub cache: what to put where. None when the file is there or downloads are on."""
    path = cached_file(weights)
    if path.is_file() or not offline():
        return None
    return (
        f"pretrained weights {type(weights).__name__}.{weights.name} are not in the torch "
        f"hub cache and downloads are off (KDSLIM_OFFLINE / HF_HUB_OFFLINE): put the file "
        f"{path.name} (from {weights.url}) at {path} (the cache is $TORCH_HOME/hub/"
        f"checkpoints, here {path.parent})"
    )


def load_pretrained_torchvision(model: nn.Module, tv_name: str, pretrained: str) -> nn.Module:
    """Load torchvision's `pretrained` weights of `tv_name` into `model` (in place): matching
    shapes loaded, the rest (a head for another class count) left as initialised, with a
    warning naming them."""
    weights = torchvision_weights(tv_name, pretrained)
    missing = missing_offline(weights)
    if missing:
        raise ConfigError(missing)
    path = cached_file(weights)
    try:
        state = weights.get_state_dict(progress=False, check_hash=False)
    except OSError as e:  # no network and no file
        raise ConfigError(
            f"cannot download {weights.url} ({e}); put the file at {path} instead"
        ) from None
    own = model.state_dict()
    skipped = sorted(k for k, v in state.items() if k in own and v.shape != own[k].shape)
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise ConfigError(
            f"{path}: keys {unknown[:5]} are not in {tv_name}; the file is not "
            f"{type(weights).__name__}.{weights.name}"
        )
    if skipped:
        warnings.warn(
            f"pretrained {tv_name}: kept freshly initialised (shapes differ from the file, "
            f"e.g. the classifier head): {', '.join(skipped)}",
            stacklevel=2,
        )
    model.load_state_dict({k: v for k, v in state.items() if k not in skipped}, strict=False)
    return model
