"""Gradient probes, part 2: Var(g_i) against L_i and the measured CV of each aggregator (:mod:`lab.probes`)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from lab.aggregation import METHODS, check_alpha, counterfactual_cv, sequence_weights


# ---------------------------------------------------------------------------------------------------
# 2. statistics: Var(g_i) against L_i, and the measured CV of each aggregator
# ---------------------------------------------------------------------------------------------------
def group_labels(n: int, group_size: int | None) -> torch.Tensor:
    """Group index of each of ``n`` rows: consecutive blocks of ``group_size`` rows (one prompt's
    completions each), or a single group when ``group_size`` is None."""
    if group_size is None:
        group_size = n
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or n % group_size:
        raise ValueError(f"group_size={group_size!r} must be a positive divisor of the number of rows {n}")
    return torch.arange(n) // group_size


def least_squares(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float]:
    r"""Ordinary least squares :math:`y \approx a + b x`: returns ``(b, a, r)`` with r Pearson's correlation.

    :math:`b = \mathrm{cov}(x, y) / \mathrm{var}(x)`, :math:`a = \bar y - b \bar x`,
    :math:`r = \mathrm{cov}(x, y) / (\sigma_x \sigma_y)`; NaN where undefined (fewer than two distinct x).
    """
    if x.numel() < 2:
        return math.nan, math.nan, math.nan
    dx, dy = x - x.mean(), y - y.mean()
    sxx, syy, sxy = float(dx @ dx), float(dy @ dy), float(dx @ dy)
    if sxx <= 0:
        return math.nan, math.nan, math.nan
    slope = sxy / sxx
    intercept = float(y.mean()) - slope * float(x.mean())
    corr = sxy / math.sqrt(sxx * syy) if syy > 0 else math.nan
    return slope, intercept, corr


def group_centred_norms(grads: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    r"""The *biased* proxy :math:`v_i = \lVert g_i - \bar g \rVert^2` (:math:`\bar g` = mean of i's group).

    Kept to teach what :func:`grad_variances` corrects (notebook 01): for independent rows with a shared
    mean, :math:`E[v_i] = (1 - 2/n)\,\mathrm{tr}\,\Sigma_i + \frac{1}{n^2}\sum_j \mathrm{tr}\,\Sigma_j`, so a
    fit of :math:`v_i` against :math:`L_i` gets an intercept and a flattened exponent from the estimator.
    """
    groups = group_labels(grads.shape[0], group_size)
    out = torch.empty(grads.shape[0], dtype=torch.float64)
    for label in groups.unique():
        rows = (groups == label).nonzero().squeeze(1)
        block = grads[rows].double()
        out[rows] = (block - block.mean(0)).square().sum(-1)
    return out


def unbiased_variances(grads: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    r""":func:`grad_variances` for arbitrary group labels (one per row; groups may differ in size).

    Rows of a group with fewer than 3 members get NaN: with 2 rows only :math:`\mathrm{tr}\,\Sigma_1 +
    \mathrm{tr}\,\Sigma_2` is identifiable, not each term.
    """
    groups = torch.as_tensor(groups).reshape(-1)
    if groups.shape[0] != grads.shape[0]:
        raise ValueError(f"need one group label per row: {groups.shape[0]} labels for {grads.shape[0]} rows")
    out = torch.full((grads.shape[0],), math.nan, dtype=torch.float64)
    for label in groups.unique():
        rows = (groups == label).nonzero().squeeze(1)
        n = rows.numel()
        if n < 3:
            continue
        block = grads[rows].double()
        # $v_i = \lVert g_i - \bar g \rVert^2$, $S = \sum_j v_j$
        v = (block - block.mean(0)).square().sum(-1)
        # $\hat t_i = \frac{n}{n-2} v_i - \frac{S}{(n-1)(n-2)}$, so that $E[\hat t_i] = \mathrm{tr}\,\Sigma_i$
        out[rows] = n / (n - 2) * v - v.sum() / ((n - 1) * (n - 2))
    return out


def grad_variances(grads: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    r"""Unbiased per-row estimates :math:`\hat t_i` of :math:`\mathrm{tr}\,\Sigma_i = E\lVert g_i - E g_i\rVert^2`.

    Rows come in groups of ``group_size`` consecutive rows (one prompt's completions; None: the whole
    batch is one group). Within a group of :math:`n \ge 3` rows the :math:`g_i` are assumed independent
    with a **shared mean** :math:`\mu` (whatever it is) and their own covariances :math:`\Sigma_i`.

    Derivation. Write :math:`g_j = \mu + e_j` with :math:`E e_j = 0`, :math:`\mathrm{Cov}\,e_j = \Sigma_j`.
    The group-centred square norm :math:`v_i = \lVert g_i - \bar g \rVert^2` (:math:`\bar g` the group mean)
    is :math:`\lVert (1 - \tfrac1n) e_i - \tfrac1n \sum_{j \ne i} e_j \rVert^2`; cross terms vanish in
    expectation, so

    .. math::  E[v_i] = (1 - \tfrac1n)^2 \mathrm{tr}\,\Sigma_i + \tfrac1{n^2}\sum_{j\ne i}\mathrm{tr}\,\Sigma_j
               = (1 - \tfrac2n)\,\mathrm{tr}\,\Sigma_i + \tfrac{T}{n^2}, \qquad T = \sum_j \mathrm{tr}\,\Sigma_j .

    :math:`v_i` itself is biased: every row of the group gets :math:`T/n^2`, about :math:`V\bar L/n` under
    :math:`\mathrm{Var} = V L` (a spurious intercept), and long rows are shrunk by :math:`1 - 2/n` (a
    flattened log-log exponent). Summing over the group, :math:`E[S] = E[\sum_j v_j] = (1 - \tfrac1n)T`,
    so :math:`\hat T = S / (1 - \tfrac1n)` is unbiased for :math:`T`, and solving for the trace,

    .. math::  \hat t_i = \frac{v_i - \hat T / n^2}{1 - 2/n} = \frac{n}{n-2}\,v_i - \frac{S}{(n-1)(n-2)},
               \qquad E[\hat t_i] = \mathrm{tr}\,\Sigma_i .

    Equivalently :math:`\hat t_i` is the mean of :math:`(g_i - g_j)^\top (g_i - g_k)` over ordered pairs of
    distinct other rows :math:`j \ne k` (each has expectation :math:`\mathrm{tr}\,\Sigma_i`): it does not
    depend on :math:`\mu` at all, and needs :math:`n \ge 3` (with :math:`n = 2` only
    :math:`\mathrm{tr}\,\Sigma_1 + \mathrm{tr}\,\Sigma_2` is identifiable). Unbiasedness has a price:
    :math:`\hat t_i` is noisier than :math:`v_i` and **can be negative** for a row whose variance is small
    next to its group's (:func:`probe_statistics` fits the power law in a way that accepts that).

    What "shared mean" means here: the fit reads :math:`\hat t_i` against :math:`L_i`, i.e. it treats
    each row's variance as a function of its length; if :math:`E[g_i \mid L_i]` itself moves with length
    within a group, the spread of those conditional means is counted as variance.

    Returns a float64 tensor of shape ``(N,)``. Raises ValueError if ``group_size`` does not divide the
    rows or gives groups of fewer than 3 rows.
    """
    n_rows = grads.shape[0]
    groups = group_labels(n_rows, group_size)
    size = n_rows if group_size is None else group_size
    if size < 3:
        raise ValueError(
            f"group_size={group_size!r} gives groups of {size} row(s); an unbiased per-row variance needs >= 3"
        )
    return unbiased_variances(grads, groups)


def power_law_exponent(
    x: torch.Tensor, y: torch.Tensor, *, bracket: tuple[float, float] = (-10.0, 10.0)
) -> float:
    r"""Exponent :math:`k` of :math:`E[y \mid x] = c\,x^k` by least squares on the original scale, so noisy
    :math:`y` that may be :math:`\le 0` (unbiased variance estimates, :func:`grad_variances`) all count.

    A least-squares line through :math:`(\log x_i, \log y_i)` would have to drop the rows with
    :math:`y_i \le 0`, and dropping the small ones biases :math:`k`; it also fits the mean of
    :math:`\log y`, not the log of the mean. Here instead

    .. math::  \min_{c, k} \sum_i (y_i - c\,x_i^k)^2 ,

    the same loss as the linear fit of :func:`least_squares`. For fixed :math:`k` the best
    :math:`c = \sum_i y_i x_i^k / \sum_i x_i^{2k}`, leaving the profile

    .. math::  k^\star = \arg\max_k \frac{(\sum_i y_i x_i^k)^2}{\sum_i x_i^{2k}}
               \quad \text{subject to } c > 0,

    maximized on a grid of step 0.01 over ``bracket`` and refined by ternary search (x is divided by its
    geometric mean first, which changes :math:`c` only). It is consistent whenever
    :math:`E[y_i] = c\,x_i^k`, whatever the noise; the long, noisy rows weigh most, so its sampling error
    is not small: report an interval (:func:`bootstrap_variance_fit`). Exact data :math:`y = c x^k` give
    :math:`k`. Returns NaN with fewer than two distinct :math:`x`, or when no :math:`c > 0` fits.
    """
    x, y = x.double().reshape(-1), y.double().reshape(-1)
    ok = (x > 0) & torch.isfinite(y) & torch.isfinite(x)
    log_x, y = x[ok].log(), y[ok]
    if log_x.numel() < 2 or float(log_x.max() - log_x.min()) <= 0:
        return math.nan
    d = log_x - log_x.mean()  # $u_i = x_i / \text{geometric mean} = e^{d_i}$

    def profile(k: torch.Tensor) -> torch.Tensor:
        u = torch.exp(k.unsqueeze(-1) * d)  # $u_i^k$
        num = (y * u).sum(-1)  # $\sum_i y_i u_i^k$ (c > 0 iff positive)
        return torch.where(num > 0, num.square() / u.square().sum(-1), torch.full_like(num, -math.inf))

    lo, hi = bracket
    grid = torch.linspace(lo, hi, round((hi - lo) / 0.01) + 1, dtype=torch.float64)
    values = profile(grid)
    j = int(values.argmax())
    if not math.isfinite(float(values[j])):
        return math.nan
    a, b = float(grid[max(j - 1, 0)]), float(grid[min(j + 1, grid.numel() - 1)])
    for _ in range(60):  # ternary search: the profile is unimodal between the neighbours of the grid best
        m1, m2 = a + (b - a) / 3, b - (b - a) / 3
        p1, p2 = (
            profile(torch.tensor(m1, dtype=torch.float64)),
            profile(torch.tensor(m2, dtype=torch.float64)),
        )
        if p1 < p2:
            a = m1
        else:
            b = m2
    return 0.5 * (a + b)


def variance_length_fit(lengths: torch.Tensor, variances: torch.Tensor) -> dict[str, float]:
    r"""The fits of per-row variance estimates against lengths (rows with a non-finite estimate or
    :math:`L_i = 0` are skipped):

    - ``slope``, ``intercept``, ``correlation``: least squares :math:`\hat t_i \approx a + b L_i`
      (unbiased for :math:`a, b` when :math:`E[\hat t_i] = a + b L_i`, since it is linear in :math:`\hat t`);
    - ``exponent``: :math:`k` of :math:`E[\hat t_i] = c L_i^k` (:func:`power_law_exponent`: least squares on
      the original scale, all rows, negative estimates included) and ``power_law_scale`` :math:`c`.
      :math:`k = 1` is the paper's assumption, :math:`k = 2` what fully correlated token terms give;
    - ``log_correlation``: Pearson's correlation of :math:`\log \hat t_i` and :math:`\log L_i` over the
      rows with :math:`\hat t_i > 0` (descriptive only);
    - ``n``, ``n_nonpositive``: rows used, and how many of them have :math:`\hat t_i \le 0`.
    """
    L = torch.as_tensor(lengths, dtype=torch.float64).reshape(-1)
    v = torch.as_tensor(variances, dtype=torch.float64).reshape(-1)
    keep = (L > 0) & torch.isfinite(v)
    L, v = L[keep], v[keep]
    slope, intercept, corr = least_squares(L, v)
    pos = v > 0
    log_corr = least_squares(L[pos].log(), v[pos].log())[2] if int(pos.sum()) >= 2 else math.nan
    exponent = power_law_exponent(L, v)
    # $c = \sum_i \hat t_i L_i^k / \sum_i L_i^{2k}$, the least-squares scale at that exponent
    scale = (
        float((v * L**exponent).sum() / (L ** (2 * exponent)).sum()) if math.isfinite(exponent) else math.nan
    )
    return {
        "slope": slope,
        "intercept": intercept,
        "correlation": corr,
        "exponent": exponent,
        "power_law_scale": scale,
        "log_correlation": log_corr,
        "n": int(keep.sum()),
        "n_nonpositive": int((~pos).sum()),
    }


def bootstrap_variance_fit(
    lengths: torch.Tensor | Sequence[float],
    variances: torch.Tensor | Sequence[float],
    groups: torch.Tensor | Sequence[int],
    *,
    n_bootstrap: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    r"""Percentile bootstrap intervals for ``slope``, ``intercept`` and ``exponent`` of
    :func:`variance_length_fit`, resampling whole **groups** (prompts) with replacement.

    The group is the unit: the :math:`\hat t_i` of one group share its sum :math:`S` and its prompt, so
    they are not independent, while different prompts are. With few prompts (8–12) the intervals are
    rough; they include prompt-to-prompt variation, which is what a reader generalizing to other prompts
    needs. Replicates whose fit is NaN are dropped; an interval is NaN if more than half are.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    if not isinstance(n_bootstrap, int) or n_bootstrap < 10:
        raise ValueError(f"n_bootstrap must be an integer >= 10, got {n_bootstrap!r}")
    L = torch.as_tensor(lengths, dtype=torch.float64).reshape(-1)
    v = torch.as_tensor(variances, dtype=torch.float64).reshape(-1)
    g = torch.as_tensor(groups).reshape(-1)
    if not L.shape == v.shape == g.shape:
        raise ValueError(
            f"lengths, variances and groups must have one entry per row: {L.shape}, {v.shape}, {g.shape}"
        )
    members = [(g == label).nonzero().squeeze(1) for label in g.unique()]
    gen = torch.Generator().manual_seed(int(seed))
    keys = ("slope", "intercept", "exponent")
    draws: dict[str, list[float]] = {k: [] for k in keys}
    for _ in range(n_bootstrap):
        pick = torch.randint(0, len(members), (len(members),), generator=gen)
        rows = torch.cat([members[int(j)] for j in pick])
        fit = variance_length_fit(L[rows], v[rows])
        for k in keys:
            draws[k].append(fit[k])
    tail = (1 - level) / 2
    out = {}
    for k in keys:
        values = torch.tensor(draws[k], dtype=torch.float64)
        values = values[torch.isfinite(values)]
        if values.numel() < n_bootstrap / 2:
            out[k] = (math.nan, math.nan)
        else:
            q = values.quantile(torch.tensor([tail, 1 - tail], dtype=torch.float64))
            out[k] = (float(q[0]), float(q[1]))
    return out


def bootstrap_cv(
    grads: torch.Tensor,
    lengths: torch.Tensor,
    method: str,
    *,
    alpha: float = 1.0,
    max_length: float,
    n_bootstrap: int = 200,
    seed: int = 0,
    gram: torch.Tensor | None = None,
) -> float:
    r"""Measured CV of :math:`\hat g = \sum_i x_i g_i` by bootstrap over responses.

    Each replicate :math:`b` resamples :math:`N` rows with replacement (indices :math:`i_{b,1..N}`), takes
    the weights of the resampled lengths :math:`x_{b,k} = x(L_{i_{b,k}})` and forms
    :math:`\hat g_b = \sum_k x_{b,k} g_{i_{b,k}} = W_b^\top g` (:math:`W_b` = the weights summed per
    original row). Its spread estimates the variance of :math:`\hat g` (with the usual
    :math:`N/(N-1)` correction of a plug-in variance):

    .. math::  \widehat{\mathrm{Var}} = \tfrac{N}{N-1}\, E_b \lVert \hat g_b - \bar{\hat g} \rVert^2,
               \qquad \bar{\hat g} = E_b\, \hat g_b .

    The squared norm of the estimate overstates the squared norm of its mean by exactly its variance,
    :math:`E\lVert \bar{\hat g}\rVert^2 = \lVert E \hat g\rVert^2 + \mathrm{Var}`, so

    .. math::  \mathrm{CV} = \sqrt{\widehat{\mathrm{Var}}} \,/\, \sqrt{\lVert \bar{\hat g} \rVert^2 - \widehat{\mathrm{Var}}} .

    (Dividing by :math:`\lVert \bar{\hat g}\rVert` instead gives :math:`\mathrm{CV}/\sqrt{1 + \mathrm{CV}^2}`,
    which can never exceed 1: per-sample gradients of a language model are noise-dominated, CV ≫ 1, so
    that version read about 1 for every aggregator.) Returns ``inf`` when
    :math:`\lVert \bar{\hat g}\rVert^2 \le \widehat{\mathrm{Var}}`: the batch does not resolve the mean
    gradient from its noise. Everything goes through the Gram matrix :math:`K = g g^\top`:
    :math:`\lVert (W_b - \bar W)^\top g \rVert^2 = (W_b - \bar W)^\top K (W_b - \bar W)`. For GRPO and DAPO
    the replicates' total weight :math:`\sum_k x_{b,k}` varies with the lengths drawn, and that spread (their
    bias) counts in the measured CV.
    """
    n = grads.shape[0]
    if n < 2:
        return math.nan
    K = gram if gram is not None else grads.double() @ grads.double().T
    gen = torch.Generator().manual_seed(int(seed))
    idx = torch.randint(0, n, (n_bootstrap, n), generator=gen)
    # $x_{b,k} = x(L_{i_{b,k}})$ for every replicate at once (sequence_weights works along the last dim)
    x = sequence_weights(lengths.double()[idx], method, alpha=alpha, max_length=max_length)
    # $W_b$: the weight each original row receives in replicate b
    W = torch.zeros(n_bootstrap, n, dtype=torch.float64).scatter_add_(1, idx, x)
    D = W - W.mean(0)
    # $\widehat{\mathrm{Var}} = \frac{N}{N-1}\,\mathrm{mean}_b\, D_b^\top K D_b$
    variance = float(((D @ K) * D).sum(-1).mean()) * n / (n - 1)
    # $\lVert \bar{\hat g} \rVert^2 = \bar W^\top K \bar W$
    square_norm = float(W.mean(0) @ K @ W.mean(0))
    signal = square_norm - variance  # estimates $\lVert E \hat g \rVert^2$
    return math.sqrt(max(variance, 0.0)) / math.sqrt(signal) if signal > 0 else math.inf


def probe_statistics(
    grads: torch.Tensor,
    lengths: torch.Tensor | Sequence[float],
    *,
    alpha: float = 1.0,
    max_length: float,
    group_size: int | None = None,
    advantages: torch.Tensor | Sequence[float] | None = None,
    n_bootstrap: int = 200,
    seed: int = 0,
    methods: Iterable[str] = METHODS,
) -> dict[str, Any]:
    r"""Var(g_i) against L_i, and the measured CV of each aggregator, from per-sample gradients.

    Args:
        grads: ``(N, P)`` per-sample gradients (:func:`per_sample_gradients`).
        lengths: ``(N,)`` completion lengths :math:`L_i`; rows of length 0 (no gradient) are left out of
            their group before estimating, and out of every fit.
        alpha, max_length: the ΔL exponent and the constant :math:`M` for the aggregator weights.
        group_size: rows come in groups of this many consecutive rows (one prompt each) whose gradients
            share a mean; None: the whole batch is one group.
        advantages: if given, ``grads`` are score functions :math:`s_i` and the CVs are measured on
            :math:`g_i = A_i s_i` (the policy gradient the aggregators combine); the variance fit stays on
            ``grads`` (with advantages, :math:`A_i^2` would mix into :math:`\mathrm{Var}(g_i)`).

    Returns a dict (the ``probes.jsonl`` record of :mod:`lab.runlog`, without ``step``):

    - ``lengths``, ``grad_variances``: :math:`L_i` and the unbiased :math:`\hat t_i` of
      :func:`grad_variances` (NaN for a row of length 0 and for rows of a group with fewer than 3 non-empty
      rows);
    - ``slope``, ``intercept``, ``correlation``, ``exponent``, ``log_correlation``, ``n_nonpositive``:
      :func:`variance_length_fit` (the exponent by least squares on the original scale, so negative :math:`\hat t_i` count);
    - ``cv``: ``{method: bootstrap CV}`` (:func:`bootstrap_cv`); ``cv_theory``: the closed-form CV under
      :math:`\mathrm{Var}(g_i) = V L_i` on the same lengths (:func:`lab.aggregation.counterfactual_cv`);
    - ``n``: the number of non-empty rows.
    """
    alpha = check_alpha(alpha)
    L = torch.as_tensor(lengths, dtype=torch.float64).reshape(-1)
    if grads.ndim != 2 or grads.shape[0] != L.shape[0]:
        raise ValueError(
            f"grads must have shape (N, P) with N = len(lengths) = {L.shape[0]}, got {tuple(grads.shape)}"
        )
    groups = group_labels(L.shape[0], group_size)
    keep = L > 0
    v = torch.full_like(L, math.nan)
    v[keep] = unbiased_variances(grads[keep], groups[keep])
    fit = variance_length_fit(L, v)
    L_act = L[keep]
    g = grads[keep].double()
    if advantages is not None:
        g = g * torch.as_tensor(advantages, dtype=torch.float64).reshape(-1)[keep].unsqueeze(1)
    gram = g @ g.T
    methods = tuple(methods)
    cv = {
        m: bootstrap_cv(
            g, L_act, m, alpha=alpha, max_length=max_length, n_bootstrap=n_bootstrap, seed=seed, gram=gram
        )
        for m in methods
    }
    return {
        "lengths": L.tolist(),
        "grad_variances": v.tolist(),
        "slope": fit["slope"],
        "intercept": fit["intercept"],
        "correlation": fit["correlation"],
        "exponent": fit["exponent"],
        "log_correlation": fit["log_correlation"],
        "n_nonpositive": fit["n_nonpositive"],
        "cv": cv,
        "cv_theory": counterfactual_cv(L_act, alpha=alpha, max_length=max_length, methods=methods),
        "n": int(keep.sum()),
    }
