"""lab.probes: per-sample gradients against autograd, statistics on synthetic gradients, the trainer hook."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import get_peft_model

from lab.aggregation import estimator_stats, sequence_weights
from lab.models import load_model_and_tokenizer, lora_config
from lab.probes import (
    AggregatorGradientHook,
    aggregator_gradient_stats,
    bootstrap_cv,
    bootstrap_variance_fit,
    grad_variances,
    group_centred_norms,
    least_squares,
    linear_per_sample_gradients,
    make_probe_hook,
    per_sample_gradients,
    power_law_exponent,
    probe_statistics,
    trainable_parameters,
)

M = 16
LENGTHS = [16, 3, 9, 1, 12, 5, 7, 0]  # one empty completion on purpose
ADVANTAGES = [1.0, -0.5, 0.3, -1.2, 0.8, 0.0, -0.4, 0.7]


@pytest.fixture(scope="module")
def lora_model():
    model, _ = load_model_and_tokenizer("tiny")
    model = get_peft_model(model, lora_config("tiny"))
    torch.manual_seed(0)
    with torch.no_grad():  # LoRA B starts at 0, which would make every lora_A gradient 0: perturb it
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


@pytest.fixture(scope="module")
def batch():
    """A TRL-shaped generation batch: left-padded prompts, right-padded completions of varied length."""
    gen = torch.Generator().manual_seed(0)
    n, p_len = len(LENGTHS), 6
    prompt_ids = torch.randint(5, 500, (n, p_len), generator=gen)
    prompt_mask = torch.ones(n, p_len, dtype=torch.long)
    prompt_mask[::2, :2] = 0  # left padding on half the rows
    completion_ids = torch.randint(5, 500, (n, M), generator=gen)
    completion_mask = torch.zeros(n, M, dtype=torch.long)
    for i, length in enumerate(LENGTHS):
        completion_mask[i, :length] = 1
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": torch.tensor(ADVANTAGES),
    }


@pytest.fixture(scope="module")
def scores(lora_model, batch):
    keys = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")
    return per_sample_gradients(lora_model, *(batch[k] for k in keys))


def batched_objective_gradient(model, batch, x: torch.Tensor) -> torch.Tensor:
    """Autograd gradient of Σ_i x_i Σ_t m_it A_i log π(o_it) from ONE padded batched forward."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attn = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    T = batch["completion_ids"].shape[1]
    model.eval()
    logits = model(input_ids=ids, attention_mask=attn).logits[:, -T - 1 : -1].float()
    logp = torch.log_softmax(logits, -1).gather(2, batch["completion_ids"].unsqueeze(2)).squeeze(2)
    per_row = (logp * batch["completion_mask"]).sum(1) * batch["advantages"]
    objective = (x.float() * per_row).sum()
    params = [p for _, p in trainable_parameters(model)]
    grads = torch.autograd.grad(objective, params)
    return torch.cat([g.reshape(-1) for g in grads])


def test_shapes_and_no_grad_leak(lora_model, scores):
    n_params = sum(p.numel() for _, p in trainable_parameters(lora_model))
    assert scores.shape == (len(LENGTHS), n_params)
    assert all(p.grad is None for _, p in trainable_parameters(lora_model))
    assert torch.all(scores[LENGTHS.index(0)] == 0)  # empty completion: no gradient
    assert torch.isfinite(scores).all() and scores.abs().sum() > 0


@pytest.mark.parametrize("method", ["delta_l", "grpo", "dapo", "dr_grpo"])
def test_weighted_sum_equals_autograd_of_aggregated_objective(lora_model, batch, method):
    """Σ_i x_i g_i (per-sample, one row at a time) == ∇ Σ_i x_i Σ_t A_i log π (one batched backward)."""
    keys = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages")
    g = per_sample_gradients(lora_model, *(batch[k] for k in keys))
    x = sequence_weights(torch.tensor(LENGTHS), method, alpha=1.0, max_length=M)
    expected = batched_objective_gradient(lora_model, batch, x)
    got = (x.float().unsqueeze(1) * g).sum(0)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_advantages_scale_rows(lora_model, batch, scores):
    """g_i = A_i s_i: the advantage is a per-row factor of the score-function gradient."""
    keys = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages")
    g = per_sample_gradients(lora_model, *(batch[k] for k in keys))
    torch.testing.assert_close(
        g, scores * batch["advantages"].unsqueeze(1), rtol=1e-4, atol=1e-5 * float(g.abs().max())
    )


def synthetic_grads(lengths: torch.Tensor, dim: int = 400, seed: int = 0, mean: float = 0.0) -> torch.Tensor:
    """g_i = μ + sqrt(L_i) z_i with z_i ~ N(0, I): Var(g_i) = L_i per coordinate, tr Σ_i = dim · L_i."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(lengths.shape[0], dim, generator=gen, dtype=torch.float64)
    return mean + lengths.double().sqrt().unsqueeze(1) * z


def grouped_grads(a: float, b: float, group_size: int, seed: int, n_groups: int = 16, dim: int = 400):
    """Groups with large random shared means (norm ~100x the noise) and tr Σ_i = a + b L_i exactly.

    Lengths are log-uniform in 5..500. Returns (grads, lengths, tr Σ_i).
    """
    gen = torch.Generator().manual_seed(seed)
    n = n_groups * group_size
    lengths = torch.empty(n, dtype=torch.float64).uniform_(math.log(5), math.log(500), generator=gen)
    lengths = lengths.exp().round()
    trace = a + b * lengths
    means = 1e3 * torch.randn(n_groups, dim, generator=gen, dtype=torch.float64)
    noise = torch.randn(n, dim, generator=gen, dtype=torch.float64) * (trace / dim).sqrt().unsqueeze(1)
    return means.repeat_interleave(group_size, 0) + noise, lengths, trace


def mean_and_standard_error(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std() / math.sqrt(t.numel()))


SEEDS = range(16)


@pytest.mark.parametrize("group_size", [4, 8, 16])
@pytest.mark.parametrize(("a", "b"), [(0.0, 1.0), (200.0, 1.0), (50.0, 3.0)])
def test_grad_variances_unbiased_and_fit_recovers_a_b(group_size, a, b):
    """Var = a + b·L, shared group means 100x the noise: E[t̂_i] = tr Σ_i, slope → b, intercept → a,
    exponent → 1 when a = 0; each checked within 4 standard errors over independent draws."""
    ratio, slope, intercept, exponent = [], [], [], []
    for seed in SEEDS:
        grads, lengths, trace = grouped_grads(a, b, group_size, seed)
        t_hat = grad_variances(grads, group_size)
        ratio.append(float((t_hat / trace).mean()))
        stats = probe_statistics(grads, lengths, max_length=500, group_size=group_size, methods=())
        slope.append(stats["slope"])
        intercept.append(stats["intercept"])
        exponent.append(stats["exponent"])
    for name, values, target in [("ratio", ratio, 1.0), ("slope", slope, b), ("intercept", intercept, a)]:
        mean, se = mean_and_standard_error(values)
        assert abs(mean - target) < 4 * se + 1e-9, f"{name}: {mean:.4f} ± {se:.4f}, expected {target}"
    assert mean_and_standard_error(slope)[1] < 0.02 * b  # precise enough for the check to mean something
    if a == 0:
        mean, se = mean_and_standard_error(exponent)
        assert se < 0.01 and abs(mean - 1.0) < 4 * se, f"exponent {mean:.4f} ± {se:.4f}"


def test_group_centred_norms_are_biased():
    """The old estimator ‖g_i − ḡ‖² fails the same check: a flattened exponent and a spurious intercept."""
    exponent, intercept = [], []
    for seed in SEEDS:
        grads, lengths, _ = grouped_grads(0.0, 1.0, 8, seed)
        v = group_centred_norms(grads, 8)
        exponent.append(least_squares(lengths.log(), v.log())[0])  # the old fit: log-log least squares
        intercept.append(least_squares(lengths, v)[1])
        # E[v_i] = (1 − 2/n) tr Σ_i + Σ_j tr Σ_j / n²: the identity the correction inverts
        n = 8
        t_hat = grad_variances(grads, 8)
        group_sum = t_hat.view(-1, n).sum(1, keepdim=True).expand(-1, n).reshape(-1)
        torch.testing.assert_close(v, (1 - 2 / n) * t_hat + group_sum / n**2)
    assert mean_and_standard_error(exponent)[0] < 0.8  # ≈ 0.7 for 8 rows per group, lengths 5–500
    assert mean_and_standard_error(intercept)[0] > 10  # ≈ V·mean(L)/n > 0, though the truth is 0


def test_grad_variances_equals_pairwise_u_statistic():
    """t̂_i = mean over ordered pairs j ≠ k (both ≠ i) of (g_i − g_j)·(g_i − g_k)."""
    gen = torch.Generator().manual_seed(3)
    grads = torch.randn(10, 7, generator=gen, dtype=torch.float64) + 5.0
    t_hat = grad_variances(grads, 5)
    for i in range(10):
        lo = (i // 5) * 5
        others = [j for j in range(lo, lo + 5) if j != i]
        pairs = [(j, k) for j in others for k in others if j != k]
        expected = sum(float((grads[i] - grads[j]) @ (grads[i] - grads[k])) for j, k in pairs) / len(pairs)
        assert t_hat[i].item() == pytest.approx(expected, rel=1e-9)


@settings(max_examples=30, deadline=None)
@given(
    st.integers(3, 6),
    st.integers(1, 3),
    st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=3, max_size=3),
)
def test_grad_variances_ignore_group_means(group_size, n_groups, shift):
    """Adding any vector to every row of a group leaves every estimate unchanged."""
    gen = torch.Generator().manual_seed(group_size * 10 + n_groups)
    grads = torch.randn(group_size * n_groups, 3, generator=gen, dtype=torch.float64)
    shifted = grads.clone()
    shifted[:group_size] += torch.tensor(shift, dtype=torch.float64)
    before, after = grad_variances(grads, group_size), grad_variances(shifted, group_size)
    torch.testing.assert_close(after, before, atol=1e-6 * (1 + max(abs(x) for x in shift)) ** 2, rtol=1e-6)


def test_grad_variances_rejects_groups_too_small():
    grads = torch.tensor([[1.0], [3.0], [10.0], [14.0]])
    torch.testing.assert_close(
        group_centred_norms(grads, group_size=2), torch.tensor([1.0, 1.0, 4.0, 4.0], dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="group_size=2"):
        grad_variances(grads, group_size=2)
    with pytest.raises(ValueError, match="group_size=3"):
        grad_variances(grads, group_size=3)
    with pytest.raises(ValueError, match="group_size"):
        probe_statistics(grads, [10.0, 20.0, 30.0, 40.0], max_length=40, group_size=3)
    # through probe_statistics, groups too small to estimate give NaN rows, not an error
    stats = probe_statistics(grads, [10.0, 20.0, 30.0, 40.0], max_length=40, group_size=2, methods=())
    assert all(math.isnan(v) for v in stats["grad_variances"]) and math.isnan(stats["slope"])


def test_empty_rows_leave_their_group():
    """A row of length 0 has no gradient (not a draw with the group's mean): it is left out of its group."""
    grads, lengths, _ = grouped_grads(0.0, 1.0, 5, seed=0, n_groups=2)
    with_empty = torch.cat(
        [grads[:5], torch.zeros(1, grads.shape[1]), grads[5:], torch.zeros(1, grads.shape[1])]
    )
    L = torch.cat([lengths[:5], torch.zeros(1), lengths[5:], torch.zeros(1)])
    stats = probe_statistics(with_empty, L, max_length=500, group_size=6, methods=())
    v = torch.tensor(stats["grad_variances"], dtype=torch.float64)
    assert math.isnan(v[5]) and math.isnan(v[11]) and stats["n"] == 10
    expected = grad_variances(grads, 5)
    torch.testing.assert_close(torch.cat([v[:5], v[6:11]]), expected)


def test_power_law_exponent():
    x = torch.tensor([5.0, 10, 40, 100, 300])
    for k in (0.5, 1.0, 2.0):
        assert power_law_exponent(x, 7.0 * x**k) == pytest.approx(k, abs=1e-6)
    noisy = 3.0 * x + torch.tensor([-20.0, 5, -10, 30, -40])  # the shortest estimate is negative
    assert 0.8 < power_law_exponent(x, noisy) < 1.1
    assert math.isnan(power_law_exponent(torch.tensor([4.0, 4, 4]), torch.tensor([1.0, 2, 3])))
    assert math.isnan(power_law_exponent(x, -x))  # no positive c·x^k fits


def test_bootstrap_variance_fit_covers_truth():
    grads, lengths, _ = grouped_grads(20.0, 2.0, 8, seed=1, n_groups=12)
    t_hat = grad_variances(grads, 8)
    ci = bootstrap_variance_fit(lengths, t_hat, torch.arange(96) // 8, n_bootstrap=300, seed=0)
    assert ci["slope"][0] < 2.0 < ci["slope"][1] and ci["slope"][1] - ci["slope"][0] < 0.5
    assert ci["intercept"][0] < 20.0 < ci["intercept"][1]
    assert ci["exponent"][0] < ci["exponent"][1] < 1.0  # a > 0: the power law bends below 1
    with pytest.raises(ValueError, match="level"):
        bootstrap_variance_fit(lengths, t_hat, torch.arange(96) // 8, level=1.5)


@pytest.mark.parametrize(("method", "alpha"), [("dr_grpo", 1.0), ("delta_l", 1.0), ("delta_l", 0.5)])
@pytest.mark.parametrize("mean", [1.0, 3.0])
def test_bootstrap_cv_matches_closed_form(method, alpha, mean):
    """On g_i = μ + sqrt(L_i) z_i (tr Σ_i = P·L_i, ‖μ‖² = P·m²) the measured CV matches
    estimator_stats' CV / m, within 4 standard errors over independent draws (CVs from 0.4 to 2.6)."""
    gen = torch.Generator().manual_seed(1)
    lengths = torch.empty(64, dtype=torch.float64).uniform_(math.log(20), math.log(2000), generator=gen)
    lengths = lengths.exp().round()
    theory = estimator_stats(lengths, method, alpha=alpha, max_length=2048)["cv"] / mean
    measured = [
        bootstrap_cv(
            synthetic_grads(lengths, 2000, seed, mean), lengths, method, alpha=alpha, max_length=2048,
            n_bootstrap=500, seed=seed,
        )
        for seed in range(12)
    ]  # fmt: skip
    mu, se = mean_and_standard_error(measured)
    assert abs(mu - theory) < 4 * se + 0.01 * theory, f"measured {mu:.3f} ± {se:.3f}, theory {theory:.3f}"


def test_bootstrap_cv_ordering_matches_theory():
    """Under Var(g_i) ∝ L_i, ΔL(α=1) has the lowest measured CV of the unbiased estimators, as in theory."""
    lengths = torch.tensor([20.0, 40, 80, 150, 300, 600, 1000, 2000] * 8)
    grads = synthetic_grads(lengths, dim=200, mean=3.0)
    measured = {
        m: bootstrap_cv(grads, lengths, m, alpha=a, max_length=2048, n_bootstrap=300)
        for m, a in (("delta_l", 1.0), ("dr_grpo", 1.0))
    }
    measured["delta_l_0.5"] = bootstrap_cv(
        grads, lengths, "delta_l", alpha=0.5, max_length=2048, n_bootstrap=300
    )
    assert measured["delta_l"] < measured["delta_l_0.5"] < measured["dr_grpo"]
    theory = {m: estimator_stats(lengths, m, max_length=2048)["cv"] for m in ("delta_l", "dr_grpo")}
    ratio_measured = measured["dr_grpo"] / measured["delta_l"]
    ratio_theory = theory["dr_grpo"] / theory["delta_l"]
    assert ratio_measured == pytest.approx(ratio_theory, rel=0.15)


def test_probe_statistics_keys_and_advantages(scores):
    lengths = torch.tensor(LENGTHS)
    stats = probe_statistics(scores, lengths, max_length=M, advantages=ADVANTAGES, n_bootstrap=20)
    assert set(stats["cv"]) == {"grpo", "dapo", "dr_grpo", "delta_l"}
    assert stats["n"] == len(LENGTHS) - 1
    assert all(v > 0 for v in stats["cv"].values())
    assert set(stats) >= {
        "lengths",
        "grad_variances",
        "slope",
        "intercept",
        "correlation",
        "exponent",
        "cv_theory",
    }
    with pytest.raises(ValueError, match="shape"):
        probe_statistics(scores[:3], lengths, max_length=M)


def fake_trainer(model, step: int):
    return SimpleNamespace(
        model=model,
        state=SimpleNamespace(global_step=step),
        accelerator=SimpleNamespace(is_main_process=True),
        args=SimpleNamespace(delta_l_alpha=1.0),
        num_generations=4,
        max_completion_length=M,
        temperature=1.0,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )


def test_hook_probes_every_k_steps_and_logs_metrics(lora_model, batch):
    hook = make_probe_hook(every=2, max_rows=4, n_bootstrap=10)
    trainer = fake_trainer(lora_model, step=1)
    assert hook(trainer, batch) is None and hook.records == []
    trainer.state.global_step = 2
    record = hook(trainer, batch)
    assert record is hook.records[0] and record["step"] == 3
    assert len(record["lengths"]) == 4 and record["seconds"] > 0
    train = trainer._metrics["train"]
    for name in ("probe/var_length_slope", "probe/var_length_corr"):
        assert len(train[name]) == 1 and math.isfinite(train[name][0])
    # 4 rows of a random model do not resolve the mean gradient from its noise: CV = inf, not logged
    for method, cv in record["cv"].items():
        assert cv > 0 and len(train[f"probe/cv/{method}"]) == int(math.isfinite(cv))
    assert all(p.grad is None for _, p in trainable_parameters(lora_model))
    with pytest.raises(ValueError, match="every"):
        make_probe_hook(0)


def test_hook_inside_delta_l_trainer(tmp_path):
    """One real LoRA training step on the tiny model with the hook in trainer.generation_hooks."""
    from datasets import Dataset

    from lab.trainer import DeltaLGRPOConfig, DeltaLGRPOTrainer

    model, tokenizer = load_model_and_tokenizer("tiny")
    args = DeltaLGRPOConfig(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, num_generations=4,
        max_completion_length=8, report_to=[], bf16=False, use_cpu=True, gradient_checkpointing=False,
        logging_steps=1, save_strategy="no", seed=0,
    )  # fmt: skip
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"Say {i}."}] for i in range(4)]})
    trainer = DeltaLGRPOTrainer(
        model=model,
        processing_class=tokenizer,
        reward_funcs=lambda completions, **kw: [float(len(c[0]["content"]) % 3) for c in completions],
        args=args,
        train_dataset=data,
        peft_config=lora_config("tiny"),
    )
    hook = make_probe_hook(every=1, n_bootstrap=10)
    trainer.generation_hooks.append(hook)
    trainer.train()
    assert len(hook.records) == 1 and hook.records[0]["step"] == 1
    assert len(hook.records[0]["grad_variances"]) == 4
    logged = [h for h in trainer.state.log_history if "probe/seconds" in h]
    assert logged, (
        "probe/* metrics did not reach TRL's log"
    )  # slope/corr are NaN (skipped) if all L_i are equal


# ---------------------------------------------------------------------------------------------------
# one batched backward: per-row gradients of the linear layers, and the four aggregators' gradients
# ---------------------------------------------------------------------------------------------------
def batch_args(batch):
    return tuple(batch[k] for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask"))


def test_linear_per_sample_gradients_equal_the_row_loop_on_lora(lora_model, batch, scores):
    """For a LoRA model every trainable parameter is an nn.Linear weight: the batched trick covers all of it."""
    grads, covered = linear_per_sample_gradients(lora_model, *batch_args(batch))
    assert covered == 1.0
    # the same parameters, possibly in another order: compare Gram matrices and per-row norms
    torch.testing.assert_close(grads.double() @ grads.double().T, scores.double() @ scores.double().T,
                               rtol=1e-4, atol=1e-6)  # fmt: skip
    assert grads[LENGTHS.index(0)].abs().max() == 0  # an empty completion has no gradient


def test_linear_per_sample_gradients_on_a_full_model_and_combined(batch):
    from lab.models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer("tiny")  # every weight trainable, tied LM head
    grads, covered = linear_per_sample_gradients(model, *batch_args(batch), advantages=batch["advantages"])
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert 0 < covered < 1 and covered == pytest.approx(
        sum(model.get_submodule(n).weight.numel() for n in linear)
        / sum(p.numel() for p in model.parameters())
    )
    rows = per_sample_gradients(model, *batch_args(batch), advantages=batch["advantages"])
    index = {name: p for name, p in model.named_parameters()}
    offsets, start = {}, 0
    for name, p in model.named_parameters():
        offsets[name] = (start, start + p.numel())
        start += p.numel()
    ref = torch.cat([rows[:, slice(*offsets[f"{n}.weight"])] for n in linear], dim=1)
    assert index  # (named_parameters order = module order for these layers)
    torch.testing.assert_close(grads, ref, rtol=1e-4, atol=1e-5)
    combine = torch.rand(3, len(LENGTHS), dtype=torch.float64)
    combined, _ = linear_per_sample_gradients(
        model, *batch_args(batch), advantages=batch["advantages"], combine=combine
    )
    torch.testing.assert_close(combined, combine.float() @ grads, rtol=1e-4, atol=1e-5)


def test_aggregator_gradient_stats_see_the_batch_scope_collinearity(lora_model, batch):
    from lab.aggregation import batch_weights

    L = batch["completion_mask"].sum(1)
    x = batch_weights(L, alpha=1.0, max_length=M)  # rows: grpo, dapo, dr_grpo, delta_l
    grads, _ = linear_per_sample_gradients(
        lora_model, *batch_args(batch), combine=x * batch["advantages"].double()
    )
    stats = aggregator_gradient_stats(grads)
    assert stats["agg_grad/cos/grpo~delta_l"] == pytest.approx(1.0, abs=1e-5)
    assert stats["agg_grad/cos/dapo~dr_grpo"] == pytest.approx(1.0, abs=1e-5)
    active = L[L > 0].double()
    # M·mean(1/L) over the responses that have tokens (lab.aggregation: empty rows do not count in G)
    expected = M * (1 / active).mean().item()
    assert stats["agg_grad/norm_ratio/grpo~delta_l"] == pytest.approx(expected, rel=1e-4)
    assert stats["agg_grad/cos/grpo~dapo"] < 0.9999
    x_group = batch_weights(L, alpha=1.0, max_length=M, delta_l_group_size=4)
    grads_group, _ = linear_per_sample_gradients(
        lora_model, *batch_args(batch), combine=x_group * batch["advantages"].double()
    )
    assert (
        aggregator_gradient_stats(grads_group)["agg_grad/cos/grpo~delta_l"] < 0.9999
    )  # group scope breaks it


def test_gradient_comparison_read_off_the_training_backward_is_exact(tmp_path):
    """The trainer's comparison (no extra pass) equals an explicit batched computation on the same batch."""
    from datasets import Dataset

    from lab.aggregation import batch_weights
    from lab.trainer import DeltaLGRPOConfig, DeltaLGRPOTrainer

    model, tokenizer = load_model_and_tokenizer("tiny")
    args = DeltaLGRPOConfig(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        steps_per_generation=2, num_generations=4, max_completion_length=8, report_to=[], bf16=False,
        use_cpu=True, gradient_checkpointing=False, logging_steps=1, save_strategy="no", seed=0,
        learning_rate=1e-12,  # the weights barely move, so step 1's batch can be recomputed after training
    )  # fmt: skip
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": f"Say {i}."}] for i in range(8)]})
    trainer = DeltaLGRPOTrainer(
        model=model, processing_class=tokenizer, args=args, train_dataset=data,
        reward_funcs=lambda completions, **kw: [float(len(c[0]["content"]) % 3) for c in completions],
    )  # fmt: skip
    trainer.compare_aggregator_gradients(every=1)
    batches, stats = [], []
    trainer.generation_hooks.append(lambda t, out: batches.append({k: v for k, v in out.items()}))
    original = trainer.gradient_comparison.after_backward
    trainer.gradient_comparison.after_backward = lambda t: stats.append(original(t))
    trainer.train()
    logged = [h for h in trainer.state.log_history if "agg_grad/cos/grpo~delta_l" in h]
    assert len(logged) == 2  # every step, over two micro-batches each
    done = [s for s in stats if s is not None]
    assert len(done) == 2
    for h in logged:
        assert h["agg_grad/cos/grpo~delta_l"] == pytest.approx(1.0, abs=1e-4)
        assert h["agg_grad/cos/dapo~dr_grpo"] == pytest.approx(1.0, abs=1e-4)
    batch = batches[0]
    L = batch["completion_mask"].sum(1)
    x = batch_weights(L, alpha=1.0, max_length=8)
    explicit, _ = linear_per_sample_gradients(
        trainer.model, batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], batch["completion_mask"],
        combine=x * batch["advantages"].double(),
    )  # fmt: skip
    expected = aggregator_gradient_stats(explicit)
    for key in (
        "agg_grad/cos/grpo~dapo",
        "agg_grad/norm_ratio/grpo~dapo",
        "agg_grad/norm_ratio/dr_grpo~delta_l",
    ):
        assert done[0][key] == pytest.approx(expected[key], rel=1e-3, abs=1e-5), key
    with pytest.raises(ValueError, match="every"):
        AggregatorGradientHook(0)
