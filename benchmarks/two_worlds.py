"""The 2x2 that teaches: {digitsum, paper world} x {AdamW, SGD with --equalize-step-size}, four aggregators each.

What it runs
    One ``lab compare`` per cell (a subprocess, the cell's preset: ``fast`` for digitsum, ``paper-world``),
    four aggregators x ``--seeds`` seeds, two single-threaded workers, with the pass-through flags after
    ``--``. Defaults chosen for the 2-core budget (<= 40 min for all four cells): ``--steps 30`` (the
    presets train 60), a gradient probe every 10 steps, no per-step gradient comparison, no checkpoints.
    Paper world first: it is the positive control.

What it stores (``--json``)
    Per cell: the exact command, wall time, load before/after, exit code; the verdict of its runs
    (:func:`lab.verdict.compare_runs`, recomputed from the run logs whenever this file is re-summarized);
    per aggregator and seed the reward curve, the mean-length curve and the held-out reward
    (``eval/heldout_reward``); the probes' summary (median measured and theoretical CV, exponent); the
    length spread at step 1 and, for each world, :mod:`lab.worlds`' structure measurements: corr(A, L) and
    E[A^2 | L] by length bin, the Var(g_i)-vs-L_i fit of the step-1 probes (k, slope, intercept with 95%
    intervals), and one large batch of the warm model (``--measure-rows`` completions) with the measured
    CV of every aggregator beside its theoretical CV on the same lengths.

Usage::

    nice -n 5 .venv/bin/python benchmarks/two_worlds.py --out runs/two_worlds \\
        --json benchmarks/results/two_worlds.2core.json                     # the full 2x2 (10 seeds)
    .venv/bin/python benchmarks/two_worlds.py --out /tmp/tw --seeds 2 --steps 5 --measure-rows 64   # smoke
    .venv/bin/python benchmarks/two_worlds.py --out runs/two_worlds --json X --resummarize       # no training
    nice -n 5 .venv/bin/python benchmarks/two_worlds.py --out runs/two_worlds --json X --auto-alpha \
        -- --probe-every 15                                   # then ΔL(auto) per cell, beside ΔL and Dr. GRPO
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # fast_compare's run-log summaries

from lab.runlog import RunReader, list_runs

TARGET_S = 40 * 60
WORLDS = {"paper-world": "paper-world", "digitsum": "fast"}  # world -> lab preset
OPTIMIZERS = {
    "adamw": ["--optimizer", "adamw"],
    "sgd-equalized": ["--optimizer", "sgd", "--equalize-step-size"],
}
CELL_DEFAULTS = ["--probe-every", "10", "--compare-gradients-every", "0", "--save-every", "100000"]
HELDOUT = "eval/heldout_reward"
# --auto-alpha: ΔL(auto) in its own comparison per cell (it probes every 3 steps to feed its α; the cell's
# four aggregators probe rarely), paired by seed with the cell's ΔL(α=1) and Dr. GRPO runs
AUTO_LABEL = "delta_l-aauto"
AUTO_FLAGS = ["--aggregators", AUTO_LABEL, "--probe-every", "3"]
AUTO_PARTNERS = ("dr_grpo", "delta_l")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder of the four comparison dirs")
    p.add_argument("--json", type=Path, default=None, help="write the summary here")
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--worlds", default=",".join(WORLDS), help=f"comma list of {', '.join(WORLDS)}")
    p.add_argument(
        "--optimizers", default=",".join(OPTIMIZERS), help=f"comma list of {', '.join(OPTIMIZERS)}"
    )
    p.add_argument(
        "--measure-rows", type=int, default=1024, help="completions of the large-batch CV measurement"
    )
    p.add_argument(
        "--resummarize", action="store_true", help="no training: summarize the runs in --out again"
    )
    p.add_argument(
        "--auto-alpha",
        action="store_true",
        help=f"per cell, train only {AUTO_LABEL} (same seeds) into <cell>-auto and pair it with the cell's "
        f"{' and '.join(AUTO_PARTNERS)} runs (cells[...]['auto_alpha']); the cells' own runs are kept",
    )
    args, extra = p.parse_known_args(argv)
    if extra and extra[0] == "--":
        extra = extra[1:]
    for name in ("worlds", "optimizers"):
        chosen = [x for x in getattr(args, name).split(",") if x]
        known = WORLDS if name == "worlds" else OPTIMIZERS
        bad = [x for x in chosen if x not in known]
        if bad or not chosen:
            p.error(f"--{name}: unknown {bad or chosen!r}; expected some of {', '.join(known)}")
        setattr(args, name, chosen)
    if args.seeds < 2 or args.steps < 1 or args.measure_rows < 16:
        p.error("need --seeds >= 2, --steps >= 1, --measure-rows >= 16")
    return args, extra


def cell_command(
    world: str, optimizer: str, out: Path, args: argparse.Namespace, extra: list[str]
) -> list[str]:
    command = [sys.executable, "-m", "lab.cli", "compare", "--preset", WORLDS[world], "--seeds", str(args.seeds),
               "--steps", str(args.steps), *CELL_DEFAULTS, *OPTIMIZERS[optimizer], *extra, "--out", str(out)]  # fmt: skip
    return [*command, "--resume"] if out.exists() else command


def run_dirs_of(out: Path) -> list[Path]:
    return [d for dirs in list_runs(out).values() for d in dirs]


def run_record(run_dir: Path) -> dict[str, Any]:
    """One run's curves (reward, mean length per step), its held-out reward and state."""
    reader = RunReader(run_dir)
    reader.poll()
    steps = [m for m in reader.metrics if isinstance(m.get("step"), int)]
    heldout = [m for m in steps if isinstance(m.get(HELDOUT), (int, float))]
    return {
        "run": run_dir.name,
        "label": reader.config.get("label"),
        "seed": reader.config.get("seed"),
        "state": reader.status.get("state"),
        "reward": [[m["step"], m.get("reward")] for m in steps],
        "mean_length": [[m["step"], m.get("completions/mean_length")] for m in steps],
        "alpha": [
            [m["step"], m["delta_l/alpha"]] for m in steps if isinstance(m.get("delta_l/alpha"), (int, float))
        ],
        "heldout_reward": heldout[-1][HELDOUT] if heldout else None,
        "heldout_reward_se": heldout[-1].get(f"{HELDOUT}_se") if heldout else None,
        "median_step_s": statistics.median(m["step_time"] for m in steps) if steps else None,
    }


def label_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per aggregator: mean over seeds of final reward (last 10% of steps), reward AUC and held-out reward,
    with the seed-to-seed standard deviation (the spread a verdict must see through)."""
    from lab.verdict import final_reward, reward_auc

    out: dict[str, Any] = {}
    for label in sorted({r["label"] for r in runs if r["label"]}):
        mine = [r for r in runs if r["label"] == label]
        values = {
            "final_reward": [final_reward(r["reward"]) for r in mine],
            "auc": [reward_auc(r["reward"]) for r in mine],
            "heldout_reward": [r["heldout_reward"] for r in mine if r["heldout_reward"] is not None],
        }
        out[label] = {k: _mean_sd(v) for k, v in values.items()}
        ses = [r["heldout_reward_se"] for r in mine if r["heldout_reward_se"] is not None]
        out[label]["heldout_sampling_se"] = statistics.mean(ses) if ses else None
    return out


def _mean_sd(values: list[float]) -> dict[str, float | int | None]:
    ok = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return {"mean": statistics.mean(ok) if ok else None,
            "sd": statistics.stdev(ok) if len(ok) > 1 else None, "n": len(ok)}  # fmt: skip


def summarize_cell(out: Path, group_size: int) -> dict[str, Any]:
    """Everything the JSON holds about one cell that the run logs determine (recomputable)."""
    from fast_compare import probe_summary

    from lab.verdict import compare_runs
    from lab.worlds import advantage_by_length, length_ratios, variance_fit_at_step

    dirs = run_dirs_of(out)
    runs = [run_record(d) for d in dirs]
    return {
        "runs": runs,
        "labels": label_summary(runs),
        "verdict": compare_runs(dirs),
        "probes": probe_summary(out),
        "length_ratio_step1": length_ratios(dirs, step=1),
        "advantage_by_length": advantage_by_length(dirs),
        "variance_fit_step1": variance_fit_at_step(dirs, step=1, group_size=group_size),
    }


def summarize_auto(out: Path, auto_out: Path) -> dict[str, Any]:
    """ΔL(auto) beside the cell's ΔL(α=1) and Dr. GRPO: their runs (with α per step) and their verdict."""
    from lab.verdict import compare_runs

    partners = [d for d in run_dirs_of(out) if RunReader(d).config.get("label") in AUTO_PARTNERS]
    dirs = partners + run_dirs_of(auto_out)
    runs = [run_record(d) for d in dirs]
    return {"runs": runs, "labels": label_summary(runs), "verdict": compare_runs(dirs)}


def measure_world(world: str, rows: int) -> dict[str, Any]:
    """The large-batch measurement of the world's warm model (lab.worlds.measure_batch), timed."""
    from lab.runner import RunConfig
    from lab.worlds import measure_batch

    c = RunConfig(preset=WORLDS[world]).resolved()
    started = time.perf_counter()
    result = measure_batch(
        c.model, c.task, prompts=max(2, rows // c.num_generations), num_generations=c.num_generations,
        max_length=c.max_completion_length, task_options=c.task_options,
    )  # fmt: skip
    result["seconds"] = time.perf_counter() - started
    return result


def machine() -> dict[str, Any]:
    import platform

    import torch

    return {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
            "python": platform.python_version(), "torch": torch.__version__}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    old = json.loads(args.json.read_text(encoding="utf-8")) if args.json and args.json.exists() else {}
    summary: dict[str, Any] = {
        **old,  # the cells and worlds not run this time are kept, as are the stored wall times
        # each pass keeps its own command (the --auto-alpha pass adds to the 2x2, it does not replace it)
        ("auto_alpha_command" if args.auto_alpha else "command"): "python benchmarks/two_worlds.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "seeds": args.seeds,
        "steps": args.steps,
        "cells": dict(old.get("cells", {})),
        "worlds": dict(old.get("worlds", {})),
    }
    started = time.perf_counter()
    code = 0
    for world in args.worlds:
        for optimizer in args.optimizers:
            name = f"{world}/{optimizer}"
            out = args.out / f"{world}-{optimizer}"
            cell = dict(summary["cells"].get(name, {}))
            if args.auto_alpha:
                cell["auto_alpha"] = dict(cell.get("auto_alpha", {}))
                code = code or run_cell(cell["auto_alpha"], name, world, optimizer, Path(f"{out}-auto"), args,
                                        [*extra, *AUTO_FLAGS])  # fmt: skip
            elif not args.resummarize:
                code = code or run_cell(cell, name, world, optimizer, out, args, extra)
            if out.exists():
                cell.update(summarize_cell(out, group_size=8))
            if Path(f"{out}-auto").exists():
                cell.setdefault("auto_alpha", {}).update(summarize_auto(out, Path(f"{out}-auto")))
            summary["cells"][name] = cell
            _write(args.json, summary)
        if world not in summary["worlds"] or not (args.resummarize or args.auto_alpha):
            print(f"[{world}] large-batch measurement ({args.measure_rows} completions)", flush=True)
            summary["worlds"][world] = measure_world(world, args.measure_rows)
            _write(args.json, summary)
    if not args.resummarize:
        key = "auto_alpha_wall_seconds" if args.auto_alpha else "wall_seconds"
        summary[key] = time.perf_counter() - started
        summary["target_seconds"] = TARGET_S
        summary["within_target"] = summary.get("wall_seconds", 0) <= TARGET_S
    summary["measured"] = time.strftime("%Y-%m-%d %H:%M:%S")
    _write(args.json, summary)
    print_table(summary)
    return code


def run_cell(
    record: dict[str, Any], name: str, world: str, optimizer: str, out: Path, args: argparse.Namespace,
    extra: list[str],
) -> int:  # fmt: skip
    """Train one comparison (a ``lab compare`` subprocess), recording its command, wall time and load."""
    command = cell_command(world, optimizer, out, args, extra)
    print(f"[{name}] running: {' '.join(command[1:])}", flush=True)
    record.update(lab_command=" ".join(command[1:]), load_before=os.getloadavg())
    t0 = time.perf_counter()
    record["exit_code"] = subprocess.call(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    record.update(wall_seconds=time.perf_counter() - t0, load_after=os.getloadavg())
    return record["exit_code"]


def _write(path: Path | None, summary: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=1, default=str), encoding="utf-8")


def print_table(summary: dict[str, Any]) -> None:
    """The 2x2 in one table: per cell and aggregator, final reward / AUC / held-out (mean ± sd over seeds)."""
    print(f"\n{'cell':<26} {'aggregator':<10} {'final reward':>15} {'reward AUC':>15} {'held-out':>15}")
    for name, cell in summary["cells"].items():
        for label, s in cell.get("labels", {}).items():
            parts = []
            for key in ("final_reward", "auc", "heldout_reward"):
                m, sd = s[key]["mean"], s[key]["sd"]
                parts.append(f"{m:.3f} ± {sd:.3f}" if m is not None and sd is not None else "n/a")
            print(f"{name:<26} {label:<10} {parts[0]:>15} {parts[1]:>15} {parts[2]:>15}")
        wall = cell.get("wall_seconds")
        if wall is not None:
            print(
                f"{name:<26} wall {wall / 60:.1f} min, load {cell['load_before'][0]:.1f} → {cell['load_after'][0]:.1f}"
            )
        auto = cell.get("auto_alpha", {}).get("labels", {})
        for label, s in auto.items():
            if label == AUTO_LABEL:
                m, sd = s["final_reward"]["mean"], s["final_reward"]["sd"]
                print(
                    f"{name:<26} {label:<10} {m:.3f} ± {sd:.3f}" if sd is not None else f"{name:<26} {label}"
                )
    for world, m in summary["worlds"].items():
        fit = m["variance_fit"]
        print(f"{world}: k = {fit['exponent']:.2f} {fit['exponent_ci']}, CV ratio measured "
              f"{m['ratio_measured']} vs theory {m['ratio_theory']}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
