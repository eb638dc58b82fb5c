"""View "Two worlds": the stored 2x2 benchmark {paper world, digitsum} x {AdamW, SGD equalized}.

Reads ``benchmarks/results/two_worlds.*.json`` (written by ``benchmarks/two_worlds.py``): per cell the
reward curves of every run, the verdict of its comparison and, with ``--auto-alpha``, ΔL(auto)'s runs with
α per step and their own verdict; per world one large batch of the warm model with the measured and the
theoretical CV of each aggregator and the fit of Var(g_i) ∝ L_i^k.

The file is data written by someone else: every value is type-checked before use (a missing or malformed
cell or key becomes a note in :func:`missing`, never an exception) and every string it holds reaches the
page only through :func:`lab.dashboard.safe.md` or :func:`lab.dashboard.safe.sanitize_figure`. Nothing
here imports streamlit.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from lab.aggregators import order_key
from lab.dashboard.colors import color_for, display_name, rgba
from lab.dashboard.figures import placeholder
from lab.dashboard.safe import plotly_text
from lab.probes.statistics import power_law_exponent
from lab.verdict import t95

ROOT = Path(__file__).resolve().parents[2]  # the repository root (the directory of app.py)
RESULTS_ENV = "LAB_RESULTS_DIR"
DEFAULT_RESULTS_DIR = ROOT / "benchmarks" / "results"
PATTERN = "two_worlds.*.json"
MAX_BYTES = 50 * 1024 * 1024  # a larger file is refused, not parsed
WORLDS = {"paper-world": "paper world", "digitsum": "digitsum"}  # as benchmarks/two_worlds.py names them
OPTIMIZERS = {"adamw": "AdamW", "sgd-equalized": "SGD, equalized step"}
CELLS = tuple(f"{w}/{o}" for w in WORLDS for o in OPTIMIZERS)
AUTO_LABEL = "delta_l-aauto"  # benchmarks/two_worlds.py's ΔL(auto) label
CV_METHODS = ("grpo", "dapo", "dr_grpo", "delta_l")
K_BRACKET = max(abs(b) for b in inspect.signature(power_law_exponent).parameters["bracket"].default)

Summary = Mapping[str, Any]


# -------------------------------------------------------------------------------------------------------
# where the files are, and reading one
# -------------------------------------------------------------------------------------------------------
def results_dir(env: Mapping[str, str] | os._Environ) -> Path:
    """``$LAB_RESULTS_DIR`` (a relative path is taken from the repository root), else benchmarks/results."""
    given = env.get(RESULTS_ENV)
    if not given:
        return DEFAULT_RESULTS_DIR
    path = Path(given).expanduser()
    return path if path.is_absolute() else ROOT / path


def result_files(folder: Path) -> list[Path]:
    """The ``two_worlds.*.json`` files directly in ``folder`` (sorted by name; none if it is no folder)."""
    try:
        return sorted(p for p in folder.glob(PATTERN) if p.is_file())
    except OSError:
        return []


def load_summary(path: Path, *, max_bytes: int | None = None) -> tuple[dict | None, str | None]:
    """``(summary, None)``, or ``(None, why)`` for a file too large (``max_bytes``, default
    :data:`MAX_BYTES`), unreadable, not JSON or not a JSON object."""
    name = path.name
    max_bytes = MAX_BYTES if max_bytes is None else max_bytes
    try:
        size = path.stat().st_size
        if size > max_bytes:
            return (
                None,
                f"{name} is {size / 2**20:.1f} MB, over the {max_bytes / 2**20:g} MB limit: not read.",
            )
        with path.open("rb") as f:
            raw = f.read(max_bytes + 1)
        if len(raw) > max_bytes:  # it grew since the stat
            return None, f"{name} is over the {max_bytes / 2**20:g} MB limit: not read."
        summary = json.loads(raw.decode("utf-8"))
    except OSError as err:
        return None, f"Could not read {name}: {err.strerror or err}."
    except (UnicodeDecodeError, ValueError, RecursionError) as err:  # JSONDecodeError is a ValueError
        return None, f"{name} is not valid JSON ({type(err).__name__}: {err})."
    if not isinstance(summary, dict):
        return None, f"{name} holds a JSON {type(summary).__name__}, not the benchmark's object."
    return summary, None


# -------------------------------------------------------------------------------------------------------
# type-checked access
# -------------------------------------------------------------------------------------------------------
def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _num(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def _interval(value: Any) -> tuple[float, float] | None:
    if isinstance(value, list) and len(value) == 2:
        lo, hi = (_num(v) for v in value)
        if lo is not None and hi is not None:
            return lo, hi
    return None


def _points(value: Any) -> list[tuple[float, float]]:
    """``[[step, value], ...]`` as finite pairs (anything else dropped)."""
    out = []
    for item in value if isinstance(value, list) else []:
        if isinstance(item, list) and len(item) == 2:
            step, y = _num(item[0]), _num(item[1])
            if step is not None and y is not None:
                out.append((step, y))
    return out


def cells(summary: Summary) -> dict[str, dict]:
    return {k: v for k, v in _dict(summary.get("cells")).items() if isinstance(v, dict)}


def worlds(summary: Summary) -> dict[str, dict]:
    return {k: v for k, v in _dict(summary.get("worlds")).items() if isinstance(v, dict)}


def cell_title(name: str) -> str:
    world, _, optimizer = name.partition("/")
    return f"{WORLDS.get(world, world)} · {OPTIMIZERS.get(optimizer, optimizer)}"


def runs_of(cell: Mapping[str, Any], *, auto: bool = True) -> list[dict]:
    """The cell's runs, plus (``auto``) the ΔL(auto) runs of its ``auto_alpha`` part (not its partners,
    which are the cell's own ΔL and Dr. GRPO runs again)."""
    runs = (
        [r for r in cell.get("runs", []) if isinstance(r, dict)] if isinstance(cell.get("runs"), list) else []
    )
    if auto:
        extra = _dict(cell.get("auto_alpha")).get("runs")
        runs += [r for r in extra if isinstance(r, dict) and r.get("label") == AUTO_LABEL] if isinstance(
            extra, list) else []  # fmt: skip
    return runs


def missing(summary: Summary) -> list[str]:
    """What the file lacks for this view, one sentence each (empty: everything is there)."""
    notes = []
    have = cells(summary)
    absent = [c for c in CELLS if c not in have]
    if absent:
        notes.append("No cell " + ", ".join(absent) + " yet.")
    for name, cell in have.items():
        lacks = [k for k in ("runs", "verdict") if not cell.get(k)]
        if lacks:
            notes.append(f"Cell {name} has no {' and no '.join(lacks)}.")
    have_worlds = worlds(summary)
    absent_worlds = [w for w in WORLDS if w not in have_worlds]
    if absent_worlds:
        notes.append("No large-batch measurement of " + ", ".join(absent_worlds) + " yet.")
    for world, m in have_worlds.items():
        lacks = [k for k in ("cv", "cv_theory", "variance_fit") if not isinstance(m.get(k), dict)]
        if lacks:
            notes.append(f"World {world} has no {', '.join(lacks)}.")
    return notes


def header(summary: Summary) -> dict[str, str]:
    """Seeds, steps, when, wall time, machine and command, as plain strings (to be escaped by the caller)."""
    machine = _dict(summary.get("machine"))
    wall = _num(summary.get("wall_seconds"))
    out = {
        "seeds": summary.get("seeds"),
        "steps": summary.get("steps"),
        "measured": summary.get("measured"),
        "wall": f"{wall / 60:.1f} min" if wall is not None else None,
        "machine": ", ".join(f"{k} {v}" for k, v in machine.items() if v not in (None, "")) or None,
        "command": summary.get("command"),
    }
    return {k: str(v) for k, v in out.items() if v is not None}


# -------------------------------------------------------------------------------------------------------
# reward curves: the 2x2 small multiple
# -------------------------------------------------------------------------------------------------------
def seed_curve(runs: Sequence[Mapping[str, Any]], key: str = "reward") -> pd.DataFrame:
    """Mean over runs (seeds) of ``key`` per step with its 95% t-interval: columns step, mean, lo, hi, n."""
    series = [pd.Series(dict(_points(r.get(key)))) for r in runs]
    series = [s[~s.index.duplicated(keep="last")] for s in series if not s.empty]
    if not series:
        return pd.DataFrame(columns=["step", "mean", "lo", "hi", "n"])
    table = pd.concat(series, axis=1).sort_index()
    n = table.notna().sum(axis=1)
    mean = table.mean(axis=1)
    std = table.std(axis=1, ddof=1) if len(series) > 1 else pd.Series(0.0, index=mean.index)
    half = (std / np.sqrt(n) * n.map(t95)).fillna(0.0)
    return pd.DataFrame({"step": mean.index.to_numpy(), "mean": mean.to_numpy(), "lo": (mean - half).to_numpy(),
                         "hi": (mean + half).to_numpy(), "n": n.to_numpy()})  # fmt: skip


def by_label(runs: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    out: dict[str, list] = {}
    for run in runs:
        out.setdefault(str(run.get("label")), []).append(run)
    return {label: out[label] for label in sorted(out, key=order_key)}


def _grid(titles: Sequence[str], **kwargs) -> go.Figure:
    return make_subplots(rows=len(WORLDS), cols=len(OPTIMIZERS), subplot_titles=list(titles), shared_xaxes=True,
                         vertical_spacing=0.12, horizontal_spacing=0.06, **kwargs)  # fmt: skip


def _cell_position(name: str) -> tuple[int, int] | None:
    world, _, optimizer = name.partition("/")
    if world in WORLDS and optimizer in OPTIMIZERS:
        return list(WORLDS).index(world) + 1, list(OPTIMIZERS).index(optimizer) + 1
    return None


def _add_curve(fig: go.Figure, curve: pd.DataFrame, label: str, row: int, col: int, shown: set[str],
               *, dash: str | None = None) -> None:  # fmt: skip
    color, name = color_for(label), display_name(label)
    if (curve["hi"] - curve["lo"]).abs().max() > 0:
        fig.add_trace(
            go.Scatter(
                x=list(curve["step"]) + list(curve["step"][::-1]), y=list(curve["hi"]) + list(curve["lo"][::-1]),
                mode="lines", fill="toself", fillcolor=rgba(color, 0.15), line={"width": 0}, hoverinfo="skip",
                showlegend=False, legendgroup=plotly_text(label), name=f"{name} band",
            ),
            row=row, col=col,
        )  # fmt: skip
    n = int(curve["n"].max())
    fig.add_trace(
        go.Scatter(
            x=curve["step"], y=curve["mean"], mode="lines", name=name, legendgroup=plotly_text(label),
            showlegend=label not in shown, line={"color": color, "width": 2, "dash": dash},
            hovertemplate=f"%{{x}}: %{{y:.3f}} (mean of ≤ {n} seeds)<extra></extra>",
        ),
        row=row, col=col,
    )  # fmt: skip
    shown.add(label)


def _finish_grid(fig: go.Figure, title: str, height: int, y_title: str) -> go.Figure:
    """The world x optimizer grid's common layout: title at the left, legend below, step on the bottom row."""
    fig.update_layout(
        title={"text": title, "x": 0.0, "xanchor": "left"},
        height=height, margin={"l": 60, "r": 20, "t": 80, "b": 40}, template="plotly_white", hovermode="closest",
        legend={"orientation": "h", "yanchor": "top", "y": -0.08, "xanchor": "left", "x": 0.0},
    )  # fmt: skip
    fig.update_xaxes(title_text="step", row=len(WORLDS))
    fig.update_yaxes(title_text=y_title, col=1)
    return fig


def _empty_cell(fig: go.Figure, row: int, col: int, text: str) -> None:
    """A note in the middle of an empty panel (paper coordinates: a panel without traces has no drawn axes
    that an ``x2 domain`` reference could use)."""
    index = (row - 1) * len(OPTIMIZERS) + col
    suffix = "" if index == 1 else str(index)
    x0, x1 = fig.layout[f"xaxis{suffix}"].domain
    y0, y1 = fig.layout[f"yaxis{suffix}"].domain
    fig.add_annotation(text=text, showarrow=False, x=(x0 + x1) / 2, y=(y0 + y1) / 2, xref="paper", yref="paper",
                       font={"color": "#7f7f7f"})  # fmt: skip


def reward_grid_figure(summary: Summary) -> go.Figure:
    """Reward against step per cell (rows: worlds, columns: optimizers), mean over seeds ± 95% t-band, one
    line per aggregator in its lab colour; ΔL(auto), when stored, dashed."""
    have = cells(summary)
    fig = _grid([cell_title(c) for c in CELLS], shared_yaxes=True)
    shown: set[str] = set()
    for name in CELLS:
        row, col = _cell_position(name)  # type: ignore[misc]
        groups = by_label(runs_of(have.get(name, {})))
        drawn = False
        for label, runs in groups.items():
            curve = seed_curve(runs)
            if not curve.empty:
                _add_curve(fig, curve, label, row, col, shown, dash="dash" if label == AUTO_LABEL else None)
                drawn = True
        if not drawn:
            _empty_cell(fig, row, col, "not in this file" if name not in have else "no reward curves")
    return _finish_grid(
        fig, "Reward per cell: mean over seeds, band = 95% t-interval of the mean", 620, "reward"
    )


def scores_table(summary: Summary) -> pd.DataFrame:
    """Per cell and aggregator: final reward, reward AUC and held-out reward, mean ± sd over seeds."""
    rows = []
    for name, cell in cells(summary).items():
        parts = [
            ("", _dict(cell.get("labels"))),
            ("auto", _dict(_dict(cell.get("auto_alpha")).get("labels"))),
        ]
        for part, labels in parts:
            for label in sorted(labels, key=order_key):
                if part == "auto" and label != AUTO_LABEL:
                    continue  # the partners are the cell's own runs again
                stats = _dict(labels[label])
                row = {"cell": cell_title(name), "aggregator": display_name(str(label))}
                for key, title in (("final_reward", "final reward"), ("auc", "reward AUC"),
                                   ("heldout_reward", "held-out reward")):  # fmt: skip
                    s = _dict(stats.get(key))
                    m, sd = _num(s.get("mean")), _num(s.get("sd"))
                    row[title] = "–" if m is None else f"{m:.3f}" + (f" ± {sd:.3f}" if sd is not None else "")
                row["seeds"] = _dict(stats.get("final_reward")).get("n")
                rows.append(row)
    return pd.DataFrame(rows, columns=["cell", "aggregator", "final reward", "reward AUC", "held-out reward",
                                       "seeds"])  # fmt: skip


# -------------------------------------------------------------------------------------------------------
# verdicts
# -------------------------------------------------------------------------------------------------------
def clean_verdict(value: Any) -> dict | None:
    """A stored verdict with only its well-formed pairs (None when there is none): safe for the Overview's
    :func:`lab.dashboard.overview.verdict_figure` and ``verdict_table``."""
    if not isinstance(value, dict):
        return None
    pairs = (
        [p for p in value.get("pairs", []) if isinstance(p, dict)]
        if isinstance(value.get("pairs"), list)
        else []
    )
    if not pairs:
        return None
    seeds = value.get("seeds")
    return {
        **value,
        "pairs": pairs,
        "seeds": seeds if isinstance(seeds, int) and not isinstance(seeds, bool) else 0,
    }


def has_holm(verdict: Mapping[str, Any]) -> bool:
    """Whether the verdict carries the corrected p-values (one stored before the correction does not)."""
    return all("p_holm" in p for p in verdict.get("pairs", []))


def recomputed_verdict(runs: Sequence[Mapping[str, Any]]) -> dict | None:
    """:func:`lab.verdict.verdict_from_curves` of the stored reward curves, paired by seed, with the held-out
    reward of finished runs as the end-of-run metric (what ``two_worlds.py --resummarize`` would store now).
    None with fewer than two labels."""
    from lab.runlog import HELDOUT_METRIC
    from lab.verdict import verdict_from_curves

    curves: dict[str, dict[int, list[tuple[float, float]]]] = {}
    end_values: dict[str, dict[str, dict[int, float]]] = {}
    for label, mine in by_label(runs).items():
        for run in mine:
            seed, points = run.get("seed"), _points(run.get("reward"))
            if not isinstance(seed, int) or isinstance(seed, bool) or not points:
                continue
            curves.setdefault(label, {})[seed] = points
            heldout = _num(run.get("heldout_reward"))
            if run.get("state") == "finished" and heldout is not None:
                end_values.setdefault(HELDOUT_METRIC, {}).setdefault(label, {})[seed] = heldout
    if len(curves) < 2:
        return None
    return verdict_from_curves(curves, end_values=end_values)


def verdict_of(cell: Mapping[str, Any], part: str = "") -> tuple[dict | None, str]:
    """The verdict of the cell (``part=""``) or of its ΔL(auto) comparison (``"auto"``), and its source.

    The stored one when it carries the Holm-corrected p-values; otherwise (stored before the correction, or
    not at all) recomputed from the stored curves (:func:`recomputed_verdict`), and the source says so.
    """
    holder = _dict(cell.get("auto_alpha")) if part == "auto" else cell
    stored = clean_verdict(holder.get("verdict"))
    if stored is not None and has_holm(stored):
        return stored, "stored in the file"
    runs = (
        [r for r in holder.get("runs", []) if isinstance(r, dict)]
        if isinstance(holder.get("runs"), list)
        else []
    )
    verdict = clean_verdict(recomputed_verdict(runs))
    if verdict is None:
        return None, "no verdict stored and fewer than two aggregators' curves to compute one from"
    why = "the stored one predates the multiple-test correction" if stored is not None else "none was stored"
    return verdict, f"recomputed from the stored reward curves ({why})"


def cell_verdict_figure(verdict: Mapping[str, Any], title: str = "") -> go.Figure:
    """The Overview's verdict picture (:func:`lab.dashboard.overview.verdict_figure`), sized for half a row:
    a short title and fewer ticks."""
    from lab.dashboard.overview import verdict_figure, verdict_summary

    fig = verdict_figure(dict(verdict))
    n_yes, n_tests = verdict_summary(verdict)
    fig.update_layout(title={"text": f"{title}{n_yes} of {n_tests} distinguishable after Holm, "
                             f"{verdict.get('seeds', 0)} seed(s)", "font": {"size": 13}})  # fmt: skip
    fig.update_xaxes(nticks=4, title_standoff=4)
    fig.update_layout(height=(fig.layout.height or 224) + 30, margin={"b": 120}, legend={"y": -0.55})
    return fig


COMPACT_COLUMNS = ["a", "b", "metric", "mean a − b", "p (Holm)", "MDE", "verdict"]


def compact_verdict_table(verdict: Mapping[str, Any]) -> pd.DataFrame:
    """The Overview's verdict table (:func:`lab.dashboard.overview.verdict_table`), its key columns only."""
    from lab.dashboard.overview import verdict_table

    table = verdict_table(dict(verdict))
    return table[[c for c in COMPACT_COLUMNS if c in table.columns]]


# -------------------------------------------------------------------------------------------------------
# per world: measured vs theoretical CV, the variance exponent k
# -------------------------------------------------------------------------------------------------------
def _reference(measured: Mapping[str, float], theory: Mapping[str, float]) -> str | None:
    common = [m for m in CV_METHODS if measured.get(m) and theory.get(m)]
    return "delta_l" if "delta_l" in common else (common[0] if common else None)


def cv_table(summary: Summary) -> pd.DataFrame:
    """Per world and aggregator: measured CV, theoretical CV (Var ∝ L, V = 1) and each relative to ΔL's."""
    rows = []
    for world, m in worlds(summary).items():
        measured = {k: v for k, v in ((k, _num(v)) for k, v in _dict(m.get("cv")).items()) if v and v > 0}
        theory = {
            k: v for k, v in ((k, _num(v)) for k, v in _dict(m.get("cv_theory")).items()) if v and v > 0
        }
        ref = _reference(measured, theory)
        for method in sorted(set(measured) | set(theory), key=order_key):
            mv, tv = measured.get(method), theory.get(method)
            rows.append({
                "world": WORLDS.get(world, world), "aggregator": display_name(str(method)),
                "measured CV": mv, "theoretical CV": tv,
                "measured / ΔL": mv / measured[ref] if ref and mv else None,
                "theory / ΔL": tv / theory[ref] if ref and tv else None,
            })  # fmt: skip
    return pd.DataFrame(rows, columns=["world", "aggregator", "measured CV", "theoretical CV", "measured / ΔL",
                                       "theory / ΔL"])  # fmt: skip


def cv_figure(summary: Summary) -> go.Figure:
    """Per world, each aggregator's CV relative to ΔL(α=1)'s: measured (solid) beside theory (pale).

    Only the ratios compare: the theoretical CV assumes Var(g_i) = V·L_i with V = |∇J| = 1, a unit choice.
    """
    table = cv_table(summary)
    names = [w for w in WORLDS.values() if w in set(table["world"])] + sorted(
        set(table["world"]) - set(WORLDS.values()))  # fmt: skip
    if table.empty:
        return placeholder("CV relative to ΔL", "No world with measured and theoretical CV in this file.")
    fig = make_subplots(
        rows=1, cols=len(names), subplot_titles=names, shared_yaxes=True, horizontal_spacing=0.06
    )
    methods = {display_name(m): m for m in CV_METHODS}
    for col, world in enumerate(names, start=1):
        rows = table[table["world"] == world]
        colors = [color_for(methods.get(a, a)) for a in rows["aggregator"]]
        for key, name, alpha in (("measured / ΔL", "measured (large batch)", 1.0),
                                 ("theory / ΔL", "theory, Var ∝ L (V = 1)", 0.35)):  # fmt: skip
            fig.add_trace(
                go.Bar(
                    x=list(rows["aggregator"]), y=list(rows[key]), name=name, legendgroup=name, showlegend=col == 1,
                    marker={"color": [rgba(c, alpha) for c in colors], "line": {"color": colors, "width": 1.5}},
                    hovertemplate=f"%{{x}}: {name} %{{y:.2f}} × ΔL's<extra></extra>",
                ),
                row=1, col=col,
            )  # fmt: skip
        fig.add_hline(y=1.0, line={"color": "#333333", "width": 1, "dash": "dot"}, row=1, col=col)
    fig.update_layout(
        title={"text": "CV relative to ΔL(α=1): measured on one large batch vs theory", "x": 0.0,
               "xanchor": "left"},
        barmode="group", height=380, template="plotly_white", hovermode="closest",
        margin={"l": 60, "r": 20, "t": 80, "b": 40},
        legend={"orientation": "h", "yanchor": "top", "y": -0.15, "xanchor": "left", "x": 0.0},
    )  # fmt: skip
    fig.update_yaxes(title_text="CV / CV of ΔL(α=1)", col=1)
    return fig


RATIO_NAMES = {"dr_grpo/delta_l": "Dr. GRPO / ΔL", "dapo/grpo": "DAPO / GRPO",
               "family": "uniform family / 1/L family"}  # fmt: skip


def ratio_table(summary: Summary) -> pd.DataFrame:
    """The stored CV ratios per world: measured, theory (k = 1) and theory at the fitted k."""
    rows = []
    for world, m in worlds(summary).items():
        sources = {"measured": m.get("ratio_measured"), "theory (k = 1)": m.get("ratio_theory"),
                   "theory (fitted k)": m.get("ratio_theory_fitted_exponent")}  # fmt: skip
        keys = [
            k
            for k in ("dr_grpo/delta_l", "dapo/grpo", "family")
            if any(k in _dict(s) for s in sources.values())
        ]
        for key in keys:
            row = {"world": WORLDS.get(world, world), "ratio": RATIO_NAMES[key]}
            row.update({name: _num(_dict(s).get(key)) for name, s in sources.items()})
            rows.append(row)
    return pd.DataFrame(rows, columns=["world", "ratio", "measured", "theory (k = 1)", "theory (fitted k)"])


def fit_table(summary: Summary) -> pd.DataFrame:
    """Per world: the fitted exponent k of Var(g_i) ∝ L_i^k with its 95% bootstrap interval [k low, k high]
    (large batch and, when stored, each cell's step-1 probes). "at the search edge": k or a bound sits at the
    edge of the fit's bracket (:func:`lab.probes.statistics.power_law_exponent`), so the data did not pin it."""
    rows = []

    def add(source: str, world: str, fit: Mapping[str, Any]) -> None:
        k, ci = _num(fit.get("exponent")), _interval(fit.get("exponent_ci"))
        edge = any(v is not None and abs(v) >= K_BRACKET - 0.01 for v in (k, *(ci or ())))
        rows.append({
            "world": WORLDS.get(world, world), "source": source, "k": k,
            "k low": ci[0] if ci else None, "k high": ci[1] if ci else None,
            "at the search edge": "yes" if edge else "", "corr(Var, L)": _num(fit.get("correlation")),
            "rows": fit.get("rows") if isinstance(fit.get("rows"), int) else None,
            "groups": fit.get("groups") if isinstance(fit.get("groups"), int) else None,
        })  # fmt: skip

    for world, m in worlds(summary).items():
        if isinstance(m.get("variance_fit"), dict):
            add("large batch", world, m["variance_fit"])
    for name, cell in cells(summary).items():
        fit = _dict(cell.get("variance_fit_step1"))
        if fit.get("exponent") is not None:
            add(f"{OPTIMIZERS.get(name.partition('/')[2], name)} probes, step 1", name.partition("/")[0], fit)
    return pd.DataFrame(rows, columns=["world", "source", "k", "k low", "k high", "at the search edge",
                                       "corr(Var, L)", "rows", "groups"])  # fmt: skip


def fit_figure(summary: Summary) -> go.Figure:
    """The fitted k per world and source with its 95% interval, against the k = 1 of the theory."""
    table = fit_table(summary)
    table = table[table["k"].notna()] if not table.empty else table
    if table.empty:
        return placeholder("Variance exponent k", "No variance fit in this file.")
    fig = go.Figure()
    ys = [f"{w} · {s}" for w, s in zip(table["world"], table["source"], strict=True)]
    lo = [k - v if pd.notna(v) else None for k, v in zip(table["k"], table["k low"], strict=True)]
    hi = [v - k if pd.notna(v) else None for k, v in zip(table["k"], table["k high"], strict=True)]
    fig.add_trace(go.Scatter(
        x=list(table["k"]), y=ys, mode="markers", name="fitted k (95% bootstrap interval)",
        error_x={"type": "data", "symmetric": False, "array": hi, "arrayminus": lo, "color": "#333333"},
        marker={"color": "#333333", "size": 10}, hovertemplate="%{y}: k = %{x:.2f}<extra></extra>",
    ))  # fmt: skip
    fig.add_vline(
        x=1.0, line={"color": color_for("delta_l"), "dash": "dash"}, annotation_text="k = 1 (theory)"
    )
    fig.update_layout(
        title={"text": "Var(g_i) ∝ L_i^k: the fitted exponent", "x": 0.0, "xanchor": "left"},
        height=150 + 40 * len(ys), margin={"l": 60, "r": 20, "t": 60, "b": 40}, template="plotly_white",
        xaxis_title="k", hovermode="closest", showlegend=False,
    )  # fmt: skip
    fig.update_yaxes(autorange="reversed")
    return fig


# -------------------------------------------------------------------------------------------------------
# ΔL(auto): α over steps
# -------------------------------------------------------------------------------------------------------
def has_alpha(summary: Summary) -> bool:
    return any(_points(r.get("alpha")) for c in cells(summary).values() for r in runs_of(c)
               if r.get("label") == AUTO_LABEL)  # fmt: skip


def alpha_figure(summary: Summary) -> go.Figure:
    """ΔL(auto)'s α per step in each cell: mean over seeds ± 95% t-band, thin lines per seed."""
    if not has_alpha(summary):
        return placeholder("ΔL(auto): α over steps", "No ΔL(auto) runs with α per step in this file.")
    have = cells(summary)
    fig = _grid([cell_title(c) for c in CELLS], shared_yaxes=True)
    color = color_for(AUTO_LABEL)
    shown: set[str] = set()
    for name in CELLS:
        row, col = _cell_position(name)  # type: ignore[misc]
        runs = [
            r for r in runs_of(have.get(name, {})) if r.get("label") == AUTO_LABEL and _points(r.get("alpha"))
        ]
        for run in runs:
            points = _points(run.get("alpha"))
            fig.add_trace(go.Scatter(x=[p[0] for p in points], y=[p[1] for p in points], mode="lines",
                                     line={"color": rgba(color, 0.3), "width": 1}, hoverinfo="skip",
                                     showlegend=False, name="one seed"), row=row, col=col)  # fmt: skip
        curve = seed_curve(runs, "alpha")
        if curve.empty:
            _empty_cell(fig, row, col, "no ΔL(auto) runs")
            continue
        _add_curve(fig, curve, AUTO_LABEL, row, col, shown)
    return _finish_grid(
        fig, "ΔL(auto): α per step (thin: one seed; thick: mean, band: 95% t-interval)", 560, "α"
    )
