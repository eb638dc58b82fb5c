"""DeltaLGRPOTrainer against TRL's own loss types on one fixed generation batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from trl import GRPOTrainer
from trl.trainer.utils import split_tensor_dict

from lab.aggregation import delta_l_row_weights
from lab.aggregators import AGGREGATORS
from lab.models import load_model_and_tokenizer, lora_config
from lab.trainer import DeltaLGRPOConfig, DeltaLGRPOTrainer
from tests.helpers import free_port

M = 16  # max_completion_length
LENGTHS = [16, 3, 9, 1, 12, 5, 7, 2]  # two groups of 4, varied on purpose


def prompts_dataset(n: int = 8) -> Dataset:
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": f"Count to {i}."}] for i in range(n)]})


def reward_by_length(completions, **kwargs):
    return [float(len(c[0]["content"]) % 5) for c in completions]


# One generation batch per optimizer step of 8 rows (2 prompts x 4 completions) on the tiny model, on CPU.
TINY_STEP = dict(
    per_device_train_batch_size=8,
    num_generations=4,
    max_completion_length=M,
    steps_per_generation=1,
    report_to=[],
    bf16=False,
    use_cpu=True,
    gradient_checkpointing=False,
    save_strategy="no",
    seed=0,
)


def make_trainer(tmp_path, loss_type="delta_l", alpha=1.0, trainer_cls=DeltaLGRPOTrainer, **overrides):
    model, tokenizer = load_model_and_tokenizer("tiny")
    config = dict(
        TINY_STEP,
        output_dir=str(tmp_path / loss_type),
        loss_type=loss_type,
        delta_l_alpha=alpha,
        logging_steps=1,
    )
    config.update(overrides)
    if trainer_cls is GRPOTrainer:
        from trl import GRPOConfig

        config.pop("delta_l_alpha")
        args = GRPOConfig(**config)
    else:
        from lab.speed import SpeedConfig, SpeedTrainer

        args = (SpeedConfig if issubclass(trainer_cls, SpeedTrainer) else DeltaLGRPOConfig)(**config)
    trainer = trainer_cls(
        model=model,
        processing_class=tokenizer,
        reward_funcs=reward_by_length,
        args=args,
        train_dataset=prompts_dataset(),
    )
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    return trainer


@pytest.fixture(scope="module")
def generation_batch(tmp_path_factory):
    """One real generation batch from the tiny model, with lengths and advantages fixed for the tests."""
    trainer = make_trainer(tmp_path_factory.mktemp("gen"))
    rows = [row for row in prompts_dataset(2) for _ in range(4)]
    batch = trainer._generate_and_score_completions(rows)
    mask = torch.zeros_like(batch["completion_mask"])
    for i, n in enumerate(LENGTHS):
        mask[i, :n] = 1
    batch["completion_mask"] = mask
    batch["num_items_in_batch"] = mask.sum()  # DAPO's normalizer: the tokens of the whole generation batch
    batch["advantages"] = torch.tensor([1.0, -0.5, 0.25, -1.0, 0.8, -0.3, 0.6, -1.2])
    batch.pop("delta_l_weights", None)
    return batch


def loss_and_grad(trainer, batch, splits=1):
    """Summed loss and flat gradient of one generation batch split into `splits` micro-batches."""
    batch = dict(batch)
    if isinstance(trainer, DeltaLGRPOTrainer):
        trainer.attach_delta_l_weights(batch)
    trainer.model.zero_grad(set_to_none=True)
    trainer.current_gradient_accumulation_steps = splits
    total = 0.0
    for part in split_tensor_dict(batch, splits):
        loss = trainer._compute_loss(trainer.model, part)
        loss.backward()
        total += loss.item()
    grad = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])
    return total, grad


def test_alpha_zero_equals_dr_grpo(tmp_path, generation_batch):
    trainer = make_trainer(tmp_path, alpha=0.0)
    loss_dl, grad_dl = loss_and_grad(trainer, generation_batch)
    trainer.loss_type = "dr_grpo"
    loss_dr, grad_dr = loss_and_grad(trainer, generation_batch)
    assert loss_dl == pytest.approx(loss_dr, rel=1e-6, abs=1e-9)
    torch.testing.assert_close(grad_dl, grad_dr, rtol=1e-5, atol=1e-8)
    assert grad_dl.norm() > 0


def test_alpha_one_is_parallel_to_grpo(tmp_path, generation_batch):
    trainer = make_trainer(tmp_path, alpha=1.0)
    _, grad_dl = loss_and_grad(trainer, generation_batch)
    trainer.loss_type = "grpo"
    _, grad_grpo = loss_and_grad(trainer, generation_batch)
    cosine = torch.nn.functional.cosine_similarity(grad_dl, grad_grpo, dim=0).item()
    assert cosine >= 0.9999
    L = torch.tensor(LENGTHS, dtype=torch.float64)
    expected_ratio = 1 / (M * (1 / L).mean()).item()
    assert (grad_dl.norm() / grad_grpo.norm()).item() == pytest.approx(expected_ratio, rel=1e-4)


@pytest.mark.parametrize(("a", "b"), [("grpo", "delta_l"), ("dapo", "dr_grpo")])
def test_equalized_step_size_makes_each_collinear_pair_one_gradient(tmp_path, generation_batch, a, b):
    """Batch scope: x(GRPO) = M·mean(1/L)·x(ΔL α=1) and x(DAPO) = (N·M/ΣL)·x(Dr. GRPO) on every row, so with the
    per-batch scalar divided out (equalize_step_size) each pair takes exactly the same step."""
    grads = {}
    for loss_type in (a, b):
        trainer = make_trainer(tmp_path, loss_type=loss_type, alpha=1.0, equalize_step_size=True)
        _, grads[loss_type] = loss_and_grad(trainer, generation_batch)
    torch.testing.assert_close(grads[a], grads[b], rtol=1e-4, atol=1e-8)
    raw = make_trainer(tmp_path, loss_type=a, alpha=1.0)
    _, grad_raw = loss_and_grad(raw, generation_batch)
    L = torch.tensor(LENGTHS, dtype=torch.float64)
    scale = {"grpo": M * (1 / L).mean(), "dapo": len(LENGTHS) * M / L.sum()}[a].item()
    assert (grad_raw.norm() / grads[a].norm()).item() == pytest.approx(scale, rel=1e-4)
    assert raw._metrics["train"]["aggregator/relative_scale"][-1] == pytest.approx(scale)


def test_group_scope_breaks_the_collinearity(tmp_path, generation_batch):
    _, grad_group = loss_and_grad(make_trainer(tmp_path, alpha=1.0, delta_l_scope="group"), generation_batch)
    _, grad_grpo = loss_and_grad(make_trainer(tmp_path, loss_type="grpo"), generation_batch)
    cosine = torch.nn.functional.cosine_similarity(grad_group, grad_grpo, dim=0).item()
    assert cosine < 0.999  # per prompt, the weights no longer differ from GRPO's by one scalar


@pytest.mark.parametrize("splits", [2, 4])
def test_micro_batch_split_does_not_change_the_gradient(tmp_path, generation_batch, splits):
    trainer = make_trainer(tmp_path, alpha=1.0)
    loss_1, grad_1 = loss_and_grad(trainer, generation_batch, splits=1)
    loss_k, grad_k = loss_and_grad(trainer, generation_batch, splits=splits)
    assert loss_k == pytest.approx(loss_1, rel=1e-5, abs=1e-8)
    torch.testing.assert_close(grad_k, grad_1, rtol=1e-4, atol=1e-7)


def test_weights_follow_lengths_and_scope(tmp_path, generation_batch):
    trainer = make_trainer(tmp_path, alpha=0.75, delta_l_scope="group")
    batch = dict(generation_batch)
    lengths, weights = trainer.attach_delta_l_weights(batch)
    assert lengths.tolist() == LENGTHS
    torch.testing.assert_close(weights, delta_l_row_weights(LENGTHS, alpha=0.75, max_length=M, group_size=4))
    torch.testing.assert_close(batch["delta_l_weights"], weights.float())


@pytest.mark.parametrize("name", [a.name for a in AGGREGATORS.values() if a.loss_type != "delta_l"])
def test_other_loss_types_are_trl_unchanged(tmp_path, generation_batch, name):
    """Every registry entry that is TRL's own (its loss types, GSPO) gives TRL's loss and gradient."""
    entry = AGGREGATORS[name]
    ours = make_trainer(tmp_path / "ours", loss_type=entry.loss_type, **entry.trl_settings)
    theirs = make_trainer(
        tmp_path / "trl", loss_type=entry.loss_type, trainer_cls=GRPOTrainer, **entry.trl_settings
    )
    theirs.model.load_state_dict(ours.model.state_dict())
    loss_a, grad_a = loss_and_grad(ours, generation_batch)
    loss_b, grad_b = loss_and_grad(theirs, generation_batch)
    assert loss_a == pytest.approx(loss_b, rel=1e-7)
    torch.testing.assert_close(grad_a, grad_b)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(loss_type="delta"), "'delta'"),
        (dict(delta_l_alpha=-1.0), "-1.0"),
        (dict(delta_l_alpha=float("nan")), "nan"),
        (dict(delta_l_scope="prompt"), "'prompt'"),
        (dict(loss_type="bnpo", equalize_step_size=True), "'bnpo'"),
    ],
)
def test_config_rejects_bad_values_at_build_time(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        DeltaLGRPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, **overrides)


def test_two_step_lora_run_logs_delta_l_stats(tmp_path):
    trainer = make_trainer(
        tmp_path, max_steps=2, per_device_train_batch_size=4, steps_per_generation=2, max_completion_length=8
    )
    model, tokenizer = load_model_and_tokenizer("tiny")
    trainer = DeltaLGRPOTrainer(
        model=model,
        processing_class=tokenizer,
        reward_funcs=reward_by_length,
        args=trainer.args,
        train_dataset=prompts_dataset(),
        peft_config=lora_config("tiny"),
    )
    trainer.train()
    assert trainer.state.global_step == 2
    logged = [h for h in trainer.state.log_history if "delta_l/weight_mean" in h]
    assert logged and all(h["delta_l/weight_mean"] == pytest.approx(1.0) for h in logged)
    assert {"delta_l/weight_min", "delta_l/weight_max", "delta_l/effective_sample_fraction"} <= set(logged[0])
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainer.generation_records) == 1 and len(trainer.generation_records[0]["weights"]) == 8


DIST_SCRIPT = r"""
import json, os, sys, torch
torch.set_num_threads(1)
sys.path.insert(0, os.environ["LAB_TEST_DIR"])
sys.path.insert(0, os.path.dirname(os.environ["LAB_TEST_DIR"]))
from test_trainer import make_trainer, prompts_dataset
from pathlib import Path
trainer = make_trainer(Path(sys.argv[1]), alpha=1.0, per_device_train_batch_size=4)
rank = trainer.accelerator.process_index
rows = [row for row in prompts_dataset(2) for _ in range(4)][rank * 4:(rank + 1) * 4]
batch = trainer._generate_and_score_completions(rows)
lengths = [[16, 3, 9, 1], [12, 5, 7, 2]][rank]
mask = torch.zeros_like(batch["completion_mask"])
for i, n in enumerate(lengths):
    mask[i, :n] = 1
batch["completion_mask"] = mask
all_lengths, weights = trainer.attach_delta_l_weights(batch)
out = {"rank": rank, "world": trainer.accelerator.num_processes, "all_lengths": all_lengths.tolist(),
       "local_weights": batch["delta_l_weights"].tolist()}
Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps(out))
torch.distributed.destroy_process_group()  # gloo aborts at exit if its threads are still up
"""


@pytest.mark.slow
def test_two_processes_compute_the_same_weights_as_one(tmp_path):
    script = tmp_path / "dist_weights.py"
    script.write_text(DIST_SCRIPT)
    env = {**os.environ, "LAB_TEST_DIR": str(Path(__file__).parent), "OMP_NUM_THREADS": "1"}
    # torchrun sets the rank variables; Accelerate picks them up and uses the gloo backend on CPU.
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(script),
        str(tmp_path),
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks)
    assert ranks[0]["all_lengths"] == ranks[1]["all_lengths"] == LENGTHS
    two_process = torch.tensor(ranks[0]["local_weights"] + ranks[1]["local_weights"])
    one_process = delta_l_row_weights(LENGTHS, alpha=1.0, max_length=M).float()
    torch.testing.assert_close(two_process, one_process)


def test_importing_the_trainer_patches_nothing():
    """lab.trainer (and lab.speed) change no TRL or transformers internals at import (a fresh interpreter)."""
    code = (
        "import trl.trainer.utils as u; from transformers.integrations import sdpa_attention as s\n"
        "before = (u._use_triton, s.use_gqa_in_sdpa)\n"
        "import lab.trainer, lab.speed, lab.runner\n"
        "assert (u._use_triton, s.use_gqa_in_sdpa) == before, 'patched at import'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
