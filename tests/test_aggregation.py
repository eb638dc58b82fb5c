"""The estimator math: weights, unbiasedness, the α = 1 optimum, closed form against Monte Carlo."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lab.aggregation import (
    LENGTH_DISTRIBUTIONS,
    METHODS,
    aggregate_loss,
    counterfactual_cv,
    delta_l_row_weights,
    estimator_stats,
    sample_lengths,
    sequence_weights,
    simulate_estimators,
)

lengths_st = st.lists(st.integers(min_value=1, max_value=4096), min_size=1, max_size=32)
alpha_st = st.floats(min_value=0.0, max_value=3.0, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(lengths=lengths_st, alpha=alpha_st)
def test_unbiased_methods_sum_to_one_over_m(lengths, alpha):
    M = 4096
    for method in ("dr_grpo", "delta_l"):
        x = sequence_weights(lengths, method, alpha=alpha, max_length=M)
        assert float(x.sum()) == pytest.approx(1 / M, rel=1e-9)
        assert (x > 0).all()


@settings(max_examples=100, deadline=None)
@given(lengths=lengths_st)
def test_alpha_zero_is_dr_grpo(lengths):
    a = sequence_weights(lengths, "delta_l", alpha=0.0, max_length=4096)
    b = sequence_weights(lengths, "dr_grpo", max_length=4096)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


@settings(max_examples=100, deadline=None)
@given(lengths=st.lists(st.integers(1, 4096), min_size=2, max_size=16), data=st.data())
def test_alpha_one_minimizes_variance_among_unbiased_weights(lengths, data):
    """Σ x_i² L_i over weights with Σ x_i = 1/M is smallest at x_i ∝ 1/L_i (the Lagrangian optimum)."""
    M = 4096
    L = torch.tensor(lengths, dtype=torch.float64)
    best = estimator_stats(L, "delta_l", alpha=1.0, max_length=M)["variance"]
    raw = data.draw(st.lists(st.floats(0.01, 10.0), min_size=len(lengths), max_size=len(lengths)))
    other = torch.tensor(raw, dtype=torch.float64)
    other = other / other.sum() / M  # any positive weights with the same sum
    assert best <= float((other.square() * L).sum()) * (1 + 1e-9)
    assert best == pytest.approx(1 / (M * M * float((1 / L).sum())), rel=1e-9)  # V / (M² Σ 1/L)
    for alpha in (0.0, 0.5, 0.75, 2.0):
        assert best <= estimator_stats(L, "delta_l", alpha=alpha, max_length=M)["variance"] * (1 + 1e-9)


def test_grpo_and_dapo_scale_moves_with_lengths():
    short, long = [10, 20, 30, 40], [1000, 2000, 3000, 4000]
    for method in ("grpo", "dapo"):
        s_short = float(sequence_weights(short, method, max_length=4096).sum())
        s_long = float(sequence_weights(long, method, max_length=4096).sum())
        assert s_short == pytest.approx(100 * s_long)  # lengths ×100 ⇒ update ÷100: the bias
    for method in ("dr_grpo", "delta_l"):
        s_short = float(sequence_weights(short, method, max_length=4096).sum())
        s_long = float(sequence_weights(long, method, max_length=4096).sum())
        assert s_short == pytest.approx(s_long)


def test_weight_formulas_on_a_small_example():
    L, M = torch.tensor([1.0, 2.0, 4.0]), 8
    torch.testing.assert_close(sequence_weights(L, "grpo", max_length=M), 1 / (3 * L.double()))
    torch.testing.assert_close(
        sequence_weights(L, "dapo", max_length=M), torch.full((3,), 1 / 7, dtype=torch.float64)
    )
    torch.testing.assert_close(
        sequence_weights(L, "dr_grpo", max_length=M), torch.full((3,), 1 / 24, dtype=torch.float64)
    )
    inv = 1 / L.double()
    torch.testing.assert_close(sequence_weights(L, "delta_l", alpha=1.0, max_length=M), inv / (M * inv.sum()))


def test_zero_length_rows_get_zero_weight_and_do_not_count():
    with_zero = sequence_weights([0, 10, 20], "dr_grpo", max_length=32)
    assert with_zero[0] == 0
    torch.testing.assert_close(with_zero[1:], sequence_weights([10, 20], "dr_grpo", max_length=32))
    for method in METHODS:
        assert float(sequence_weights([0, 0], method, max_length=8).abs().sum()) == 0.0


def test_batched_groups_match_one_group_at_a_time():
    L = sample_lengths("lognormal", group_size=6, n_groups=5, min_length=5, max_length=500, seed=3)
    for method in METHODS:
        batched = sequence_weights(L, method, alpha=0.75, max_length=512)
        for g in range(5):
            torch.testing.assert_close(batched[g], sequence_weights(L[g], method, alpha=0.75, max_length=512))


def test_delta_l_stable_for_huge_alpha_and_lengths():
    x = sequence_weights([1, 10**6], "delta_l", alpha=50.0, max_length=10**6)
    assert torch.isfinite(x).all() and float(x.sum()) == pytest.approx(1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(lengths=[1, 2], method="mean"), "'mean'"),
        (dict(lengths=[1, 2], method="delta_l", alpha=-0.5), "-0.5"),
        (dict(lengths=[1, 2], method="delta_l", alpha=float("nan")), "nan"),
        (dict(lengths=[1, 2], method="delta_l", alpha=float("inf")), "inf"),
        (dict(lengths=[1, -3], method="grpo"), "-3"),
        (dict(lengths=[], method="grpo"), "empty"),
        (dict(lengths=[5, 100], method="dr_grpo", max_length=50), "max_length=50"),
        (dict(lengths=[5, 10], method="dr_grpo", max_length=0), "max_length"),
    ],
)
def test_bad_arguments_name_the_bad_value(kwargs, match):
    kwargs.setdefault("max_length", 4096)
    with pytest.raises(ValueError, match=match):
        sequence_weights(**kwargs)


def test_aggregate_loss_matches_explicit_sums():
    torch.manual_seed(0)
    loss = torch.randn(4, 6, dtype=torch.float64)
    mask = torch.zeros(4, 6, dtype=torch.float64)
    for i, n in enumerate([6, 3, 1, 4]):
        mask[i, :n] = 1
    L = mask.sum(-1)
    row_sums = (loss * mask).sum(-1)
    assert float(aggregate_loss(loss, mask, "grpo", max_length=6)) == pytest.approx(
        float((row_sums / L).mean())
    )
    assert float(aggregate_loss(loss, mask, "dapo", max_length=6)) == pytest.approx(
        float(row_sums.sum() / L.sum())
    )
    assert float(aggregate_loss(loss, mask, "dr_grpo", max_length=6)) == pytest.approx(
        float(row_sums.sum() / 24)
    )
    with pytest.raises(ValueError, match="shape"):
        aggregate_loss(loss, mask[:, :3], "grpo", max_length=6)


def test_delta_l_row_weights_turn_dr_grpo_normalizer_into_delta_l():
    L = torch.tensor([3.0, 7.0, 12.0, 1.0, 5.0, 9.0])
    M, N = 16, 6
    w = delta_l_row_weights(L, alpha=1.0, max_length=M)
    torch.testing.assert_close(w / (N * M), sequence_weights(L, "delta_l", alpha=1.0, max_length=M))
    assert float(w.mean()) == pytest.approx(1.0)  # official: w_i = L_i^-α / mean_j L_j^-α
    grouped = delta_l_row_weights(L, alpha=1.0, max_length=M, group_size=3)
    assert float(grouped[:3].sum()) == pytest.approx(3.0) and float(grouped[3:].sum()) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="group_size=4"):
        delta_l_row_weights(L, max_length=M, group_size=4)


def test_closed_form_matches_monte_carlo():
    L = torch.tensor([50.0, 120.0, 700.0, 3000.0, 64.0, 900.0, 1500.0, 220.0])
    M, n = 3072, 100_000
    sim = simulate_estimators(L, alpha=1.0, max_length=M, n_trials=n, seed=1)
    for method in METHODS:
        stats = estimator_stats(L, method, alpha=1.0, max_length=M)
        # sample variance of n normals: relative sd ≈ sqrt(2/n) ≈ 0.45 %; allow 5 sd
        assert sim[method]["variance"] == pytest.approx(stats["variance"], rel=5 * math.sqrt(2 / n))
        assert sim[method]["mean"] == pytest.approx(stats["scale"], abs=5 * math.sqrt(stats["variance"] / n))
        # cv = sd/mean: relative error ≈ sqrt(cv²/n + 1/(2n)) (mean and sd estimation); allow 5 sd
        cv_tol = 5 * math.sqrt(stats["cv"] ** 2 / n + 1 / (2 * n))
        assert sim[method]["cv"] == pytest.approx(stats["cv"], rel=cv_tol)


def test_cv_ordering_from_the_paper():
    """GRPO and ΔL(α=1) share the lowest CV; DAPO and Dr. GRPO share a higher one."""
    L = sample_lengths("uniform", group_size=8, min_length=50, max_length=3000, seed=0)[0]
    cv = counterfactual_cv(L, alpha=1.0, max_length=3072)
    assert cv["grpo"] == pytest.approx(cv["delta_l"])
    assert cv["dapo"] == pytest.approx(cv["dr_grpo"])
    assert cv["delta_l"] < cv["dr_grpo"]


def test_monte_carlo_shows_bias_with_varying_lengths():
    L = sample_lengths("bimodal", group_size=8, n_groups=4000, min_length=20, max_length=2000, seed=2)
    sim = simulate_estimators(L, max_length=2048, seed=2)
    for method in ("dr_grpo", "delta_l"):
        assert float(sim[method]["scale"].std()) < 1e-12  # Σx = 1/M whatever the lengths
    assert float(sim["grpo"]["scale"].std()) > 0.1 * float(sim["grpo"]["scale"].mean())


@pytest.mark.parametrize("distribution", LENGTH_DISTRIBUTIONS)
def test_sample_lengths_in_bounds(distribution):
    L = sample_lengths(distribution, group_size=16, n_groups=50, min_length=7, max_length=300, seed=1)
    assert L.shape == (50, 16) and float(L.min()) >= 7 and float(L.max()) <= 300
    with pytest.raises(ValueError, match="zipf"):
        sample_lengths("zipf", group_size=4)
