"""Measure Var(g_i) against L_i on the embedded model with the unbiased estimator, and store it.

What it measures
    1. **Var(s_i) against L_i.** Completions of a fixed set of prompts chosen to span lengths from a few
       tokens to the cap (``PROMPTS``: one-word answers, a haiku, a poem, an explanation, a story, and
       the CPU demo's CountDown prompts), ``--num-generations`` per prompt at temperature
       ``--temperature`` with up to ``--max-new-tokens`` tokens. For each completion the score-function
       gradient s_i = Σ_t ∇log π(o_t | ·) of the LoRA parameters (a fresh adapter, as at step 1 of
       training: ``lab.probes.per_sample_gradients``), then the unbiased per-row estimate t̂_i of
       tr Var(s_i) (``lab.probes.grad_variances``, one group per prompt) and the fits of
       ``lab.probes.variance_length_fit``: slope, intercept, exponent, with percentile bootstrap 95%
       intervals over prompts (``lab.probes.bootstrap_variance_fit``). Also: the within-prompt slope
       (lengths and estimates centred per prompt: does variance grow with length *for the same
       prompt*?), the fit without truncated completions, and the old biased estimator's fit on the
       same gradients (``lab.probes.group_centred_norms``) for comparison.
    2. **A_i against L_i.** g_i = A_i s_i, so the length dependence of Var(g_i) is that of s_i only if
       A_i does not depend on L_i. Truncated completions get reward 0, so it can. On the CPU demo's
       training setting (``lab.tasks.DEMO``: CountDown prompts, temperature 0.7, 64 tokens) it samples
       ``--advantage-prompts`` groups, computes TRL's group-normalized advantages
       A_i = (r_i − mean_group r) / (std_group r + 1e-4) (``GRPOTrainer``, ``scale_rewards="group"``), and
       reports corr(A_i, L_i), corr(A_i², L_i) over rows of groups with a reward spread, the mean A_i of
       truncated and of complete rows, and the exponent of E[A_i² | L_i] (if A and s are independent
       given L, Var(g_i | L) = E[A² | L]·Var(s_i | L): the exponents add).

Usage (1 thread; the per-sample gradients are one forward + backward per completion)::

    .venv/bin/python benchmarks/variance_vs_length.py                       # writes the stored result
    .venv/bin/python benchmarks/variance_vs_length.py --quick --out /tmp/v.json   # tiny model, smoke run

Output: ``benchmarks/results/variance_vs_length.smollm2.json`` (keys ``slope``, ``intercept``,
``exponent``, ``*_ci``, ``n``, ``lengths_min``, ``lengths_max``, ``command``, ... and ``rows``: the per-row
data that notebook 01 plots).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import torch

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "variance_vs_length.smollm2.json"

# Chat prompts chosen (by sampling them once) to give lengths from a few tokens to the cap.
PROMPTS: tuple[str, ...] = (
    "What is the capital of France? Answer with one word.",
    "Give me one random number between 1 and 100. Reply with the number only.",
    "Is the Sun a star? Answer yes or no, then explain in one sentence.",
    "Write a haiku about autumn.",
    "Name three fruits and say one thing about each.",
    "Write a short poem about the sea.",
    "Explain how a bicycle works.",
    "Write a story about a robot who learns to paint.",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--countdown-prompts", type=int, default=4, help="CountDown demo prompts in part 1")
    p.add_argument("--advantage-prompts", type=int, default=24, help="CountDown demo groups in part 2")
    p.add_argument("--n-bootstrap", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--quick", action="store_true", help="tiny model, 3 prompts x 4, 24 tokens (smoke run)")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.num_generations, args.max_new_tokens = "tiny", 4, 24
        args.countdown_prompts, args.advantage_prompts, args.n_bootstrap = 1, 3, 50
    if args.num_generations < 3:
        p.error(f"--num-generations must be >= 3 (the unbiased estimator needs 3 rows per prompt), got "
                f"{args.num_generations}")  # fmt: skip
    return args


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def interval(values: tuple[float, float]) -> list[float]:
    return [float(values[0]), float(values[1])]


def within_prompt_slope(lengths: torch.Tensor, variances: torch.Tensor, groups: torch.Tensor) -> float:
    r"""Slope of t̂ on L with one intercept per prompt: :math:`\sum (L - \bar L_g)(t - \bar t_g) / \sum (L - \bar L_g)^2`."""
    from lab.probes import least_squares

    keep = (lengths > 0) & torch.isfinite(variances)
    L, v, g = lengths[keep], variances[keep], groups[keep]
    dL, dv = L.clone(), v.clone()
    for label in g.unique():
        rows = g == label
        dL[rows] -= L[rows].mean()
        dv[rows] -= v[rows].mean()
    # least squares through the origin on the centred values
    return float(dL @ dv / (dL @ dL)) if float(dL @ dL) > 0 else least_squares(L, v)[0]


def bootstrap_within_slope(lengths, variances, groups, *, n_bootstrap: int, seed: int) -> list[float]:
    members = [(groups == label).nonzero().squeeze(1) for label in groups.unique()]
    gen = torch.Generator().manual_seed(seed)
    draws = []
    for _ in range(n_bootstrap):
        pick = torch.randint(0, len(members), (len(members),), generator=gen)
        rows = torch.cat([members[int(j)] for j in pick])
        relabel = torch.cat([torch.full((members[int(j)].numel(),), k) for k, j in enumerate(pick)])
        draws.append(within_prompt_slope(lengths[rows], variances[rows], relabel))
    t = torch.tensor(draws, dtype=torch.float64)
    t = t[torch.isfinite(t)]
    if t.numel() < n_bootstrap / 2:
        return [math.nan, math.nan]
    q = t.quantile(torch.tensor([0.025, 0.975], dtype=torch.float64))
    return [float(q[0]), float(q[1])]


def truncated_rows(batch: dict[str, torch.Tensor], eos_ids: list[int]) -> torch.Tensor:
    """True where a completion has no end-of-sequence token (cut at the cap)."""
    return ~torch.isin(batch["completion_ids"], torch.tensor(eos_ids)).any(1)


def eos_token_ids(model, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return sorted(ids | {tokenizer.eos_token_id})


def measure_variance(model, tokenizer, args: argparse.Namespace) -> dict[str, Any]:
    """Part 1: per-sample score-function gradients on PROMPTS (+ CountDown demo prompts) and the fits."""
    from peft import get_peft_model

    from lab.models import lora_config
    from lab.probes import (
        bootstrap_variance_fit,
        grad_variances,
        group_centred_norms,
        least_squares,
        per_sample_gradients,
        sample_generation_batch,
        variance_length_fit,
    )
    from lab.tasks import DEMO, get_task

    G = args.num_generations
    chat = [[{"role": "user", "content": text}] for text in PROMPTS[: 3 if args.quick else None]]
    countdown = get_task("countdown").train_dataset(
        args.countdown_prompts, seed=args.seed, chat=True, **DEMO["task_options"]
    )
    prompt_sets = [("chat", chat), ("countdown", [row["prompt"] for row in countdown])]
    eos_ids = eos_token_ids(model, tokenizer)
    peft_model = get_peft_model(model, lora_config(args.model))
    rows: dict[str, list] = {k: [] for k in ("prompt", "kind", "length", "truncated")}
    grads, sample_seconds, grad_seconds = [], 0.0, 0.0
    for kind, prompts in prompt_sets:
        if not prompts:
            continue
        start = time.perf_counter()
        with peft_model.disable_adapter():  # the base model's samples (a fresh adapter changes nothing)
            batch = sample_generation_batch(
                peft_model, tokenizer, prompts, num_generations=G, max_new_tokens=args.max_new_tokens,
                temperature=args.temperature, seed=args.seed,
            )  # fmt: skip
        sample_seconds += time.perf_counter() - start
        print(f"[{kind}] sampled {len(batch['lengths'])} completions in {time.perf_counter() - start:.0f} s: "
              f"lengths {batch['lengths'].tolist()}", flush=True)  # fmt: skip
        start = time.perf_counter()
        grads.append(
            per_sample_gradients(
                peft_model,
                batch["prompt_ids"],
                batch["prompt_mask"],
                batch["completion_ids"],
                batch["completion_mask"],
                temperature=args.temperature,
            )
        )
        grad_seconds += time.perf_counter() - start
        print(f"[{kind}] per-sample gradients in {time.perf_counter() - start:.0f} s", flush=True)
        offset = len(set(rows["prompt"]))
        rows["prompt"] += [offset + i // G for i in range(len(batch["lengths"]))]
        rows["kind"] += [kind] * len(batch["lengths"])
        rows["length"] += batch["lengths"].tolist()
        rows["truncated"] += truncated_rows(batch, eos_ids).tolist()
    s = torch.cat(grads)
    L = torch.tensor(rows["length"], dtype=torch.float64)
    groups = torch.tensor(rows["prompt"])
    t_hat = grad_variances(s, G)  # one group per prompt (G consecutive rows)
    v_old = group_centred_norms(s, G)
    second_moment = s.double().square().sum(-1)  # ‖s_i‖²: E s = 0, so E‖s_i‖² = tr Var(s_i) + ‖E[s_i | L_i]‖²
    fit = variance_length_fit(L, t_hat)
    ci = bootstrap_variance_fit(L, t_hat, groups, n_bootstrap=args.n_bootstrap, seed=args.seed)
    complete = ~torch.tensor(rows["truncated"])
    fit_complete = variance_length_fit(L[complete], t_hat[complete])
    old_positive = v_old > 0
    per_token = t_hat / L.clamp(min=1)
    short, long = L <= torch.quantile(L, 0.25), L >= torch.quantile(L, 0.75)
    return {
        "fit": fit,
        "ci": ci,
        "within_prompt_slope": within_prompt_slope(L, t_hat, groups),
        "within_prompt_slope_ci": bootstrap_within_slope(
            L, t_hat, groups, n_bootstrap=min(args.n_bootstrap, 1000), seed=args.seed
        ),
        "without_truncated": {k: fit_complete[k] for k in ("slope", "intercept", "exponent", "n")},
        "old_estimator": {
            "slope": least_squares(L, v_old)[0],
            "intercept": least_squares(L, v_old)[1],
            "exponent_loglog": least_squares(L[old_positive].log(), v_old[old_positive].log())[0],
            "exponent": variance_length_fit(L, v_old)["exponent"],
        },
        "second_moment": {
            k: variance_length_fit(L, second_moment)[k] for k in ("slope", "intercept", "exponent")
        },
        "per_token_variance": {
            "shortest_quarter": float(per_token[short].mean()),
            "longest_quarter": float(per_token[long].mean()),
        },
        "trainable_parameters": int(s.shape[1]),
        "rows": {
            **rows,
            "grad_variance": t_hat.tolist(),
            "old_estimate": v_old.tolist(),
            "second_moment": second_moment.tolist(),
        },
        "seconds_sampling": sample_seconds,
        "seconds_gradients": grad_seconds,
        "seconds_per_row": grad_seconds / len(L),
    }


def measure_advantages(model, tokenizer, args: argparse.Namespace) -> dict[str, Any]:
    """Part 2: A_i against L_i at the CPU demo's training setting (rewards, no gradients)."""
    from lab.probes import bootstrap_variance_fit, least_squares, sample_generation_batch, variance_length_fit
    from lab.tasks import DEMO, get_task

    task = get_task(DEMO["task"])
    G, M = DEMO["num_generations"], DEMO["max_completion_length"]
    data = task.train_dataset(args.advantage_prompts, seed=args.seed + 1, chat=True, **DEMO["task_options"])
    start = time.perf_counter()
    batch = sample_generation_batch(
        model, tokenizer, [row["prompt"] for row in data], num_generations=G, max_new_tokens=M,
        temperature=DEMO["temperature"], seed=args.seed,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    lengths = batch["lengths"].double()
    truncated = truncated_rows(batch, eos_token_ids(model, tokenizer))
    texts = tokenizer.batch_decode(
        [ids[: int(n)] for ids, n in zip(batch["completion_ids"], batch["lengths"], strict=True)],
        skip_special_tokens=True,
    )
    completions = [[{"role": "assistant", "content": t}] for t in texts]
    rewards = torch.zeros(len(texts), dtype=torch.float64)
    for func in task.reward_funcs(shaped=DEMO["shaped"]):  # TRL sums the reward functions (unit weights)
        columns = {k: [data[i // G][k] for i in range(len(texts))] for k in ("numbers", "target")}
        values = func(
            prompts=[data[i // G]["prompt"] for i in range(len(texts))], completions=completions, **columns
        )
        rewards += torch.tensor([v or 0.0 for v in values], dtype=torch.float64)
    grouped = rewards.view(-1, G)
    # TRL GRPOTrainer, scale_rewards="group": A = (r - mean_group) / (std_group + 1e-4), unbiased std
    advantages = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).reshape(
        -1
    )
    mixed = (grouped.max(1).values > grouped.min(1).values).repeat_interleave(G)
    groups = torch.arange(len(texts)) // G
    L, A = lengths[mixed], advantages[mixed]
    out: dict[str, Any] = {
        "setting": {"task": DEMO["task"], "task_options": DEMO["task_options"], "num_generations": G,
                    "max_completion_length": M, "temperature": DEMO["temperature"], "prompts": len(data)},
        "n_rows": len(texts),
        "n_mixed_rows": int(mixed.sum()),
        "fraction_mixed_groups": float(mixed.view(-1, G)[:, 0].double().mean()),
        "fraction_truncated": float(truncated.double().mean()),
        "reward_truncated": float(rewards[truncated].mean()) if truncated.any() else None,
        "reward_complete": float(rewards[~truncated].mean()) if (~truncated).any() else None,
        "seconds_sampling": seconds,
    }  # fmt: skip
    if int(mixed.sum()) >= 3:
        trunc = truncated[mixed]
        fit = variance_length_fit(L, A.square())
        ci = bootstrap_variance_fit(L, A.square(), groups[mixed], n_bootstrap=min(args.n_bootstrap, 1000))
        out |= {
            "corr_advantage_length": least_squares(L, A)[2],
            "corr_squared_advantage_length": least_squares(L, A.square())[2],
            "mean_advantage_truncated": float(A[trunc].mean()) if trunc.any() else None,
            "mean_advantage_complete": float(A[~trunc].mean()) if (~trunc).any() else None,
            "squared_advantage_exponent": fit["exponent"],
            "squared_advantage_exponent_ci": interval(ci["exponent"]),
            "rows": {"length": L.tolist(), "advantage": A.tolist(), "truncated": trunc.tolist(),
                     "reward": rewards[mixed].tolist()},
        }  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lab.models import load_model_and_tokenizer

    load_before, wall = load_average(), time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(args.model)
    model.eval()
    advantage = measure_advantages(model, tokenizer, args)
    print(json.dumps({k: v for k, v in advantage.items() if k != "rows"}, indent=1), flush=True)
    variance = measure_variance(model, tokenizer, args)
    fit, ci = variance["fit"], variance["ci"]
    lengths = [x for x in variance["rows"]["length"] if x > 0]
    result = {
        "what": "Var(s_i) against L_i: unbiased per-row estimates of tr Var of the score-function gradient "
        "s_i of a fresh LoRA adapter (lab.probes.grad_variances, one group per prompt), fits of "
        "lab.probes.variance_length_fit, percentile bootstrap 95% intervals over prompts",
        "model": args.model,
        "slope": fit["slope"],
        "intercept": fit["intercept"],
        "exponent": fit["exponent"],
        "power_law_scale": fit["power_law_scale"],
        "slope_ci": interval(ci["slope"]),
        "intercept_ci": interval(ci["intercept"]),
        "exponent_ci": interval(ci["exponent"]),
        "correlation": fit["correlation"],
        "n": fit["n"],
        "n_nonpositive": fit["n_nonpositive"],
        "n_prompts": len(set(variance["rows"]["prompt"])),
        "lengths_min": min(lengths),
        "lengths_max": max(lengths),
        "fraction_truncated": sum(variance["rows"]["truncated"]) / len(variance["rows"]["truncated"]),
        **{k: variance[k] for k in ("within_prompt_slope", "within_prompt_slope_ci", "without_truncated",
                                    "old_estimator", "second_moment", "per_token_variance",
                                    "trainable_parameters")},
        "advantage_vs_length": {k: v for k, v in advantage.items() if k != "rows"},
        "settings": {"num_generations": args.num_generations, "max_new_tokens": args.max_new_tokens,
                     "temperature": args.temperature, "countdown_prompts": args.countdown_prompts,
                     "chat_prompts": list(PROMPTS), "lora": "fresh adapter (B = 0): the gradient lives in B",
                     "n_bootstrap": args.n_bootstrap, "seed": args.seed, "threads": args.threads},
        "timing": {"seconds_total": time.perf_counter() - wall, "seconds_per_row": variance["seconds_per_row"],
                   "seconds_sampling": variance["seconds_sampling"] + advantage["seconds_sampling"],
                   "seconds_gradients": variance["seconds_gradients"], "load_before": load_before,
                   "load_after": load_average(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                   "torch": torch.__version__},
        "command": "python benchmarks/variance_vs_length.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "rows": variance["rows"],
        "advantage_rows": advantage.get("rows"),
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(json_safe(result), indent=1, allow_nan=False) + "\n", encoding="utf-8")
    tmp.replace(args.out)
    summary = {k: result[k] for k in ("slope", "slope_ci", "intercept", "intercept_ci", "exponent",
                                      "exponent_ci", "n", "lengths_min", "lengths_max", "within_prompt_slope",
                                      "within_prompt_slope_ci", "old_estimator", "timing")}  # fmt: skip
    print(json.dumps(summary, indent=1), f"\nwrote {args.out}", flush=True)


def json_safe(value: Any) -> Any:
    """NaN and inf are not JSON: write them as null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


if __name__ == "__main__":
    main()
