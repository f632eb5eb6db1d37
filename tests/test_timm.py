"""timm's pretrained weights through the Hugging Face hub cache, never downloaded in tests.

huggingface_hub reads HF_HOME / HF_HUB_CACHE / HF_HUB_OFFLINE when it is imported, so the
loading test runs `build_model` in a fresh interpreter with those set, as a user's job would.
"""

from __future__ import annotations

import json
import subprocess
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.config import ConfigError
from common.models import build_model
from tests.conftest import PY, ROOT, cli_env

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_repo(cache, repo_id: str, files: dict[str, dict[str, torch.Tensor]]) -> None:
    """A repo in the hub cache's layout: refs/main holds the commit, snapshots/<commit>/ the
    files (huggingface_hub links them into blobs/; a plain file is read the same way)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name, state in files.items():
        save_file(state, str(snapshot / name))


def recognisable(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Values no initialisation makes: tensor i holds i + a ramp over [0, 1)."""
    out = {}
    for i, (k, v) in enumerate(sorted(state.items())):
        if v.is_floating_point():
            ramp = torch.arange(v.numel(), dtype=v.dtype) / max(v.numel(), 1)
            v = (i + ramp).reshape(v.shape)
        out[k] = v.contiguous()
    return out


SCRIPT = textwrap.dedent(
    """
    import json, sys, warnings
    from safetensors.torch import save_file
    from common.config import ConfigError
    from common.models import build_model

    out, result = sys.argv[1], {}
    try:
        build_model("timm_mobilenetv3_small_050", 10, pretrained="DEFAULT")
    except ConfigError as e:
        result["missing"] = str(e)
    for key, classes, tag in (("head7", 7, "c3_in1k"), ("head1000", 1000, "DEFAULT")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = build_model("timm_resnet10t", classes, pretrained=tag)
        result[key] = [str(w.message) for w in caught]
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{out}/{key}.st")
    print(json.dumps(result))
    """
)


def test_pretrained_timm_weights_come_from_the_hub_cache(tmp_path):
    """A file made here, in the hub cache under $HF_HOME, is what gets loaded (offline: the
    cache is the only source); the head is re-initialised for 7 classes and named in a
    warning, kept for 1000; a model whose file is absent is an error naming the repo, the
    file and where it must go."""
    import timm

    torch.manual_seed(123)
    reference = recognisable(timm.create_model("resnet10t", num_classes=1000).state_dict())
    hub = tmp_path / "hf" / "hub"
    hub_repo(hub, "timm/resnet10t.c3_in1k", {"model.safetensors": reference})
    env = cli_env(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", TORCH_HOME=str(tmp_path))
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "KDSLIM_OFFLINE"):
        env.pop(key, None)
    proc = subprocess.run(
        [PY, "-c", SCRIPT, str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])

    missing = result["missing"]
    where = hub / "models--timm--mobilenetv3_small_050.lamb_in1k" / "snapshots"
    assert "timm/mobilenetv3_small_050.lamb_in1k" in missing
    assert f"{where}/<commit>/model.safetensors" in missing, missing
    assert "refs/main" in missing and "HF_HUB_OFFLINE" in missing
    assert f"here {hub})" in missing  # the cache directory itself, from $HF_HOME

    (warning,) = result["head7"]
    assert "resnet10t.c3_in1k" in warning and "fc.weight, fc.bias" in warning
    got = load_file(str(tmp_path / "head7.st"))
    assert got["fc.weight"].shape == (7, 512)
    for k, v in reference.items():
        if not k.startswith("fc."):
            assert torch.equal(got[k], v), k

    assert result["head1000"] == []  # DEFAULT is c3_in1k; nothing re-initialised
    got = load_file(str(tmp_path / "head1000.st"))
    assert got.keys() == reference.keys()
    assert all(torch.equal(got[k], v) for k, v in reference.items())


def test_offline_without_the_file_names_it(tmp_path, monkeypatch):
    """KDSLIM_OFFLINE alone is enough to stop any download; the error names the hub cache
    huggingface_hub uses (patched here as HF_HUB_CACHE would set it at import)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("KDSLIM_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ConfigError, match="KDSLIM_OFFLINE") as info:
        build_model("timm_resnet18", 10, pretrained="a2_in1k")
    msg = str(info.value)
    repo = tmp_path / "cache" / "models--timm--resnet18.a2_in1k"
    assert "timm/resnet18.a2_in1k" in msg and f"{repo}/snapshots/<commit>/model.safetensors" in msg


def test_pretrained_tags_are_timms(tmp_path, monkeypatch):
    monkeypatch.setenv("KDSLIM_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"DEFAULT \(= a1_in1k\), a1_in1k, a2_in1k"):
        build_model("timm_resnet18", 10, pretrained="IMAGENET1K_V1")
    with pytest.raises(ConfigError, match="not a tv_ or timm_ model"):
        build_model("cifar_resnet20", 10, pretrained="DEFAULT")


def test_a_file_that_does_not_fit_is_named(tmp_path, monkeypatch):
    """At 1000 classes timm loads strictly: a cached file lacking a tensor is a ConfigError
    naming it, not a silently half-initialised network."""
    import timm
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("KDSLIM_OFFLINE", "1")
    state = timm.create_model("resnet10t").state_dict()
    del state["layer1.0.conv1.weight"]
    hub_repo(tmp_path, "timm/resnet10t.c3_in1k", {"model.safetensors": state})
    with pytest.raises(
        ConfigError, match=r"model\.safetensors: not the weights of timm's resnet10t"
    ):
        build_model("timm_resnet10t", 1000, pretrained="DEFAULT")
