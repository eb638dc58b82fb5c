r"""What a task's world looks like to the aggregators, measured: lengths, advantages, gradient variance.

The aggregators differ only through the lengths (:mod:`lab.aggregation`), and the theory that ranks them
assumes (i) :math:`\mathrm{Var}(g_i) \approx V L_i`, (ii) :math:`E[g_i \mid L_i]` the same for every length
(so the advantage says nothing about the length). These functions measure both, from run logs
(:mod:`lab.runlog`) or from one large sampled batch of a model:

- :func:`length_ratios`: within-group longest / shortest completion at a step (the spread the weights act on);
- :func:`advantage_by_length`: :math:`\mathrm{corr}(A_i, L_i)` and :math:`E[A_i]`, :math:`E[A_i^2]` by length bin;
- :func:`variance_fit_at_step`: the unbiased :math:`\hat t_i` of the runs' gradient probes at one step, pooled
  over seeds, fitted against :math:`L_i` (:func:`lab.probes.variance_length_fit`) with group-bootstrap intervals;
- :func:`measure_batch`: per-sample gradients of one large batch of a model (prompts x completions), the
  same fit, and every aggregator's measured CV next to its theoretical CV on the same lengths: a probe's
  64 rows do not resolve the mean gradient from its noise in the paper world (its CV reads ``inf``), a
  batch of ~1000 does; the CV of a sum over N rows scales as :math:`1/\sqrt N` for every aggregator alike,
  so the ratios between aggregators do not depend on N.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from lab.aggregation import METHODS, sequence_weights
from lab.probes import bootstrap_variance_fit, variance_length_fit
from lab.runlog import RunReader

#: Length bins (lower edges, inclusive) for :func:`advantage_by_length`: doublings from 1 token.
LENGTH_BINS = (1, 2, 4, 8, 16, 32, 64)


def _readers(run_dirs: Iterable[str | Path]) -> list[RunReader]:
    readers = []
    for run_dir in run_dirs:
        reader = RunReader(Path(run_dir))
        reader.poll()
        readers.append(reader)
    return readers


def _one_per_seed(readers: list[RunReader]) -> list[RunReader]:
    """The first run of each seed: at step 1 the runs of one seed have the same model and the same batch."""
    seen, out = set(), []
    for reader in readers:
        seed = reader.config.get("seed")
        if seed not in seen:
            seen.add(seed)
            out.append(reader)
    return out


def _quartiles(values: Sequence[float]) -> dict[str, float | int | None]:
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if len(finite) < 2:
        return {"median": finite[0] if finite else None, "q1": None, "q3": None, "n": len(finite)}
    q1, q2, q3 = statistics.quantiles(finite, n=4)
    return {"median": q2, "q1": q1, "q3": q3, "n": len(finite)}


def length_ratios(run_dirs: Iterable[str | Path], *, step: int = 1) -> dict[str, Any]:
    """Median and quartiles over prompt groups of (longest / shortest completion) in the batch of ``step``
    (one run per seed: the runs of a seed share that batch at step 1). ``n`` counts groups."""
    ratios = []
    for reader in _one_per_seed(_readers(run_dirs)):
        for record in reader.samples:
            if record.get("step") != step:
                continue
            groups: dict[int, list[float]] = {}
            for length, group in zip(record["lengths"], record["group"], strict=True):
                groups.setdefault(group, []).append(length)
            ratios += [max(v) / min(v) for v in groups.values() if min(v) > 0]
    return {"step": step, **_quartiles(ratios)}


def _bin_of(length: float, bins: Sequence[int]) -> int:
    return max(b for b in bins if b <= length)


def advantage_by_length(
    run_dirs: Iterable[str | Path], *, steps: tuple[int, int] | None = None, bins: Sequence[int] = LENGTH_BINS
) -> dict[str, Any]:
    r"""Does the length say anything about the advantage? Over every completion logged in ``samples.jsonl``
    (steps in the inclusive range ``steps``, all if None): Pearson's :math:`\mathrm{corr}(A_i, L_i)`, and per
    length bin (lower edges ``bins``) the count, :math:`E[A_i]` and :math:`E[A_i^2]`. Under the paper's
    assumption the correlation is ~0 and both rows are flat; completions of length 0 are left out."""
    if sorted(set(bins)) != list(bins) or not bins or bins[0] < 1:
        raise ValueError(f"bins must be increasing lower edges >= 1, got {list(bins)!r}")
    lengths, advantages = [], []
    for reader in _readers(run_dirs):
        for record in reader.samples:
            if steps is not None and not steps[0] <= record.get("step", -1) <= steps[1]:
                continue
            for length, adv in zip(record["lengths"], record["advantages"], strict=True):
                if length and length > 0 and isinstance(adv, (int, float)) and math.isfinite(adv):
                    lengths.append(float(length))
                    advantages.append(float(adv))
    if len(lengths) < 2:
        return {"n": len(lengths), "corr": None, "bins": []}
    L, A = torch.tensor(lengths, dtype=torch.float64), torch.tensor(advantages, dtype=torch.float64)
    dl, da = L - L.mean(), A - A.mean()
    denom = math.sqrt(float(dl @ dl) * float(da @ da))
    table = []
    for lo in bins:
        inside = [i for i, n in enumerate(lengths) if _bin_of(n, bins) == lo]
        if inside:
            a = A[inside]
            table.append({"min_length": lo, "n": len(inside), "mean_a": float(a.mean()),
                          "mean_a2": float(a.square().mean())})  # fmt: skip
    return {"n": len(lengths), "corr": float(dl @ da) / denom if denom > 0 else None, "bins": table}


def _fit_with_interval(
    L: torch.Tensor, v: torch.Tensor, groups: torch.Tensor, n_bootstrap: int
) -> dict[str, Any]:
    fit = variance_length_fit(L, v)
    intervals = bootstrap_variance_fit(L, v, groups, n_bootstrap=n_bootstrap)
    return {
        "exponent": fit["exponent"],
        "exponent_ci": list(intervals["exponent"]),
        "slope": fit["slope"],
        "slope_ci": list(intervals["slope"]),
        "intercept": fit["intercept"],
        "intercept_ci": list(intervals["intercept"]),
        "correlation": fit["correlation"],
        "rows": fit["n"],
        "groups": int(groups.unique().numel()),
        "n_nonpositive": fit["n_nonpositive"],
    }


def variance_fit_at_step(
    run_dirs: Iterable[str | Path], *, step: int = 1, group_size: int, n_bootstrap: int = 500
) -> dict[str, Any]:
    r"""The unbiased per-row :math:`\hat t_i` of the gradient probes logged at ``step`` (one run per seed),
    pooled and fitted against :math:`L_i`: exponent k of :math:`c L^k`, slope and intercept of
    :math:`a + b L`, each with a 95% bootstrap interval over prompt groups (``group_size`` consecutive rows
    of a probe are one prompt's completions)."""
    lengths, variances, groups = [], [], []
    offset = 0
    for reader in _one_per_seed(_readers(run_dirs)):
        for probe in reader.probes:
            if probe.get("step") != step:
                continue
            n = len(probe["lengths"])
            lengths += probe["lengths"]
            variances += [math.nan if v is None else v for v in probe["grad_variances"]]
            groups += [offset + i // group_size for i in range(n)]
            offset += math.ceil(n / group_size)
    if not lengths:
        return {"step": step, "rows": 0}
    L = torch.tensor(lengths, dtype=torch.float64)
    v = torch.tensor(variances, dtype=torch.float64)
    return {"step": step, **_fit_with_interval(L, v, torch.tensor(groups), n_bootstrap)}


def family_ratios(cv: dict[str, float]) -> dict[str, float | None]:
    """CV ratios of the uniform-weight family (Dr. GRPO, DAPO) to the 1/L family (ΔL, GRPO): each unbiased
    or biased pair, and the family means."""

    def ratio(a: float | None, b: float | None) -> float | None:
        ok = all(isinstance(x, (int, float)) and math.isfinite(x) and x > 0 for x in (a, b))
        return a / b if ok else None

    return {
        "dr_grpo/delta_l": ratio(cv.get("dr_grpo"), cv.get("delta_l")),
        "dapo/grpo": ratio(cv.get("dapo"), cv.get("grpo")),
        "family": ratio(
            _mean([cv.get("dr_grpo"), cv.get("dapo")]), _mean([cv.get("delta_l"), cv.get("grpo")])
        ),
    }


def _mean(values: list[float | None]) -> float | None:
    ok = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(ok) / len(ok) if len(ok) == len(values) else None


def cv_under_power_law(
    lengths: torch.Tensor, exponent: float, *, max_length: float, methods: Iterable[str] = METHODS
) -> dict[str, float]:
    r"""Each aggregator's CV on these lengths if :math:`\mathrm{Var}(g_i) = c L_i^k` instead of :math:`V L_i`
    (:math:`k = 1` gives :func:`lab.aggregation.counterfactual_cv`): :math:`\sqrt{\sum_i x_i^2 L_i^k} / \sum_i x_i`
    with the weights of :func:`lab.aggregation.sequence_weights` (c cancels in every ratio)."""
    L = torch.as_tensor(lengths, dtype=torch.float64).reshape(-1)
    L = L[L > 0]
    out = {}
    for method in methods:
        x = sequence_weights(L, method, max_length=max_length)
        out[method] = math.sqrt(float((x.square() * L**exponent).sum())) / float(x.sum())
    return out


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """TRL's GRPO advantages: reward minus its group's mean, over the group's standard deviation + 1e-4."""
    r = rewards.double().reshape(-1, group_size)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).reshape(-1)


def measure_batch(
    model_name: str,
    task_name: str,
    *,
    prompts: int = 128,
    num_generations: int = 8,
    max_length: int,
    seed: int = 0,
    chunk: int = 256,
    n_bootstrap: int = 400,
    task_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    r"""One large batch of ``model_name``'s completions (``prompts`` train prompts x ``num_generations``):
    per-sample gradients of its own linear layers (:func:`lab.probes.linear_per_sample_gradients`, in chunks
    of ``chunk`` rows), their variance against length (k, slope, intercept with group-bootstrap intervals),
    and every aggregator's measured CV (bootstrap over rows of :math:`g_i = A_i s_i`) beside its theoretical
    CV under :math:`\mathrm{Var}(g_i) = V L_i` on the same lengths, and the family ratios of both."""
    from lab.models import load_model_and_tokenizer
    from lab.probes import linear_per_sample_gradients, probe_statistics, sample_generation_batch
    from lab.tasks import get_task

    task = get_task(task_name)
    data = task.train_dataset(prompts, seed=seed, chat=False, **(task_options or {}))
    model, tokenizer = load_model_and_tokenizer(model_name, dtype=torch.float32)
    model.eval()
    batch = sample_generation_batch(
        model,
        tokenizer,
        data["prompt"],
        num_generations=num_generations,
        max_new_tokens=max_length,
        seed=seed,
    )
    texts = tokenizer.batch_decode(
        batch["completion_ids"] * batch["completion_mask"], skip_special_tokens=True
    )
    columns = [
        {k: v for k, v in data[i // num_generations].items() if k != "prompt"} for i in range(len(texts))
    ]
    rewards = torch.tensor([task.score(t, **c) for t, c in zip(texts, columns, strict=True)])
    advantages = group_advantages(rewards, num_generations)
    parts = []
    for start in range(0, len(texts), chunk):
        rows = slice(start, start + chunk)
        grads, covered = linear_per_sample_gradients(
            model, batch["prompt_ids"][rows], batch["prompt_mask"][rows], batch["completion_ids"][rows],
            batch["completion_mask"][rows],
        )  # fmt: skip
        parts.append(grads)
    grads = torch.cat(parts)
    lengths = batch["lengths"].double()
    stats = probe_statistics(
        grads, lengths, max_length=max(float(max_length), float(lengths.max())), group_size=num_generations,
        advantages=advantages, n_bootstrap=n_bootstrap, seed=seed,
    )  # fmt: skip
    v = torch.tensor(stats["grad_variances"], dtype=torch.float64)
    groups = torch.arange(len(texts)) // num_generations
    return {
        "model": model_name,
        "task": task_name,
        "rows": len(texts),
        "prompts": prompts,
        "num_generations": num_generations,
        "param_fraction": covered,
        "mean_reward": float(rewards.mean()),
        "mean_length": float(lengths.mean()),
        "variance_fit": _fit_with_interval(lengths, v, groups, 500),
        "cv": stats["cv"],
        "cv_theory": stats["cv_theory"],
        "ratio_measured": family_ratios(stats["cv"]),
        "ratio_theory": family_ratios(stats["cv_theory"]),
        # the same, with the variance's measured exponent in place of the assumed k = 1
        "ratio_theory_fitted_exponent": family_ratios(
            cv_under_power_law(
                lengths, stats["exponent"], max_length=max(float(max_length), float(lengths.max()))
            )
        ),
        "methods": list(METHODS),
    }
