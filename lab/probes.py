r"""Gradient probes: per-sample gradients of the trainable (LoRA) parameters, and what they say about ΔL.

The paper's assumption (docs/paper.md) is that the unnormalized per-response gradient

.. math::  g_i = \sum_{t=1}^{L_i} A_i \nabla_\theta \log \pi_\theta(o_{i,t} \mid q, o_{i,<t})

has variance growing linearly with the response length, :math:`\mathrm{Var}(g_i) \approx V L_i`.
This module measures it instead of assuming it:

1. :func:`per_sample_gradients` computes :math:`g_i` (one row per completion, flattened over the trainable
   parameters) on a real generation batch. With ``advantages=None`` every :math:`A_i = 1`, which gives the
   *score-function* gradient :math:`s_i = \sum_t \nabla_\theta \log\pi_\theta(o_{i,t}\mid\cdot)`: the object
   the :math:`\mathrm{Var} \propto L` assumption is about (:math:`g_i = A_i s_i`).
2. :func:`grad_variances` estimates :math:`\mathrm{tr}\,\mathrm{Var}(g_i)` of each row without bias (the
   naive group-centred :math:`\lVert g_i - \bar g\rVert^2` is not: it adds an intercept and flattens the
   exponent); :func:`probe_statistics` fits it against :math:`L_i` and measures, by bootstrap
   over responses, the coefficient of variation of every aggregator's :math:`\hat g = \sum_i x_i g_i`
   (weights :math:`x_i` from :func:`lab.aggregation.sequence_weights`, never re-derived here).
3. :func:`make_probe_hook` runs both inside :class:`lab.trainer.DeltaLGRPOTrainer` every ``k`` steps and
   logs ``probe/*`` metrics and a ``probes.jsonl`` record (:mod:`lab.runlog`).

Cost (measured on a 2-core CPU, 1 thread, SmolLM2-135M with LoRA r=16 on q/k/v/o,
1.8 M trainable parameters): one forward + backward per completion, about
:data:`MEASURED_SECONDS_PER_ROW` seconds per completion of ~210 tokens (150 prompt + up to 64 completion),
i.e. ~20 s for 8 completions, ~40 s for 16: the FLOPs of one more forward + backward over the batch
(``benchmarks/results/variance_vs_length.smollm2.json`` stores its own run's seconds per completion, for
completions of up to 256 tokens). Use ``torch.set_num_threads(1)`` on a small shared CPU. ``torch.func.vmap(grad(...))`` does not work on HF models here (the attention-mask
code branches on tensor values: "vmap: ... data-dependent control flow"), hence the row loop.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from lab.aggregation import METHODS, batch_weights, check_alpha, counterfactual_cv, sequence_weights

#: seconds per completion of one probe on the embedded model, CPU, 1 thread (see module docstring)
MEASURED_SECONDS_PER_ROW = 2.6


# ---------------------------------------------------------------------------------------------------
# 1. per-sample gradients
# ---------------------------------------------------------------------------------------------------
def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters the optimizer updates (``requires_grad``): the LoRA adapters for a peft model."""
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (requires_grad=False everywhere)")
    return params


def _row_log_probs(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    r""":math:`\log \pi_\theta(o_t \mid q, o_{<t})` for each completion token of one row, shape ``(T,)``.

    The prompt keeps its (left) padding, so positions are exactly those of TRL's batched forward; the
    completion is passed up to its last real token only (later tokens cannot change earlier ones).
    """
    input_ids = torch.cat([prompt_ids, completion_ids]).unsqueeze(0)
    attention_mask = torch.cat([prompt_mask, torch.ones_like(completion_ids)]).unsqueeze(0)
    T = completion_ids.shape[0]
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    # the logit at position p predicts token p+1: keep the T positions before each completion token
    logits = logits[0, -T - 1 : -1].float() / temperature
    # $\log \pi_\theta(o_t \mid q, o_{<t}) = \log \mathrm{softmax}(z_t)[o_t]$
    return torch.log_softmax(logits, dim=-1).gather(1, completion_ids.unsqueeze(1)).squeeze(1)


def per_sample_gradients(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    advantages: torch.Tensor | Sequence[float] | None = None,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    r"""Per-response gradients :math:`g_i` of the trainable parameters, one row each: shape ``(N, P)``.

    .. math::  g_i = \sum_{t} m_{i,t}\, A_i\, \nabla_\theta \log \pi_\theta(o_{i,t} \mid q_i, o_{i,<t})

    with :math:`m_{i,t}` the completion mask (so :math:`L_i = \sum_t m_{i,t}`) and :math:`A_i = 1` when
    ``advantages`` is None (the score function :math:`s_i`). :math:`P` is the number of trainable scalars
    (``requires_grad`` parameters in :meth:`~torch.nn.Module.named_parameters` order, each flattened).

    Inputs are TRL's generation-batch tensors: ``prompt_ids``/``prompt_mask`` ``(N, P_len)`` (left padded),
    ``completion_ids``/``completion_mask`` ``(N, T)``. ``temperature`` divides the logits as in sampling.

    One forward + backward per row with :func:`torch.autograd.grad`, so nothing is written into the
    parameters' ``.grad`` (a gradient being accumulated by a trainer is left as it was). The model is put
    in eval mode during the probe (no dropout; HF disables gradient checkpointing) and restored after.
    ``torch.func.vmap`` over rows fails on HF models (data-dependent control flow in the mask code), so
    this is a loop; each row is trimmed to its last real token, which a padded batch could not do.
    """
    params = [p for _, p in trainable_parameters(model)]
    n_rows = completion_ids.shape[0]
    adv = torch.ones(n_rows) if advantages is None else torch.as_tensor(advantages, dtype=torch.float32)
    out = torch.zeros(n_rows, sum(p.numel() for p in params), dtype=torch.float32)
    was_training = model.training
    model.eval()
    try:
        for i in range(n_rows):
            out[i] = _row_gradient(
                model,
                params,
                prompt_ids[i],
                prompt_mask[i],
                completion_ids[i],
                completion_mask[i],
                float(adv[i]),
                temperature,
            )
    finally:
        model.train(was_training)
    return out


def _row_gradient(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    advantage: float,
    temperature: float,
) -> torch.Tensor:
    """The flattened :math:`g_i` of one row (zeros for an empty completion or a zero advantage)."""
    real = completion_mask.nonzero()
    if real.numel() == 0 or advantage == 0.0:
        return torch.zeros(sum(p.numel() for p in params))
    end = int(real.max()) + 1  # up to the last real token
    logp = _row_log_probs(model, prompt_ids, prompt_mask, completion_ids[:end], temperature)
    # $g_i = \nabla_\theta\, A_i \sum_t m_{i,t} \log\pi_\theta(o_{i,t} \mid q, o_{i,<t})$
    objective = advantage * (logp * completion_mask[:end].to(logp)).sum()
    grads = torch.autograd.grad(objective, params, allow_unused=True)
    return torch.cat(
        [
            (g if g is not None else torch.zeros_like(p)).detach().float().reshape(-1)
            for g, p in zip(grads, params, strict=True)
        ]
    )


def linear_per_sample_gradients(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    advantages: torch.Tensor | Sequence[float] | None = None,
    *,
    temperature: float = 1.0,
    combine: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    r"""Per-response gradients of every trainable ``nn.Linear`` weight from **one** batched forward/backward.

    Same :math:`g_i` as :func:`per_sample_gradients`, restricted to the trainable weights (and biases) of
    ``nn.Linear`` modules whose weight no other module shares (a tied LM head is left out; so are embeddings
    and norms). For a LoRA model that is every trainable parameter; for the lab's small fully fine-tuned
    model it is 99% of them. Returns ``(grads (N, P'), fraction of trainable scalars covered)``.

    ``combine`` (a ``(K, N)`` matrix of row weights) returns ``combine @ grads`` instead, shape ``(K, P')``,
    without forming the N per-row gradients: e.g. the aggregated gradients :math:`\sum_i x_{m,i} g_i` of K
    aggregators at the cost of one backward pass.

    Why it is exact: rows of a batch never interact in a transformer, so the backward pass of
    :math:`\sum_i A_i \sum_t m_{i,t} \log\pi_\theta(o_{i,t}\mid\cdot)` carries each row's own output
    gradient :math:`\delta_{i,t}`, and a linear layer :math:`y = x W^\top` receives from row i

    .. math::  \nabla_W^{(i)} = \sum_t \delta_{i,t}^\top x_{i,t}

    (the per-example trick of Goodfellow 2015 / Opacus), computed here with forward and tensor hooks, one
    layer at a time so each layer's inputs are freed as soon as its gradient is formed. Cost: about one
    forward + backward of the batch, instead of N of them.
    """
    trainable = trainable_parameters(model)
    layers = own_linear_layers(model)
    if not layers:
        raise ValueError(
            "the model has no trainable nn.Linear layer of its own (nothing to probe per sample)"
        )
    n_rows = completion_ids.shape[0]
    adv = torch.ones(n_rows) if advantages is None else torch.as_tensor(advantages, dtype=torch.float32)
    pieces: dict[str, torch.Tensor] = {}
    inputs: dict[str, torch.Tensor] = {}
    handles = []

    def capture(name: str):
        def forward_hook(module, args, output):
            inputs[name] = args[0].detach()

            def on_grad(delta: torch.Tensor) -> None:
                x, d = inputs.pop(name).float(), delta.float()
                if combine is None:  # $\nabla_W^{(i)} = \sum_t \delta_{i,t}^\top x_{i,t}$, one per row
                    grad = torch.einsum("nto,nti->noi", d, x).reshape(n_rows, -1)
                    bias = d.sum(1)
                else:  # $\sum_i c_{k,i} \nabla_W^{(i)}$ for each row of combine
                    weighted = (combine.to(d)[:, :, None, None] * d).flatten(1, 2)  # (K, N·T, out)
                    grad = (weighted.transpose(1, 2) @ x.flatten(0, 1)).reshape(combine.shape[0], -1)
                    bias = combine.to(d) @ d.sum(1)
                if module.bias is not None and module.bias.requires_grad:
                    grad = torch.cat([grad, bias], dim=1)
                pieces[name] = grad

            output.register_hook(on_grad)

        return forward_hook

    for name, module in layers:
        handles.append(module.register_forward_hook(capture(name)))
    was_training = model.training
    model.eval()
    try:
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask.to(prompt_mask)], dim=1)
        T = completion_ids.shape[1]
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -T - 1 : -1].float()
        logp = (
            torch.log_softmax(logits / temperature, dim=-1).gather(2, completion_ids.unsqueeze(2)).squeeze(2)
        )
        # $\sum_i A_i \sum_t m_{i,t} \log\pi_\theta(o_{i,t} \mid q_i, o_{i,<t})$: each row's term is its g_i
        objective = (adv.to(logp).unsqueeze(1) * logp * completion_mask.to(logp)).sum()
        params = [module.weight for _, module in layers]
        torch.autograd.grad(objective, params, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
        inputs.clear()
        model.train(was_training)
    grads = torch.cat([pieces[name] for name, _ in layers if name in pieces], dim=1)
    covered = sum(module.weight.numel() + (module.bias.numel() if module.bias is not None else 0)
                  for name, module in layers if name in pieces)  # fmt: skip
    total = sum(p.numel() for _, p in trainable)
    return grads, covered / total


def own_linear_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """The ``nn.Linear`` modules whose weight is trainable and used by no other module (a tied LM head is
    not): the layers whose per-row gradients the batched trick gives exactly."""
    uses: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            uses[id(p)] = uses.get(id(p), 0) + 1
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and module.weight.requires_grad
        and uses[id(module.weight)] == 1
    ]


@torch.no_grad()
def sample_generation_batch(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[Any],
    *,
    num_generations: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int | None = None,
) -> dict[str, torch.Tensor]:
    """Sample ``num_generations`` completions per prompt into a TRL-shaped generation batch.

    Returns ``prompt_ids``/``prompt_mask`` (left padded), ``completion_ids``/``completion_mask`` (the mask
    covers the tokens up to and including the first end-of-sequence token, as TRL's does) and
    ``lengths``; rows are grouped by prompt (``num_generations`` consecutive rows each). Prompts are
    rendered as TRL renders them (:func:`lab.evaluation.render_prompt`).
    """
    from lab.evaluation import render_prompt

    if seed is not None:
        torch.manual_seed(seed)
    eos = model.generation_config.eos_token_id
    eos_ids = sorted(
        {*(eos if isinstance(eos, list) else [eos] if eos is not None else [])} | {tokenizer.eos_token_id}
    )
    old_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        texts = [render_prompt(p, tokenizer) for p in prompts]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = old_side
    out = model.generate(
        **enc,
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        num_return_sequences=num_generations,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos_ids,
    )
    completion_ids = out[:, enc["input_ids"].shape[1] :]
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids))
    first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), completion_ids.shape[1])
    completion_mask = (torch.arange(completion_ids.shape[1]) <= first_eos.unsqueeze(1)).long()
    return {
        "prompt_ids": enc["input_ids"].repeat_interleave(num_generations, 0),
        "prompt_mask": enc["attention_mask"].repeat_interleave(num_generations, 0),
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "lengths": completion_mask.sum(1),
    }


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


# ---------------------------------------------------------------------------------------------------
# 3. the trainer hook
# ---------------------------------------------------------------------------------------------------
class ProbeHook:
    """``hook(trainer, output)``: a gradient probe on every ``every``-th generation batch.

    Called by the trainer after each generation batch (``trainer.generation_hooks``) with TRL's output
    dict (``prompt_ids``, ``prompt_mask``, ``completion_ids``, ``completion_mask``, ``advantages``, ...).
    When ``trainer.state.global_step % every == 0`` it computes the score-function gradients of (at most
    ``max_rows``) completions, :func:`probe_statistics` on them, appends a record to :attr:`records`
    (``step`` = ``global_step + 1``, the optimizer step these completions train, as in ``samples.jsonl``;
    plus ``seconds``, the probe's cost) and flat metrics ``probe/cv/<method>``, ``probe/var_length_slope``,
    ``probe/var_length_corr``, ``probe/var_length_exponent``, ``probe/seconds`` to
    ``trainer._metrics["train"]`` (non-finite values are not logged: a CV is ``inf`` when the probed rows do
    not resolve the mean gradient from its noise, see :func:`bootstrap_cv`). Only the main process probes
    (its own rows).

    ``alpha`` and ``max_length`` default to the trainer's ``args.delta_l_alpha`` (1.0 if absent) and
    ``max_completion_length``; ``max_rows`` caps the cost (rounded down to whole prompt groups).
    """

    def __init__(
        self,
        every: int,
        *,
        alpha: float | None = None,
        max_length: float | None = None,
        max_rows: int | None = None,
        n_bootstrap: int = 200,
        seed: int = 0,
        batched: bool = False,
    ):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        self.every, self.max_rows, self.n_bootstrap, self.seed = every, max_rows, n_bootstrap, seed
        self.batched = batched  # one batched backward (linear_per_sample_gradients) instead of a row loop
        self.alpha = None if alpha is None else check_alpha(alpha)
        self.max_length = max_length
        self.records: list[dict[str, Any]] = []

    def __call__(self, trainer: Any, output: dict[str, Any]) -> dict[str, Any] | None:
        step = int(trainer.state.global_step)
        accelerator = getattr(trainer, "accelerator", None)
        if step % self.every or (accelerator is not None and not accelerator.is_main_process):
            return None
        record = self.probe(trainer, output)
        record["step"] = step + 1
        self.records.append(record)
        self._log_metrics(trainer, record)
        return record

    def probe(self, trainer: Any, output: dict[str, Any]) -> dict[str, Any]:
        """The probe record of one generation batch (no step, no side effects on the trainer)."""
        start = time.perf_counter()
        group = getattr(trainer, "num_generations", None)
        rows = self._rows(output["completion_ids"].shape[0], group)
        mask = output["completion_mask"]
        if "tool_mask" in output:
            mask = mask * output["tool_mask"]
        mask = mask[:rows]
        args = getattr(trainer, "args", None)
        batch = (
            output["prompt_ids"][:rows],
            output["prompt_mask"][:rows],
            output["completion_ids"][:rows],
            mask,
        )
        temperature = float(getattr(trainer, "temperature", 1.0))
        covered = 1.0
        if self.batched:
            grads, covered = linear_per_sample_gradients(trainer.model, *batch, temperature=temperature)
        else:
            grads = per_sample_gradients(trainer.model, *batch, temperature=temperature)
        lengths = mask.sum(-1).cpu()
        record = probe_statistics(
            grads,
            lengths,
            alpha=self.alpha if self.alpha is not None else float(getattr(args, "delta_l_alpha", 1.0)),
            max_length=max(float(self.max_length or trainer.max_completion_length), float(lengths.max())),
            group_size=group if group and rows % group == 0 else None,
            advantages=output["advantages"][:rows].detach().cpu().reshape(rows, -1)[:, 0],
            n_bootstrap=self.n_bootstrap,
            seed=self.seed,
        )
        record["seconds"] = time.perf_counter() - start
        record["param_fraction"] = covered
        return record

    def _rows(self, n: int, group: int | None) -> int:
        """How many leading rows to probe: all, or ``max_rows`` rounded down to whole groups."""
        if self.max_rows is None or self.max_rows >= n:
            return n
        if group and self.max_rows >= group:
            return self.max_rows - self.max_rows % group
        return max(self.max_rows, 3)  # grad_variances needs >= 3 rows sharing a mean

    @staticmethod
    def _log_metrics(trainer: Any, record: dict[str, Any]) -> None:
        metrics = getattr(trainer, "_metrics", None)
        if metrics is None:
            return
        train = metrics["train"]
        flat = {f"probe/cv/{m}": v for m, v in record["cv"].items()}
        flat |= {
            "probe/var_length_slope": record["slope"],
            "probe/var_length_corr": record["correlation"],
            "probe/var_length_exponent": record["exponent"],
            "probe/seconds": record["seconds"],
        }
        for name, value in flat.items():
            if value is not None and math.isfinite(value):
                train[name].append(float(value))


def make_probe_hook(
    every: int,
    *,
    alpha: float | None = None,
    max_length: float | None = None,
    max_rows: int | None = None,
    n_bootstrap: int = 200,
    seed: int = 0,
    batched: bool = False,
) -> ProbeHook:
    """A :class:`ProbeHook` for ``trainer.generation_hooks``: probes every ``every`` steps; records in ``.records``.

    Cost: about :data:`MEASURED_SECONDS_PER_ROW` s per completion on the embedded model on CPU.
    """
    return ProbeHook(
        every, alpha=alpha, max_length=max_length, max_rows=max_rows, n_bootstrap=n_bootstrap, seed=seed,
        batched=batched,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# 4. the four aggregators' gradients on the same batch
# ---------------------------------------------------------------------------------------------------
def pair_name(a: str, b: str) -> str:
    """``grpo~delta_l``: the metric suffix of a pair of aggregators."""
    return f"{a}~{b}"


def aggregator_gradient_stats(grads: torch.Tensor, methods: Sequence[str] = METHODS) -> dict[str, float]:
    r"""Cosine and norm ratio of every pair of aggregated gradients :math:`\hat g_m` (rows of ``grads``).

    Keys ``agg_grad/norm/<m>`` (:math:`\lVert\hat g_m\rVert`), ``agg_grad/cos/<a>~<b>`` and
    ``agg_grad/norm_ratio/<a>~<b>`` (:math:`\lVert\hat g_a\rVert / \lVert\hat g_b\rVert`) for a before b in
    ``methods``. A cosine of 1 with a norm ratio that moves from batch to batch is a per-batch scalar: the
    same direction at a different step size.
    """
    g = grads.double()
    gram = g @ g.T
    norms = gram.diagonal().clamp(min=0).sqrt()
    out = {f"agg_grad/norm/{m}": float(n) for m, n in zip(methods, norms, strict=True)}
    for i, a in enumerate(methods):
        for j in range(i + 1, len(methods)):
            b = methods[j]
            denom = float(norms[i] * norms[j])
            out[f"agg_grad/cos/{pair_name(a, b)}"] = float(gram[i, j]) / denom if denom > 0 else math.nan
            out[f"agg_grad/norm_ratio/{pair_name(a, b)}"] = (
                float(norms[i] / norms[j]) if norms[j] > 0 else math.nan
            )
    return out


class AggregatorGradientHook:
    r"""The gradient each of the four aggregators would take on a step's batch, compared pairwise and logged.

    The gradients are :math:`\hat g_m = \sum_i x_{m,i} A_i s_i` with the weights of
    :func:`lab.aggregation.batch_weights` (TRL's batch normalization; ΔL with the run's α and scope),
    restricted to the trainable weights of ``nn.Linear`` layers (:func:`linear_per_sample_gradients`).

    It costs no extra forward or backward pass: it listens to the training step's own backward. On policy
    (one optimizer step per generation batch, ratio 1, so no clipping), the run's loss gives row i the output
    gradients :math:`\delta_{i,t} = -x_{\text{run},i} A_i\,\partial_h \log\pi`; dividing by the run's own
    weight and multiplying by each aggregator's, :math:`r_{m,i} = x_{m,i}/x_{\text{run},i}`, turns them into every
    aggregator's (the common minus sign changes no cosine or ratio). So the trainer calls
    :meth:`on_generation` (a generation hook: stores :math:`r` with the batch, which TRL shuffles and splits),
    :meth:`capture` around each micro-batch's forward, and :meth:`after_backward` after each backward; when
    all rows of the batch are in, :func:`aggregator_gradient_stats` goes to the step's metrics.

    Not with gradient checkpointing (the recomputed forward would be captured twice) nor with several
    processes (each holds a slice of the batch); the trainer switches it off there with a warning.
    """

    KEY = "aggregator_ratios"

    def __init__(self, every: int = 1):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        self.every = every
        self._rows_expected = 0
        self._rows_done = 0
        self._rows_in_flight = 0  # rows whose forward was captured, backward not yet folded in
        self._sums: dict[str, torch.Tensor] = {}
        self.last: dict[str, float] | None = None  # the stats of the last completed step

    def on_generation(self, trainer: Any, output: dict[str, Any]) -> None:
        """Generation hook: the ratios :math:`r_{m,i}` of this batch, one row per completion."""
        if int(trainer.state.global_step) % self.every:
            return
        mask = output["completion_mask"]
        if "tool_mask" in output:
            mask = mask * output["tool_mask"]
        lengths = mask.sum(-1).cpu()
        args = trainer.args
        M = max(float(trainer.max_completion_length), float(lengths.max()))
        x = batch_weights(
            lengths,
            alpha=float(getattr(args, "delta_l_alpha", 1.0)),
            max_length=M,
            delta_l_group_size=trainer.num_generations
            if getattr(args, "delta_l_scope", "batch") == "group"
            else None,
        )
        x_run = x[list(METHODS).index(trainer.loss_type)]
        if "step_scale" in output:  # equalize_step_size multiplies the run's loss by c
            x_run = x_run * output["step_scale"].detach().cpu().double()
        ratios = torch.where(x_run > 0, x / x_run.clamp(min=1e-300), torch.zeros_like(x)).T  # (N, 4)
        output[self.KEY] = ratios.to(torch.float32)
        self._rows_expected, self._rows_done, self._sums = int(lengths.shape[0]), 0, {}

    @contextlib.contextmanager
    def capture(self, model: torch.nn.Module, inputs: dict[str, Any]):
        """Around one micro-batch's loss forward: hooks that fold each row's gradient into the four sums."""
        ratios = inputs.get(self.KEY)
        if ratios is None:
            yield
            return
        ratios = ratios.float()
        self._rows_in_flight += int(ratios.shape[0])
        handles = [
            module.register_forward_hook(self._forward_hook(name, ratios))
            for name, module in own_linear_layers(model)
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _forward_hook(self, name: str, ratios: torch.Tensor):
        def hook(module, args, output):
            x = args[0].detach()
            if x.shape[0] != ratios.shape[0]:
                return  # a forward in chunks smaller than the micro-batch: rows cannot be matched, skip

            def on_grad(delta: torch.Tensor) -> None:
                d = delta.float()
                # $\sum_i r_{m,i}\,\delta_{i,t}^\top x_{i,t}$ for the four aggregators m at once
                weighted = (ratios.T.to(d)[:, :, None, None] * d).flatten(1, 2)  # (4, B·T, out)
                grad = weighted.transpose(1, 2) @ x.float().flatten(0, 1)  # (4, out, in)
                flat = grad.reshape(grad.shape[0], -1)
                if module.bias is not None and module.bias.requires_grad:
                    flat = torch.cat([flat, ratios.T.to(d) @ d.sum(1)], dim=1)
                self._sums[name] = self._sums[name] + flat if name in self._sums else flat

            output.register_hook(on_grad)

        return hook

    def after_backward(self, trainer: Any) -> dict[str, float] | None:
        """After a micro-batch's backward: when the whole batch is in, log the pairwise stats."""
        rows, self._rows_in_flight = self._rows_in_flight, 0
        if not self._rows_expected:
            return None
        self._rows_done += rows
        if self._rows_done < self._rows_expected:
            return None
        grads = torch.cat([self._sums[k] for k in sorted(self._sums)], dim=1) if self._sums else None
        self._rows_expected, self._sums = 0, {}
        if grads is None:
            return None
        stats = aggregator_gradient_stats(grads)
        metrics = trainer._metrics["train"]
        for name, value in stats.items():
            if math.isfinite(value):
                metrics[name].append(value)
        self.last = stats
        return stats
