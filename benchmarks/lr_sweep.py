"""The positive control's search (issue 16): a learning-rate sweep where theory says the variance must show.

Why a sweep
    In paper world every aggregator has the same expected direction (the length says nothing about the
    reward), and with ``--equalize-step-size`` the same expected step size, so under plain SGD the only
    difference left is the variance of the direction: ΔL's (= GRPO's, at batch scope) is the lower one. A
    noisier direction costs little while the step is small and more as it grows, so if the lab's verdict can
    see the variance at all, it is at a larger learning rate than the preset's.

What it runs
    One ``lab compare --preset paper-world --optimizer sgd --equalize-step-size --aggregators dr_grpo,delta_l``
    per learning rate (``--lrs``, every one chosen before any ran: no value is added after seeing a result),
    ``--seeds`` seeds each, plus the pass-through flags after ``--``. Every rate's verdict is stored, and the
    decision is corrected over the whole sweep: Holm over every test of every rate (``p_holm_sweep``), so
    trying several rates does not buy a false "distinguishable".

A confirmation on fresh seeds
    A sweep explores; its strongest lead is then tested once more on seeds the sweep never used
    (``--first-seed``, one rate, its own Holm family of three tests), the lead named before that run starts.
    A confirmation is only as good as that order: run it once, report it whatever it shows.

Usage::

    nice -n 5 .venv/bin/python benchmarks/lr_sweep.py --out runs/lr_sweep --lrs 0.1,0.3,1,3 \\
        --json benchmarks/results/lr_sweep.paperworld.2core.json -- --probe-every 15
    nice -n 5 .venv/bin/python benchmarks/lr_sweep.py --out runs/lr_confirm --lrs 3 --first-seed 10 \\
        --seeds 20 --json benchmarks/results/lr_confirm.paperworld.2core.json -- --probe-every 15
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from two_worlds import label_summary, machine, run_dirs_of, run_record

from lab.verdict import ALPHA, compare_runs, holm_adjust

BASE = ["--preset", "paper-world", "--optimizer", "sgd", "--equalize-step-size", "--aggregators", "dr_grpo,delta_l",
        "--compare-gradients-every", "0", "--save-every", "100000"]  # fmt: skip


def parse_lrs(text: str) -> list[float]:
    try:
        lrs = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise SystemExit(f"--lrs: not a comma list of numbers: {text!r} ({e})") from None
    if not lrs or any(not (0 < lr < 100) for lr in lrs):
        raise SystemExit(f"--lrs: every rate must be in (0, 100), got {text!r}")
    return lrs


def correct_over_sweep(rates: dict[str, dict[str, Any]]) -> int:
    """Holm over every test of every rate; writes ``p_holm_sweep`` and ``distinguishable_sweep`` into each
    pair and returns how many tests were corrected together."""
    pairs = [p for r in rates.values() for p in r.get("verdict", {}).get("pairs", [])]
    tested = [p for p in pairs if isinstance(p.get("p_value"), float)]
    for pair, adjusted in zip(tested, holm_adjust([p["p_value"] for p in tested]), strict=True):
        pair["p_holm_sweep"] = adjusted
        pair["distinguishable_sweep"] = adjusted < ALPHA
    return len(tested)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--lrs", default="0.1,0.3,1,3")
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    p.add_argument("--steps", type=int, default=30)
    args, extra = p.parse_known_args(argv)
    extra = extra[1:] if extra[:1] == ["--"] else extra
    lrs = parse_lrs(args.lrs)
    result: dict[str, Any] = {"command": "python benchmarks/lr_sweep.py " + " ".join(argv or sys.argv[1:]),
                              "machine": machine(), "seeds": args.seeds, "first_seed": args.first_seed, "steps": args.steps,
                              "rates": {}}  # fmt: skip
    started = time.perf_counter()
    code = 0
    for lr in lrs:
        out = args.out / f"lr{lr:g}"
        command = [sys.executable, "-m", "lab.cli", "compare", *BASE, "--learning-rate", f"{lr:g}", "--seed",
                   str(args.first_seed), "--seeds", str(args.seeds), "--steps", str(args.steps), *extra, "--out", str(out)]  # fmt: skip
        if out.exists():
            command.append("--resume")
        print(f"[lr {lr:g}] running: {' '.join(command[1:])}", flush=True)
        record: dict[str, Any] = {"lab_command": " ".join(command[1:]), "load_before": os.getloadavg()}
        t0 = time.perf_counter()
        record["exit_code"] = subprocess.call(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        record.update(wall_seconds=time.perf_counter() - t0, load_after=os.getloadavg())
        code = code or record["exit_code"]
        dirs = run_dirs_of(out)
        runs = [run_record(d) for d in dirs]
        record.update(runs=runs, labels=label_summary(runs), verdict=compare_runs(dirs))
        result["rates"][f"{lr:g}"] = record
    result["tests_corrected_together"] = correct_over_sweep(result["rates"])
    result["wall_seconds"] = time.perf_counter() - started
    result["measured"] = time.strftime("%Y-%m-%d %H:%M:%S")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")
    print(
        f"\n{'lr':>6} {'metric':<22} {'ΔL − Dr. GRPO':>14} {'t CI':<20} {'p raw':>7} {'Holm (sweep)':>12} {'MDE':>6}"
    )
    for lr, record in result["rates"].items():
        for pair in record["verdict"].get("pairs", []):
            sign = 1 if pair["a"] == "delta_l" else -1  # print ΔL − Dr. GRPO whichever order the verdict uses
            lo, hi = sorted(sign * x for x in pair["ci_t"])
            print(f"{lr:>6} {pair['metric']:<22} {sign * pair['mean_diff']:>+14.3f} [{lo:+.3f}, {hi:+.3f}]"
                  f"{pair.get('p_value', float('nan')):>9.3f} {pair.get('p_holm_sweep', float('nan')):>12.3f}"
                  f" {pair.get('mde', float('nan')):>6.3f}")  # fmt: skip
    return code


if __name__ == "__main__":
    sys.exit(main())
