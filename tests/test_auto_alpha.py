"""α from the measured variance: converges to the exponent of Var(g_i) ∝ L_i^k, clips, waits for probes."""

from __future__ import annotations

import math

import pytest
import torch

from lab.auto_alpha import AlphaFromProbes, is_auto
from lab.probes import group_labels, unbiased_variances

G, PROMPTS, P = 8, 8, 64


def probe_record(k: float, seed: int) -> dict:
    """Per-sample gradients with Var(g_i) = L_i^k per coordinate around a shared group mean, estimated
    with the lab's unbiased estimator, as a probes.jsonl record."""
    gen = torch.Generator().manual_seed(seed)
    L = torch.randint(4, 200, (G * PROMPTS,), generator=gen).double()
    mean = torch.randn(PROMPTS, P, generator=gen, dtype=torch.float64).repeat_interleave(G, 0)
    grads = (
        mean + torch.randn(G * PROMPTS, P, generator=gen, dtype=torch.float64) * (L**k / P).sqrt()[:, None]
    )
    v = unbiased_variances(grads, group_labels(L.numel(), G))
    return {"lengths": L.tolist(), "grad_variances": v.tolist()}


@pytest.mark.parametrize("k", [0.5, 1.0, 1.5])
def test_alpha_converges_to_the_variance_exponent(k):
    auto = AlphaFromProbes(group_size=G, smoothing=0.5, n_bootstrap=50)
    for i in range(12):
        entry = auto.update(probe_record(k, seed=i), step=i + 1)
    assert abs(auto.alpha - k) < 0.15, auto.history
    assert entry["k_lo"] <= k <= entry["k_hi"] or abs(entry["k"] - k) < 0.15


def test_alpha_waits_for_enough_probes_and_then_moves():
    auto = AlphaFromProbes(group_size=G, min_probes=3, n_bootstrap=20)
    first = [auto.update(probe_record(2.0, seed=i), step=i).copy() for i in range(2)]
    assert [e["alpha"] for e in first] == [1.0, 1.0] and not any(e["updated"] for e in first)
    assert auto.update(probe_record(2.0, seed=9), step=3)["updated"] and auto.alpha > 1.2


def test_alpha_is_clipped_to_its_range():
    auto = AlphaFromProbes(group_size=G, alpha_max=1.2, min_probes=1, smoothing=1.0, n_bootstrap=20)
    auto.update(probe_record(3.0, seed=0), step=1)
    assert auto.alpha == pytest.approx(1.2)
    zero = AlphaFromProbes(group_size=G, min_probes=1, smoothing=1.0, n_bootstrap=20)
    record = probe_record(0.0, seed=1)
    record["grad_variances"] = [
        v / length**1.5 for v, length in zip(record["grad_variances"], record["lengths"], strict=True)
    ]
    zero.update(record, step=1)
    assert zero.alpha == 0.0  # a fitted k < 0 is clipped to 0 (Dr. GRPO's equal weights)


def test_an_unusable_probe_keeps_alpha():
    auto = AlphaFromProbes(min_probes=1, n_bootstrap=20)
    entry = auto.update({"lengths": [5, 5, 5], "grad_variances": [math.nan] * 3}, step=1)
    assert not entry["updated"] and auto.alpha == 1.0 and math.isnan(entry["k"])


@pytest.mark.parametrize(
    "kwargs, message",
    [({"alpha_max": 0}, "alpha_max"), ({"window": 0}, "window"), ({"smoothing": 0}, "smoothing"),
     ({"start": 3.0}, "start"), ({"min_probes": 0}, "min_probes")],
)  # fmt: skip
def test_bad_settings_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AlphaFromProbes(**kwargs)


def test_mismatched_record_is_refused():
    with pytest.raises(ValueError, match="2 lengths but 3 variances"):
        AlphaFromProbes().update({"lengths": [1, 2], "grad_variances": [1, 2, 3]}, step=1)


def test_is_auto():
    assert is_auto("auto") and is_auto(" AUTO ") and not is_auto(1.0) and not is_auto("1.0")


# -- wired in: config, run config, a real run ------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, message",
    [({"loss_type": "grpo"}, "needs loss_type 'delta_l', got 'grpo'"),
     ({"num_generations": 2, "per_device_train_batch_size": 2, "generation_batch_size": 2},
      "needs num_generations >= 3"),
     ({"delta_l_alpha": "often"}, "alpha must be a number >= 0 or 'auto', got 'often'")],
)  # fmt: skip
def test_trainer_config_refuses_auto_where_probes_cannot_run(tmp_path, overrides, message):
    from lab.trainer import DeltaLGRPOConfig

    settings = {"output_dir": str(tmp_path), "report_to": [], "use_cpu": True, "bf16": False}
    with pytest.raises(ValueError, match=message):
        DeltaLGRPOConfig(**{"delta_l_alpha": "auto", **settings, **overrides})


def test_run_config_refuses_auto_for_other_aggregators_before_anything_exists(tmp_path):
    from lab.runner import RunConfig

    with pytest.raises(ValueError, match="needs loss_type 'delta_l', got 'dapo'"):
        RunConfig(aggregator="dapo", alpha="auto").resolved()
    with pytest.raises(ValueError, match="needs num_generations >= 3"):
        RunConfig(aggregator="delta_l", alpha="auto", num_generations=2).resolved()
    resolved = RunConfig(aggregator="delta_l", alpha="auto", probe_every=0, preset="fast").resolved()
    assert resolved.probe_every >= 1 and resolved.run_id == "delta_l-aauto-s0"


def test_a_fast_run_with_auto_alpha_logs_a_moving_alpha(tmp_path):
    from lab.runlog import read_jsonl
    from lab.runner import RunConfig, train_run

    config = RunConfig(aggregator="delta_l", alpha="auto", steps=6, probe_every=2, preset="fast",
                       compare_gradients_every=0)  # fmt: skip
    run_dir = train_run(config, tmp_path / "run", quiet=True)
    rows, _ = read_jsonl(run_dir / "metrics.jsonl")
    alphas = [r["delta_l/alpha"] for r in rows]
    assert len(alphas) == 6 and alphas[0] == 1.0  # starts at the paper's α until two probes exist
    assert len(set(alphas)) > 1, alphas  # then follows the measured exponent
    assert any("delta_l/alpha_fit_k" in r for r in rows)
