"""View 1, Overview: the verdict (a picture, then its table), reward curves per aggregator, eval Avg@k /
Pass@k, a table of final scores."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from lab.dashboard.colors import display_name
from lab.dashboard.data import RunData, final_value, label_curve, numeric_column, reward_range
from lab.dashboard.figures import add_band_line, new_figure, placeholder
from lab.evaluation import monotonicity_score

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


def _safe_score(fn: Callable, curve: pd.Series) -> float:
    """``fn(steps, values)`` on a step-indexed curve; NaN when too short or invalid."""
    if len(curve) < 2:
        return float("nan")
    try:
        return float(fn(curve.index.tolist(), curve.tolist()))
    except (ValueError, TypeError, ZeroDivisionError):
        return float("nan")


def scores_table(groups: Groups) -> pd.DataFrame:
    """One row per run: state, progress, final reward (last 10% of steps), final eval, monotonicity."""
    mono = monotonicity_score
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


# -------------------------------------------------------------------------------------------------------
# the verdict: is a difference between aggregators more than seed noise?
# -------------------------------------------------------------------------------------------------------
def comparison_verdict(groups: Groups) -> tuple[dict | None, str]:
    """The verdict of the selected runs and where it comes from.

    When every selected run belongs to one comparison dir holding a ``verdict.json`` (written by
    ``lab compare`` at its end, :func:`lab.runlog.read_verdict`) with the corrected decision, that file.
    Otherwise (runs still going, a selection across comparisons, or a file written before the verdict was
    corrected for multiple tests) the same computation (:func:`lab.verdict.verdict_from_curves`) on the runs
    as they stand, said to be provisional. ``(None, reason)`` with fewer than two labels.
    """
    from lab.runlog import VERDICT, read_verdict

    runs = [r for rs in groups.values() for r in rs]
    if len(groups) < 2:
        return None, "The verdict compares aggregators: select runs of at least two."
    parents = {r.run_dir.parent for r in runs}
    note = ""
    if len(parents) == 1 and not any(r.is_live for r in runs):
        comparison_dir = next(iter(parents))
        stored = read_verdict(comparison_dir)
        pairs = stored["pairs"] if stored is not None else []
        if stored is not None and {p.get(k) for p in pairs for k in ("a", "b")} == set(groups):
            if all("p_holm" in p for p in pairs):
                return stored, f"from `{comparison_dir / VERDICT}` (written by `lab compare`)"
            note = f" (`{comparison_dir / VERDICT}` predates the multiple-test correction)"
    live = any(r.is_live for r in runs)
    return live_verdict(groups), (
        "provisional: computed now from the runs as they stand"
        + (" (some are still running)" if live else "")
        + note
    )


def live_verdict(groups: Groups) -> dict:
    """:func:`lab.verdict.verdict_from_curves` of the runs' reward curves and end-of-run evaluations."""
    from lab.verdict import add_end_values, verdict_from_curves

    curves: dict[str, dict[int, list[tuple[int, float]]]] = {}
    end_values: dict[str, dict[str, dict[int, float]]] = {}
    for label, rs in groups.items():
        for run in rs:
            if run.seed is None:
                continue
            curves.setdefault(label, {})[run.seed] = _reward_curve(run)
            add_end_values(end_values, label, run.seed, run.reader)
    return verdict_from_curves(curves, end_values=end_values)


def _reward_curve(run) -> list[tuple[int, float]]:
    reward = numeric_column(run.metrics, "reward")
    return list(zip(reward.index, reward, strict=True))


def verdict_table(verdict: dict) -> pd.DataFrame:
    """One row per pair and metric: mean difference, intervals, raw and Holm p-values, MDE, the decision."""
    from lab.verdict import pair_decision

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
                "p (raw)": _number(p.get("p_value")),
                "p (Holm)": _number(p.get("p_holm")),
                "MDE": _number(p.get("mde")),
                "seeds": p.get("n_seeds"),
                "verdict": "distinguishable" if p.get("distinguishable") else pair_decision(p),
            }
        )
    return pd.DataFrame(rows)


def verdict_summary(verdict: dict) -> tuple[int, int]:
    """``(pairs marked distinguishable after the correction, tests)``."""
    pairs = verdict.get("pairs", [])
    return sum(bool(p.get("distinguishable")) for p in pairs), len(pairs)


def mde_range(verdict: dict) -> tuple[float, float] | None:
    """The smallest and largest finite MDE over the pairs (None without any)."""
    mdes = [m for m in (_finite_or_none(p.get("mde")) for p in verdict.get("pairs", [])) if m is not None]
    return (min(mdes), max(mdes)) if mdes else None


DECISION_COLORS = {True: "#d62728", False: "#7f7f7f"}  # distinguishable: red, filled; otherwise grey, open
MDE_BAND_COLOR = "rgba(31,119,180,0.15)"


def verdict_figure(verdict: dict) -> go.Figure:
    """Each pair's mean difference a − b with its family-wise interval, one panel per metric.

    The interval is the Student-t interval at the Bonferroni level 1 − α/m (``ci_t_family``): every one of
    the m intervals covers its true difference at once with probability ≥ 1 − α, and one that excludes 0 is
    always marked (Holm marks at least those, sometimes more). The shaded band is ± the pair's MDE: a true
    difference inside it is one these seeds would miss more than 20% of the time.
    """
    pairs = [p for p in verdict.get("pairs", []) if isinstance(p, dict)]
    if not pairs:
        return placeholder("Verdict", "No pairs to compare.")
    metrics = list(dict.fromkeys(str(p.get("metric")) for p in pairs))
    fig = make_subplots(rows=1, cols=len(metrics), shared_yaxes=True, subplot_titles=metrics,
                        horizontal_spacing=0.04)  # fmt: skip
    for col, metric in enumerate(metrics, start=1):
        rows = [p for p in pairs if str(p.get("metric")) == metric]
        names = [f"{display_name(str(p.get('a')))} − {display_name(str(p.get('b')))}" for p in rows]
        mde = [_finite_or_none(p.get("mde")) for p in rows]
        if any(m is not None for m in mde):
            fig.add_trace(
                go.Bar(
                    y=names, x=[2 * m if m is not None else None for m in mde],
                    base=[-m if m is not None else None for m in mde], orientation="h",
                    marker={"color": MDE_BAND_COLOR, "line": {"width": 0}}, hoverinfo="skip",
                    name="± MDE (80% power)", legendgroup="mde", showlegend=col == 1,
                ),
                row=1, col=col,
            )  # fmt: skip
        for decided in (True, False):
            chosen = [
                (n, p) for n, p in zip(names, rows, strict=True) if bool(p.get("distinguishable")) == decided
            ]
            if chosen:
                _add_pair_points(fig, chosen, decided, col)
        fig.add_vline(x=0, line={"color": "#333333", "width": 1}, row=1, col=col)
    n_yes, n_tests = verdict_summary(verdict)
    fig.update_layout(
        title={"text": f"Verdict: mean paired difference a − b over {verdict.get('seeds', 0)} seed(s); "
               f"{n_yes} of {n_tests} distinguishable after Holm", "x": 0.0, "xanchor": "left"},
        height=190 + 34 * len({f"{p.get('a')}|{p.get('b')}" for p in pairs}),
        margin={"l": 60, "r": 20, "t": 70, "b": 100}, template="plotly_white", barmode="overlay",
        legend={"orientation": "h", "yanchor": "top", "y": -0.3, "xanchor": "left", "x": 0.0},
        hovermode="closest",
    )  # fmt: skip
    fig.update_yaxes(autorange="reversed")
    fig.update_xaxes(title_text="a − b", zeroline=False)
    return fig


def _add_pair_points(fig: go.Figure, chosen: list[tuple[str, dict]], decided: bool, col: int) -> None:
    names = [n for n, _ in chosen]
    rows = [p for _, p in chosen]
    mean = [_finite_or_none(p.get("mean_diff")) for p in rows]
    interval = [_pair_interval(p) for p in rows]
    plus = [None if m is None or hi is None else hi - m for m, (_, hi) in zip(mean, interval, strict=True)]
    minus = [None if m is None or lo is None else m - lo for m, (lo, _) in zip(mean, interval, strict=True)]
    custom = [[_finite_or_none(p.get(k)) for k in ("p_value", "p_holm", "mde")] for p in rows]
    color = DECISION_COLORS[decided]
    fig.add_trace(
        go.Scatter(
            x=mean, y=names, mode="markers", customdata=custom,
            error_x={"type": "data", "symmetric": False, "array": plus, "arrayminus": minus, "color": color},
            marker={"color": color, "size": 10, "symbol": "circle" if decided else "circle-open",
                    "line": {"width": 2, "color": color}},
            name="distinguishable (Holm)" if decided else "not detected", legendgroup=str(decided),
            showlegend=col == 1,
            hovertemplate="%{y}<br>mean a − b %{x:+.3f}<br>p raw %{customdata[0]:.3g}, Holm %{customdata[1]:.3g}"
            "<br>MDE ± %{customdata[2]:.3f}<extra></extra>",
        ),
        row=1, col=col,
    )  # fmt: skip


def _pair_interval(pair: dict) -> tuple[float | None, float | None]:
    """The family-wise interval, or the 95% t interval of a verdict stored without one."""
    for key in ("ci_t_family", "ci_t"):
        value = pair.get(key)
        if isinstance(value, list) and len(value) == 2:
            lo, hi = (_finite_or_none(v) for v in value)
            if lo is not None and hi is not None:
                return lo, hi
    return None, None


def _finite_or_none(value) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def _number(value) -> float:
    return float(value) if _finite_or_none(value) is not None else math.nan


def _interval(value) -> str:
    if not isinstance(value, list) or len(value) != 2 or not all(isinstance(v, (int, float)) for v in value):
        return "–"
    lo, hi = value
    return f"[{lo:+.3f}, {hi:+.3f}]" if math.isfinite(lo) and math.isfinite(hi) else "–"
