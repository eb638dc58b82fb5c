r"""The verdict of a comparison: is one aggregator's reward different from another's, beyond seed noise?

Pure functions of run logs (no training code). For every pair of aggregator labels (a, b) and two
metrics of each run's training-reward curve (TRL's ``reward``, the mean reward of a step's completions):

- ``final_reward``: the mean over the last 10% of logged steps (at least one step), as the dashboard's
  score table;
- ``auc``: the area under the reward curve divided by its length in steps, i.e. the mean reward over all
  logged steps (a run that learns early scores higher than one that gets there late);

the runs of a and b are **paired by seed** (same seed = same prompts and the same first batch of samples),
and the verdict reports the mean over seeds of the paired difference :math:`d_s = m_a(s) - m_b(s)`, a
95% percentile-bootstrap interval of that mean (10,000 resamples of the seeds), and a 95% Student-t
interval. A pair is ``distinguishable`` when it has at least :data:`MIN_SEEDS` common seeds and **both**
intervals exclude 0. Why both: with 5 seeds the
percentile bootstrap is known to be too narrow (it cannot see beyond the 5 values it resamples), and the
t-interval assumes normal differences; requiring both keeps the verdict conservative.

With 6 pairs × 2 metrics, 12 intervals are read at once: if every aggregator were the same, about 0.6 of
them would still exclude 0 by chance. The verdict says so in its ``note``; read one "distinguishable"
among many "not distinguishable" with that in mind.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

METRICS = ("final_reward", "auc")
FINAL_FRACTION = 0.1
CONFIDENCE = 0.95
N_BOOTSTRAP = 10_000
MIN_SEEDS = 3  # below this, two seeds can agree by chance and give a zero-width interval
# two-sided 95% Student t quantiles by degrees of freedom (no scipy in the lab's dependencies)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}  # fmt: skip

Curve = Sequence[tuple[float, float]]  # (step, reward) pairs


def t95(n: int) -> float:
    """Two-sided 95% t quantile for a mean over ``n`` values (NaN for n < 2; 1.96 for large n)."""
    df = n - 1
    if df < 1:
        return float("nan")
    keys = [k for k in _T95 if k <= df]
    return _T95[max(keys)] if df <= 30 else 1.96


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
# intervals over seeds
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


def t_interval(values: Sequence[float]) -> tuple[float, float]:
    """95% Student-t interval of the mean of ``values`` (NaN, NaN for fewer than 2)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size < 2:
        return math.nan, math.nan
    half = t95(x.size) * x.std(ddof=1) / math.sqrt(x.size)
    return float(x.mean() - half), float(x.mean() + half)


def _excludes_zero(interval: tuple[float, float]) -> bool:
    lo, hi = interval
    return math.isfinite(lo) and math.isfinite(hi) and (lo > 0 or hi < 0)


# ---------------------------------------------------------------------------------------------------
# the verdict
# ---------------------------------------------------------------------------------------------------
def verdict_from_curves(
    curves: Mapping[str, Mapping[int, Curve]],
    *,
    metrics: Iterable[str] = METRICS,
    n_bootstrap: int = N_BOOTSTRAP,
    seed: int = 0,
) -> dict[str, Any]:
    """The verdict of ``{label: {seed: [(step, reward), ...]}}`` (labels in the order given).

    Returns ``{"seeds": S, "pairs": [{"a", "b", "metric", "mean_diff", "ci", "ci_t", "distinguishable",
    "n_seeds", "diffs"}...], "labels": {label: {metric: {"mean", "ci_t", "values": {seed: v}}}},
    "method", "note"}``. ``seeds`` is the number of seeds every label has (pairs use the seeds both
    labels have). Pairs without two common seeds get NaN intervals and ``distinguishable: false``.
    """
    metrics = tuple(metrics)
    unknown = set(metrics) - set(METRIC_FUNCTIONS)
    if unknown:
        raise ValueError(
            f"unknown verdict metric(s) {sorted(unknown)}; expected some of {list(METRIC_FUNCTIONS)}"
        )
    values = {
        label: {m: {int(s): METRIC_FUNCTIONS[m](curve) for s, curve in by_seed.items()} for m in metrics}
        for label, by_seed in curves.items()
    }
    labels = list(curves)
    per_label = {}
    for label in labels:
        per_label[label] = {}
        for m in metrics:
            finite = {s: v for s, v in values[label][m].items() if math.isfinite(v)}
            xs = list(finite.values())
            per_label[label][m] = {
                "mean": sum(xs) / len(xs) if xs else math.nan,
                "ci_t": list(t_interval(xs)),
                "values": finite,
            }
    pairs = []
    for i, a in enumerate(labels):
        for b in labels[i + 1 :]:
            for m in metrics:
                va, vb = per_label[a][m]["values"], per_label[b][m]["values"]
                common = sorted(set(va) & set(vb))
                diffs = [va[s] - vb[s] for s in common]
                ci = bootstrap_ci(diffs, n_bootstrap=n_bootstrap, seed=seed)
                ci_t = t_interval(diffs)
                pairs.append(
                    {
                        "a": a,
                        "b": b,
                        "metric": m,
                        "mean_diff": sum(diffs) / len(diffs) if diffs else math.nan,
                        "ci": list(ci),
                        "ci_t": list(ci_t),
                        "distinguishable": len(common) >= MIN_SEEDS
                        and _excludes_zero(ci)
                        and _excludes_zero(ci_t),
                        "n_seeds": len(common),
                        "diffs": dict(zip(common, diffs, strict=True)),
                    }
                )
    seed_counts = [len(per_label[label][metrics[0]]["values"]) for label in labels] if metrics else []
    n_tests = len(pairs)
    return {
        "seeds": min(seed_counts) if seed_counts else 0,
        "pairs": pairs,
        "labels": per_label,
        "method": (
            f"paired by seed; mean difference a - b; {int(CONFIDENCE * 100)}% percentile bootstrap over seeds "
            f"({n_bootstrap} resamples) and {int(CONFIDENCE * 100)}% Student-t interval; distinguishable when "
            f"both exclude 0 (and at least {MIN_SEEDS} seeds). final_reward = mean reward over the last {int(FINAL_FRACTION * 100)}% of steps; "
            "auc = mean reward over all steps."
        ),
        "note": (
            f"{n_tests} intervals at {int(CONFIDENCE * 100)}%: with no real difference, about "
            f"{n_tests * (1 - CONFIDENCE):.1f} would exclude 0 by chance."
        ),
    }


def curves_from_run_dirs(run_dirs: Iterable[str | Path]) -> tuple[dict[str, dict[int, Curve]], list[str]]:
    """``({label: {seed: [(step, reward)]}}, warnings)`` from run dirs (through :mod:`lab.runlog`).

    Runs that are not finished are used as they are and named in the warnings; a run without a readable
    config or without any logged reward is skipped (and named).
    """
    from lab.runlog import RunReader

    curves: dict[str, dict[int, Curve]] = {}
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
    return curves, warnings


def compare_runs(run_dirs: Iterable[str | Path], **kwargs: Any) -> dict[str, Any]:
    """:func:`verdict_from_curves` of the runs in ``run_dirs`` plus ``warnings`` and ``created``."""
    curves, warnings = curves_from_run_dirs(run_dirs)
    order = ["grpo", "dapo", "dr_grpo", "delta_l"]
    curves = dict(sorted(curves.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else 9, kv[0])))
    verdict = verdict_from_curves(curves, **kwargs)
    verdict["warnings"] = warnings
    verdict["created"] = time.time()
    return verdict


def format_verdict(verdict: Mapping[str, Any]) -> str:
    """The verdict as a plain-text table (what ``lab compare`` prints)."""
    seeds = verdict.get("seeds", 0)
    lines = [f"Verdict over {seeds} seed(s) (paired by seed, mean difference a − b, 95% intervals):"]
    header = (
        f"  {'a':<10} {'b':<10} {'metric':<13} {'mean diff':>10}  {'bootstrap CI':<19} {'t CI':<19}  verdict"
    )
    lines.append(header)
    for p in verdict.get("pairs", []):
        ci = "[{:+.3f}, {:+.3f}]".format(*p["ci"])
        ci_t = "[{:+.3f}, {:+.3f}]".format(*p["ci_t"])
        said = "DISTINGUISHABLE" if p["distinguishable"] else f"not distinguishable at {p['n_seeds']} seeds"
        lines.append(
            f"  {p['a']:<10} {p['b']:<10} {p['metric']:<13} {p['mean_diff']:>+10.3f}  {ci:<19} {ci_t:<19}  {said}"
        )
    for label, stats in verdict.get("labels", {}).items():
        parts = []
        for metric, s in stats.items():
            lo, hi = s["ci_t"]
            parts.append(f"{metric} {s['mean']:.3f} [{lo:.3f}, {hi:.3f}]")
        lines.append(f"  {label}: " + ", ".join(parts))
    if verdict.get("note"):
        lines.append("  " + verdict["note"])
    for warning in verdict.get("warnings", []):
        lines.append("  warning: " + warning)
    return "\n".join(lines)
