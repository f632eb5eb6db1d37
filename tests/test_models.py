"""Tests for common.models: registry, every registered network, widths-as-data, weight loading."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from common.checkpoint import load_model, model_spec, save_model
from common.config import ConfigError
from common.models import (
    apply_widths,
    build_model,
    list_models,
    model_widths,
    register_model,
)
from common.models import registry as registry_mod
from common.models.fold import fold_batchnorm

REQUIRED = {
    "cifar_resnet18",
    "cifar_resnet20",
    "cifar_resnet56",
    "cifar_resnet110",
    "cifar_resnet164",
    "cifar_preresnet110",
    "cifar_wrn28_10",
    "cifar_densenet100",
    "cifar_densenet40",
    "cifar_resnext29_8x64d",
    "cifar_vgg11",
    "cifar_vgg16",
    "cifar_vgg19",
    "cifar_mobilenetv3_small",
    "cifar_mobilenetv3_large",
}

# Millions of parameters at 10 classes: (low, high), from the papers / reference code.
PARAMS_M = {
    "cifar_resnet18": (11.17, 11.17),  # kuangliu/pytorch-cifar, exact (rounded to 0.01M)
    "cifar_vgg19": (20.04, 20.04),  # network slimming, exact (rounded to 0.01M)
    "cifar_vgg16": (14.6, 14.8),
    "cifar_vgg11": (9.1, 9.3),
    "cifar_resnet20": (0.26, 0.28),  # He et al.: 0.27M
    "cifar_resnet56": (0.84, 0.87),  # 0.85M
    "cifar_resnet110": (1.70, 1.76),  # 1.7M
    "cifar_resnet164": (1.65, 1.75),  # 1.7M
    "cifar_preresnet110": (1.70, 1.76),  # 1.7M
    "cifar_preresnet164": (1.65, 1.75),  # 1.7M
    "cifar_wrn28_10": (36.4, 36.6),  # 36.5M
    "cifar_densenet100": (0.75, 0.80),  # 0.8M
    "cifar_densenet40": (0.98, 1.08),  # 1.0M (network slimming: 1.02M)
    "cifar_resnext29_8x64d": (34.3, 34.5),  # 34.4M
    "cifar_mobilenetv3_small": (1.4, 1.6),  # 2.5M at 1000 classes
    "cifar_mobilenetv3_large": (4.1, 4.3),  # 5.5M at 1000 classes
    "cifar_airnet": (1.97, 1.98),  # airbench94's widths (64, 256, 256), 3x3 stem of 24
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_list_models() -> None:
    names = list_models()
    assert names == sorted(names)
    assert set(names) >= REQUIRED
    assert not any(n.startswith("tv_") for n in names)
    assert set(names) == set(PARAMS_M), "give every registered model a parameter range"


@pytest.mark.parametrize("name", list_models())
def test_param_count(name: str) -> None:
    lo, hi = PARAMS_M[name]
    m = round(n_params(build_model(name, 10)) / 1e6, 2)
    assert lo <= m <= hi, f"{name}: {m}M params, expected [{lo}, {hi}]"


@pytest.mark.parametrize("name", list_models())
def test_forward_backward_and_small_input(name: str) -> None:
    model = build_model(name, 7)
    model.train()
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads)
    assert all(torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 16, 16)).shape == (2, 7)


def test_exact_reference_param_counts() -> None:
    assert round(n_params(build_model("cifar_vgg19", 10)) / 1e6, 2) == 20.04
    assert round(n_params(build_model("cifar_resnet18", 10)) / 1e6, 2) == 11.17


# --- widths -----------------------------------------------------------------------------------


def test_vgg_widths_round_trip() -> None:
    cfg = [32, "M", 48, "M", 96, 80, "M", 200, 128, "M", 100, 64]
    small = build_model("cifar_vgg11", 10, cfg=cfg).eval()
    widths = json.loads(json.dumps(model_widths(small)))  # plain data
    assert widths["feature.0"] == {"in": 3, "out": 32, "groups": 1}
    assert widths["feature.1"] == {"num_features": 32}
    assert widths["classifier"] == {"in": 64, "out": 10}

    rebuilt = build_model("cifar_vgg11", 10, widths=widths).eval()
    assert n_params(rebuilt) == n_params(small) < n_params(build_model("cifar_vgg11", 10))
    assert model_widths(rebuilt) == widths
    rebuilt.load_state_dict(small.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), small(x), rtol=0, atol=0)  # same weights, shapes


def test_resnet_block_widths_edit() -> None:
    default = build_model("cifar_resnet20", 10)
    widths = model_widths(default)
    widths["layer1.0.conv1"]["out"] = 5
    widths["layer1.0.bn1"]["num_features"] = 5
    widths["layer1.0.conv2"]["in"] = 5
    model = build_model("cifar_resnet20", 10, widths=widths)
    assert model.layer1[0].conv1.out_channels == 5
    assert model.layer1[0].conv2.kernel_size == (3, 3)
    assert model.layer1[0].conv2.padding == (1, 1)
    assert model.layer1[0].conv1.bias is None
    assert n_params(default) - n_params(model) == 2 * (11 * 16 * 9) + 2 * 11
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    out.sum().backward()


def test_apply_widths_keeps_unchanged_modules_and_hyperparameters() -> None:
    model = build_model("cifar_resnet20", 10)
    untouched = model.layer2[0].conv1
    bn = model.layer1[0].bn1
    bn.eps, bn.momentum = 1e-3, 0.05
    apply_widths(model, {"layer2.0.conv1": {"in": 16}, "layer1.0.bn1": {"num_features": 4}})
    assert model.layer2[0].conv1 is untouched  # record unchanged -> module kept, weights too
    new_bn = model.layer1[0].bn1
    assert new_bn is not bn and new_bn.num_features == 4
    assert (new_bn.eps, new_bn.momentum) == (1e-3, 0.05)
    assert torch.equal(new_bn.weight, torch.ones(4)) and torch.equal(new_bn.bias, torch.zeros(4))


def test_bad_widths_raise() -> None:
    model = build_model("cifar_resnet20", 10)
    before = model_widths(model)
    with pytest.raises(ValueError, match=r"layer1\.0\.conv9"):
        apply_widths(model, {"layer1.0.conv9": {"in": 16, "out": 16, "groups": 1}})
    with pytest.raises(ValueError, match="does not match the module's type"):
        apply_widths(model, {"layer1.0.bn1": {"in": 16, "out": 8}})
    with pytest.raises(ValueError, match="does not match the module's type"):
        apply_widths(model, {"linear": {"in": 64, "out": 10, "groups": 1}})
    with pytest.raises(ValueError, match="only describe"):
        apply_widths(model, {"layer1": {"num_features": 3}})
    with pytest.raises(ValueError, match="positive int"):
        apply_widths(model, {"layer1.0.bn1": {"num_features": 0}})
    with pytest.raises(ValueError, match="divisible"):
        apply_widths(model, {"layer1.0.conv1": {"in": 16, "out": 16, "groups": 3}})
    # validation happens before any replacement
    with pytest.raises(ValueError, match="no_such"):
        apply_widths(model, {"layer1.0.bn1": {"num_features": 3}, "no_such": {"in": 1}})
    assert model_widths(model) == before
    with pytest.raises(ValueError, match="bogus"):
        build_model("cifar_vgg11", 10, widths={"bogus": {"num_features": 3}})


# timm families through the registry: ResNet-D (deep stem, avg-pool shortcut), EfficientNet
# (BatchNormAct2d, SE with SiLU), EfficientNet-Lite (ReLU6, no SE), MobileNetV3 (hard-swish, SE).
TIMM = [
    "timm_resnet10t",
    "timm_efficientnet_b0",
    "timm_efficientnet_lite0",
    "timm_mobilenetv3_small_100",
]


@pytest.mark.parametrize("name", ["cifar_resnet20", "cifar_mobilenetv3_small", *TIMM])
def test_torch_pruning_round_trip(name: str, tmp_path) -> None:
    """Prune with torch-pruning, store widths + safetensors, rebuild by name: same function."""
    tp = pytest.importorskip("torch_pruning")
    x = torch.randn(2, 3, 32, 32)
    model = build_model(name, 10).eval()
    head = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == 10]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(
            model,
            x,
            importance=tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=0.3,
            ignored_layers=head,
        )
        pruner.step()
    widths_file = tmp_path / "widths.json"
    widths_file.write_text(json.dumps(model_widths(model)))
    save_file(model.state_dict(), tmp_path / "pruned.safetensors")

    rebuilt = build_model(
        name,
        10,
        widths=json.loads(widths_file.read_text()),
        weights=str(tmp_path / "pruned.safetensors"),
    ).eval()
    assert n_params(rebuilt) == n_params(model)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)  # same weights, shapes


# --- registry -----------------------------------------------------------------------------------


def test_torchvision_model() -> None:
    model = build_model("tv_resnet18", 10)
    assert model.fc.out_features == 10
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", TIMM)
def test_timm_model(name: str) -> None:
    """Any timm model by name: built by timm.create_model for the run's classes, trainable,
    kwargs passed through, nothing listed or downloaded."""
    import timm

    model = build_model(name, 7, drop_rate=0.0)
    assert model.pretrained_cfg["architecture"] == name.removeprefix("timm_")
    assert model.get_classifier().out_features == 7
    model.train()
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert name not in list_models()  # like tv_: accepted, not listed
    reference = timm.create_model(name.removeprefix("timm_"), num_classes=7)
    assert model_widths(model) == model_widths(reference)


def test_timm_widths_keep_subclass_layers() -> None:
    """timm's layer subclasses are resized, not rebuilt with torch's arguments: the stem's
    Conv2dSame keeps its TF padding, BatchNormAct2d its activation (ReLU6 here; a rebuild would
    give ReLU), and a failed edit changes nothing."""
    model = build_model("timm_tf_efficientnet_lite0", 10)
    stem, bn = type(model.conv_stem), model.bn1
    with pytest.raises(ValueError, match="divisible"):
        apply_widths(model, {"bn1": {"num_features": 20}, "conv_stem": {"out": 20, "groups": 3}})
    assert model.bn1 is bn
    widths = {"conv_stem": {"out": 20}, "bn1": {"num_features": 20}}
    widths["blocks.0.0.conv_dw"] = {"in": 20, "out": 20, "groups": 20}
    widths["blocks.0.0.bn1"] = {"num_features": 20}
    widths["blocks.0.0.conv_pw"] = {"in": 20}
    apply_widths(model, widths)
    assert type(model.conv_stem) is stem and stem.__name__ == "Conv2dSame"
    assert type(model.bn1) is type(bn) and type(model.bn1.act) is type(bn.act) is nn.ReLU6
    assert model.bn1.num_features == 20 and model.bn1.eps == bn.eps
    assert model.bn1.running_var.shape == (20,) and model_widths(model)["bn1"]["num_features"] == 20
    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_timm_names_and_kwargs_errors() -> None:
    with pytest.raises(ConfigError, match=r"did you mean 'resnet18'.*timm\.list_models"):
        build_model("timm_resnet19", 10)
    with pytest.raises(ConfigError, match=r"timm_resnet18.*model\.pretrained: a1_in1k"):
        build_model("timm_resnet18.a1_in1k", 10)
    with pytest.raises(ConfigError, match=r"timm_resnet10t.*no_such_option"):
        build_model("timm_resnet10t", 10, no_such_option=1)
    with pytest.raises(ValueError, match="reserved for timm"):
        register_model("timm_toy")
    assert "timm_<timm name>" in registry_mod.__doc__


def test_unknown_model_names() -> None:
    with pytest.raises(ValueError, match="cifar_resnet19") as info:
        build_model("cifar_resnet19", 10)
    msg = str(info.value)
    assert "did you mean 'cifar_resnet18'" in msg
    assert "tv_<torchvision name>" in msg
    assert "timm_<timm name>" in msg
    with pytest.raises(ValueError, match="did you mean 'resnet18'"):
        build_model("tv_resnet19", 10)


def test_register_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_mod, "_MODELS", dict(registry_mod._MODELS))

    @register_model("toy_linear")
    def toy(num_classes: int, hidden: int = 4) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(12, hidden), nn.Linear(hidden, num_classes))

    assert "toy_linear" in list_models()
    assert build_model("toy_linear", 3, hidden=5)[1].out_features == 5
    with pytest.raises(ValueError, match="already registered"):
        register_model("toy_linear")(lambda num_classes: nn.Identity())
    with pytest.raises(ValueError, match="reserved"):
        register_model("tv_toy")
    with pytest.raises(ConfigError, match="no_such_option.*kwargs are: \\(none\\)"):
        build_model("cifar_resnet20", 10, no_such_option=1)
    with pytest.raises(ConfigError, match="kwargs are: cfg"):
        build_model("cifar_vgg11", 10, width=3)


# --- weights ------------------------------------------------------------------------------------


def test_weights_safetensors_skips_mismatched_head(tmp_path) -> None:
    src = build_model("cifar_resnet20", 100)
    path = tmp_path / "r20_c100.safetensors"
    save_file(src.state_dict(), path)
    with pytest.warns(UserWarning, match="linear.weight") as record:
        dst = build_model("cifar_resnet20", 10, weights=str(path))
    assert "linear.bias" in str(record[0].message)
    assert dst.linear.weight.shape == (10, 64)
    src_sd, dst_sd = src.state_dict(), dst.state_dict()
    for k, v in dst_sd.items():
        if not k.startswith("linear."):
            assert torch.equal(v, src_sd[k]), k


def test_weights_torch_load_formats(tmp_path) -> None:
    src = build_model("cifar_vgg11", 10)
    sd = src.state_dict()
    x = torch.randn(2, 3, 32, 32)
    for i, obj in enumerate(
        [
            sd,
            {"state_dict": sd, "epoch": 3},
            {"model": sd},
            {f"module.{k}": v for k, v in sd.items()},
        ]
    ):
        path = tmp_path / f"ckpt{i}.pt"
        torch.save(obj, path)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            dst = build_model("cifar_vgg11", 10, weights=path).eval()
        with torch.no_grad():
            torch.testing.assert_close(dst(x), src.eval()(x), rtol=0, atol=0)


def test_weights_bad_keys_and_missing_file(tmp_path) -> None:
    sd = build_model("cifar_resnet20", 10).state_dict()
    missing = dict(sd)
    del missing["layer2.0.conv1.weight"]
    path = tmp_path / "missing.safetensors"
    save_file(missing, path)
    with pytest.raises(ValueError, match=r"missing\.safetensors.*layer2\.0\.conv1\.weight"):
        build_model("cifar_resnet20", 10, weights=path)

    extra = {**sd, "extra.weight": torch.zeros(3)}
    path = tmp_path / "extra.pt"
    torch.save(extra, path)
    with pytest.raises(ValueError, match=r"extra\.pt.*unexpected keys: extra\.weight"):
        build_model("cifar_resnet20", 10, weights=path)

    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors"):
        build_model("cifar_resnet20", 10, weights=tmp_path / "nope.safetensors")


FOLD_ALL = ["cifar_vgg11", "cifar_resnet20", "cifar_mobilenetv3_small"]
"""Families whose every BatchNorm follows a convolution."""


@pytest.mark.parametrize(
    "name", [*FOLD_ALL, "cifar_airnet", "cifar_preresnet110", "cifar_densenet40"]
)
def test_batchnorm_folds_into_the_conv_before_it(name: str, tmp_path) -> None:
    """Folded outputs equal the unfolded eval-mode model's (float64: to rounding), every BN
    that follows a conv is gone (pre-activation BNs stay), and the folded model round-trips
    through save_model / load_model by its spec."""
    model = build_model(name, 10).double()
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():  # non-trivial statistics and affine terms
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen, dtype=torch.float64))
            m.running_var.copy_(torch.rand(c, generator=gen, dtype=torch.float64) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.randn(c, generator=gen, dtype=torch.float64))
                m.bias.copy_(torch.randn(c, generator=gen, dtype=torch.float64))
    model.eval()
    x = torch.randn(3, 3, 32, 32, generator=gen, dtype=torch.float64)
    fused, pairs = fold_batchnorm(model)
    bns = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    left = [n for n, m in fused.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(left) == len(bns) - len(pairs)
    if name in FOLD_ALL:
        assert left == []
    elif name == "cifar_densenet40":  # BN-ReLU-conv throughout: no BN follows a conv
        assert pairs == []
    else:  # a BN after an addition, a concatenation (pre-activation) or a max-pool (airnet:
        # a negative scale does not commute with max) has no conv to go into
        assert 0 < len(left) < len(bns)
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(fused(x), ref, rtol=1e-10, atol=1e-10)
    spec = {**model_spec(name, 10), "folded_bn": pairs}
    loaded, _ = load_model(save_model(tmp_path / "fused", fused, spec))
    with torch.no_grad():
        torch.testing.assert_close(loaded.double().eval()(x), ref, rtol=1e-10, atol=1e-10)


def test_pretrained_torchvision_weights_come_from_the_hub_cache(tmp_path, monkeypatch):
    """`pretrained` goes through torchvision's weights enum and the torch hub cache: a file
    made here under the name torchvision expects is what gets loaded, the head re-initialised
    for 7 classes; offline without the file, the error names where to put it."""
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("KDSLIM_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"resnet18-f37072fd\.pth.*hub/checkpoints"):
        build_model("tv_resnet18", 7, pretrained="IMAGENET1K_V1")
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.manual_seed(123)
    reference = torchvision.models.resnet18(num_classes=1000).state_dict()
    torch.save(reference, cache / "resnet18-f37072fd.pth")
    with pytest.warns(UserWarning, match=r"fc\.bias, fc\.weight"):
        model = build_model("tv_resnet18", 7, pretrained="DEFAULT")  # DEFAULT = IMAGENET1K_V1
    got = model.state_dict()
    assert got["fc.weight"].shape == (7, 512)
    assert all(torch.equal(got[k], v) for k, v in reference.items() if not k.startswith("fc."))
    with pytest.raises(ConfigError, match="IMAGENET1K_V1"):
        build_model("tv_resnet18", 7, pretrained="IMAGENET9K")
    with pytest.raises(ConfigError, match="not a tv_ or timm_ model"):
        build_model("cifar_resnet20", 7, pretrained="DEFAULT")
