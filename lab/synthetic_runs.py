"""SYNTHETIC run dirs for the dashboard tests and benchmark. Not training results.

Everything is written through :class:`lab.runlog.RunWriter`, in the schema of ``lab/runlog.py``. What is
synthetic and what is computed:

- lengths: drawn with :func:`lab.aggregation.sample_lengths` (lognormal, upper bound growing with the step,
  clipped at ``max_completion_length``; a completion at the bound is marked truncated);
- rewards: Bernoulli draws around one made-up learning curve, *the same curve for every aggregator* (no
  aggregator is favoured: differences between runs are seed noise only);
- advantages: group-normalized rewards; ΔL row weights: :func:`lab.aggregation.delta_l_row_weights`;
- ``cv/<method>``: :func:`lab.aggregation.estimator_stats` on the step's lengths (the real formula);
- probes: Var(g_i) drawn as V·L_i times Gamma noise (the paper's model, not a measurement), empirical CVs
  from :func:`lab.aggregation.simulate_estimators` under that model.
"""

from __future__ import annotations

import contextlib
import json
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np

from lab.aggregation import METHODS, delta_l_row_weights, estimator_stats, sample_lengths, simulate_estimators
from lab.runlog import LOG_FILES, METRICS, PROBES, SAMPLES, STATUS, RunWriter, run_id, run_label


@dataclass
class SyntheticRun:
    """Settings of one synthetic run."""

    aggregator: str = "delta_l"
    alpha: float = 1.0
    seed: int = 0
    steps: int = 40
    max_steps: int | None = None  # defaults to steps (a finished run)
    num_prompts: int = 4
    num_generations: int = 8
    max_completion_length: int = 512
    eval_every: int = 10
    probe_every: int = 20
    state: str = "finished"
    model: str = "synthetic"
    task: str = "countdown"


def reward_curve(step: int) -> float:
    """The made-up success probability at ``step`` (identical for every aggregator)."""
    return 0.1 + 0.7 * (1 - math.exp(-step / 300))


def run_config(spec: SyntheticRun, comparison: str) -> dict:
    """config.json content as ``lab compare`` writes it (plus a ``synthetic`` flag)."""
    return {
        "run_id": run_id(spec.aggregator, spec.seed, spec.alpha),
        "label": run_label(spec.aggregator, spec.alpha),
        "comparison": comparison,
        "aggregator": spec.aggregator,
        "alpha": spec.alpha,
        "seed": spec.seed,
        "task": spec.task,
        "model": spec.model,
        "max_steps": spec.max_steps or spec.steps,
        "num_generations": spec.num_generations,
        "max_completion_length": spec.max_completion_length,
        "synthetic": True,
    }


def stream_seed(spec: SyntheticRun) -> int:
    """A random stream per (label, seed), so runs of different aggregators differ by noise."""
    return zlib.crc32(run_label(spec.aggregator, spec.alpha).encode()) * 1000 + spec.seed


def step_records(spec: SyntheticRun, step: int, rng: np.random.Generator) -> tuple[dict, dict]:
    """(metrics record, samples record) for one synthetic step."""
    n, big_m = spec.num_prompts * spec.num_generations, spec.max_completion_length
    upper = int(big_m * min(1.0, 0.4 + 0.6 * step / 1000))
    lengths = sample_lengths(
        "lognormal", group_size=n, min_length=8, max_length=upper, seed=stream_seed(spec) * 7919 + step
    ).flatten()
    rewards = (rng.random(n) < reward_curve(step)).astype(float)
    grouped = rewards.reshape(spec.num_prompts, spec.num_generations)
    adv = ((grouped - grouped.mean(1, keepdims=True)) / (grouped.std(1, keepdims=True) + 1e-4)).flatten()
    if spec.aggregator == "delta_l":
        weights = delta_l_row_weights(lengths, alpha=spec.alpha, max_length=big_m).tolist()
    else:
        weights = [1.0] * n
    truncated = (lengths >= big_m).tolist()
    L = lengths.numpy()
    metrics = {
        "step": step,
        "wall_time": 1.7e9 + 10.0 * step,
        "step_time": 10.0 + rng.normal(0, 0.5),
        "tokens_per_second": float(L.sum() / 10.0),
        "loss": float(rng.normal(0, 0.01)),
        "grad_norm": float(abs(rng.normal(0.3, 0.05))),
        "reward": float(rewards.mean()),
        "reward_std": float(rewards.std()),
        "frac_reward_zero_std": float((grouped.std(1) == 0).mean()),
        "entropy": float(0.8 * math.exp(-step / 800) + 0.1),
        "completions/mean_length": float(L.mean()),
        "completions/max_length": float(L.max()),
        "completions/clipped_ratio": float(np.mean(truncated)),
    }
    for method in METHODS:
        stats = estimator_stats(lengths, method, alpha=spec.alpha, max_length=big_m)
        metrics[f"cv/{method}"] = stats["cv"]
    samples = {
        "step": step,
        "lengths": [int(x) for x in L],
        "rewards": rewards.tolist(),
        "advantages": adv.round(4).tolist(),
        "weights": [round(float(w), 5) for w in weights],
        "truncated": truncated,
        "group": [i // spec.num_generations for i in range(n)],
    }
    return metrics, samples


def probe_record(spec: SyntheticRun, step: int, lengths: list[int], rng: np.random.Generator) -> dict:
    """A synthetic gradient probe under Var(g_i) = V·L_i (V = 0.02)."""
    L = np.asarray(lengths[:16], dtype=float)
    grad_var = 0.02 * L * rng.gamma(4.0, 0.25, size=L.size)
    slope, intercept = np.polyfit(L, grad_var, 1)
    sim = simulate_estimators(
        L.tolist(), alpha=spec.alpha, max_length=spec.max_completion_length, n_trials=500
    )
    return {
        "step": step,
        "lengths": L.astype(int).tolist(),
        "grad_variances": grad_var.round(6).tolist(),
        "slope": float(slope),
        "intercept": float(intercept),
        "correlation": float(np.corrcoef(L, grad_var)[0, 1]),
        "cv": {m: float(sim[m]["cv"]) for m in METHODS},
    }


def write_run(
    root: Path, spec: SyntheticRun, comparison: str = "demo", *, partial_tail: bool = False
) -> Path:
    """Write one synthetic run dir under ``root/comparison`` and return its path."""
    run_dir = Path(root) / comparison / run_id(spec.aggregator, spec.seed, spec.alpha)
    writer = RunWriter(run_dir)
    writer.write_config(run_config(spec, comparison))
    max_steps = spec.max_steps or spec.steps
    rng = np.random.default_rng(stream_seed(spec))
    for step in range(1, spec.steps + 1):
        append_step(writer, spec, step, rng)
    writer.set_status(spec.state, spec.steps, max_steps)
    if partial_tail:  # a writer caught mid-line
        for name in (METRICS, SAMPLES):
            with open(run_dir / name, "a", encoding="utf-8") as f:
                f.write('{"step": ' + str(spec.steps + 1) + ', "lengths": [1')
    return run_dir


def append_step(writer: RunWriter, spec: SyntheticRun, step: int, rng: np.random.Generator) -> None:
    """Log one step (metrics, samples, and eval/probe when due) through ``writer``."""
    metrics, samples = step_records(spec, step, rng)
    if spec.probe_every and step % spec.probe_every == 0:
        probe = probe_record(spec, step, samples["lengths"], rng)
        metrics.update({"probe/slope": probe["slope"], "probe/correlation": probe["correlation"]})
        writer.log_probe(probe)
    writer.log_metrics(metrics)
    writer.log_samples(samples)
    if spec.eval_every and step % spec.eval_every == 0:
        p = min(1.0, max(0.0, reward_curve(step) + rng.normal(0, 0.02)))
        writer.log_eval({"step": step, "k": 8, "avg_at_k": p, "pass_at_k": 1 - (1 - p) ** 8, "n_prompts": 64})


# -------------------------------------------------------------------------------------------------------
# the four fixture kinds of the tests
# -------------------------------------------------------------------------------------------------------
COMPLETE_SPECS = (
    SyntheticRun("grpo", seed=0),
    SyntheticRun("grpo", seed=1),
    SyntheticRun("dapo", seed=0),
    SyntheticRun("dr_grpo", seed=0),
    SyntheticRun("delta_l", seed=0),
    SyntheticRun("delta_l", seed=1),
    SyntheticRun("delta_l", alpha=0.75, seed=0),
)


def make_complete(root: Path) -> Path:
    """A finished comparison: 4 aggregators + ΔL α=0.75, two seeds for grpo and delta_l."""
    for spec in COMPLETE_SPECS:
        write_run(root, spec)
    return root


def make_half_written(root: Path) -> Path:
    """Runs being written: state running, a partial last line, one run with only its config."""
    for spec in (SyntheticRun("grpo", steps=12, max_steps=40, state="running"),
                 SyntheticRun("delta_l", steps=7, max_steps=40, state="running")):  # fmt: skip
        write_run(root, spec, comparison="live", partial_tail=True)
    just_started = Path(root) / "live" / "dapo-s0"
    RunWriter(just_started).write_config(run_config(SyntheticRun("dapo", steps=0, max_steps=40), "live"))
    return root


def make_empty(root: Path) -> Path:
    """An existing but empty runs dir."""
    Path(root).mkdir(parents=True, exist_ok=True)
    return root


def make_corrupt(root: Path) -> Path:
    """Damaged files: garbage lines, wrong types, unreadable status.json, a run without samples."""
    good = write_run(root, SyntheticRun("grpo", steps=20), comparison="broken")
    bad = write_run(root, SyntheticRun("delta_l", steps=20), comparison="broken")
    for name in LOG_FILES:
        with open(bad / name, "a", encoding="utf-8") as f:
            f.write("this is not json\n[1, 2, 3]\n")
    with open(bad / SAMPLES, "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": 21, "lengths": "oops"}) + "\n")
        f.write(json.dumps({"step": 22, "lengths": [10, None, 30], "truncated": [True]}) + "\n")
    with open(bad / METRICS, "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": 21, "reward": "high", "cv/grpo": None}) + "\n")
    with open(bad / PROBES, "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": 21, "lengths": [1, 2], "grad_variances": [1.0], "cv": "x"}) + "\n")
    (good / STATUS).write_text("{not json", encoding="utf-8")
    (good / SAMPLES).unlink()
    return root


FIXTURE_KINDS = {"complete": make_complete, "half_written": make_half_written, "empty": make_empty,
                 "corrupt": make_corrupt}  # fmt: skip


@contextlib.contextmanager
def no_fsync() -> Iterator[None]:
    """Skip os.fsync while *generating* fixtures (thousands of lines); it changes nothing that is read."""
    with mock.patch("os.fsync", lambda fd: None):
        yield
