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
from lab.aggregators import AGGREGATORS
from lab.dashboard import colors, launch, lengths, noise, overview, playground, two_worlds, ui, weights
from lab.dashboard.data import RunData, RunStore, downsample, group_by_label, label_curve, reward_range, t95
from lab.dashboard.ui import VIEWS, runs_dir_from_args
from lab.runlog import RunWriter
from lab.synthetic_runs import (
    FIXTURE_KINDS,
    SyntheticRun,
    append_step,
    make_complete,
    make_half_written,
    no_fsync,
    write_run,
)
from tests.helpers import plain

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


@pytest.fixture(autouse=True)
def served_on_localhost(monkeypatch):
    """AppTest has no server: say it listens on 127.0.0.1 (as .streamlit/config.toml makes it), whatever the cwd."""
    monkeypatch.setattr(ui, "server_address", lambda: "127.0.0.1")
    monkeypatch.delenv(launch.TOKEN_ENV, raising=False)
    monkeypatch.delenv(two_worlds.RESULTS_ENV, raising=False)  # the stored benchmark of this checkout


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
        text = " ".join(plain(w.value) for w in at.warning)
        assert "corrupt line(s) in metrics.jsonl" in text and "status.json" in text
    if kind == "empty":
        assert any("No runs in" in plain(i.value) and "lab compare --out" in plain(i.value) for i in at.info)


def test_newcomer_without_runs_sees_the_playground_first(roots, monkeypatch):
    at = app_for(roots["empty"], None, monkeypatch)
    assert not at.exception
    assert len(charts(at)) == 3  # the playground's charts: the only tab that runs
    assert "No runs in" in plain(at.info[0].value)


def test_complete_runs_open_on_overview_with_scores(roots, monkeypatch):
    at = app_for(roots["complete"], None, monkeypatch)
    assert not at.exception
    table = next(
        d.value for d in at.dataframe if "run" in d.value.columns
    )  # the scores (the verdict is first)
    assert set(table["run"]) == {"grpo-s0", "grpo-s1", "dapo-s0", "dr_grpo-s0", "delta_l-s0", "delta_l-s1",
                                 "delta_l-a0.75-s0"}  # fmt: skip
    assert (table["state"] == "finished").all()
    mono = table["monotonicity (eval avg@k)"]
    assert mono.between(0, 1).all() or mono.isna().all()  # NaN only while lab.evaluation lacks it


def test_half_written_runs_are_live_and_warn_about_missing_status(roots, monkeypatch):
    at = app_for(roots["half_written"], "Overview", monkeypatch)
    assert not at.exception
    assert any("Live: refreshing" in plain(c.value) for c in at.caption)
    assert any("dapo-s0: no readable status.json" in plain(w.value) for w in at.warning)


def test_sidebar_runs_dir_field_and_rerun_reads_only_new_lines(tmp_path, monkeypatch):
    with no_fsync():
        make_half_written(tmp_path / "runs")
    at = app_for(tmp_path / "empty-dir", "Overview", monkeypatch)
    assert "No runs in" in plain(at.info[0].value)
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
        assert any("running" in plain(m.value) for m in at.markdown)
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
    assert args == [
        "lab",
        "compare",
        "--out",
        "runs/x y",
        "--aggregators",
        "grpo,delta_l",
        "--steps",
        "20",
        "--seeds",
        "2",
        "--alpha",
        "0.75",
        "--probe-every",
        "5",
    ]  # fmt: skip  (no model: the default)
    args = launch.build_compare_args("o", ["dapo"], steps=1, seeds=1, model="tiny", prefix=[])
    assert args[-2:] == ["--model", "tiny"]
    monkeypatch.delenv(launch.PREFIX_ENV, raising=False)
    assert launch.command_prefix() == [sys.executable, "-m", "lab.cli"]
    with pytest.raises(ValueError, match="aggregator"):
        launch.build_compare_args("o", [], steps=1, seeds=1)


# every way the Launch form could be turned against the machine: (widget, value, what the refusal says)
MALICIOUS = [
    ("ln_name", "../../somewhere", "not a plain folder name"),
    ("ln_name", "/tmp/absolute", "not a plain folder name"),
    ("ln_name", "a/b", "not a plain folder name"),
    ("ln_name", "..", "not a plain folder name"),
    ("ln_name", ".", "not a plain folder name"),
    ("ln_name", "", "comparison name is empty"),
    ("ln_extra", "--out /tmp/elsewhere", "may not set --out"),
    ("ln_extra", "--probe-every 5 --out=../../elsewhere", "may not set --out"),
    ("ln_extra", "--ou ../../elsewhere", "may not set --out"),  # argparse's prefix matching
    ("ln_extra", "--steps 100000000", "may not set --steps"),
    ("ln_extra", "--seeds 1000", "may not set --seeds"),
    ("ln_extra", "--model ../../elsewhere", "may not set --model"),
    ("ln_extra", "--aggregators grpo", "may not set --aggregators"),
    ("ln_extra", "--no-such-option 1", "unrecognized arguments: --no-such-option"),
    ("ln_extra", "--probe-every five", "invalid int value: 'five'"),
    ("ln_extra", "--help", "--help is not an argument"),
    ("ln_extra", "'unclosed", "No closing quotation"),
    (
        "ln_model",
        "someone/some-model",
        "unknown model 'someone/some-model': choose a preset (smollm2-135m, tiny",
    ),
    ("ln_model", "../../no-such-folder", "unknown model"),
]


@pytest.mark.parametrize(("key", "value", "message"), MALICIOUS, ids=[f"{k}={v}" for k, v, _ in MALICIOUS])
def test_launch_refuses_bad_input_and_creates_nothing(tmp_path, monkeypatch, key, value, message):
    monkeypatch.setenv(launch.PREFIX_ENV, f"{sys.executable} -c pass")
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "home" / "runs"
    at = app_for(runs, "Launch", monkeypatch)
    assert at.button(key="ln_start")  # the form is ready ...
    widget = at.text_input(key=key)
    widget.set_value(value).run()
    assert not at.exception
    errors = " ".join(plain(e.value) for e in at.error)
    assert message in errors and "Not started" in errors
    assert not [b for b in at.button if b.key == "ln_start"]  # ... and offers no Start after the refusal
    assert "launch" not in at.session_state
    assert list(tmp_path.rglob("*")) == []  # nothing created anywhere (not even the runs dir)


def test_launch_refuses_an_existing_comparison_unless_resumed(tmp_path, monkeypatch):
    (tmp_path / "runs" / "cmp").mkdir(parents=True)
    (tmp_path / "runs" / "cmp" / "keep.txt").write_text("mine")
    at = app_for(tmp_path / "runs", "Launch", monkeypatch)
    at.text_input(key="ln_name").set_value("cmp").run()
    assert "already exists" in plain(at.error[0].value) and not [b for b in at.button if b.key == "ln_start"]
    at.text_input(key="ln_extra").set_value("--resume").run()
    assert not at.error and "--resume" in at.code[0].value


def test_launch_bounds_and_generic_option_check(tmp_path):
    ok = {"steps": 1, "seeds": 1, "model": "tiny", "prefix": []}
    for field, value, message in (("steps", launch.MAX_STEPS + 1, "steps"), ("steps", 0, "steps"),
                                  ("seeds", launch.MAX_SEEDS + 1, "seeds"), ("alpha", -0.5, "α")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            launch.plan_launch(tmp_path, "x", ["grpo"], **{**ok, field: value})
    with pytest.raises(ValueError, match="unknown aggregator"):
        launch.plan_launch(tmp_path, "x", ["grpo", "mean"], **ok)
    # by argparse dest: any option of `lab compare` that the form passes is refused in the extras
    assert launch.dests_set(["--out=a", "--no-shaped-reward"]) == {"out": Path("a"), "shaped_reward": False}
    form = launch.build_compare_args("o", ["grpo"], **ok)[1:]
    assert set(launch.dests_set(form)) == {"out", "aggregators", "steps", "seeds", "alpha", "model"}
    assert launch.check_model(str(tmp_path)) == str(tmp_path)  # an existing local folder is a model
    assert list(tmp_path.iterdir()) == []


def test_failed_start_leaves_no_folder(tmp_path):
    with pytest.raises(OSError):
        launch.Launch([str(tmp_path / "no-such-program")], tmp_path / "runs" / "cmp").start()
    assert list(tmp_path.iterdir()) == []


def test_network_mode_disables_launch_and_fixes_the_runs_dir(roots, tmp_path, monkeypatch):
    monkeypatch.setattr(ui, "server_address", lambda: "0.0.0.0")
    at = app_for(roots["complete"], "Launch", monkeypatch)
    assert not at.exception
    assert any(
        "Launch is disabled" in plain(w.value) and launch.TOKEN_ENV in plain(w.value) for w in at.warning
    )
    assert not [t for t in at.text_input if t.key == "ln_name"] and not at.button
    assert not [t for t in at.sidebar.text_input if t.key == "runs_dir"]  # no field to browse other folders
    assert any(str(roots["complete"]) in plain(m.value) for m in at.sidebar.markdown)
    monkeypatch.setenv(launch.TOKEN_ENV, "short")  # too short to guard anything: still disabled
    assert "Launch is disabled" in app_for(roots["complete"], "Launch", monkeypatch).warning[0].value


def test_network_mode_asks_for_the_launch_token(tmp_path, monkeypatch):
    monkeypatch.setattr(ui, "server_address", lambda: None)  # every interface
    monkeypatch.setenv(launch.TOKEN_ENV, "correct-horse-battery-staple")
    at = app_for(tmp_path / "runs", "Launch", monkeypatch)
    assert not [t for t in at.text_input if t.key == "ln_name"]
    at.text_input(key="ln_token").set_value("correct-horse-battery-stapl").run()
    assert "Wrong launch token" in plain(at.error[0].value) and not [
        t for t in at.text_input if t.key == "ln_name"
    ]
    at.text_input(key="ln_token").set_value("correct-horse-battery-staple").run()
    assert not at.exception and at.text_input(key="ln_name") and at.button(key="ln_start")
    assert not list(tmp_path.iterdir())


def test_network_mode_comes_from_streamlits_own_server_address(monkeypatch):
    from streamlit import config

    monkeypatch.undo()  # the real ui.server_address, not the fixture's
    before = config.get_option("server.address")
    try:
        for address, network in (("127.0.0.1", False), ("0.0.0.0", True), ("", True), ("::1", False)):
            config.set_option("server.address", address)
            assert ui.server_address() == address and ui.served_on_network() is network
    finally:
        config.set_option("server.address", before)


def test_loopback_addresses():
    assert all(launch.is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"))
    assert not any(launch.is_loopback(h) for h in ("0.0.0.0", "", None, "::", "192.168.1.5", "example.org"))
    assert launch.token_matches("abc", "abc") and not launch.token_matches("abd", "abc")


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


def test_bands_stay_within_the_reward_range(tmp_path):
    """One seed with a wide within-batch std: mean ± std would leave [0, 1]; the band is clipped."""
    run_dir = tmp_path / "grpo-s0"
    writer = RunWriter(run_dir)
    writer.write_config({"aggregator": "grpo", "seed": 0, "run": {"shaped_reward": False}})
    for step, (reward, std) in enumerate([(0.05, 0.25), (0.5, 0.3), (0.95, 0.25)], 1):
        writer.log_metrics({"step": step, "reward": reward, "reward_std": std})
    run = RunData(run_dir)
    run.refresh()
    assert reward_range([run]) == (0.0, 1.0)
    raw = label_curve([run], "reward", band_column="reward_std")
    assert raw["lo"].min() < 0 and raw["hi"].max() > 1  # what the band drew before
    fig = overview.reward_figure({"grpo": [run]})
    band = next(t for t in fig.data if t.fill == "toself")
    assert min(band.y) == 0.0 and max(band.y) == 1.0
    assert "clipped to [0, 1]" in fig.layout.title.text
    assert "[0, 1]" in overview.reward_band_caption({"grpo": [run]})
    run.config["run"]["shaped_reward"] = True
    assert reward_range([run]) == (0.0, 2.0)  # binary + shaped reward
    run.metrics.loc[0, "reward"] = -0.5  # a logged value outside: the range widens, no data is hidden
    assert reward_range([run]) == (-0.5, 2.0)


@pytest.mark.parametrize("task", ["countdown", "math"])
def test_reward_range_counts_the_reward_functions(task):
    from lab.tasks import get_task

    for shaped, high in ((False, 1.0), (True, 2.0)):  # each function gives 0..1, TRL sums them
        assert len(get_task(task).reward_funcs(shaped=shaped)) == high


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
    assert len(set(colors.FIXED_COLORS.values())) == len(AGGREGATORS)  # one colour per registry entry
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


def test_overview_shows_the_verdict_computed_live_then_the_stored_one(tmp_path, monkeypatch):
    """Without verdict.json the Overview computes the verdict from the runs and says it is provisional; once
    lab compare wrote one, that file is shown (through lab.runlog), above the curves."""
    from lab.runner import write_verdict
    from lab.verdict import compare_runs

    with no_fsync():
        root = make_complete(tmp_path / "runs")
    at = app_for(root, "Overview", monkeypatch)
    assert not at.exception
    assert at.subheader[0].value == "Verdict"
    table = at.dataframe[0].value
    assert set(table.columns) >= {"a", "b", "metric", "mean a − b", "95% bootstrap CI", "verdict"}
    assert any("provisional" in plain(c.value) for c in at.caption)
    comparison = root / "demo"
    verdict = compare_runs([p for p in comparison.iterdir() if p.is_dir()])
    verdict["pairs"][0]["distinguishable"] = True  # a marker only the stored file has
    write_verdict(comparison, verdict)
    at = app_for(root, "Overview", monkeypatch)
    assert any("verdict.json" in plain(c.value) for c in at.caption)
    assert at.dataframe[0].value["verdict"].iloc[0] == "distinguishable"
    # a verdict.json from before the correction (no Holm p-values) is not trusted: recomputed, and said so
    for pair in verdict["pairs"]:
        del pair["p_holm"]
    write_verdict(comparison, verdict)
    at = app_for(root, "Overview", monkeypatch)
    assert any("predates the multiple-test correction" in plain(c.value) for c in at.caption)
    assert at.dataframe[0].value["verdict"].iloc[0] != "distinguishable"


def element_types(node, out: list[str] | None = None) -> list[str]:
    """The element types of an AppTest tree in page order (blocks left out)."""
    out = [] if out is None else out
    kind = getattr(node, "type", None)
    if kind not in (None, "main", "block", "vertical", "horizontal", "flex_container", "column", "tab",
                    "tab_container"):  # fmt: skip
        out.append(kind)
    for child in getattr(node, "children", {}).values():
        element_types(child, out)
    return out


def four_by_three(root: Path) -> Path:
    """4 aggregators × 3 seeds of the same synthetic curve (no aggregator favoured), evaluated at the end."""
    with no_fsync():
        for aggregator in METHODS:
            for seed in range(3):
                write_run(root, SyntheticRun(aggregator, seed=seed, steps=20, eval_every=10, probe_every=0))
    return root


def test_overview_leads_with_the_verdict_picture_then_its_table(tmp_path, monkeypatch):
    root = four_by_three(tmp_path / "runs")
    at = app_for(root, "Overview", monkeypatch)
    assert not at.exception
    order = element_types(at.main)
    first_tab = order[order.index("subheader") :]
    assert first_tab[:5] == ["subheader", "markdown", "plotly_chart", "caption", "dataframe"]
    spec = json.loads(charts(at)[0].proto.spec)
    assert spec["layout"]["title"]["text"].startswith("Verdict")
    names = {t.get("name") for t in spec["data"]}
    assert "± MDE (80% power)" in names and "not detected" in names  # no aggregator is favoured here
    summary = plain(at.markdown[0].value)
    assert "of 18** differences" in summary and "Holm–Bonferroni" in summary and "could only see" in summary
    table = at.dataframe[0].value
    assert {"p (raw)", "p (Holm)", "MDE"} <= set(table.columns)
    assert set(table["metric"]) == {"final_reward", "auc", "eval_avg_at_k"}  # the held-out eval is a metric
    assert (table["p (Holm)"] >= table["p (raw)"]).all() and (table["MDE"] > 0).all()


def test_verdict_figure_marks_the_corrected_decision_and_shows_each_mde():
    from lab.verdict import verdict_from_curves
    from lab.verdict_sim import NoiseModel, synthetic_curves

    model = NoiseModel(tuple(np.linspace(0.3, 0.7, 30)), seed_sd=0.02, run_sd=0.01, shared_step_sd=0.05,
                       step_sd=0.05)  # fmt: skip
    curves = synthetic_curves(
        model, list(METHODS), range(6), np.random.default_rng(0), effects={"delta_l": 0.2}
    )
    verdict = verdict_from_curves(curves, n_bootstrap=200)
    fig = overview.verdict_figure(verdict)
    assert [a.text for a in fig.layout.annotations[:2]] == ["final_reward", "auc"]  # one panel per metric
    marked = [t for t in fig.data if t.name == "distinguishable (Holm)"]
    by_pair = {(p["a"], p["b"], p["metric"]): p for p in verdict["pairs"]}
    expected = sorted(f"{colors.display_name(a)} − ΔL" for a in ("grpo", "dapo", "dr_grpo"))
    assert len(marked) == 2 and all(sorted(t.y) == expected for t in marked)
    for trace in marked:
        metric = "final_reward" if trace.xaxis == "x" else "auc"
        for name, x, plus, minus in zip(
            trace.y, trace.x, trace.error_x.array, trace.error_x.arrayminus, strict=True
        ):
            a = next(k for k, v in colors.METHOD_NAMES.items() if v == name.split(" − ")[0])
            pair = by_pair[(a, "delta_l", metric)]
            assert x == pytest.approx(pair["mean_diff"])
            assert [x - minus, x + plus] == pytest.approx(pair["ci_t_family"])  # the family-wise interval
    band = next(t for t in fig.data if t.type == "bar")
    pair = by_pair[("grpo", "dapo", "final_reward")]
    assert band.base[0] == pytest.approx(-pair["mde"]) and band.x[0] == pytest.approx(2 * pair["mde"])
    assert overview.mde_range(verdict)[0] == min(p["mde"] for p in verdict["pairs"])


def test_verdict_figure_shows_hostile_labels_as_text_and_old_verdicts_without_an_mde():
    from lab.dashboard.safe import sanitize_figure

    pair = {"a": "<b>x</b>", "b": "grpo", "metric": "<i>m</i>", "mean_diff": 0.1, "ci_t": [0.0, 0.2],
            "distinguishable": False, "n_seeds": 5}  # fmt: skip
    fig = sanitize_figure(overview.verdict_figure({"seeds": 5, "pairs": [pair]}))
    assert (
        fig.data[0].y[0] == "&lt;b&gt;x&lt;/b&gt; − GRPO"
        and fig.layout.annotations[0].text == "&lt;i&gt;m&lt;/i&gt;"
    )
    assert [t.type for t in fig.data] == ["scatter"]  # no MDE stored: no band
    assert list(fig.data[0].error_x.array) == [pytest.approx(0.1)]  # the 95% t interval instead
    assert overview.verdict_figure({"pairs": []}).layout.annotations[0].text == "No pairs to compare."


def test_the_toolbar_hides_deploy_in_the_config_and_in_the_flags():
    """`streamlit run` from the repository reads .streamlit/config.toml; `lab dashboard` passes flags."""
    import argparse

    from lab.cli import dashboard_command

    tomllib = pytest.importorskip("tomllib")  # Python ≥ 3.11
    config = tomllib.loads((Path(APP).parent / ".streamlit" / "config.toml").read_text())
    assert config["client"]["toolbarMode"] == "viewer"  # viewer: no Deploy, rerun or clear-cache items
    command = dashboard_command(argparse.Namespace(host="127.0.0.1", port=8501, runs_dir="runs"))
    assert command[command.index("--client.toolbarMode") + 1] == "viewer"


def test_gradient_pair_figures_read_the_logged_comparison(complete_runs, tmp_path):
    run = complete_runs[0]
    assert noise.gradient_cosine_figure(
        run
    ).layout.annotations  # no agg_grad/* in the fixtures: a placeholder
    with no_fsync():
        writer = RunWriter(tmp_path / "delta_l-s0")
        writer.write_config({"label": "delta_l", "seed": 0, "aggregator": "delta_l"})
        for step in (1, 2, 3):
            writer.log_metrics({"step": step, "agg_grad/cos/grpo~delta_l": 1.0, "agg_grad/cos/grpo~dapo": 0.9,
                                "agg_grad/norm_ratio/grpo~delta_l": 3.0 + step})  # fmt: skip
        writer.set_status("finished", 3, 3)
    store = RunStore()
    logged = store.load([(".", tmp_path / "delta_l-s0")])[0]
    fig = noise.gradient_cosine_figure(logged)
    assert [t.name for t in fig.data] == ["GRPO vs ΔL", "GRPO vs DAPO"] and list(fig.data[0].y) == [1.0] * 3
    assert list(noise.gradient_norm_ratio_figure(logged).data[0].y) == [4.0, 5.0, 6.0]


# -------------------------------------------------------------------------------------------------------
# Two worlds: the stored 2x2 benchmark (benchmarks/two_worlds.py)
# -------------------------------------------------------------------------------------------------------
STORED_TWO_WORLDS = two_worlds.DEFAULT_RESULTS_DIR / "two_worlds.2core.json"


def two_worlds_file(folder: Path, name: str = "two_worlds.test.json") -> Path:
    """A 2x2 file from the stored one: paper-world/adamw as stored, digitsum/adamw the same runs without a
    verdict and with ΔL(auto) runs (α per step), no SGD cells, and a digitsum world without CVs."""
    import copy

    summary = json.loads(STORED_TWO_WORLDS.read_text(encoding="utf-8"))
    # paper-world/adamw cut to Dr. GRPO and ΔL, its verdict as one written before the Holm correction existed
    cell = {k: v for k, v in summary["cells"]["paper-world/adamw"].items() if k != "auto_alpha"}
    cell["runs"] = [r for r in cell["runs"] if r["label"] in ("dr_grpo", "delta_l")]
    pairs = [p for p in cell["verdict"]["pairs"] if {p["a"], p["b"]} == {"dr_grpo", "delta_l"}]
    cell["verdict"] = {**cell["verdict"],
                       "pairs": [{k: v for k, v in p.items() if k not in ("p_holm", "p_value")} for p in pairs]}  # fmt: skip
    digitsum = {k: v for k, v in copy.deepcopy(cell).items() if k != "verdict"}
    auto_runs = []
    for run in cell["runs"]:
        if run["label"] == "delta_l":
            auto = {
                **copy.deepcopy(run),
                "label": two_worlds.AUTO_LABEL,
                "run": f"delta_l-aauto-s{run['seed']}",
            }
            auto["alpha"] = [[step, 1.0 - 0.01 * step + 0.001 * run["seed"]] for step, _ in run["reward"]]
            auto_runs.append(auto)
    digitsum["auto_alpha"] = {"runs": [r for r in cell["runs"] if r["label"] == "delta_l"] + auto_runs}
    summary["cells"] = {"paper-world/adamw": cell, "digitsum/adamw": digitsum}
    summary["worlds"]["digitsum"] = {
        "model": "tiny",
        "variance_fit": summary["worlds"]["paper-world"]["variance_fit"],
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(summary), encoding="utf-8")
    return path


def two_worlds_app(monkeypatch, results: Path | None, runs_dir: Path) -> AppTest:
    if results is not None:
        monkeypatch.setenv(two_worlds.RESULTS_ENV, str(results))
    return app_for(runs_dir, "Two worlds", monkeypatch)


def test_two_worlds_tab_shows_the_stored_file_without_any_run(roots, monkeypatch):
    at = two_worlds_app(monkeypatch, None, roots["empty"])
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error
    summary, error = two_worlds.load_summary(STORED_TWO_WORLDS)
    assert error is None
    captions = " ".join(plain(c.value) for c in at.caption)
    assert STORED_TWO_WORLDS.name in captions and "only the RATIO between aggregators" in captions
    for note in two_worlds.missing(summary):  # whatever the stored file lacks is said, not an error
        assert note in captions
    n_verdicts = sum(bool(two_worlds.verdict_of(c)[0]) for c in two_worlds.cells(summary).values())
    # the reward grid, one verdict picture per cell, the CV ratios, the fitted k (and α when stored)
    assert len(charts(at)) >= 3 + n_verdicts >= 4
    verdicts = [d.value for d in at.dataframe if "p (Holm)" in d.value.columns]
    assert len(verdicts) >= n_verdicts and all(v["p (Holm)"].notna().all() for v in verdicts)
    cv = next(d.value for d in at.dataframe if "measured / ΔL" in d.value.columns)
    assert (cv[cv["aggregator"] == "ΔL"]["measured / ΔL"] == 1.0).all()


def test_two_worlds_tab_with_a_missing_cell_a_malformed_and_an_oversized_file(roots, tmp_path, monkeypatch):
    results = tmp_path / "results"
    two_worlds_file(results)
    (results / "two_worlds.broken.json").write_text('{"cells": {"paper-world/adamw": [1, 2', encoding="utf-8")
    (results / "two_worlds.list.json").write_text("[1, 2, 3]", encoding="utf-8")
    (results / "two_worlds.zbig.json").write_text(json.dumps({"pad": "x" * 4000}), encoding="utf-8")
    monkeypatch.setattr(two_worlds, "MAX_BYTES", 2000)
    at = two_worlds_app(monkeypatch, results, roots["empty"])
    assert not at.exception, [e.value for e in at.exception]
    picker = at.selectbox(key="tw_file")
    assert picker.options == ["two_worlds.broken.json", "two_worlds.list.json", "two_worlds.test.json",
                              "two_worlds.zbig.json"]  # fmt: skip
    assert "two_worlds.broken.json is not valid JSON" in plain(at.error[0].value)
    picker.set_value("two_worlds.list.json").run()
    assert not at.exception and "holds a JSON list" in plain(at.error[0].value)
    at.selectbox(key="tw_file").set_value("two_worlds.zbig.json").run()
    assert not at.exception and "two_worlds.zbig.json is 0.0 MB, over the" in plain(at.error[0].value)
    monkeypatch.setattr(two_worlds, "MAX_BYTES", 50 * 2**20)
    at.selectbox(key="tw_file").set_value("two_worlds.test.json").run()
    assert not at.exception and not at.error
    captions = " ".join(plain(c.value) for c in at.caption)
    assert "No cell paper-world/sgd-equalized, digitsum/sgd-equalized yet." in captions
    assert (
        "Cell digitsum/adamw has no verdict." in captions
        and "World digitsum has no cv, cv_theory." in captions
    )
    assert "recomputed from the stored reward curves (none was stored)" in captions
    assert "α per step" not in captions  # the ΔL(auto) runs are drawn
    grid = json.loads(charts(at)[0].proto.spec)
    assert "not in this file" in [a["text"] for a in grid["layout"]["annotations"]]
    assert "ΔL α=auto" in {t.get("name") for t in grid["data"]}
    assert any("α per step" in json.loads(c.proto.spec)["layout"]["title"]["text"] for c in charts(at))


def test_two_worlds_results_dir_and_network_mode(roots, tmp_path, monkeypatch):
    assert two_worlds.results_dir({}) == two_worlds.ROOT / "benchmarks" / "results"
    assert two_worlds.results_dir({two_worlds.RESULTS_ENV: "elsewhere"}) == two_worlds.ROOT / "elsewhere"
    assert two_worlds.results_dir({two_worlds.RESULTS_ENV: str(tmp_path)}) == tmp_path
    two_worlds_file(tmp_path / "results")
    at = two_worlds_app(monkeypatch, tmp_path / "results", roots["empty"])
    assert at.text_input(key="tw_dir").value == str(tmp_path / "results")  # local: a field to look elsewhere
    at.text_input(key="tw_dir").set_value(str(tmp_path / "nothing-here")).run()
    assert not at.exception and any("No `two_worlds.*.json` in" in plain(i.value) for i in at.info)
    monkeypatch.setattr(ui, "server_address", lambda: "0.0.0.0")
    at = two_worlds_app(monkeypatch, tmp_path / "results", roots["empty"])
    assert not at.exception and not [t for t in at.text_input if t.key == "tw_dir"]
    assert any("fixed" in plain(c.value) and str(tmp_path / "results") in plain(c.value) for c in at.caption)


def test_two_worlds_load_refuses_large_and_tolerates_malformed_files(tmp_path):
    path = tmp_path / "two_worlds.x.json"
    path.write_text(json.dumps({"cells": {}}), encoding="utf-8")
    assert two_worlds.load_summary(path) == ({"cells": {}}, None)
    summary, error = two_worlds.load_summary(path, max_bytes=5)
    assert summary is None and error.startswith("two_worlds.x.json is") and "MB limit: not read" in error
    path.write_bytes(b"\xff\xfe")
    assert "not valid JSON" in two_worlds.load_summary(path)[1]
    assert (
        "Could not read two_worlds.missing.json"
        in two_worlds.load_summary(tmp_path / "two_worlds.missing.json")[1]
    )
    # junk in every place the view reads: no exception, and each figure still builds
    junk = {"cells": {"paper-world/adamw": {"runs": [1, {"label": 3, "reward": [[1], "x", [2, None]]}],
                                            "verdict": {"pairs": ["x", 1]}, "auto_alpha": [],
                                            "labels": {"delta_l": 5}},
                      "digitsum/adamw": "nope"},
            "worlds": {"paper-world": {"cv": [1], "cv_theory": {"grpo": "x"}, "variance_fit": {"exponent": "k"}}},
            "machine": "box"}  # fmt: skip
    assert two_worlds.missing(junk)
    for build in (two_worlds.reward_grid_figure, two_worlds.cv_figure, two_worlds.fit_figure,
                  two_worlds.alpha_figure, two_worlds.scores_table, two_worlds.cv_table, two_worlds.ratio_table,
                  two_worlds.fit_table, two_worlds.header):  # fmt: skip
        build(junk)
    assert two_worlds.verdict_of(junk["cells"]["paper-world/adamw"])[0] is None


def test_two_worlds_figures_use_the_lab_colours_and_the_overview_verdict(tmp_path):
    summary, _ = two_worlds.load_summary(two_worlds_file(tmp_path))
    grid = two_worlds.reward_grid_figure(summary)
    lines = [t for t in grid.data if t.mode == "lines" and t.showlegend is not False and t.fill is None]
    assert {t.name: t.line.color for t in lines} == {
        colors.display_name(label): colors.color_for(label)
        for label in ("dr_grpo", "delta_l", two_worlds.AUTO_LABEL)
    }
    curve = two_worlds.seed_curve(
        [r for r in summary["cells"]["paper-world/adamw"]["runs"] if r["label"] == "delta_l"]
    )
    assert len(curve) == 30 and (curve["n"] == 10).all() and (curve["lo"] <= curve["mean"]).all()
    verdict, source = two_worlds.verdict_of(summary["cells"]["paper-world/adamw"])
    assert "predates the multiple-test correction" in source and two_worlds.has_holm(verdict)
    stored = summary["cells"]["paper-world/adamw"]["verdict"]["pairs"][0]
    assert verdict["pairs"][0]["ci"] == pytest.approx(stored["ci"])  # the same computation as the benchmark's
    fig = two_worlds.cell_verdict_figure(verdict)  # the Overview's picture, titled for half a row
    assert [t.name for t in fig.data] == [t.name for t in overview.verdict_figure(verdict).data]
    assert fig.layout.title.text.startswith("0 of 3 distinguishable after Holm, 10 seed(s)")
    notes = [a for a in grid.layout.annotations if a.text == "not in this file"]
    panels = [(grid.layout[f"xaxis{i}"].domain, grid.layout[f"yaxis{i}"].domain) for i in (2, 4)]
    assert [(a.x, a.y) for a in notes] == [((x0 + x1) / 2, (y0 + y1) / 2) for (x0, x1), (y0, y1) in panels]
    auto, source = two_worlds.verdict_of(summary["cells"]["digitsum/adamw"], "auto")
    assert {p["a"] for p in auto["pairs"]} | {p["b"] for p in auto["pairs"]} == {
        "delta_l",
        two_worlds.AUTO_LABEL,
    }
    fit = two_worlds.fit_table(summary)
    assert (fit["at the search edge"] == "yes").any() == bool(
        (fit["k"].abs() >= two_worlds.K_BRACKET - 0.01).any()
    )
