"""The stage graph as data: what the command line, the pipeline and the plan are derived from,
and the keys that decide freshness."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from common.config import ConfigError, identity_changes, load_config
from launch import freshness, graph
from launch.cli import COMMANDS
from launch.config import Config
from launch.graph import Node
from tests.conftest import ROOT, cli_env, run_cli


def cfg(*overrides: str):
    return load_config(Config, ROOT / "configs/quickstart.yaml", list(overrides))


def test_help_lists_the_graph_stages_and_only_them():
    out = run_cli("--help").stdout
    for stage in graph.STAGES:
        assert f"  {stage.name} " in out and stage.help[:30] in out
    assert "pipeline" in out and "plan" in out and "models" in out
    bad = run_cli("distil", "--config", "configs/quickstart.yaml", check=False)
    assert bad.returncode == 2 and "unknown stage `distil`" in bad.stderr


def test_console_script_is_the_same_command():
    """`kdslim` (pyproject's [project.scripts]) next to the environment's python."""
    script = Path(sys.executable).parent / "kdslim"
    assert script.is_file(), "install the package (`make install`) to get the console script"

    def kdslim(*args: str) -> subprocess.CompletedProcess:
        cmd = [str(script), *args]
        return subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), cwd=ROOT)

    models = kdslim("models")
    assert models.returncode == 0 and models.stdout == run_cli("models").stdout
    bad = kdslim("distil", "--config", "configs/quickstart.yaml")
    assert bad.returncode == 2 and "unknown stage `distil`" in bad.stderr


def test_stage_names_used_outside_the_graph_are_the_graphs():
    """The stage list is written once (`graph.STAGES`); code elsewhere names nodes by stage:
    each such name must be one of the graph's, so a typo cannot silently find nothing."""
    named = set()
    for path in (ROOT / "launch").rglob("*.py"):
        if path.name != "graph.py":
            text = path.read_text()
            named |= set(re.findall(r'Node\(\s*"([a-z-]+)"', text))
            named |= set(re.findall(r'args\.target [!=]= "([a-z-]+)"', text))
            named |= set(re.findall(r'stage [!=]= "([a-z-]+)"', text))
            named |= set(re.findall(r'(?:_of|_students)\(m, "([a-z-]+)"\)', text))
            named |= set(re.findall(r'ctx\.name\.startswith\("([a-z-]+)"\)', text))
    named -= set(COMMANDS)  # pipeline, plan, models: commands, not stages
    assert named and named <= set(graph.BY_NAME), named - set(graph.BY_NAME)


def test_members_and_seeds_are_instances():
    c = cfg("train.members=[{seed: 3}, {seed: 4, name: big, model: {name: cifar_vgg11}}]")
    assert graph.BY_NAME["train"].instances(c) == ["cifar_airnet-s3", "big"]
    assert [m.model.name for m in graph.members(c)] == ["cifar_airnet", "cifar_vgg11"]
    assert graph.BY_NAME["distill"].instances(cfg("distill.seeds=[2, 5]")) == ["seed2", "seed5"]
    assert graph.BY_NAME["distill"].instances(cfg("run.seed=7", "distill.seeds=null")) == ["seed7"]
    with pytest.raises(ConfigError, match="names must differ"):
        cfg("train.members=[{seed: 1}, {seed: 1}]")
    with pytest.raises(ConfigError, match="no instance `seed9`"):
        graph.check_node(cfg(), "distill:seed9")


def test_slimming_starts_from_what_the_run_has():
    def one(*overrides: str):  # one slimming chain
        return cfg("pipeline.slim_every_seed=false", *overrides)

    assert graph.inputs(one(), Node("sparsity"))["model"] == Node("distill", "seed0")
    teacher_only = one("pipeline.stages=[train, sparsity, prune]")
    assert graph.inputs(teacher_only, Node("sparsity"))["model"] == Node("train", "cifar_airnet-s0")
    given = one("sparsity.init=/models/x")
    assert graph.inputs(given, Node("sparsity"))["model"] == Path("/models/x")
    with pytest.raises(ConfigError, match="sparsity.init"):
        graph.inputs(one("pipeline.stages=[sparsity, prune]"), Node("sparsity"))
    # external teachers: no `train` in the run, the cache reads the files
    ext = cfg("cache.teachers=[{path: /t/a}, {path: /t/b}]")
    assert "train" not in graph.in_run(ext)
    assert graph.inputs(ext, Node("cache"))["teachers"] == [Path("/t/a"), Path("/t/b")]


def test_every_kd_student_can_be_slimmed():
    """`pipeline.slim_every_seed`: one sparsity -> prune -> finetune chain per KD seed, each
    reading its own seed's nodes and trained with that seed; the export takes the first."""
    every = cfg("pipeline.slim_every_seed=true", "distill.seeds=[3, 5]", "finetune.kd_from=live")
    for stage in ("sparsity", "prune", "finetune"):
        assert graph.BY_NAME[stage].instances(every) == ["seed3", "seed5"]
    assert graph.inputs(every, Node("sparsity", "seed5"))["model"] == Node("distill", "seed5")
    assert graph.inputs(every, Node("prune", "seed5"))["model"] == Node("sparsity", "seed5")
    ft = graph.inputs(every, Node("finetune", "seed5"))
    assert ft["model"] == Node("prune", "seed5") and ft["teacher"] == Node("sparsity", "seed5")
    assert graph.inputs(every, Node("export")) == {
        "model": Node("finetune", "seed3"),
        "unpruned": Node("distill", "seed3"),  # the export measures both
    }
    # the fine-tune distilled live from the student its chain slimmed
    own = cfg("pipeline.slim_every_seed=true", "distill.seeds=[3, 5]", "finetune.kd_from=unpruned")
    assert graph.inputs(own, Node("finetune", "seed5"))["teacher"] == Node("distill", "seed5")
    assert graph.directory(every, Node("prune", "seed5")).parts[-2:] == ("prune", "seed5")
    assert graph.seed_of(every, "seed5") == 5 and graph.seed_of(every, "") == 0
    keys = [freshness.values(every, Node("sparsity", i)) for i in ("seed3", "seed5")]
    assert keys[0]["seed"] == 3 and keys[1]["seed"] == 5
    # off (the default): one chain from the first KD student, keyed as before the option
    one = cfg("pipeline.slim_every_seed=false", "distill.seeds=[3, 5]")
    assert graph.BY_NAME["sparsity"].instances(one) == [""]
    assert graph.inputs(one, Node("sparsity"))["model"] == Node("distill", "seed3")
    assert "seed" not in freshness.values(one, Node("sparsity"))
    for bad in ("sparsity.init=/models/x", "pipeline.stages=[train, sparsity, prune]"):
        with pytest.raises(ConfigError, match="slim_every_seed=false"):
            graph.nodes(cfg("pipeline.slim_every_seed=true", bad))


def test_keys_read_what_decides_the_output_and_nothing_else():
    def values(c, node):
        return freshness.values(c, node)

    base = values(cfg(), Node("train", "cifar_airnet-s0"))
    for runtime_only in (
        "run.out_dir=elsewhere",
        "data.num_workers=3",
        "train.loop.log_every=2",
        "train.loop.checkpoint_every_steps=5",
        "train.loop.resume=false",
        "cache.views=9",  # another stage's section
    ):
        assert values(cfg(runtime_only), Node("train", "cifar_airnet-s0")) == base, runtime_only
    assert values(cfg("train.loop.optim.lr=0.3"), Node("train", "cifar_airnet-s0")) != base
    # a member's own seed is its own: the other member's values do not move
    two = "train.members=[{seed: 0}, {seed: 1}]"
    other = "train.members=[{seed: 0}, {seed: 2}]"
    assert values(cfg(two), Node("train", "cifar_airnet-s0")) == values(
        cfg(other), Node("train", "cifar_airnet-s0")
    )
    # the CE students read the views they replay, not the cache's storage
    ce = values(cfg(), Node("distill-ce", "seed0"))
    assert values(cfg("cache.plain_first=true"), Node("distill-ce", "seed0")) != ce
    assert values(cfg("cache.storage=topk"), Node("distill-ce", "seed0")) == ce


def test_a_key_added_later_leaves_finished_nodes_fresh_at_its_neutral_value():
    """Upgrading kdslim must not re-run hours of finished work: a record made before
    `loop.recalibrate_bn` existed has the same key as today's config at its neutral value 0."""
    node = Node("train", "cifar_airnet-s0")
    today = freshness.values(cfg(), node)
    assert "recalibrate_bn" not in today["train.loop"]  # the values a pre-upgrade record has
    asked = freshness.values(cfg("train.loop.recalibrate_bn=8"), node)
    assert asked["train.loop"]["recalibrate_bn"] == 8 and asked != today
    # and the stale node's message says what the old record meant, not `null`
    old, new = (freshness.Identity(freshness.make_key(v, {}), v, {}) for v in (today, asked))
    assert identity_changes(old.as_dict(), new.as_dict()) == ["train.loop.recalibrate_bn: 0 -> 8"]


def test_plan_names_only_run_stages():
    bad = run_cli(
        "plan", "--config", "configs/quickstart.yaml", "--stages", "prune,distil", check=False
    )
    assert bad.returncode == 2 and "not stages of this run" in bad.stderr
