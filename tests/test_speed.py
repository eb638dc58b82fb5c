"""The lab's speed paths (lab.speed): each prompt once, LoRA dtypes kept, the CPU patches; exact against TRL."""

from __future__ import annotations

import pytest
import torch
import trl.trainer.utils as trl_utils
from datasets import Dataset
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.integrations import sdpa_attention
from trl import GRPOTrainer

from lab.models import load_model_and_tokenizer, lora_config
from lab.speed import SpeedConfig, SpeedTrainer, apply_cpu_patches, cpu_patches, distinct_rows
from tests.test_trainer import TINY_STEP, generation_batch, loss_and_grad, make_trainer, reward_by_length  # noqa: F401


def test_cpu_patches_apply_and_undo():
    before = (trl_utils._use_triton, sdpa_attention.use_gqa_in_sdpa)
    with cpu_patches():
        assert trl_utils._use_triton(torch.device("cpu"))
        assert (trl_utils._use_triton, sdpa_attention.use_gqa_in_sdpa) != before
    assert (trl_utils._use_triton, sdpa_attention.use_gqa_in_sdpa) == before
    with cpu_patches(enabled=False):
        assert (trl_utils._use_triton, sdpa_attention.use_gqa_in_sdpa) == before


def test_speed_trainer_with_switches_off_is_the_delta_l_trainer(tmp_path, generation_batch):  # noqa: F811
    plain = make_trainer(tmp_path / "plain")
    fast = make_trainer(tmp_path / "speed", trainer_cls=SpeedTrainer)
    batch = {k: v.clone() if torch.is_tensor(v) else v for k, v in generation_batch.items()}
    loss_a, grad_a = loss_and_grad(plain, batch)
    loss_b, grad_b = loss_and_grad(fast, batch)
    assert loss_a == loss_b and torch.equal(grad_a, grad_b)


def test_cpu_compacted_lm_head_gives_exact_log_probs(tmp_path, generation_batch):  # noqa: F811 (the fixture of tests.test_trainer)
    """lab.speed.cpu_patches make TRL's fused LM head score only completion positions on CPU; check it against
    logits."""
    trainer = make_trainer(tmp_path, trainer_cls=SpeedTrainer)
    b = generation_batch
    input_ids = torch.cat([b["prompt_ids"], b["completion_ids"]], dim=1)
    attention_mask = torch.cat([b["prompt_mask"], b["completion_mask"]], dim=1)
    keep = b["completion_ids"].size(1)
    with torch.no_grad(), cpu_patches():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, input_ids, attention_mask, keep
        )
        logits = trainer.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -keep - 1 : -1]
        expected = torch.log_softmax(logits / trainer.temperature, dim=-1)
        expected = expected.gather(-1, b["completion_ids"].unsqueeze(-1)).squeeze(-1)
    mask = b["completion_mask"].bool()
    torch.testing.assert_close(logps[mask], expected[mask], rtol=1e-4, atol=1e-4)


# -- each prompt once: exact against TRL's own path ---------------------------------------------------------
def sharing_trainer(tmp_path, share: bool, **overrides):
    """LoRA on the tiny model, two prompts of different token lengths (left padding) × 4 completions."""
    model, tokenizer = load_model_and_tokenizer("tiny")
    prompts = ["Count to 3.", "Count from one to twelve, then back down to one."]
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in prompts]})
    config = dict(
        TINY_STEP,
        output_dir=str(tmp_path / f"share-{share}"),
        prefill_prompts_once=share,
        forward_prompts_once=share,
    )
    args = SpeedConfig(**{**config, **overrides})
    trainer = SpeedTrainer(
        model=model,
        processing_class=tokenizer,
        reward_funcs=reward_by_length,
        args=args,
        train_dataset=data,
        peft_config=lora_config("tiny"),
    )
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    return trainer, [row for row in data for _ in range(4)]


def test_continuous_batching_gives_the_model_its_float32_adapters_back(tmp_path):
    """TRL's continuous-batching path casts the whole model to bf16 (under bf16=True) before it generates; the
    lab's trainer gives back the exact float32 LoRA weights and buffers, so training does not go on in bf16."""
    small_cache = {"page_size": 32, "num_blocks": 16, "max_batch_tokens": 256}  # not half the RAM
    trainer, _ = sharing_trainer(
        tmp_path,
        share=False,
        use_transformers_continuous_batching=True,
        transformers_continuous_batching_config=small_cache,
    )
    trainer.args.bf16 = True  # the cast TRL makes on a GPU (it reads the flag when it generates)
    model = trainer.model
    state = lambda: {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}  # noqa: E731
    before = state()
    assert {t.dtype for t in before.values()} == {torch.float32}
    prompts = [[5, 6, 7, 8]] * 4 + [[9, 10]] * 4
    completions, _ = trainer._generate_single_turn(prompts, None, {}, 4)
    assert len(completions) == 8 and all(completions)
    after = state()
    assert after.keys() == before.keys()
    assert all(after[n].dtype == before[n].dtype and torch.equal(after[n], before[n]) for n in before)
    GRPOTrainer._generate_single_turn(trainer, prompts, None, {}, 4)  # TRL's own: the cast stays
    assert {t.dtype for t in state().values()} == {torch.bfloat16}


@pytest.mark.parametrize("cache", [None, "static"])
def test_each_prompt_once_gives_the_same_completions_and_gradients(tmp_path, cache):
    results = {}
    for share in (False, True):
        trainer, rows = sharing_trainer(tmp_path, share, cache_implementation=cache)
        torch.manual_seed(0)
        with torch.no_grad():
            batch = trainer._generate_and_score_completions(rows)
        batch["advantages"] = torch.linspace(-1.0, 1.0, len(rows))
        generation_shared = trainer.prompt_rows_shared
        loss, grad = loss_and_grad(trainer, batch, splits=2)
        results[share] = batch, loss, grad, generation_shared, trainer.prompt_rows_shared - generation_shared
    (plain, loss_plain, grad_plain, *_), (shared, loss_shared, grad_shared, gen_rows, loss_rows) = (
        results[False],
        results[True],
    )
    assert set(plain["prompt_mask"].sum(1).tolist()) == {35, 42}  # left padding is exercised
    assert (gen_rows, loss_rows) == (6, 6)  # 8 rows of 2 prompts; 2 micro-batches of 4 rows, 1 prompt each
    assert results[False][3] == 0
    assert torch.equal(plain["completion_ids"], shared["completion_ids"])  # same samples, same seed
    assert loss_shared == pytest.approx(loss_plain, rel=1e-5, abs=1e-8)
    assert grad_plain.norm() > 0
    torch.testing.assert_close(grad_shared, grad_plain, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("share", [False, True])
def test_each_prompt_once_cuts_micro_batches_by_prompt(tmp_path, share):
    """With forward_prompts_once the generation batch is split unshuffled (one prompt per micro-batch here),
    otherwise TRL shuffles it; either way the step's gradient is the same."""
    split = dict(per_device_train_batch_size=4, steps_per_generation=2, gradient_accumulation_steps=2)
    trainer, rows = sharing_trainer(tmp_path, share, **split)
    torch.manual_seed(0)
    parts = []
    for step in range(2):
        trainer._step = step
        parts.append(trainer._prepare_inputs(rows))
    prompts = [{tuple(r) for r in part["prompt_ids"].tolist()} for part in parts]
    if share:
        assert [len(p) for p in prompts] == [1, 1] and prompts[0] != prompts[1]
    batch = {
        k: torch.cat([p[k] for p in parts]) for k, v in parts[0].items() if torch.is_tensor(v) and v.dim()
    }
    batch["advantages"] = torch.linspace(-1.0, 1.0, len(rows))
    _, grad_parts = loss_and_grad(trainer, batch, splits=2)  # the micro-batches as _prepare_inputs cut them
    mixed = {k: v[[0, 4, 1, 5, 2, 6, 3, 7]] if v.size(0) == len(rows) else v for k, v in batch.items()}
    _, grad_mixed = loss_and_grad(trainer, mixed, splits=2)
    torch.testing.assert_close(grad_parts, grad_mixed, rtol=1e-4, atol=1e-7)


def test_each_prompt_once_log_probs_and_entropies_match_trl(tmp_path):
    trainer, rows = sharing_trainer(tmp_path, share=True)
    with torch.no_grad():
        b = trainer._generate_and_score_completions(rows)
    input_ids = torch.cat([b["prompt_ids"], b["completion_ids"]], dim=1)
    attention_mask = torch.cat([b["prompt_mask"], b["completion_mask"]], dim=1)
    keep = b["completion_ids"].size(1)
    outputs = {}
    for share in (True, False):
        trainer.args.forward_prompts_once = share
        with torch.no_grad():
            outputs[share] = trainer._get_per_token_logps_and_entropies(
                trainer.model, input_ids, attention_mask, keep, batch_size=3, compute_entropy=True
            )
    mask = b["completion_mask"].bool()
    for shared, plain in zip(outputs[True][:2], outputs[False][:2], strict=True):
        assert shared.shape == plain.shape == mask.shape
        torch.testing.assert_close(shared[mask], plain[mask], rtol=1e-4, atol=1e-5)


@given(st.lists(st.integers(0, 3), min_size=1, max_size=12))
@settings(max_examples=50, deadline=None)
def test_distinct_rows_maps_every_row_to_its_first_copy(keys):
    ids = torch.tensor([[k, k % 2, 7] for k in keys])
    mask = torch.tensor([[int(k > 1), 1, 1] for k in keys])
    firsts, inverse = distinct_rows(ids, mask)
    assert torch.equal(ids[firsts][inverse], ids) and torch.equal(mask[firsts][inverse], mask)
    assert sorted(firsts.tolist()) == [keys.index(k) for k in sorted(set(keys), key=keys.index)]


def test_grouped_query_sdpa_on_cpu_gives_the_same_logits_and_gradients(monkeypatch):
    """lab.speed.cpu_patches let CPU SDPA take grouped key/value heads with a padding mask (no repeat_kv copy)."""
    from transformers.integrations import sdpa_attention

    original = sdpa_attention.use_gqa_in_sdpa
    monkeypatch.setattr(sdpa_attention, "use_gqa_in_sdpa", original)  # restored whatever happens
    undo = apply_cpu_patches()

    model, _ = load_model_and_tokenizer("tiny")  # 4 query heads on 2 key/value heads
    ids = torch.randint(3, 1000, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4] = mask[1, :1] = 0  # left padding
    k = torch.randn(1, 2, 2, 8)
    assert sdpa_attention.use_gqa_in_sdpa(torch.ones(1, 1, 2, 2, dtype=torch.bool), k, k)
    assert not sdpa_attention.use_gqa_in_sdpa(
        torch.ones(1, 1, 1, 2, dtype=torch.bool), k, k
    )  # one query: packed
    results = []
    for patched in (True, False):
        if not patched:
            undo()
            assert sdpa_attention.use_gqa_in_sdpa is original
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, attention_mask=mask).logits
        logits[mask.bool()].square().mean().backward()
        results.append(
            (logits.detach()[mask.bool()], model.model.layers[0].self_attn.k_proj.weight.grad.clone())
        )
    assert not sdpa_attention.use_gqa_in_sdpa(torch.ones(1, 1, 2, 2, dtype=torch.bool), k, k)
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-7)
