"""The verdict: paired differences over seeds, their intervals, and what lab compare writes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lab.runlog import RunWriter, read_verdict, run_id
from lab.verdict import (
    MIN_SEEDS,
    bootstrap_ci,
    compare_runs,
    final_reward,
    format_verdict,
    reward_auc,
    t95,
    t_interval,
    verdict_from_curves,
)


def curve(values, start=1):
    return [(start + i, v) for i, v in enumerate(values)]


def test_curve_metrics():
    values = [0.0] * 18 + [1.0, 0.5]
    assert final_reward(curve(values)) == pytest.approx(0.75)  # last 10% of 20 steps = 2 steps
    assert final_reward(curve([0.2, 0.4])) == 0.4  # at least one step
    assert reward_auc(curve([0.0, 1.0, 0.5])) == pytest.approx(0.5)
    assert math.isnan(final_reward([])) and math.isnan(reward_auc([(1, float("nan"))]))
    # unsorted, repeated (a resumed run) and malformed points
    messy = [(3, 0.3), (1, 0.1), (2, 0.9), (2, 0.2), ("x", 1.0), (4, None)]
    assert reward_auc(messy) == pytest.approx(0.2) and final_reward(messy) == 0.3


def test_intervals_cover_the_mean_and_the_t_quantiles():
    rng = np.random.default_rng(0)
    x = rng.normal(0.3, 0.1, size=5)
    lo, hi = t_interval(x)
    assert lo < x.mean() < hi
    assert hi - lo == pytest.approx(2 * t95(5) * x.std(ddof=1) / math.sqrt(5))
    blo, bhi = bootstrap_ci(x)
    assert lo < blo < x.mean() < bhi < hi  # the percentile bootstrap is the narrower one at 5 values
    assert t95(5) == 2.776 and t95(1000) == 1.96 and math.isnan(t95(1))
    assert all(math.isnan(v) for v in (*bootstrap_ci([1.0]), *t_interval([1.0])))


def test_t_interval_covers_95_percent():
    rng = np.random.default_rng(1)
    samples = [rng.normal(0, 1, 5) for _ in range(2000)]
    hits = sum(lo < 0 < hi for lo, hi in map(t_interval, samples))
    assert 0.93 < hits / 2000 < 0.97


def test_paired_verdict_finds_a_real_gap_and_calls_a_tie_a_tie():
    rng = np.random.default_rng(2)
    seeds = range(5)
    base = {s: rng.uniform(0.3, 0.6) for s in seeds}  # seed effects, shared by every label (paired design)
    curves = {
        "grpo": {s: curve([base[s]] * 10) for s in seeds},
        "dapo": {s: curve([base[s] + rng.normal(0, 0.01)] * 10) for s in seeds},  # a tie
        "delta_l": {s: curve([base[s] + 0.1 + rng.normal(0, 0.01)] * 10) for s in seeds},  # a real gap
    }
    verdict = verdict_from_curves(curves)
    assert verdict["seeds"] == 5 and len(verdict["pairs"]) == 3 * 2
    pairs = {(p["a"], p["b"], p["metric"]): p for p in verdict["pairs"]}
    gap = pairs[("grpo", "delta_l", "final_reward")]
    assert gap["distinguishable"] and gap["mean_diff"] == pytest.approx(-0.1, abs=0.02)
    assert gap["ci"][1] < 0 and gap["ci_t"][1] < 0 and gap["n_seeds"] == 5
    assert not pairs[("grpo", "dapo", "auc")]["distinguishable"]
    assert "6 intervals" in verdict["note"]
    json.dumps(verdict)  # the verdict is JSON as it is


def test_too_few_common_seeds_are_never_distinguishable():
    curves = {
        "grpo": {0: curve([0.1]), 1: curve([0.1]), 7: curve([0.9])},
        "dr_grpo": {0: curve([0.5]), 1: curve([0.5])},
    }
    verdict = verdict_from_curves(curves)
    pair = verdict["pairs"][0]
    assert pair["n_seeds"] == 2 < MIN_SEEDS and not pair["distinguishable"]  # identical diffs, zero-width CI
    assert verdict["seeds"] == 2
    with pytest.raises(ValueError, match="median"):
        verdict_from_curves(curves, metrics=["median"])


def write_run(root, label, seed, rewards, state="finished"):
    aggregator = label.split("-a")[0]
    run_dir = root / run_id(aggregator, seed)
    writer = RunWriter(run_dir)
    writer.write_config({"label": label, "seed": seed, "aggregator": aggregator})
    for step, reward in enumerate(rewards, start=1):
        writer.log_metrics({"step": step, "reward": reward})
    writer.set_status(state, len(rewards), len(rewards))
    return run_dir


def test_compare_runs_reads_run_dirs_and_warns_about_unfinished_ones(tmp_path):
    dirs = [
        write_run(tmp_path, agg, s, [0.2 + 0.1 * s, 0.5]) for agg in ("delta_l", "grpo") for s in range(3)
    ]
    dirs.append(write_run(tmp_path, "dapo", 0, [0.1], state="interrupted"))
    (tmp_path / "empty").mkdir()
    dirs.append(tmp_path / "empty")
    (dirs[0] / "metrics.jsonl").open("a").write('{"step": 3, "rew')  # a half-written last line is skipped
    verdict = compare_runs(dirs)
    assert list(verdict["labels"]) == ["grpo", "dapo", "delta_l"]  # the usual order
    assert any("interrupted" in w for w in verdict["warnings"]) and any(
        "empty" in w for w in verdict["warnings"]
    )
    text = format_verdict(verdict)
    assert "not distinguishable at 3 seeds" in text and "grpo" in text
    RunWriter(tmp_path)  # the comparison dir itself
    from lab.runner import write_verdict

    write_verdict(tmp_path, verdict)
    assert read_verdict(tmp_path)["seeds"] == verdict["seeds"]
    assert read_verdict(tmp_path / "nowhere") is None
