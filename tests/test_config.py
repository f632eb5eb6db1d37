"""Config loading: strict keys and types, dotted overrides, clear messages."""

from __future__ import annotations

import pytest

from common.config import ConfigError, load_config, to_dict
from launch.config import Config
from tests.conftest import ROOT, run_cli


def write(tmp_path, text: str):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_quickstart_config_loads_and_round_trips(tmp_path):
    cfg = load_config(Config, ROOT / "configs/quickstart.yaml")
    assert cfg.data.name == "digits" and cfg.train.loop.batch_size == 64
    again = load_config(Config, write(tmp_path, __import__("yaml").safe_dump(to_dict(cfg))))
    assert again == cfg


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
