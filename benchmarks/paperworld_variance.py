"""Why the paper world's Var(g_i) grows faster than L_i: the score norm of every completion token, by kind.

What it measures
    One sampled batch of the warm ``paperworld-tiny`` (``--rows`` completions, 8 per prompt, the batch that
    ``two_worlds.py``'s large-batch measurement draws at the same seed), with :func:`lab.worlds.paperworld_variance`:
    each completion token labelled answer / length / filler_ok / off / eos by the task's rules
    (:func:`lab.worlds.paperworld_token_kinds`; off = a miscount or malformed token, and every token after
    it), its squared score norm ||∇ log π(o_t | ·)||² over the model's own linear layers, aggregated by kind
    and by length bin; then on all rows and on the well-formed rows only (no off token): the fit of the
    unbiased Var(g_i) against L_i (power k and line a + V·L, 95% group-bootstrap intervals) and the measured
    CV ratio Dr. GRPO / ΔL beside its theory under Var ∝ L, c·L^k (fitted k) and a + V·L (fitted line).

What it stores (``--json``)
    The command, machine, torch threads, load average before and after, wall seconds, and the result of
    :func:`lab.worlds.paperworld_variance`.

Usage::

    nice -n 19 .venv/bin/python benchmarks/paperworld_variance.py \\
        --json benchmarks/results/paperworld_variance.2core.json        # 512 rows, ~2 min on 2 loaded cores
    .venv/bin/python benchmarks/paperworld_variance.py --rows 64        # smoke, ~20 s
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # two_worlds' machine record

GROUP = 8  # completions per prompt, as in the paper-world preset


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=512, help=f"completions ({GROUP} per prompt)")
    p.add_argument("--json", type=Path, default=None, help="write the result here")
    p.add_argument("--seed", type=int, default=0, help="prompts and sampling (two_worlds.py uses 0)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    args = p.parse_args(argv)
    if args.rows < 2 * GROUP or args.rows % GROUP:
        p.error(f"--rows must be a multiple of {GROUP}, at least {2 * GROUP}")
    return args


def _f(x: float | None, spec: str = ".2f") -> str:
    return "n/a" if x is None or not math.isfinite(x) else format(x, spec)


def _interval(fit: dict[str, Any], key: str, spec: str = ".2f") -> str:
    lo, hi = fit[f"{key}_ci"]
    return f"{_f(fit[key], spec)} [{_f(lo, spec)}, {_f(hi, spec)}]"


def side_by_side(result: dict[str, Any]) -> list[str]:
    """All rows beside well-formed rows: the variance fit and the CV ratio Dr. GRPO / ΔL."""
    every, well = result["all"], result["well_formed"]
    pair = "dr_grpo/delta_l"
    rows = [
        ("rows", lambda s: str(s["rows"])),
        ("mean length", lambda s: _f(s["mean_length"])),
        ("k of Var ~ c·L^k", lambda s: _interval(s["variance_fit"], "exponent")),
        ("intercept a of a + V·L", lambda s: _interval(s["variance_fit"], "intercept", ".1f")),
        ("slope V of a + V·L", lambda s: _interval(s["variance_fit"], "slope", ".2f")),
        ("CV Dr. GRPO/ΔL measured", lambda s: _f(s["ratio_measured"][pair])),
        ("  theory, Var ∝ L", lambda s: _f(s["ratio_theory"]["linear"][pair])),
        ("  theory, c·L^k (fitted k)", lambda s: _f(s["ratio_theory"]["fitted_exponent"][pair])),
        ("  theory, a + V·L (fitted)", lambda s: _f(s["ratio_theory"]["fitted_line"][pair])),
    ]
    lines = [f"{'':<28} {'all rows':>26} {'well-formed rows':>26}"]
    lines += [f"{name:<28} {cell(every):>26} {cell(well):>26}" for name, cell in rows]
    return lines


def kind_table(norms: dict[str, Any]) -> list[str]:
    lines = [f"{'token kind':<12} {'tokens':>7} {'mean |∇log π|²':>15} {'share of Σ':>11}"]
    for kind, s in norms["by_kind"].items():
        lines.append(f"{kind:<12} {s['tokens']:>7} {_f(s['mean'], '.3g'):>15} {_f(s['share'], '.1%'):>11}")
    return lines


def length_table(norms: dict[str, Any]) -> list[str]:
    head = ("L ≥", "rows", "off rows", "off tokens", "|∇|² ok", "|∇|² off", "Var all", "Var ok", "Σ_t |∇|²")
    lines = ["{:>4} {:>5} {:>8} {:>10} {:>8} {:>9} {:>9} {:>8} {:>9}".format(*head)]
    for b in norms["by_length"]:
        lines.append(
            f"{b['min_length']:>4} {b['rows']:>5} {b['off_rows']:>8} {_f(b['off_token_share'], '.1%'):>10} "
            f"{_f(b['mean_norm_ok'], '.3g'):>8} {_f(b['mean_norm_off'], '.3g'):>9} "
            f"{_f(b['mean_variance'], '.3g'):>9} {_f(b['mean_variance_well_formed'], '.3g'):>8} "
            f"{_f(b['mean_token_sum'], '.3g'):>9}"
        )
    return lines


def report(result: dict[str, Any]) -> str:
    head = (
        f"{result['rows']} completions, {result['well_formed_rows']} well-formed, {result['off_rows']} with an "
        f"off token carrying {_f(result['off_variance_share'], '.1%')} of Σ Var(g_i); miscount rate "
        f"{_f(result['miscount_rate'], '.2%')} per token after the length choice"
    )
    norms = result["score_norms"]
    return "\n".join([head, "", *side_by_side(result), "", *kind_table(norms), "", *length_table(norms)])


def main(argv: list[str] | None = None) -> int:
    import torch
    from two_worlds import machine

    from lab.worlds import paperworld_variance

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = [round(x, 2) for x in os.getloadavg()]
    started = time.perf_counter()
    result = paperworld_variance(prompts=args.rows // GROUP, num_generations=GROUP, seed=args.seed)
    record = {
        "command": "python benchmarks/paperworld_variance.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "threads": args.threads,
        "nice": os.nice(0),
        "load_average_before": load_before,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "wall_seconds": time.perf_counter() - started,
        "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
        **result,
    }
    print(report(record))
    print(f"\nwall {record['wall_seconds']:.0f} s, load {load_before} → {record['load_average_after']}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
