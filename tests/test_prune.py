"""Network-slimming pruning: coupled shrink equals the masked net, floors, errors, CLI."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from common.checkpoint import load_model, model_spec, save_model
from common.config import ConfigError, load_config
from common.models import build_model, model_widths
from common.models.densenet import CifarDenseNet
from common.models.resnet import Bottleneck, CifarResNet, PreActBasicBlock, PreActBottleneck
from common.models.resnext import CifarResNeXt
from launch.config import Config
from prune.l1 import bn_layers
from prune.measure import count_macs, count_params
from prune.shrink import apply_masks, slim
from prune.target import measure_fn, removed_share, threshold_for
from prune.threshold import all_gammas, global_threshold, layer_keep_masks, separation
from tests.artifacts import DATA
from tests.cli import assert_one_line_error
from tests.conftest import ROOT, run_cli


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread avoids spin-wait stalls on a shared, loaded CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Small members of every family (same classes as the registry's full-size networks).
FAMILIES = {
    "vgg": lambda: build_model("cifar_vgg11", 10, cfg=[8, "M", 16, 16, "M", 24]),
    "resnet": lambda: build_model("cifar_resnet20", 10),
    "resnet_bottleneck": lambda: CifarResNet(Bottleneck, [2, 1, 1], [4, 8, 8], 10),
    "preresnet_basic": lambda: CifarResNet(PreActBasicBlock, [2, 2, 1], [8, 8, 16], 10),
    "preresnet_bottleneck": lambda: CifarResNet(PreActBottleneck, [2, 1, 1], [4, 8, 8], 10),
    "densenet": lambda: CifarDenseNet(10, 6, False, 1.0, 10),
    "densenet_bc": lambda: CifarDenseNet(16, 4, True, 0.5, 10),
    "resnext": lambda: CifarResNeXt(11, cardinality=4, base_width=4),
    "mobilenetv3": lambda: build_model("cifar_mobilenetv3_small", 10, width_mult=0.5),
}

# timm's BatchNorm CNNs: BatchNormAct2d (the activation inside the BN module), squeeze-excitation
# with SiLU / hard-sigmoid gates, depthwise convs, ResNet-D's deep stem and avg-pool shortcut.
# Total stride 32: 64x64 inputs keep 2x2 maps (and 16 values per channel) at the last stage.
TIMM_FAMILIES = {
    f"timm_{n}": (lambda n=n: build_model(f"timm_{n}", 10))
    for n in ("resnet10t", "efficientnet_lite0", "efficientnet_b0", "mobilenetv3_small_100")
}
SIZE = {**dict.fromkeys(FAMILIES, 16), **dict.fromkeys(TIMM_FAMILIES, 64)}
ALL_FAMILIES = {**FAMILIES, **TIMM_FAMILIES}


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random gammas (so the threshold prunes some channels), betas and statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, bn in bn_layers(model):
            c = bn.num_features
            bn.weight.copy_(torch.rand(c, generator=g))
            bn.bias.copy_(0.5 * torch.randn(c, generator=g))
            bn.running_mean.copy_(0.1 * torch.randn(c, generator=g))
            bn.running_var.copy_(0.5 + torch.rand(c, generator=g))
    return model.eval()


def live_statistics(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Every BN's running statistics set to those of its input on `x` (biased variance, as the
    normalisation uses it), in one eval pass: each BN then normalises exactly, so what varies
    across the inputs reaches the output. `randomise_bn`'s running_var (0.5-1.5) is far larger
    than the activations it divides, so every BN shrinks that variation: torchvision's
    MobileNetV3 at 16x16 then gives the same output for every input (to 1e-10), and
    comparing two such networks proves nothing about the paths in between."""

    def set_stats(bn: _BatchNorm, args) -> None:
        inp = args[0]
        dims = [0, *range(2, inp.dim())]
        bn.running_mean.copy_(inp.mean(dims))
        bn.running_var.copy_(inp.var(dims, unbiased=False))

    _forward_with(model, x, [bn.register_forward_pre_hook(set_stats) for _, bn in bn_layers(model)])
    return model


def _forward_with(model: nn.Module, x: torch.Tensor, hooks: list) -> None:
    """One eval-mode forward of `x` with `hooks` registered, removed afterwards."""
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in hooks:
            h.remove()


def _is_se(m: nn.Module) -> bool:  # torchvision's SqueezeExcitation, timm's SqueezeExcite
    return "SqueezeExcit" in type(m).__name__


def squeeze_excitation_edges(model: nn.Module, x: torch.Tensor) -> tuple[list, set[str]]:
    """(the BNs whose output a squeeze-excitation block scales, the names of the convs that
    read an SE block's output), found by running `x` and matching the tensors passed."""
    bn_out, se_in, se_out, readers = {}, [], set(), set()
    names = {m: n for n, m in model.named_modules()}

    def on_conv(m, args):
        if id(args[0]) in se_out:
            readers.add(names[m])

    hooks = [
        m.register_forward_hook(lambda m, a, o: bn_out.__setitem__(id(o), m))
        for _, m in bn_layers(model)
    ]
    for m in model.modules():
        if _is_se(m):
            hooks.append(m.register_forward_pre_hook(lambda m, a: se_in.append(a[0])))
            hooks.append(m.register_forward_hook(lambda m, a, o: se_out.add(id(o))))
        elif isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_pre_hook(on_conv))
    _forward_with(model, x, hooks)
    return [bn_out[id(t)] for t in se_in if id(t) in bn_out], readers


def exact_case(model: nn.Module, x: torch.Tensor, se_beta_zero: bool = True) -> nn.Module:
    """`model` in float64 with random BN affine terms, replicate padding and live statistics on
    `x`: a network where shrunk == masked is promised and not vacuous. With `se_beta_zero`
    the BNs that a squeeze-excitation block scales get beta = 0, so a channel removed there
    emits act(0) = 0 (ReLU, Hardswish, SiLU alike): only then is removing it exact (see
    `test_squeeze_excitation_channels_are_reported_unfolded`)."""
    model = replicate_padding(randomise_bn(model)).double()
    if se_beta_zero:
        with torch.no_grad():
            for bn in squeeze_excitation_edges(model, x)[0]:
                bn.bias.zero_()
    return live_statistics(model, x)


def replicate_padding(model: nn.Module) -> nn.Module:
    """A constant channel stays constant under replicate padding, so the act(beta) fold is
    exact on the whole map, borders included (with zeros it is exact away from borders)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.padding != (0, 0):
            m.padding_mode = "replicate"
    return model


@pytest.mark.numerics
@pytest.mark.parametrize("family", sorted(ALL_FAMILIES))
def test_shrunk_equals_masked(family):
    torch.manual_seed(0)
    x = torch.randn(4, 3, SIZE[family], SIZE[family], dtype=torch.float64)
    model = exact_case(ALL_FAMILIES[family](), x)  # float64: an exact comparison
    masks = layer_keep_masks(model, global_threshold(all_gammas(model), 0.5), 0.1)
    shrunk, final, report = slim(model, masks, x)
    masked = apply_masks(copy.deepcopy(model), final)
    kept = sum(int(k.sum()) for k in final.values())
    assert kept < sum(len(k) for k in final.values()), "nothing was pruned"
    assert count_params(shrunk) < count_params(model)
    assert report["unfolded"] == {}, report
    for name, bn in bn_layers(shrunk):  # physically smaller, as the coupled masks say
        assert bn.num_features == int(final[name].sum())
    with torch.no_grad():
        want, got = masked(x), shrunk(x)
    # float64: the two networks differ only in summation order and the folded constants
    scale = want.abs().max().item()
    assert (want - want[0]).abs().max() > 1e-2 * scale, "the output ignores the input"
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9 * max(scale, 1.0))


@pytest.mark.parametrize("family", ["mobilenetv3", "timm_efficientnet_b0"])
def test_squeeze_excitation_channels_are_reported_unfolded(family):
    """Where exactness ends, and the report says so. A channel removed before a
    squeeze-excitation block emits act(beta) x gate(x) in the masked network: the gate
    differs per sample, so no bias or running_mean of the conv that reads the SE output can
    stand in for it (exact only when act(beta) = 0, as `exact_case` arranges). `slim` lists
    exactly those convs in `report["unfolded"]`, and the difference is real."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, SIZE[family], SIZE[family], dtype=torch.float64)
    model = exact_case(ALL_FAMILIES[family](), x, se_beta_zero=False)
    se_bns, se_readers = squeeze_excitation_edges(model, x)
    assert se_bns and se_readers
    masks = layer_keep_masks(model, global_threshold(all_gammas(model), 0.5), 0.1)
    shrunk, final, report = slim(model, masks, x)
    assert report["unfolded"] and set(report["unfolded"]) <= se_readers, report["unfolded"]
    masked = apply_masks(copy.deepcopy(model), final)
    with torch.no_grad():
        want, got = masked(x), shrunk(x)
    assert (got - want).abs().max() > 1e-6 * want.abs().max()


@pytest.mark.numerics
@pytest.mark.parametrize(
    "family", ["vgg", "resnet", "resnet_bottleneck", "resnext", "mobilenetv3", "densenet_bc"]
)
def test_round_to_gives_multiples_keeps_coupling_and_shrunk_equals_masked(family):
    """`prune.round_to`: every coupled width a multiple of 4 (or the layer's whole width)
    within half a multiple of what the threshold asked for (or up to the floor), and the
    shrunk network still equals the masked one. DenseNet's concatenations share a producer's
    channels between BNs of different widths, so there only the equality is promised."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    model = exact_case(FAMILIES[family](), x)
    masks = layer_keep_masks(model, global_threshold(all_gammas(model), 0.5), 0.1)
    shrunk, final, report = slim(model, masks, x, round_to=4, floor_ratio=0.1)
    masked = apply_masks(copy.deepcopy(model), final)
    rounded = 0
    for name, bn in bn_layers(shrunk):
        kept, total, asked = bn.num_features, len(final[name]), report["requested"][name]
        assert kept == int(final[name].sum())
        if family != "densenet_bc":
            ties = 4 if family == "resnext" else 1  # a grouped conv's channels move together
            assert kept % 4 == 0 or kept == total, (name, kept)
            assert abs(kept - asked) <= 2 + ties or kept <= math.ceil(0.1 * total) + 3
            rounded += kept != asked
    assert family == "densenet_bc" or rounded > 0, "nothing needed rounding: a vacuous test"
    assert count_params(shrunk) < count_params(model)
    with torch.no_grad():
        want, got = masked(x), shrunk(x)
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-9 * max(scale, 1.0))


def test_zero_padding_fold_is_exact_away_from_borders():
    """With zero padding only border outputs of the first consumer differ: compare the
    feature maps of a VGG interior region."""
    model = randomise_bn(build_model("cifar_vgg11", 10, cfg=[8, 8, 16])).double()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    masks = layer_keep_masks(model, global_threshold(all_gammas(model), 0.5), 0.1)
    shrunk, final, _ = slim(model, masks, x)
    masked = apply_masks(copy.deepcopy(model), final)
    with torch.no_grad():
        a, b = masked.feature(x)[:, final["feature.7"]], shrunk.feature(x)
    # the constants enter the 2nd and 3rd 3x3 convs: 2 border pixels see the zero padding
    torch.testing.assert_close(b[..., 2:-2, 2:-2], a[..., 2:-2, 2:-2], rtol=0, atol=1e-10)
    assert not torch.allclose(b, a, atol=1e-3)  # ... and the border does differ


def test_grouped_conv_stays_balanced():
    model = randomise_bn(CifarResNeXt(11, cardinality=4, base_width=4))
    masks = layer_keep_masks(model, global_threshold(all_gammas(model), 0.7), 0.0)
    shrunk, _, _ = slim(model, masks, torch.randn(2, 3, 8, 8))
    for m in shrunk.modules():
        if isinstance(m, nn.Conv2d) and m.groups > 1:
            assert m.in_channels % m.groups == 0 and m.out_channels % m.groups == 0


@pytest.mark.parametrize("floor", [0.0, 0.25])
def test_no_layer_vanishes_at_ratio_099(floor):
    model = randomise_bn(build_model("cifar_resnet20", 10))
    masks = layer_keep_masks(model, global_threshold(all_gammas(model), 0.99), floor)
    shrunk, _, _ = slim(model, masks, torch.randn(2, 3, 8, 8))
    for name, bn in bn_layers(shrunk):
        total = model.get_submodule(name).num_features
        assert bn.num_features >= max(1, int(floor * total)), name
    for m in shrunk.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            assert min(m.weight.shape[:2]) >= 1
    assert shrunk(torch.randn(2, 3, 8, 8)).shape == (2, 10)


def test_threshold_is_ns_index():
    g = torch.tensor([0.5, 0.1, 0.4, 0.2, 0.3])
    assert global_threshold(g, 0.4) == pytest.approx(0.3)  # sorted[int(5 * 0.4)]
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="prune.ratio"):
            global_threshold(g, bad)


@pytest.mark.parametrize("ratio", ["0", "1.0", "1.2", "-0.5"])
def test_ratio_outside_range_is_a_config_error(ratio):
    with pytest.raises(ConfigError, match=r"prune\.ratio"):
        load_config(Config, None, [f"prune.ratio={ratio}"])


def test_model_without_batchnorm_is_a_clear_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 10))
    with pytest.raises(ValueError, match=r"no BatchNorm.*prune\.init"):
        all_gammas(model)
    with pytest.raises(ValueError, match=r"prune\.init"):
        slim(model, {}, torch.randn(2, 3, 8, 8))


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("cifar_vgg11", {"cfg": [8, "M", 16, "M", 16]}),
        ("cifar_resnet20", {}),
        ("cifar_mobilenetv3_small", {"width_mult": 0.5}),
        ("timm_efficientnet_b0", {}),  # BatchNormAct2d (SiLU inside the BN), SE, drop path
        ("timm_tf_efficientnet_lite0", {}),  # Conv2dSame: TF "same" padding in forward
        ("timm_mobilenetv3_small_100", {}),
    ],
)
def test_pruned_model_round_trips_through_save_load(tmp_path, name, kwargs):
    model = randomise_bn(build_model(name, 10, **kwargs))
    masks = layer_keep_masks(model, global_threshold(all_gammas(model), 0.6), 0.1)
    shrunk, _, _ = slim(model, masks, torch.randn(2, 3, 16, 16))
    spec = model_spec(name, 10, kwargs, widths=model_widths(shrunk))
    save_model(tmp_path / "m", shrunk, spec)
    loaded, loaded_spec = load_model(tmp_path / "m")  # rebuilt from widths, no original needed
    assert loaded_spec["widths"] == model_widths(shrunk)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():  # the same weights and shapes: the same kernels, bit for bit
        torch.testing.assert_close(loaded.eval()(x), shrunk(x), rtol=0, atol=0)


def test_macs_counter():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 16, 10))
    assert count_macs(model, (3, 4, 4)) == 8 * 16 * 27 + 8 * 16 * 10
    dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    assert count_macs(dw, (8, 4, 4)) == 8 * 16 * 9


SMALL = [
    "--config",
    str(ROOT / "tests/configs/base.yaml"),
    "data.image_size=8",
    "data.pad=1",
    "data.test_subset=64",
    "logging.progress=false",
]


@pytest.mark.slow
def test_cli_train_sparsity_prune_finetune(tmp_path):
    """The chain on digits; sparsity and prune run in 2 processes (DDP, all-reduce BN), prune
    in 2 rounds, and every rank must hold the same pruned model; fine-tune with live KD
    reloads and trains the smaller model."""
    # one run's configuration for every stage; a run of these stages alone, so the graph has
    # sparsity start from the teacher
    run = [
        *SMALL,
        f"run.out_dir={tmp_path}",
        "pipeline.stages=[train, sparsity, prune, finetune]",
        "train.model.name=cifar_resnet20",
        *(
            f"{stage}.loop.{k}"
            for stage in ("train", "sparsity", "finetune")
            for k in ("max_steps=2", "batch_size=32")
        ),
        "sparsity.s=0.01",
        "prune.ratio=0.6",
        "prune.latency_repeats=2",
        "prune.latency_warmup=1",
        "prune.iterative.rounds=2",
        "prune.iterative.loop.max_steps=1",
        "prune.iterative.loop.batch_size=32",
        "finetune.kd_from=live",
    ]
    run_cli("train", *run)
    run_cli("sparsity", *run, processes=2)
    assert (tmp_path / "sparsity/gamma_hist_epoch000.png").is_file()
    assert (tmp_path / "sparsity/gamma_hist_final.png").is_file()
    run_cli("prune", *run, processes=2)
    pdir = tmp_path / "prune"
    metrics = json.loads((pdir / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["after"]["params"] < metrics["before"]["params"]
    assert metrics["after"]["flops"] == 2 * metrics["after"]["macs"]
    assert set(metrics["after"]["latency_ms"]) == {"1", "64"}
    assert len(metrics["rounds"]) == 2 and (pdir / "widths.png").is_file()
    for r in ("round_1", "round_2"):
        digests = [
            json.loads((pdir / r / "rank_digests" / f"rank{i}.json").read_text()) for i in (0, 1)
        ]
        assert digests[0] == digests[1]
    pruned, spec = load_model(pdir / "model")
    assert count_params(pruned) == metrics["after"]["params"]
    assert spec["widths"] == model_widths(pruned)

    assert metrics["source"] == str(tmp_path / "sparsity" / "model")
    sparse = json.loads((tmp_path / "sparsity/metrics.json").read_text())
    assert sparse["s"] == 0.01 and {"before", "after"} <= set(sparse["separation"])

    run_cli("finetune", *run)
    tuned, _ = load_model(tmp_path / "finetune/model")
    assert model_widths(tuned) == model_widths(pruned)
    ft = json.loads((tmp_path / "finetune/metrics.json").read_text())
    # live KD from the unpruned model (the sparsity stage's, by default)
    assert 0 <= ft["selected"]["test_teacher_agreement"] <= 1


def test_a_prune_that_would_remove_nothing_is_refused(tmp_path, teachers):
    """`prune.target: channels` with a floor that keeps every channel: refused (as the macs
    and params targets refuse a cut they cannot make), not "params N -> N" and exit 0."""
    out = tmp_path / "run"
    args = ["--config", str(ROOT / "tests/configs/base.yaml"), *DATA, f"run.out_dir={out}"]
    args += [f"prune.init={teachers[0]}", "prune.target=channels", "prune.min_channels_ratio=1.0"]
    proc = run_cli("prune", *args, "prune.latency_repeats=1", check=False)
    assert_one_line_error(
        proc, 2, "removes no channel", "`prune.min_channels_ratio` 1.0", "lower the floor"
    )
    assert not out.exists()


@pytest.mark.parametrize("path", sorted((ROOT / "configs/cifar10").glob("slim_*.yaml")))
def test_slimming_configs_load(path):
    cfg = load_config(Config, path)
    assert 0 < cfg.prune.ratio < 1 and (cfg.sparsity.s or cfg.sparsity.shrink) > 0
    assert cfg.sparsity.loop.optim.weight_decay == pytest.approx(1e-4)  # a float, not "1e-4"


@pytest.mark.parametrize("target", ["macs", "params"])
@pytest.mark.parametrize("family", ["resnet", "vgg", "mobilenetv3"])
def test_prune_target_is_met_within_one_channel_group(family, target):
    """The threshold for `ratio` of the MACs/params is the smallest that meets it: at the next
    smaller |gamma| (one coupled group of channels fewer) the target is missed."""
    model = randomise_bn(FAMILIES[family]())
    x = torch.randn(2, 3, 16, 16)
    measure = measure_fn(target, (3, 16, 16))
    base = measure(model)
    t = threshold_for(model, target, 0.5, 0.1, x)
    assert removed_share(model, t, 0.1, x, measure, base) >= 0.5
    below = torch.unique(all_gammas(model))
    below = below[below < t]
    assert len(below) and removed_share(model, float(below[-1]), 0.1, x, measure, base) < 0.5
    with pytest.raises(ConfigError, match="prune.ratio"):  # beyond what the floors allow
        threshold_for(model, target, 0.99, 0.5, x)
    t8 = threshold_for(model, target, 0.5, 0.1, x, round_to=8)  # the search counts rounding
    assert removed_share(model, t8, 0.1, x, measure, base, round_to=8) >= 0.5


def test_residual_channel_ratio_removes_less_than_it_says():
    """Why `prune.target`: on a ResNet a coupled channel stays while any of its BNs keeps it,
    so NS's rule at 0.7 removes far fewer channels than 70%; `target: macs` removes what it
    says."""
    model = randomise_bn(build_model("cifar_resnet20", 10))
    x = torch.randn(2, 3, 16, 16)
    t = threshold_for(model, "channels", 0.7, 0.1, x)
    _, final, _ = slim(model, layer_keep_masks(model, t, 0.1), x)
    removed = 1 - sum(int(k.sum()) for k in final.values()) / sum(len(k) for k in final.values())
    assert removed < 0.5
    macs = measure_fn("macs", (3, 16, 16))
    t = threshold_for(model, "macs", 0.7, 0.1, x)
    assert removed_share(model, t, 0.1, x, macs, macs(model)) >= 0.7


def test_separation_finds_the_valley_of_a_bimodal_histogram():
    g = torch.cat([torch.full((60,), 1e-4), torch.linspace(0.4, 0.7, 40)])
    sep = separation(g, threshold=2e-4)
    assert sep["below_1pct"] == pytest.approx(0.6)
    assert 1e-4 < sep["valley"] < 0.4 and sep["bimodality"] > 0.9
    assert sep["threshold_over_valley"] < 1 and sep["between_threshold_and_valley"] == 0
    lump = separation(torch.linspace(0.4, 0.7, 100))
    assert lump["below_1pct"] == 0 and lump["bimodality"] < sep["bimodality"]


def test_scratch_b_epochs_match_the_macs_budget(tmp_path):
    from launch.stages.finetune import scratch_b_epochs

    metrics = tmp_path / "metrics.json"
    with pytest.raises(ConfigError, match=r"finetune\.scratch_b"):
        scratch_b_epochs(10, metrics)
    metrics.write_text(json.dumps({"before": {"macs": 400}, "after": {"macs": 200}}))
    assert scratch_b_epochs(160, metrics) == 320  # Liu et al. 2019: same FLOPs budget


def test_live_kd_task_uses_a_frozen_teacher():
    from common.config import KDConfig
    from distill.task import KDTask, OnlineTeacher
    from distill.teachers import Ensemble

    torch.manual_seed(0)
    teacher, student = build_model("cifar_resnet20", 10), build_model("cifar_resnet20", 10)
    kd = KDConfig(temperature=4.0, alpha=0.9)
    task = KDTask(OnlineTeacher(Ensemble([teacher.train()], [{}], "logits")), kd)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    b = {"image": torch.randn(4, 3, 8, 8), "label": torch.arange(4)}
    terms = task.losses(student, b)
    terms["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert {"loss", "ce", "kl"} <= set(terms) and terms["loss"].requires_grad
