"""lab.probes: per-sample gradients against autograd, statistics on synthetic gradients, the trainer hook."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from peft import get_peft_model

from lab.aggregation import estimator_stats, sequence_weights
from lab.models import load_model_and_tokenizer, lora_config
from lab.probes import (
    AggregatorGradientHook,
    aggregator_gradient_stats,
    bootstrap_cv,
    grad_variances,
    linear_per_sample_gradients,
    make_probe_hook,
    per_sample_gradients,
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


def test_variance_fit_recovers_var_proportional_to_length():
    lengths = torch.arange(10, 410, 5, dtype=torch.float64)  # 80 rows
    dim = 400
    stats = probe_statistics(synthetic_grads(lengths, dim), lengths, max_length=500, n_bootstrap=20)
    n = lengths.numel()
    assert stats["correlation"] > 0.95
    # E v_i = (1 - 2/n) dim L_i + dim mean(L)/n
    assert stats["slope"] == pytest.approx((1 - 2 / n) * dim, rel=0.1)
    assert stats["exponent"] == pytest.approx(1.0, abs=0.1)
    assert len(stats["grad_variances"]) == n and stats["n"] == n


def test_group_centering_removes_group_means():
    lengths = torch.tensor([10.0, 20.0, 30.0, 40.0])
    grads = torch.tensor([[1.0], [3.0], [10.0], [14.0]])
    v = grad_variances(grads, group_size=2)
    torch.testing.assert_close(v, torch.tensor([1.0, 1.0, 4.0, 4.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="group_size"):
        probe_statistics(grads, lengths, max_length=40, group_size=3)


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
    assert ratio_measured == pytest.approx(ratio_theory, rel=0.35)


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
    for name in ("probe/cv/delta_l", "probe/cv/grpo", "probe/var_length_slope", "probe/var_length_corr"):
        assert len(train[name]) == 1 and math.isfinite(train[name][0])
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
