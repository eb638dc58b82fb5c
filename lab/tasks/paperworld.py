r"""Paper world: a fast task where the paper's assumption holds by construction.

A prompt is two digits, ``"3 5 ="``; the graded answer is the larger of the two (here 5), written as the
**first** token of the completion (a lookup the small model learns in seconds; the sum modulo 10 took it
hundreds of steps to even start on, a plateau whose length would differ across machines). After it the policy writes ``k`` filler tokens, then ``<eos>``:

.. code-block:: text

    prompt        3 5 =
    completion    5 c4 a3 d2 a1 <eos>                 k = 4 fillers, L = k + 2 = 6 tokens
    completion    5 <eos>                             k = 0,         L = 2 tokens

A filler token is a symbol (one of :data:`SYMBOLS`) with the number of fillers still to come, counting
down to 1: the first filler's number is the policy's choice of ``k`` (one token decides the length),
each later number is fixed by the one before, and each symbol is drawn from the equiprobable
:data:`SYMBOLS`. So:

- **the policy chooses its length** (the first filler token, or ``<eos>`` for k = 0);
- **the length carries no information about the reward**: the answer comes before the length is chosen,
  and the warm-up (:func:`lab.models.build_paperworld_model`) draws k independently of the answer;
- **every filler adds score-function noise**: its symbol is a fresh uniform choice, whose score
  :math:`\nabla_\theta \log \pi(o_t \mid \cdot)` has mean zero given everything before it; the count-down
  numbers are (nearly) deterministic and add (nearly) nothing. Summed over the response, the score
  terms are martingale differences, so :math:`\mathrm{Var}(g_i) \approx a + V L_i` (the answer and the
  length choice are the intercept), and :math:`E[g_i \mid L_i]` is the answer's term alone, whatever
  :math:`L_i`.

Reward: binary, 1.0 iff the first whitespace-separated word of the completion is the right digit. The
fillers are never graded (a miscounted or malformed filler costs nothing: it must not, or length would
carry reward information); a completion that does not start with a digit scores 0. Parsing is a split on
whitespace; nothing is evaluated.

Vocabulary (:data:`VOCAB`): the specials ``<pad>``, ``<eos>``, ``<unk>``, the ten digits, ``=`` and the
filler tokens ``a1 .. d30``: the model of :func:`lab.models.paperworld_model_dir` uses exactly these.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from lab.tasks.base import RewardFunc, Task, check_count, check_split, completion_text, split_of

PAD, EOS, UNK, EQUALS = "<pad>", "<eos>", "<unk>", "="
DIGITS = tuple(str(d) for d in range(10))
SYMBOLS = ("a", "b", "c", "d")  # equiprobable filler symbols: each filler token is one fresh choice
MAX_FILLERS = 30  # k in 0..MAX_FILLERS, so L = k + 2 in 2..32
FILLERS = tuple(f"{s}{n}" for n in range(1, MAX_FILLERS + 1) for s in SYMBOLS)
VOCAB: tuple[str, ...] = (PAD, EOS, UNK, *DIGITS, EQUALS, *FILLERS)
#: completion tokens (with ``<eos>``) of the longest well-formed completion, plus 4 of slack for a miscount
MAX_COMPLETION_LENGTH = MAX_FILLERS + 2 + 4


def check_problem(problem: Sequence[int]) -> tuple[int, int]:
    """``(a, b)`` as two digits, or ValueError naming the bad value."""
    if len(problem) != 2 or not all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= 9 for d in problem
    ):
        raise ValueError(f"a paper-world problem is two digits 0..9, got {problem!r}")
    return int(problem[0]), int(problem[1])


def answer_of(problem: Sequence[int]) -> int:
    """The graded answer: :math:`\\max(a, b)`."""
    a, b = check_problem(problem)
    return max(a, b)


def prompt_text(problem: Sequence[int]) -> str:
    a, b = check_problem(problem)
    return f"{a} {b} {EQUALS}"


def fillers(symbols: Sequence[str]) -> str:
    """The filler tokens for these symbols: ``["c", "a"]`` → ``"c2 a1"`` (numbers count down to 1)."""
    k = len(symbols)
    if k > MAX_FILLERS:
        raise ValueError(f"at most {MAX_FILLERS} fillers, got {k}")
    bad = [s for s in symbols if s not in SYMBOLS]
    if bad:
        raise ValueError(f"filler symbols must be among {SYMBOLS}, got {bad[0]!r}")
    return " ".join(f"{s}{k - j}" for j, s in enumerate(symbols))


def completion(answer: int, symbols: Sequence[str]) -> str:
    """``answer`` then the fillers (the model adds ``<eos>``): a completion of ``len(symbols) + 2`` tokens."""
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer <= 9:
        raise ValueError(f"answer must be a digit 0..9, got {answer!r}")
    return " ".join([str(answer), fillers(symbols)]) if symbols else str(answer)


def extract_answer(text: str) -> int | None:
    """The digit that the completion starts with, or None (empty, or a first word that is not a digit)."""
    words = text.split()
    return int(words[0]) if words and words[0] in DIGITS else None


def filler_count(text: str) -> int | None:
    """k of a well-formed completion (answer, then fillers counting down to 1), else None (diagnostics
    only: the reward never looks at the fillers)."""
    words = text.split()
    if not words or words[0] not in DIGITS:
        return None
    rest = words[1:]
    for j, word in enumerate(rest):
        if word not in FILLERS or int(word[1:]) != len(rest) - j:
            return None
    return len(rest)


def score(completion: Any, problem: Sequence[int], **_: Any) -> float:
    """1.0 iff the completion's first word is the digit :math:`\\max(a, b)`, else 0.0."""
    answer = extract_answer(completion_text(completion))
    return 1.0 if answer is not None and answer == answer_of(problem) else 0.0


def paperworld_reward(completions: list[Any], problem: list[list[int]], **_: Any) -> list[float]:
    """TRL reward function (binary, logged as ``rewards/paperworld_reward/mean``)."""
    return [score(c, p) for c, p in zip(completions, problem, strict=True)]


def problem_key(problem: Sequence[int]) -> str:
    a, b = check_problem(problem)
    return f"paperworld|{a}{b}"


ALL_PROBLEMS: tuple[tuple[int, int], ...] = tuple((a, b) for a in range(10) for b in range(10))


def split_problems(split: str) -> list[list[int]]:
    """Every problem of one split (a fixed hash decides; about 1 in 8 of the 100 is held out)."""
    check_split(split)
    return [list(p) for p in ALL_PROBLEMS if split_of(problem_key(p)) == split]


def generate_problems(n: int, *, seed: int, split: str = "train") -> list[list[int]]:
    """``n`` problems of one split, drawn uniformly with replacement from it (there are only 100)."""
    check_count(n)
    pool = split_problems(split)
    rng = random.Random(f"paperworld-{seed}-{split}")
    return [list(rng.choice(pool)) for _ in range(n)]


def heldout_problems(n: int) -> list[list[int]]:
    """``n`` eval-split problems that do not depend on any seed: the eval set cycled in a fixed order."""
    check_count(n)
    pool = split_problems("eval")
    return [list(pool[i % len(pool)]) for i in range(n)]


class PaperWorldTask(Task):
    """The paper's world (raw-text prompts; the lab's small model has no chat). No dataset options.

    The eval split is a fixed list of held-out problems (:func:`heldout_problems`), the same for every
    seed: the held-out evaluation then compares every run on identical problems.
    """

    name = "paperworld"

    def _dataset(self, n: int, *, seed: int, chat: bool, split: str, **options: Any):
        import datasets

        if chat:
            raise ValueError("the paperworld task has raw-text prompts only (its model has no chat template)")
        if options:
            raise ValueError(f"the paperworld task takes no options, got {sorted(options)}")
        problems = generate_problems(n, seed=seed, split=split) if split == "train" else heldout_problems(n)
        return datasets.Dataset.from_dict({"prompt": [prompt_text(p) for p in problems], "problem": problems})

    def reward_funcs(self, *, shaped: bool = False) -> list[RewardFunc]:
        if shaped:
            raise ValueError("the paperworld task has only its binary reward (shaped=False)")
        return [paperworld_reward]

    def score(self, completion: Any, **columns: Any) -> float:
        return score(completion, columns["problem"])


def policy_report(
    model, tokenizer, *, seed: int = 0, samples: int = 64, group_size: int = 8
) -> dict[str, Any]:
    """Sampled accuracy (temperature 1) and the length distribution of a paper-world model.

    Samples ``samples`` completions of each of the 100 problems. Returns ``accuracy``,
    ``accuracy_short`` / ``accuracy_long`` (completions below / at or above the median length: equal when
    length carries no information), ``well_formed`` (share whose fillers count down correctly),
    ``length_quantiles`` (5, 25, 50, 75, 95%), ``mean_length``, ``length_histogram`` ({L: share}),
    ``group_length_ratio_median`` (median over groups of ``group_size`` completions of one prompt of longest
    / shortest) and the sample sizes.
    """
    import statistics

    from lab.evaluation import sample_completions

    problems = [list(p) for p in ALL_PROBLEMS]
    texts, lengths = sample_completions(
        model, tokenizer, [prompt_text(p) for p in problems], num_samples=samples,
        max_new_tokens=MAX_COMPLETION_LENGTH, temperature=1.0, seed=seed, batch_size=512,
    )  # fmt: skip
    flat = [(score(t, p), n, filler_count(t)) for p, ts, ns in zip(problems, texts, lengths, strict=True)
            for t, n in zip(ts, ns, strict=True)]  # fmt: skip
    all_lengths = sorted(n for _, n, _ in flat)
    median = statistics.median(all_lengths)
    short = [r for r, n, _ in flat if n < median]
    long = [r for r, n, _ in flat if n >= median]
    ratios = [max(ns[i : i + group_size]) / min(ns[i : i + group_size])
              for ns in lengths for i in range(0, len(ns) - group_size + 1, group_size)]  # fmt: skip
    histogram: dict[int, float] = {}
    for n in all_lengths:
        histogram[n] = histogram.get(n, 0.0) + 1 / len(all_lengths)
    return {
        "accuracy": sum(r for r, _, _ in flat) / len(flat),
        "accuracy_short": sum(short) / max(len(short), 1),
        "accuracy_long": sum(long) / max(len(long), 1),
        "well_formed": sum(k is not None for _, _, k in flat) / len(flat),
        "length_quantiles": [
            all_lengths[int(q * (len(all_lengths) - 1))] for q in (0.05, 0.25, 0.5, 0.75, 0.95)
        ],
        "mean_length": sum(all_lengths) / len(all_lengths),
        "length_histogram": histogram,
        "group_length_ratio_median": statistics.median(ratios),
        "problems": len(problems),
        "samples_per_problem": samples,
    }
