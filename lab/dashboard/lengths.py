"""View 2, Lengths: per-step length distributions, violins over time, mean/max length, truncation rate."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go

from lab.dashboard.colors import color_for, display_name
from lab.dashboard.data import RunData, label_curve
from lab.dashboard.figures import add_band_line, new_figure, placeholder
from lab.dashboard.safe import plotly_text

Groups = Mapping[str, Sequence[RunData]]

# metrics.jsonl fallbacks (TRL names) when samples.jsonl is missing
_FALLBACK = {
    "mean_length": "completions/mean_length",
    "max_length": "completions/max_length",
    "truncation_rate": "completions/clipped_ratio",
}


def all_sample_steps(runs: Sequence[RunData]) -> list[int]:
    """Sorted union of the steps that have a samples batch."""
    return sorted({s for r in runs for s in r.sample_steps})


def distribution_figure(runs: Sequence[RunData], step: int) -> go.Figure:
    """Violin + box of completion lengths at ``step``, one per run, coloured by aggregator."""
    fig = new_figure(f"Completion lengths at step {step}", "run", "length (tokens)")
    for run in runs:
        batch = run.batch_at(step)
        if batch is None:
            continue
        fig.add_trace(
            go.Violin(
                y=batch.lengths, x=[run.run_id] * batch.lengths.size, name=display_name(run.label),
                legendgroup=run.label, line_color=color_for(run.label), box_visible=True,
                meanline_visible=True, points="all", pointpos=0, spanmode="hard", jitter=0.3, marker_size=3,
                hovertemplate=f"{plotly_text(run.run_id)} (step {batch.step})<br>length %{{y}}<extra></extra>",
            )
        )  # fmt: skip
    if not fig.data:
        return placeholder("Completion lengths", "No samples logged yet (samples.jsonl).")
    fig.update_layout(hovermode="closest", showlegend=False)
    return fig


def violin_over_time(groups: Groups, *, slices: int = 10) -> go.Figure:
    """Length distribution at ``slices`` evenly spaced steps, grouped violins per aggregator (seeds pooled)."""
    steps = all_sample_steps([r for runs in groups.values() for r in runs])
    if not steps:
        return placeholder("Lengths over time", "No samples logged yet (samples.jsonl).")
    picks = sorted({steps[int(i)] for i in np.linspace(0, len(steps) - 1, min(slices, len(steps)))})
    fig = new_figure("Length distribution over time (seeds pooled)", "step", "length (tokens)", height=400)
    for label, runs in groups.items():
        xs, ys = [], []
        for step in picks:
            for run in runs:
                batch = run.batch_at(step)
                if batch is not None and batch.step == step:
                    xs.extend([str(step)] * batch.lengths.size)
                    ys.append(batch.lengths)
        if ys:
            fig.add_trace(
                go.Violin(
                    x=xs, y=np.concatenate(ys), name=display_name(label), legendgroup=label,
                    line_color=color_for(label), points=False, spanmode="hard", scalemode="width",
                    meanline_visible=True, hoverinfo="skip",
                )
            )  # fmt: skip
    fig.update_layout(violinmode="group", violingap=0.15, violingroupgap=0.05, hovermode="closest")
    fig.update_xaxes(type="category")
    return fig


# what each curve cannot leave: lengths are >= 0 tokens, the truncation rate is a fraction
_BOUNDS = {"mean_length": (0.0, np.inf), "max_length": (0.0, np.inf), "truncation_rate": (0.0, 1.0)}


def _length_curve(runs: Sequence[RunData], key: str, window: int):
    curve = label_curve(runs, key, source="lengths", window=window, bounds=_BOUNDS[key])
    if curve.empty:
        curve = label_curve(runs, _FALLBACK[key], window=window, bounds=_BOUNDS[key])
    return curve


def mean_max_figure(groups: Groups, *, window: int = 1) -> go.Figure:
    """Mean (solid, 95% band over seeds) and max (dotted) completion length per aggregator."""
    fig = new_figure("Mean (solid) and max (dotted) completion length", "step", "length (tokens)")
    for label, runs in groups.items():
        add_band_line(fig, _length_curve(runs, "mean_length", window), label, band=len(runs) > 1)
        add_band_line(
            fig, _length_curve(runs, "max_length", window), label, name=f"{display_name(label)} max",
            dash="dot", band=False,
        )  # fmt: skip
    if not fig.data:
        return placeholder("Completion length", "No lengths logged yet.")
    return fig


def truncation_figure(groups: Groups, *, window: int = 1) -> go.Figure:
    """Fraction of completions that hit the max completion length, per aggregator."""
    fig = new_figure("Truncation rate (completions at the length limit)", "step", "fraction truncated")
    for label, runs in groups.items():
        add_band_line(fig, _length_curve(runs, "truncation_rate", window), label, band=len(runs) > 1)
    if not fig.data:
        return placeholder("Truncation rate", "No lengths logged yet.")
    fig.update_yaxes(rangemode="tozero")
    return fig
