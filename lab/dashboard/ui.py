"""Streamlit rendering of the seven views. The figures come from the view modules (no streamlit there)."""

from __future__ import annotations

import argparse
import os
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import plotly.graph_objects as go
import streamlit as st

from lab.aggregation import LENGTH_DISTRIBUTIONS
from lab.aggregators import AGGREGATORS, DEFAULT_AGGREGATORS
from lab.dashboard import launch, lengths, noise, overview, playground, two_worlds, weights
from lab.dashboard.colors import display_name
from lab.dashboard.data import RunData, RunStore, group_by_label
from lab.dashboard.safe import md, sanitize_figure
from lab.tasks import FAST

VIEWS = ("Overview", "Lengths", "Gradient noise", "Weights", "Two worlds", "Estimator playground", "Launch")
DEFAULT_RUNS_DIR = "runs"
PLOTLY_CONFIG = {"displaylogo": False}


@dataclass
class Settings:
    """Sidebar choices shared by the run views."""

    runs_dir: Path
    selected: list[tuple[str, Path]]  # (comparison, run dir)
    window: int = 1
    refresh_s: float = 3.0
    network: bool = False  # served beyond localhost: runs dir fixed, Launch needs the token


# -------------------------------------------------------------------------------------------------------
# where the server listens (from streamlit's own config: CLI flags, .streamlit/config.toml; never the URL)
# -------------------------------------------------------------------------------------------------------
def server_address() -> str | None:
    """``server.address`` the server was started with (None or "": every interface)."""
    return st.get_option("server.address")


def served_on_network() -> bool:
    """True unless the server listens on a loopback address only."""
    return not launch.is_loopback(server_address())


# -------------------------------------------------------------------------------------------------------
# runs dir, session state
# -------------------------------------------------------------------------------------------------------
def runs_dir_from_args(argv: Sequence[str], env: dict[str, str] | os._Environ) -> str:
    """``--runs-dir`` after ``streamlit run app.py --``, else ``LAB_RUNS_DIR``, else ``runs``."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--runs-dir")
    known, _ = parser.parse_known_args(list(argv))
    return known.runs_dir or env.get("LAB_RUNS_DIR") or DEFAULT_RUNS_DIR


def store() -> RunStore:
    """The session's RunStore: readers live across reruns, so each refresh reads only new lines."""
    if "run_store" not in st.session_state:
        st.session_state["run_store"] = RunStore()
    return st.session_state["run_store"]


def chart(fig: go.Figure, key: str) -> None:
    st.plotly_chart(sanitize_figure(fig), width="stretch", key=key, config=PLOTLY_CONFIG)


def empty_runs_message(runs_dir: Path) -> str:
    return (
        f"No runs in {md(runs_dir)}. Start one: `lab compare --out DIR` or use the **Launch** tab. "
        "Meanwhile, the **Estimator playground** needs no run."
    )


# -------------------------------------------------------------------------------------------------------
# live wrapper
# -------------------------------------------------------------------------------------------------------
def live_view(name: str, render: Callable[[list[RunData], Settings], None], settings: Settings) -> None:
    """Render a run view inside a fragment that re-polls every few seconds while any run is running."""
    runs = store().load(settings.selected)
    live = any(r.is_live for r in runs)

    @st.fragment(run_every=settings.refresh_s if live else None)
    def body() -> None:
        current = store().load(settings.selected)
        for run in current:
            for message in run.warnings():
                st.warning(md(message))
        if not current:
            st.caption("This view needs at least one run: pick some in the sidebar.")
            return
        if any(r.is_live for r in current):
            st.caption(f"Live: refreshing every {settings.refresh_s:g} s (only new log lines are read).")
        render(current, settings)
        if live and not any(r.is_live for r in current):
            st.rerun()  # every run stopped: a full rerun drops the timer

    body()


# -------------------------------------------------------------------------------------------------------
# views
# -------------------------------------------------------------------------------------------------------
def render_overview(runs: list[RunData], s: Settings) -> None:
    groups = group_by_label(runs)
    render_verdict(groups)
    band = st.radio("Band over seeds", list(overview.SEED_BANDS), format_func=overview.SEED_BANDS.get,
                    horizontal=True, key="ov_band")  # fmt: skip
    chart(overview.reward_figure(groups, window=s.window, seed_band=band), "ov_reward")
    st.caption(overview.reward_band_caption(groups))
    left, right = st.columns(2)
    with left:
        chart(overview.eval_figure(groups, metric="avg_at_k"), "ov_avg")
    with right:
        chart(overview.eval_figure(groups, metric="pass_at_k"), "ov_pass")
    st.subheader("Final scores")
    table = overview.scores_table(groups)
    st.dataframe(table, hide_index=True, width="stretch")
    st.caption(
        "final reward: mean over the last 10% of logged steps. Monotonicity: `lab.evaluation.monotonicity_score`"
        + "."
    )


def render_verdict(groups) -> None:
    verdict, source = overview.comparison_verdict(groups)
    st.subheader("Verdict")
    if verdict is None:
        st.caption(md(source))
        return
    n_yes, n_tests = overview.verdict_summary(verdict)
    reach = overview.mde_range(verdict)
    reach = (
        f" With these seeds a pair could only see differences of ≥ {reach[0]:.3f} to {reach[1]:.3f}."
        if reach
        else ""
    )
    st.markdown(
        f"**{n_yes} of {n_tests}** differences are distinguishable from seed noise at {md(verdict.get('seeds', 0))} "
        f"seed(s), after a Holm–Bonferroni correction over all {n_tests} tests.{reach} A tie is a finding only "
        "as far as the MDE reaches: a smaller true difference would likely read as a tie too."
    )
    chart(overview.verdict_figure(verdict), "ov_verdict")
    st.caption(
        "Dot: the mean over seeds of the paired difference a − b (filled red: distinguishable after Holm; open "
        "grey: not detected). Bar: the family-wise t-interval (Bonferroni level, all intervals hold together "
        "with 95% probability; Holm marks every pair whose bar excludes 0, and may mark more). Shaded: ± the "
        "pair's minimum detectable difference (80% power at the corrected level, from the seed-to-seed spread)."
    )
    st.dataframe(overview.verdict_table(verdict), hide_index=True, width="stretch")
    left_out = verdict.get("left_out_metrics") or {}
    left = "".join(f" Metric {md(name)} left out: {md(why)}." for name, why in left_out.items())
    st.caption(f"Verdict {md(source)}. {md(verdict.get('method', ''))} {md(verdict.get('note', ''))}{left}")


def _step_picker(steps: list[int], key: str) -> int:
    follow = st.checkbox("Follow the latest step", value=True, key=f"{key}_follow")
    if follow or len(steps) == 1:
        return steps[-1]
    return st.select_slider("Step", options=steps, value=steps[-1], key=f"{key}_step")


def render_lengths(runs: list[RunData], s: Settings) -> None:
    groups = group_by_label(runs)
    steps = lengths.all_sample_steps(runs)
    if steps:
        step = _step_picker(steps, "len")
        chart(lengths.distribution_figure(runs, step), "len_dist")
        slices = st.slider("Steps shown over time", 3, 30, 10, key="len_slices")
        chart(lengths.violin_over_time(groups, slices=slices), "len_violin")
    else:
        st.info("No samples.jsonl yet: per-step distributions appear once a run logs its first batch.")
    left, right = st.columns(2)
    with left:
        chart(lengths.mean_max_figure(groups, window=s.window), "len_meanmax")
    with right:
        chart(lengths.truncation_figure(groups, window=s.window), "len_trunc")


def _pick_run(runs: list[RunData], key: str, prefer: str | None = None) -> RunData:
    ids = [r.run_id for r in runs]
    default = next((i for i, r in enumerate(runs) if r.aggregator == prefer), 0)
    chosen = st.selectbox("Run", ids, index=default, key=key)
    return runs[ids.index(chosen)] if chosen in ids else runs[0]


def render_noise(runs: list[RunData], s: Settings) -> None:
    st.caption(
        "Theoretical CV from `lab.aggregation.estimator_stats` on each step's lengths, assuming Var(g_i) = V·L_i "
        "(V = |∇J| = 1: compare ratios, not levels). Probes measure it on the real model."
    )
    chart(noise.own_cv_figure(group_by_label(runs), window=s.window), "noise_own")
    run = _pick_run(runs, "noise_run")
    left, right = st.columns(2)
    with left:
        chart(noise.gradient_cosine_figure(run, window=s.window), "noise_cos")
    with right:
        chart(noise.gradient_norm_ratio_figure(run, window=s.window), "noise_ratio")
    st.caption(
        "The four aggregators' gradients on the same batch of this run (`agg_grad/*`, logged with "
        "`--compare-gradients-every`). With batch-scope weights GRPO and ΔL(α=1) point the same way (cosine 1) "
        "and differ by the scalar M·mean(1/L) that changes every step; so do DAPO and Dr. GRPO (N·M/ΣL). Adam "
        "largely absorbs such a scalar, SGD does not (`--optimizer sgd`, `--equalize-step-size`)."
    )
    chart(noise.counterfactual_figure(run, window=s.window), "noise_cf")
    probes = noise.valid_probes(run)
    if not probes:
        st.info(f"No gradient probes in {md(run.run_id)} (probes.jsonl): enable probing in the trainer to measure "
                "Var(g_i) against L_i.")  # fmt: skip
        return
    steps = [p.get("step") for p in probes]
    index = st.select_slider("Probe step", options=list(range(len(probes))), value=len(probes) - 1,
                             format_func=lambda i: str(steps[i]), key="noise_probe")  # fmt: skip
    chart(noise.variance_scatter(run, probes[index]), "noise_scatter")


def render_weights(runs: list[RunData], s: Settings) -> None:
    with_samples = [r for r in runs if r.batches]
    if not with_samples:
        st.info("No samples.jsonl yet: the weights are recomputed from a logged step's lengths.")
        return
    run = _pick_run(with_samples, "w_run", prefer="delta_l")
    step = _step_picker(run.sample_steps, "w")
    batch = run.batch_at(step)
    assert batch is not None
    alpha = st.slider("α", 0.0, 2.0, float(min(run.alpha, 2.0)), 0.05, key="w_alpha")
    left, right = st.columns(2)
    with left:
        chart(weights.weights_figure(batch, alpha, run.max_completion_length, logged=run.aggregator == "delta_l"),
              "w_weights")  # fmt: skip
    with right:
        chart(weights.alpha_sweep_figure(batch, run.max_completion_length, alpha), "w_sweep")
    if any(r.alpha_is_auto for r in runs):
        chart(weights.alpha_over_steps_figure(group_by_label(runs), window=s.window), "w_alpha_steps")
    st.caption(
        "Recomputed with `lab.aggregation.sequence_weights` over the whole batch (as the official code), "
        "normalized to mean 1. α=0 is Dr. GRPO (equal weights); α=1 is inverse-variance weighting."
    )


@st.cache_data(max_entries=4, show_spinner=False)
def _two_worlds_summary(path: str, mtime_ns: int, size: int) -> tuple[dict | None, str | None]:
    """The file, read again only when it changed (mtime and size are the cache key)."""
    return two_worlds.load_summary(Path(path))


def render_two_worlds(network: bool = False) -> None:
    """The stored 2x2 benchmark (benchmarks/two_worlds.py): needs no run, only its JSON file."""
    default = two_worlds.results_dir(os.environ)
    if network:  # a visitor may not browse other folders of this machine
        folder = default
        st.caption(f"Results dir: {md(folder)} (fixed: the dashboard is served on the network; set it with "
                   f"`{two_worlds.RESULTS_ENV}` at start).")  # fmt: skip
    else:
        given = st.text_input(f"Results dir (`{two_worlds.RESULTS_ENV}`)", str(default), key="tw_dir").strip()
        folder = Path(given).expanduser() if given else default
    files = two_worlds.result_files(folder)
    if not files:
        st.info(
            f"No `{two_worlds.PATTERN}` in {md(folder)}: `benchmarks/two_worlds.py --json FILE` writes one."
        )
        return
    names = [p.name for p in files]
    name = st.selectbox("Stored file", names, key="tw_file") if len(names) > 1 else names[0]
    path = files[names.index(name)] if name in names else files[0]
    try:
        stat = path.stat()
    except OSError as err:
        st.error(f"Could not read {md(path.name)}: {md(err.strerror or err)}.")
        return
    summary, error = _two_worlds_summary(str(path), stat.st_mtime_ns, stat.st_size)
    if summary is None:
        st.error(md(error))
        return
    head = two_worlds.header(summary)
    st.caption(f"{md(path.name)}: " + "; ".join(f"{md(k)} {md(v)}" for k, v in head.items()))
    notes = two_worlds.missing(summary)
    if notes:
        st.caption("Missing (shown as empty): " + " ".join(md(n) for n in notes))
    chart(two_worlds.reward_grid_figure(summary), "tw_rewards")
    st.caption(
        "Rows: the world (paper world: the positive control, where length and advantage are built to "
        "matter; digitsum: the lab's fast task). Columns: the optimizer (SGD with `--equalize-step-size` "
        "keeps the aggregator's gradient scale, which Adam largely absorbs). ΔL(auto), when stored, is dashed."
    )
    st.dataframe(two_worlds.scores_table(summary), hide_index=True, width="stretch")
    _two_worlds_verdicts(summary)
    _two_worlds_noise(summary)
    st.subheader("ΔL(auto): α over steps")
    if two_worlds.has_alpha(summary):
        chart(two_worlds.alpha_figure(summary), "tw_alpha")
        st.caption("α re-estimated from the gradient probes during training (`--alpha auto`).")
    else:
        st.caption("No ΔL(auto) runs with α per step in this file (`benchmarks/two_worlds.py --auto-alpha`).")


def _two_worlds_verdicts(summary: dict) -> None:
    st.subheader("Verdict per cell")
    have = two_worlds.cells(summary)
    for world in two_worlds.WORLDS:
        columns = st.columns(len(two_worlds.OPTIMIZERS))
        for column, optimizer in zip(columns, two_worlds.OPTIMIZERS, strict=True):
            name = f"{world}/{optimizer}"
            with column:
                st.markdown(f"**{md(two_worlds.cell_title(name))}**")
                if name not in have:
                    st.caption("Not in this file yet.")
                    continue
                for part, title in (("", ""), ("auto", "ΔL(auto) vs ΔL and Dr. GRPO: ")):
                    if part == "auto" and "auto_alpha" not in have[name]:
                        continue
                    verdict, source = two_worlds.verdict_of(have[name], part)
                    if verdict is None:
                        st.caption(md(title + source))
                        continue
                    chart(two_worlds.cell_verdict_figure(verdict, title), f"tw_verdict_{name}_{part}")
                    st.dataframe(two_worlds.compact_verdict_table(verdict), hide_index=True, width="stretch")
                    st.caption(md(f"{title}verdict {source}."))
    st.caption(
        "As in the Overview: dot = mean paired difference a − b over seeds (filled red: distinguishable after "
        "Holm), bar = family-wise t-interval, shade = ± the pair's MDE (80% power). A tie is a finding only as "
        "far as the MDE reaches."
    )


def _two_worlds_noise(summary: dict) -> None:
    st.subheader("Per world: measured vs theoretical CV, and the variance exponent k")
    chart(two_worlds.cv_figure(summary), "tw_cv")
    st.caption(
        "One large batch of each world's warm model. The theoretical CV assumes Var(g_i) = V·L_i with "
        "V = |∇J| = 1, a unit choice: its level does not compare with the measured one, only the RATIO between "
        "aggregators does. Each bar is an aggregator's CV divided by ΔL(α=1)'s, measured beside theory."
    )
    left, right = st.columns(2)
    with left:
        st.dataframe(two_worlds.cv_table(summary), hide_index=True, width="stretch")
    with right:
        st.dataframe(two_worlds.ratio_table(summary), hide_index=True, width="stretch")
    chart(two_worlds.fit_figure(summary), "tw_fit")
    st.dataframe(two_worlds.fit_table(summary), hide_index=True, width="stretch")
    st.caption(
        f"k of Var(g_i) = c·L_i^k fitted by least squares (`lab.probes.statistics.power_law_exponent`, searched "
        f"in [−{two_worlds.K_BRACKET:g}, {two_worlds.K_BRACKET:g}]), 95% bootstrap interval over prompt groups. "
        "A k or bound at the search edge means the data did not pin k down there. The theory above takes k = 1; "
        "the ratio table also gives the theory at the fitted k."
    )


@st.cache_data(max_entries=32, show_spinner=False)
def _playground_data(settings: playground.PlaygroundSettings) -> tuple:
    group = playground.draw_group(settings)
    sim = playground.simulate(settings, group)
    sim = {m: {k: v for k, v in r.items() if k != "scale"} for m, r in sim.items()}
    return group, sim


def render_playground() -> None:
    st.markdown(
        "Each aggregator is a weighted sum ĝ = Σ x_i g_i of per-response gradients with Var(g_i) = V·L_i. "
        "Pick a length distribution and see the weights, the scale E = M·Σx_i (1 = unbiased), Var and CV, "
        "and a Monte Carlo check. M = the max length."
    )
    c1, c2, c3, c4 = st.columns(4)
    alpha = c1.slider("α (ΔL)", 0.0, 2.0, 1.0, 0.05, key="pg_alpha")
    group_size = c2.slider("Group size G", 2, 64, 8, key="pg_g")
    distribution = c3.selectbox("Length distribution", LENGTH_DISTRIBUTIONS, key="pg_dist")
    seed = c4.number_input("Seed", 0, 10_000, 0, key="pg_seed")
    lo, hi = st.slider("Min / max length (M = max)", 1, 8192, (50, 3000), key="pg_range")
    n_trials = c4.select_slider("Monte Carlo trials", [500, 1000, 2000, 4000, 10000], 4000, key="pg_trials")
    token_variance = c2.select_slider(
        "Token variance V",
        [1e-4, 1e-3, 1e-2, 1e-1, 1.0],
        1e-3,
        key="pg_v",
        help="Var(g_i) = V·L_i with |∇J| = 1: sets the noise level of the histogram.",
    )
    redraw = c3.checkbox("Redraw lengths every trial", False, key="pg_redraw",
                         help="Shows the bias: GRPO's and DAPO's mean moves with the sampled lengths.")  # fmt: skip
    settings = playground.PlaygroundSettings(
        alpha=alpha, group_size=group_size, distribution=distribution, min_length=lo, max_length=hi,
        n_trials=int(n_trials), redraw_lengths=redraw, token_variance=float(token_variance), seed=int(seed),
    )  # fmt: skip
    group, sim = _playground_data(settings)
    chart(playground.lengths_figure(settings, group), "pg_lengths")
    st.dataframe(playground.stats_table(settings, group, sim), hide_index=True, width="stretch")
    left, right = st.columns(2)
    with left:
        chart(playground.weights_figure(settings, group), "pg_weights")
    with right:
        chart(playground.histogram_figure(settings, sim), "pg_hist")


def _current_launch() -> launch.Launch | None:
    return st.session_state.get("launch")


def render_launch(runs_dir: Path, network: bool = False) -> None:
    if network and not _launch_unlocked():
        return
    current = _current_launch()
    if current is None or not current.running:
        _launch_form(runs_dir)
    if current is not None:
        _launch_progress(current)


def _launch_unlocked() -> bool:
    """On the network, Launch needs ``LAB_LAUNCH_TOKEN``: unset, the tab is disabled; set, it is asked for."""
    token = launch.launch_token()
    if token is None:
        st.warning(
            f"**Launch is disabled**: this dashboard is served on the network (server.address = "
            f"`{server_address() or 'every interface'}`), and anyone who reaches it could start jobs on this "
            f"machine. To enable it, restart with `{launch.TOKEN_ENV}` set to a secret of at least "
            f"{launch.MIN_TOKEN_LENGTH} characters, or serve on localhost only (`lab dashboard`)."
        )
        return False
    if st.session_state.get("launch_unlocked"):
        return True
    st.info(f"This dashboard is served on the network: type the launch token (`{launch.TOKEN_ENV}`).")
    given = st.text_input("Launch token", "", type="password", key="ln_token")
    if given:
        if launch.token_matches(given, token):
            st.session_state["launch_unlocked"] = True  # server-side, per browser session
            st.rerun()
        time.sleep(1.0)  # slows guessing down
        st.error("Wrong launch token.")
    return False


def _launch_form(runs_dir: Path) -> None:
    st.markdown(
        "Start `lab compare` as a subprocess (an argument list, no shell). Runs appear in the other tabs."
    )
    default_name = st.session_state.setdefault("launch_default_name", time.strftime("compare-%Y%m%d-%H%M%S"))
    name = st.text_input("Comparison name (a new folder in the runs dir)", default_name, key="ln_name")
    aggregators = st.multiselect("Aggregators", list(AGGREGATORS), default=list(DEFAULT_AGGREGATORS), key="ln_aggs",
                                 format_func=display_name)  # fmt: skip
    c1, c2, c3, c4 = st.columns(4)
    steps = c1.number_input("Steps", 1, launch.MAX_STEPS, FAST["steps"], key="ln_steps")
    seeds = c2.number_input("Seeds per aggregator", 1, launch.MAX_SEEDS, FAST["seeds"], key="ln_seeds")
    alpha = c3.number_input("ΔL α", 0.0, launch.MAX_ALPHA, 1.0, 0.05, key="ln_alpha")
    model = c4.text_input("Model: a preset or a local folder (empty: the fast task's model)", "", key="ln_model",
                          help="smollm2-135m runs the real-model CountDown demo: about a minute per step on a "
                          "CPU, so lower Steps and Seeds for it.")  # fmt: skip
    extra = st.text_input("Extra `lab compare` arguments (e.g. --probe-every 10)", "", key="ln_extra")
    try:
        plan = launch.plan_launch(runs_dir, name, aggregators, steps=int(steps), seeds=int(seeds), model=model,
                                  alpha=float(alpha), extra=extra)  # fmt: skip
    except ValueError as err:
        st.error(f"Not started: {md(err)}")
        return
    st.code(shlex.join(plan.args), language="bash")
    if st.button("Start", type="primary", key="ln_start"):
        try:
            st.session_state["launch"] = launch.Launch(plan.args, plan.out).start(cwd=Path.cwd())
        except OSError as err:
            st.error(f"Could not start {md(plan.args[0])}: {md(err)}")
            return
        st.rerun()


def _launch_progress(current: launch.Launch) -> None:
    was_running = current.running

    @st.fragment(run_every=2.0 if was_running else None)
    def progress() -> None:
        code = current.returncode
        if was_running and code is not None:
            st.rerun()  # it ended: a full rerun stops the timer and lists the new runs
        state = "running" if code is None else f"exited with code {code}"
        st.markdown(
            f"**Launch** {md(current.out)}: {state} (pid {current.process.pid if current.process else '?'})"
        )
        if current.running and st.button("Stop", key="ln_stop"):
            current.stop()
            st.rerun()
        table = launch.progress_table(current.out)
        for row in table.itertuples():
            st.progress(
                float(row.progress),
                text=md(f"{row.run}: {row.state}, step {row.step}/{row.max_steps or '?'}"),
            )
        st.code(current.tail() or "(no output yet)", language="text")
        if code is not None and st.button("Clear", key="ln_clear"):
            del st.session_state["launch"]
            st.rerun()

    progress()
