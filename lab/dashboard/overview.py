"""View 1, Overview: reward curves per aggregator, eval Avg@k / Pass@k, a table of final scores."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import pandas as pd
import plotly.graph_objects as go

from lab.dashboard.colors import display_name
from lab.dashboard.data import RunData, final_value, label_curve, numeric_column, reward_range
from lab.dashboard.figures import add_band_line, new_figure, placeholder

Groups = Mapping[str, Sequence[RunData]]


SEED_BANDS = {"ci95": "95% CI of the mean over seeds", "std": "± 1 std over seeds", "none": "no band"}


def reward_figure(
    groups: Groups, *, column: str = "reward", window: int = 1, seed_band: str = "ci95"
) -> go.Figure:
    """Mean reward per aggregator against step: ± reward_std band (one seed) or a band over seeds.

    The bands are clipped to the reward's range (:func:`reward_band_caption` says so under the chart):
    a ± std band on a reward in [0, 1] would otherwise draw values the reward cannot take.
    """
    if not any(not r.metrics.empty for runs in groups.values() for r in runs):
        return placeholder("Reward", "No metrics logged yet.")
    bounds = reward_range([r for runs in groups.values() for r in runs], column)
    title = (
        f"Reward (band: ± within-batch std for one seed; {SEED_BANDS.get(seed_band, seed_band)}; "
        f"clipped to [{bounds[0]:g}, {bounds[1]:g}])"
    )
    fig = new_figure(title, "step", column)
    for label, runs in groups.items():
        band_column = f"{column}_std" if len(runs) == 1 else None
        curve = label_curve(
            runs, column, window=window, band_column=band_column, seed_band=seed_band, bounds=bounds
        )
        add_band_line(fig, curve, label, name=f"{display_name(label)} (n={len(runs)})")
    return fig


def reward_band_caption(groups: Groups, column: str = "reward") -> str:
    """Says what the reward bands are and that they are clipped to the reward's range."""
    low, high = reward_range([r for runs in groups.values() for r in runs], column)
    return (
        f"Bands: one seed, mean ± the within-batch std of the reward; several seeds, the chosen band over "
        f"seeds. Both are clipped to [{low:g}, {high:g}], the range the reward can take (each reward function "
        "gives 0 to 1 and TRL sums them), so a band never shows a value no completion could score."
    )


def eval_figure(groups: Groups, *, metric: str = "avg_at_k") -> go.Figure:
    """Eval ``avg_at_k`` or ``pass_at_k`` against step, mean over seeds with a 95% band (within [0, 1])."""
    title = {"avg_at_k": "Eval Avg@k", "pass_at_k": "Eval Pass@k"}.get(metric, metric)
    if not any(not r.evals.empty for runs in groups.values() for r in runs):
        return placeholder(title, "No evaluations logged yet (eval.jsonl).")
    ks = {int(k) for runs in groups.values() for r in runs for k in numeric_column(r.evals, "k").unique()}
    k_text = "/".join(str(k) for k in sorted(ks)) or "k"
    fig = new_figure(title.replace("k", k_text, 1) if ks else title, "step", metric)
    for label, runs in groups.items():
        curve = label_curve(runs, metric, source="evals", bounds=(0.0, 1.0))  # fractions of samples
        add_band_line(fig, curve, label, band=len(runs) > 1, mode="lines+markers")
    return fig


def _monotonicity() -> Callable | None:
    """``lab.evaluation.monotonicity_score`` if it exists (it is defined and documented there)."""
    try:
        from lab.evaluation import monotonicity_score
    except ImportError:
        return None
    return monotonicity_score


def _safe_score(fn: Callable | None, curve: pd.Series) -> float:
    """``fn(steps, values)`` on a step-indexed curve; NaN when unavailable or invalid."""
    if fn is None or len(curve) < 2:
        return float("nan")
    try:
        return float(fn(curve.index.tolist(), curve.tolist()))
    except (ValueError, TypeError, ZeroDivisionError):
        return float("nan")


def scores_table(groups: Groups) -> pd.DataFrame:
    """One row per run: state, progress, final reward (last 10% of steps), final eval, monotonicity."""
    mono = _monotonicity()
    rows = []
    for label, runs in groups.items():
        for run in runs:
            reward = numeric_column(run.metrics, "reward")
            avg, pas = numeric_column(run.evals, "avg_at_k"), numeric_column(run.evals, "pass_at_k")
            steps = int(reward.index.max()) if not reward.empty else 0
            rows.append(
                {
                    "aggregator": display_name(label),
                    "run": run.run_id,
                    "seed": run.seed,
                    "state": run.state,
                    "steps": f"{steps}/{run.max_steps or '?'}",
                    "final reward": final_value(reward),
                    "final avg@k": float(avg.iloc[-1]) if not avg.empty else math.nan,
                    "final pass@k": float(pas.iloc[-1]) if not pas.empty else math.nan,
                    "monotonicity (eval avg@k)": _safe_score(mono, avg),
                }
            )
    return pd.DataFrame(rows)


def monotonicity_available() -> bool:
    """Whether lab.evaluation provides monotonicity_score (the table shows NaN otherwise)."""
    return _monotonicity() is not None


# -------------------------------------------------------------------------------------------------------
# the verdict: is a difference between aggregators more than seed noise?
# -------------------------------------------------------------------------------------------------------
def comparison_verdict(groups: Groups) -> tuple[dict | None, str]:
    """The verdict of the selected runs and where it comes from.

    When every selected run belongs to one comparison dir holding a ``verdict.json`` (written by
    ``lab compare`` at its end, :func:`lab.runlog.read_verdict`), that file. Otherwise (runs still going, or a
    selection across comparisons) the same computation (:func:`lab.verdict.verdict_from_curves`) on the
    reward curves as they stand, said to be provisional. ``(None, reason)`` with fewer than two labels.
    """
    from lab.runlog import VERDICT, read_verdict
    from lab.verdict import verdict_from_curves

    runs = [r for rs in groups.values() for r in rs]
    if len(groups) < 2:
        return None, "The verdict compares aggregators: select runs of at least two."
    parents = {r.run_dir.parent for r in runs}
    if len(parents) == 1 and not any(r.is_live for r in runs):
        comparison_dir = next(iter(parents))
        stored = read_verdict(comparison_dir)
        pairs = stored["pairs"] if stored is not None else []
        if stored is not None and {p.get(k) for p in pairs for k in ("a", "b")} == set(groups):
            return stored, f"from `{comparison_dir / VERDICT}` (written by `lab compare`)"
    curves = {
        label: {r.seed: _reward_curve(r) for r in rs if r.seed is not None} for label, rs in groups.items()
    }
    live = any(r.is_live for r in runs)
    return verdict_from_curves(curves), (
        "provisional: computed now from the runs as they stand"
        + (" (some are still running)" if live else "")
    )


def _reward_curve(run) -> list[tuple[int, float]]:
    reward = numeric_column(run.metrics, "reward")
    return list(zip(reward.index, reward, strict=True))


def verdict_table(verdict: dict) -> pd.DataFrame:
    """One row per pair and metric: mean difference, both intervals, and what they say."""
    rows = []
    for p in verdict.get("pairs", []):
        rows.append(
            {
                "a": display_name(str(p.get("a"))),
                "b": display_name(str(p.get("b"))),
                "metric": p.get("metric"),
                "mean a − b": p.get("mean_diff"),
                "95% bootstrap CI": _interval(p.get("ci")),
                "95% t CI": _interval(p.get("ci_t")),
                "seeds": p.get("n_seeds"),
                "verdict": "distinguishable"
                if p.get("distinguishable")
                else f"not distinguishable at {p.get('n_seeds')} seeds",
            }
        )
    return pd.DataFrame(rows)


def _interval(value) -> str:
    if not isinstance(value, list) or len(value) != 2 or not all(isinstance(v, (int, float)) for v in value):
        return "–"
    lo, hi = value
    return f"[{lo:+.3f}, {hi:+.3f}]" if math.isfinite(lo) and math.isfinite(hi) else "–"
