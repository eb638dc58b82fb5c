"""What the gradient probes cost (issue 17: ``--alpha auto`` feeds α from them), measured, and priced for a
Qwen2.5 shape from measured figures.

What it measures
    Per run dir given (``--runs``: run dirs or folders of them, e.g. the two-worlds ΔL(auto) runs) and per
    task: the median ``probe/seconds`` of the steps that probed, the median ``step_time`` of the steps that
    did not and of those that did, the probe's rows (``probes.jsonl``), and from them the overhead per step
    at a probe every K steps, for K = 1, 2, 3, 5, 10: by the probe's own timer, ``probe / (K * step)``, and
    as the run really pays it, ``(step with probe - step without) / (K * step without)`` (this one also
    counts what runs beside the probe: the auto-α fit with its bootstrap interval, the probe's bootstrap CVs).

    With ``--smollm2`` it also trains the embedded SmolLM2-135M (LoRA, CountDown, the
    ``smollm2-countdown`` preset) with ``--alpha auto --probe-every 2`` for ``--smollm2-steps`` steps in a
    subprocess and reads the same figures from its run log (and its ``delta_l/alpha`` per step).

The Qwen2.5 extrapolation (labelled as such in the output: not measured on that model)
    A probe is one forward + backward per probed completion, row by row; a training step's loss is one
    batched forward + backward over the same completions, plus generation. So on one machine
    ``probe_s ≈ r * fwd_bwd_s``, where ``r`` (probe seconds over the step's own forward + backward, per
    row) is measured here on SmolLM2 (``lab.probes`` docstring: one more forward + backward, row by row).
    For Qwen2.5-1.5B on an H100 the stored ``benchmarks/results/qwen2.5-1.5b.h100.json`` gives the batched
    forward + backward (16 x 640 tokens) and the generation throughput; the projection prices a probe at
    that forward + backward times ``r`` (a lower bound is ``r = 1``: the same FLOPs, batched), against a step
    at the preset's sizes. Row-by-row efficiency on a GPU was not measured (no GPU in these sessions).

Usage::

    .venv/bin/python benchmarks/probe_cost.py --runs runs/two_worlds/paper-world-adamw-auto \\
        runs/two_worlds/digitsum-adamw-auto --smollm2 --json benchmarks/results/probe_cost.2core.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from lab.runlog import RunReader, list_runs  # noqa: E402

EVERY = (1, 2, 3, 5, 10)
QWEN_STORED = ROOT / "benchmarks" / "results" / "qwen2.5-1.5b.h100.json"
CPU_PROFILE = ROOT / "benchmarks" / "results" / "cpu_step_profile.smollm2.2core.json"


def run_dirs(paths: list[Path]) -> list[Path]:
    """Run dirs (a dir with a config) and the runs inside folders of them."""
    out: list[Path] = []
    for path in paths:
        if not path.is_dir():
            raise SystemExit(f"--runs: {path} is not a directory")
        found = [d for dirs in list_runs(path).values() for d in dirs]
        out.extend(found or [path])
    return out


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def run_costs(run_dir: Path) -> dict[str, Any]:
    """One run's probe seconds, step times with and without a probe, probe rows, α per step."""
    reader = RunReader(run_dir)
    reader.poll()
    steps = [
        m for m in reader.metrics if isinstance(m.get("step"), int) and isinstance(m.get("step_time"), float)
    ]
    probed = [m for m in steps if isinstance(m.get("probe/seconds"), (int, float))]
    plain = [m for m in steps if m not in probed]
    return {
        "run": run_dir.name,
        "task": reader.config.get("task"),
        "model": reader.config.get("model"),
        "probe_s": [m["probe/seconds"] for m in probed],
        "step_s_probed": [m["step_time"] for m in probed],
        "step_s_plain": [m["step_time"] for m in plain],
        "probe_rows": [len(p["lengths"]) for p in reader.probes if isinstance(p.get("lengths"), list)],
        "alpha": [
            [m["step"], m["delta_l/alpha"]] for m in steps if isinstance(m.get("delta_l/alpha"), float)
        ],
    }


def task_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the runs of one task, and the overhead per step at a probe every K steps."""
    probe = _median([x for r in runs for x in r["probe_s"]])
    plain = _median([x for r in runs for x in r["step_s_plain"]])
    out = {
        "runs": len(runs),
        "model": runs[0]["model"],
        "median_probe_s": probe,
        "median_step_s_without_probe": plain,
        "median_step_s_with_probe": _median([x for r in runs for x in r["step_s_probed"]]),
        "median_probe_rows": _median([x for r in runs for x in r["probe_rows"]]),
        "n_probes": sum(len(r["probe_s"]) for r in runs),
    }
    with_probe = out["median_step_s_with_probe"]
    if probe is not None and plain:
        out["overhead_at_every"] = {str(k): probe / (k * plain) for k in EVERY}  # the probe's own timer
    if with_probe is not None and plain:
        # what a probed step really costs more than a plain one: the probe plus what runs beside it (the
        # auto-α fit with its bootstrap interval, the probe's bootstrap CVs, logging)
        extra = with_probe - plain
        out["extra_s_per_probed_step"] = extra
        out["step_overhead_at_every"] = {str(k): extra / (k * plain) for k in EVERY}
    return out


def train_smollm2(steps: int, out: Path) -> dict[str, Any]:
    """``lab train`` on the embedded SmolLM2 with α auto and a probe every 2 steps (plain steps between); timed."""
    command = [sys.executable, "-m", "lab.cli", "train", "--preset", "smollm2-countdown", "--aggregator",
               "delta_l", "--alpha", "auto", "--probe-every", "2", "--steps", str(steps),
               "--compare-gradients-every", "0", "--save-every", "100000", "--out", str(out)]  # fmt: skip
    load = os.getloadavg()
    t0 = time.perf_counter()
    code = subprocess.call(command, env={**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"})
    return {"command": " ".join(command[1:]), "exit_code": code, "wall_s": time.perf_counter() - t0,
            "load_before": load, "load_after": os.getloadavg()}  # fmt: skip


def cpu_row_ratio(probe_s: float | None, rows: float | None) -> dict[str, Any] | None:
    """r: a probe's seconds over the batched forward+backward of the same rows on this CPU (SmolLM2), the
    latter from the stored profile's un-shared variant (each row with its whole prompt, as the probe runs)."""
    if not (probe_s and rows and CPU_PROFILE.exists()):
        return None
    stored = json.loads(CPU_PROFILE.read_text(encoding="utf-8"))["variants"]["before"]["median_s"]
    fwd_bwd = stored["forward"] + stored["backward"]  # 16 rows (2 prompts x 8), batched
    return {"probe_s": probe_s, "probe_rows": rows, "stored_forward_backward_s_16_rows": fwd_bwd,
            "ratio_per_row": (probe_s / rows) / (fwd_bwd / 16), "source": str(CPU_PROFILE.relative_to(ROOT))}  # fmt: skip


def qwen_projection(ratio_per_row: float | None) -> dict[str, Any] | None:
    """A probe of 16 completions on Qwen2.5-1.5B / H100 priced from the stored H100 figures (extrapolated)."""
    if not QWEN_STORED.exists():
        return None
    stored = json.loads(QWEN_STORED.read_text(encoding="utf-8"))
    fwd_bwd = stored["train_step"]["median_step_s"]  # 16 rows x 640 tokens, batched, bf16
    gen = stored["generation"]
    generation_s = gen["batch"] * gen["new_tokens"] / gen["tokens_per_s"]  # 64 completions x 512 tokens
    step_s = generation_s + 4 * fwd_bwd  # 64 completions: four such forward+backward batches
    lower = fwd_bwd  # same FLOPs as the batched forward+backward of the 16 probed rows
    projected = {"probe_s_lower_bound": lower, "step_s": step_s, "generation_s": generation_s,
                 "overhead_lower_bound_at_every": {str(k): lower / (k * step_s) for k in EVERY}}  # fmt: skip
    if ratio_per_row is not None:
        projected["probe_s_at_cpu_ratio"] = fwd_bwd * ratio_per_row
        projected["overhead_at_cpu_ratio_at_every"] = {
            str(k): fwd_bwd * ratio_per_row / (k * step_s) for k in EVERY
        }
    projected["label"] = (
        "extrapolated, not measured: Qwen2.5-1.5B shape on an H100 from benchmarks/results/qwen2.5-1.5b.h100.json "
        "(batched forward+backward of 16 x 640 tokens; generation of 64 x 512 tokens at its measured tokens/s); "
        "a probe of 16 completions priced at that forward+backward (lower bound) and at it times the row-by-row "
        "ratio measured on SmolLM2 on this CPU"
    )
    return projected


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, nargs="*", default=[], help="run dirs or folders of run dirs")
    p.add_argument(
        "--smollm2", action="store_true", help="also train SmolLM2 with --alpha auto, probe each step"
    )
    p.add_argument("--smollm2-steps", type=int, default=4)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.smollm2_steps < 4:
        p.error(
            f"--smollm2-steps must be >= 4 (two probes for α, plain steps between), got {args.smollm2_steps}"
        )
    result: dict[str, Any] = {"command": "python benchmarks/probe_cost.py " + " ".join(argv or sys.argv[1:]),
                              "measured": time.strftime("%Y-%m-%d %H:%M:%S"), "cpus": os.cpu_count(),
                              "load_before": os.getloadavg(), "tasks": {}}  # fmt: skip
    by_task: dict[str, list[dict[str, Any]]] = {}
    for d in run_dirs(args.runs):
        costs = run_costs(d)
        by_task.setdefault(costs["task"], []).append(costs)
    if args.smollm2:
        with tempfile.TemporaryDirectory(prefix="probe_cost_") as tmp:
            out = Path(tmp) / "smollm2-auto"
            result["smollm2_run"] = train_smollm2(args.smollm2_steps, out)
            (run_dir,) = run_dirs([out])  # lab train --out DIR writes its run dir inside DIR
            costs = run_costs(run_dir)
            result["smollm2_run"]["alpha"] = costs["alpha"]
            by_task.setdefault("countdown (smollm2-135m)", []).append(costs)
    for task, runs in by_task.items():
        result["tasks"][task] = task_summary(runs)
    smol = result["tasks"].get("countdown (smollm2-135m)") or {}
    ratio = cpu_row_ratio(smol.get("median_probe_s"), smol.get("median_probe_rows"))
    result["cpu_row_ratio"] = ratio
    result["qwen2.5-1.5b_projection"] = qwen_projection(ratio["ratio_per_row"] if ratio else None)
    result["load_after"] = os.getloadavg()
    text = json.dumps(result, indent=1, default=str)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text, encoding="utf-8")
    for task, s in result["tasks"].items():
        over = s.get("step_overhead_at_every", {})
        print(f"{task}: probe timer {s['median_probe_s']} s ({s['median_probe_rows']} rows); step without a probe "
              f"{s['median_step_s_without_probe']} s, with one {s['median_step_s_with_probe']} s; step overhead at "
              f"a probe every 2 / 3 / 10 steps: {over.get('2')} / {over.get('3')} / {over.get('10')}")  # fmt: skip
    print(json.dumps(result["qwen2.5-1.5b_projection"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
