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


# --- which tokens carry the variance (lab.worlds.paperworld_token_kinds and the per-token score norms) ---
WELL_FORMED = "5 d4 c3 b2 a1 <eos>".split()


def test_a_well_formed_completion_has_one_kind_per_role():
    from lab.worlds import paperworld_token_kinds, paperworld_well_formed

    assert paperworld_token_kinds(WELL_FORMED) == [
        "answer",
        "length",
        "filler_ok",
        "filler_ok",
        "filler_ok",
        "eos",
    ]
    assert paperworld_token_kinds(["7", "<eos>"]) == ["answer", "length"]  # k = 0: <eos> is the length choice
    assert paperworld_token_kinds(["0", "a1", "<eos>"]) == ["answer", "length", "eos"]
    assert paperworld_well_formed(WELL_FORMED) and paperworld_well_formed(["7", "<eos>"])
    assert not paperworld_well_formed(
        WELL_FORMED[:-1]
    )  # cut before its <eos>: no kind is off, still not whole


@pytest.mark.parametrize("j", range(2, len(WELL_FORMED)))
def test_a_miscount_at_position_j_makes_it_and_everything_after_off(j):
    from lab.worlds import paperworld_token_kinds

    for wrong in ("c9", "a29", "<eos>", "7", "<unk>"):  # a wrong number, an early <eos>, not a filler
        tokens = [*WELL_FORMED[:j], wrong, *WELL_FORMED[j + 1 :]]
        if tokens == WELL_FORMED:  # <eos> at the end is right
            continue
        tokens = tokens[: tokens.index("<eos>") + 1] if "<eos>" in tokens else tokens
        kinds = paperworld_token_kinds(tokens)
        assert kinds[:j] == paperworld_token_kinds(WELL_FORMED)[:j]
        assert set(kinds[j:]) == {"off"}, (tokens, kinds)


@pytest.mark.parametrize(
    ("text", "kinds"),
    [
        ("<eos>", ["off"]),  # no answer at all
        ("= 5 a1 <eos>", ["off"] * 4),  # not a digit first
        ("5 7 a1 <eos>", ["answer", "off", "off", "off"]),  # neither a filler nor <eos> at the length choice
        (
            "5 b2 a1 c1 <eos>",
            ["answer", "length", "filler_ok", "off", "off"],
        ),  # a filler after the one numbered 1
        ("5 b2 <eos>", ["answer", "length", "off"]),  # <eos> before the count reaches 1
        ("5 b2 <unk> a1 <eos>", ["answer", "length", "off", "off", "off"]),  # back on count, still off
        ("5 b2 a1 <pad>", ["answer", "length", "filler_ok", "off"]),
    ],
)
def test_malformed_completions_are_off_from_the_first_bad_token(text, kinds):
    from lab.worlds import paperworld_token_kinds

    assert paperworld_token_kinds(text.split()) == kinds


def test_a_token_after_the_eos_is_refused():
    from lab.worlds import paperworld_token_kinds

    with pytest.raises(ValueError, match="after the completion's <eos>"):
        paperworld_token_kinds(["5", "<eos>", "a1"])


word_lists = st.one_of(
    st.tuples(st.integers(0, 9), symbol_lists).map(lambda a: completion(*a).split()),  # well-formed
    st.lists(st.sampled_from(["3", "=", "<unk>", "<pad>", "a1", "b2", "c3", "d30", "a29"]), max_size=6),
)


@given(word_lists, st.integers(0, 6), st.sampled_from(["a1", "b2", "7", "d30"]))
def test_well_formed_is_what_the_task_accepts(words, at, swap):
    from lab.worlds import paperworld_token_kinds, paperworld_well_formed

    if words and at < len(words):
        words = [*words[:at], swap, *words[at + 1 :]]  # sometimes a corruption, sometimes the same word
    tokens = [*words, "<eos>"]
    assert paperworld_well_formed(tokens) == (filler_count(" ".join(words)) is not None)
    kinds = paperworld_token_kinds(tokens)
    assert len(kinds) == len(tokens) and set(kinds) <= {"answer", "length", "filler_ok", "off", "eos"}
    if "off" in kinds:  # off is absorbing
        assert set(kinds[kinds.index("off") :]) == {"off"}


def test_miscount_rate_counts_first_breaks_after_the_length_choice():
    from lab.worlds import miscount_rate, paperworld_token_kinds

    rows = [
        paperworld_token_kinds(t.split()) for t in ("5 b2 a1 <eos>", "5 b3 c1 a1 <eos>", "5 <eos>", "= 5")
    ]
    # at risk: a1 <eos> (2), c1 (1; the break, and nothing after it is at risk); "= 5" breaks at position 0
    assert miscount_rate(rows) == pytest.approx(1 / 3)
    assert miscount_rate([["answer", "length"]]) is None


def test_score_norms_by_kind_add_up_and_ignore_the_padding():
    from lab.worlds import TOKEN_KINDS, paperworld_token_kinds, score_norms_by_kind

    texts = ("5 b2 a1 <eos>", "5 <eos>", "5 c3 a2 b7 d9 <eos>", "3 a1 <eos>")
    kinds = [paperworld_token_kinds(t.split()) for t in texts]
    norms = torch.full((4, 8), 1e9, dtype=torch.float64)  # past each row's length: must not count
    for i, row in enumerate(kinds):
        norms[i, : len(row)] = torch.arange(1.0, len(row) + 1)
    out = score_norms_by_kind(norms, kinds, bins=(1, 4))
    by = out["by_kind"]
    assert sum(by[k]["tokens"] for k in TOKEN_KINDS) == out["tokens"] == sum(map(len, kinds)) == 15
    assert sum(by[k]["share"] for k in TOKEN_KINDS) == pytest.approx(1.0)
    assert out["total"] == pytest.approx(sum(n * (n + 1) / 2 for n in map(len, kinds)))
    assert by["off"]["tokens"] == 3 and by["off"]["mean"] == pytest.approx((4 + 5 + 6) / 3)
    assert by["answer"]["mean"] == 1.0 and by["eos"]["tokens"] == 2
    short, long = out["by_length"]
    assert (short["min_length"], short["rows"], short["off_rows"], short["tokens"]) == (1, 2, 0, 5)
    assert (long["rows"], long["off_rows"], long["tokens"]) == (2, 1, 10)
    assert long["off_token_share"] == pytest.approx(3 / 10) and long["mean_norm_off"] == pytest.approx(5.0)
    with pytest.raises(ValueError, match="one kinds list per row"):
        score_norms_by_kind(norms[:3], kinds)
    with pytest.raises(ValueError, match="unknown token kinds"):
        score_norms_by_kind(norms, [["answer"], ["ok"], ["eos"], ["off"]])


def test_per_token_score_norms_are_each_tokens_own_gradient(model_dir):
    """The prefix-difference norms equal an independent backward of one token's log-probability, and the
    per-token gradients add up to the row gradient of one full backward."""
    from lab.models import load_model_and_tokenizer
    from lab.probes import linear_per_sample_gradients, own_linear_layers, sample_generation_batch
    from lab.worlds import batch_tokens, paperworld_token_kinds, per_token_score_norms

    torch.set_num_threads(1)
    model, tokenizer = load_model_and_tokenizer("paperworld-tiny", dtype=torch.float32)
    data = get_task("paperworld").train_dataset(2, seed=5, chat=False)
    batch = sample_generation_batch(
        model, tokenizer, data["prompt"], num_generations=4, max_new_tokens=MAX_COMPLETION_LENGTH, seed=5
    )
    norms, s, _ = per_token_score_norms(model, batch, chunk=3)  # chunks that split a prompt's group
    L = batch["lengths"]
    assert norms.shape == batch["completion_ids"].shape and s.shape[0] == 8
    full, _ = linear_per_sample_gradients(
        model, batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], batch["completion_mask"]
    )
    assert torch.allclose(s, full, rtol=1e-4, atol=1e-5)
    assert all(float(norms[i, L[i] :].abs().sum()) == 0 for i in range(8))
    assert bool((norms[torch.arange(norms.shape[1]) < L.unsqueeze(1)] > 0).all())
    weights = [m.weight for _, m in own_linear_layers(model)] + [
        m.bias for _, m in own_linear_layers(model) if m.bias is not None
    ]
    i = int(L.argmax())
    ids = torch.cat([batch["prompt_ids"][i], batch["completion_ids"][i, : L[i]]]).unsqueeze(0)
    logp = torch.log_softmax(model(input_ids=ids).logits[0, -int(L[i]) - 1 : -1], -1)
    for t in sorted({0, 1, int(L[i]) // 2, int(L[i]) - 1}):
        grads = torch.autograd.grad(logp[t, batch["completion_ids"][i, t]], weights, retain_graph=True)
        assert float(norms[i, t]) == pytest.approx(sum(float(g.square().sum()) for g in grads), rel=1e-3)
    assert len(batch_tokens(tokenizer, batch["completion_ids"], batch["completion_mask"])[i]) == int(L[i])
    paperworld_token_kinds(batch_tokens(tokenizer, batch["completion_ids"], batch["completion_mask"])[i])


def test_cv_under_a_line_is_the_power_law_at_zero_intercept():
    from lab.worlds import cv_under_affine, cv_under_power_law, cv_under_variance, family_ratios

    L = torch.tensor([2.0, 3, 5, 8, 13, 21, 30, 4])
    assert cv_under_affine(L, 0.0, 1.0, max_length=36) == pytest.approx(
        cv_under_power_law(L, 1.0, max_length=36)
    )
    # the scale V cancels in the ratios; an intercept pulls Dr. GRPO / ΔL towards (and past) 1
    ratio = family_ratios(cv_under_affine(L, 0.0, 7.0, max_length=36))["dr_grpo/delta_l"]
    assert ratio == pytest.approx(family_ratios(cv_under_power_law(L, 1.0, max_length=36))["dr_grpo/delta_l"])
    assert family_ratios(cv_under_affine(L, 20.0, 5.0, max_length=36))["dr_grpo/delta_l"] < ratio
    flat = cv_under_affine(L, 5.0, 0.0, max_length=36)  # Var constant: the uniform weights are best
    assert flat["dr_grpo"] < flat["delta_l"]
    with pytest.raises(ValueError, match="one variance per length"):
        cv_under_variance(L, torch.ones(3), max_length=36)


def test_paperworld_variance_on_a_tiny_batch(model_dir):
    """The whole measurement on 16 rows: the row counts agree with the labels, and the report renders."""
    from lab.worlds import TOKEN_KINDS, paperworld_variance
    from tests.test_benchmarks_smoke import load

    torch.set_num_threads(1)
    r = paperworld_variance(prompts=2, num_generations=8, seed=1, n_bootstrap=20, fit_bootstrap=20)
    norms = r["score_norms"]
    assert r["rows"] == 16 and r["well_formed_rows"] + r["off_rows"] == 16
    assert r["all"]["rows"] == 16 and r["well_formed"]["rows"] == r["well_formed_rows"]
    assert sum(b["rows"] for b in norms["by_length"]) == 16
    assert sum(norms["by_kind"][k]["tokens"] for k in TOKEN_KINDS) == norms["tokens"]
    assert sum(b["off_rows"] for b in norms["by_length"]) == r["off_rows"]
    assert r["well_formed"]["mean_length"] * r["well_formed_rows"] <= r["all"]["mean_length"] * 16
    text = load("paperworld_variance").report(r)
    assert "well-formed rows" in text and "filler_ok" in text
