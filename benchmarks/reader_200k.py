"""A 200,000-step run still renders: time the bounded reader and the Overview's reward figure on it.

Writes one SYNTHETIC finished run whose metrics.jsonl has ``--steps`` lines (default 200,000), each with the
60 keys of a real fast-preset step (names as TRL and the lab log them, random values), then measures:

- ``lab.runlog.RunReader.poll`` (every line opened, bounded, parsed, checked);
- ``lab.dashboard.data.RunData.refresh`` + ``.metrics`` (the DataFrame the views use);
- ``lab.dashboard.overview.reward_figure`` on it, serialized to JSON (what ``st.plotly_chart`` ships).

    .venv/bin/python benchmarks/reader_200k.py [--steps 200000] [--dir /tmp/dl-200k]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lab.dashboard import overview  # noqa: E402
from lab.dashboard.data import RunData, group_by_label  # noqa: E402
from lab.runlog import METRICS, RunReader, RunWriter  # noqa: E402

AGGREGATORS = ("grpo", "dapo", "dr_grpo", "delta_l")
PAIRS = [(a, b) for i, a in enumerate(AGGREGATORS) for b in AGGREGATORS[i + 1 :]]
KEYS = (
    ["step_time", "loss", "grad_norm", "learning_rate", "num_tokens", "reward", "reward_std", "entropy"]
    + [f"completions/{k}" for k in ("mean_length", "min_length", "max_length", "clipped_ratio",
                                     "mean_terminated_length", "min_terminated_length", "max_terminated_length")]
    + ["rewards/digitsum_reward/mean", "rewards/digitsum_reward/std", "frac_reward_zero_std"]
    + [f"delta_l/{k}" for k in ("weight_mean", "weight_min", "weight_max", "weight_std", "effective_sample_fraction")]
    + ["aggregator/relative_scale", "probe/var_length_slope", "probe/var_length_corr", "probe/var_length_exponent"]
    + ["probe/seconds", "epoch"] + [f"probe/cv/{a}" for a in AGGREGATORS] + [f"cv/{a}" for a in AGGREGATORS]
    + [f"clip_ratio/{k}" for k in ("low_mean", "high_mean", "region_mean", "low_min", "high_max")]
    + [f"agg_grad/norm/{a}" for a in AGGREGATORS]
    + [f"agg_grad/{kind}/{a}~{b}" for a, b in PAIRS for kind in ("cos", "norm_ratio")]
)  # fmt: skip


def write_big_run(root: Path, steps: int) -> Path:
    run_dir = root / "big" / "delta_l-s0"
    writer = RunWriter(run_dir)
    writer.write_config({"run_id": "delta_l-s0", "label": "delta_l", "aggregator": "delta_l", "seed": 0,
                         "max_steps": steps, "synthetic": True})  # fmt: skip
    rng = random.Random(0)
    with open(run_dir / METRICS, "w", encoding="utf-8") as f:  # one buffered write, not an fsync per line
        for step in range(1, steps + 1):
            record = {"step": step, "wall_time": 1.7e9 + step} | {k: rng.random() for k in KEYS}
            f.write(json.dumps(record, separators=(",", ":")) + "\n")
    writer.set_status("finished", steps, steps)
    return run_dir


def timed(label: str, fn):
    start = time.perf_counter()
    value = fn()
    print(f"{label:<58} {time.perf_counter() - start:7.2f} s", flush=True)
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200_000)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="dl-200k-"))
    run_dir = timed(f"write {args.steps:,} metric lines", lambda: write_big_run(root, args.steps))
    size = (run_dir / METRICS).stat().st_size
    print(f"metrics.jsonl: {size / 2**20:.0f} MiB, {size / args.steps:.0f} bytes a line")
    reader = RunReader(run_dir)
    n = timed("RunReader.poll (bounded read + parse of every line)", reader.poll)
    assert n == args.steps and not reader.warnings, reader.warnings
    del reader
    run = RunData(run_dir)
    frame = timed(
        "RunData.refresh + .metrics (the views' DataFrame)", lambda: (run.refresh(), run.metrics)[1]
    )
    assert len(frame) == args.steps
    groups = group_by_label([run])
    fig = timed("overview.reward_figure + to_json", lambda: overview.reward_figure(groups).to_json())
    print(
        f"figure JSON: {len(fig) / 1e6:.1f} MB; peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
    )


if __name__ == "__main__":
    main()
