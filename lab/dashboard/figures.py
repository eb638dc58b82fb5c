"""Shared plotly helpers: one layout, mean lines with translucent bands, empty-figure placeholders."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from lab.dashboard.colors import color_for, display_name, rgba
from lab.dashboard.data import downsample

MAX_POINTS = 600  # per line; longer curves are bucket-averaged before plotting


def new_figure(title: str, xaxis: str, yaxis: str, *, height: int = 400) -> go.Figure:
    """An empty figure with the dashboard's common layout."""
    fig = go.Figure()
    fig.update_layout(
        title={"text": title, "x": 0.0, "xanchor": "left"},
        xaxis_title=xaxis,
        yaxis_title=yaxis,
        height=height,
        margin={"l": 60, "r": 20, "t": 50, "b": 40},
        legend={"orientation": "h", "yanchor": "top", "y": -0.18, "xanchor": "left", "x": 0.0},
        template="plotly_white",
        hovermode="x unified",
    )
    return fig


def add_band_line(
    fig: go.Figure,
    curve: pd.DataFrame,
    label: str,
    *,
    name: str | None = None,
    dash: str | None = None,
    band: bool = True,
    mode: str = "lines",
    max_points: int = MAX_POINTS,
) -> None:
    """Add ``curve`` (columns step, mean, lo, hi) as a line in ``label``'s colour with a shaded band."""
    if curve.empty:
        return
    curve = downsample(curve, max_points)
    color, name = color_for(label), name or display_name(label)
    if band and (curve["hi"] - curve["lo"]).abs().max() > 0:
        x = list(curve["step"]) + list(curve["step"][::-1])
        y = list(curve["hi"]) + list(curve["lo"][::-1])
        fig.add_trace(
            go.Scatter(
                x=x, y=y, mode="lines", fill="toself", fillcolor=rgba(color, 0.15), line={"width": 0},
                hoverinfo="skip", showlegend=False, legendgroup=name, name=f"{name} band",
            )
        )  # fmt: skip
    fig.add_trace(
        go.Scatter(
            x=curve["step"], y=curve["mean"], mode=mode, name=name, legendgroup=name,
            line={"color": color, "width": 2, "dash": dash},
        )
    )  # fmt: skip


def placeholder(title: str, message: str) -> go.Figure:
    """A figure that says why it is empty (instead of a blank chart)."""
    fig = new_figure(title, "", "", height=220)
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig
