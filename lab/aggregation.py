r"""Loss aggregators as estimators of the policy gradient: the math of the lab, in one place.

Setup (docs/paper.md). One prompt, G sampled responses with lengths :math:`L_i` and advantages :math:`A_i`.
The *unnormalized* per-response gradient is

.. math::  g_i = \sum_{t=1}^{L_i} A_i \nabla_\theta \log \pi_\theta(o_{i,t} \mid q, o_{i,<t}),

an unbiased estimate of :math:`\nabla J` whose variance grows with length, :math:`\mathrm{Var}(g_i) \approx V L_i`.
Every aggregator is a weighted sum :math:`\hat g = \sum_i x_i g_i`; only the weights differ
(:math:`M` is a constant length, the max completion length):

==========  ===========================================  ======================
method      :math:`x_i`                                   :math:`\sum_i x_i`
==========  ===========================================  ======================
grpo        :math:`1 / (G L_i)`                          :math:`\frac1G\sum 1/L_i`
dapo        :math:`1 / \sum_j L_j`                       :math:`G / \sum_j L_j`
dr_grpo     :math:`1 / (G M)`                            :math:`1/M`
delta_l     :math:`L_i^{-\alpha} / (M \sum_j L_j^{-\alpha})`  :math:`1/M`
==========  ===========================================  ======================

Rows of length 0 (for example truncated completions that TRL masks out) get weight 0 and do not count
in G or in any sum. All functions accept a batch of groups: ``lengths`` may have shape ``(..., G)``;
the weights are computed along the last dimension.

Everything else in the lab (the TRL trainer, the dashboard, the notebooks, the tests) imports these
functions; none of them re-derives a weight.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

METHODS: tuple[str, ...] = ("grpo", "dapo", "dr_grpo", "delta_l")
LENGTH_DISTRIBUTIONS: tuple[str, ...] = ("uniform", "lognormal", "bimodal")

LengthsLike = torch.Tensor | Sequence[float] | Sequence[int]


# ---------------------------------------------------------------------------------------------------
# validation: every public function names the bad value in its error
# ---------------------------------------------------------------------------------------------------
def _check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown aggregation method {method!r}; expected one of {', '.join(METHODS)}")
    return method


def check_alpha(alpha: float) -> float:
    """Return ``alpha`` as a float, or raise ValueError if it is negative, NaN or infinite."""
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"alpha must be a number >= 0, got {alpha!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    return value


def _as_lengths(lengths: LengthsLike) -> torch.Tensor:
    t = torch.as_tensor(lengths, dtype=torch.float64) if not isinstance(lengths, torch.Tensor) else lengths
    t = t.detach().to(torch.float64)
    if t.ndim == 0:
        raise ValueError(f"lengths must be a 1-D sequence (or a batch of them), got the scalar {t.item()!r}")
    if t.numel() == 0 or t.shape[-1] == 0:
        raise ValueError(f"lengths is empty (shape {tuple(t.shape)}); need at least one response")
    if not torch.isfinite(t).all():
        bad = t[~torch.isfinite(t)].flatten()[0].item()
        raise ValueError(f"lengths must be finite, got {bad!r}")
    if (t < 0).any():
        bad = t[t < 0].flatten()[0].item()
        raise ValueError(f"lengths must be >= 0, got {bad!r}")
    return t


def _check_max_length(max_length: float, lengths: torch.Tensor) -> float:
    try:
        m = float(max_length)
    except (TypeError, ValueError):
        raise ValueError(f"max_length must be a positive number, got {max_length!r}") from None
    if not math.isfinite(m) or m <= 0:
        raise ValueError(f"max_length must be a positive finite number, got {max_length!r}")
    longest = float(lengths.max())
    if m < longest:
        raise ValueError(
            f"max_length={max_length!r} is shorter than the longest response ({longest:g} tokens)"
        )
    return m


# ---------------------------------------------------------------------------------------------------
# the weights x_i
# ---------------------------------------------------------------------------------------------------
def sequence_weights(
    lengths: LengthsLike, method: str, *, alpha: float = 1.0, max_length: float
) -> torch.Tensor:
    r"""Weights :math:`x_i` that ``method`` puts on each unnormalized per-response gradient :math:`g_i`.

    With :math:`G` the number of responses of nonzero length (along the last dimension):

    - ``grpo``:    :math:`x_i = 1/(G L_i)`   (mean over tokens, then over responses)
    - ``dapo``:    :math:`x_i = 1/\sum_j L_j`   (one mean over all tokens)
    - ``dr_grpo``: :math:`x_i = 1/(G M)`   (token sum over a constant)
    - ``delta_l``: :math:`x_i = L_i^{-\alpha} / (M \sum_j L_j^{-\alpha})`, so :math:`\sum_i x_i = 1/M`
      for every :math:`\alpha \ge 0`; :math:`\alpha = 0` is ``dr_grpo``, :math:`\alpha = 1` is the
      minimum-variance unbiased choice.

    Args:
        lengths: response lengths :math:`L_i`, shape ``(G,)`` or ``(..., G)`` for a batch of groups.
        method: one of :data:`METHODS`.
        alpha: the ΔL exponent (used by ``delta_l`` only), finite and >= 0.
        max_length: the constant :math:`M` (max completion length); must be >= every length.

    Returns:
        float64 tensor of the same shape as ``lengths``; rows of length 0 get weight 0. A group whose
        lengths are all 0 gets all-zero weights (it carries no tokens, so no gradient).
    """
    _check_method(method)
    alpha = check_alpha(alpha)
    lengths = _as_lengths(lengths)
    M = _check_max_length(max_length, lengths)

    active = lengths > 0
    G = active.sum(-1, keepdim=True).to(torch.float64)  # responses that count
    safe_G = G.clamp(min=1.0)
    safe_L = torch.where(active, lengths, torch.ones_like(lengths))

    if method == "grpo":
        x = 1.0 / (safe_G * safe_L)
    elif method == "dapo":
        x = (1.0 / lengths.sum(-1, keepdim=True).clamp(min=1.0)).expand_as(lengths)
    elif method == "dr_grpo":
        x = (1.0 / (safe_G * M)).expand_as(lengths)
    else:  # delta_l: L_i^-α / Σ_j L_j^-α computed as a softmax of -α·log L, stable for long responses
        log_w = torch.where(active, -alpha * torch.log(safe_L), torch.full_like(lengths, -math.inf))
        all_empty = ~active.any(-1, keepdim=True)
        log_w = torch.where(all_empty, torch.zeros_like(log_w), log_w)  # avoid softmax of all -inf
        x = torch.softmax(log_w, dim=-1) / M
    return torch.where(active, x, torch.zeros_like(x))


def aggregate_loss(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    method: str,
    *,
    alpha: float = 1.0,
    max_length: float,
) -> torch.Tensor:
    r"""Aggregate a ``(G, T)`` per-token loss into one scalar: :math:`\sum_i x_i \sum_t \ell_{i,t} m_{i,t}`.

    ``mask`` (same shape, 0/1) marks the real completion tokens; :math:`L_i = \sum_t m_{i,t}`. The weights
    :math:`x_i` are :func:`sequence_weights` (no gradient flows through them).
    """
    if per_token_loss.ndim != 2 or mask.shape != per_token_loss.shape:
        raise ValueError(
            f"per_token_loss and mask must both have shape (G, T); got {tuple(per_token_loss.shape)} "
            f"and {tuple(mask.shape)}"
        )
    mask = mask.to(per_token_loss.dtype)
    lengths = mask.sum(-1)
    x = sequence_weights(lengths, method, alpha=alpha, max_length=max_length).to(per_token_loss)
    return (x * (per_token_loss * mask).sum(-1)).sum()


def delta_l_row_weights(
    lengths: LengthsLike,
    *,
    alpha: float = 1.0,
    max_length: float,
    group_size: int | None = None,
) -> torch.Tensor:
    r"""Per-row multipliers :math:`w_i` that turn TRL's ``dr_grpo`` normalizer into ΔL.

    TRL's ``dr_grpo`` loss is :math:`\sum_i \sum_t \ell_{i,t} / (N M)` over the :math:`N` rows of a
    generation batch. Multiplying row :math:`i` by :math:`w_i = x_i N M` gives exactly
    :math:`\sum_i x_i \sum_t \ell_{i,t}` with the ΔL weights :math:`x_i` of :func:`sequence_weights`.
    This is the official implementation's :math:`w_i = L_i^{-\alpha} / \mathrm{mean}_j L_j^{-\alpha}`.

    ``group_size=None`` normalizes over the whole batch (the official code); an integer normalizes within
    consecutive groups of that size (one prompt's completions), each group then carrying an equal share
    :math:`1/(M \cdot \text{groups})` of the total weight.
    """
    lengths = _as_lengths(lengths)
    if lengths.ndim != 1:
        raise ValueError(f"lengths must be 1-D here, got shape {tuple(lengths.shape)}")
    n_rows = lengths.shape[0]
    if group_size is None:
        x = sequence_weights(lengths, "delta_l", alpha=alpha, max_length=max_length)
    else:
        if not isinstance(group_size, int) or group_size < 1 or n_rows % group_size:
            raise ValueError(
                f"group_size={group_size!r} must be a positive divisor of the batch size {n_rows}"
            )
        grouped = lengths.view(-1, group_size)
        x = sequence_weights(grouped, "delta_l", alpha=alpha, max_length=max_length) / grouped.shape[0]
        x = x.reshape(-1)
    return x * n_rows * float(max_length)


def batch_weights(
    lengths: LengthsLike,
    *,
    alpha: float = 1.0,
    max_length: float,
    delta_l_group_size: int | None = None,
    methods: Iterable[str] = METHODS,
) -> torch.Tensor:
    r"""The weights :math:`x_i` of each method over one whole generation batch, as the trainer applies them.

    TRL normalizes over the generation batch, not per prompt: GRPO :math:`1/(N L_i)`, DAPO
    :math:`1/\sum_j L_j`, Dr. GRPO :math:`1/(N M)`, i.e. :func:`sequence_weights` of the batch taken as one
    group. ΔL is the same with ``delta_l_group_size=None`` (``delta_l_scope="batch"``), or per prompt group
    (``"group"``): :func:`delta_l_row_weights` / (N M). Returns shape ``(len(methods), N)``.

    With batch-scope weights, :math:`x_i(\text{GRPO}) / x_i(\Delta L_{\alpha=1}) = M\,\mathrm{mean}(1/L)` and
    :math:`x_i(\text{DAPO}) / x_i(\text{Dr. GRPO}) = N M / \sum L` for every row: each pair has one gradient
    direction and differs by a per-batch scalar.
    """
    L = _as_lengths(lengths)
    if L.ndim != 1:
        raise ValueError(f"lengths must be 1-D here (one generation batch), got shape {tuple(L.shape)}")
    rows = []
    for method in methods:
        if method == "delta_l" and delta_l_group_size is not None:
            w = delta_l_row_weights(L, alpha=alpha, max_length=max_length, group_size=delta_l_group_size)
            rows.append(w / (L.shape[0] * float(max_length)))
        else:
            rows.append(sequence_weights(L, method, alpha=alpha, max_length=max_length))
    return torch.stack(rows)


# ---------------------------------------------------------------------------------------------------
# bias and variance, in closed form and by Monte Carlo
# ---------------------------------------------------------------------------------------------------
def estimator_stats(
    lengths: LengthsLike,
    method: str,
    *,
    alpha: float = 1.0,
    max_length: float,
    token_variance: float = 1.0,
) -> dict[str, float]:
    r"""Closed-form scale, variance and CV of :math:`\hat g = \sum_i x_i g_i` for one group of lengths.

    Model: the :math:`g_i` are independent with :math:`E[g_i] = \nabla J` and :math:`\mathrm{Var}(g_i) = V L_i`
    (per coordinate; :math:`|\nabla J| = 1` sets the unit). Then

    - ``scale``    :math:`= \sum_i x_i` (so :math:`E[\hat g] = \text{scale}\cdot\nabla J`; unbiased
      methods have scale :math:`1/M` whatever the lengths),
    - ``variance`` :math:`= V \sum_i x_i^2 L_i`,
    - ``cv``       :math:`= \sqrt{\text{variance}} / \text{scale}` (coefficient of variation),
    - ``relative_scale`` :math:`= M \cdot \text{scale}` (1.0 for an unbiased method).
    """
    if token_variance < 0 or not math.isfinite(token_variance):
        raise ValueError(f"token_variance must be a finite number >= 0, got {token_variance!r}")
    L = _as_lengths(lengths)
    if L.ndim != 1:
        raise ValueError(f"lengths must be 1-D here, got shape {tuple(L.shape)}")
    x = sequence_weights(L, method, alpha=alpha, max_length=max_length)
    scale = float(x.sum())
    variance = float(token_variance * (x.square() * L).sum())
    cv = math.sqrt(variance) / scale if scale > 0 else math.inf
    return {"scale": scale, "variance": variance, "cv": cv, "relative_scale": scale * float(max_length)}


def counterfactual_cv(
    lengths: LengthsLike,
    *,
    alpha: float = 1.0,
    max_length: float,
    methods: Iterable[str] = METHODS,
) -> dict[str, float]:
    """The theoretical gradient CV every aggregator would have had on these lengths (:func:`estimator_stats`)."""
    return {m: estimator_stats(lengths, m, alpha=alpha, max_length=max_length)["cv"] for m in methods}


def simulate_estimators(
    lengths: LengthsLike,
    methods: Iterable[str] = METHODS,
    *,
    alpha: float = 1.0,
    max_length: float,
    n_trials: int = 10_000,
    true_gradient: float = 1.0,
    token_variance: float = 1.0,
    seed: int = 0,
) -> dict[str, dict[str, torch.Tensor | float]]:
    r"""Monte Carlo of the aggregators on synthetic per-response gradients.

    Each trial draws :math:`g_i = \nabla J + \sqrt{V L_i}\, z_i` with :math:`z_i \sim N(0, 1)` (so
    :math:`E[g_i] = \nabla J`, :math:`\mathrm{Var}(g_i) = V L_i`) and forms :math:`\hat g = \sum_i x_i g_i`.

    Args:
        lengths: ``(G,)`` fixed lengths for every trial, or ``(n_trials, G)`` lengths drawn per trial
            (then ``n_trials`` is taken from it): with varying lengths, a biased method's mean drifts.
        methods: aggregators to simulate (default all four), evaluated on the *same* noise draws.

    Returns:
        ``{method: {"estimates": (n_trials,) tensor of ĝ, "scale": (n_trials,) Σx_i per trial,
        "mean": float, "variance": float, "cv": float}}`` with cv = std(ĝ)/|mean(ĝ)|.
    """
    L = _as_lengths(lengths)
    if L.ndim == 1:
        if not isinstance(n_trials, int) or n_trials < 2:
            raise ValueError(f"n_trials must be an integer >= 2, got {n_trials!r}")
        L = L.expand(n_trials, -1)
    elif L.ndim == 2:
        if L.shape[0] < 2:
            raise ValueError(f"need at least 2 trials, got lengths of shape {tuple(L.shape)}")
    else:
        raise ValueError(f"lengths must have shape (G,) or (n_trials, G), got {tuple(L.shape)}")
    if token_variance < 0 or not math.isfinite(token_variance):
        raise ValueError(f"token_variance must be a finite number >= 0, got {token_variance!r}")
    gen = torch.Generator().manual_seed(int(seed))
    z = torch.randn(L.shape, generator=gen, dtype=torch.float64)
    g = true_gradient + torch.sqrt(token_variance * L) * z

    results: dict[str, dict[str, torch.Tensor | float]] = {}
    for method in methods:
        x = sequence_weights(L, method, alpha=alpha, max_length=max_length)
        estimates = (x * g).sum(-1)
        mean = float(estimates.mean())
        variance = float(estimates.var())
        results[method] = {
            "estimates": estimates,
            "scale": x.sum(-1),
            "mean": mean,
            "variance": variance,
            "cv": math.sqrt(variance) / abs(mean) if mean != 0 else math.inf,
        }
    return results


def sample_lengths(
    distribution: str,
    *,
    group_size: int,
    n_groups: int = 1,
    min_length: int = 50,
    max_length: int = 3000,
    seed: int = 0,
) -> torch.Tensor:
    """Draw integer response lengths in ``[min_length, max_length]``, shape ``(n_groups, group_size)``.

    ``uniform``: uniform integers. ``lognormal``: median at the geometric mean of the bounds, clipped
    (RLVR lengths are right-skewed). ``bimodal``: half short answers near ``min_length``, half long
    reasoning near ``max_length`` (the case where aggregators disagree most).
    """
    if distribution not in LENGTH_DISTRIBUTIONS:
        raise ValueError(
            f"unknown length distribution {distribution!r}; expected one of {LENGTH_DISTRIBUTIONS}"
        )
    if group_size < 1 or n_groups < 1:
        raise ValueError(f"group_size and n_groups must be >= 1, got {group_size!r} and {n_groups!r}")
    if not 1 <= min_length <= max_length:
        raise ValueError(
            f"need 1 <= min_length <= max_length, got min_length={min_length!r}, max_length={max_length!r}"
        )
    gen = torch.Generator().manual_seed(int(seed))
    shape = (n_groups, group_size)
    lo, hi = float(min_length), float(max_length)
    if distribution == "uniform":
        out = torch.randint(int(lo), int(hi) + 1, shape, generator=gen).to(torch.float64)
    elif distribution == "lognormal":
        mu = 0.5 * (math.log(lo) + math.log(hi))
        sigma = max((math.log(hi) - math.log(lo)) / 4, 1e-6)
        out = torch.exp(mu + sigma * torch.randn(shape, generator=gen, dtype=torch.float64))
    else:
        spread = max((hi - lo) / 10, 1.0)
        long = torch.rand(shape, generator=gen) < 0.5
        centers = torch.where(long, torch.tensor(hi - spread), torch.tensor(lo + spread)).to(torch.float64)
        out = centers + spread * torch.randn(shape, generator=gen, dtype=torch.float64)
    return out.round().clamp(lo, hi)
