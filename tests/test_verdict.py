"""The verdict: paired differences over seeds, their intervals, and what lab compare writes."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import given

from lab.runlog import RunWriter, read_verdict, run_id
from lab.verdict import (
    ALPHA,
    EVAL_AVG_AT_K,
    FINAL_FRACTION,
    MIN_SEEDS,
    POWER,
    bootstrap_ci,
    compare_runs,
    final_reward,
    format_verdict,
    holm_adjust,
    min_detectable_difference,
    paired_p_value,
    paired_t_power,
    reward_auc,
    t95,
    t_interval,
    verdict_from_curves,
)
from lab.verdict_sim import NoiseModel, estimate_noise, rewards_array, synthetic_curves


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
    assert t95(5) == pytest.approx(2.776, abs=5e-4) and t95(10**6) == pytest.approx(1.96, abs=1e-3)
    assert math.isnan(t95(1))
    assert all(math.isnan(v) for v in (*bootstrap_ci([1.0]), *t_interval([1.0])))


def test_paired_p_value_is_scipys_paired_t_test():
    from scipy import stats

    rng = np.random.default_rng(6)
    a, b = rng.normal(0.5, 0.1, 7), rng.normal(0.55, 0.1, 7)
    assert paired_p_value(a - b) == pytest.approx(stats.ttest_rel(a, b).pvalue, rel=1e-9)
    assert paired_p_value([0.1, 0.1, 0.1]) == 0.0 and paired_p_value([0.0, 0.0]) == 1.0
    assert math.isnan(paired_p_value([0.3]))


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
    assert "6 tests" in verdict["note"] and verdict["n_tests"] == 6
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
    assert "not detected at 3 seeds" in text and "DISTINGUISHABLE" not in text and "grpo" in text
    RunWriter(tmp_path)  # the comparison dir itself
    from lab.runner import write_verdict

    write_verdict(tmp_path, verdict)
    assert read_verdict(tmp_path)["seeds"] == verdict["seeds"]
    assert read_verdict(tmp_path / "nowhere") is None


# ---------------------------------------------------------------------------------------------------
# the correction and the MDE, on synthetic comparisons of the main job's size
# ---------------------------------------------------------------------------------------------------
MAIN_JOB = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "fast_compare.2core.json"
LABELS = ["grpo", "dapo", "dr_grpo", "delta_l"]


@pytest.fixture(scope="module")
def main_job_noise():
    """Seed, run and step noise of the stored main job (4 aggregators × 5 seeds × 60 steps)."""
    stored = json.loads(MAIN_JOB.read_text())
    curves = {}
    for run in stored["runs"]:
        curves.setdefault(run["label"], {})[run["seed"]] = [tuple(p) for p in run["curves"]["reward"]]
    return estimate_noise(rewards_array(curves))


def test_noise_fit_recovers_known_spreads():
    """20 fits of 4 labels × 30 seeds: each mean within 15% (the seed spread, the loosest, is ±3% there)."""
    truth = NoiseModel(tuple(np.linspace(0.3, 0.7, 40)), seed_sd=0.03, run_sd=0.02, shared_step_sd=0.08,
                       step_sd=0.06)  # fmt: skip
    rng = np.random.default_rng(3)
    fits = [estimate_noise(rewards_array(synthetic_curves(truth, LABELS, range(30), rng))) for _ in range(20)]
    for name in ("seed_sd", "run_sd", "shared_step_sd", "step_sd"):
        assert np.mean([getattr(f, name) for f in fits]) == pytest.approx(getattr(truth, name), rel=0.15)
    with pytest.raises(ValueError, match="step_sd"):
        NoiseModel((0.5,), seed_sd=0.0, run_sd=0.0, shared_step_sd=0.0, step_sd=-1.0)


def test_main_job_noise_has_the_measured_sizes(main_job_noise):
    """The simulation's noise is the main job's: a spread of a few hundredths per run, more per step."""
    m = main_job_noise
    assert len(m.mean_curve) == 60 and 0.25 < m.mean_curve[0] < 0.45 < 0.6 < np.mean(m.mean_curve[-6:])
    assert 0.005 < m.run_sd < 0.05 and 0.01 < m.seed_sd < 0.06 and 0.03 < m.step_sd < 0.12


def test_corrected_verdict_rarely_marks_a_pair_when_nothing_differs(main_job_noise):
    """200 verdicts of 4 identical aggregators × 5 seeds: Holm keeps the family-wise false alarms ≤ 10%
    (at most 5% in expectation; the uncorrected rule marks some pair in about a third of them)."""
    rng = np.random.default_rng(16)
    n_verdicts, corrected, uncorrected = 200, 0, 0
    for _ in range(n_verdicts):
        verdict = verdict_from_curves(
            synthetic_curves(main_job_noise, LABELS, range(5), rng), n_bootstrap=200
        )
        assert verdict["n_tests"] == 12
        corrected += any(p["distinguishable"] for p in verdict["pairs"])
        uncorrected += any(p["excludes_0_uncorrected"] for p in verdict["pairs"])
    assert corrected / n_verdicts <= 0.10
    assert uncorrected / n_verdicts > 0.2  # the old rule, on the same draws: the correction is what fixes it


def test_a_large_difference_is_found(main_job_noise):
    rng = np.random.default_rng(17)
    verdict = verdict_from_curves(
        synthetic_curves(main_job_noise, LABELS, range(5), rng, effects={"delta_l": 0.25}), n_bootstrap=200
    )
    marked = {(p["a"], p["b"], p["metric"]) for p in verdict["pairs"] if p["distinguishable"]}
    assert marked == {(a, "delta_l", m) for a in LABELS[:3] for m in ("final_reward", "auc")}
    gap = next(p for p in verdict["pairs"] if (p["a"], p["b"], p["metric"]) == ("grpo", "delta_l", "auc"))
    assert gap["mean_diff"] == pytest.approx(-0.25, abs=0.05) and gap["ci_t_family"][1] < 0
    assert "DISTINGUISHABLE" in format_verdict(verdict)


def test_power_at_the_mde_is_80_percent_by_simulation():
    """Draw 4000 sets of 5 paired differences with true mean = the MDE: the t-test at the Bonferroni level
    of 12 tests rejects in 80% of them. Tolerance 0.025: four binomial standard errors (√(0.8·0.2/4000))."""
    level, n, sd = ALPHA / 12, 5, 0.04
    mde = min_detectable_difference(sd, n, level)
    assert paired_t_power(mde, sd, n, level) == pytest.approx(POWER, abs=1e-6)
    rng = np.random.default_rng(5)
    hits = [paired_p_value(rng.normal(mde, sd, n)) < level for _ in range(4000)]
    assert np.mean(hits) == pytest.approx(POWER, abs=0.025)
    # more seeds, smaller MDE (about 1/√n once the t quantile settles); zero spread sees everything
    assert (
        min_detectable_difference(sd, 20, level) < mde / 2 and min_detectable_difference(0.0, 5, level) == 0
    )
    assert math.isnan(min_detectable_difference(sd, 1, level))


def test_a_pair_at_its_mde_is_marked_at_least_80_percent_of_the_time(main_job_noise):
    """The verdict's own decision at a true gap = the MDE computed from the model's true spread: Holm's
    power is at least the Bonferroni-level power of 80% (300 verdicts; tolerance 0.07 = three binomial
    standard errors)."""
    m = main_job_noise
    k = max(1, int(len(m.mean_curve) * FINAL_FRACTION))
    sd_final = math.sqrt(2 * (m.run_sd**2 + m.step_sd**2 / k))  # the paired final_reward difference
    mde = min_detectable_difference(sd_final, 5, ALPHA / 12)
    rng = np.random.default_rng(18)
    marked = []
    for _ in range(300):
        verdict = verdict_from_curves(
            synthetic_curves(m, LABELS, range(5), rng, effects={"delta_l": mde}), n_bootstrap=50
        )
        pair = next(
            p
            for p in verdict["pairs"]
            if (p["a"], p["b"], p["metric"]) == ("grpo", "delta_l", "final_reward")
        )
        marked.append(pair["distinguishable"])
    assert np.mean(marked) >= POWER - 0.07


def test_mde_and_p_values_are_stored_and_printed():
    rng = np.random.default_rng(4)
    seeds = range(5)
    curves = {label: {s: curve(rng.normal(0.5, 0.05, 20).tolist()) for s in seeds} for label in LABELS}
    verdict = verdict_from_curves(curves)
    for p in verdict["pairs"]:
        assert 0 <= p["p_value"] <= p["p_holm"] <= 1 and p["mde"] > 0
        assert p["mde_level"] == pytest.approx(ALPHA / 12)
        lo, hi = p["ci_t_family"]
        assert lo < p["ci_t"][0] and hi > p["ci_t"][1]  # the family interval is the wider one
    text = format_verdict(verdict)
    assert "p raw / Holm" in text and "MDE" in text and "could only see differences of ≥" in text
    json.dumps(verdict)


# ---------------------------------------------------------------------------------------------------
# held-out evaluation as a verdict metric
# ---------------------------------------------------------------------------------------------------
def test_end_of_run_eval_is_a_metric_only_when_every_run_has_it(tmp_path):
    dirs = []
    for agg in ("grpo", "delta_l"):
        for s in range(3):
            run_dir = write_run(tmp_path, agg, s, [0.2, 0.5])
            writer = RunWriter(run_dir)
            writer.log_eval({"step": 1, "k": 4, "avg_at_k": 0.0, "pass_at_k": 0.0, "n_prompts": 8})
            writer.log_eval({"step": 2, "k": 4, "avg_at_k": 0.4 + 0.01 * s + (agg == "delta_l") * 0.2,
                             "pass_at_k": 0.9, "n_prompts": 8})  # fmt: skip
            dirs.append(run_dir)
    verdict = compare_runs(dirs)
    assert verdict["metrics"] == ["final_reward", "auc", EVAL_AVG_AT_K] and verdict["n_tests"] == 3
    pair = next(p for p in verdict["pairs"] if p["metric"] == EVAL_AVG_AT_K)
    assert pair["mean_diff"] == pytest.approx(-0.2)  # the last evaluation, paired by seed
    # one run without an evaluation: the metric is left out, and said so
    (dirs[-1] / "eval.jsonl").unlink()
    verdict = compare_runs(dirs)
    assert EVAL_AVG_AT_K not in verdict["metrics"] and "1 of 6" in verdict["left_out_metrics"][EVAL_AVG_AT_K]
    assert "eval_avg_at_k left out" in format_verdict(verdict)
    # an interrupted run's last evaluation is from an earlier step: not an end-of-run value
    RunWriter(dirs[-1]).log_eval({"step": 2, "k": 4, "avg_at_k": 0.6, "pass_at_k": 0.9, "n_prompts": 8})
    assert EVAL_AVG_AT_K in compare_runs(dirs)["metrics"]
    RunWriter(dirs[-1]).set_status("interrupted", 2, 4)
    assert "1 of 6" in compare_runs(dirs)["left_out_metrics"][EVAL_AVG_AT_K]


def test_eval_columns_in_the_metrics_log_are_metrics(tmp_path):
    dirs = []
    for agg in ("grpo", "dapo"):
        for s in range(3):
            run_dir = write_run(tmp_path, agg, s, [0.3, 0.6])
            RunWriter(run_dir).log_metrics({"step": 2, "eval/reward": 0.5 + 0.1 * s, "eval/nan": math.nan})
            dirs.append(run_dir)
    verdict = compare_runs(dirs)
    assert "eval/reward" in verdict["metrics"] and "eval/nan" not in verdict["metrics"]


# ---------------------------------------------------------------------------------------------------
# invariants of the Holm adjustment
# ---------------------------------------------------------------------------------------------------
p_lists = st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=1, max_size=30)


@given(p_lists)
def test_holm_adjusted_p_is_at_least_raw_at_most_one_and_keeps_the_order(ps):
    adjusted = holm_adjust(ps)
    assert all(raw <= adj <= 1.0 for raw, adj in zip(ps, adjusted, strict=True))
    for i, j in itertools.combinations(range(len(ps)), 2):
        if ps[i] <= ps[j]:
            assert adjusted[i] <= adjusted[j]
    assert min(adjusted) == pytest.approx(min(1.0, len(ps) * min(ps)))  # Holm's first step is Bonferroni


@given(p_lists, st.randoms(use_true_random=False))
def test_holm_does_not_depend_on_the_order_of_the_tests(ps, random):
    order = list(range(len(ps)))
    random.shuffle(order)
    shuffled = holm_adjust([ps[i] for i in order])
    assert [shuffled[order.index(i)] for i in range(len(ps))] == holm_adjust(ps)


@given(p_lists, st.floats(min_value=0.001, max_value=0.2))
def test_holm_rejects_at_least_what_bonferroni_rejects(ps, alpha):
    rejected = [adj < alpha for adj in holm_adjust(ps)]
    assert all(rejected[i] for i, p in enumerate(ps) if p < alpha / len(ps))


def test_holm_on_known_values_and_bad_input():
    assert holm_adjust([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    nan_kept = holm_adjust([0.01, math.nan])
    assert nan_kept[0] == pytest.approx(0.02) and math.isnan(nan_kept[1])  # a NaN still counts as a test
    with pytest.raises(ValueError, match=r"1\.5"):
        holm_adjust([0.1, 1.5])
    assert holm_adjust([]) == []
