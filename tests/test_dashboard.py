"""Dashboard tests: every view through streamlit's AppTest on four fixture run dirs (complete, half-written,
empty, corrupt), the incremental data layer, and the figure builders without streamlit."""

from __future__ import annotations

import json
import math
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from lab.aggregation import METHODS, estimator_stats
from lab.dashboard import colors, launch, lengths, noise, overview, playground, weights
from lab.dashboard.data import RunData, RunStore, downsample, group_by_label, label_curve, t95
from lab.dashboard.ui import VIEWS, runs_dir_from_args
from lab.runlog import RunWriter
from tests.fixtures_runs import (
    FIXTURE_KINDS,
    SyntheticRun,
    append_step,
    make_half_written,
    no_fsync,
    write_run,
)

APP = str(Path(__file__).resolve().parents[1] / "app.py")
RUN_VIEWS = ("Overview", "Lengths", "Gradient noise", "Weights")


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    """One runs dir per fixture kind (written once per module)."""
    out = {}
    with no_fsync():
        for kind, make in FIXTURE_KINDS.items():
            out[kind] = make(tmp_path_factory.mktemp(kind))
    return out


def app_for(runs_dir: Path, view: str | None, monkeypatch) -> AppTest:
    monkeypatch.setenv("LAB_RUNS_DIR", str(runs_dir))
    at = AppTest.from_file(APP, default_timeout=60)
    if view is not None:
        at.session_state["view"] = view
    return at.run()


def charts(at: AppTest) -> list:
    return list(at.get("plotly_chart"))


# -------------------------------------------------------------------------------------------------------
# AppTest: every view on every fixture kind
# -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(FIXTURE_KINDS))
@pytest.mark.parametrize("view", VIEWS)
def test_every_view_renders_without_exception(roots, kind, view, monkeypatch):
    at = app_for(roots[kind], view, monkeypatch)
    assert not at.exception, [e.value for e in at.exception]
    has_runs = kind != "empty"
    if view == "Estimator playground":
        assert len(charts(at)) == 3
    elif view in RUN_VIEWS and has_runs:
        assert charts(at), f"{view} drew no chart on {kind} runs"
    if kind == "corrupt" and view in RUN_VIEWS:
        text = " ".join(w.value for w in at.warning)
        assert "corrupt line(s) in metrics.jsonl" in text and "status.json" in text
    if kind == "empty":
        assert any("No runs in" in i.value and "lab compare --out" in i.value for i in at.info)


def test_newcomer_without_runs_sees_the_playground_first(roots, monkeypatch):
    at = app_for(roots["empty"], None, monkeypatch)
    assert not at.exception
    assert len(charts(at)) == 3  # the playground's charts: the only tab that runs
    assert "No runs in" in at.info[0].value


def test_complete_runs_open_on_overview_with_scores(roots, monkeypatch):
    at = app_for(roots["complete"], None, monkeypatch)
    assert not at.exception
    table = at.dataframe[0].value
    assert set(table["run"]) == {"grpo-s0", "grpo-s1", "dapo-s0", "dr_grpo-s0", "delta_l-s0", "delta_l-s1",
                                 "delta_l-a0.75-s0"}  # fmt: skip
    assert (table["state"] == "finished").all()
    mono = table["monotonicity (eval avg@k)"]
    assert mono.between(0, 1).all() or mono.isna().all()  # NaN only while lab.evaluation lacks it


def test_half_written_runs_are_live_and_warn_about_missing_status(roots, monkeypatch):
    at = app_for(roots["half_written"], "Overview", monkeypatch)
    assert not at.exception
    assert any("Live: refreshing" in c.value for c in at.caption)
    assert any("dapo-s0: no readable status.json" in w.value for w in at.warning)


def test_sidebar_runs_dir_field_and_rerun_reads_only_new_lines(tmp_path, monkeypatch):
    with no_fsync():
        make_half_written(tmp_path / "runs")
    at = app_for(tmp_path / "empty-dir", "Overview", monkeypatch)
    assert "No runs in" in at.info[0].value
    at.sidebar.text_input(key="runs_dir").set_value(str(tmp_path / "runs")).run()
    assert not at.exception and charts(at)
    store: RunStore = at.session_state["run_store"]
    run = next(r for r in store.runs.values() if r.run_id == "grpo-s0")
    reader, n_metrics = run.reader, len(run.metrics)
    spec = SyntheticRun("grpo", steps=12, max_steps=40, state="running")
    writer = RunWriter(run.run_dir)
    with open(run.run_dir / "metrics.jsonl", "a") as f:  # complete the partial line the fixture left
        f.write("5]}\n")
    append_step(writer, spec, 13, np.random.default_rng(0))
    at.run()
    run = next(r for r in at.session_state["run_store"].runs.values() if r.run_id == "grpo-s0")
    assert run.reader is reader  # same reader: the rerun polled, it did not reload
    # the completed partial line and the new step are both step 13: the last record wins
    assert len(run.metrics) == n_metrics + 1 and run.metrics["step"].max() == 13
    assert run.metrics["reward"].notna().iloc[-1]


# -------------------------------------------------------------------------------------------------------
# Launch view with an injected stand-in command
# -------------------------------------------------------------------------------------------------------
STAND_IN = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from lab.runlog import RunWriter
    out = Path(sys.argv[sys.argv.index("--out") + 1])
    w = RunWriter(out / "grpo-s0")
    w.write_config({"aggregator": "grpo", "seed": 0})
    for step in range(1, 1000):
        w.set_status("running", step, 1000)
        print("step", step, flush=True)
        time.sleep(0.2)
    """
)


def test_launch_view_starts_follows_and_stops_a_stand_in(tmp_path, monkeypatch):
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    monkeypatch.setenv(launch.PREFIX_ENV, f"{sys.executable} {script}")
    monkeypatch.chdir(Path(APP).parent)
    at = app_for(tmp_path / "runs", "Launch", monkeypatch)
    at.text_input(key="ln_name").set_value("cmp").run()
    assert "--aggregators grpo,dapo,dr_grpo,delta_l" in at.code[0].value
    at.button(key="ln_start").click().run()
    current: launch.Launch = at.session_state["launch"]
    try:
        assert current.running and current.out == tmp_path / "runs" / "cmp"
        deadline = time.time() + 20
        while time.time() < deadline and not launch.progress_table(current.out).shape[0]:
            time.sleep(0.2)
        at.run()
        assert not at.exception
        assert any("running" in m.value for m in at.markdown)
        assert at.get("progress"), "no progress bar for the launched run"
        at.button(key="ln_stop").click().run()
        assert not current.running and current.returncode is not None
    finally:
        current.stop(timeout=2)


def test_build_compare_args_is_an_argument_list(monkeypatch):
    args = launch.build_compare_args(
        "runs/x y",
        ["grpo", "delta_l"],
        steps=20,
        seeds=2,
        alpha=0.75,
        extra="--probe-every 5",
        prefix=["lab"],
    )
    assert args == ["lab", "compare", "--out", "runs/x y", "--aggregators", "grpo,delta_l", "--steps", "20",
                    "--seeds", "2", "--alpha", "0.75", "--probe-every", "5"]  # fmt: skip
    args = launch.build_compare_args("o", ["dapo"], steps=1, seeds=1, model="Qwen/Qwen2.5-0.5B", prefix=[])
    assert args[-2:] == ["--model", "Qwen/Qwen2.5-0.5B"]
    monkeypatch.delenv(launch.PREFIX_ENV, raising=False)
    assert launch.command_prefix() == [sys.executable, "-m", "lab.cli"]
    with pytest.raises(ValueError, match="aggregator"):
        launch.build_compare_args("o", [], steps=1, seeds=1)


def test_stop_terminates_the_process_group(tmp_path):
    child = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"
    job = launch.Launch([sys.executable, "-c", child], tmp_path).start()
    time.sleep(0.5)
    assert job.running
    t = time.time()
    assert job.stop(timeout=5) is not None
    assert not job.running and time.time() - t < 6


# -------------------------------------------------------------------------------------------------------
# data layer
# -------------------------------------------------------------------------------------------------------
def test_refresh_reads_only_new_lines_and_stops_when_finished(tmp_path):
    spec = SyntheticRun("delta_l", steps=5, max_steps=10, state="running", probe_every=0, eval_every=0)
    with no_fsync():
        run_dir = write_run(tmp_path, spec, partial_tail=True)
    run = RunData(run_dir)
    assert run.refresh() == 10 and run.is_live and len(run.batches) == 5
    writer, rng = RunWriter(run_dir), np.random.default_rng(1)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write("garbage}\n")  # completes the partial line as a corrupt one
    with open(run_dir / "samples.jsonl", "a") as f:
        f.write("0, oops\n")
    append_step(writer, spec, 6, rng)
    assert run.refresh() == 2
    assert run.corrupt == {"metrics.jsonl": 1, "samples.jsonl": 1}
    writer.set_status("finished", 6, 10)
    append_step(writer, spec, 7, rng)
    assert run.refresh() == 2  # one last poll after the state changed
    append_step(writer, spec, 8, rng)
    assert run.refresh() == 0  # finished: no more polling
    assert run.metrics["step"].tolist() == [1, 2, 3, 4, 5, 6, 7]


def test_label_curve_uses_a_t_interval_over_seeds(tmp_path):
    runs = []
    for seed, values in ((0, [0.0, 1.0]), (1, [2.0, 3.0])):
        run_dir = tmp_path / f"grpo-s{seed}"
        writer = RunWriter(run_dir)
        writer.write_config({"aggregator": "grpo", "seed": seed})
        for step, v in enumerate(values, 1):
            writer.log_metrics({"step": step, "reward": v, "reward_std": 0.5})
        runs.append(RunData(run_dir))
        runs[-1].refresh()
    curve = label_curve(runs, "reward")
    half = math.sqrt(2) / math.sqrt(2) * t95(2)  # std of {0, 2} is √2
    assert curve["mean"].tolist() == [1.0, 2.0]
    assert np.allclose(curve["hi"] - curve["mean"], half)
    single = label_curve(runs[:1], "reward", band_column="reward_std")
    assert np.allclose(single["hi"] - single["mean"], 0.5)
    assert label_curve(runs, "reward", seed_band="none")["hi"].tolist() == [1.0, 2.0]


def test_downsample_bounds_points():
    df = label_curve([], "x")
    assert df.empty
    import pandas as pd

    big = pd.DataFrame({"step": np.arange(1, 5001), "mean": np.ones(5000), "lo": 0.0, "hi": 2.0})
    small = downsample(big, 600)
    assert len(small) <= 600 and small["mean"].eq(1.0).all()


# -------------------------------------------------------------------------------------------------------
# figure builders (no streamlit)
# -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def complete_runs(roots) -> list[RunData]:
    store = RunStore()
    return store.load([(c, p) for c, paths in store.discover(roots["complete"]).items() for p in paths])


def test_colors_fixed_and_deterministic():
    assert colors.color_for("delta_l") == colors.FIXED_COLORS["delta_l"]
    assert len(set(colors.FIXED_COLORS.values())) == 4
    assert colors.color_for("delta_l-a0.75") == colors.color_for("delta_l-a0.75")
    assert colors.color_for("delta_l-a0.75") in colors.DELTA_L_FAMILY
    assert colors.color_for("my-run") in colors.OTHER_PALETTE
    assert colors.display_name("delta_l-a0.5") == "ΔL α=0.5"


def test_overview_figures_one_colour_per_label(complete_runs):
    groups = group_by_label(complete_runs)
    assert list(groups)[:4] == ["grpo", "dapo", "dr_grpo", "delta_l"]
    fig = overview.reward_figure(groups)
    lines = [t for t in fig.data if t.fill != "toself"]
    assert len(lines) == len(groups)
    for trace, label in zip(lines, groups, strict=True):
        assert trace.line.color == colors.color_for(label)
    bands = [t for t in fig.data if t.fill == "toself"]
    assert len(bands) == len(groups)  # every label has a band (std for one seed, CI for two)
    assert len(overview.eval_figure(groups, metric="pass_at_k").data) >= len(groups)
    table = overview.scores_table(groups)
    assert len(table) == len(complete_runs) and table["final reward"].between(0, 1).all()


def test_lengths_figures(complete_runs):
    groups = group_by_label(complete_runs)
    steps = lengths.all_sample_steps(complete_runs)
    assert steps == list(range(1, 41))
    dist = lengths.distribution_figure(complete_runs, 17)
    assert len(dist.data) == len(complete_runs) and all(len(t.y) == 32 for t in dist.data)
    assert {t.name for t in lengths.violin_over_time(groups, slices=5).data} == {
        colors.display_name(label) for label in groups
    }
    assert len(lengths.mean_max_figure(groups).data) >= 2 * len(groups)
    trunc = lengths.truncation_figure(groups)
    assert all(0 <= y <= 1 for t in trunc.data if t.fill != "toself" for y in t.y)


def test_noise_figures(complete_runs):
    run = next(r for r in complete_runs if r.run_id == "delta_l-s0")
    fig = noise.counterfactual_figure(run)
    assert {t.name for t in fig.data} >= {"GRPO", "DAPO", "Dr. GRPO", "ΔL", "ΔL (probe)"}
    # the logged columns are estimator_stats on the step's lengths
    batch = run.batch_at(3)
    cv = estimator_stats(batch.lengths.tolist(), "dr_grpo", max_length=512)["cv"]
    assert run.metrics.set_index("step").loc[3, "cv/dr_grpo"] == pytest.approx(cv)
    probes = noise.valid_probes(run)
    assert [p["step"] for p in probes] == [20, 40]
    scatter = noise.variance_scatter(run, probes[0])
    fit = scatter.data[1]
    assert fit.y[1] == pytest.approx(probes[0]["slope"] * fit.x[1] + probes[0]["intercept"])
    assert len(noise.own_cv_figure(group_by_label(complete_runs)).data) >= 5


def test_noise_scatter_skips_rows_without_an_estimate(complete_runs):
    """Rows the probe could not estimate (length 0, group < 3 rows) are logged as null and not drawn."""
    run = next(r for r in complete_runs if r.run_id == "delta_l-s0")
    probe = {
        "step": 7,
        "lengths": [10, 0, 30, 40],
        "grad_variances": [5.0, None, 12.0, 17.0],
        "exponent": 0.9,
    }
    scatter = noise.variance_scatter(run, probe)
    assert list(scatter.data[0].x) == [10.0, 30.0, 40.0] and "k = 0.90" in scatter.layout.title.text
    empty = noise.variance_scatter(run, {"step": 8, "lengths": [1, 2], "grad_variances": [None, None]})
    assert not empty.data or all(len(t.x or []) == 0 for t in empty.data)


def test_noise_fit_without_logged_line():
    L, var = np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0, 6.0])
    slope, intercept, corr = noise.fit_line(L, var, {})
    assert (slope, intercept, corr) == pytest.approx((2.0, 0.0, 1.0))


def test_weights_follow_alpha(complete_runs):
    run = next(r for r in complete_runs if r.run_id == "delta_l-s0")
    batch = run.batch_at(10)
    w1 = weights.relative_weights(batch.lengths, 1.0, 512)
    assert np.allclose(w1, batch.weights, rtol=1e-3)  # matches what the (synthetic) loss logged
    assert np.allclose(weights.relative_weights(batch.lengths, 0.0, 512), 1.0)
    sweep = weights.alpha_sweep(batch.lengths, 512, np.array([0.0, 0.5, 1.0, 1.5]))
    assert sweep["variance_ratio"][0] == pytest.approx(1.0)
    assert np.argmin(sweep["variance_ratio"]) == 2  # α = 1 is the minimum-variance unbiased choice
    assert np.all(np.diff(sweep["long_share"]) < 0)
    assert (
        len(weights.weights_figure(batch, 0.75, 512, logged=True).data) == 5
    )  # 3 reference α, the chosen α, logged
    assert weights.alpha_sweep_figure(batch, None, 0.75).data


def test_playground_matches_the_paper_sanity_figure():
    s = playground.PlaygroundSettings(
        alpha=1.0, group_size=8, max_length=3000, n_trials=4000, token_variance=1e-3
    )
    group = playground.draw_group(s)
    sim = playground.simulate(s, group)
    table = playground.stats_table(s, group, sim).set_index("aggregator")
    assert table.loc["Dr. GRPO", "E = M·Σx (1 = unbiased)"] == pytest.approx(1.0)
    assert table.loc["ΔL α=1", "E = M·Σx (1 = unbiased)"] == pytest.approx(1.0)
    assert table.loc["ΔL α=1", "Var·M²/V"] <= table.loc["Dr. GRPO", "Var·M²/V"]
    assert table.loc["GRPO", "CV"] == pytest.approx(table.loc["ΔL α=1", "CV"])
    assert table.loc["DAPO", "CV"] == pytest.approx(table.loc["Dr. GRPO", "CV"])
    for method in table.index:  # Monte Carlo agrees with the closed form (4000 trials: ~5%)
        assert table.loc[method, "MC Var·M²/V"] == pytest.approx(table.loc[method, "Var·M²/V"], rel=0.1)
    assert len(playground.histogram_figure(s, sim).data) == len(METHODS)
    assert len(playground.weights_figure(s, group).data) == len(METHODS)


def test_runs_dir_resolution():
    assert runs_dir_from_args(["--runs-dir", "a"], {"LAB_RUNS_DIR": "b"}) == "a"
    assert runs_dir_from_args(["--other", "x"], {"LAB_RUNS_DIR": "b"}) == "b"
    assert runs_dir_from_args([], {}) == "runs"


def test_stale_running_run_gets_a_warning(tmp_path):
    with no_fsync():
        run_dir = write_run(tmp_path, SyntheticRun("grpo", steps=2, max_steps=9, state="running"))
    status = json.loads((run_dir / "status.json").read_text())
    (run_dir / "status.json").write_text(json.dumps({**status, "updated": time.time() - 3600}))
    run = RunData(run_dir)
    run.refresh()
    assert any("has not changed for" in w for w in run.warnings())
