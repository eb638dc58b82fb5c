"""CountDown: the paper's binary rule, a safe evaluator, hostile completions, problems and prompts."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lab.tasks import DEMO, get_task
from lab.tasks.countdown import (
    BASE_TEMPLATE,
    FEW_SHOT,
    PREFILL,
    CountdownTask,
    check_expression,
    countdown_reward,
    countdown_shaped_reward,
    extract_answer,
    few_shot_examples,
    generate_problem,
    generate_problems,
    make_prompt,
    parse_expression,
    problem_key,
    score,
    shaped_score,
)


def ans(expr: str) -> str:
    return f"<think>thinking</think>\n<answer> {expr} </answer>"


@pytest.mark.parametrize(
    ("expr", "numbers", "target", "expected"),
    [
        ("1 + 2", [1, 2], 3, 1.0),
        ("(44 - 19) + 35", [44, 19, 35], 60, 1.0),
        ("35 + 44 - 19", [19, 35, 44], 60, 1.0),  # any order of the numbers
        ("(1 + 2) / 3", [1, 2, 3], 1, 1.0),
        ("6 / 4 * 2", [6, 4, 2], 3, 1.0),  # exact fractions on the way
        ("1 / 3 * 3", [1, 3, 3], 1, 1.0),  # float would give 0.999..., within 1e-5 either way
        ("-3 + 5", [3, 5], 2, 1.0),  # unary minus is allowed by the paper's character rule
        ("1 + 2", [1, 2], 4, 0.0),  # wrong value
        ("1 + 1", [1, 2], 2, 0.0),  # a number used twice, another unused
        ("1 + 2 + 2", [1, 2], 5, 0.0),  # extra number
        ("3", [1, 2], 3, 0.0),  # not all numbers used
        ("3 / (2 - 2)", [3, 2, 2], 0, 0.0),  # division by zero
        ("1.5 + 1.5", [1, 5, 1, 5], 3, 0.0),  # dots are not allowed
        ("2 ** 3", [2, 3], 8, 0.0),  # powers are not allowed
        ("7 // 2", [7, 2], 3, 0.0),  # floor division is not allowed
        ("7 % 4", [7, 4], 3, 0.0),
        ("abs(1 - 4)", [1, 4], 3, 0.0),
        ("x + 1", [1], 1, 0.0),
        ("1 + 2 = 3", [1, 2, 3], 3, 0.0),  # an equation, not an expression
        ("", [1, 2], 3, 0.0),
        ("01 + 2", [1, 2], 3, 0.0),  # leading zeros: a SyntaxError, not a crash
        ("１ + ２", [1, 2], 3, 0.0),  # full-width digits
        ("١ + ٢", [1, 2], 3, 0.0),  # Arabic-Indic digits
        ("1 + 2\u00a0", [1, 2], 3, 0.0),  # non-ASCII space
        ("__import__('os').system('true')", [1], 1, 0.0),
    ],
)
def test_rule(expr: str, numbers: list[int], target: int, expected: float) -> None:
    assert score(ans(expr), numbers, target) == expected


def test_last_answer_counts() -> None:
    text = "<answer> 1 + 1 </answer> hmm, no: <answer> 1 + 2 </answer>"
    assert score(text, [1, 2], 3) == 1.0
    assert score(text[::-1], [1, 2], 3) == 0.0
    wrong_last = "<answer> 1 + 2 </answer> actually <answer> 2 - 1 </answer>"
    assert score(wrong_last, [1, 2], 3) == 0.0


def test_tags_and_containers() -> None:
    assert score("1 + 2", [1, 2], 3) == 0.0  # no tags
    assert score("<answer> 1 + 2", [1, 2], 3) == 0.0  # no closing tag
    assert score("1 + 2 </answer>", [1, 2], 3) == 0.0  # no opening tag
    assert score("<answer>1+2</answer>", [1, 2], 3) == 1.0
    assert score("<answer> <answer> 1 + 2 </answer>", [1, 2], 3) == 1.0  # innermost-last wins
    assert score([{"role": "assistant", "content": ans("1 + 2")}], [1, 2], 3) == 1.0
    assert score(None, [1, 2], 3) == 0.0
    assert score(42, [1, 2], 3) == 0.0
    assert extract_answer("a <answer>x</answer> b <answer>y</answer>") == "y"


def test_target_within_tolerance_and_float_target() -> None:
    assert check_expression("10 / 3", [10, 3], 3.333333)  # |10/3 - 3.333333| < 1e-5
    assert not check_expression("10 / 3", [10, 3], 3.33)


@pytest.mark.parametrize(
    "expr",
    [
        "(" * 150 + "1" + ")" * 150,  # deep parentheses (also beyond the parser's own limit)
        "-" * 200 + "1",  # deep unary chain
        "+".join(["1"] * 100),  # too many nodes
        "9" * 100,  # huge literal
        "9" * 7 + " + 1",  # literal over MAX_LITERAL_DIGITS
        "1" * 10_000,  # far over the length bound
        "(1)" * 90,
    ],
)
def test_hostile_expressions_rejected(expr: str) -> None:
    assert parse_expression(expr) is None
    assert score(ans(expr), [1], 1) == 0.0


def test_hostile_completions_fast() -> None:
    hostile = [
        "x" * 200_000,
        "<answer>" * 25_000,
        "</answer>" * 22_000,
        "<answer> " + "(" * 100_000 + "1" + ")" * 100_000 + " </answer>",
        "<answer>1</answer>" * 10_000,  # many answer tags
        "<" * 200_000 + ans("1 + 2"),
        "<answer> " + "9" * 200_000 + " </answer>",
        "<answer> 1 / 0 </answer>",
        "<answer> " + " * ".join(["999999"] * 8) + " </answer>",
    ]
    numbers = [999999] * 8
    for text in hostile:
        start = time.perf_counter()
        assert score(text, numbers, 1) == 0.0
        assert time.perf_counter() - start < 1.0  # generous: each takes about a millisecond
    big_correct = "y" * 200_000 + ans("1 + 2")
    assert score(big_correct, [1, 2], 3) == 1.0


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_random_text_never_crashes(text: str) -> None:
    for wrapped in (text, f"<answer>{text}</answer>"):
        assert score(wrapped, [1, 2, 3], 6) in (0.0, 1.0)
        assert 0.0 <= shaped_score(wrapped, [1, 2, 3], 6) <= 1.0


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="0123456789+-*/() ", max_size=60))
def test_random_arithmetic_never_crashes(expr: str) -> None:
    assert score(f"<answer>{expr}</answer>", [1, 2, 3], 6) in (0.0, 1.0)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 10_000), st.integers(2, 4))
def test_generated_problems_are_solved_by_their_solution(seed: int, k: int) -> None:
    import random

    p = generate_problem(random.Random(seed), num_numbers=k)
    assert len(p["numbers"]) == k and 1 <= p["target"] <= 100
    assert all(1 <= n <= 99 for n in p["numbers"])
    assert score(ans(p["solution"]), p["numbers"], p["target"]) == 1.0


def test_shaped_reward_orders_credit() -> None:
    nums, target = [3, 5], 8
    values = [
        shaped_score("no tags", nums, target),
        shaped_score(ans("eight"), nums, target),
        shaped_score(ans("3 + 4"), nums, target),
        shaped_score(ans("5 - 3"), nums, target),
        shaped_score(ans("3 + 5"), nums, target),
    ]
    assert values == [0.0, 0.1, 0.2, 0.4, 1.0]


def test_reward_functions_batch() -> None:
    completions = [ans("1 + 2"), ans("2 - 1"), [{"role": "assistant", "content": ans("2 + 1")}]]
    kwargs = dict(prompts=["p"] * 3, numbers=[[1, 2]] * 3, target=[3, 3, 3], completion_ids=[[1]] * 3)
    assert countdown_reward(completions=completions, **kwargs) == [1.0, 0.0, 1.0]
    assert countdown_shaped_reward(completions=completions, **kwargs) == [1.0, 0.4, 1.0]


def test_problems_split_disjoint_and_seeded() -> None:
    train = generate_problems(300, seed=0, split="train")
    evals = generate_problems(100, seed=0, split="eval")
    other_seed = generate_problems(300, seed=1, split="eval")
    keys = lambda ps: {problem_key(p["numbers"], p["target"]) for p in ps}  # noqa: E731
    assert len(keys(train)) == 300 and len(keys(evals)) == 100
    assert not keys(train) & keys(evals)
    assert not keys(train) & keys(other_seed)
    assert generate_problems(20, seed=0) == train[:20]  # deterministic, prefix-stable
    assert {len(p["numbers"]) for p in train} == {3, 4}


def test_small_problem_space_raises() -> None:
    with pytest.raises(ValueError, match="distinct"):
        generate_problems(500, seed=0, split="eval", num_numbers=2, max_number=3, ops="+")


@pytest.mark.parametrize("bad", [dict(num_numbers=1), dict(ops="^"), dict(max_number=0)])
def test_bad_settings(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        generate_problems(3, seed=0, **bad)


def test_prompts() -> None:
    base = make_prompt([44, 19, 35], 60, chat=False)
    assert base == BASE_TEMPLATE.format(numbers=[44, 19, 35], target=60)
    assert base.startswith("A conversation between User and Assistant.")
    assert base.endswith("Assistant: " + PREFILL)
    assert "Using the numbers [44, 19, 35], create an equation that equals 60." in base
    chat = make_prompt([1, 2], 3, chat=True, few_shot=2)
    assert [m["role"] for m in chat] == ["user", "assistant", "user", "assistant", "user"]
    for shot in (chat[1], chat[3]):
        nums = [[3, 5], [9, 4]][chat.index(shot) // 2]
        target = [8, 5][chat.index(shot) // 2]
        assert score(shot["content"], nums, target) == 1.0  # the examples obey the rule
    fs_base = make_prompt([1, 2], 3, chat=False, few_shot=1)
    assert fs_base.count("User:") == 2 and fs_base.endswith(PREFILL)
    with pytest.raises(ValueError, match="few_shot"):
        make_prompt([1, 2], 3, chat=True, few_shot=9)
    with pytest.raises(ValueError, match="few_shot"):
        make_prompt([1, 2], 3, chat=True, few_shot=3, ops="*")


def test_few_shot_examples_follow_ops() -> None:
    assert len(few_shot_examples(len(FEW_SHOT))) == len(FEW_SHOT)
    plus_minus = few_shot_examples(4, "+-")
    assert all(not set(a) & set("*/") for _, _, _, a in plus_minus)
    for numbers, target, thoughts, answer in FEW_SHOT:  # every worked example obeys the rule
        assert score(ans(answer), numbers, target) == 1.0
        assert answer in thoughts
    chat = make_prompt([1, 2], 3, chat=True, few_shot=4, ops="+-")
    assert "*" not in "".join(m["content"] for m in chat[1:-1:2])


def test_task_datasets() -> None:
    task = get_task("countdown")
    assert isinstance(task, CountdownTask) and task.name == "countdown"
    train = task.train_dataset(16, seed=0, chat=True, **DEMO["task_options"])
    evals = task.eval_dataset(8, seed=0, chat=False, num_numbers=3)
    assert set(train.column_names) == {"prompt", "numbers", "target"}
    assert isinstance(train[0]["prompt"], list) and isinstance(evals[0]["prompt"], str)
    assert all(len(n) == 2 for n in train["numbers"])
    pairs = {(tuple(sorted(n)), t) for n, t in zip(train["numbers"], train["target"], strict=True)}
    assert len(pairs) == 16
    assert task.score(ans("1 + 2"), numbers=[1, 2], target=3) == 1.0
    assert [f.__name__ for f in task.reward_funcs()] == ["countdown_reward"]
    assert [f.__name__ for f in task.reward_funcs(shaped=True)] == [
        "countdown_reward",
        "countdown_shaped_reward",
    ]
    with pytest.raises(ValueError, match="source"):
        task.train_dataset(4, seed=0, chat=True, source="web")
    with pytest.raises(ValueError, match="n must"):
        task.train_dataset(0, seed=0, chat=True)


def test_get_task_bad_name() -> None:
    with pytest.raises(ValueError, match="'chess'"):
        get_task("chess")
