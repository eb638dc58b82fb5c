r"""Synthetic comparisons for checking the verdict itself: how often it marks a pair when nothing differs.

A comparison's reward curves are modelled as

.. math:: r_{a,s,t} = \mu_t + S_s + U_{a,s} + W_{s,t} + E_{a,s,t}

for aggregator a, seed s and step t: :math:`\mu_t` the mean learning curve, :math:`S_s` a seed effect
(every aggregator of a seed sees the same prompts), :math:`U_{a,s}` a run effect (constant over the run),
:math:`W_{s,t}` a step effect shared by the aggregators of a seed (the same prompts at step t are easy or
hard for all of them) and :math:`E_{a,s,t}` the run's own step noise, all independent normals.
:func:`estimate_noise` fits the four spreads to a stored comparison by the method of moments (a balanced
two-way layout per step); :func:`synthetic_curves` draws new comparisons from them, with optional true
differences per aggregator. The verdict (:mod:`lab.verdict`) is then run on those as on real runs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from lab.verdict import Curve


@dataclass(frozen=True)
class NoiseModel:
    """The mean learning curve and the four spreads of the model above (reward units)."""

    mean_curve: tuple[float, ...]
    seed_sd: float
    run_sd: float
    shared_step_sd: float
    step_sd: float

    def __post_init__(self) -> None:
        for name in ("seed_sd", "run_sd", "shared_step_sd", "step_sd"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number ≥ 0, got {value!r}")
        if not self.mean_curve:
            raise ValueError("mean_curve must have at least one step")


def rewards_array(curves: Mapping[str, Mapping[int, Curve]]) -> np.ndarray:
    """``{label: {seed: [(step, reward)]}}`` as an array (labels, seeds, steps); every run the same steps."""
    labels = list(curves)
    seeds = sorted({s for by_seed in curves.values() for s in by_seed})
    steps = None
    out = []
    for label in labels:
        rows = []
        for s in seeds:
            if s not in curves[label]:
                raise ValueError(f"{label} has no run for seed {s}: the layout must be balanced")
            points = sorted(curves[label][s])
            these = [p[0] for p in points]
            steps = these if steps is None else steps
            if these != steps:
                raise ValueError(f"{label}/s{s} logged other steps than the first run")
            rows.append([p[1] for p in points])
        out.append(rows)
    return np.asarray(out, dtype=np.float64)


def estimate_noise(rewards: np.ndarray) -> NoiseModel:
    """Method-of-moments fit of :class:`NoiseModel` to ``rewards`` of shape (labels, seeds, steps).

    Each mean square below has a known expectation in the four variances; negative estimates are set to 0.
    """
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 3 or min(r.shape) < 2:
        raise ValueError(f"rewards must have shape (labels ≥ 2, seeds ≥ 2, steps ≥ 2), got {r.shape}")
    n_labels, n_seeds, n_steps = r.shape
    run_mean = r.mean(axis=2)  # (labels, seeds)
    seed_step = r.mean(axis=0)  # (seeds, steps)
    seed_mean = run_mean.mean(axis=0)  # (seeds,)
    # E: the interaction of label and step within a seed
    e = r - seed_step[None] - run_mean[:, :, None] + seed_mean[None, :, None]
    var_e = (e**2).sum() / (n_seeds * (n_labels - 1) * (n_steps - 1))
    # U: runs of a seed about the seed's mean (each run mean carries E / steps)
    u = run_mean - seed_mean[None]
    var_u = (u**2).sum() / (n_seeds * (n_labels - 1)) - var_e / n_steps
    # W: seed × step means, double-centred (each carries E / labels)
    w = seed_step - seed_mean[:, None] - seed_step.mean(axis=0)[None] + seed_mean.mean()
    var_w = (w**2).sum() / ((n_seeds - 1) * (n_steps - 1)) - var_e / n_labels
    # S: seed means (each carries U / labels, W / steps, E / (labels · steps))
    var_s = seed_mean.var(ddof=1) - max(var_u, 0) / n_labels - max(var_w, 0) / n_steps
    var_s -= var_e / (n_labels * n_steps)
    return NoiseModel(
        mean_curve=tuple(float(v) for v in r.mean(axis=(0, 1))),
        seed_sd=math.sqrt(max(var_s, 0.0)),
        run_sd=math.sqrt(max(var_u, 0.0)),
        shared_step_sd=math.sqrt(max(var_w, 0.0)),
        step_sd=math.sqrt(max(var_e, 0.0)),
    )


def synthetic_curves(
    model: NoiseModel,
    labels: Sequence[str],
    seeds: Sequence[int],
    rng: np.random.Generator,
    *,
    effects: Mapping[str, float] | None = None,
) -> dict[str, dict[int, Curve]]:
    """One synthetic comparison ``{label: {seed: [(step, reward)]}}`` drawn from ``model``.

    ``effects`` adds a true constant difference to a label's whole curve (absent labels: 0), so every
    verdict metric of that label moves by the same amount.
    """
    effects = dict(effects or {})
    unknown = set(effects) - set(labels)
    if unknown:
        raise ValueError(f"effects for unknown label(s) {sorted(unknown)}; labels are {list(labels)}")
    mu = np.asarray(model.mean_curve)
    n_labels, n_seeds, n_steps = len(labels), len(seeds), mu.size
    seed = rng.normal(0, model.seed_sd, size=(1, n_seeds, 1))
    run = rng.normal(0, model.run_sd, size=(n_labels, n_seeds, 1))
    shared = rng.normal(0, model.shared_step_sd, size=(1, n_seeds, n_steps))
    own = rng.normal(0, model.step_sd, size=(n_labels, n_seeds, n_steps))
    shift = np.asarray([effects.get(label, 0.0) for label in labels]).reshape(-1, 1, 1)
    rewards = mu + seed + run + shared + own + shift
    steps = range(1, n_steps + 1)
    return {
        label: {int(s): list(zip(steps, rewards[i, j].tolist(), strict=True)) for j, s in enumerate(seeds)}
        for i, label in enumerate(labels)
    }
