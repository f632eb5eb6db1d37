"""Config loading: strict keys and types, dotted overrides, clear messages."""

from __future__ import annotations

import dataclasses
import json
import types
import typing

import pytest

from common.config import ConfigError, Range, load_config, to_dict
from launch.config import Config
from tests.cli import assert_one_line_error
from tests.conftest import ROOT, cli_env, run_cli


def write(tmp_path, text: str):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


BASE = ROOT / "tests/configs/base.yaml"
SHIPPED = [ROOT / "configs/quickstart.yaml", *sorted((ROOT / "configs/cifar10").glob("*.yaml"))]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_load_and_round_trip(path, tmp_path):
    cfg = load_config(Config, path)
    again = load_config(Config, write(tmp_path, __import__("yaml").safe_dump(to_dict(cfg))))
    assert again == cfg


def test_quickstart_is_an_ensemble_with_seeds():
    """What the quickstart exists to show needs >= 3 members and >= 3 seeds (issue 13)."""
    cfg = load_config(Config, ROOT / "configs/quickstart.yaml")
    assert cfg.data.name == "digits" and len(cfg.train.members) >= 3
    assert len(cfg.distill.seeds) >= 3 and cfg.prune.target == "macs"


def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    p = write(tmp_path, "train:\n  loop:\n    optim:\n      lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(Config, p)
    msg = str(e.value)
    assert str(p) in msg and "train.loop.optim.lrr" in msg and "train.loop.optim.lr" in msg


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match="unknown key `trian`.*did you mean `train`"):
        load_config(Config, write(tmp_path, "trian: {}\n"))


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("train:\n  loop:\n    epochs: ten\n", "train.loop.epochs"),
        ("train:\n  loop:\n    epochs: 2.5\n", "train.loop.epochs"),
        ("train:\n  loop:\n    resume: 1\n", "train.loop.resume"),
        ("data:\n  augment: autoaugment\n", "data.augment"),
        ("data:\n  mean: [0.5, 0.5]\n", "data.mean"),
        ("run: 3\n", "run"),
    ],
)
def test_wrong_types_are_rejected(tmp_path, text, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(Config, write(tmp_path, text))


def test_overrides_parse_yaml_values_and_win(tmp_path):
    p = write(tmp_path, "train:\n  loop:\n    epochs: 3\n")
    cfg = load_config(
        Config,
        p,
        [
            "train.loop.epochs=7",
            "train.loop.optim.lr=0.05",
            "data.mean=[0.1,0.2,0.3]",
            "data.root=null",
            "train.model.name=cifar_vgg11",
        ],
    )
    assert cfg.train.loop.epochs == 7 and cfg.train.loop.optim.lr == 0.05
    assert cfg.data.mean == (0.1, 0.2, 0.3) and cfg.data.root is None
    assert cfg.train.model.name == "cifar_vgg11"
    with pytest.raises(ConfigError, match="command-line overrides"):
        load_config(Config, p, ["train.loop.epoch=7"])
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(Config, p, ["train.loop.epochs"])


def test_int_and_dotless_exponent_are_accepted_for_float(tmp_path):
    cfg = load_config(Config, write(tmp_path, "train:\n  loop:\n    optim:\n      lr: 1\n"))
    assert isinstance(cfg.train.loop.optim.lr, float)
    # YAML 1.1 reads 1e-4 as a string; a float field takes it as the number meant.
    cfg = load_config(Config, write(tmp_path, "sparsity:\n  s: 1e-4\n"), ["run.seed=1"])
    assert cfg.sparsity.s == 1e-4
    with pytest.raises(ConfigError, match="sparsity.s"):
        load_config(Config, write(tmp_path, "sparsity:\n  s: 1e-4x\n"))


def test_cli_reports_config_errors_and_exits_nonzero(tmp_path):
    p = write(tmp_path, "train:\n  loop:\n    epochz: 1\n")
    proc = run_cli("train", "--config", str(p), check=False)
    assert proc.returncode == 2
    assert "unknown key `train.loop.epochz`" in proc.stderr
    assert "Traceback" not in proc.stderr
    missing = run_cli("train", "--config", str(tmp_path / "nope.yaml"), check=False)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_yaml_syntax_errors_name_file_line_and_column(tmp_path):
    p = write(tmp_path, "run:\n  seed: [1\ndata: {name: digits}\n")
    proc = run_cli("plan", "--config", str(p), check=False)
    assert_one_line_error(proc, 2, f"{p}: line 3, column 5: not valid YAML", "line 2, column 9")
    proc = run_cli("plan", "--config", str(BASE), "train.loop.epochs=[1", check=False)
    assert_one_line_error(proc, 2, "override `train.loop.epochs=[1`", "not valid YAML")


def test_names_and_offline_weights_are_refused_at_load(tmp_path):
    """Before `plan` prints a job (or `submit` queues one, or a stage writes anything): an
    unknown dataset or model, and, offline, every pretrained file the run would load that is
    not in its cache, all of them in one message."""
    out = tmp_path / "run"
    for override, says in [
        ("data.name=bogus", "data.name `bogus` is not a dataset"),
        ("train.model.name=bogus_net", "train member bogus_net-s0: Unknown model 'bogus_net'"),
        ("distill.student.name=tv_resnet181", "did you mean 'resnet18'"),
        ("distill.student.weights=/nowhere.safetensors", "/nowhere.safetensors does not exist"),
    ]:
        proc = run_cli("plan", "--config", str(BASE), f"run.out_dir={out}", override, check=False)
        assert_one_line_error(proc, 2, says)
    empty = cli_env(KDSLIM_OFFLINE="1", TORCH_HOME=str(tmp_path / "torch"))
    recipe = [str(ROOT / "configs/imagefolder/pretrained.yaml"), f"data.root={tmp_path}"]
    for command in ("plan", "pipeline"):
        proc = run_cli(command, "--config", *recipe, f"run.out_dir={out}", env=empty, check=False)
        assert_one_line_error(
            proc,
            2,
            "2 weight file(s) this run needs are not there",
            f"at {tmp_path / 'torch/hub/checkpoints/resnext50_32x4d-1a0047aa.pth'}",
            f"at {tmp_path / 'torch/hub/checkpoints/mobilenet_v3_large-5c1a4163.pth'}",
        )
    assert not out.exists()
    # online, the same files would be downloaded when a stage needs them: nothing refused
    assert run_cli("plan", "--config", *recipe, env=cli_env(TORCH_HOME=str(tmp_path))).stdout


def test_cli_help_lists_stages():
    out = run_cli("--help").stdout
    assert "train" in out and "models" in out


def test_yaml_boolean_words_reach_string_choices(tmp_path):
    # YAML 1.1 reads `no` as False; `run.mixed_precision: no` is the documented spelling
    cfg = load_config(Config, write(tmp_path, "run:\n  mixed_precision: no\n"))
    assert cfg.run.mixed_precision == "no"
    cfg = load_config(Config, None, ["run.mixed_precision=bf16", "run.mixed_precision=no"])
    assert cfg.run.mixed_precision == "no"
    with pytest.raises(ConfigError, match="run.mixed_precision"):
        load_config(Config, write(tmp_path, "run:\n  mixed_precision: yes\n"))


# --------------------------------------------------------------------------------------------
# every numeric value is checked once, at load, against its field's range
# --------------------------------------------------------------------------------------------


def _numeric_fields(cls, prefix: str = ""):
    """(dotted key, annotation) of every int/float field of the schema, recursively (lists of
    sections are entered as their first element)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        base = typing.get_args(tp)[0] if typing.get_origin(tp) is typing.Annotated else tp
        union = typing.get_origin(base) in (typing.Union, types.UnionType)
        parts = [a for a in typing.get_args(base) if a is not type(None)] if union else [base]
        for part in parts:
            inner = typing.get_args(part)[0] if typing.get_origin(part) is list else part
            if dataclasses.is_dataclass(inner):
                sub = (
                    f"{prefix}{f.name}[0]."
                    if typing.get_origin(part) is list
                    else f"{prefix}{f.name}."
                )
                yield from _numeric_fields(inner, sub)
        names = {getattr(a, "__name__", "") for a in _leaves(base)}
        if names & {"int", "float"}:
            yield f"{prefix}{f.name}", tp


def _leaves(tp):
    args = typing.get_args(tp)
    if not args:
        return [tp]
    return [leaf for a in args if a is not Ellipsis for leaf in _leaves(a)]


NUMERIC = sorted(_numeric_fields(Config))


def test_every_numeric_field_has_a_range():
    missing = [k for k, tp in NUMERIC if typing.get_origin(tp) is not typing.Annotated]
    assert not missing, f"give these config fields an Annotated[..., Range(...)]: {missing}"
    assert len(NUMERIC) > 50


def _outside(rng: Range, is_int: bool):
    """A value just outside `rng`."""
    if rng.ge is not None:
        return rng.ge - 1
    if rng.gt is not None:
        return rng.gt if is_int else rng.gt - 1e-3
    if rng.le is not None:
        return rng.le + 1
    return rng.lt


def _shape(tp) -> int | None:
    """None for a scalar field; else how many values its tuple or list needs (1: any)."""
    base = typing.get_args(tp)[0]  # inside Annotated
    inner = next((a for a in typing.get_args(base) if a is not type(None)), base)
    if typing.get_origin(base) not in (typing.Union, types.UnionType):
        inner = base
    origin = typing.get_origin(inner)
    if origin is list:
        return 1
    if origin is tuple:
        args = typing.get_args(inner)
        return 1 if Ellipsis in args else len(args)
    return None


def _override(key: str, value, tp) -> list[str]:
    """Overrides that set `key` to `value` (repeated into a tuple/list when the field is
    one); a key inside a list of sections (`train.members[0].seed`) becomes a one-element
    list of sections."""
    n = _shape(tp)
    if n is not None:
        value = [value] * n
    if "[0]." in key:
        section, leaf = key.split("[0].")
        return [f"{section}=[{{{leaf}: {json.dumps(value)}}}]"]
    return [f"{key}={json.dumps(value)}"]


@pytest.mark.parametrize(("key", "tp"), NUMERIC, ids=[k for k, _ in NUMERIC])
def test_numeric_value_outside_its_range_is_refused(key, tp):
    rng = next(m for m in typing.get_args(tp)[1:] if isinstance(m, Range))
    is_int = "int" in {getattr(a, "__name__", "") for a in _leaves(typing.get_args(tp)[0])}
    bad = _outside(rng, is_int)
    with pytest.raises(ConfigError) as e:
        load_config(Config, None, _override(key, bad, tp))
    message = str(e.value)
    assert f"`{key.replace('[0]', '')}" in message or key.split(".")[-1] in message, message
    assert str(rng) in message, message  # names the allowed range
