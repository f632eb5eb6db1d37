"""The intervals behind every verdict, against scipy.stats and a worked example."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from common.config import load_config
from common.stats import (
    accuracy_interval,
    direction,
    paired_bootstrap_interval,
    paired_t_interval,
)


def test_t_interval_is_scipys_and_the_worked_example():
    """KD - CE per seed on an AVX2 EPYC (issue 25): mean +1.89, 95% CI [-0.99, +4.78]."""
    diffs = [1.11, 4.46, 3.06, -1.67, 2.51]
    got = paired_t_interval(diffs)
    assert got["n"] == 5 and round(got["gain"], 2) == 1.89
    assert [round(x, 2) for x in got["ci95"]] == [-0.99, 4.78]
    ce = np.array([95.0, 94.1, 96.2, 97.0, 93.3])
    res = stats.ttest_rel(ce + np.array(diffs), ce)  # scipy's own paired test
    ci = res.confidence_interval(0.95)
    np.testing.assert_allclose(got["ci95"], [ci.low, ci.high], rtol=1e-12)
    with pytest.raises(ValueError, match="at least 2 pairs"):
        paired_t_interval([1.0])


def test_bootstrap_interval_agrees_with_scipys_paired_bootstrap():
    rng = np.random.default_rng(3)
    a = rng.random(1000) < 0.90
    b = a.copy()
    flip = rng.permutation(1000)
    b[flip[:60]] = True  # B right where A may be wrong ...
    b[flip[60:80]] = False  # ... and wrong on 20 others
    got = paired_bootstrap_interval(a, b)
    assert got["gain"] == pytest.approx(b.mean() - a.mean(), abs=1e-15) and got["n"] == 1000
    ref = stats.bootstrap(
        (b.astype(float) - a.astype(float),),
        np.mean,
        n_resamples=10_000,
        method="percentile",
        random_state=np.random.default_rng(0),
    ).confidence_interval
    # two RNG streams of 10,000 resamples: their ends agree to a fraction of a point
    np.testing.assert_allclose(got["ci95"], [ref.low, ref.high], atol=3e-3)
    assert got["ci95"][0] < got["gain"] < got["ci95"][1]
    # fixed RNG: the same interval every time
    assert paired_bootstrap_interval(a, b) == got


def test_bootstrap_edge_cases_and_seed_pairs():
    right, wrong = np.ones(50, bool), np.zeros(50, bool)
    assert paired_bootstrap_interval(wrong, right) == {"gain": 1.0, "ci95": [1.0, 1.0], "n": 50}
    assert paired_bootstrap_interval(right, right)["ci95"] == [0.0, 0.0]
    # two seed pairs: the per-image difference is their mean
    two = paired_bootstrap_interval(np.stack([wrong, right]), np.stack([right, right]))
    assert two["gain"] == 0.5 and two["ci95"] == [0.5, 0.5]
    with pytest.raises(ValueError, match="differ in shape"):
        paired_bootstrap_interval(right, right[:10])


@pytest.mark.parametrize(
    ("ci", "said"), [([0.1, 0.3], "better"), ([-0.3, -0.1], "worse"), ([-0.1, 0.2], "within noise")]
)
def test_direction(ci, said):
    assert direction(ci) == said


def test_accuracy_interval_is_the_wilson_interval():
    for k, n in [(359, 359), (20, 100), (0, 50), (941, 1000)]:
        ref = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        np.testing.assert_allclose(accuracy_interval(k / n, n), [ref.low, ref.high], rtol=1e-10)


def test_a_run_that_learnt_nothing_is_reported_at_chance_first():
    """A 5-class folder whose students learnt nothing (20% = chance) read as "+6.4 points
    after fine-tune": the verdict now says first that the models sit at chance."""
    from launch.graph import Node
    from launch.report_data import warnings_first

    seeds = [{"seed": 0, "acc": 0.20}, {"seed": 1, "acc": 0.22}]
    r = {
        "data": {"num_classes": 5},
        "splits": {"test": 100},
        "teachers": [{"name": "t0", "acc": 0.90}],
        "ensemble": {"acc": None},
        "student_ce": {"seeds": seeds},
        "student_kd": {"seeds": [{"seed": 0, "acc": 0.31}]},
        "slim": {
            "chains": [{"instance": "", "acc": 0.264}],
            # the run of the issue: shrinkage 0.0002 against |gamma| near 1, "bimodality 0.94"
            "sparsity": {"shrink": 0.0002, "median_gamma_before": 0.98},
        },
    }
    metrics = {Node("train", "t0"): {"eval_collapsed_epochs": [3]}}
    [chance, unseparated, collapsed] = warnings_first(metrics, r)
    assert unseparated.startswith("SPARSITY DID NOT SEPARATE THE SCALES")
    assert "0.0002 is 0.02% of the median |gamma| before it (0.98)" in unseparated
    assert "`sparsity.shrink`" in unseparated
    r["slim"]["sparsity"]["shrink"] = 0.6  # Liu et al.'s budget: no warning
    assert len(warnings_first(metrics, r)) == 2
    assert chance.startswith("AT CHANCE (20.0% with 5 classes")
    assert "CE student seed 0 (20.0%)" in chance and "CE student seed 1 (22.0%)" in chance
    assert "pruned + fine-tuned student (26.4%)" in chance  # 26.4% of 100: within reach
    assert "KD student" not in chance and "teacher t0" not in chance  # 31% and 90%: not
    assert collapsed.startswith("EVALUATION COLLAPSED") and "train:t0 (epoch 3)" in collapsed


def test_the_report_states_which_weights_each_stage_reported():
    """One rule for every stage is said once; stages that differ are each named with theirs.
    Nodes without a training loop (prune, export) state none."""
    from launch.graph import Node
    from launch.report_data import selection_rule

    last_average = {"selection_split": "none", "ema_decay": 0.99}
    m = {
        Node("train", "t0"): last_average,
        Node("distill", "seed0"): last_average,
        Node("prune"): {"macs_ratio": 0.5},
        Node("export"): None,
    }
    same = "the last epoch, an exponential moving average of the weights (decay 0.99)"
    assert selection_rule(m) == same
    m[Node("finetune")] = {"selection_split": "val", "ema_decay": None}
    assert selection_rule(m) == (
        f"{same} (train:t0, distill:seed0); the epoch with the best validation accuracy, the "
        "trained weights (finetune)"
    )
    assert selection_rule({Node("prune"): {}}) is None


def test_slimming_every_seed_is_judged_over_seed_pairs(tmp_path):
    """With a chain per KD seed (`pipeline.slim_every_seed`), pruned + fine-tuned against its
    own unpruned student is a t-interval over the chains, as KD against CE is over seeds."""
    from launch.config import Config
    from launch.report_data import T_METHOD, verdict, verdicts
    from tests.conftest import ROOT

    cfg = load_config(
        Config,
        ROOT / "configs/quickstart.yaml",
        [f"run.out_dir={tmp_path}", "pipeline.slim_every_seed=true", "distill.seeds=[0,1,2,3]"],
    )
    unpruned, pruned = [0.975, 0.969, 0.981, 0.972], [0.978, 0.972, 0.981, 0.975]
    chains = [
        {
            "instance": f"seed{s}",
            "model": f"distill:seed{s}",
            "from_run": True,
            "unpruned_acc": u,
            "acc": p,
            "macs_ratio": 0.49 + s / 100,
            "params_ratio": 0.4,
        }
        for s, u, p in zip(range(4), unpruned, pruned)
    ]
    empty = {"seeds": [], "mean": None, "std": None, "n": 0}
    r = {
        "splits": {"test": 359},
        "ensemble": {"members": 1, "best_member": None, "acc": None},
        "student_ce": empty,
        "student_kd": empty,
        "student_losses": {},
        "kd_gain": None,
        "cache": {"verify_rows_checked": None},
        "slim": {
            "chains": chains,
            "model": "distill:seed0",
            "params_ratio": 0.4,
            "macs_ratio": 0.49,
            "latency_ratio": None,
            "pruned": {"acc_before_finetune": None},
        },
    }
    [v] = verdicts(cfg, r)
    ref = stats.ttest_rel(pruned, unpruned).confidence_interval(0.95)
    assert v["comparison"] == "pruned + fine-tuned vs unpruned" and v["method"] == T_METHOD
    assert v["n_seeds"] == 4 and v["gain"] == pytest.approx(0.00225)
    np.testing.assert_allclose(v["ci95"], [ref.low, ref.high], rtol=1e-12)
    r["verdicts"] = [v]
    [line] = [x for x in verdict(r) if x.startswith("slimming:")]
    assert "MACs -51% (-48% to -51% over 4 chains)" in line
    assert "against the unpruned KD students, each slimmed (4 seeds, mean 97.4%)" in line
    assert "over 4 seed pair(s)" in line
    # non-inferiority: the lower end against -0.5 points, said in words
    assert v["kept_margin"] == 0.005 and v["accuracy_kept"] == (ref.low > -0.005)
    assert v["accuracy_kept"] and line.endswith("its lower end is above -0.5 points: accuracy kept")
    for c, lost in zip(chains, [0.0, 0.01, 0.002, 0.004]):  # -0.9 to +0.3 points
        c["acc"] = c["unpruned_acc"] + 0.003 - lost
    [v] = r["verdicts"] = verdicts(cfg, r)
    assert v["ci95"][0] < -0.005 and not v["accuracy_kept"]
    [line] = [x for x in verdict(r) if x.startswith("slimming:")]
    assert line.endswith("its lower end reaches -0.5 points: not shown to keep the accuracy")
