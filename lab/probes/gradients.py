"""Gradient probes, part 1: per-sample gradients of the trainable parameters (see :mod:`lab.probes`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

#: seconds per completion of one probe on the embedded model, CPU, 1 thread (see :mod:`lab.probes`)
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
