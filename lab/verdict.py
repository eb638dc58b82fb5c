r"""The verdict of a comparison: is one aggregator's reward different from another's, beyond seed noise?

Pure functions of run logs (no training code). For every pair of aggregator labels (a, b) and every
metric of each run:

- ``final_reward``: the mean training reward (TRL's ``reward``) over the last 10% of logged steps (at least
  one step), as the dashboard's score table;
- ``auc``: the area under the reward curve divided by its length in steps, i.e. the mean reward over all
  logged steps (a run that learns early scores higher than one that gets there late);
- held-out evaluations at the end of a run, when **every** run has one: ``eval_avg_at_k`` (the last
  ``avg_at_k`` of ``eval.jsonl``: fixed problems, the same for every aggregator of a seed) and any column
  ``eval/<name>`` a run logs in ``metrics.jsonl`` (its last value);

the runs of a and b are **paired by seed** (same seed = same prompts and the same first batch of samples),
and the verdict reports the mean over seeds of the paired difference :math:`d_s = m_a(s) - m_b(s)`, a
95% percentile-bootstrap interval of that mean (10,000 resamples of the seeds), a 95% Student-t interval
and the two-sided p-value of the paired t-test (``scipy.stats.ttest_1samp`` of the d_s against 0).

**Family-wise correction.** The verdict reads many tests at once (6 pairs × 2 or 3 metrics): if every
aggregator were the same, each 95% interval would still exclude 0 with probability 5%, and some pair
would be marked in about 37% of verdicts of the main job's size. So a pair is ``distinguishable`` only
when its Holm–Bonferroni adjusted p-value (over **all** the tests the verdict reports) is below
:data:`ALPHA` and it has at least :data:`MIN_SEEDS` common seeds: the chance that a verdict marks any pair
when nothing differs is then at most 5%, whatever the correlation between the tests. ``p_value`` and
``p_holm`` are stored in each pair; ``excludes_0_uncorrected`` keeps the old rule (both 95% intervals
exclude 0) for comparison.

**Minimum detectable difference.** ``mde`` is the true difference the paired t-test would detect with
80% power (two-sided) given the measured seed-to-seed spread of the d_s, at the **Bonferroni** level
α/m (m = number of tests). Holm's first step uses that level and every later step a larger one, so under
Holm the power at ``mde`` is at least 80%: a pair whose true gap is below its ``mde`` is likely to read as
a tie with these seeds. It is computed from the noncentral t distribution (exact for normal d_s) and
shrinks like 1/√seeds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from scipy import optimize, stats

from lab.aggregators import order_key
from lab.runlog import HELDOUT_METRIC

METRICS = ("final_reward", "auc")  # metrics of the training-reward curve
EVAL_AVG_AT_K = "eval_avg_at_k"  # the last avg_at_k of eval.jsonl: the end-of-run held-out evaluation
EVAL_COLUMN_PREFIX = "eval/"  # end-of-run columns in metrics.jsonl, used as metrics under their own name
FINAL_FRACTION = 0.1
CONFIDENCE = 0.95
ALPHA = 0.05  # family-wise error rate of the verdict
POWER = 0.8  # power at the minimum detectable difference
N_BOOTSTRAP = 10_000
MIN_SEEDS = 3  # below this, two seeds can agree by chance and give a zero-width interval

Curve = Sequence[tuple[float, float]]  # (step, reward) pairs
EndValues = Mapping[str, Mapping[str, Mapping[int, float]]]  # {metric: {label: {seed: value}}}


@lru_cache(maxsize=1024)
def t_quantile(n: int, confidence: float = CONFIDENCE) -> float:
    """Two-sided Student-t quantile for a mean over ``n`` values (NaN for n < 2)."""
    if n < 2:
        return float("nan")
    return float(stats.t.ppf(0.5 + confidence / 2, n - 1))


def t95(n: int) -> float:
    """Two-sided 95% t quantile for a mean over ``n`` values (NaN for n < 2)."""
    return t_quantile(n, 0.95)


# ---------------------------------------------------------------------------------------------------
# metrics of one curve
# ---------------------------------------------------------------------------------------------------
def _clean(curve: Curve) -> list[tuple[float, float]]:
    """Points with finite step and value, sorted by step, the last value kept for a repeated step."""
    points: dict[float, float] = {}
    for step, value in curve:
        if isinstance(step, (int, float)) and isinstance(value, (int, float)):
            if math.isfinite(step) and math.isfinite(value):
                points[float(step)] = float(value)
    return sorted(points.items())


def final_reward(curve: Curve, fraction: float = FINAL_FRACTION) -> float:
    """Mean reward over the last ``fraction`` of the logged steps (at least one); NaN for an empty curve."""
    values = [v for _, v in _clean(curve)]
    if not values:
        return math.nan
    k = max(1, int(len(values) * fraction))
    return sum(values[-k:]) / k


def reward_auc(curve: Curve) -> float:
    """Area under the reward curve per step: the mean reward over all logged steps (NaN if empty)."""
    values = [v for _, v in _clean(curve)]
    return sum(values) / len(values) if values else math.nan


METRIC_FUNCTIONS = {"final_reward": final_reward, "auc": reward_auc}


# ---------------------------------------------------------------------------------------------------
# intervals, tests and power over seeds
# ---------------------------------------------------------------------------------------------------
def bootstrap_ci(
    values: Sequence[float], *, n_bootstrap: int = N_BOOTSTRAP, seed: int = 0
) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of ``values`` (NaN, NaN for fewer than 2)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_bootstrap, x.size))].mean(axis=1)
    tail = (1 - CONFIDENCE) / 2
    lo, hi = np.quantile(means, [tail, 1 - tail])
    return float(lo), float(hi)


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Student-t interval of the mean of ``values`` (95% by default; NaN, NaN for fewer than 2)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size < 2:
        return math.nan, math.nan
    half = t_quantile(x.size, confidence) * x.std(ddof=1) / math.sqrt(x.size)
    return float(x.mean() - half), float(x.mean() + half)


def paired_p_value(diffs: Sequence[float]) -> float:
    """Two-sided p-value of the paired t-test (mean of ``diffs`` = 0); NaN for fewer than 2 values.

    Identical differences have no spread: p = 1 when they are all 0, else 0 (scipy returns NaN there).
    """
    x = np.asarray(diffs, dtype=np.float64)
    if x.size < 2:
        return math.nan
    if np.ptp(x) == 0:
        return 1.0 if x[0] == 0 else 0.0
    t = x.mean() / (
        x.std(ddof=1) / math.sqrt(x.size)
    )  # = scipy.stats.ttest_1samp(x, 0), without its overhead
    return float(2 * stats.t.sf(abs(t), x.size - 1))


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values, in the order given (NaN stays NaN and counts as a test).

    Sorted ascending, the i-th (from 0) of m becomes max over j ≤ i of min(1, (m − j)·p_(j)): a test is
    rejected at family-wise level α exactly when its adjusted p-value is below α.
    """
    p = np.asarray(p_values, dtype=np.float64)
    if np.any((p < 0) | (p > 1)):
        raise ValueError(f"p-values must lie in [0, 1], got {p[(p < 0) | (p > 1)].tolist()}")
    m = p.size
    filled = np.where(np.isnan(p), 1.0, p)
    order = np.argsort(filled, kind="stable")
    scaled = np.minimum(1.0, (m - np.arange(m)) * filled[order])
    adjusted = np.empty(m)
    adjusted[order] = np.maximum.accumulate(scaled)
    return [math.nan if math.isnan(raw) else float(a) for raw, a in zip(p, adjusted, strict=True)]


def paired_t_power(diff: float, sd: float, n: int, level: float) -> float:
    """Power of the two-sided paired t-test at ``level`` with ``n`` pairs, true mean ``diff``, spread ``sd``."""
    if n < 2 or not sd > 0:
        return math.nan
    df, shift = n - 1, diff * math.sqrt(n) / sd
    critical = stats.t.ppf(1 - level / 2, df)
    # P(T < -c | shift) = P(T > c | -shift): two upper tails (scipy's nct.cdf gives NaN far in the tail)
    return float(stats.nct.sf(critical, df, shift) + stats.nct.sf(critical, df, -shift))


def min_detectable_difference(sd: float, n: int, level: float, power: float = POWER) -> float:
    """The true paired difference the two-sided t-test at ``level`` detects with ``power`` (n pairs).

    NaN for n < 2 or an undefined spread; 0 for zero spread (any difference is then seen).
    """
    if not 0 < level < 1 or not 0 < power < 1:
        raise ValueError(f"level and power must lie in (0, 1), got level={level!r}, power={power!r}")
    if n < 2 or not math.isfinite(sd) or sd < 0:
        return math.nan
    return sd * _mde_in_sds(int(n), float(level), float(power))


@lru_cache(maxsize=256)
def _mde_in_sds(n: int, level: float, power: float) -> float:
    """The MDE in units of the spread: the power depends on diff/sd only, so solve once per (n, level)."""
    high = 1.0  # grow the bracket until the power passes the target
    while paired_t_power(high, 1.0, n, level) < power:
        high *= 2
    return float(optimize.brentq(lambda d: paired_t_power(d, 1.0, n, level) - power, 0.0, high, xtol=1e-12))


def _excludes_zero(interval: tuple[float, float]) -> bool:
    lo, hi = interval
    return math.isfinite(lo) and math.isfinite(hi) and (lo > 0 or hi < 0)


# ---------------------------------------------------------------------------------------------------
# the verdict
# ---------------------------------------------------------------------------------------------------
def _metric_values(
    curves: Mapping[str, Mapping[int, Curve]], metrics: Sequence[str], end_values: EndValues
) -> tuple[dict[str, dict[str, dict[int, float]]], list[str], dict[str, str]]:
    """``({label: {metric: {seed: v}}}, metrics used, {metric left out: why})``.

    Curve metrics are always used; an end-of-run metric only when every run of ``curves`` has a finite
    value of it (a verdict over the runs that happen to have one would compare different seed sets).
    """
    values = {
        label: {m: {int(s): METRIC_FUNCTIONS[m](curve) for s, curve in by_seed.items()} for m in metrics}
        for label, by_seed in curves.items()
    }
    used, left_out = list(metrics), {}
    for name, by_label in end_values.items():
        missing = [
            f"{label}/s{s}"
            for label, by_seed in curves.items()
            for s in by_seed
            if not _finite(by_label.get(label, {}).get(int(s)))
        ]
        if missing:
            left_out[name] = f"missing in {len(missing)} of {sum(map(len, curves.values()))} runs"
            continue
        used.append(name)
        for label, by_seed in curves.items():
            values[label][name] = {int(s): float(by_label[label][int(s)]) for s in by_seed}
    return values, used, left_out


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _pair(a: str, b: str, metric: str, va: Mapping[int, float], vb: Mapping[int, float], **kw) -> dict:
    """One pair and metric before the correction: the paired differences, intervals and raw p-value."""
    common = sorted(set(va) & set(vb))
    diffs = [va[s] - vb[s] for s in common]
    ci = bootstrap_ci(diffs, **kw)
    ci_t = t_interval(diffs)
    return {
        "a": a,
        "b": b,
        "metric": metric,
        "mean_diff": sum(diffs) / len(diffs) if diffs else math.nan,
        "ci": list(ci),
        "ci_t": list(ci_t),
        "n_seeds": len(common),
        "diffs": dict(zip(common, diffs, strict=True)),
        "sd_diff": float(np.std(diffs, ddof=1)) if len(diffs) > 1 else math.nan,
        "p_value": paired_p_value(diffs),
        "excludes_0_uncorrected": len(common) >= MIN_SEEDS and _excludes_zero(ci) and _excludes_zero(ci_t),
    }


def _correct(pairs: list[dict], alpha: float) -> None:
    """Holm over every pair (in place): ``p_holm``, ``distinguishable``, the family interval and the MDE."""
    m = len(pairs)
    level = alpha / m if m else alpha
    for p, adjusted in zip(pairs, holm_adjust([p["p_value"] for p in pairs]), strict=True):
        p["p_holm"] = adjusted
        p["distinguishable"] = p["n_seeds"] >= MIN_SEEDS and math.isfinite(adjusted) and adjusted < alpha
        p["ci_t_family"] = list(t_interval(list(p["diffs"].values()), 1 - level))
        p["mde"] = min_detectable_difference(p["sd_diff"], p["n_seeds"], level)
        p["mde_level"] = level


def verdict_from_curves(
    curves: Mapping[str, Mapping[int, Curve]],
    *,
    metrics: Iterable[str] = METRICS,
    end_values: EndValues | None = None,
    n_bootstrap: int = N_BOOTSTRAP,
    seed: int = 0,
    alpha: float = ALPHA,
) -> dict[str, Any]:
    """The verdict of ``{label: {seed: [(step, reward), ...]}}`` (labels in the order given).

    ``end_values`` adds end-of-run metrics ``{metric: {label: {seed: value}}}`` (a held-out evaluation),
    each used when every run has it. Returns ``{"seeds": S, "pairs": [{"a", "b", "metric", "mean_diff",
    "ci", "ci_t", "ci_t_family", "p_value", "p_holm", "distinguishable", "excludes_0_uncorrected",
    "sd_diff", "mde", "mde_level", "n_seeds", "diffs"}...], "labels": {label: {metric: {"mean", "ci_t",
    "values": {seed: v}}}}, "metrics", "left_out_metrics", "alpha", "power", "n_tests", "method",
    "note"}``. ``seeds`` is the number of seeds every label has (pairs use the seeds both labels have).
    Pairs without two common seeds get NaN intervals and ``distinguishable: false``.
    """
    metrics = tuple(metrics)
    unknown = set(metrics) - set(METRIC_FUNCTIONS)
    if unknown:
        raise ValueError(
            f"unknown verdict metric(s) {sorted(unknown)}; expected some of {list(METRIC_FUNCTIONS)}"
        )
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}")
    values, used, left_out = _metric_values(curves, metrics, end_values or {})
    labels = list(curves)
    per_label: dict[str, dict[str, Any]] = {}
    for label in labels:
        per_label[label] = {}
        for m in used:
            finite = {s: v for s, v in values[label][m].items() if math.isfinite(v)}
            xs = list(finite.values())
            per_label[label][m] = {
                "mean": sum(xs) / len(xs) if xs else math.nan,
                "ci_t": list(t_interval(xs)),
                "values": finite,
            }
    pairs = [
        _pair(
            a, b, m, per_label[a][m]["values"], per_label[b][m]["values"], n_bootstrap=n_bootstrap, seed=seed
        )
        for i, a in enumerate(labels)
        for b in labels[i + 1 :]
        for m in used
    ]
    _correct(pairs, alpha)
    seed_counts = [len(per_label[label][used[0]]["values"]) for label in labels] if used else []
    n_tests = len(pairs)
    pct = int(CONFIDENCE * 100)
    return {
        "seeds": min(seed_counts) if seed_counts else 0,
        "pairs": pairs,
        "labels": per_label,
        "metrics": used,
        "left_out_metrics": left_out,
        "alpha": alpha,
        "power": POWER,
        "n_tests": n_tests,
        "method": (
            f"paired by seed; mean difference a - b; {pct}% percentile bootstrap over seeds ({n_bootstrap} "
            f"resamples), {pct}% Student-t interval and paired t-test; distinguishable when the Holm–Bonferroni "
            f"adjusted p-value over all {n_tests} tests is below {alpha:g} (and at least {MIN_SEEDS} seeds). "
            f"MDE: the difference the t-test detects with {POWER:.0%} power at the Bonferroni level "
            f"{alpha:g}/{n_tests} (Holm's power is at least that). final_reward = mean reward over the last "
            f"{int(FINAL_FRACTION * 100)}% of steps; auc = mean reward over all steps; eval_avg_at_k = the "
            "held-out Avg@k at the end of each run."
        ),
        "note": (
            f"{n_tests} tests, corrected together: with no real difference, the chance that the verdict marks "
            f"any pair is at most {alpha:.0%} (uncorrected, about {n_tests * (1 - CONFIDENCE):.1f} of the "
            f"{n_tests} intervals would exclude 0 by chance)."
        ),
    }


def end_values_of_run(reader: Any) -> dict[str, float]:
    """End-of-run evaluation metrics of one run (a :class:`lab.runlog.RunReader` after ``poll``).

    ``eval_avg_at_k``: the ``avg_at_k`` of the last record of ``eval.jsonl`` (by step); ``eval/<name>``: the
    last finite value of that column in ``metrics.jsonl``. Nothing for a run that has not finished: its last
    evaluation is from an earlier step than the others' (the metric is then left out of the verdict).
    """
    found: dict[str, float] = {}
    if reader.status.get("state") != "finished":
        return found
    evals = [e for e in reader.evals if _finite(e.get("step")) and _finite(e.get("avg_at_k"))]
    if evals:
        found[EVAL_AVG_AT_K] = float(max(evals, key=lambda e: e["step"])["avg_at_k"])
    for row in reader.metrics:
        for key, value in row.items():
            # a standard error (``..._se``) describes a metric; it is not an outcome to compare
            if isinstance(key, str) and key.startswith(EVAL_COLUMN_PREFIX) and not key.endswith("_se"):
                if _finite(value):
                    found[key] = float(value)
    if EVAL_AVG_AT_K in found and HELDOUT_METRIC in found:
        del found[EVAL_AVG_AT_K]  # the held-out reward is the same mean over the same samples: test it once
    return found


def read_runs(
    run_dirs: Iterable[str | Path],
) -> tuple[dict[str, dict[int, Curve]], dict[str, dict[str, dict[int, float]]], list[str]]:
    """``(curves, end_values, warnings)`` of run dirs (through :mod:`lab.runlog`), for :func:`verdict_from_curves`.

    Runs that are not finished are used as they are and named in the warnings; a run without a readable
    config or without any logged reward is skipped (and named).
    """
    from lab.runlog import RunReader

    curves: dict[str, dict[int, Curve]] = {}
    end_values: dict[str, dict[str, dict[int, float]]] = {}
    warnings = []
    for run_dir in run_dirs:
        reader = RunReader(Path(run_dir))
        reader.poll()
        warnings.extend(reader.warnings)  # files refused by the bounded readers, lines skipped
        config, status = reader.config, reader.status
        label, seed = config.get("label"), config.get("seed")
        points = [(m.get("step"), m.get("reward")) for m in reader.metrics]
        if not isinstance(label, str) or not isinstance(seed, int) or not _clean(points):
            warnings.append(f"{run_dir}: no config or no logged reward, left out")
            continue
        if status.get("state") != "finished":
            warnings.append(
                f"{run_dir}: {status.get('state', 'unknown')} at step {status.get('step')}, used as is"
            )
        curves.setdefault(label, {})[seed] = points
        add_end_values(end_values, label, seed, reader)
    return curves, end_values, warnings


def add_end_values(
    end_values: dict[str, dict[str, dict[int, float]]], label: str, seed: int, reader: Any
) -> None:
    """Put one run's :func:`end_values_of_run` into ``{metric: {label: {seed: value}}}`` (in place)."""
    for name, value in end_values_of_run(reader).items():
        end_values.setdefault(name, {}).setdefault(label, {})[seed] = value


def curves_from_run_dirs(run_dirs: Iterable[str | Path]) -> tuple[dict[str, dict[int, Curve]], list[str]]:
    """``({label: {seed: [(step, reward)]}}, warnings)`` from run dirs (:func:`read_runs` without evals)."""
    curves, _, warnings = read_runs(run_dirs)
    return curves, warnings


def compare_runs(run_dirs: Iterable[str | Path], **kwargs: Any) -> dict[str, Any]:
    """:func:`verdict_from_curves` of the runs in ``run_dirs`` plus ``warnings`` and ``created``."""
    curves, end_values, warnings = read_runs(run_dirs)
    curves = dict(sorted(curves.items(), key=lambda kv: order_key(kv[0])))  # registry order
    verdict = verdict_from_curves(curves, end_values=kwargs.pop("end_values", end_values), **kwargs)
    verdict["warnings"] = warnings
    verdict["created"] = time.time()
    return verdict


def pair_decision(pair: Mapping[str, Any]) -> str:
    """What a pair's test says, in words: "DISTINGUISHABLE" only after the correction (and enough seeds)."""
    n = pair.get("n_seeds")
    if pair.get("distinguishable"):
        return "DISTINGUISHABLE"
    if not isinstance(n, int) or n < MIN_SEEDS:
        return f"not tested: {n} seed(s), needs {MIN_SEEDS}"
    raw = pair.get("p_value")
    return f"not detected at {n} seeds" + ("; raw p < 0.05 only" if _finite(raw) and raw < 0.05 else "")


def format_verdict(verdict: Mapping[str, Any]) -> str:
    """The verdict as a plain-text table (what ``lab compare`` prints)."""
    seeds = verdict.get("seeds", 0)
    n_tests = verdict.get("n_tests", len(verdict.get("pairs", [])))
    lines = [
        f"Verdict over {seeds} seed(s) (paired by seed, mean difference a − b, 95% intervals; p: paired t-test, "
        f"raw / Holm over {n_tests} tests):"
    ]
    pairs = verdict.get("pairs", [])
    # columns as wide as their longest entry (eval/heldout_reward, delta_l-aauto), so the table stays aligned
    wl = max([10, *(len(str(p[k])) for p in pairs for k in ("a", "b"))])
    wm = max([13, *(len(str(p["metric"])) for p in pairs)])
    lines.append(
        f"  {'a':<{wl}} {'b':<{wl}} {'metric':<{wm}} {'mean diff':>10}  {'bootstrap CI':<19} {'t CI':<19} "
        f"{'p raw / Holm':<14} {'MDE':>6}  verdict"
    )
    for p in pairs:
        ci = "[{:+.3f}, {:+.3f}]".format(*p["ci"])
        ci_t = "[{:+.3f}, {:+.3f}]".format(*p["ci_t"])
        ps = f"{_p_text(p.get('p_value'))} / {_p_text(p.get('p_holm'))}"
        mde = f"{p['mde']:.3f}" if _finite(p.get("mde")) else "–"
        lines.append(
            f"  {p['a']:<{wl}} {p['b']:<{wl}} {p['metric']:<{wm}} {p['mean_diff']:>+10.3f}  {ci:<19} {ci_t:<19} "
            f"{ps:<14} {mde:>6}  {pair_decision(p)}"
        )
    for label, stats_by_metric in verdict.get("labels", {}).items():
        parts = []
        for metric, s in stats_by_metric.items():
            lo, hi = s["ci_t"]
            parts.append(f"{metric} {s['mean']:.3f} [{lo:.3f}, {hi:.3f}]")
        lines.append(f"  {label}: " + ", ".join(parts))
    mdes = [p["mde"] for p in verdict.get("pairs", []) if _finite(p.get("mde"))]
    if mdes:
        lines.append(
            f"  MDE: with {seeds} seeds a pair could only see differences of ≥ its MDE ({min(mdes):.3f} to "
            f"{max(mdes):.3f} here; {verdict.get('power', POWER):.0%} power at the Bonferroni level)."
        )
    for name, why in verdict.get("left_out_metrics", {}).items():
        lines.append(f"  metric {name} left out: {why}")
    if verdict.get("note"):
        lines.append("  " + verdict["note"])
    for warning in verdict.get("warnings", []):
        lines.append("  warning: " + warning)
    return "\n".join(lines)


def _p_text(p: object) -> str:
    if not _finite(p):
        return "–"
    return "<0.001" if p < 0.001 else f"{p:.3f}"
