"""Wall time, step time and peak memory of the SmolLM2 CPU demo, ``lab compare --preset smollm2-countdown``.

What it measures
    The whole ``lab compare`` command as a user runs it (embedded SmolLM2-135M, the 4 aggregators grpo,
    dapo, dr_grpo, delta_l one after another, the CPU demo settings of ``lab.tasks.DEMO``), started as a
    subprocess: ``sys.executable -m lab.cli compare [DEMO_FLAGS] --out DIR [extra args]`` (``--train``: one
    ``lab train --aggregator delta_l`` run instead). Targets on the lab's 2-core machine: <= 15 minutes in
    total (issue 4), median step <= 25 s and peak RSS <= 4 GB (issue 11).

How
    - Total wall time of the subprocess (interpreter start, imports, model loads, training, checkpoints).
    - Per run, read back through ``lab.runlog`` (``config.json``, ``status.json``, ``metrics.jsonl``): the
      run's wall time (``config.json``'s ``created`` to the last step's ``wall_time`` or the final status
      update), the sum of its logged ``step_time`` s, the number of steps, its final state, and the
      reward (``reward``, the mean over the step's completions) at the first and the last step.
    - The median step time over all runs: each step's wall time from the run log (``wall_time`` minus the
      previous step's, or minus the run's ``created`` for its first step: that one includes the first
      generation's warm-up, not the model load).
    - Peak RSS: ``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``, the largest resident set of the
      ``lab`` process (this script starts no other child).
    - Any argument this script does not know is passed through to ``lab compare``
      (e.g. ``--model tiny --steps 2`` for a smoke run, ``--threads 2``, ``--aggregators dr_grpo,delta_l``).
    - Also printed: ``uptime``'s load average before and after, since the machine is shared.

Usage::

    .venv/bin/python benchmarks/cpu_compare.py                     # the real demo (~15 min target)
    .venv/bin/python benchmarks/cpu_compare.py --quick             # = --model tiny --steps 2 (smoke run)
    .venv/bin/python benchmarks/cpu_compare.py --out runs/bench --json cmp.json -- --steps 10
    .venv/bin/python benchmarks/cpu_compare.py --train -- --max-completion-length 256   # longer completions
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from lab.runlog import CONFIG, METRICS, STATUS, list_runs, read_json, read_jsonl

TARGET_S = 15 * 60
TARGET_STEP_S = 25.0
TARGET_RSS_GB = 4.0
QUICK_ARGS = ["--model", "tiny", "--steps", "2"]
# The flags that select the SmolLM2 CountDown demo (the default `lab compare` is the fast task). Change it here only.
DEMO_FLAGS: list[str] = ["--preset", "smollm2-countdown"]
TRAIN_ARGS = ["train", "--aggregator", "delta_l"]  # --train: one run instead of the comparison


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="comparison dir (default: a fresh temporary dir)")
    p.add_argument("--quick", action="store_true", help=f"pass {' '.join(QUICK_ARGS)} (a smoke run)")
    p.add_argument("--target-minutes", type=float, default=TARGET_S / 60, help="time target (default 15)")
    p.add_argument("--timeout-minutes", type=float, default=None, help="kill lab compare after this long")
    p.add_argument("--json", type=Path, default=None, help="also write the summary to this JSON file")
    p.add_argument("--quiet", action="store_true", help="do not stream lab compare's output")
    p.add_argument(
        "--train", action="store_true", help=f"run `lab {' '.join(TRAIN_ARGS)}` instead of compare"
    )
    args, extra = p.parse_known_args(argv)
    if extra and extra[0] == "--":
        extra = extra[1:]
    if any(a == "--out" or a.startswith("--out=") for a in extra):
        p.error("give --out to this script, not in the pass-through arguments")
    if args.quick:
        extra = QUICK_ARGS + extra
    return args, extra


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def summarize_run(run_dir: Path) -> dict[str, Any]:
    """Wall time, steps and first/last reward of one run dir, from its run log."""
    config = read_json(run_dir / CONFIG) or {}
    status = read_json(run_dir / STATUS) or {}
    metrics, _ = read_jsonl(run_dir / METRICS)
    metrics = sorted(metrics, key=lambda r: r.get("step", 0))
    created = config.get("created")
    ends = [m["wall_time"] for m in metrics if isinstance(m.get("wall_time"), (int, float))]
    if isinstance(status.get("updated"), (int, float)):
        ends.append(status["updated"])
    wall = max(ends) - created if created is not None and ends else None
    rewards = [m.get("reward") for m in metrics]
    step_walls, previous = [], created
    for m in metrics:
        t = m.get("wall_time")
        if isinstance(t, (int, float)) and isinstance(previous, (int, float)):
            step_walls.append(round(t - previous, 2))
        previous = t
    return {
        "run": run_dir.name,
        "started": created,
        "aggregator": config.get("aggregator"),
        "seed": config.get("seed"),
        "state": status.get("state"),
        "steps": len(metrics),
        "max_steps": config.get("max_steps"),
        "wall_s": round(wall, 1) if wall is not None else None,
        "sum_step_time_s": round(sum(m.get("step_time") or 0.0 for m in metrics), 1),
        "step_walls_s": step_walls,
        "reward_first": rewards[0] if rewards else None,
        "reward_last": rewards[-1] if rewards else None,
        "reward_mean": round(sum(r for r in rewards if r is not None) / max(1, len(rewards)), 4)
        if rewards
        else None,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, extra = parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="cpu-compare-")) / "bench"
    subcommand = TRAIN_ARGS if args.train else ["compare"]
    cmd = [sys.executable, "-m", "lab.cli", *subcommand, *DEMO_FLAGS, "--out", str(out), *extra]
    load_before = load_average()
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    timeout = args.timeout_minutes * 60 if args.timeout_minutes else None
    try:
        proc = subprocess.run(
            cmd,
            cwd=Path(__file__).resolve().parent.parent,
            stdout=subprocess.DEVNULL if args.quiet else None,
            timeout=timeout,
        )
        returncode = proc.returncode
    except subprocess.TimeoutExpired:
        returncode = None
    total = time.perf_counter() - t0
    peak_rss_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9  # Linux: kB
    runs = [summarize_run(d) for dirs in list_runs(out).values() for d in dirs]
    runs.sort(key=lambda r: (r["started"] is None, r["started"] or 0.0))  # the order they ran in
    run_walls = [r["wall_s"] for r in runs if r["wall_s"] is not None]
    all_finished = bool(runs) and all(r["state"] == "finished" for r in runs)
    target_s = args.target_minutes * 60
    step_walls = [w for r in runs for w in r["step_walls_s"]]
    median_step = statistics.median(step_walls) if step_walls else None
    summary = {
        "benchmark": "cpu_compare",
        "command": cmd,
        "extra_args": extra,
        "out": str(out),
        "returncode": returncode,
        "timed_out": returncode is None,
        "total_wall_s": round(total, 1),
        "sum_run_wall_s": round(sum(run_walls), 1),
        "overhead_s": round(total - sum(run_walls), 1),  # process start, imports, model loads, between runs
        "runs": runs,
        "all_finished": all_finished,
        "target_s": target_s,
        "target_met": bool(returncode == 0 and all_finished and total <= target_s),
        "median_step_s": round(median_step, 2) if median_step is not None else None,
        "peak_rss_gb": round(peak_rss_gb, 2),
        "target_step_s": TARGET_STEP_S,
        "target_rss_gb": TARGET_RSS_GB,
        "step_target_met": median_step is not None and median_step <= TARGET_STEP_S,
        "rss_target_met": peak_rss_gb <= TARGET_RSS_GB,
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
    }
    print_table(summary)
    print(json.dumps(summary, separators=(",", ":")))
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _fmt(x: Any, spec: str) -> str:
    return format(x, spec) if isinstance(x, (int, float)) else "-"


def print_table(s: dict[str, Any]) -> None:
    print(f"\n{' '.join(s['command'][2:])}")
    print(
        f"{'run':<18}{'state':<10}{'steps':>7}{'wall (s)':>10}{'Σ step (s)':>12}{'reward 1st':>12}{'reward last':>12}"
    )
    for r in s["runs"]:
        print(
            f"{r['run']:<18}{r['state'] or '-':<10}{r['steps']:>7}{_fmt(r['wall_s'], '.1f'):>10}"
            f"{_fmt(r['sum_step_time_s'], '.1f'):>12}{_fmt(r['reward_first'], '.3f'):>12}"
            f"{_fmt(r['reward_last'], '.3f'):>12}"
        )
    verdict = "met" if s["target_met"] else "NOT met"
    print(
        f"total {s['total_wall_s']:.1f} s ({s['total_wall_s'] / 60:.1f} min; runs {s['sum_run_wall_s']:.1f} s, "
        f"other {s['overhead_s']:.1f} s), exit code {s['returncode']}; target <= {s['target_s'] / 60:.0f} min: "
        f"{verdict}; load average before {s['load_average_before']}, after {s['load_average_after']}"
    )
    print(
        f"median step {_fmt(s['median_step_s'], '.1f')} s (target <= {s['target_step_s']:.0f} s: "
        f"{'met' if s['step_target_met'] else 'NOT met'}), peak RSS {s['peak_rss_gb']:.2f} GB (target <= "
        f"{s['target_rss_gb']:.0f} GB: {'met' if s['rss_target_met'] else 'NOT met'}); {s['cpu_count']} CPUs "
        f"({s['cpu_model']})\n"
    )


if __name__ == "__main__":
    main()
