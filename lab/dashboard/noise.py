"""View 3, Gradient noise: theoretical CV per aggregator (the counterfactual ``cv/<method>`` columns),
empirical CV from gradient probes, and Var(g_i) against L_i with the fitted line.

The theoretical CVs are those of :func:`lab.aggregation.estimator_stats` under Var(g_i) = V·L_i with
V = |∇J| = 1: their absolute level is a unit choice, the ratios between aggregators are the point.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
import torch

from lab.aggregation import METHODS
from lab.aggregators import AGGREGATORS
from lab.dashboard.colors import color_for, display_name
from lab.dashboard.data import RunData, label_curve
from lab.dashboard.figures import add_band_line, new_figure, placeholder
from lab.probes import least_squares

Groups = Mapping[str, Sequence[RunData]]


def counterfactual_figure(run: RunData, *, window: int = 1) -> go.Figure:
    """The CV every aggregator would have had on this run's lengths (lines) and probe CVs (diamonds)."""
    title = f"{run.run_id}: theoretical CV per aggregator on this run's lengths"
    fig = new_figure(title, "step", "CV = √Var(ĝ) / |E ĝ|  (V = |∇J| = 1)")
    for method in METHODS:  # GRPO's CV equals ΔL(α=1)'s, DAPO's equals Dr. GRPO's: dash them to show both
        dash = "dash" if method in ("grpo", "dapo") else None
        add_band_line(fig, label_curve([run], f"cv/{method}", window=window), method, band=False, dash=dash)
    for method, (steps, values) in probe_cvs(run).items():
        fig.add_trace(
            go.Scatter(
                x=steps, y=values, mode="markers", name=f"{display_name(method)} (probe)",
                marker={"symbol": "diamond", "size": 10, "color": color_for(method),
                        "line": {"width": 1, "color": "black"}},
            )
        )  # fmt: skip
    if not fig.data:
        return placeholder(title, "No cv/<method> columns or probes logged in this run.")
    return fig


def own_cv_figure(groups: Groups, *, window: int = 1) -> go.Figure:
    """Each run's CV under its own aggregator (``cv/<aggregator>``), mean over seeds per label."""
    fig = new_figure("Theoretical CV of each run's own aggregator", "step", "CV (V = |∇J| = 1)")
    undefined = []  # TRL loss types whose weights x_i the lab does not know (lab.aggregators)
    for label, runs in groups.items():
        known = AGGREGATORS.get(runs[0].aggregator)
        if known is None or not known.weights_known:
            undefined.append(display_name(label))
            continue
        column = f"cv/{runs[0].aggregator}"
        add_band_line(fig, label_curve(runs, column, window=window), label, band=len(runs) > 1)
    note = f"Not defined for this loss: {', '.join(undefined)}." if undefined else ""
    if not fig.data:
        return placeholder("Theoretical CV", note or "No cv/<method> columns in metrics.jsonl yet.")
    if note:
        fig.add_annotation(
            text=note, showarrow=False, x=1.0, y=1.08, xref="paper", yref="paper", xanchor="right"
        )
    return fig


def probe_cvs(run: RunData) -> dict[str, tuple[list[int], list[float]]]:
    """``{method: (steps, measured CVs)}`` from probes.jsonl (malformed records skipped)."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for probe in run.probes:
        cv, step = probe.get("cv"), probe.get("step")
        if not isinstance(cv, dict) or not isinstance(step, (int, float)):
            continue
        for method, value in cv.items():
            if isinstance(value, (int, float)) and np.isfinite(value):
                steps, values = out.setdefault(str(method), ([], []))
                steps.append(int(step))
                values.append(float(value))
    return out


def valid_probes(run: RunData) -> list[dict]:
    """Probe records with matching ``lengths`` and ``grad_variances`` lists (at least 2 points; null
    entries, rows the probe could not estimate, are dropped when plotted)."""
    good = []
    for probe in run.probes:
        lengths, variances = probe.get("lengths"), probe.get("grad_variances")
        if isinstance(lengths, list) and isinstance(variances, list) and len(lengths) == len(variances) >= 2:
            try:
                np.asarray(lengths, dtype=float), np.asarray(variances, dtype=float)
            except (TypeError, ValueError):
                continue
            good.append(probe)
    return good


def fit_line(lengths: np.ndarray, variances: np.ndarray, probe: dict) -> tuple[float, float, float]:
    """(slope, intercept, correlation): the logged fit when present, else :func:`lab.probes.least_squares`
    on the points (a flat line at the mean when all lengths are equal)."""
    slope, intercept, corr = probe.get("slope"), probe.get("intercept"), probe.get("correlation")
    fit = least_squares(
        torch.as_tensor(lengths, dtype=torch.float64), torch.as_tensor(variances, dtype=torch.float64)
    )
    if not all(isinstance(v, (int, float)) for v in (slope, intercept)):
        slope, intercept = fit[:2] if np.ptp(lengths) > 0 else (0.0, variances.mean())
    if not isinstance(corr, (int, float)):
        corr = fit[2]
    return float(slope), float(intercept), float(corr)


def variance_scatter(run: RunData, probe: dict) -> go.Figure:
    """The probe's unbiased per-row estimates of tr Var(g_i) (:func:`lab.probes.grad_variances`) against
    L_i at one probe, with the fitted line Var = a + b·L."""
    L = np.asarray(probe["lengths"], dtype=float)
    var = np.asarray([np.nan if v is None else v for v in probe["grad_variances"]], dtype=float)
    finite = np.isfinite(L) & np.isfinite(var)
    L, var = L[finite], var[finite]
    if L.size < 2:
        return placeholder(
            f"{run.run_id}, step {probe.get('step')}", "Fewer than 2 rows with a variance estimate."
        )
    slope, intercept, corr = fit_line(L, var, probe)
    exponent = probe.get("exponent")
    k = f", k = {exponent:.2f}" if isinstance(exponent, (int, float)) and np.isfinite(exponent) else ""
    title = (
        f"{run.run_id}, step {probe.get('step')}: Var(g_i) vs L_i  (r = {corr:.2f}, slope = {slope:.3g}{k})"
    )
    return variance_fit_figure(
        L, var, slope=slope, intercept=intercept, title=title, color=color_for(run.label)
    )


def variance_fit_figure(
    lengths: Sequence[float] | np.ndarray,
    variances: Sequence[float] | np.ndarray,
    *,
    slope: float,
    intercept: float,
    title: str,
    exponent: float | None = None,
    scale: float | None = None,
    labels: Sequence[str] | None = None,
    color: str | None = None,
    yaxis: str = "unbiased estimate of tr Var(g_i)",
) -> go.Figure:
    """Per-row variance estimates against L_i (one marker colour per label, e.g. per prompt kind), the
    fitted line a + b·L and, when ``exponent`` and ``scale`` are given, the power law c·L^k.

    Used by the dashboard's probe view, notebook 01 and ``scripts/render_docs.py`` (the stored
    measurement of ``benchmarks/variance_vs_length.py``)."""
    L = np.asarray(lengths, dtype=float)
    var = np.asarray(variances, dtype=float)
    fig = new_figure(title, "L_i (tokens)", yaxis)
    groups = list(labels) if labels is not None else ["completions"] * L.size
    for label in dict.fromkeys(groups):
        rows = np.array([g == label for g in groups])
        marker = {"size": 8, "opacity": 0.8}
        if color is not None and labels is None:
            marker["color"] = color
        fig.add_trace(go.Scatter(x=L[rows], y=var[rows], mode="markers", name=str(label), marker=marker))
    xs = np.linspace(L.min(), L.max(), 60)
    fig.add_trace(
        go.Scatter(
            x=xs, y=slope * xs + intercept, mode="lines", name=f"fit a + b·L (b = {slope:.3g})",
            line={"color": "black", "dash": "dash"},
        )
    )  # fmt: skip
    if exponent is not None and scale is not None and np.isfinite(exponent) and np.isfinite(scale):
        fig.add_trace(
            go.Scatter(
                x=xs, y=scale * xs**exponent, mode="lines", name=f"fit c·L^k (k = {exponent:.2f})",
                line={"color": "grey", "dash": "dot"},
            )
        )  # fmt: skip
    fig.add_hline(y=0, line={"color": "lightgrey", "width": 1})
    fig.update_layout(hovermode="closest")
    return fig


# (a, b, the colour to draw the pair in, dashed): the two collinear pairs solid, the cross pairs dashed
GRADIENT_PAIRS = (
    ("grpo", "delta_l", "delta_l", None),
    ("dapo", "dr_grpo", "dr_grpo", None),
    ("grpo", "dapo", "grpo", "dash"),
    ("dr_grpo", "delta_l", "dapo", "dash"),
)


def _pair_figure(run: RunData, kind: str, title: str, yaxis: str, window: int) -> go.Figure:
    fig = new_figure(f"{run.run_id}: {title}", "step", yaxis)
    for a, b, colour, dash in GRADIENT_PAIRS:
        curve = label_curve([run], f"agg_grad/{kind}/{a}~{b}", window=window)
        add_band_line(
            fig, curve, colour, name=f"{display_name(a)} vs {display_name(b)}", band=False, dash=dash
        )
    if not fig.data:
        return placeholder(
            title, "No agg_grad/* metrics in this run (lab compare --compare-gradients-every K)."
        )
    return fig


def gradient_cosine_figure(run: RunData, *, window: int = 1) -> go.Figure:
    """Cosine between pairs of aggregated gradients on each step's batch (``agg_grad/cos/<a>~<b>``)."""
    return _pair_figure(run, "cos", "cosine of aggregated gradients", "cos(ĝ_a, ĝ_b)", window)


def gradient_norm_ratio_figure(run: RunData, *, window: int = 1) -> go.Figure:
    """‖ĝ_a‖ / ‖ĝ_b‖ on each step's batch (``agg_grad/norm_ratio/<a>~<b>``): the per-step scalar."""
    return _pair_figure(run, "norm_ratio", "norm ratio of aggregated gradients", "‖ĝ_a‖ / ‖ĝ_b‖", window)
