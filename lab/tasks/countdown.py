"""CountDown: combine the given numbers with + - * / to reach a target (the paper's first task).

Reward rule (docs/paper.md: the official code's rule, minus its ``eval``): take the **last**
``<answer>…</answer>`` of the completion; the expression inside must use only ASCII digits,
``+ - * / ( )`` and spaces, use exactly the given numbers, each once, and evaluate to within
``1e-5`` of the target. Score 1.0, else 0.0. No format reward.

The expression is never ``eval``-ed: it is parsed with :mod:`ast`, its size, node count, depth and
literals are bounded *before* anything is computed, and only numbers, the four operations, unary
signs and parentheses are evaluated, exactly, with :class:`fractions.Fraction`. Anything else
(names, calls, powers, huge or deep expressions, unicode digits, division by zero) scores 0.
The answer is found with ``str.rfind`` (linear time, no regex), so a 200k-character completion
scores in well under a millisecond per kilobyte.
"""

from __future__ import annotations

import ast
import random
from collections import Counter
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

from lab.tasks.base import (
    RewardFunc,
    Task,
    check_count,
    check_split,
    completion_text,
    load_hub_dataset,
    split_of,
)

HUB_DATASET = "Jiayi-Pan/Countdown-Tasks-3to4"

MAX_ANSWER_CHARS = 256  # longer answers score 0 without being parsed
MAX_NODES = 64  # AST nodes (4 numbers need 7 + parentheses are free)
MAX_DEPTH = 24
MAX_LITERAL_DIGITS = 6
TOLERANCE = Fraction(1, 10**5)  # |value - target| < 1e-5, as in the paper
_ALLOWED_CHARS = frozenset("0123456789+-*/() \t\n\r")
_BINOPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}

SYSTEM_INTRO = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer."
)
QUESTION = (
    "Using the numbers {numbers}, create an equation that equals {target}. You can use basic arithmetic "
    "operations (+, -, *, /) and each number can only be used once. Show your work in <think> </think> "
    "tags. And return the final answer in <answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>."
)
PREFILL = "Let me solve this step by step.\n<think>"
# The paper's raw-text prompt for base models (docs/paper.md), verbatim.
BASE_TEMPLATE = SYSTEM_INTRO + "\nUser: " + QUESTION + "\nAssistant: " + PREFILL

# Worked examples for few-shot prompts (small, solvable, in the exact answer format). A prompt uses
# the first ones whose answer needs only the allowed operations.
FEW_SHOT = (
    ([3, 5], 8, "3 + 5 = 8. That is the target.", "3 + 5"),
    ([9, 4], 5, "9 + 4 = 13, too big. 9 - 4 = 5. That is the target.", "9 - 4"),
    ([6, 7], 42, "6 + 7 = 13, too small. 6 * 7 = 42. That is the target.", "6 * 7"),
    ([12, 3], 4, "12 - 3 = 9, no. 12 / 3 = 4. That is the target.", "12 / 3"),
    ([2, 7], 9, "2 + 7 = 9. That is the target.", "2 + 7"),
    ([15, 6], 9, "15 + 6 = 21, too big. 15 - 6 = 9. That is the target.", "15 - 6"),
)


def few_shot_examples(count: int, ops: str = "+-*/") -> list[tuple[list[int], int, str, str]]:
    """The first ``count`` worked examples whose answer uses only ``ops``."""
    eligible = [ex for ex in FEW_SHOT if set(ex[3]) & set("+-*/") <= set(ops)]
    if not isinstance(count, int) or not 0 <= count <= len(eligible):
        raise ValueError(f"few_shot must be in 0..{len(eligible)} for ops={ops!r}, got {count!r}")
    return eligible[:count]


# ---------------------------------------------------------------------------------------------- scoring


def extract_answer(text: str) -> str | None:
    """The content of the last ``<answer>…</answer>`` (the last closing tag and the last opening tag
    before it), or None. Linear time: two ``rfind`` calls, no regex."""
    end = text.rfind("</answer>")
    if end < 0:
        return None
    start = text.rfind("<answer>", 0, end)
    if start < 0:
        return None
    return text[start + len("<answer>") : end]


def parse_expression(expr: str) -> ast.expr | None:
    """Parse an arithmetic expression safely, or return None.

    Checks, in order: length ≤ ``MAX_ANSWER_CHARS``; only ASCII digits, ``+-*/()`` and whitespace
    (this rejects unicode digits, letters, dots and ``**`` is caught below); then :func:`ast.parse`;
    then every node must be a non-negative int literal of ≤ ``MAX_LITERAL_DIGITS`` digits, a unary
    ``+``/``-`` or a binary ``+ - * /``; at most ``MAX_NODES`` nodes and depth ``MAX_DEPTH``.
    """
    expr = expr.strip(" \t\n\r")
    if not expr or len(expr) > MAX_ANSWER_CHARS or not set(expr) <= _ALLOWED_CHARS:
        return None
    if "**" in expr or "//" in expr:
        return None
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None
    count = 0
    stack: list[tuple[ast.AST, int]] = [(tree.body, 1)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_NODES or depth > MAX_DEPTH:
            return None
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            stack += [(node.left, depth + 1), (node.right, depth + 1)]
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            stack.append((node.operand, depth + 1))
        elif isinstance(node, ast.Constant) and type(node.value) is int:
            if node.value < 0 or len(str(node.value)) > MAX_LITERAL_DIGITS:
                return None
        else:
            return None
    return tree.body


def literals(node: ast.expr) -> list[int]:
    """The integer literals of a parsed expression, in source order."""
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant)]


def evaluate(node: ast.expr) -> Fraction:
    """Exact value of an expression accepted by :func:`parse_expression` (raises ZeroDivisionError)."""
    if isinstance(node, ast.Constant):
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp):
        value = evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp):
        left, right = evaluate(node.left), evaluate(node.right)
        op = type(node.op)
        if op is ast.Add:
            return left + right
        if op is ast.Sub:
            return left - right
        if op is ast.Mult:
            return left * right
        return left / right  # Fraction raises ZeroDivisionError on a zero divisor
    raise ValueError(f"unsupported node {type(node).__name__}")  # unreachable after parse_expression


def check_expression(expr: str, numbers: Sequence[int], target: int | float) -> bool:
    """True when ``expr`` uses exactly ``numbers`` (as a multiset) and equals ``target`` within 1e-5."""
    node = parse_expression(expr)
    if node is None or Counter(literals(node)) != Counter(int(n) for n in numbers):
        return False
    try:
        value = evaluate(node)
    except ZeroDivisionError:
        return False
    return abs(value - Fraction(target)) < TOLERANCE


def score(completion: Any, numbers: Sequence[int], target: int | float, **_: Any) -> float:
    """The paper's binary CountDown reward: 1.0 if the last ``<answer>`` expression uses exactly
    ``numbers`` and equals ``target`` (within 1e-5), else 0.0. Never raises on any completion."""
    answer = extract_answer(completion_text(completion))
    if answer is None:
        return 0.0
    return 1.0 if check_expression(answer, numbers, target) else 0.0


def shaped_score(completion: Any, numbers: Sequence[int], target: int | float, **_: Any) -> float:
    """A shaped reward for weak models (off by default): 1.0 when :func:`score` is 1.0, otherwise
    partial credit ``0.1·[answer tags] + 0.1·[safe arithmetic expression] + 0.2·[exactly the given
    numbers]`` (at most 0.4, so a correct answer always beats any wrong one)."""
    text = completion_text(completion)
    answer = extract_answer(text)
    if answer is None:
        return 0.0
    if check_expression(answer, numbers, target):
        return 1.0
    node = parse_expression(answer)
    if node is None:
        return 0.1
    same_numbers = Counter(literals(node)) == Counter(int(n) for n in numbers)
    return 0.2 + (0.2 if same_numbers else 0.0)


def countdown_reward(
    completions: list[Any], numbers: list[Sequence[int]], target: list[Any], **_: Any
) -> list[float]:
    """TRL reward function: the binary rule of :func:`score` for each completion."""
    return [score(c, n, t) for c, n, t in zip(completions, numbers, target, strict=True)]


def countdown_shaped_reward(
    completions: list[Any], numbers: list[Sequence[int]], target: list[Any], **_: Any
) -> list[float]:
    """TRL reward function: :func:`shaped_score` (format and number-use credit) for each completion."""
    return [shaped_score(c, n, t) for c, n, t in zip(completions, numbers, target, strict=True)]


# ---------------------------------------------------------------------------------------------- problems


def _combine(rng: random.Random, items: list[tuple[int, str]], ops: str) -> tuple[int, str] | None:
    """Combine two random items with a random operation keeping values positive integers."""
    i, j = rng.sample(range(len(items)), 2)
    (a, ea), (b, eb) = items[i], items[j]
    op = rng.choice(ops)
    if op in "-/" and a < b:
        (a, ea), (b, eb) = (b, eb), (a, ea)
    if op == "+":
        value = a + b
    elif op == "-":
        value = a - b
    elif op == "*":
        value = a * b
    else:
        if b <= 1 or a % b:
            return None
        value = a // b
    if value <= 0:
        return None
    rest = [it for k, it in enumerate(items) if k not in (i, j)]
    wrap = lambda e: e if e.isdigit() else f"({e})"  # noqa: E731
    rest.append((value, f"{wrap(ea)} {op} {wrap(eb)}"))
    items[:] = rest
    return value, rest[-1][1]


def generate_problem(
    rng: random.Random,
    *,
    num_numbers: int = 3,
    max_number: int = 99,
    max_target: int = 100,
    ops: str = "+-*/",
) -> dict[str, Any]:
    """One solvable problem: ``num_numbers`` numbers in ``1..max_number``, a target in ``1..max_target``
    built by combining all numbers with ``ops`` (intermediate values positive integers), and the solution."""
    if num_numbers < 2 or max_number < 1 or max_target < 1 or not ops or not set(ops) <= set("+-*/"):
        raise ValueError(
            f"bad CountDown settings: num_numbers={num_numbers!r} (>= 2), max_number={max_number!r}, "
            f"max_target={max_target!r}, ops={ops!r} (a subset of '+-*/')"
        )
    for _ in range(10_000):
        numbers = [rng.randint(1, max_number) for _ in range(num_numbers)]
        items = [(n, str(n)) for n in numbers]
        while len(items) > 1 and _combine(rng, items, ops) is not None:
            pass
        if len(items) == 1 and 1 <= items[0][0] <= max_target:
            return {"numbers": numbers, "target": items[0][0], "solution": items[0][1]}
    raise ValueError(f"could not generate a CountDown problem with max_target={max_target} and ops={ops!r}")


def problem_key(numbers: Sequence[int], target: int) -> str:
    return f"countdown|{sorted(int(n) for n in numbers)}|{int(target)}"


def generate_problems(
    n: int, *, seed: int, split: str = "train", num_numbers: int | tuple[int, int] = (3, 4), **settings: Any
) -> list[dict[str, Any]]:
    """``n`` distinct problems of one split (a fixed hash of the problem decides its split, so train and
    eval never share a problem). ``num_numbers`` is an int or an inclusive range like ``(3, 4)``."""
    check_count(n)
    check_split(split)
    lo, hi = (num_numbers, num_numbers) if isinstance(num_numbers, int) else tuple(num_numbers)
    rng = random.Random(f"countdown-{seed}-{split}")
    seen: set[str] = set()
    problems: list[dict[str, Any]] = []
    for _ in range(200 * n + 1000):
        p = generate_problem(rng, num_numbers=rng.randint(lo, hi), **settings)
        key = problem_key(p["numbers"], p["target"])
        if key not in seen and split_of(key) == split:
            seen.add(key)
            problems.append(p)
            if len(problems) == n:
                return problems
    raise ValueError(
        f"only {len(problems)} distinct {split} problems exist for these settings, asked for n={n}"
    )


# ---------------------------------------------------------------------------------------------- prompts


def _answer_text(thoughts: str, answer: str) -> str:
    return f"{thoughts}</think>\n<answer> {answer} </answer>"


def make_prompt(
    numbers: Sequence[int], target: int, *, chat: bool, few_shot: int = 0, ops: str = "+-*/"
) -> str | list[dict[str, str]]:
    """The prompt for one problem.

    Base models (``chat=False``): the paper's raw-text template, ending in the assistant prefill
    ``"Let me solve this step by step.\\n<think>"``; chat models: the same question as a user message
    (TRL applies the chat template). ``few_shot`` worked examples using only ``ops`` come first, as
    earlier turns (chat) or earlier exchanges (base).
    """
    examples = few_shot_examples(few_shot, ops)
    numbers = [int(x) for x in numbers]
    if not chat:
        shots = "".join(
            BASE_TEMPLATE.format(numbers=list(ns), target=t)[len(SYSTEM_INTRO) :] + " " + _answer_text(th, a)
            for ns, t, th, a in examples
        )
        return (
            SYSTEM_INTRO + shots + BASE_TEMPLATE.format(numbers=numbers, target=target)[len(SYSTEM_INTRO) :]
        )
    messages: list[dict[str, str]] = []
    for ns, t, th, a in examples:
        messages.append({"role": "user", "content": QUESTION.format(numbers=list(ns), target=t)})
        messages.append({"role": "assistant", "content": PREFILL + " " + _answer_text(th, a)})
    messages.append({"role": "user", "content": QUESTION.format(numbers=numbers, target=target)})
    return messages


class CountdownTask(Task):
    """CountDown with generated problems (offline, default) or the hub set (``source="hub"``).

    Dataset options: ``num_numbers`` (int or inclusive range, default ``(3, 4)`` like the paper's set),
    ``max_number`` (99), ``max_target`` (100), ``ops`` (``"+-*/"``), ``few_shot`` (0), ``source``.
    """

    name = "countdown"

    def _dataset(self, n: int, *, seed: int, chat: bool, split: str, **options: Any):
        import datasets

        few_shot = options.pop("few_shot", 0)
        source = options.pop("source", "generated")
        if source == "generated":
            problems = generate_problems(n, seed=seed, split=split, **options)
        elif source == "hub":
            problems = load_hub_problems(n, seed=seed, split=split)
        else:
            raise ValueError(f"source must be 'generated' or 'hub', got {source!r}")
        rows = {
            "prompt": [
                make_prompt(
                    p["numbers"], p["target"], chat=chat, few_shot=few_shot, ops=options.get("ops", "+-*/")
                )
                for p in problems
            ],
            "numbers": [list(p["numbers"]) for p in problems],
            "target": [int(p["target"]) for p in problems],
        }
        return datasets.Dataset.from_dict(rows)

    def reward_funcs(self, *, shaped: bool = False) -> list[RewardFunc]:
        return [countdown_reward, countdown_shaped_reward] if shaped else [countdown_reward]

    def score(self, completion: Any, **columns: Any) -> float:
        return score(completion, columns["numbers"], columns["target"])


def load_hub_problems(n: int, *, seed: int, split: str) -> list[dict[str, Any]]:
    """``n`` problems of one split from ``Jiayi-Pan/Countdown-Tasks-3to4`` (needs the hub), shuffled
    with ``seed``; the split uses the same problem hash as the generator."""
    check_count(n)
    check_split(split)
    data = load_hub_dataset(HUB_DATASET, split="train").shuffle(seed=seed)
    problems = []
    for row in data:
        if split_of(problem_key(row["nums"], row["target"])) == split:
            problems.append({"numbers": list(row["nums"]), "target": int(row["target"])})
            if len(problems) == n:
                return problems
    raise ValueError(f"{HUB_DATASET} has only {len(problems)} {split} problems, asked for n={n}")
