r"""Digit sum with an optional scratchpad: the lab's fast task, where the policy chooses its length.

A prompt is a list of digits, ``"3 5 2 7 ="``; the answer is their sum modulo 10 (here 7). The model
may answer at once or think first, writing a scratchpad of running sums (digit, running sum mod 10):

.. code-block:: text

    prompt        3 5 2 7 =
    direct        answer 7 <eos>                                    L = 3 tokens
    scratchpad    think 3 3 5 8 2 0 7 7 answer 7 <eos>              L = 2n + 4 tokens

So the length of a response is something the policy *chooses*, and it matters for the reward: a small
transformer cannot add many digits in one step (the direct answer is close to a guess beyond 2–3 digits),
while each scratchpad step is a local operation it learns easily, but every extra step is one more
chance to slip (and a scratchpad that runs past the length limit is cut off and scores 0). Within a
group of completions of one prompt, lengths differ by 3× to 10× whenever some completions think and
others do not: the regime where the aggregators weight responses differently (docs/paper.md).

Reward: binary, 1.0 iff the completion ends with ``answer d`` where ``d`` is the right digit (the
scratchpad itself is not graded: only the final answer, as in RLVR). Parsing is a split on whitespace;
nothing is evaluated.

Vocabulary (:data:`VOCAB`): the ten digits, ``=``, ``think``, ``answer`` and the specials ``<pad>``,
``<eos>``, ``<unk>``: the model of :func:`lab.models.digitsum_model_dir` uses exactly these tokens.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from lab.tasks.base import RewardFunc, Task, check_count, check_split, completion_text, split_of

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
THINK, ANSWER, EQUALS = "think", "answer", "="
DIGITS = tuple(str(d) for d in range(10))
VOCAB: tuple[str, ...] = (PAD, EOS, UNK, *DIGITS, EQUALS, THINK, ANSWER)

DEFAULT_DIGITS = (2, 12)  # inclusive range of digits per problem: the task's length range
MAX_DIGITS = 40


def check_digit_range(min_digits: int, max_digits: int) -> tuple[int, int]:
    """``(min_digits, max_digits)`` as ints, or ValueError naming the bad value."""
    for name, value in (("min_digits", min_digits), ("max_digits", max_digits)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_DIGITS:
            raise ValueError(f"{name} must be an integer in 1..{MAX_DIGITS}, got {value!r}")
    if min_digits > max_digits:
        raise ValueError(f"min_digits={min_digits} must be <= max_digits={max_digits}")
    return min_digits, max_digits


def answer_of(digits: Sequence[int]) -> int:
    """The correct answer: :math:`(\\sum_k d_k) \\bmod 10`."""
    return sum(int(d) for d in digits) % 10


def prompt_text(digits: Sequence[int]) -> str:
    return " ".join(str(int(d)) for d in digits) + " " + EQUALS


def direct_completion(digits: Sequence[int]) -> str:
    """The short answer, ``answer d`` (the model adds ``<eos>``)."""
    return f"{ANSWER} {answer_of(digits)}"


def scratchpad_completion(digits: Sequence[int]) -> str:
    """``think`` then, for each digit, the digit and the running sum mod 10, then ``answer d``."""
    steps, total = [], 0
    for d in digits:
        total = (total + int(d)) % 10
        steps.append(f"{int(d)} {total}")
    return f"{THINK} {' '.join(steps)} {ANSWER} {total}"


def completion_length(digits: Sequence[int], *, think: bool) -> int:
    """Tokens of a well-formed completion including ``<eos>``: 3 direct, 2n + 4 with the scratchpad."""
    return 2 * len(digits) + 4 if think else 3


def extract_answer(text: str) -> int | None:
    """The digit after the last ``answer`` token if it is the last token of the text, else None."""
    words = text.split()
    if len(words) < 2 or words[-2] != ANSWER or words[-1] not in DIGITS:
        return None
    return int(words[-1])


def score(completion: Any, digits: Sequence[int], **_: Any) -> float:
    """1.0 iff the completion ends with ``answer d`` and d is the digit sum mod 10, else 0.0."""
    answer = extract_answer(completion_text(completion))
    return 1.0 if answer is not None and answer == answer_of(digits) else 0.0


def digitsum_reward(completions: list[Any], digits: list[list[int]], **_: Any) -> list[float]:
    """TRL reward function (binary, logged as ``rewards/digitsum_reward/mean``)."""
    return [score(c, d) for c, d in zip(completions, digits, strict=True)]


def problem_key(digits: Sequence[int]) -> str:
    return "digitsum|" + "".join(str(int(d)) for d in digits)


def generate_problems(
    n: int, *, seed: int, split: str = "train", min_digits: int = DEFAULT_DIGITS[0],
    max_digits: int = DEFAULT_DIGITS[1],
) -> list[list[int]]:  # fmt: skip
    """``n`` problems of one split, the number of digits uniform in ``[min_digits, max_digits]``.

    Problems may repeat for short lengths (there are only 100 two-digit problems); a fixed hash of the
    digits decides the split, so a train problem never appears in the eval split.
    """
    check_count(n)
    check_split(split)
    lo, hi = check_digit_range(min_digits, max_digits)
    rng = random.Random(f"digitsum-{seed}-{split}")
    problems: list[list[int]] = []
    for _ in range(1000 * n + 10_000):
        digits = [rng.randrange(10) for _ in range(rng.randint(lo, hi))]
        if split_of(problem_key(digits)) == split:
            problems.append(digits)
            if len(problems) == n:
                return problems
    raise ValueError(f"could not draw {n} {split} problems with {lo}..{hi} digits")


class DigitSumTask(Task):
    """Digit sum mod 10 with an optional scratchpad (raw-text prompts; the lab's small model has no chat).

    Dataset options: ``min_digits`` and ``max_digits`` (the length range, default 2..12).
    """

    name = "digitsum"

    def _dataset(self, n: int, *, seed: int, chat: bool, split: str, **options: Any):
        import datasets

        if chat:
            raise ValueError("the digitsum task has raw-text prompts only (its model has no chat template)")
        unknown = set(options) - {"min_digits", "max_digits"}
        if unknown:
            raise ValueError(f"unknown digitsum option(s) {sorted(unknown)}; expected min_digits, max_digits")
        problems = generate_problems(n, seed=seed, split=split, **options)
        return datasets.Dataset.from_dict({"prompt": [prompt_text(p) for p in problems], "digits": problems})

    def reward_funcs(self, *, shaped: bool = False) -> list[RewardFunc]:
        if shaped:
            raise ValueError("the digitsum task has only its binary reward (shaped=False)")
        return [digitsum_reward]

    def score(self, completion: Any, **columns: Any) -> float:
        return score(completion, columns["digits"])


def policy_report(
    model,
    tokenizer,
    *,
    seed: int = 0,
    n_problems: int = 110,
    samples: int = 8,
    digits: tuple[int, int] = (2, 12),
) -> dict[str, Any]:
    """Sampled accuracy (temperature 1) of a digitsum model on held-out problems, overall and per mode.

    Returns ``accuracy``, ``think_fraction`` (share of completions that start with ``think``),
    ``accuracy_think``, ``accuracy_direct``, ``accuracy_by_digits`` ({n: accuracy}) and the sample sizes.
    """
    from lab.evaluation import sample_completions

    problems = generate_problems(
        n_problems, seed=seed, split="eval", min_digits=digits[0], max_digits=digits[1]
    )
    texts, _ = sample_completions(
        model, tokenizer, [prompt_text(p) for p in problems], num_samples=samples,
        max_new_tokens=2 * digits[1] + 8, temperature=1.0, seed=seed,
    )  # fmt: skip
    modes = {True: [0.0, 0], False: [0.0, 0]}
    by_digits: dict[int, list[float]] = {}
    for problem, completions in zip(problems, texts, strict=True):
        for text in completions:
            think = text.split()[:1] == [THINK]
            reward = score(text, problem)
            modes[think][0] += reward
            modes[think][1] += 1
            by_digits.setdefault(len(problem), []).append(reward)
    total = sum(m[1] for m in modes.values())
    return {
        "accuracy": sum(m[0] for m in modes.values()) / total,
        "think_fraction": modes[True][1] / total,
        "accuracy_think": modes[True][0] / max(modes[True][1], 1),
        "accuracy_direct": modes[False][0] / max(modes[False][1], 1),
        "accuracy_by_digits": {n: sum(r) / len(r) for n, r in sorted(by_digits.items())},
        "eval_problems": n_problems,
        "samples_per_problem": samples,
        "eval_digits": list(digits),
    }
