"""The paper-world task: verifier, tokenizer, model build, and its variance structure on a small batch."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lab.models import BUILD_INFO, PAPERWORLD_BUILD, paperworld_model_dir, paperworld_tokenizer
from lab.runner import HELDOUT_METRIC, RunConfig, heldout_reward
from lab.tasks import get_task
from lab.tasks.paperworld import (
    MAX_COMPLETION_LENGTH,
    MAX_FILLERS,
    SYMBOLS,
    VOCAB,
    answer_of,
    completion,
    extract_answer,
    filler_count,
    generate_problems,
    heldout_problems,
    paperworld_reward,
    prompt_text,
    score,
    split_problems,
)

TOKENIZER = paperworld_tokenizer()
problems = st.tuples(st.integers(0, 9), st.integers(0, 9)).map(list)
symbol_lists = st.lists(st.sampled_from(SYMBOLS), max_size=MAX_FILLERS)


@given(problems, symbol_lists)
def test_the_right_answer_scores_one_whatever_the_fillers(problem, symbols):
    text = completion(answer_of(problem), symbols)
    assert score(text, problem) == 1.0
    assert filler_count(text) == len(symbols)
    assert len(TOKENIZER(text)["input_ids"]) + 1 == len(symbols) + 2  # + <eos>: L = k + 2


@given(problems, symbol_lists, st.integers(0, 9))
def test_a_wrong_answer_scores_zero_whatever_the_fillers(problem, symbols, wrong):
    if wrong == answer_of(problem):
        wrong = (wrong + 1) % 10
    assert score(completion(wrong, symbols), problem) == 0.0


def test_the_fillers_are_never_graded():
    # a miscounted, truncated or garbled tail costs nothing: otherwise the length would carry reward
    for tail in ("", " a1", " a5 b9", " 7 7 7", " <unk> =", " d30 d29"):
        assert score(f"5{tail}", [3, 5]) == 1.0
    assert filler_count("5 a5 b9") is None and filler_count("5 b2 a1") == 2


@pytest.mark.parametrize("text", ["", "a1 5", "=", "x", "12", "５", " "])
def test_malformed_completions_score_zero_without_crashing(text):
    assert extract_answer(text) is None
    assert score(text, [3, 5]) == 0.0


def test_reward_function_accepts_trl_columns():
    assert paperworld_reward(["5 a1", "3", "9 c2 b1"], problem=[[3, 5], [3, 5], [9, 0]]) == [1.0, 0.0, 1.0]


@pytest.mark.parametrize("bad", [[1], [1, 2, 3], [10, 1], [-1, 2], [1.5, 2], [True, 1]])
def test_bad_problems_are_named(bad):
    with pytest.raises(ValueError, match="two digits"):
        prompt_text(bad)


def test_bad_fillers_are_named():
    with pytest.raises(ValueError, match="'z'"):
        completion(3, ["a", "z"])
    with pytest.raises(ValueError, match="at most"):
        completion(3, ["a"] * (MAX_FILLERS + 1))
    with pytest.raises(ValueError, match="digit"):
        completion(10, [])


def test_splits_are_disjoint_and_the_eval_set_is_fixed():
    train, held = split_problems("train"), split_problems("eval")
    assert len(train) + len(held) == 100 and not {tuple(p) for p in train} & {tuple(p) for p in held}
    assert held, "the hash split must hold some problems out"
    assert generate_problems(40, seed=1) == generate_problems(40, seed=1) != generate_problems(40, seed=2)
    assert all(p in train for p in generate_problems(200, seed=0))
    task = get_task("paperworld")
    a = task.eval_dataset(30, seed=0, chat=False)
    b = task.eval_dataset(30, seed=7, chat=False)
    assert a["problem"] == b["problem"] == heldout_problems(30)  # the same for every seed and aggregator
    with pytest.raises(ValueError, match="no options"):
        task.train_dataset(4, seed=0, chat=False, min_digits=2)


def test_vocabulary_is_one_token_per_word():
    assert len(VOCAB) == len(set(VOCAB)) == len(TOKENIZER)
    ids = TOKENIZER("7 c3 a2 b1")["input_ids"]
    assert TOKENIZER.convert_ids_to_tokens(ids) == ["7", "c3", "a2", "b1"]


def test_the_preset_pairs_the_task_with_its_model_and_evaluates_by_default():
    c = RunConfig(preset="paper-world").resolved()
    assert (c.task, c.model, c.max_completion_length) == (
        "paperworld",
        "paperworld-tiny",
        MAX_COMPLETION_LENGTH,
    )
    assert c.eval_prompts > 0 and RunConfig(task="paperworld").resolved().preset == "paper-world"
    assert RunConfig().resolved().eval_prompts > 0  # the fast preset too
    with pytest.raises(ValueError, match=r"knows only the 'digitsum' task|needs the 'paperworld-tiny' model"):
        RunConfig(task="paperworld", model="digitsum-tiny").resolved()
    with pytest.raises(ValueError, match="knows only the 'paperworld' task"):
        RunConfig(task="countdown", model="paperworld-tiny").resolved()


def test_heldout_reward_and_its_sampling_error():
    per_prompt = [{"scores": [1.0, 0.0, 1.0, 0.0]}, {"scores": [1.0, 1.0, 1.0, 1.0]}]
    mean, se = heldout_reward(per_prompt)
    assert mean == pytest.approx(0.75)
    assert se == pytest.approx(math.sqrt(0.25 / 3) / 2)  # the all-right prompt has no sampling error
    assert HELDOUT_METRIC == "eval/heldout_reward"


@pytest.fixture(scope="module")
def model_dir():
    return paperworld_model_dir()  # built once by scripts/setup.sh (about a minute on one thread)


def test_the_model_build_is_recorded_and_mid_range(model_dir):
    info = json.loads((model_dir / BUILD_INFO).read_text())
    assert info["build"] == PAPERWORLD_BUILD
    assert 0.35 <= info["accuracy"] <= 0.65  # groups have a reward spread
    assert abs(info["accuracy_short"] - info["accuracy_long"]) < 0.05  # length says nothing about reward
    assert info["group_length_ratio_median"] >= 5  # broad lengths within a group
    assert info["well_formed"] > 0.7


def test_variance_structure_on_a_small_batch(model_dir):
    """Score-function variance grows with length (about linearly), and the advantage does not."""
    from lab.models import load_model_and_tokenizer
    from lab.probes import (
        grad_variances,
        linear_per_sample_gradients,
        sample_generation_batch,
        variance_length_fit,
    )
    from lab.worlds import group_advantages

    torch.set_num_threads(1)
    model, tokenizer = load_model_and_tokenizer("paperworld-tiny", dtype=torch.float32)
    data = get_task("paperworld").train_dataset(24, seed=3, chat=False)
    batch = sample_generation_batch(
        model, tokenizer, data["prompt"], num_generations=8, max_new_tokens=MAX_COMPLETION_LENGTH, seed=3
    )
    grads, _ = linear_per_sample_gradients(
        model, batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], batch["completion_mask"]
    )
    L = batch["lengths"].double()
    fit = variance_length_fit(L, grad_variances(grads, group_size=8))
    # Var grows with L; 192 rows pin k down only roughly (this batch: 2.2; 512 rows: 1.44, 95% [0.97, 2.27])
    assert fit["slope"] > 0 and 0.5 < fit["exponent"] < 3.0
    texts = tokenizer.batch_decode(
        batch["completion_ids"] * batch["completion_mask"], skip_special_tokens=True
    )
    rewards = torch.tensor([score(t, data[i // 8]["problem"]) for i, t in enumerate(texts)])
    a = group_advantages(rewards, 8)
    assert abs(float(torch.corrcoef(torch.stack([a, L]))[0, 1])) < 0.2
    short, long = L < L.median(), L >= L.median()
    assert abs(float(a[short].square().mean() - a[long].square().mean())) < 0.3  # E[A^2 | L] flat


def test_cv_under_power_law_is_the_closed_form_at_k_one():
    from lab.aggregation import counterfactual_cv
    from lab.worlds import cv_under_power_law, family_ratios

    L = torch.tensor([2.0, 3, 5, 8, 13, 21, 30, 4])
    assert cv_under_power_law(L, 1.0, max_length=36) == pytest.approx(counterfactual_cv(L, max_length=36))
    steeper = family_ratios(cv_under_power_law(L, 1.5, max_length=36))["dr_grpo/delta_l"]
    assert steeper > family_ratios(counterfactual_cv(L, max_length=36))["dr_grpo/delta_l"] > 1
