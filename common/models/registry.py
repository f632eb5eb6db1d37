"""Name -> network factory registry, plus local weight loading.

Factories are ``fn(num_classes: int, **kwargs) -> nn.Module`` registered with
`register_model`. Any torchvision model is also accepted as ``tv_<torchvision name>`` (built
with ``weights=None``) and any timm model as ``timm_<timm name>`` (`timm.create_model`,
`common.models.timm_models`): the two ecosystems' model zoos without a wrapper per network.
Pretrained weights come only from those ecosystems' own caches, by `pretrained`
(`common.models.pretrained`, `common.models.timm_models`). `build_model` optionally resizes
the network to a pruned widths dict (see `common.models.widths`) and loads a local state dict.
"""

from __future__ import annotations

import difflib
import inspect
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from common.config import ConfigError
from common.precision import match_state_precision

from .pretrained import load_pretrained_torchvision, torchvision_weights
from .pretrained import missing_offline as tv_missing_offline
from .timm_models import TIMM_PREFIX, build_timm, timm_arch
from .timm_models import missing_offline as timm_missing_offline
from .widths import apply_widths

__all__ = [
    "TIMM_PREFIX",
    "TV_PREFIX",
    "build_model",
    "check_model",
    "list_models",
    "load_weights",
    "register_model",
]

TV_PREFIX = "tv_"

_F = TypeVar("_F", bound=Callable[..., nn.Module])
_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[_F], _F]:
    """Decorator registering ``fn(num_classes, **kwargs) -> nn.Module`` under `name`.

    Names must be unique and must not start with ``tv_`` or ``timm_`` (reserved for
    torchvision and timm models). Re-registering the same function (e.g. after a module
    reload) replaces it.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty string, got {name!r}")
    for prefix, owner in ((TV_PREFIX, "torchvision"), (TIMM_PREFIX, "timm")):
        if name.startswith(prefix):
            raise ValueError(f"model name {name!r}: the prefix {prefix!r} is reserved for {owner}")

    def decorator(fn: _F) -> _F:
        old = _MODELS.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (
            fn.__module__,
            fn.__qualname__,
        ):
            raise ValueError(
                f"model name {name!r} is already registered by {old.__module__}.{old.__qualname__}"
            )
        _MODELS[name] = fn
        return fn

    return decorator


def list_models() -> list[str]:
    """Sorted registered names. ``tv_<name>`` torchvision and ``timm_<name>`` timm models are
    accepted but not listed."""
    return sorted(_MODELS)


def _suggest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
    return f"did you mean {', '.join(map(repr, close))}?" if close else "no close match."


def _unknown_model(name: str) -> ConfigError:
    names = list_models()
    return ConfigError(
        f"Unknown model {name!r}: {_suggest(name, names)} Registered models: {', '.join(names)}. "
        f"Any torchvision model can be built as '{TV_PREFIX}<torchvision name>' "
        f"(e.g. '{TV_PREFIX}resnet18'; see torchvision.models.list_models()), any timm model "
        f"as '{TIMM_PREFIX}<timm name>' (e.g. '{TIMM_PREFIX}resnet18'; see timm.list_models())."
    )


def _torchvision_name(name: str) -> str:
    """`tv_<name>`'s torchvision name, or a ConfigError with the closest ones."""
    import torchvision

    tv_name = name[len(TV_PREFIX) :]
    available = torchvision.models.list_models()
    if tv_name not in available:
        raise ConfigError(
            f"Unknown model {name!r}: {tv_name!r} is not a torchvision model; "
            f"{_suggest(tv_name, available)} (see torchvision.models.list_models())"
        )
    return tv_name


def check_model(name: str, pretrained: str | None = None) -> str | None:
    """What `build_model(name, pretrained=...)` would refuse, found without building anything
    (so that a run is refused when its config is loaded, not after a queue wait): raises the
    ConfigError of an unknown name or weights tag; returns, offline, the message for
    pretrained weights missing from their cache (None when nothing is missing)."""
    if name.startswith(TIMM_PREFIX):
        if pretrained is None:
            timm_arch(name)
            return None
        return timm_missing_offline(name, pretrained)
    if name.startswith(TV_PREFIX):
        tv_name = _torchvision_name(name)
        if pretrained is None:
            return None
        return tv_missing_offline(torchvision_weights(tv_name, pretrained))
    if name not in _MODELS:
        raise _unknown_model(name)
    if pretrained is not None:
        raise _not_pretrainable(name)
    return None


def _not_pretrainable(name: str) -> ConfigError:
    return ConfigError(
        f"`pretrained` loads torchvision or timm weights: {name!r} is not a tv_ or "
        f"timm_ model (use `weights` with a local file)"
    )


def _build_torchvision(name: str, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    import torchvision

    tv_name = _torchvision_name(name)
    builder = torchvision.models.get_model_builder(tv_name)
    if "weights_backbone" in inspect.signature(builder).parameters:
        # Detection/segmentation builders default to downloading an ImageNet backbone.
        if kwargs.get("weights_backbone") is not None:
            raise ValueError(
                f"{name!r}: weights_backbone would download weights; nothing is downloaded "
                "here. Pass weights=<local state-dict file> instead."
            )
        kwargs = {**kwargs, "weights_backbone": None}
    return torchvision.models.get_model(tv_name, weights=None, num_classes=num_classes, **kwargs)


def build_model(
    name: str,
    num_classes: int,
    *,
    widths: Mapping[str, Mapping[str, int]] | None = None,
    weights: str | os.PathLike[str] | None = None,
    pretrained: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build registered model `name` (torchvision's as ``tv_<name>``, timm's as
    ``timm_<name>``) for `num_classes`.

    `kwargs` go to the factory (to `timm.create_model` for timm). With `pretrained`, ``tv_``
    models load torchvision's weights (``DEFAULT`` or a weights name such as
    ``IMAGENET1K_V2``) from the torch hub cache (`common.models.pretrained`), ``timm_`` models
    timm's (``DEFAULT`` or a pretrained tag such as ``a1_in1k``) from the Hugging Face hub
    cache (`common.models.timm_models`); either way the head is sized for `num_classes`. With
    `widths` (from `model_widths` of a pruned network) the default network is resized by
    `apply_widths`; with `weights` a local state-dict file is then loaded by `load_weights`.
    Raises ValueError for an unknown name, with the closest names.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if not isinstance(name, str):
        raise ValueError(f"model name must be a string, got {name!r}")
    if name.startswith(TV_PREFIX):
        model = _build_torchvision(name, num_classes, kwargs)
    elif name.startswith(TIMM_PREFIX):
        model = build_timm(name, num_classes, kwargs, pretrained)
    else:
        factory = _MODELS.get(name)
        if factory is None:
            raise _unknown_model(name)
        try:
            model = factory(num_classes, **kwargs)
        except TypeError as e:  # a misspelt or foreign factory argument in model.kwargs
            params = [p for p in inspect.signature(factory).parameters if p != "num_classes"]
            raise ConfigError(
                f"model {name!r}: {e}; its kwargs are: {', '.join(params) or '(none)'}"
            ) from None
    if pretrained is not None and not name.startswith(TIMM_PREFIX):  # timm's: at creation
        if not name.startswith(TV_PREFIX):
            raise _not_pretrainable(name)
        load_pretrained_torchvision(model, name[len(TV_PREFIX) :], pretrained)
    if widths is not None:
        apply_widths(model, widths)
    if weights is not None:
        load_weights(model, weights)
    return model


# Wrappers added by DistributedDataParallel / DataParallel and torch.compile.
_STRIP_PREFIXES = ("module.", "_orig_mod.")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: Any = load_file(str(path), device="cpu")
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise ValueError(
            f"{path}: not a state dict (expected a mapping of name -> tensor, or a dict holding "
            "one under 'state_dict' or 'model')"
        )
    return dict(obj)


def _fmt_keys(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_weights(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Load a local state-dict file into `model` (in place) and return it.

    ``.safetensors`` files are read with `safetensors.torch.load_file`; anything else with
    ``torch.load(weights_only=True)``, also accepting a dict holding the state dict under
    ``state_dict`` or ``model``. A ``module.`` / ``_orig_mod.`` prefix on every key (DDP,
    torch.compile) is stripped. Keys whose shapes differ from the model's (e.g. a 1000-class
    head loaded into a 10-class model) are skipped with a warning and keep their initial
    values. Any other missing or unexpected key raises ValueError; a missing
    ``num_batches_tracked`` BatchNorm counter (absent from some older checkpoints) is tolerated.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file not found: {path} (weights= takes a local state-dict file; "
            "nothing is ever downloaded)"
        )
    sd = _read_state_dict(path)
    own = model.state_dict()
    for prefix in _STRIP_PREFIXES:
        if (
            sd
            and all(k.startswith(prefix) for k in sd)
            and not any(k.startswith(prefix) for k in own)
        ):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_fmt_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_fmt_keys(unexpected)}")
        raise ValueError(
            f"{path}: state dict does not fit {type(model).__name__} ({'; '.join(parts)})"
        )
    skipped = [k for k, v in sd.items() if tuple(v.shape) != tuple(own[k].shape)]
    if skipped:
        details = [f"{k} (file {tuple(sd[k].shape)}, model {tuple(own[k].shape)})" for k in skipped]
        warnings.warn(
            f"{path}: skipped {len(skipped)} key(s) whose shapes differ from the model: "
            f"{_fmt_keys(details)}",
            stacklevel=2,
        )
        skip = set(skipped)
        sd = {k: v for k, v in sd.items() if k not in skip}
    match_state_precision(model, sd)
    model.load_state_dict(sd, strict=False)
    return model
