r"""Evaluation metrics of the paper (Avg@k, Pass@k), a training-stability score, and the learning signal.

- :func:`pass_at_k`: the unbiased estimator of Chen et al. (2021) from ``n`` samples with ``c`` correct,
  :math:`\text{pass@}k = 1 - \binom{n-c}{k} / \binom{n}{k}`.
- :func:`avg_at_k`: the mean correctness of the samples (the paper's Avg@8 with k = 8).
- :func:`evaluate_model`: samples k completions per prompt of an eval set and reports both.
- :func:`monotonicity_score`: how steadily an eval curve rises (the lab's own definition; the paper's
  is not public).
- :func:`learning_signal`: the fraction of prompt groups with both a rewarded and an unrewarded
  completion. Only those groups have non-zero GRPO advantages, so only they teach anything.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise
from typing import Any

import torch

# ------------------------------------------------------------------------------------------ pass@k, avg@k


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def pass_at_k(n: int, c: int, k: int) -> float:
    r"""Unbiased pass@k from ``n`` samples of which ``c`` are correct (Chen et al. 2021):

    .. math:: \text{pass@}k = 1 - \binom{n-c}{k} \Big/ \binom{n}{k}
              = 1 - \prod_{i=n-c+1}^{n} \left(1 - \frac{k}{i}\right)

    (the product form is the numerically stable one). Requires ``1 <= k <= n`` and ``0 <= c <= n``.
    """
    _check_int("n", n, 1)
    _check_int("c", c, 0)
    _check_int("k", k, 1)
    if c > n:
        raise ValueError(f"c (correct samples) must be <= n={n}, got c={c}")
    if k > n:
        raise ValueError(f"k must be <= n={n} (pass@k needs at least k samples), got k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def avg_at_k(scores: Sequence[float]) -> float:
    """Avg@k: the mean score of the k samples of one prompt (scores in [0, 1])."""
    if len(scores) == 0:
        raise ValueError("avg_at_k needs at least one score, got an empty sequence")
    values = [float(s) for s in scores]
    if any(not 0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"scores must lie in [0, 1], got {values!r}")
    return sum(values) / len(values)


# -------------------------------------------------------------------------------------------- sampling


def render_prompt(prompt: str | Sequence[dict[str, str]], tokenizer) -> str:
    """The text a model sees for one dataset prompt, as TRL renders it: a str is used as is; messages go
    through the chat template with a generation prompt (or, when the last message is the assistant's,
    continuing it)."""
    if isinstance(prompt, str):
        return prompt
    messages = list(prompt)
    if not messages:
        raise ValueError("a chat prompt needs at least one message, got []")
    if messages[-1]["role"] == "assistant":
        return tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def sample_completions(
    model,
    tokenizer,
    prompts: Sequence[Any],
    *,
    num_samples: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 64,
    seed: int | None = None,
) -> tuple[list[list[str]], list[list[int]]]:
    """``num_samples`` sampled completions for each prompt (batched ``generate``, left padding).

    Returns ``(texts, lengths)``: per prompt, the decoded completions (special tokens dropped) and their
    token lengths up to and including the first end-of-sequence token. ``batch_size`` counts sequences.
    """
    _check_int("num_samples", num_samples, 1)
    _check_int("max_new_tokens", max_new_tokens, 1)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if seed is not None:
        torch.manual_seed(seed)
    texts = [render_prompt(p, tokenizer) for p in prompts]
    per_batch = max(1, batch_size // num_samples)
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids)
    old_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    all_texts: list[list[str]] = []
    all_lengths: list[list[int]] = []
    device = next(model.parameters()).device
    try:
        for start in range(0, len(texts), per_batch):
            chunk = texts[start : start + per_batch]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(
                **enc,
                do_sample=True,
                temperature=temperature,
                top_p=top_p,
                top_k=0,
                max_new_tokens=max_new_tokens,
                num_return_sequences=num_samples,
                pad_token_id=pad_id,
                eos_token_id=sorted(eos_ids),
            )
            completion_ids = out[:, enc["input_ids"].shape[1] :].tolist()
            for i in range(len(chunk)):
                rows = completion_ids[i * num_samples : (i + 1) * num_samples]
                rows = [_cut_at_eos(r, eos_ids) for r in rows]
                all_texts.append(tokenizer.batch_decode(rows, skip_special_tokens=True))
                all_lengths.append([len(r) for r in rows])
    finally:
        tokenizer.padding_side = old_side
    return all_texts, all_lengths


def _eos_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    found = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        found.add(tokenizer.eos_token_id)
    return found


def _cut_at_eos(ids: list[int], eos_ids: set[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in eos_ids:
            return ids[: i + 1]
    return ids


def _columns(dataset, index: int) -> dict[str, Any]:
    row = dataset[index]
    return {k: v for k, v in row.items() if k != "prompt"}


# ------------------------------------------------------------------------------------------ evaluation


def evaluate_model(
    model,
    tokenizer,
    dataset,
    task,
    *,
    k: int = 8,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 64,
    seed: int | None = 0,
) -> dict[str, Any]:
    """Sample ``k`` completions per prompt of ``dataset`` and score them with ``task.score``.

    Returns ``{"avg@k": mean over prompts of avg_at_k, "pass@k": mean over prompts of pass_at_k(k, c, k),
    "k": k, "num_prompts": ..., "mean_length": ..., "per_prompt": [{"index", "scores", "lengths",
    "completions", "avg@k", "pass@k"}, ...]}`` (the paper's Avg@8 and Pass@8 with k = 8).
    """
    _check_int("k", k, 1)
    if len(dataset) == 0:
        raise ValueError("the eval dataset is empty")
    texts, lengths = sample_completions(
        model,
        tokenizer,
        dataset["prompt"],
        num_samples=k,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        batch_size=batch_size,
        seed=seed,
    )
    per_prompt = []
    for i, (completions, lens) in enumerate(zip(texts, lengths, strict=True)):
        columns = _columns(dataset, i)
        scores = [float(task.score(c, **columns)) for c in completions]
        correct = sum(s >= 1.0 for s in scores)
        per_prompt.append(
            {
                "index": i,
                "scores": scores,
                "lengths": lens,
                "completions": completions,
                "avg@k": avg_at_k(scores),
                "pass@k": pass_at_k(k, correct, k),
            }
        )
    n = len(per_prompt)
    return {
        "avg@k": sum(p["avg@k"] for p in per_prompt) / n,
        "pass@k": sum(p["pass@k"] for p in per_prompt) / n,
        "k": k,
        "num_prompts": n,
        "mean_length": sum(sum(p["lengths"]) for p in per_prompt) / (n * k),
        "per_prompt": per_prompt,
    }


def learning_signal(
    model,
    tokenizer,
    dataset,
    task,
    *,
    num_generations: int = 8,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    shaped: bool = False,
    batch_size: int = 64,
    seed: int | None = 0,
) -> dict[str, Any]:
    """How much a GRPO step on ``dataset`` could learn at the model's current state.

    Samples a group of ``num_generations`` completions per prompt and rewards them with the sum of the
    task's reward functions (``task.reward_funcs(shaped=shaped)``, as TRL sums them with unit weights).
    A group is *mixed* when its rewards are not all equal (for binary rewards: it holds both a rewarded
    and an unrewarded completion); only mixed groups get non-zero group-normalized advantages.

    Returns ``fraction_mixed_groups``, ``fraction_mixed_binary`` (mixed on ``task.score`` alone),
    ``mean_reward``, ``mean_score`` (binary), ``fraction_all_correct``, ``fraction_all_wrong``,
    ``mean_length``, ``length_std_within_group`` (mean over groups; the aggregators only differ when
    lengths vary), ``fraction_truncated``, ``num_prompts``, ``seconds`` and ``examples`` (one completion
    of the first prompts).
    """
    import time

    start = time.perf_counter()
    texts, lengths = sample_completions(
        model,
        tokenizer,
        dataset["prompt"],
        num_samples=num_generations,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        batch_size=batch_size,
        seed=seed,
    )
    funcs = task.reward_funcs(shaped=shaped)
    mixed = mixed_binary = all_right = all_wrong = truncated = 0
    rewards_sum = scores_sum = length_std_sum = 0.0
    examples = []
    for i, (completions, lens) in enumerate(zip(texts, lengths, strict=True)):
        columns = _columns(dataset, i)
        batch_columns = {key: [value] * len(completions) for key, value in columns.items()}
        rewards = [0.0] * len(completions)
        for func in funcs:
            values = func(
                prompts=[dataset[i]["prompt"]] * len(completions), completions=completions, **batch_columns
            )
            rewards = [r + (v or 0.0) for r, v in zip(rewards, values, strict=True)]
        scores = [float(task.score(c, **columns)) for c in completions]
        mixed += len(set(rewards)) > 1
        mixed_binary += len(set(scores)) > 1
        all_right += min(scores) >= 1.0
        all_wrong += max(scores) <= 0.0
        rewards_sum += sum(rewards) / len(rewards)
        scores_sum += sum(scores) / len(scores)
        mean_len = sum(lens) / len(lens)
        length_std_sum += math.sqrt(sum((x - mean_len) ** 2 for x in lens) / len(lens))
        truncated += sum(x >= max_new_tokens for x in lens)
        if i < 3:
            examples.append({"completion": completions[0], "reward": rewards[0], "columns": columns})
    n = len(texts)
    return {
        "fraction_mixed_groups": mixed / n,
        "fraction_mixed_binary": mixed_binary / n,
        "mean_reward": rewards_sum / n,
        "mean_score": scores_sum / n,
        "fraction_all_correct": all_right / n,
        "fraction_all_wrong": all_wrong / n,
        "mean_length": sum(map(sum, lengths)) / (n * num_generations),
        "length_std_within_group": length_std_sum / n,
        "fraction_truncated": truncated / (n * num_generations),
        "num_prompts": n,
        "num_generations": num_generations,
        "seconds": time.perf_counter() - start,
        "examples": examples,
    }


# ------------------------------------------------------------------------------------------ stability


def monotonicity_score(steps: Sequence[float], values: Sequence[float]) -> float:
    r"""How steadily an eval curve rises, in [0, 1] (the lab's definition; the paper's is not public).

    Points are sorted by step. With :math:`n` points and :math:`\Delta_i = v_{i+1} - v_i` the
    consecutive changes, the score is the share of the curve's total movement that goes up:

    .. math:: \text{mono} = \frac{\sum_i \max(\Delta_i, 0)}{\sum_i |\Delta_i|}

    so 1.0 for a curve that never falls (strictly or weakly rising), 0.0 for one that never rises, and
    for a noisy curve the fraction of its up-and-down travel that was upward (a rise of 0.5 with
    a 0.1 dip along the way scores 0.6/0.7 ≈ 0.857). Unlike a rank correlation it weighs each step by its
    size, so a tiny wobble on a strong rise costs little. Edge cases: one point or a constant curve
    (no movement, no evidence either way) score the neutral 0.5. Raises ValueError for different
    lengths, no points, duplicate steps, or a NaN/inf.
    """
    if len(steps) != len(values):
        raise ValueError(f"steps and values must have the same length, got {len(steps)} and {len(values)}")
    if len(steps) == 0:
        raise ValueError("monotonicity_score needs at least one point, got none")
    pairs = [(float(s), float(v)) for s, v in zip(steps, values, strict=True)]
    bad = [p for p in pairs if not (math.isfinite(p[0]) and math.isfinite(p[1]))]
    if bad:
        raise ValueError(f"steps and values must be finite numbers, got {bad[0]!r}")
    pairs.sort()
    if any(a[0] == b[0] for a, b in pairwise(pairs)):
        raise ValueError(f"steps must be distinct, got {sorted(float(s) for s in steps)!r}")
    deltas = [b[1] - a[1] for a, b in pairwise(pairs)]
    total = sum(abs(d) for d in deltas)
    if total == 0.0:
        return 0.5
    return sum(max(d, 0.0) for d in deltas) / total
