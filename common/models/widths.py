"""Layer widths as plain data, so pruned networks are stored as DATA, never as pickled modules.

A pruned network is kept as (registered model name, widths dict, state dict). `model_widths`
reads the widths dict off any model; `apply_widths` resizes a default-built model to it, after
which the pruned state dict loads with `load_state_dict`. The dict is JSON-friendly::

    {"layer1.0.conv1": {"in": 16, "out": 9, "groups": 1},
     "layer1.0.bn1": {"num_features": 9},
     "linear": {"in": 64, "out": 10}}

Only `nn.Conv2d`, `nn.Linear` and BatchNorm (`_BatchNorm`, which includes `SyncBatchNorm` and
the project's `AllReduceBatchNorm`) are described, subclasses included (timm's
`BatchNormAct2d`, which applies its activation itself, and `Conv2dSame`). That covers every
network in this package and timm's BatchNorm CNNs; a network whose pruning also resizes other
parametrised layers (LayerNorm, GroupNorm, ...) cannot be rebuilt from widths alone.
"""

from __future__ import annotations

import copy
import difflib
import itertools
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["apply_widths", "init_module", "model_widths"]

_CONV_KEYS = ("in", "out", "groups")
_LINEAR_KEYS = ("in", "out")
_BN_KEYS = ("num_features",)


def init_module(m: nn.Module) -> None:
    """The project's default initialisation of one module (not recursive; use `model.apply`).

    Convs: Kaiming-normal, fan_out, ReLU gain (He et al. 2015; what the reference CIFAR
    implementations and torchvision use), bias zero. BatchNorm: weight 1, bias 0. Linear keeps
    PyTorch's default. `apply_widths` uses it for the modules it creates, unless the model
    defines its own `init_module(m)` method.
    """
    if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, _BatchNorm) and m.affine:
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def _sizes(m: nn.Module) -> dict[str, int] | None:
    """The widths record of `m`, or None when `m` is not a described layer type."""
    if isinstance(m, nn.Conv2d):
        return {"in": m.in_channels, "out": m.out_channels, "groups": m.groups}
    if isinstance(m, nn.Linear):
        return {"in": m.in_features, "out": m.out_features}
    if isinstance(m, _BatchNorm):
        return {"num_features": m.num_features}
    return None


def model_widths(model: nn.Module) -> dict[str, dict[str, int]]:
    """Sizes of every Conv2d, Linear and BatchNorm in `model`, keyed by qualified module name.

    Conv2d -> ``{"in", "out", "groups"}``; Linear -> ``{"in", "out"}``; BatchNorm ->
    ``{"num_features"}``. Modules registered under several names appear once (first name).
    """
    out: dict[str, dict[str, int]] = {}
    for name, m in model.named_modules():
        sizes = _sizes(m)
        if sizes is not None:
            out[name] = sizes
    return out


def _factory_kwargs(m: nn.Module) -> dict[str, Any]:
    t = next(
        (
            t
            for t in itertools.chain(m.parameters(False), m.buffers(False))
            if t.is_floating_point()
        ),
        None,
    )
    return {} if t is None else {"device": t.device, "dtype": t.dtype}


def _torch_constructor(m: nn.Module) -> bool:
    """Whether `type(m)` takes torch's constructor arguments, which `_rebuild` passes: torch's
    classes and subclasses that keep their constructor (the project's AllReduceBatchNorm)."""
    return type(m).__init__.__module__.startswith("torch.")


def _resized_copy(m: nn.Module, sizes: Mapping[str, int]) -> nn.Module:
    """A copy of `m` whose tensors have the given sizes, freshly reset.

    For subclasses with constructors of their own: calling `type(m)(sizes, ...)` with torch's
    arguments would silently give timm's `BatchNormAct2d` its default activation (ReLU, where
    the network has SiLU or Hardswish) and fails for `Conv2dSame` (no `padding_mode`). A copy
    keeps whatever the subclass holds beyond the sizes (activation, drop layer, eps, ...)."""
    if isinstance(m, nn.Conv2d):
        cin, cout, g = sizes["in"], sizes["out"], sizes["groups"]
        if cin % g or cout % g:
            raise ValueError(f"in ({cin}) and out ({cout}) must be divisible by groups ({g})")
        attrs = {"in_channels": cin, "out_channels": cout, "groups": g}
        shapes = {"weight": (cout, cin // g, *m.kernel_size), "bias": (cout,)}
    elif isinstance(m, nn.Linear):
        attrs = {"in_features": sizes["in"], "out_features": sizes["out"]}
        shapes = {"weight": (sizes["out"], sizes["in"]), "bias": (sizes["out"],)}
    else:
        n = sizes["num_features"]
        attrs = {"num_features": n}
        shapes = {"weight": (n,), "bias": (n,), "running_mean": (n,), "running_var": (n,)}
    shapes = {k: v for k, v in shapes.items() if getattr(m, k, None) is not None}
    fk = _factory_kwargs(m)
    # the tensors about to be replaced are shared, not copied; everything else is copied
    new = copy.deepcopy(m, {id(getattr(m, k)): getattr(m, k) for k in shapes})
    for k, v in attrs.items():
        setattr(new, k, v)
    for k, shape in shapes.items():
        if k in m._parameters:
            setattr(new, k, nn.Parameter(torch.empty(shape, **fk), m._parameters[k].requires_grad))
        else:
            setattr(new, k, torch.empty(shape, **fk))
    new.reset_parameters()  # what the constructor would have done (BN: statistics too)
    return new


def _rebuild(m: nn.Module, sizes: Mapping[str, int]) -> nn.Module:
    """A fresh module of `type(m)` with `m`'s hyper-parameters and the given sizes."""
    if not _torch_constructor(m):
        return _resized_copy(m, sizes)
    fk = _factory_kwargs(m)
    if isinstance(m, nn.Conv2d):
        return type(m)(
            sizes["in"],
            sizes["out"],
            m.kernel_size,
            stride=m.stride,
            padding=m.padding,
            dilation=m.dilation,
            groups=sizes["groups"],
            bias=m.bias is not None,
            padding_mode=m.padding_mode,
            **fk,
        )
    if isinstance(m, nn.Linear):
        return type(m)(sizes["in"], sizes["out"], bias=m.bias is not None, **fk)
    extra = {"process_group": m.process_group} if isinstance(m, nn.SyncBatchNorm) else {}
    return type(m)(
        sizes["num_features"],
        eps=m.eps,
        momentum=m.momentum,
        affine=m.affine,
        track_running_stats=m.track_running_stats,
        **extra,
        **fk,
    )


def apply_widths(model: nn.Module, widths: Mapping[str, Mapping[str, int]]) -> nn.Module:
    """Resize `model` in place to `widths` (as produced by `model_widths`) and return it.

    Each named module is replaced by a freshly constructed module of the same type and
    hyper-parameters (kernel, stride, padding, dilation, bias presence, padding_mode; eps,
    momentum, affine, track_running_stats) with the given sizes (a subclass with its own
    constructor, such as timm's `BatchNormAct2d`, by a resized copy), initialised by
    `model.init_module` if the model defines one, else by `init_module`. A record may give a
    subset of its keys (the rest keep their current values); modules whose sizes already match
    are left untouched, weights included. Everything is validated before anything is replaced.

    Raises ValueError for an unknown module name, a module that is not Conv2d/Linear/BatchNorm,
    a record whose keys don't fit the module's type (e.g. ``num_features`` for a conv), a
    non-positive size, or sizes the layer type rejects (e.g. ``in`` not divisible by ``groups``).
    """
    if not isinstance(widths, Mapping):
        raise TypeError(f"widths must be a mapping of module name -> sizes, got {type(widths)}")
    init: Callable[[nn.Module], None] = getattr(model, "init_module", init_module)
    known = list(model_widths(model))
    replacements: list[tuple[nn.Module, str, nn.Module]] = []
    for name, spec in widths.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"widths key {name!r}: expected a non-empty module name")
        try:
            m = model.get_submodule(name)
        except AttributeError:
            close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ValueError(
                f"widths key {name!r}: {type(model).__name__} has no module of that name.{hint}"
            ) from None
        current = _sizes(m)
        if current is None:
            raise ValueError(
                f"widths key {name!r}: it is a {type(m).__name__}; widths only describe "
                "Conv2d, Linear and BatchNorm modules"
            )
        if not isinstance(spec, Mapping):
            raise ValueError(f"widths[{name!r}]: expected a mapping of sizes, got {spec!r}")
        bad = sorted(set(spec) - set(current))
        if bad:
            raise ValueError(
                f"widths[{name!r}] = {dict(spec)!r} does not match the module's type: "
                f"{name!r} is a {type(m).__name__}, whose record has keys {sorted(current)} "
                f"(unexpected {bad})"
            )
        for k, v in spec.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"widths[{name!r}][{k!r}] = {v!r}: expected a positive int")
        sizes = {**current, **spec}
        if sizes == current:
            continue
        try:
            new = _rebuild(m, sizes)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(
                f"widths[{name!r}]: cannot build a {type(m).__name__} with sizes {sizes}: {e}"
            ) from e
        new.train(m.training)
        with torch.no_grad():
            init(new)
        parent_name, _, child = name.rpartition(".")
        replacements.append((model.get_submodule(parent_name), child, new))
    for parent, child, new in replacements:
        setattr(parent, child, new)
    return model
