"""BatchNorm folded into the convolution before it: the deployment graph.

In eval mode a BatchNorm after a convolution is an affine map per channel, so it can live in
the convolution's weights and bias: one op instead of two, and on CPU the BN pass over the
activation (a memory-bound sweep as long as the conv's own write) disappears. The model keeps
its class and module names; each folded BN becomes `nn.Identity` and its convolution gains a
bias. `folded` pairs are recorded in the model spec, so `load_model` rebuilds the same
structure before loading the weights.
"""

from __future__ import annotations

import copy
from collections import Counter

import torch
import torch.fx
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, bn) module names where a Conv2d's output feeds only a BatchNorm2d, found by
    tracing the forward (`torch.fx`); [] if the model cannot be traced symbolically."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # data-dependent control flow: nothing is folded
        return []
    mods = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0]
        if (
            isinstance(src, torch.fx.Node)
            and src.op == "call_module"
            and isinstance(mods.get(src.target), nn.Conv2d)
            and len(src.users) == 1
            and calls[src.target] == 1  # a conv called twice: both calls would need this BN
        ):
            pairs.append((src.target, node.target))
    return pairs


def restructure(model: nn.Module, pairs: list[tuple[str, str]]) -> nn.Module:
    """The folded structure, in place: each pair's BN replaced by Identity, its conv given a
    (zero) bias. Weights are whatever they were: `fold_batchnorm` or `load_state_dict` fill
    them in."""
    for conv_name, bn_name in pairs:
        conv = model.get_submodule(conv_name)
        if conv.bias is None:
            conv.bias = nn.Parameter(
                torch.zeros(conv.out_channels, dtype=conv.weight.dtype, device=conv.weight.device)
            )
        parent, _, leaf = bn_name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, nn.Identity())
    return model


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, list[tuple[str, str]]]:
    """An eval-mode copy of `model` with every foldable BN folded; returns it and the pairs."""
    model = copy.deepcopy(model).eval()
    pairs = conv_bn_pairs(model)
    fused = {
        conv: fuse_conv_bn_eval(model.get_submodule(conv), model.get_submodule(bn))
        for conv, bn in pairs
    }
    restructure(model, pairs)
    with torch.no_grad():
        for conv, f in fused.items():
            target = model.get_submodule(conv)
            target.weight.copy_(f.weight)
            target.bias.copy_(f.bias)
    return model, pairs
