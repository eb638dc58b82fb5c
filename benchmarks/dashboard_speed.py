"""Dashboard speed: 4 runs × 2,000 steps × 64 completions (SYNTHETIC logs from lab/synthetic_runs.py).

Measures, as medians over several repeats:

- first render: a fresh session's data loading (every line parsed) + the Overview figures built and
  serialized to JSON (what ``st.plotly_chart`` ships), and the same for each other view;
- live refresh: one new step appended to the running run, then poll (new lines only) + Overview figures;
- the same two through streamlit's AppTest (the whole script: sidebar, tabs, charts), unless --no-apptest.

Targets (issue 5): first render <= 2 s, refresh <= 0.3 s.

    .venv/bin/python benchmarks/dashboard_speed.py [--dir /tmp/dl-bench] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lab.aggregators import DEFAULT_AGGREGATORS  # noqa: E402
from lab.dashboard import lengths, noise, overview, weights  # noqa: E402
from lab.dashboard.data import RunData, RunStore, group_by_label  # noqa: E402
from lab.runlog import STATUS, RunWriter  # noqa: E402
from lab.synthetic_runs import SyntheticRun, append_step, no_fsync, write_run  # noqa: E402

STEPS, PROMPTS, GENERATIONS = 2000, 8, 8  # 64 completions per step
AGGREGATORS = DEFAULT_AGGREGATORS  # the lab's four
LIVE = "delta_l"  # this run is "running" and receives the new steps


def spec(aggregator: str) -> SyntheticRun:
    state = "running" if aggregator == LIVE else "finished"
    return SyntheticRun(
        aggregator, steps=STEPS, max_steps=STEPS * 2 if state == "running" else STEPS, num_prompts=PROMPTS,
        num_generations=GENERATIONS, max_completion_length=1024, eval_every=50, probe_every=100, state=state,
    )  # fmt: skip


def generate(root: Path) -> None:
    """Write the 4 runs once (fsync skipped while generating; reading is unaffected)."""
    if (root / "bench" / f"{LIVE}-s0" / STATUS).exists():
        return
    t = time.perf_counter()
    with no_fsync():
        for aggregator in AGGREGATORS:
            write_run(root, spec(aggregator), comparison="bench")
    size = sum(f.stat().st_size for f in root.rglob("*.jsonl")) / 1e6
    print(f"generated 4 runs x {STEPS} steps x {PROMPTS * GENERATIONS} completions: {size:.0f} MB "
          f"in {time.perf_counter() - t:.0f} s")  # fmt: skip


def run_dirs(root: Path) -> list[tuple[str, Path]]:
    return [("bench", root / "bench" / f"{a}-s0") for a in AGGREGATORS]


def overview_figures(runs: list[RunData]) -> int:
    """Build and serialize the Overview view; returns the JSON size."""
    groups = group_by_label(runs)
    figs = [
        overview.reward_figure(groups),
        overview.eval_figure(groups),
        overview.eval_figure(groups, metric="pass_at_k"),
    ]
    overview.scores_table(groups)
    return sum(len(f.to_json()) for f in figs)


def other_views(runs: list[RunData]) -> dict[str, Callable[[], object]]:
    groups = group_by_label(runs)
    live = next(r for r in runs if r.aggregator == LIVE)
    batch = live.batch_at(live.sample_steps[-1])
    return {
        "lengths": lambda: [f.to_json() for f in (
            lengths.distribution_figure(runs, batch.step), lengths.violin_over_time(groups),
            lengths.mean_max_figure(groups), lengths.truncation_figure(groups))],
        "gradient noise": lambda: [f.to_json() for f in (
            noise.own_cv_figure(groups), noise.counterfactual_figure(live),
            noise.variance_scatter(live, noise.valid_probes(live)[-1]))],
        "weights": lambda: [f.to_json() for f in (
            weights.weights_figure(batch, 0.75, 1024, logged=True), weights.alpha_sweep_figure(batch, 1024, 0.75))],
    }  # fmt: skip


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_data_layer(root: Path, repeats: int) -> dict[str, float]:
    first, load_only, refresh = [], [], []
    for _ in range(repeats):
        store = RunStore()
        t = time.perf_counter()
        runs = store.load(run_dirs(root))
        load_only.append(time.perf_counter() - t)
        overview_figures(runs)
        first.append(time.perf_counter() - t)
    views = {
        name: statistics.median(timed(fn) for _ in range(repeats)) for name, fn in other_views(runs).items()
    }
    live = next(r for r in runs if r.aggregator == LIVE)
    writer, rng = RunWriter(live.run_dir), np.random.default_rng(0)
    step = int(live.metrics["step"].max())
    for _ in range(repeats * 2):
        step += 1
        append_step(writer, spec(LIVE), step, rng)
        t = time.perf_counter()
        runs = store.load(run_dirs(root))
        overview_figures(runs)
        refresh.append(time.perf_counter() - t)
    out = {"first render (load + Overview figures)": statistics.median(first),
           "  of which loading/parsing": statistics.median(load_only),
           "refresh, 1 new step (poll + Overview figures)": statistics.median(refresh)}  # fmt: skip
    out.update({f"  {name} view figures (data loaded)": v for name, v in views.items()})
    return out


def bench_apptest(root: Path, repeats: int) -> dict[str, float]:
    from streamlit.testing.v1 import AppTest

    os.environ["LAB_RUNS_DIR"] = str(root)
    first, rerun = [], []
    for i in range(repeats):
        at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
        first.append(timed(at.run))
        assert not at.exception, [e.value for e in at.exception]
        if i == 0:
            continue  # the very first run also imports the modules
        live = root / "bench" / f"{LIVE}-s0"
        store = at.session_state["run_store"]
        step = int(store.get(live).metrics["step"].max())
        append_step(RunWriter(live), spec(LIVE), step + 1, np.random.default_rng(step))
        rerun.append(timed(at.run))
    return {"AppTest first run (fresh session, whole script)": statistics.median(first[1:]),
            "AppTest rerun after 1 new step (whole script)": statistics.median(rerun)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "lab-dashboard-bench")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-apptest", action="store_true")
    args = parser.parse_args()
    generate(args.dir)
    results = bench_data_layer(args.dir, args.repeats)
    if not args.no_apptest:
        results.update(bench_apptest(args.dir, args.repeats + 1))
    print(
        f"\nmedians over {args.repeats} repeats (refresh: {args.repeats * 2}); targets: first <= 2 s, refresh <= 0.3 s"
    )
    for name, seconds in results.items():
        print(f"{name:<52} {seconds:7.3f} s")


if __name__ == "__main__":
    main()
