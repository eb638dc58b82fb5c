"""View 5, Estimator playground: no run needed. Every number comes from :mod:`lab.aggregation`.

Draw a group of lengths, then for each aggregator show its weights x_i, its relative scale E = M·Σx_i
(1 = unbiased), Var(ĝ)·M²/V, CV, and a Monte Carlo histogram of M·ĝ under Var(g_i) = V·L_i.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from lab.aggregation import METHODS, estimator_stats, sample_lengths, sequence_weights, simulate_estimators
from lab.dashboard.colors import color_for, display_name
from lab.dashboard.figures import new_figure


@dataclass(frozen=True)
class PlaygroundSettings:
    """The playground's sliders."""

    alpha: float = 1.0
    group_size: int = 8
    distribution: str = "uniform"
    min_length: int = 50
    max_length: int = 3000
    n_trials: int = 4000
    redraw_lengths: bool = False  # redraw the lengths in every Monte Carlo trial (shows the bias)
    token_variance: float = 1e-3  # V in Var(g_i) = V·L_i, with |∇J| = 1
    seed: int = 0

    @property
    def M(self) -> float:
        """The constant M: the max completion length."""
        return float(self.max_length)


def method_label(method: str, alpha: float) -> str:
    return f"ΔL α={alpha:g}" if method == "delta_l" else display_name(method)


def draw_group(s: PlaygroundSettings) -> np.ndarray:
    """One group of G lengths from the chosen distribution."""
    kw = {"group_size": s.group_size, "min_length": s.min_length, "max_length": s.max_length, "seed": s.seed}
    return sample_lengths(s.distribution, n_groups=1, **kw).numpy()[0]


def simulate(s: PlaygroundSettings, lengths: np.ndarray) -> dict:
    """Monte Carlo of all four aggregators on the same noise draws."""
    if s.redraw_lengths:
        L = sample_lengths(s.distribution, group_size=s.group_size, n_groups=s.n_trials, min_length=s.min_length,
                           max_length=s.max_length, seed=s.seed + 1)  # fmt: skip
    else:
        L = lengths.tolist()
    return simulate_estimators(
        L, alpha=s.alpha, max_length=s.M, n_trials=s.n_trials, token_variance=s.token_variance, seed=s.seed
    )


def stats_table(s: PlaygroundSettings, lengths: np.ndarray, sim: dict) -> pd.DataFrame:
    """Closed form (on the drawn group) next to Monte Carlo, per aggregator."""
    rows = []
    for method in METHODS:
        st = estimator_stats(
            lengths.tolist(), method, alpha=s.alpha, max_length=s.M, token_variance=s.token_variance
        )
        mc = sim[method]
        rows.append(
            {
                "aggregator": method_label(method, s.alpha),
                "E = M·Σx (1 = unbiased)": st["relative_scale"],
                "Var·M²/V": st["variance"] * s.M**2 / s.token_variance,
                "CV": st["cv"],
                "MC mean of M·ĝ": mc["mean"] * s.M,
                "MC Var·M²/V": mc["variance"] * s.M**2 / s.token_variance,
                "MC CV": mc["cv"],
            }
        )
    return pd.DataFrame(rows)


def weights_figure(s: PlaygroundSettings, lengths: np.ndarray) -> go.Figure:
    """Each aggregator's weight M·x_i against L_i on the drawn group."""
    order = np.argsort(lengths)
    fig = new_figure(f"Weights M·x_i on one group of G={s.group_size}", "L_i (tokens)", "M·x_i")
    for method in METHODS:
        x = sequence_weights(lengths.tolist(), method, alpha=s.alpha, max_length=s.M).numpy() * s.M
        fig.add_trace(
            go.Scatter(
                x=lengths[order], y=x[order], mode="lines+markers", name=method_label(method, s.alpha),
                line={"color": color_for(method), "width": 2},
            )
        )  # fmt: skip
    fig.update_layout(hovermode="closest")
    fig.update_yaxes(type="log")
    return fig


def histogram_figure(s: PlaygroundSettings, sim: dict) -> go.Figure:
    """Monte Carlo distribution of M·ĝ per aggregator; an unbiased one centres on M·E[ĝ] = 1 (|∇J| = 1)."""
    kind = "lengths redrawn per trial" if s.redraw_lengths else "fixed lengths"
    fig = new_figure(f"Monte Carlo: M·ĝ over {s.n_trials} trials ({kind})", "M·ĝ", "count", height=400)
    for method in METHODS:
        est = np.asarray(sim[method]["estimates"]) * s.M
        fig.add_trace(
            go.Histogram(
                x=est, name=method_label(method, s.alpha), opacity=0.5, nbinsx=60,
                marker={"color": color_for(method)},
            )
        )  # fmt: skip
    fig.add_vline(x=1.0, line={"dash": "dash", "color": "black"}, annotation_text="∇J (unbiased)")
    fig.update_layout(barmode="overlay", hovermode="closest")
    return fig


def lengths_figure(s: PlaygroundSettings, lengths: np.ndarray) -> go.Figure:
    """The drawn lengths, as a strip."""
    fig = new_figure(f"The drawn group ({s.distribution}, {s.min_length}..{s.max_length})", "L_i (tokens)", "",
                     height=160)  # fmt: skip
    fig.add_trace(go.Scatter(x=np.sort(lengths), y=np.zeros(lengths.size), mode="markers", name="L_i",
                             marker={"size": 10, "color": "#444"}))  # fmt: skip
    fig.update_yaxes(visible=False)
    fig.update_layout(showlegend=False, margin={"t": 40, "b": 40})
    return fig
