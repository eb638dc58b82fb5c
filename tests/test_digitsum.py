"""The fast task: problems, prompts, the binary reward, the tokenizer and the cached small model."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lab.models import (
    BUILD_INFO,
    DIGITSUM_BUILD,
    digitsum_model_dir,
    digitsum_tokenizer,
    load_model_and_tokenizer,
)
from lab.tasks import get_task
from lab.tasks.digitsum import (
    VOCAB,
    answer_of,
    completion_length,
    digitsum_reward,
    direct_completion,
    extract_answer,
    generate_problems,
    prompt_text,
    score,
    scratchpad_completion,
)

digit_lists = st.lists(st.integers(0, 9), min_size=1, max_size=40)
TOKENIZER = digitsum_tokenizer()


@settings(deadline=None)
@given(digit_lists)
def test_both_completion_forms_score_one_and_have_the_documented_length(digits):
    tokenizer = TOKENIZER
    for think, text in ((True, scratchpad_completion(digits)), (False, direct_completion(digits))):
        assert score(text, digits) == 1.0
        assert len(tokenizer(text)["input_ids"]) + 1 == completion_length(digits, think=think)  # + <eos>


@given(digit_lists, st.integers(0, 9))
def test_a_wrong_final_digit_scores_zero(digits, wrong):
    if wrong == answer_of(digits):
        wrong = (wrong + 1) % 10
    assert score(f"think answer {wrong}", digits) == 0.0
    assert score(scratchpad_completion(digits) + " 3", digits) == 0.0  # the answer must be the last token


@pytest.mark.parametrize(
    "text", ["", "answer", "answer 12", "7", "answer x", "answer 7 answer", "think 3 3 5 8", "answer ７"]
)
def test_malformed_answers_score_zero_without_crashing(text):
    assert extract_answer(text) is None
    assert score(text, [7]) == 0.0


def test_reward_function_accepts_trl_columns():
    assert digitsum_reward(["answer 8", "answer 1", "think 3 3 5 8 answer 8"], digits=[[3, 5]] * 3) == [
        1.0,
        0.0,
        1.0,
    ]


def test_problems_are_seeded_split_and_in_range():
    a = generate_problems(50, seed=1, min_digits=3, max_digits=5)
    assert a == generate_problems(50, seed=1, min_digits=3, max_digits=5)
    assert a != generate_problems(50, seed=2, min_digits=3, max_digits=5)
    assert all(3 <= len(p) <= 5 for p in a)
    train = {tuple(p) for p in generate_problems(300, seed=0, min_digits=4, max_digits=6)}
    evals = {tuple(p) for p in generate_problems(300, seed=0, split="eval", min_digits=4, max_digits=6)}
    assert not train & evals


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"min_digits": 0}, "min_digits"),
        ({"max_digits": 41}, "max_digits"),
        ({"min_digits": 5, "max_digits": 3}, "min_digits=5"),
        ({"min_digits": "2"}, "'2'"),
        ({"num_numbers": 3}, "num_numbers"),
    ],
)
def test_bad_options_are_named(options, match):
    with pytest.raises(ValueError, match=match):
        get_task("digitsum").train_dataset(4, seed=0, chat=False, **options)


def test_dataset_is_raw_text_with_digits_column():
    task = get_task("digitsum")
    data = task.train_dataset(8, seed=0, chat=False)
    assert data[0]["prompt"] == prompt_text(data[0]["digits"]) and data[0]["prompt"].endswith(" =")
    with pytest.raises(ValueError, match="raw-text"):
        task.train_dataset(8, seed=0, chat=True)
    assert task.score("answer " + str(answer_of(data[0]["digits"])), digits=data[0]["digits"]) == 1.0


def test_tokenizer_is_a_real_fast_tokenizer_over_the_task_vocabulary():
    tokenizer = digitsum_tokenizer()
    assert len(tokenizer) == len(VOCAB)
    ids = tokenizer("3 5 = think 3 3 5 8 answer 8")["input_ids"]
    assert tokenizer.decode(ids) == "3 5 = think 3 3 5 8 answer 8"
    assert tokenizer.decode([*ids, tokenizer.eos_token_id], skip_special_tokens=True).endswith("answer 8")
    assert tokenizer("3 x")["input_ids"][-1] == tokenizer.unk_token_id


def test_cached_model_is_the_documented_build_with_its_measured_accuracy():
    folder = digitsum_model_dir()
    info = json.loads((folder / BUILD_INFO).read_text())
    assert info["build"] == {k: list(v) if isinstance(v, tuple) else v for k, v in DIGITSUM_BUILD.items()}
    # the warm-up aims at a policy that is right 30-50% of the time and undecided about thinking
    assert 0.25 <= info["accuracy"] <= 0.55 and 0.3 <= info["think_fraction"] <= 0.7
    assert info["accuracy_think"] > info["accuracy_direct"]  # the scratchpad helps: the lesson of the task
    model, tokenizer = load_model_and_tokenizer("digitsum-tiny")
    assert type(model).__name__ == "LlamaForCausalLM" and len(tokenizer) == len(VOCAB)
    assert 150_000 < sum(p.numel() for p in model.parameters()) < 250_000
