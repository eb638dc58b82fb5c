"""Evaluation metrics, sampling on the tiny model, and the task rewards inside a real GRPOTrainer step."""

from __future__ import annotations

import inspect
import math
from itertools import combinations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lab.evaluation import (
    avg_at_k,
    evaluate_model,
    learning_signal,
    monotonicity_score,
    pass_at_k,
    render_prompt,
    sample_completions,
)
from lab.tasks import get_task

torch.set_num_threads(1)  # one thread, like the lab's CPU runs (small models gain nothing from more)


# ------------------------------------------------------------------------------------------ pass@k


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that a random k-subset of n samples (c correct) holds a correct one, by enumeration."""
    subsets = list(combinations([1] * c + [0] * (n - c), k))
    return sum(any(s) for s in subsets) / len(subsets)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 10).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_matches_enumeration(nck: tuple[int, int, int]) -> None:
    n, c, k = nck
    assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 200).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_bounds_and_monotone(nck: tuple[int, int, int]) -> None:
    n, c, k = nck
    p = pass_at_k(n, c, k)
    assert 0.0 <= p <= 1.0
    if k < n:
        assert pass_at_k(n, c, k + 1) >= p - 1e-12
    if c < n:
        assert pass_at_k(n, c + 1, k) >= p - 1e-12


def test_pass_at_k_edges() -> None:
    assert pass_at_k(8, 0, 8) == 0.0
    assert pass_at_k(8, 1, 8) == 1.0
    assert pass_at_k(8, 8, 1) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(4, 2, 2) == pytest.approx(5 / 6)


@pytest.mark.parametrize(
    ("n", "c", "k", "match"),
    [
        (4, 1, 5, "k must be <= n"),
        (4, 5, 2, "c "),
        (0, 0, 1, "n must"),
        (4, -1, 1, "c must"),
        (4, 1, 0, "k must"),
        (4.0, 1, 1, "n must"),
        (True, 1, 1, "n must"),
    ],
)
def test_pass_at_k_bad_values(n, c, k, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        pass_at_k(n, c, k)


def test_avg_at_k() -> None:
    assert avg_at_k([1, 0, 1, 0]) == 0.5
    assert avg_at_k([1.0]) == 1.0
    with pytest.raises(ValueError, match="empty"):
        avg_at_k([])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        avg_at_k([2.0])


# ------------------------------------------------------------------------------------------ monotonicity


def test_monotonicity_edges() -> None:
    assert monotonicity_score([0, 1, 2, 3], [0.1, 0.2, 0.3, 0.4]) == 1.0  # strictly rising
    assert monotonicity_score([0, 1, 2, 3], [0.4, 0.3, 0.2, 0.1]) == 0.0  # falling: the lowest
    assert monotonicity_score([0, 1, 2], [0.5, 0.5, 0.5]) == 0.5  # constant: neutral
    assert monotonicity_score([7], [0.3]) == 0.5  # one point: neutral
    assert monotonicity_score([0, 1, 2, 3], [0.1, 0.1, 0.2, 0.2]) == 1.0  # plateaus never fall
    noisy = monotonicity_score([0, 1, 2, 3], [0.1, 0.4, 0.3, 0.6])
    assert noisy == pytest.approx(0.6 / 0.7)
    assert 0.0 < noisy < 1.0
    # unsorted steps are sorted first
    assert monotonicity_score([3, 1, 2, 0], [0.4, 0.2, 0.3, 0.1]) == 1.0


def test_monotonicity_noise_ranks_between() -> None:
    steps = list(range(10))
    rising = [0.1 * s for s in steps]
    slightly_noisy = [v + (0.03 if s % 2 else 0.0) for s, v in zip(steps, rising, strict=True)]
    very_noisy = [v + (0.3 if s % 2 else 0.0) for s, v in zip(steps, rising, strict=True)]
    falling = rising[::-1]
    scores = [monotonicity_score(steps, v) for v in (rising, slightly_noisy, very_noisy, falling)]
    assert scores == sorted(scores, reverse=True) and scores[0] == 1.0 and scores[-1] == 0.0


@pytest.mark.parametrize(
    ("steps", "values", "match"),
    [
        ([0, 1], [0.1, math.nan], "finite"),
        ([0, math.inf], [0.1, 0.2], "finite"),
        ([0, 1], [0.1], "same length"),
        ([], [], "at least one"),
        ([0, 0], [0.1, 0.2], "distinct"),
    ],
)
def test_monotonicity_bad_input(steps, values, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        monotonicity_score(steps, values)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=30))
def test_monotonicity_range_and_mirror(values: list[float]) -> None:
    steps = list(range(len(values)))
    up = monotonicity_score(steps, values)
    down = monotonicity_score(steps, [-v for v in values])
    assert 0.0 <= up <= 1.0
    assert up + down == pytest.approx(1.0)  # mirroring a curve swaps rises and falls


# ------------------------------------------------------------------------------------------ sampling


@pytest.fixture(scope="module")
def tiny():
    from lab.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("tiny")
    return model.eval(), tokenizer


def test_render_prompt(tiny) -> None:
    _, tok = tiny
    assert render_prompt("raw text", tok) == "raw text"
    chat = render_prompt([{"role": "user", "content": "hi"}], tok)
    assert chat.endswith("<|im_start|>assistant\n")
    prefilled = render_prompt(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Let me"}], tok
    )
    assert prefilled.endswith("<|im_start|>assistant\nLet me")
    with pytest.raises(ValueError, match="at least one message"):
        render_prompt([], tok)


def test_sample_completions_shapes(tiny) -> None:
    model, tok = tiny
    texts, lengths = sample_completions(
        model,
        tok,
        ["a", [{"role": "user", "content": "b"}], "c"],
        num_samples=3,
        max_new_tokens=5,
        batch_size=4,
        seed=0,
    )
    assert [len(t) for t in texts] == [3, 3, 3]
    assert all(1 <= n <= 5 for row in lengths for n in row)
    again, _ = sample_completions(
        model,
        tok,
        ["a", [{"role": "user", "content": "b"}], "c"],
        num_samples=3,
        max_new_tokens=5,
        batch_size=4,
        seed=0,
    )
    assert again == texts  # seeded
    with pytest.raises(ValueError, match="temperature"):
        sample_completions(model, tok, ["a"], num_samples=1, max_new_tokens=2, temperature=0)


class FakeTask:
    """Scores a completion 1 when it has an even number of characters: mixed groups, deterministic."""

    name = "fake"

    def score(self, completion, **columns) -> float:
        return float(len(completion) % 2 == 0)

    def reward_funcs(self, *, shaped: bool = False):
        def even_reward(completions, **kwargs):
            return [self.score(c) for c in completions]

        return [even_reward]


def test_evaluate_model_and_learning_signal(tiny) -> None:
    model, tok = tiny
    task = get_task("countdown")
    data = task.eval_dataset(3, seed=0, chat=True, num_numbers=2)
    result = evaluate_model(model, tok, data, task, k=4, max_new_tokens=6)
    assert result["k"] == 4 and result["num_prompts"] == 3 and len(result["per_prompt"]) == 3
    assert result["avg@k"] == 0.0 and result["pass@k"] == 0.0  # a random model never solves CountDown
    assert all(len(p["scores"]) == 4 for p in result["per_prompt"])

    signal = learning_signal(model, tok, data, FakeTask(), num_generations=6, max_new_tokens=6, seed=1)
    assert signal["num_prompts"] == 3 and 0.0 <= signal["fraction_mixed_groups"] <= 1.0
    assert signal["fraction_mixed_groups"] == signal["fraction_mixed_binary"]
    assert signal["fraction_mixed_groups"] + signal["fraction_all_correct"] + signal[
        "fraction_all_wrong"
    ] == pytest.approx(1.0)
    real = learning_signal(model, tok, data, task, num_generations=2, max_new_tokens=4, shaped=True)
    assert real["fraction_all_wrong"] == 1.0 and real["mean_score"] == 0.0


# ------------------------------------------------------------------------------------------ TRL


@pytest.mark.parametrize("task_name", ["countdown", "math"])
def test_reward_functions_have_trl_signature(task_name: str) -> None:
    for func in get_task(task_name).reward_funcs(shaped=True):
        params = inspect.signature(func).parameters
        assert "completions" in params
        assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())  # TRL passes extras
        extras = dict(
            prompts=["p"], completion_ids=[[1]], trainer_state=None, log_extra=None, log_metric=None
        )
        cols = {"numbers": [[1, 2]], "target": [3]} if task_name == "countdown" else {"answer": ["3"]}
        out = func(completions=[[{"role": "assistant", "content": "junk"}]], **cols, **extras)
        assert isinstance(out, list) and len(out) == 1 and isinstance(out[0], float)


@pytest.mark.parametrize(("task_name", "shaped"), [("countdown", True), ("math", False)])
def test_rewards_inside_one_grpo_step(tmp_path, task_name: str, shaped: bool) -> None:
    from trl import GRPOConfig, GRPOTrainer

    from lab.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer("tiny")
    task = get_task(task_name)
    data = task.train_dataset(4, seed=0, chat=True)
    config = GRPOConfig(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
        report_to=[],
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        logging_steps=1,
        save_strategy="no",
    )
    trainer = GRPOTrainer(
        model=model,
        processing_class=tok,
        reward_funcs=task.reward_funcs(shaped=shaped),
        args=config,
        train_dataset=data,
    )
    trainer.train()
    logged = {k for entry in trainer.state.log_history for k in entry}
    for func in task.reward_funcs(shaped=shaped):
        assert f"rewards/{func.__name__}/mean" in logged
