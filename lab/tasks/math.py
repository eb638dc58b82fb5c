r"""Math: answer extraction, equivalence with ``math-verify`` under a time limit, and problem sets.

Reward rule (the paper's, docs/paper.md): the answer is the content of the **last** ``\boxed{...}`` of the completion
(nested braces allowed); without one, a GSM8K-style ``#### n`` line. Score 1.0 when it is equivalent
to the reference answer, else 0.0. Equivalence: an exact fast path for plain numbers (``1,000``,
``0.5``, ``3/4`` and ``\frac{3}{4}`` compare as exact fractions), otherwise ``math_verify.verify``
(normalization + sympy) with a per-check time limit. Answers longer than ``MAX_ANSWER_CHARS`` score 0
unparsed.

Time limit: on the main thread (where TRL calls reward functions) math-verify's own ``signal.alarm``
limit is used; on any other thread signals are unavailable, so the check runs in a daemon thread and
is abandoned (scored 0) after the limit. Neither can stop one long big-integer operation (it holds the
GIL, so no other thread and no signal handler runs until it ends), so an answer that could make sympy
compute a huge integer scores 0 before it reaches sympy (:func:`too_costly`): a power whose exponent holds
a power or a factorial, or an integer above :data:`MAX_EXPONENT`, or a factorial of more than
:data:`MAX_FACTORIAL` or of an expression.

Data: an offline, seeded generator of templated multi-step arithmetic word problems with exact
answers (the default), and loaders for GSM8K, MATH-500 and an Open-Reasoner-Zero set for online users.
"""

from __future__ import annotations

import logging
import random
import re
import threading
from collections.abc import Callable
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

MAX_ANSWER_CHARS = 300
MAX_EXPONENT = 10_000  # 10^10000 is computed in microseconds; 10^(10^8) holds the GIL for minutes
MAX_FACTORIAL = 10_000
_POWER = re.compile(r"\^|\*\*")
_INTEGER = re.compile(r"\d+")
_FACTORIAL = re.compile(r"(\d*)\s*([)}\]]?)\s*!")
DEFAULT_TIMEOUT_S = 2
_BOXED = ("\\boxed{", "\\fbox{")
_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)")
_FRAC = re.compile(r"\\[dt]?frac\{([^{}]{1,40})\}\{([^{}]{1,40})\}")

HUB_SETS = {
    # name: (hub id, config, split for train, split for eval, question column, answer column)
    "gsm8k": ("openai/gsm8k", "main", "train", "test", "question", "answer"),
    "math500": ("HuggingFaceH4/MATH-500", None, None, "test", "problem", "answer"),
    # a question/answer copy of Open-Reasoner-Zero's orz_math_57k collection (16k problems)
    "orz": ("OctoMed/OrzMath", None, "train", None, "question", "answer"),
}

SYSTEM_INTRO = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer."
)
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
BASE_TEMPLATE = (
    SYSTEM_INTRO + "\nUser: {question} " + INSTRUCTION + "\nAssistant: Let me solve this step by step.\n"
)


# ---------------------------------------------------------------------------------------------- extraction


def extract_boxed(text: str) -> str | None:
    r"""Content of the last ``\boxed{...}`` (or ``\fbox{...}``), matching nested braces; None when there
    is none or its braces do not close within ``MAX_ANSWER_CHARS`` characters."""
    start = max(text.rfind(b) for b in _BOXED)
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, min(len(text), i + MAX_ANSWER_CHARS + 1)):
        ch = text[j]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
    return None


def extract_gsm8k(text: str) -> str | None:
    """The answer of the last GSM8K-style ``#### n`` line (commas, ``$`` and a trailing period dropped)."""
    start = text.rfind("####")
    if start < 0:
        return None
    line = text[start + 4 : start + 4 + MAX_ANSWER_CHARS].split("\n", 1)[0]
    answer = line.replace(",", "").replace("$", "").strip().rstrip(".")
    return answer or None


def extract_answer(text: str) -> str | None:
    r"""The completion's final answer: the last ``\boxed{}``, else the last ``#### n``, else None."""
    boxed = extract_boxed(text)
    return boxed if boxed is not None else extract_gsm8k(text)


# ---------------------------------------------------------------------------------------------- equivalence


def as_fraction(answer: str) -> Fraction | None:
    r"""An exact value for a plain-number answer (``-12``, ``1,234``, ``0.25``, ``3/4``, ``\frac{3}{4}``,
    ``$5``, ``50\%`` is *not* converted), or None."""
    s = answer.strip().strip("$").replace(",", "").replace("\\!", "").replace(" ", "")
    s = s.replace("\\left", "").replace("\\right", "")
    m = _FRAC.fullmatch(s) or _FRAC.fullmatch(s.lstrip("-"))
    if m:
        num, den = as_fraction(m.group(1)), as_fraction(m.group(2))
        if num is None or den is None or den == 0:
            return None
        value = num / den
        return -value if s.startswith("-") else value
    if "/" in s and s.count("/") == 1:
        a, b = s.split("/")
        num, den = as_fraction(a), as_fraction(b)
        return None if num is None or den is None or den == 0 else num / den
    if _NUMBER.fullmatch(s) and s.isascii() and len(s) <= 40:
        return Fraction(s)
    return None


def _math_verify(gold: str, pred: str, timeout_s: int | None) -> bool:
    from math_verify import parse, verify

    parsed_gold = parse(f"${gold}$", parsing_timeout=timeout_s)
    parsed_pred = parse(f"${pred}$", parsing_timeout=timeout_s)
    if not parsed_gold or not parsed_pred:
        return False
    return bool(verify(parsed_gold, parsed_pred, timeout_seconds=timeout_s))


def _operand(text: str, i: int) -> tuple[str, int]:
    """The exponent that starts at ``text[i]`` (a balanced ``{...}``/``(...)`` group, or one number or
    symbol) and the index after it."""
    while i < len(text) and text[i].isspace():
        i += 1
    if i < len(text) and text[i] in "{(":
        depth, j = 0, i
        for j in range(i, len(text)):
            depth += text[j] in "{(" or -(text[j] in "})")
            if depth == 0:
                break
        return text[i : j + 1], j + 1
    m = re.match(r"[-+]?\s*(\d+|\\?[A-Za-z]+)", text[i:])
    end = i + (len(m.group(0)) if m else 1)
    return text[i:end], end


def too_costly(answer: str) -> bool:
    """Whether checking ``answer`` could make sympy compute a huge integer (module docstring)."""
    for m in _POWER.finditer(answer):
        exponent, end = _operand(answer, m.end())
        if _POWER.search(exponent) or "!" in exponent or _POWER.match(answer[end:].lstrip()):
            return True  # a power tower: 9^{9^{9}}, 10**10**8
        if any(int(n) > MAX_EXPONENT for n in _INTEGER.findall(exponent)):
            return True
    for m in _FACTORIAL.finditer(answer):
        number, closing = m.groups()
        if closing or (number and int(number) > MAX_FACTORIAL):
            return True
    return False


def run_with_time_limit(func: Callable[[], bool], timeout_s: float) -> bool:
    """``func()`` in a daemon thread, or False if it has not finished after ``timeout_s`` seconds (the
    thread is abandoned). For threads other than the main one, where ``signal.alarm`` is unavailable."""
    result: list[bool] = []

    def target() -> None:
        try:
            result.append(bool(func()))
        except Exception:
            result.append(False)

    worker = threading.Thread(target=target, daemon=True, name="math-verify")
    worker.start()
    worker.join(timeout_s)
    return bool(result and result[0])


def is_equivalent(pred: str, gold: str, *, timeout_s: int = DEFAULT_TIMEOUT_S) -> bool:
    """Whether answer ``pred`` equals reference ``gold``: exact for plain numbers, else math-verify with
    at most ``timeout_s`` seconds per parse/compare (whole seconds: ``signal.alarm``'s resolution)."""
    if not isinstance(timeout_s, int) or timeout_s < 1:
        raise ValueError(f"timeout_s must be an int >= 1 (seconds), got {timeout_s!r}")
    pred, gold = pred.strip(), str(gold).strip()
    if not pred or not gold or len(pred) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
        return False
    a, b = as_fraction(pred), as_fraction(gold)
    if a is not None and b is not None:
        return a == b
    if pred == gold:
        return True
    if too_costly(pred) or too_costly(gold):  # no time limit could stop it (module docstring)
        return False
    try:
        if threading.current_thread() is threading.main_thread():
            return _math_verify(gold, pred, timeout_s)
        return run_with_time_limit(lambda: _math_verify(gold, pred, None), timeout_s)
    except Exception:  # math-verify raises TimeoutException and others on pathological input
        return False


def score(completion: Any, answer: str, *, timeout_s: int = DEFAULT_TIMEOUT_S, **_: Any) -> float:
    """The binary math reward: 1.0 if the completion's final answer (:func:`extract_answer`) is
    equivalent to ``answer`` (:func:`is_equivalent`), else 0.0. Never raises on any completion."""
    pred = extract_answer(completion_text(completion))
    if pred is None:
        return 0.0
    return 1.0 if is_equivalent(pred, answer, timeout_s=timeout_s) else 0.0


def shaped_score(completion: Any, answer: str, **_: Any) -> float:
    r"""A shaped reward for weak models (off by default): 1.0 when :func:`score` is 1.0, 0.1 for a
    wrong but extractable final answer (``\boxed{}`` or ``####``), else 0.0."""
    pred = extract_answer(completion_text(completion))
    if pred is None:
        return 0.0
    return 1.0 if is_equivalent(pred, answer) else 0.1


def math_reward(completions: list[Any], answer: list[str], **_: Any) -> list[float]:
    """TRL reward function: the binary rule of :func:`score` for each completion."""
    return [score(c, a) for c, a in zip(completions, answer, strict=True)]


def math_shaped_reward(completions: list[Any], answer: list[str], **_: Any) -> list[float]:
    """TRL reward function: :func:`shaped_score` (format credit) for each completion."""
    return [shaped_score(c, a) for c, a in zip(completions, answer, strict=True)]


logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns on every unparsable answer


# ---------------------------------------------------------------------------------------------- problems

_NAMES = ("Ava", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kira", "Liam")
_ITEMS = ("apples", "marbles", "stickers", "pencils", "cookies", "stamps", "shells", "cards")


def _shop(rng: random.Random, m: int) -> tuple[str, Fraction]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(2, m), rng.randint(2, m)
    c = rng.randint(1, a * b - 1)
    q = f"{name} buys {a} packs of {item} with {b} {item} in each pack, then gives {c} {item} to a friend. How many {item} does {name} have left?"
    return q, Fraction(a * b - c)


def _savings(rng: random.Random, m: int) -> tuple[str, Fraction]:
    name = rng.choice(_NAMES)
    a, b = rng.randint(2, m), rng.randint(2, m)
    c = rng.randint(1, a * b - 1)
    q = f"{name} saves {a} dollars every week for {b} weeks and then spends {c} dollars on a gift. How many dollars does {name} have left?"
    return q, Fraction(a * b - c)


def _sharing(rng: random.Random, m: int) -> tuple[str, Fraction]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    c, each = rng.randint(2, m), rng.randint(1, m)
    a = rng.randint(1, c * each - 1)
    q = f"{name} has {a} {item} and buys {c * each - a} more. {name} shares all of them equally among {c} friends. How many {item} does each friend get?"
    return q, Fraction(each)


def _garden(rng: random.Random, m: int) -> tuple[str, Fraction]:
    name = rng.choice(_NAMES)
    a, b = rng.randint(2, m), rng.randint(2, m)
    c, d = rng.randint(1, a * b - 1), rng.randint(1, m)
    q = f"A garden has {a} rows with {b} plants in each row. {c} plants die, and {name} plants {d} new ones. How many plants are in the garden now?"
    return q, Fraction(a * b - c + d)


def _prices(rng: random.Random, m: int) -> tuple[str, Fraction]:
    name = rng.choice(_NAMES)
    a, b, c, d = (rng.randint(1, m) for _ in range(4))
    q = f"Pens cost {a} dollars each and notebooks cost {b} dollars each. {name} buys {c} pens and {d} notebooks. How many dollars does {name} spend?"
    return q, Fraction(a * c + b * d)


def _juice(rng: random.Random, m: int) -> tuple[str, Fraction]:
    a, b, c = rng.randint(2, m), rng.randint(2, m), rng.randint(2, m)
    q = f"There are {a} bottles with {b} liters of juice each. All the juice is poured equally into {c} jugs. How many liters are in each jug? Give the answer as a fraction in lowest terms if it is not a whole number."
    return q, Fraction(a * b, c)


def _trip(rng: random.Random, m: int) -> tuple[str, Fraction]:
    a, b, c = rng.randint(2, 10 * m), rng.randint(2, m), rng.randint(1, 10 * m)
    q = f"A train travels at {a} km per hour for {b} hours and then another {c} km. How many km does it travel in total?"
    return q, Fraction(a * b + c)


TEMPLATES = (_shop, _savings, _sharing, _garden, _prices, _juice, _trip)


def format_answer(value: Fraction) -> str:
    """The reference answer string: an integer, or ``a/b`` in lowest terms."""
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def generate_problems(
    n: int, *, seed: int, split: str = "train", max_number: int = 12
) -> list[dict[str, str]]:
    """``n`` distinct word problems of one split (question, exact answer), from ``len(TEMPLATES)``
    templates of two or three arithmetic steps with numbers up to ``max_number`` (some ×10). A fixed
    hash of the question decides its split, so train and eval never share a problem."""
    check_count(n)
    check_split(split)
    if not isinstance(max_number, int) or max_number < 2:
        raise ValueError(f"max_number must be an int >= 2, got {max_number!r}")
    rng = random.Random(f"math-{seed}-{split}")
    seen: set[str] = set()
    problems: list[dict[str, str]] = []
    for _ in range(100 * n + 1000):
        question, value = rng.choice(TEMPLATES)(rng, max_number)
        if question not in seen and split_of(question) == split:
            seen.add(question)
            problems.append({"question": question, "answer": format_answer(value)})
            if len(problems) == n:
                return problems
    raise ValueError(
        f"only {len(problems)} distinct {split} problems exist for max_number={max_number}, asked for n={n}"
    )


def load_hub_problems(source: str, n: int, *, seed: int, split: str) -> list[dict[str, str]]:
    """``n`` problems from a hub set (``gsm8k``, ``math500``, ``orz``; needs the hub), shuffled with ``seed``."""
    if source not in HUB_SETS:
        raise ValueError(f"source must be 'generated' or one of {sorted(HUB_SETS)}, got {source!r}")
    check_count(n)
    check_split(split)
    path, config, train_split, eval_split, qcol, acol = HUB_SETS[source]
    hub_split = train_split if split == "train" else eval_split
    if hub_split is None:
        raise ValueError(f"the {source!r} set has no {split} split; use it for the other one")
    data = load_hub_dataset(path, config, split=hub_split).shuffle(seed=seed)
    data = data.select(range(min(n, len(data))))
    rows = []
    for row in data:
        answer = str(row[acol])
        if source == "gsm8k":
            answer = extract_gsm8k(answer) or answer
        rows.append({"question": str(row[qcol]), "answer": answer})
    return rows


def make_prompt(question: str, *, chat: bool) -> str | list[dict[str, str]]:
    r"""The prompt: a raw-text template for base models, one user message for chat models; both ask for
    the final answer in ``\boxed{}``."""
    if chat:
        return [{"role": "user", "content": f"{question}\n{INSTRUCTION}"}]
    return BASE_TEMPLATE.replace("{question}", question)  # str.format would trip on the braces of \boxed{}


class MathTask(Task):
    """Math word problems: generated offline (default) or from the hub (``source="gsm8k"|"math500"|"orz"``).

    Dataset options: ``source``, ``max_number`` (generated problems only, default 12).
    """

    name = "math"

    def _dataset(self, n: int, *, seed: int, chat: bool, split: str, **options: Any):
        import datasets

        source = options.pop("source", "generated")
        if source == "generated":
            problems = generate_problems(n, seed=seed, split=split, **options)
        else:
            if options:
                raise ValueError(f"options {sorted(options)} apply to generated problems only")
            problems = load_hub_problems(source, n, seed=seed, split=split)
        return datasets.Dataset.from_dict(
            {
                "prompt": [make_prompt(p["question"], chat=chat) for p in problems],
                "answer": [p["answer"] for p in problems],
            }
        )

    def reward_funcs(self, *, shaped: bool = False) -> list[RewardFunc]:
        return [math_reward, math_shaped_reward] if shaped else [math_reward]

    def score(self, completion: Any, **columns: Any) -> float:
        return score(completion, columns["answer"])
