"""Physically remove pruned channels, coupled channels together, folding act(beta) forward.

Three steps, each its own function:

1. `coupled_masks`: Torch-Pruning's DependencyGraph groups channels that must go together
   (residual additions, concatenation, depthwise convs). **Coupling rule: a coupled channel is
   kept if ANY BatchNorm in its group keeps it** (the union of the per-layer decisions). This
   is the conservative choice: it never removes a channel some BN still scales up, so in
   ResNets the residual stream is only thinned where every block agrees, and the per-layer
   floor of each BN holds for every layer of its group. Grouped (non-depthwise) convs need
   the same local channel removed from every conv group (the tensor is [out, in/groups, k, k]),
   so channels at the same position in each conv group are also tied together.
2. `apply_masks` sets gamma = 0 on removed channels: the *masked* network, in which a removed
   channel emits the constant act(beta) (NS's view of a pruned channel).
3. `shrink` removes the channels group by group with `Group.prune()`. Before a consumer
   conv/linear loses input channels, their constant contribution W * act(beta) is folded into
   its bias, or, for bias-free convs feeding straight into a BN (timm's BatchNormAct2d too),
   into that BN's running_mean, so the shrunk network equals the masked one in eval mode. The
   constant values are read off the masked network itself (forward hooks), so any activation
   (ReLU, Hardswish, ...) and pooling in between are handled. Exactness limits:
   - a kxk conv with zero padding sees the constant only inside the map: the fold is exact
     away from zero-padded borders (exact everywhere with replicate padding, as in the tests);
   - where the consumer has no bias and its output is not fed straight into a BN (the
     pre-activation shortcut conv, DenseNet-40's convs feeding a concatenation) or where the
     removed channel is not constant (a squeeze-excitation block, as in MobileNetV3 and
     EfficientNet, scales it by a gate that differs per sample), nothing is folded; these
     layers are counted in the report's `unfolded` entry (exact when act(beta) = 0: beta <= 0
     after ReLU, beta = 0 after SiLU, beta = 0 or <= -3 after Hardswish).
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from common.precision import at_least_float32
from prune.l1 import bn_layers, require_bn


def build_graph(model: nn.Module, example_inputs: torch.Tensor) -> tp.DependencyGraph:
    """Trace `model` (eval mode, so BN statistics are untouched) into a DependencyGraph."""
    model.eval()
    return tp.DependencyGraph().build_dependency(
        model, example_inputs=example_inputs, verbose=False
    )


def _is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _is_grouped(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and not _is_depthwise(m)


def _full_group(dg: tp.DependencyGraph, bn: _BatchNorm):
    return dg.get_pruning_group(bn, tp.prune_batchnorm_out_channels, list(range(bn.num_features)))


def _grouped_conv_ties(dg: tp.DependencyGraph, group, c: int) -> torch.Tensor:
    """Representative root index of each of the group's `c` root channels: channels at the
    same position inside each conv group of a grouped conv must share one decision."""
    parent = list(range(c))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for item in group:
        m = item.dep.target.module
        if not _is_grouped(m):
            continue
        size = m.in_channels if dg.is_in_channel_pruning_fn(item.dep.handler) else m.out_channels
        per = size // m.groups
        by_local: dict[int, list[int]] = defaultdict(list)
        for i, r in zip(item.idxs, item.root_idxs):
            if r is not None:
                by_local[i % per].append(r)
        for roots in by_local.values():
            for r in roots[1:]:
                parent[find(r)] = find(roots[0])
    return torch.tensor([find(r) for r in range(c)], dtype=torch.long)


def round_width(
    keep: torch.Tensor, score: torch.Tensor, tie: torch.Tensor, multiple: int, floor: int
) -> torch.Tensor:
    """`keep` (bool [C]) changed to the multiple of `multiple` nearest its count (never under
    `floor`, never over C), adding the unkept channels of largest `score` or dropping the kept
    ones of smallest. Channels tied together (`tie`: representative of each) move as one
    set, so with tied sets the width lands as near the multiple as their size allows."""
    c, n = keep.numel(), int(keep.sum())
    target = multiple * math.floor(n / multiple + 0.5)
    if target < floor:
        target = multiple * math.ceil(floor / multiple)
    target = min(max(target, multiple), c)
    sets: dict[int, list[int]] = defaultdict(list)
    for ch, rep in enumerate(tie.tolist()):
        sets[rep].append(ch)
    best = {rep: max(float(score[ch]) for ch in chans) for rep, chans in sets.items()}
    keep = keep.clone()
    on = sorted((r for r in sets if keep[r]), key=lambda r: best[r])  # weakest first
    off = sorted((r for r in sets if not keep[r]), key=lambda r: -best[r])  # strongest first
    while n < target and off:
        rep = off.pop(0)
        keep[sets[rep]] = True
        n += len(sets[rep])
    while on and n - len(sets[on[0]]) >= target:
        rep = on.pop(0)
        keep[sets[rep]] = False
        n -= len(sets[rep])
    return keep


def coupled_masks(
    model: nn.Module,
    dg: tp.DependencyGraph,
    masks: dict[str, torch.Tensor],
    round_to: int = 1,
    floor_ratio: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Per-BN keep masks made consistent over coupled channels (see the module docstring);
    with `round_to` > 1 each coupled group's width then rounded to a multiple of it
    (`round_width`), never under the per-layer floor of `floor_ratio` of its channels."""
    names = {m: n for n, m in model.named_modules()}
    decided = {n: masks[n].clone() for n in masks}
    for name, bn in bn_layers(model):
        if bn not in dg.module2node:  # never called in forward: nothing depends on it
            decided[name][:] = True
            continue
        group = _full_group(dg, bn)
        c = bn.num_features
        tie = _grouped_conv_ties(dg, group, c)
        keep = torch.zeros(c, dtype=torch.bool)
        bn_items = [
            (names[it.dep.target.module], it.idxs, it.root_idxs)
            for it in group
            if isinstance(it.dep.target.module, _BatchNorm)
            and names.get(it.dep.target.module) in decided
        ]
        for n, idxs, roots in bn_items:
            for i, r in zip(idxs, roots):
                keep[r] |= bool(decided[n][i])
        for r in range(c):  # a tie set is kept if any member is
            keep[tie[r]] |= keep[r]
        keep = keep[tie]
        if round_to > 1:
            score = torch.zeros(c, dtype=torch.float64)  # a channel's largest |gamma|
            for n, idxs, roots in bn_items:
                g = model.get_submodule(n).weight.detach().abs().double().cpu()
                for i, r in zip(idxs, roots):
                    if r is not None:
                        score[r] = max(float(score[r]), float(g[i]))
            floor = max(1, math.ceil(floor_ratio * c))
            keep = round_width(keep, score, tie, round_to, floor)
        for n, idxs, roots in bn_items:
            for i, r in zip(idxs, roots):
                decided[n][i] = keep[r]
    return decided


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Zero gamma of removed channels, in place: the masked network."""
    with torch.no_grad():
        for name, m in bn_layers(model):
            m.weight[~masks[name].to(m.weight.device)] = 0.0
    return model


def constant_inputs(model: nn.Module, x: torch.Tensor, rtol: float = 1e-5) -> dict:
    """For every Conv2d/Linear: per input channel the value it receives when that channel is
    constant over samples and positions (as a removed channel's act(beta) is), else NaN."""
    found: dict[nn.Module, torch.Tensor] = {}

    def hook(m: nn.Module, args) -> None:
        inp = at_least_float32(args[0].detach())
        flat = inp.transpose(0, 1).reshape(inp.shape[1], -1)  # [C, N*H*W]
        lo, hi, mean = flat.min(1).values, flat.max(1).values, flat.mean(1)
        const = (hi - lo) <= rtol * (1 + mean.abs())
        found[m] = torch.where(const, mean, torch.full_like(mean, float("nan"))).cpu()

    mods = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    handles = [m.register_forward_pre_hook(hook) for m in mods]
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return found


def _contribution(m: nn.Module, idxs: list[int], values: torch.Tensor) -> torch.Tensor:
    """Output offset [out] that input channels `idxs` with constant `values` add to `m`."""
    w = at_least_float32(m.weight.detach()).cpu()
    values = values.to(w.dtype)
    if isinstance(m, nn.Linear):
        return w[:, idxs] @ values
    per_in, per_out = m.in_channels // m.groups, m.out_channels // m.groups
    ksum = w.sum((2, 3))  # [out, in/groups]
    delta = torch.zeros(m.out_channels, dtype=w.dtype)
    for c, v in zip(idxs, values.tolist()):
        g, local = divmod(c, per_in)
        rows = slice(g * per_out, (g + 1) * per_out)
        delta[rows] += v * ksum[rows, local]
    return delta


# Ops through which a per-channel constant offset passes unchanged: x + d -> op(x) + d.
_SHIFT_OPS = ("AddBackward", "AvgPool", "MaxPool", "MeanBackward", "ViewBackward", "Reshape")


def _absorb(node, delta: torch.Tensor) -> bool:
    """Push a per-channel output offset `delta` from `node` forward until BNs absorb it
    (running_mean -= delta) or a Linear with bias does (bias += W @ delta), passing through
    additions, pooling, reshapes and concatenations. False if some path reaches anything else
    (then the caller records the layer as unfolded)."""
    ok = True
    for out in node.outputs:
        m = out.module
        if isinstance(m, _BatchNorm):
            m.running_mean.sub_(delta.to(m.running_mean))
        elif isinstance(m, nn.Linear) and m.bias is not None and m.in_features == len(delta):
            w = at_least_float32(m.weight.detach()).cpu()
            m.bias.add_((w @ delta.to(w.dtype)).to(m.bias))
        elif isinstance(m, tp.ops._ConcatOp) and m.offsets is not None:
            k = [i for i, n in enumerate(out.inputs) if n is node]
            if len(k) != 1:
                return False
            wide = torch.zeros(m.offsets[-1], dtype=delta.dtype)
            wide[m.offsets[k[0]] : m.offsets[k[0]] + len(delta)] = delta
            ok = _absorb(out, wide) and ok
        elif (
            isinstance(m, tp.ops._ElementWiseOp) and any(o in m._grad_fn for o in _SHIFT_OPS)
        ) or _inside_bn_module(out):
            ok = _absorb(out, delta) and ok
        else:
            return False
    return ok


def _inside_bn_module(node) -> bool:
    """A batch-norm op the graph shows apart from its module: a BatchNorm subclass that applies
    its activation itself (timm's BatchNormAct2d) outputs the activation's grad_fn, so the
    tracer maps the module to that and leaves the normalisation as an anonymous op whose only
    consumer is the module. An offset reaching that op is one the module's running_mean
    absorbs; any other batch-norm op (functional, or feeding elsewhere) is not passed."""
    m = node.module
    return (
        isinstance(m, tp.ops._ElementWiseOp)
        and "batchnorm" in m._grad_fn.lower()
        and len(node.outputs) == 1
        and isinstance(node.outputs[0].module, _BatchNorm)
    )


def _fold(dg, names, m: nn.Module, idxs: list[int], consts: dict, report: dict) -> None:
    """Fold the constant input channels `idxs` of consumer `m` into what follows it."""
    values = consts[m][idxs]
    nan = int(values.isnan().sum())
    if nan:  # not constant in the masked net (e.g. scaled by squeeze-excitation)
        report["unfolded"][names[m]] = report["unfolded"].get(names[m], 0) + nan
        values = torch.nan_to_num(values, nan=0.0)
    delta = _contribution(m, idxs, values)
    if not delta.abs().gt(0).any():
        return
    with torch.no_grad():
        if m.bias is not None:
            m.bias.add_(delta.to(m.bias))
        elif not _absorb(dg.module2node[m], delta):
            report["unfolded"][names[m]] = report["unfolded"].get(names[m], 0) + len(idxs)


def shrink(
    model: nn.Module,
    dg: tp.DependencyGraph,
    masks: dict[str, torch.Tensor],
    consts: dict,
) -> dict:
    """Remove every channel `masks` drops (already coupled), in place; returns a report."""
    names = {m: n for n, m in model.named_modules()}
    keep = {n: k.clone() for n, k in masks.items()}
    consts = dict(consts)
    report: dict = {"groups": 0, "unfolded": {}}
    for name, bn in bn_layers(model):
        remove = (~keep[name]).nonzero().flatten().tolist()
        if not remove:
            continue
        group = dg.get_pruning_group(bn, tp.prune_batchnorm_out_channels, remove)
        if not dg.check_pruning_group(group):
            raise RuntimeError(f"pruning {name} would remove every channel of a coupled layer")
        for item in group:
            m, idxs = item.dep.target.module, list(item.idxs)
            gone = set(idxs)
            if isinstance(m, _BatchNorm) and names.get(m) in keep:
                n = names[m]
                if keep[n][idxs].any():
                    raise RuntimeError(f"coupled masks disagree at {n}: a kept channel is in group")
                keep[n] = keep[n][[i for i in range(len(keep[n])) if i not in gone]]
            elif m in consts and dg.is_in_channel_pruning_fn(item.dep.handler):
                if not _is_depthwise(m):
                    _fold(dg, names, m, idxs, consts, report)
                consts[m] = consts[m][[i for i in range(len(consts[m])) if i not in gone]]
        group.prune()
        report["groups"] += 1
    return report


def slim(
    model: nn.Module,
    masks: dict[str, torch.Tensor],
    example_inputs: torch.Tensor,
    round_to: int = 1,
    floor_ratio: float = 0.0,
) -> tuple[nn.Module, dict[str, torch.Tensor], dict]:
    """Prune a copy of `model` to the (to be coupled, and rounded to multiples of
    `round_to`) per-BN keep `masks`.

    Returns (shrunk model, coupled masks in the original indexing, report). The input model
    is not modified. `example_inputs` ([N, 3, H, W], N >= 2) trace the graph and read the
    constant channels. The report's `requested` gives each BN's coupled width before
    rounding.
    """
    require_bn(model, "prune.init")
    pruned = copy.deepcopy(model).eval()
    dg = build_graph(pruned, example_inputs[:1])
    requested = coupled_masks(pruned, dg, masks)
    final = requested
    if round_to > 1:
        final = coupled_masks(pruned, dg, requested, round_to, floor_ratio)
    apply_masks(pruned, final)
    consts = constant_inputs(pruned, example_inputs)
    report = shrink(pruned, dg, final, consts)
    report["requested"] = {n: int(k.sum()) for n, k in requested.items()}
    return pruned, final, report
