"""View 4, Weights: ΔL row weights against length at one step, and how α reshapes them.

Weights are recomputed from the step's logged lengths with :func:`lab.aggregation.sequence_weights`, over
the whole batch as the official code does, and shown as w_i = x_i / mean_j x_j (1 = an average row).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go

from lab.aggregation import delta_l_row_weights, estimator_stats, sequence_weights
from lab.dashboard.colors import color_for, display_name
from lab.dashboard.data import RunData, SampleBatch, label_curve
from lab.dashboard.figures import add_band_line, new_figure, placeholder

REFERENCE_ALPHAS = (0.0, 0.5, 0.75, 1.0)


def effective_max_length(lengths: np.ndarray, configured: float | None) -> float:
    """The constant M: the configured max completion length, never below the longest response."""
    longest = float(lengths.max()) if lengths.size else 1.0
    return max(configured or longest, longest, 1.0)


def relative_weights(lengths: np.ndarray, alpha: float, max_length: float) -> np.ndarray:
    """ΔL(α) row weights exactly as the trainer applies them (batch scope, mean 1 without empty rows)."""
    return delta_l_row_weights(lengths.tolist(), alpha=alpha, max_length=max_length).numpy()


def weights_figure(batch: SampleBatch, alpha: float, max_length: float | None, *, logged: bool) -> go.Figure:
    """Relative ΔL weight against L_i for reference α values and the chosen ``alpha``."""
    L = batch.lengths
    M = effective_max_length(L, max_length)
    order = np.argsort(L)
    fig = new_figure(f"ΔL row weight vs length at step {batch.step} (batch of {L.size})", "L_i (tokens)",
                     "w_i = x_i / mean(x)")  # fmt: skip
    for ref in REFERENCE_ALPHAS:
        if abs(ref - alpha) < 1e-9:
            continue
        fig.add_trace(
            go.Scatter(
                x=L[order], y=relative_weights(L, ref, M)[order], mode="lines", name=f"α = {ref:g}",
                line={"color": "rgba(120,120,120,0.7)", "width": 1, "dash": "dot"},
            )
        )  # fmt: skip
    fig.add_trace(
        go.Scatter(
            x=L[order], y=relative_weights(L, alpha, M)[order], mode="lines+markers", name=f"α = {alpha:g} (chosen)",
            line={"color": color_for("delta_l"), "width": 3}, marker={"size": 5},
        )
    )  # fmt: skip
    if logged and batch.weights is not None:
        fig.add_trace(
            go.Scatter(
                x=L, y=batch.weights, mode="markers", name="logged w_i (what the loss used)",
                marker={"symbol": "x", "size": 8, "color": "black"},
            )
        )  # fmt: skip
    fig.update_layout(hovermode="closest")
    fig.update_yaxes(type="log")
    return fig


def alpha_sweep(lengths: np.ndarray, max_length: float | None, alphas: np.ndarray | None = None) -> dict:
    """Per α: the weight share of the longer half of the batch, and Var relative to α = 0 (Dr. GRPO)."""
    alphas = np.linspace(0.0, 1.5, 31) if alphas is None else alphas
    M = effective_max_length(lengths, max_length)
    long_half = lengths >= np.median(lengths)
    base = estimator_stats(lengths.tolist(), "delta_l", alpha=0.0, max_length=M)["variance"]
    share, var_ratio = [], []
    for a in alphas:
        x = sequence_weights(lengths.tolist(), "delta_l", alpha=float(a), max_length=M).numpy()
        share.append(float(x[long_half].sum() / x.sum()))
        var = estimator_stats(lengths.tolist(), "delta_l", alpha=float(a), max_length=M)["variance"]
        var_ratio.append(var / base if base > 0 else np.nan)
    return {"alpha": alphas, "long_share": np.array(share), "variance_ratio": np.array(var_ratio)}


def alpha_sweep_figure(batch: SampleBatch, max_length: float | None, alpha: float) -> go.Figure:
    """How α moves weight to short answers and lowers the variance (on this step's lengths)."""
    sweep = alpha_sweep(batch.lengths, max_length)
    fig = new_figure(f"How α changes ΔL at step {batch.step}", "α", "ratio")
    fig.add_trace(go.Scatter(x=sweep["alpha"], y=sweep["long_share"], name="weight share of the longer half",
                             line={"color": color_for("delta_l"), "width": 2}))  # fmt: skip
    fig.add_trace(go.Scatter(x=sweep["alpha"], y=sweep["variance_ratio"], name="Var(ĝ) / Var at α=0 (Dr. GRPO)",
                             line={"color": color_for("dr_grpo"), "width": 2}))  # fmt: skip
    fig.add_vline(x=alpha, line={"dash": "dash", "color": "grey"})
    fig.add_vline(x=1.0, line={"dash": "dot", "color": "black"}, annotation_text="α=1: min variance")
    return fig


def alpha_over_steps_figure(groups: Mapping[str, Sequence[RunData]], *, window: int = 1) -> go.Figure:
    """``delta_l/alpha`` over steps, one line per run: constant for a fixed α, moving with ``--alpha auto``."""
    fig = new_figure("ΔL's α over steps (auto: re-estimated from the probes)", "step", "α")
    for label, runs in groups.items():
        for run in runs:
            curve = label_curve([run], "delta_l/alpha", window=window)
            add_band_line(fig, curve, label, name=f"{display_name(label)} · {run.run_id}", band=False)
    if not fig.data:
        return placeholder("ΔL's α over steps", "No delta_l/alpha in metrics.jsonl (only ΔL runs log it).")
    return fig
