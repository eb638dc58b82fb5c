"""Aggregators from the registry in runs: TRL settings per loss, comparisons beside ΔL, labels with their own α."""

from __future__ import annotations

import pytest

from lab.aggregation import METHODS
from lab.aggregators import (
    AGGREGATORS,
    DEFAULT_AGGREGATORS,
    TRL_LOSS_TYPES,
    order_key,
    parse_names,
    split_label,
)
from lab.dashboard.colors import color_for, display_name


def test_every_trl_loss_type_and_gspo_is_registered_with_its_own_colour():
    assert set(TRL_LOSS_TYPES) | {"delta_l", "gspo"} == set(AGGREGATORS)
    assert len({a.color for a in AGGREGATORS.values()}) == len(AGGREGATORS)
    assert [color_for(n) for n in AGGREGATORS] == [a.color for a in AGGREGATORS.values()]
    assert display_name("dr_grpo") == "Dr. GRPO" and display_name("cispo") == "CISPO"
    assert AGGREGATORS["gspo"].trl_settings == {"importance_sampling_level": "sequence"}
    assert (
        [n for n, a in AGGREGATORS.items() if a.weights_known] == list(METHODS) == list(DEFAULT_AGGREGATORS)
    )


def test_names_and_labels_parse_or_are_refused_by_name():
    assert parse_names("cispo, dapo,delta_l,cispo") == ["cispo", "dapo", "delta_l"]
    assert split_label("delta_l-a0.75") == ("delta_l", 0.75) and split_label("delta_l-aauto") == (
        "delta_l",
        "auto",
    )
    assert split_label("sapo") == ("sapo", None)
    for bad in ("ppo", "dapo-a0.5", "delta_l-ax"):
        with pytest.raises(ValueError):
            split_label(bad)
    with pytest.raises(ValueError, match=r"unknown aggregator\(s\) \['ppo'\]"):
        parse_names("dapo,ppo")
    assert sorted(["delta_l-a0.5", "cispo", "grpo", "delta_l"], key=order_key) == [
        "grpo", "delta_l", "delta_l-a0.5", "cispo",
    ]  # fmt: skip


@pytest.mark.parametrize("name", ["cispo", "gspo", "luspo"])
def test_trl_config_of_each_registered_loss(tmp_path, name):
    from lab.runner import RunConfig, _trl_args

    c = RunConfig(aggregator=name, preset="fast").resolved()
    args = _trl_args(c, tmp_path)
    entry = AGGREGATORS[name]
    assert args.loss_type == entry.loss_type
    assert args.importance_sampling_level == entry.trl_settings.get("importance_sampling_level", "token")
    assert c.compare_gradients_every == 0  # the four aggregators' gradients need known weights


def test_a_comparison_puts_trl_losses_beside_delta_l(tmp_path):
    from lab.runner import RunConfig, comparison_plan

    plan = comparison_plan(RunConfig(preset="fast"), aggregators=["cispo", "dapo", "delta_l", "delta_l-aauto"],
                           seeds=[0, 1], out=tmp_path / "cmp")  # fmt: skip
    assert [p[1].name for p in plan[:4]] == ["cispo-s0", "dapo-s0", "delta_l-s0", "delta_l-aauto-s0"]
    with pytest.raises(ValueError, match="twice"):
        comparison_plan(RunConfig(preset="fast", alpha=0.5), aggregators=["delta_l", "delta_l-a0.5"], seeds=[0],
                        out=tmp_path / "dup")  # fmt: skip
