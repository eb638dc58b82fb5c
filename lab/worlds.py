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
  so the ratios between aggregators do not depend on N;
- :func:`paperworld_variance`: the paper world's batch token by token: each token's kind by the task's rules
  (:func:`paperworld_token_kinds`) and squared score norm (:func:`per_token_score_norms`), and the fit and
  CV ratios of all rows beside those of the well-formed rows (:func:`row_statistics`): the miscounted
  completions are what makes the world's variance grow faster than the length.
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
from lab.tasks.paperworld import DIGITS, EOS, FILLERS

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


def cv_under_variance(
    lengths: torch.Tensor, variances: torch.Tensor, *, max_length: float, methods: Iterable[str] = METHODS
) -> dict[str, float]:
    r"""Each aggregator's CV on these lengths if row i has :math:`\mathrm{Var}(g_i)` = ``variances[i]`` and
    every :math:`E[g_i]` is the same: :math:`\sqrt{\sum_i x_i^2 \mathrm{Var}(g_i)} / \sum_i x_i` with the
    weights of :func:`lab.aggregation.sequence_weights` (rows of length 0 are left out; a common scale of
    the variances cancels in every ratio between aggregators)."""
    L = torch.as_tensor(lengths, dtype=torch.float64).reshape(-1)
    var = torch.as_tensor(variances, dtype=torch.float64).reshape(-1)
    if var.shape != L.shape:
        raise ValueError(f"need one variance per length: {tuple(var.shape)} for {tuple(L.shape)}")
    keep = L > 0
    L, var = L[keep], var[keep]
    out = {}
    for method in methods:
        x = sequence_weights(L, method, max_length=max_length)
        out[method] = math.sqrt(float((x.square() * var).sum())) / float(x.sum())
    return out


def cv_under_power_law(
    lengths: torch.Tensor, exponent: float, *, max_length: float, methods: Iterable[str] = METHODS
) -> dict[str, float]:
    r"""Each aggregator's CV on these lengths if :math:`\mathrm{Var}(g_i) = c L_i^k` instead of :math:`V L_i`
    (:math:`k = 1` gives :func:`lab.aggregation.counterfactual_cv`): :func:`cv_under_variance` with
    :math:`\mathrm{Var}(g_i) = L_i^k` (c cancels in every ratio)."""
    L = torch.as_tensor(lengths, dtype=torch.float64).reshape(-1)
    L = L[L > 0]
    return cv_under_variance(L, L**exponent, max_length=max_length, methods=methods)


def cv_under_affine(
    lengths: torch.Tensor, intercept: float, slope: float, *, max_length: float,
    methods: Iterable[str] = METHODS,
) -> dict[str, float]:  # fmt: skip
    r""":func:`cv_under_variance` with :math:`\mathrm{Var}(g_i) = \max(a + V L_i, 0)`, the linear fit's
    line (a fitted negative intercept would give short rows a negative variance: those count as 0)."""
    L = torch.as_tensor(lengths, dtype=torch.float64).reshape(-1)
    L = L[L > 0]
    return cv_under_variance(
        L, (intercept + slope * L).clamp(min=0.0), max_length=max_length, methods=methods
    )


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """TRL's GRPO advantages: reward minus its group's mean, over the group's standard deviation + 1e-4."""
    r = rewards.double().reshape(-1, group_size)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).reshape(-1)


def scored_batch(
    model: torch.nn.Module,
    tokenizer: Any,
    task_name: str,
    *,
    prompts: int,
    num_generations: int,
    max_length: int,
    seed: int = 0,
    task_options: dict[str, Any] | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """``prompts`` train prompts of the task (``seed``) x ``num_generations`` sampled completions
    (:func:`lab.probes.sample_generation_batch`), the task's reward of each and its group advantage:
    ``(batch, rewards, advantages)``, rows grouped by prompt."""
    from lab.probes import sample_generation_batch
    from lab.tasks import get_task

    task = get_task(task_name)
    data = task.train_dataset(prompts, seed=seed, chat=False, **(task_options or {}))
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
    return batch, rewards, group_advantages(rewards, num_generations)


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
    from lab.probes import linear_per_sample_gradients, probe_statistics

    model, tokenizer = load_model_and_tokenizer(model_name, dtype=torch.float32)
    model.eval()
    batch, rewards, advantages = scored_batch(
        model, tokenizer, task_name, prompts=prompts, num_generations=num_generations, max_length=max_length,
        seed=seed, task_options=task_options,
    )  # fmt: skip
    n_rows = len(rewards)
    parts = []
    for start in range(0, n_rows, chunk):
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
    groups = torch.arange(n_rows) // num_generations
    return {
        "model": model_name,
        "task": task_name,
        "rows": n_rows,
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


# ---------------------------------------------------------------------------------------------------
# the paper world token by token: which tokens carry Var(g_i)
# ---------------------------------------------------------------------------------------------------
#: Kinds of a paper-world completion token (:func:`paperworld_token_kinds`).
TOKEN_KINDS = ("answer", "length", "filler_ok", "off", "eos")


def paperworld_token_kinds(tokens: Sequence[str]) -> list[str]:
    r"""The kind of each token of one paper-world completion, given up to and including its first ``<eos>``
    (the tokens TRL's completion mask covers), by the rules of :mod:`lab.tasks.paperworld`:

    - ``answer``: position 0 when it is a digit (the graded answer, right or wrong);
    - ``length``: position 1 when it is a filler (its number is the choice of k) or ``<eos>`` (k = 0);
    - ``filler_ok``: a later filler whose number is the previous filler's minus 1;
    - ``eos``: ``<eos>`` right after the filler numbered 1;
    - ``off``: every other token (a miscount: a wrong number, a filler after the one numbered 1, an
      ``<eos>`` before it; or malformed: no digit at position 0, neither a filler nor ``<eos>`` later), and
      every token after the first off one.

    Why "after" counts too: once the count is broken the rules no longer say what comes next, and the
    warm-up never showed the model such a prefix. A completion whose kinds hold no ``off`` and that ends
    with ``<eos>`` is exactly one that :func:`lab.tasks.paperworld.filler_count` accepts
    (:func:`paperworld_well_formed`). Raises ValueError for a token after an ``<eos>``.
    """
    if EOS in tokens[:-1]:
        raise ValueError(f"a token comes after the completion's <eos>: {list(tokens)!r}")
    kinds: list[str] = []
    due: int | None = None  # the number the next filler must carry; 0: <eos> is due
    for t, token in enumerate(tokens):
        if kinds and kinds[-1] == "off":
            kind = "off"
        elif t == 0:
            kind = "answer" if token in DIGITS else "off"
        elif t == 1 and (token == EOS or token in FILLERS):
            kind = "length"
        elif token == EOS:
            kind = "eos" if due == 0 else "off"
        elif token in FILLERS and int(token[1:]) == due:
            kind = "filler_ok"
        else:
            kind = "off"
        if token in FILLERS:
            due = int(token[1:]) - 1  # fillers count down: "c3" is followed by "?2"
        kinds.append(kind)
    return kinds


def paperworld_well_formed(tokens: Sequence[str]) -> bool:
    """Whether the task's rules accept the whole completion: answer, count-down to 1, ``<eos>``."""
    return bool(tokens) and tokens[-1] == EOS and "off" not in paperworld_token_kinds(tokens)


def batch_tokens(
    tokenizer: Any, completion_ids: torch.Tensor, completion_mask: torch.Tensor
) -> list[list[str]]:
    """Each row's completion tokens under its mask (up to and including the first ``<eos>``), as words."""
    return [
        tokenizer.convert_ids_to_tokens(ids[mask.bool()].tolist())
        for ids, mask in zip(completion_ids, completion_mask, strict=True)
    ]


def per_token_score_norms(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], *, chunk: int = 128
) -> tuple[torch.Tensor, torch.Tensor, float]:
    r"""Squared score norm of every completion token and the score function of every row, over the
    model's own linear layers (:func:`lab.probes.linear_per_sample_gradients`, ``chunk`` rows at a time):
    ``(norms (N, T) float64, 0 past a row's length; s (N, P'); fraction of trainable scalars covered)``.

    .. math::  n_{i,t} = \lVert \nabla_\theta \log \pi_\theta(o_{i,t} \mid q_i, o_{i,<t}) \rVert^2 ,
               \qquad s_i = \sum_t \nabla_\theta \log \pi_\theta(o_{i,t} \mid q_i, o_{i,<t})

    Per token by differences of prefix sums: the row gradient of the completion cut after token t is
    :math:`S_{i,t} = \sum_{u \le t} \nabla_\theta \log\pi_\theta(o_{i,u}\mid\cdot)` (cutting changes no
    earlier log-probability: attention is causal), so the token's own gradient is
    :math:`S_{i,t} - S_{i,t-1}`, exact. One batched backward per position, over the rows at least that
    long; the last :math:`S_{i,t}` of a row is its :math:`s_i`.
    """
    from lab.probes import linear_per_sample_gradients

    lengths = batch["completion_mask"].sum(1)
    norms = torch.zeros(batch["completion_ids"].shape, dtype=torch.float64)
    parts, covered = [], 1.0
    for start in range(0, lengths.numel(), chunk):
        rows = torch.arange(start, min(start + chunk, lengths.numel()))
        prefix = None  # S_{i,t-1} of the chunk's rows
        for t in range(int(lengths[rows].max())):
            live = rows[lengths[rows] > t]  # rows with a token at position t
            cut = slice(0, t + 1)
            S, covered = linear_per_sample_gradients(
                model, batch["prompt_ids"][live], batch["prompt_mask"][live],
                batch["completion_ids"][live, cut], batch["completion_mask"][live, cut],
            )  # fmt: skip
            if prefix is None:
                prefix = torch.zeros(rows.numel(), S.shape[1])
            at = live - start
            # $n_{i,t} = \lVert S_{i,t} - S_{i,t-1} \rVert^2$
            norms[live, t] = (S - prefix[at]).double().square().sum(1)
            prefix[at] = S
        parts.append(prefix)
    return norms, torch.cat(parts), covered


def _bin_rows(lengths: torch.Tensor, bins: Sequence[int]) -> list[tuple[int, torch.Tensor]]:
    """``(lower edge, rows in the bin)`` for each non-empty length bin."""
    of = torch.tensor([_bin_of(float(n), bins) if n >= bins[0] else -1 for n in lengths])
    return [(lo, (of == lo).nonzero().squeeze(1)) for lo in bins if bool((of == lo).any())]


def score_norms_by_kind(
    norms: torch.Tensor, kinds: Sequence[Sequence[str]], *, bins: Sequence[int] = LENGTH_BINS
) -> dict[str, Any]:
    r"""Where the squared score norms :math:`n_{i,t}` of :func:`per_token_score_norms` sit: per token kind
    (:data:`TOKEN_KINDS`) the token count, mean :math:`n_{i,t}` and share of :math:`\sum_{i,t} n_{i,t}`;
    per completion-length bin (lower edges ``bins``, on :math:`L_i` = ``len(kinds[i])``) the rows, the rows
    with an off token, the tokens, the off share of them, and the mean :math:`n_{i,t}` of off and other
    tokens. Row i's norms are ``norms[i, :L_i]``; the rest of its row is ignored."""
    if len(kinds) != norms.shape[0]:
        raise ValueError(f"need one kinds list per row: {len(kinds)} for {norms.shape[0]} rows")
    lengths = torch.tensor([len(k) for k in kinds])
    if max(lengths.tolist(), default=0) > norms.shape[1]:
        raise ValueError(f"a row has {int(lengths.max())} kinds but norms has {norms.shape[1]} columns")
    flat_norm = torch.cat([norms[i, :n] for i, n in enumerate(lengths.tolist())]).double()
    flat_kind = [k for row in kinds for k in row]
    bad = sorted(set(flat_kind) - set(TOKEN_KINDS))
    if bad:
        raise ValueError(f"unknown token kinds {bad}; expected some of {TOKEN_KINDS}")
    total = float(flat_norm.sum())

    def summary(pick: torch.Tensor) -> dict[str, float | int | None]:
        part = flat_norm[pick]
        return {"tokens": int(pick.sum()), "mean": float(part.mean()) if part.numel() else None,
                "share": float(part.sum()) / total if total > 0 else None}  # fmt: skip

    is_kind = {k: torch.tensor([x == k for x in flat_kind], dtype=torch.bool) for k in TOKEN_KINDS}
    row_of = torch.repeat_interleave(torch.arange(len(kinds)), lengths)
    table = []
    for lo, rows in _bin_rows(lengths.double(), bins):
        inside = torch.isin(row_of, rows)
        off, ok = inside & is_kind["off"], inside & ~is_kind["off"]
        table.append({
            "min_length": lo, "rows": rows.numel(), "off_rows": sum("off" in kinds[i] for i in rows.tolist()),
            "tokens": int(inside.sum()), "off_token_share": float(off.sum()) / float(inside.sum()),
            "mean_norm_ok": float(flat_norm[ok].mean()) if ok.any() else None,
            "mean_norm_off": float(flat_norm[off].mean()) if off.any() else None,
        })  # fmt: skip
    return {
        "tokens": len(flat_kind),
        "total": total,
        "by_kind": {k: summary(is_kind[k]) for k in TOKEN_KINDS},
        "by_length": table,
    }


def miscount_rate(kinds: Sequence[Sequence[str]]) -> float | None:
    """The hazard of breaking the count: first off tokens at positions >= 2 over the tokens at positions
    >= 2 that had no off token before them (each is one more chance to miscount)."""
    at_risk = first_off = 0
    for row in kinds:
        for t, kind in enumerate(row):
            if t >= 2:  # every token before it was well-formed (the loop stops at the first off one)
                at_risk += 1
                first_off += kind == "off"
            if kind == "off":
                break
    return first_off / at_risk if at_risk else None


def row_statistics(
    grads: torch.Tensor,
    lengths: torch.Tensor,
    groups: torch.Tensor,
    advantages: torch.Tensor,
    *,
    max_length: float,
    n_bootstrap: int = 400,
    fit_bootstrap: int = 500,
    seed: int = 0,
) -> dict[str, Any]:
    r"""What a set of rows says about the aggregators: the unbiased :math:`\hat t_i` of the score functions
    ``grads`` within ``groups`` (:func:`lab.probes.unbiased_variances`; groups may differ in size, rows of a
    group of fewer than 3 get NaN and leave the fit), its fit against :math:`L_i` with group-bootstrap
    intervals, each aggregator's measured CV of :math:`\sum_i x_i A_i s_i` (:func:`lab.probes.bootstrap_cv`)
    and its theoretical CV on the same lengths under three variance models: :math:`V L_i`
    (``cv_theory``), :math:`c L_i^k` at the fitted k and :math:`a + V L_i` at the fitted line, with the
    family ratios (:func:`family_ratios`) of each. ``n_bootstrap`` replicates for each CV, ``fit_bootstrap``
    for the fit's intervals; ``grad_variances`` holds the :math:`\hat t_i`."""
    from lab.aggregation import counterfactual_cv
    from lab.probes import bootstrap_cv, unbiased_variances

    L = lengths.double()
    v = unbiased_variances(grads, groups)
    fit = _fit_with_interval(L, v, groups, fit_bootstrap)
    g = grads.double() * advantages.double().reshape(-1, 1)  # $g_i = A_i s_i$
    gram = g @ g.T
    cv = {m: bootstrap_cv(g, L, m, max_length=max_length, n_bootstrap=n_bootstrap, seed=seed, gram=gram)
          for m in METHODS}  # fmt: skip
    theory = {
        "linear": counterfactual_cv(L, max_length=max_length),  # Var ∝ L, the paper's assumption
        "fitted_exponent": cv_under_power_law(L, fit["exponent"], max_length=max_length),
        "fitted_line": cv_under_affine(L, fit["intercept"], fit["slope"], max_length=max_length),
    }
    return {
        "rows": int(L.numel()),
        "mean_length": float(L.mean()),
        "variance_fit": fit,
        "cv": cv,
        "cv_theory": theory["linear"],
        "ratio_measured": family_ratios(cv),
        "ratio_theory": {name: family_ratios(c) for name, c in theory.items()},
        "grad_variances": v,
    }


def paperworld_variance(
    *,
    prompts: int = 64,
    num_generations: int = 8,
    seed: int = 0,
    chunk: int = 128,
    n_bootstrap: int = 400,
    fit_bootstrap: int = 500,
    bins: Sequence[int] = LENGTH_BINS,
) -> dict[str, Any]:
    r"""Why the paper world's :math:`\mathrm{Var}(g_i)` grows faster than :math:`L_i`: one sampled batch of
    the warm ``paperworld-tiny`` (``prompts`` train prompts x ``num_generations``, the batch of
    :func:`measure_batch` at the same seed), each completion token labelled
    (:func:`paperworld_token_kinds`) and its squared score norm measured (:func:`per_token_score_norms`),
    aggregated by kind and length bin (:func:`score_norms_by_kind`); then :func:`row_statistics` on
    ``all`` rows and on the ``well_formed`` rows only (no off token), so that the variance fit and the
    CV ratios can be read with and without the miscounted completions.

    Also: ``miscount_rate`` (:func:`miscount_rate`), ``off_rows`` and the share of
    :math:`\sum_i \hat t_i` (all rows) that they carry, ``off_variance_share``; per length bin the mean
    :math:`\hat t_i` of all and of well-formed rows, and the mean per-row :math:`\sum_t n_{i,t}`.
    """
    from lab.models import load_model_and_tokenizer
    from lab.tasks.paperworld import MAX_COMPLETION_LENGTH

    model, tokenizer = load_model_and_tokenizer("paperworld-tiny", dtype=torch.float32)
    model.eval()
    batch, rewards, advantages = scored_batch(
        model, tokenizer, "paperworld", prompts=prompts, num_generations=num_generations,
        max_length=MAX_COMPLETION_LENGTH, seed=seed,
    )  # fmt: skip
    tokens = batch_tokens(tokenizer, batch["completion_ids"], batch["completion_mask"])
    kinds = [paperworld_token_kinds(row) for row in tokens]
    norms, grads, covered = per_token_score_norms(model, batch, chunk=chunk)
    L = batch["lengths"].double()
    max_length = max(float(MAX_COMPLETION_LENGTH), float(L.max()))
    groups = torch.arange(L.numel()) // num_generations
    ok = torch.tensor([paperworld_well_formed(row) for row in tokens])

    def stats(rows: torch.Tensor) -> dict[str, Any]:
        return row_statistics(grads[rows], L[rows], groups[rows], advantages[rows], max_length=max_length,
                              n_bootstrap=n_bootstrap, fit_bootstrap=fit_bootstrap, seed=seed)  # fmt: skip

    every, well = stats(torch.arange(L.numel())), stats(ok.nonzero().squeeze(1))
    v_all = every.pop("grad_variances")
    v_ok = torch.full_like(L, math.nan)
    v_ok[ok] = well.pop("grad_variances")
    finite = torch.isfinite(v_all)
    by_kind = score_norms_by_kind(norms, kinds, bins=bins)
    token_sum = norms.sum(1)
    for row in by_kind["by_length"]:
        inside = torch.tensor([_bin_of(float(n), bins) == row["min_length"] for n in L])
        row["mean_variance"] = _nanmean(v_all[inside])
        row["mean_variance_well_formed"] = _nanmean(v_ok[inside])
        row["mean_token_sum"] = float(token_sum[inside].mean())
    return {
        "model": "paperworld-tiny",
        "rows": int(L.numel()),
        "prompts": prompts,
        "num_generations": num_generations,
        "seed": seed,
        "param_fraction": covered,
        "mean_reward": float(rewards.mean()),
        "well_formed_rows": int(ok.sum()),
        "off_rows": int((~ok).sum()),
        "off_variance_share": float(v_all[finite & ~ok].sum() / v_all[finite].sum()),
        "miscount_rate": miscount_rate(kinds),
        "score_norms": by_kind,
        "all": every,
        "well_formed": well,
        "methods": list(METHODS),
    }


def _nanmean(x: torch.Tensor) -> float | None:
    x = x[torch.isfinite(x)]
    return float(x.mean()) if x.numel() else None
