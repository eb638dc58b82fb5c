"""One colour per aggregator label, the same in every chart.

Every aggregator of :mod:`lab.aggregators` has its fixed colour; any other label (``delta_l-a0.75``, a custom run) gets a
deterministic colour from a hash of its name, so it keeps its colour across reruns and sessions.
ΔL variants with another α stay in ΔL's green family.
"""

from __future__ import annotations

import hashlib

from lab.aggregators import AGGREGATORS

FIXED_COLORS: dict[str, str] = {a.name: a.color for a in AGGREGATORS.values()}  # lab.aggregators
DELTA_L_FAMILY: tuple[str, ...] = ("#17becf", "#98df8a", "#006d2c", "#74c476", "#00a087", "#bcbd22")
OTHER_PALETTE: tuple[str, ...] = ("#d62728", "#8c564b", "#e377c2", "#7f7f7f", "#393b79", "#ad494a", "#843c39")
METHOD_NAMES: dict[str, str] = {a.name: a.display for a in AGGREGATORS.values()}


def _pick(label: str, palette: tuple[str, ...]) -> str:
    digest = hashlib.md5(label.encode("utf-8")).digest()
    return palette[int.from_bytes(digest[:4], "big") % len(palette)]


def color_for(label: str) -> str:
    """The hex colour of an aggregator label (fixed for the four methods, hashed otherwise)."""
    if label in FIXED_COLORS:
        return FIXED_COLORS[label]
    if label.startswith("delta_l"):
        return _pick(label, DELTA_L_FAMILY)
    return _pick(label, OTHER_PALETTE)


def rgba(hex_color: str, alpha: float) -> str:
    """``#rrggbb`` as a CSS ``rgba(...)`` string (for translucent bands)."""
    h = hex_color.lstrip("#")
    r, g, b = (int(h[i : i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha:g})"


def display_name(label: str) -> str:
    """``delta_l-a0.75`` → ``ΔL α=0.75``; the four methods get their usual names."""
    if label in METHOD_NAMES:
        return METHOD_NAMES[label]
    if label.startswith("delta_l-a"):
        return f"ΔL α={label.removeprefix('delta_l-a')}"
    return label
