"""Text from a run dir is data, never markup.

Anything the dashboard shows that it read from disk (dir names, states, errors, labels, config values) goes
through :func:`md` before it reaches Streamlit's markdown, and every plotly figure goes through
:func:`sanitize_figure` before it is drawn (plotly renders a subset of HTML in names, titles and tick labels).
Colours and layout come from the lab's own values (:func:`css_color` refuses anything else).
"""

from __future__ import annotations

import html
import re
import string
from typing import Any

import plotly.graph_objects as go

_HTML = {"<": "&lt;", ">": "&gt;", "&": "&amp;", '"': "&quot;", "'": "&#39;"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]+")
_HEX = re.compile(r"^#[0-9a-fA-F]{6}$")
MAX_SHOWN = 500  # characters of one value shown in markdown; the rest is cut with an ellipsis


def md(value: object, *, limit: int = MAX_SHOWN) -> str:
    """``value`` as literal text inside Streamlit markdown (with or without ``unsafe_allow_html``).

    HTML's special characters become entities and every other ASCII punctuation mark is backslash-escaped
    (CommonMark allows that for all of them), so no emphasis, link, image, code span, heading, directive
    (``:red[...]``) or tag can start; line breaks become spaces so no block can start either.
    """
    text = _CONTROL.sub(" ", str(value))
    if len(text) > limit:
        text = text[:limit] + "…"
    out = []
    for ch in text:
        if ch in _HTML:
            out.append(_HTML[ch])
        elif ch in string.punctuation:
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def css_color(value: str) -> str:
    """A ``#rrggbb`` colour of the lab's palette, or ValueError: nothing else goes into a style."""
    if not isinstance(value, str) or not _HEX.match(value):
        raise ValueError(f"not a #rrggbb colour: {value!r}")
    return value


def plotly_text(value: Any) -> Any:
    """A string for plotly with its pseudo-HTML escaped; other values unchanged."""
    return html.escape(value, quote=False) if isinstance(value, str) else value


def _escape_seq(values: Any) -> Any:
    if isinstance(values, str):
        return plotly_text(values)
    if isinstance(values, (list, tuple)) and any(isinstance(v, str) for v in values):
        return [plotly_text(v) for v in values]
    return values


def sanitize_figure(fig: go.Figure) -> go.Figure:
    """Escape every text a figure holds: title, axis titles, annotations, trace names and legend groups, text
    and categories.

    Hover templates are the lab's own (they carry ``<br>`` and ``%{y}``) and are left as they are; the code
    that builds one escapes any data it puts in with :func:`plotly_text`.
    """
    layout = fig.layout
    if layout.title and layout.title.text:
        layout.title.text = plotly_text(layout.title.text)
    for axis_name in [k for k in layout.to_plotly_json() if k.startswith(("xaxis", "yaxis"))]:
        axis = layout[axis_name]
        if axis.title and axis.title.text:
            axis.title.text = plotly_text(axis.title.text)
    for annotation in layout.annotations or ():
        if annotation.text:
            annotation.text = plotly_text(annotation.text)
    for trace in fig.data:
        if getattr(trace, "name", None):
            trace.name = plotly_text(trace.name)
        if getattr(trace, "legendgroup", None):  # not shown, but it is data too: no raw markup in the figure
            trace.legendgroup = plotly_text(trace.legendgroup)
        for field in ("text", "hovertext", "x", "y", "labels"):
            if field in trace and trace[field] is not None:
                trace[field] = _escape_seq(trace[field])
    return fig
