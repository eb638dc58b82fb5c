"""Hostile run data never becomes markup: dir names, states, errors and labels written by someone else.

Each markdown element the app emits is rendered with markdown-it (CommonMark with raw HTML on, the most
permissive reading) and must contain no tag, link or image; every plotly figure's texts must hold no tag.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from markdown_it import MarkdownIt
from streamlit.testing.v1 import AppTest

from lab.dashboard import launch, ui
from lab.dashboard.safe import css_color, md, sanitize_figure
from lab.runlog import RunWriter
from lab.synthetic_runs import SyntheticRun, no_fsync, run_config, write_run

APP = str(Path(__file__).resolve().parents[1] / "app.py")
STATE = '<iframe srcdoc="<script>parent.document.title=1</script>"></iframe>'
ERROR = "![beacon](http://example.invalid/x.png) [click](javascript:alert(1)) <img src=x onerror=alert(1)>"
HOSTILE_NAME = "x`<img src=x onerror=alert(1)>`-s0"
RENDER = MarkdownIt("commonmark", {"html": True})
FORBIDDEN = ("<iframe", "<img", "<script", "<a ", "<b>", "<h1", "<code>`")


def rendered_tags(source: str) -> list[str]:
    html = RENDER.render(source)
    return [tag for tag in FORBIDDEN if tag in html]


@pytest.fixture
def hostile_runs(tmp_path) -> Path:
    runs = tmp_path / "runs"
    with no_fsync():
        write_run(runs, SyntheticRun("grpo", seed=0, steps=12))
        bad = runs / "demo" / HOSTILE_NAME
        writer = RunWriter(bad)
        config = run_config(SyntheticRun("delta_l", seed=0, steps=0), "demo")
        config.update({"run_id": "<b>run</b>`id`", "label": "delta_l<img src=x>"})
        writer.write_config(config)
    (bad / "status.json").write_text(
        json.dumps({"state": STATE, "error": ERROR, "step": 0}), encoding="utf-8"
    )
    return runs


@pytest.fixture(autouse=True)
def served_on_localhost(monkeypatch):
    monkeypatch.setattr(ui, "server_address", lambda: "127.0.0.1")
    monkeypatch.delenv(launch.TOKEN_ENV, raising=False)


def markdown_sources(at: AppTest) -> list[tuple[str, str]]:
    """(kind, source) of every markdown-bearing element of the page, sidebar included."""
    out = []
    for kind in ("markdown", "caption", "info", "warning", "error", "success"):
        for element in list(at.get(kind)) + list(at.sidebar.get(kind)):
            out.append((kind, element.value))
    return out


@pytest.mark.parametrize("view", ["Overview", "Lengths", "Gradient noise", "Weights"])
def test_hostile_names_states_and_errors_stay_text(hostile_runs, view, monkeypatch):
    monkeypatch.setenv("LAB_RUNS_DIR", str(hostile_runs))
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["view"] = view
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    sources = markdown_sources(at)
    shown = " ".join(s for _, s in sources)
    assert "iframe" in shown and "onerror" in shown, "the hostile state and name should be shown, as text"
    for kind, source in sources:
        assert not rendered_tags(source), (kind, source)
    for chart in at.get("plotly_chart"):
        figure = json.loads(chart.proto.spec)
        text = json.dumps(figure)
        assert "<img" not in text and "<b>" not in text, "a figure text carries markup"


@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=80))
def test_md_renders_back_to_the_same_text_and_never_to_markup(text):
    source = f"prefix {md(text)} suffix"
    html = RENDER.renderInline(source)
    assert "<" not in html.replace("&lt;", ""), html  # no tag at all, only escaped text
    # what the reader sees is the value itself (control characters and line breaks shown as spaces)
    visible = html.replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"').replace("&amp;", "&")
    expected = "".join(" " if (ord(c) < 32 or ord(c) == 127 or c in "\u2028\u2029") else c for c in text)
    collapsed = " ".join(visible.split())
    assert collapsed == " ".join(f"prefix {expected} suffix".split())


def test_md_escapes_every_ascii_punctuation_mark():
    escaped = md(string.punctuation)
    for ch in set(string.punctuation) - set("<>&\"'"):
        assert "\\" + ch in escaped
    assert "<" not in escaped and ">" not in escaped


def test_css_color_takes_only_the_lab_palette_form():
    assert css_color("#1f77b4") == "#1f77b4"
    for bad in ("red;background:url(x)", "#12345", "#1f77b4'><script>", ""):
        with pytest.raises(ValueError, match="not a #rrggbb colour"):
            css_color(bad)


def test_sanitize_figure_escapes_names_titles_and_categories():
    import plotly.graph_objects as go

    fig = go.Figure(
        go.Bar(x=["<img src=x>"], y=[1], name="<b>n</b>", text=["<i>t</i>"], legendgroup="<u>g</u>")
    )
    fig.update_layout(title="<a href='x'>t</a>", xaxis_title="<sup>x</sup>")
    fig.add_annotation(text="<script>s</script>")
    sanitize_figure(fig)
    blob = json.dumps(fig.to_plotly_json())
    for tag in ("<img", "<b>", "<i>", "<a ", "<sup>", "<script", "<u>"):
        assert tag not in blob


SCRIPT = "<script>alert(1)</script>"
IMG = "<img src=x onerror=alert(1)>"


def hostile_two_worlds(folder: Path) -> Path:
    """A two_worlds file (benchmarks/two_worlds.py's layout) whose every string tries to be markup."""
    runs = [
        {"run": f"{label}-s{seed}", "label": label, "seed": seed, "state": "finished",
         "reward": [[step, 0.1 * step + 0.01 * seed] for step in range(1, 6)], "heldout_reward": 0.5,
         "alpha": [[step, 1.0] for step in range(1, 6)]}
        for label in (SCRIPT, IMG, "delta_l-aauto") for seed in range(3)
    ]  # fmt: skip
    pair = {"a": SCRIPT, "b": IMG, "metric": f"final{IMG}", "mean_diff": 0.1, "ci": [0.0, 0.2],
            "ci_t": [0.0, 0.2], "p_value": 0.01, "p_holm": 0.02, "mde": 0.05, "distinguishable": True,
            "n_seeds": 3}  # fmt: skip
    cell = {"runs": runs, "labels": {SCRIPT: {"final_reward": {"mean": 0.5, "sd": 0.1, "n": 3}}},
            "verdict": {"seeds": 3, "pairs": [pair], "method": SCRIPT, "note": IMG},
            "auto_alpha": {"runs": runs, "verdict": {"pairs": [{**pair, "p_holm": 0.5, "a": "delta_l-aauto"}]}},
            "variance_fit_step1": {"exponent": 1.0, "exponent_ci": [0.5, 1.5]}}  # fmt: skip
    world = {"cv": {SCRIPT: 1.0, "delta_l": 0.5}, "cv_theory": {SCRIPT: 0.2, "delta_l": 0.1},
             "variance_fit": {"exponent": 1.2, "exponent_ci": [0.9, 1.5]},
             "ratio_measured": {"family": 2.0, IMG: 1.0}}  # fmt: skip
    summary = {
        "command": f"python benchmarks/two_worlds.py {SCRIPT}", "measured": IMG, "seeds": SCRIPT,
        "machine": {"cpus": IMG, "platform": SCRIPT, f"k{IMG}": "[x](javascript:alert(1))"},
        "cells": {"paper-world/adamw": cell, f"{SCRIPT}/sgd": {"runs": "x"}},
        "worlds": {"paper-world": world, IMG: world},
    }  # fmt: skip
    folder.mkdir(parents=True)
    path = folder / f"two_worlds.{IMG}.json"
    path.write_text(json.dumps(summary), encoding="utf-8")
    (folder / f"two_worlds.{SCRIPT.replace('/', '')}.json").write_text("{not json", encoding="utf-8")
    return path


def test_hostile_two_worlds_file_stays_text(tmp_path, monkeypatch):
    hostile_two_worlds(tmp_path / "results")
    monkeypatch.setenv("LAB_RUNS_DIR", str(tmp_path / "no-runs"))
    monkeypatch.setenv("LAB_RESULTS_DIR", str(tmp_path / "results"))
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["view"] = "Two worlds"
    at.run()
    drawn = {}
    for name in at.selectbox(
        key="tw_file"
    ).options:  # the hostile file and a malformed one (hostile name too)
        at.selectbox(key="tw_file").set_value(name).run()
        assert not at.exception, [e.value for e in at.exception]
        sources = markdown_sources(at)
        shown = " ".join(s for _, s in sources)
        assert "script" in shown and ("onerror" in shown or "onerror" not in name), "shown, as text"
        for kind, source in sources:
            assert not rendered_tags(source), (kind, source)
            assert "](javascript" not in source.replace("\\", "") or "\\]" in source, (kind, source)
        for chart in at.get("plotly_chart"):
            text = json.dumps(json.loads(chart.proto.spec))
            assert "<img" not in text and "<script" not in text, "a figure text carries markup"
        drawn[name] = len(at.get("plotly_chart"))
    assert drawn[f"two_worlds.{IMG}.json"] >= 6  # rewards, two verdicts, CV, k, α: the hostile file was drawn
