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
      figure can be redrawn from this file alone (``scripts/render_docs.py``);
    - the task's length spread at step 1 (median over prompt groups of longest / shortest completion) and,
      over all gradient probes, the median measured CV of each aggregator next to its theoretical CV
      under Var(g_i) = V·L_i on the same lengths (``probes``).

Usage::

    .venv/bin/python benchmarks/fast_compare.py --json benchmarks/results/fast_compare.2core.json
    .venv/bin/python benchmarks/fast_compare.py -- --optimizer sgd            # any lab compare flag after --
    .venv/bin/python benchmarks/fast_compare.py --quick                        # 3 steps, 2 seeds (smoke run)
"""

from __future__ import annotations

import argparse
import json
import math
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
    p.add_argument(
        "--resummarize", type=Path, default=None, metavar="JSON",
        help="recompute the run-log fields of this stored summary from --out (no training)",
    )  # fmt: skip
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


def _median(values: list) -> float | None:
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return statistics.median(finite) if finite else None


def probe_summary(out: Path) -> dict[str, Any]:
    """Over every probe of every run: median measured CV and theoretical CV per aggregator, the number of
    probes (and of those where the bootstrap could not separate the mean gradient from its noise: CV
    inf/null), and the median Var(g_i)-vs-L_i exponent of a batch."""
    measured: dict[str, list] = {}
    theory: dict[str, list] = {}
    exponents = []
    for dirs in list_runs(out).values():
        for run_dir in dirs:
            reader = RunReader(run_dir)
            reader.poll()
            for probe in reader.probes:
                for method, value in (probe.get("cv") or {}).items():
                    measured.setdefault(method, []).append(value)
                for method, value in (probe.get("cv_theory") or {}).items():
                    theory.setdefault(method, []).append(value)
                exponents.append(probe.get("exponent"))
    return {
        "n_probes": len(exponents),
        "cv_measured_median": {m: _median(v) for m, v in measured.items()},
        "cv_measured_finite": {
            m: sum(isinstance(x, (int, float)) and math.isfinite(x) for x in v) for m, v in measured.items()
        },
        "cv_theory_median": {m: _median(v) for m, v in theory.items()},
        "exponent_median": _median(exponents),
    }


def length_ratio_at_step_one(out: Path) -> dict[str, float | None]:
    """Median and quartiles over prompt groups of (longest / shortest completion) in every run's first batch."""
    ratios = []
    for dirs in list_runs(out).values():
        for run_dir in dirs:
            reader = RunReader(run_dir)
            reader.poll()
            if not reader.samples:
                continue
            groups: dict[int, list[float]] = {}
            for length, group in zip(reader.samples[0]["lengths"], reader.samples[0]["group"], strict=True):
                groups.setdefault(group, []).append(length)
            ratios += [max(v) / min(v) for v in groups.values() if min(v) > 0]
    if len(ratios) < 2:
        return {"median": _median(ratios), "q1": None, "q3": None, "groups": len(ratios)}
    q1, q2, q3 = statistics.quantiles(ratios, n=4)
    return {"median": q2, "q1": q1, "q3": q3, "groups": len(ratios)}


def resummarize(path: Path, out: Path) -> None:
    """Recompute the run-log parts of a stored summary from its comparison dir (the timing fields stay the
    ones measured when it ran): for a summary written before a field was added."""
    summary = json.loads(path.read_text(encoding="utf-8"))
    runs = [run_summary(d) for dirs in list_runs(out).values() for d in dirs]
    for r in runs:
        r.pop("step_times")
        r.pop("probe_seconds")
    summary.update(runs=runs, probes=probe_summary(out), length_ratio_step1=length_ratio_at_step_one(out),
                   verdict=read_verdict(out))  # fmt: skip
    summary.setdefault("resummarized", []).append(time.strftime("%Y-%m-%d %H:%M:%S"))
    path.write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    print(f"re-summarized {path} from {out}")


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    if args.resummarize:
        if args.out is None:
            raise SystemExit("--resummarize needs --out, the comparison dir the summary was made from")
        resummarize(args.resummarize, args.out)
        return 0
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
        "probes": probe_summary(out),
        "length_ratio_step1": length_ratio_at_step_one(out),
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
