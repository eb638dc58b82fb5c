"""The main job as a user runs it: ``lab compare --out DIR`` with its defaults, timed, and its verdict.

What it measures
    ``sys.executable -m lab.cli compare --out DIR [extra args]`` as one subprocess (the fast preset: the
    digitsum task on the lab's small model, GRPO, DAPO, Dr. GRPO and ΔL(α=1) x 5 seeds, two single-threaded
    worker processes). Target (issue 10): <= 10 minutes on the lab's 2-core machine.

    - total wall time of the command (interpreter start, imports, workers, training, checkpoints, verdict);
    - per run (read back through ``lab.runlog``): steps, median ``step_time``, first/last reward;
    - the median over all steps of all runs of ``step_time`` (the time TRL's training step takes, generation
      included) and of the probe's own cost (``probe/seconds``) on the steps that probed;
    - peak resident memory of the largest process of the job (``resource.getrusage(RUSAGE_CHILDREN)``: the
      workers are children of ``lab compare``, which waits for them);
    - the load average before and after (``os.getloadavg``), since the machine may be shared;
    - the verdict ``lab compare`` wrote (``verdict.json``), pair by pair;
    - each run's per-step curves of the keys in :data:`CURVE_KEYS` (``curves``), so the README's comparison
      figure can be redrawn from this file alone (``scripts/render_docs.py``).

Usage::

    .venv/bin/python benchmarks/fast_compare.py --json benchmarks/results/fast_compare.2core.json
    .venv/bin/python benchmarks/fast_compare.py -- --optimizer sgd            # any lab compare flag after --
    .venv/bin/python benchmarks/fast_compare.py --quick                        # 3 steps, 2 seeds (smoke run)
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

from lab.runlog import RunReader, list_runs, read_verdict

TARGET_S = 10 * 60
CURVE_KEYS = ("reward", "completions/mean_length", "agg_grad/cos/grpo~delta_l", "agg_grad/cos/grpo~dapo",
              "agg_grad/norm_ratio/grpo~delta_l", "agg_grad/norm_ratio/dapo~dr_grpo")  # fmt: skip
QUICK_ARGS = ["--steps", "3", "--seeds", "2"]


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="comparison dir (default: a fresh temporary dir)")
    p.add_argument("--quick", action="store_true", help=f"pass {' '.join(QUICK_ARGS)} (a smoke run)")
    p.add_argument("--json", type=Path, default=None, help="also write the summary to this JSON file")
    args, extra = p.parse_known_args(argv)
    if extra and extra[0] == "--":
        extra = extra[1:]
    if any(a == "--out" or a.startswith("--out=") for a in extra):
        p.error("give --out to this script, not in the pass-through arguments")
    return args, (QUICK_ARGS if args.quick else []) + extra


def run_summary(run_dir: Path) -> dict[str, Any]:
    reader = RunReader(run_dir)
    reader.poll()
    steps = [m for m in reader.metrics if isinstance(m.get("step_time"), (int, float))]
    config = reader.config
    return {
        "run": run_dir.name,
        "label": config.get("label"),
        "seed": config.get("seed"),
        "state": reader.status.get("state"),
        "steps": len(steps),
        "median_step_s": statistics.median(m["step_time"] for m in steps) if steps else None,
        "reward_first": steps[0].get("reward") if steps else None,
        "reward_last": steps[-1].get("reward") if steps else None,
        "step_times": [m["step_time"] for m in steps],
        "probe_seconds": [
            m["probe/seconds"] for m in steps if isinstance(m.get("probe/seconds"), (int, float))
        ],
        "curves": {key: [[m["step"], m[key]] for m in steps if m.get(key) is not None] for key in CURVE_KEYS},
    }


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="fast-compare-")) / "cmp"
    command = [sys.executable, "-m", "lab.cli", "compare", "--out", str(out), *extra]
    load_before = os.getloadavg()
    print("running:", " ".join(command), flush=True)
    started = time.perf_counter()
    code = subprocess.call(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - started
    load_after = os.getloadavg()
    peak_rss_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2  # Linux: kB
    runs = [run_summary(d) for dirs in list_runs(out).values() for d in dirs]
    all_steps = [t for r in runs for t in r.pop("step_times")]
    probes = [t for r in runs for t in r.pop("probe_seconds")]
    verdict = read_verdict(out)
    summary = {
        "command": "python benchmarks/fast_compare.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "lab_command": " ".join(command[1:]),
        "exit_code": code,
        "wall_seconds": wall,
        "target_seconds": TARGET_S,
        "within_target": wall <= TARGET_S,
        "runs": runs,
        "median_step_seconds": statistics.median(all_steps) if all_steps else None,
        "median_probe_seconds": statistics.median(probes) if probes else None,
        "peak_rss_gb": peak_rss_gb,
        "load_before": load_before,
        "load_after": load_after,
        "cpus": os.cpu_count(),
        "verdict": verdict,
        "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    print(f"\nlab compare exited {code} after {wall / 60:.1f} min (target {TARGET_S / 60:.0f} min); "
          f"{len(runs)} runs, median step {summary['median_step_seconds'] or float('nan'):.3f} s, "
          f"peak RSS {peak_rss_gb:.2f} GB; load {load_before[0]:.1f} → {load_after[0]:.1f} on {os.cpu_count()} cores")  # fmt: skip
    for r in runs:
        print(f"  {r['run']:<14} {r['state']:<11} {r['steps']:>3} steps  median {r['median_step_s'] or 0:.3f} s  "
              f"reward {r['reward_first']} → {r['reward_last']}")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
        print(f"summary written to {args.json}")
    return code


if __name__ == "__main__":
    sys.exit(main())
