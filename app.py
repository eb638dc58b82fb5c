"""ΔL Lab dashboard: ``streamlit run app.py [-- --runs-dir DIR]`` (or LAB_RUNS_DIR; default runs/).

Listens on 127.0.0.1 (.streamlit/config.toml). Served on the network (``lab dashboard --host 0.0.0.0``),
the runs dir is fixed and the Launch tab needs ``LAB_LAUNCH_TOKEN``.

A thin entry point: the sidebar picks runs, the tabs call the views in :mod:`lab.dashboard`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import streamlit as st

from lab.aggregators import DEFAULT_AGGREGATORS
from lab.dashboard import ui
from lab.dashboard.colors import color_for, display_name
from lab.dashboard.safe import css_color, md
from lab.runlog import STATUS, read_json

st.set_page_config(page_title="ΔL Lab", page_icon="Δ", layout="wide")


def sidebar() -> ui.Settings:
    """Runs dir, comparison, runs, smoothing and refresh interval."""
    sb = st.sidebar
    sb.title("ΔL Lab")
    default_dir = ui.runs_dir_from_args(sys.argv[1:], os.environ)
    network = ui.served_on_network()
    if network:  # a visitor may not browse other folders of this machine
        runs_dir = Path(default_dir)
        sb.markdown(f"Runs dir: {md(runs_dir)}")
        sb.caption("Fixed: the dashboard is served on the network (set it with `--runs-dir` at start).")
    else:
        runs_dir = Path(sb.text_input("Runs dir", default_dir, key="runs_dir").strip() or default_dir)
    found = ui.store().discover(runs_dir)
    selected: list[tuple[str, Path]] = []
    if not found:
        sb.info(f"No runs in {md(runs_dir)} yet.")
    else:
        names = sorted(found)
        comparison = sb.selectbox("Comparison", names, format_func=lambda c: "(top level)" if c == "." else c,
                                  key="comparison")  # fmt: skip
        run_dirs = {p.name: p for p in found.get(comparison, [])}
        chosen = sb.multiselect("Runs", list(run_dirs), default=list(run_dirs), key=f"runs_{comparison}")
        selected = [(comparison, run_dirs[name]) for name in chosen if name in run_dirs]
        for comparison_name, path in selected:
            run = ui.store().get(path, comparison_name)
            state = (read_json(path / STATUS) or {}).get("state", "unknown")
            # The square's colour is the lab's own (checked #rrggbb); the name and state are escaped data.
            sb.markdown(f"<span style='color:{css_color(color_for(run.label))}'>■</span> "
                        f"<code>{md(path.name)}</code> · {md(state)}", unsafe_allow_html=True)  # fmt: skip
    window = sb.slider("Smoothing (steps)", 1, 100, 1, key="window")
    refresh = sb.number_input("Live refresh (s)", 1.0, 60.0, 3.0, 1.0, key="refresh")
    sb.caption("Colours: " + ", ".join(display_name(m) for m in DEFAULT_AGGREGATORS) +
               " keep theirs in every chart.")  # fmt: skip
    return ui.Settings(runs_dir=runs_dir, selected=selected, window=int(window), refresh_s=float(refresh),
                       network=network)  # fmt: skip


def main() -> None:
    settings = sidebar()
    st.title("ΔL Lab: loss aggregation in RLVR")
    if not settings.selected:
        st.info(ui.empty_runs_message(settings.runs_dir))
    default = ui.VIEWS[0] if settings.selected else "Estimator playground"
    tabs = st.tabs(ui.VIEWS, key="view", on_change="rerun", default=default)
    renderers = {
        "Overview": ui.render_overview,
        "Lengths": ui.render_lengths,
        "Gradient noise": ui.render_noise,
        "Weights": ui.render_weights,
    }
    for name, tab in zip(ui.VIEWS, tabs, strict=True):
        if tab.open is False:
            continue  # lazy tabs: only the selected view runs
        with tab:
            if name in renderers:
                ui.live_view(name, renderers[name], settings)
            elif name == "Two worlds":
                ui.render_two_worlds(network=settings.network)
            elif name == "Estimator playground":
                ui.render_playground()
            else:
                ui.render_launch(settings.runs_dir, network=settings.network)


main()
