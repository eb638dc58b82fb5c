"""How often does the verdict mark a pair when nothing differs? The old rule against the corrected one.

Fits the seed, run and step noise of a stored comparison (``lab.verdict_sim.estimate_noise`` on the main
job's reward curves, ``benchmarks/results/fast_compare.2core.json``), then draws ``--verdicts`` synthetic
comparisons of four **identical** aggregators with that noise and counts the verdicts that mark at least
one pair:

- old rule: a pair is marked when its 95% bootstrap and 95% t intervals both exclude 0 (no correction,
  the rule before issue 16; ``excludes_0_uncorrected`` in each pair);
- new rule: ``distinguishable``, the Holm–Bonferroni adjusted p-value over every pair × metric below 0.05.

It also recomputes the stored main job's verdict with the new rule (its MDEs, raw and adjusted p-values),
and checks the MDE by simulation: with a true gap equal to a pair's MDE (from the model's true spread),
the fraction of verdicts that mark that pair (≥ 80% expected under Holm; exactly 80% for the
Bonferroni-level test the MDE is computed for).

    .venv/bin/python benchmarks/verdict_null.py                     # 1000 verdicts, writes the JSON
    .venv/bin/python benchmarks/verdict_null.py --verdicts 200 --json /tmp/v.json
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

import numpy as np

from lab.verdict import ALPHA, FINAL_FRACTION, N_BOOTSTRAP, min_detectable_difference, verdict_from_curves
from lab.verdict_sim import NoiseModel, estimate_noise, rewards_array, synthetic_curves

RESULTS = Path(__file__).resolve().parent / "results"
LABELS = ["grpo", "dapo", "dr_grpo", "delta_l"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stored", type=Path, default=RESULTS / "fast_compare.2core.json")
    p.add_argument("--verdicts", type=int, default=1000, help="synthetic verdicts per setting")
    p.add_argument("--seeds", type=int, nargs="+", default=[5, 10], help="seeds per aggregator")
    p.add_argument(
        "--n-bootstrap", type=int, default=N_BOOTSTRAP, help="as the real verdict (the old rule uses it)"
    )
    p.add_argument("--rng-seed", type=int, default=16)
    p.add_argument("--json", type=Path, default=RESULTS / "verdict_null.json")
    args = p.parse_args(argv)
    if args.verdicts < 1 or min(args.seeds) < 2:
        p.error(f"--verdicts must be ≥ 1 and every --seeds ≥ 2, got {args.verdicts} and {args.seeds}")
    return args


def stored_curves(path: Path) -> dict[str, dict[int, list[tuple[float, float]]]]:
    """The reward curves the main-job benchmark stored per run (``runs[i].curves.reward``)."""
    stored = json.loads(path.read_text())
    curves: dict[str, dict[int, list[tuple[float, float]]]] = {}
    for run in stored["runs"]:
        curves.setdefault(run["label"], {})[run["seed"]] = [tuple(p) for p in run["curves"]["reward"]]
    order = {label: i for i, label in enumerate(LABELS)}
    return dict(sorted(curves.items(), key=lambda kv: order.get(kv[0], 9)))


def shown_path(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it (no machine-specific prefix stored)."""
    repo = RESULTS.parent.parent
    resolved = path.resolve()
    return str(resolved.relative_to(repo)) if resolved.is_relative_to(repo) else str(path)


def wilson(hits: int, n: int) -> list[float]:
    """95% Wilson interval of a binomial proportion."""
    z, p = 1.959964, hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [centre - half, centre + half]


def null_rates(model: NoiseModel, n_seeds: int, args: argparse.Namespace) -> dict[str, Any]:
    """Family-wise false-alarm rate of the old and the new rule on the same synthetic verdicts."""
    rng = np.random.default_rng([args.rng_seed, n_seeds])
    old = new = 0
    for _ in range(args.verdicts):
        verdict = verdict_from_curves(
            synthetic_curves(model, LABELS, range(n_seeds), rng), n_bootstrap=args.n_bootstrap
        )
        old += any(p["excludes_0_uncorrected"] for p in verdict["pairs"])
        new += any(p["distinguishable"] for p in verdict["pairs"])
    n = args.verdicts
    return {
        "seeds": n_seeds,
        "verdicts": n,
        "n_tests": verdict["n_tests"],
        "old_rule_rate": old / n,
        "old_rule_ci95": wilson(old, n),
        "new_rule_rate": new / n,
        "new_rule_ci95": wilson(new, n),
    }


def power_at_mde(model: NoiseModel, n_seeds: int, args: argparse.Namespace) -> dict[str, Any]:
    """A true gap of one pair's MDE (grpo − delta_l, final_reward; the model's true spread): how often marked."""
    k = max(1, int(len(model.mean_curve) * FINAL_FRACTION))
    sd_final = math.sqrt(2 * (model.run_sd**2 + model.step_sd**2 / k))
    level = ALPHA / (len(LABELS) * (len(LABELS) - 1) // 2 * 2)
    mde = min_detectable_difference(sd_final, n_seeds, level)
    rng = np.random.default_rng([args.rng_seed, n_seeds, 1])
    holm = bonferroni = 0
    for _ in range(args.verdicts):
        curves = synthetic_curves(model, LABELS, range(n_seeds), rng, effects={"delta_l": mde})
        verdict = verdict_from_curves(curves, n_bootstrap=100)  # the decision does not use the bootstrap
        pair = next(
            p
            for p in verdict["pairs"]
            if (p["a"], p["b"], p["metric"]) == ("grpo", "delta_l", "final_reward")
        )
        holm += pair["distinguishable"]
        bonferroni += pair["p_value"] < level
    n = args.verdicts
    return {
        "seeds": n_seeds,
        "pair": "grpo − delta_l, final_reward",
        "true_sd_diff": sd_final,
        "mde": mde,
        "level": level,
        "power_bonferroni": bonferroni / n,
        "power_bonferroni_ci95": wilson(bonferroni, n),
        "power_holm": holm / n,
        "power_holm_ci95": wilson(holm, n),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_before, started = os.getloadavg(), time.perf_counter()
    curves = stored_curves(args.stored)
    model = estimate_noise(rewards_array(curves))
    print(
        f"noise of {args.stored.name} ({len(curves)} aggregators × {len(next(iter(curves.values())))} seeds × "
        f"{len(model.mean_curve)} steps): seed {model.seed_sd:.4f}, run {model.run_sd:.4f}, shared step "
        f"{model.shared_step_sd:.4f}, own step {model.step_sd:.4f}"
    )
    null = []
    for n_seeds in args.seeds:
        r = null_rates(model, n_seeds, args)
        null.append(r)
        print(
            f"no difference, {n_seeds} seeds, {r['verdicts']} verdicts of {r['n_tests']} tests: some pair marked in "
            f"{r['old_rule_rate']:.1%} [{r['old_rule_ci95'][0]:.1%}, {r['old_rule_ci95'][1]:.1%}] (old rule) vs "
            f"{r['new_rule_rate']:.1%} [{r['new_rule_ci95'][0]:.1%}, {r['new_rule_ci95'][1]:.1%}] (Holm)"
        )
    power = []
    for n_seeds in args.seeds:
        r = power_at_mde(model, n_seeds, args)
        power.append(r)
        print(
            f"true gap = MDE {r['mde']:.3f} ({n_seeds} seeds, {r['pair']}): marked in {r['power_holm']:.1%} "
            f"(Holm), {r['power_bonferroni']:.1%} at the Bonferroni level {r['level']:.4f} (80% by construction)"
        )
    main_job = verdict_from_curves(curves, n_bootstrap=args.n_bootstrap)
    stored_verdict = json.loads(args.stored.read_text()).get("verdict", {})
    old_marked = {
        (p["a"], p["b"], p["metric"]) for p in stored_verdict.get("pairs", []) if p.get("distinguishable")
    }
    rows = []
    print("stored main job, recomputed (p raw / Holm, MDE, old rule → new rule):")
    for p in main_job["pairs"]:
        key = (p["a"], p["b"], p["metric"])
        rows.append(
            {k: p[k] for k in ("a", "b", "metric", "mean_diff", "p_value", "p_holm", "sd_diff", "mde")}
        )
        rows[-1].update(old_rule=key in old_marked, new_rule=p["distinguishable"])
        print(
            f"  {p['a']:<8} {p['b']:<8} {p['metric']:<13} {p['mean_diff']:+.3f}  p {p['p_value']:.3f} / "
            f"{p['p_holm']:.3f}  MDE {p['mde']:.3f}  {'marked' if key in old_marked else '-'} → "
            f"{'marked' if p['distinguishable'] else '-'}"
        )
    result = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "stored": shown_path(args.stored),
        "noise_model": {k: v for k, v in vars(model).items() if k != "mean_curve"},
        "mean_curve": list(model.mean_curve),
        "null": null,
        "power_at_mde": power,
        "main_job": {"seeds": main_job["seeds"], "n_tests": main_job["n_tests"], "pairs": rows},
        "old_figure_elsewhere": "37% of 200 verdicts (issue 16, another machine's simulation)",
        "n_bootstrap": args.n_bootstrap,
        "rng_seed": args.rng_seed,
        "wall_seconds": time.perf_counter() - started,
        "cpus": os.cpu_count(),
        "load_before": list(load_before),
        "load_after": list(os.getloadavg()),
        "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json} ({result['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
