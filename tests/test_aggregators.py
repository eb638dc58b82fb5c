"""The aggregator registry (lab.aggregators): TRL's loss types pinned, names parsed and ordered, colours apart."""

from __future__ import annotations

import inspect
import re

import pytest
from trl import GRPOTrainer

from lab.aggregation import METHODS
from lab.aggregators import (
    AGGREGATORS,
    DEFAULT_AGGREGATORS,
    TRL_LOSS_TYPES,
    get,
    order_key,
    parse_names,
    split_label,
)


def test_trl_loss_types_are_the_branches_of_trls_loss():
    """A TRL upgrade that adds or drops a loss type fails here: the registry lists what _compute_loss handles."""
    source = inspect.getsource(GRPOTrainer._compute_loss)
    handled = set(re.findall(r'loss_type == "(\w+)"', source))
    for group in re.findall(r"loss_type in \[([^\]]*)\]", source):
        handled |= set(re.findall(r'"(\w+)"', group))
    assert handled == set(TRL_LOSS_TYPES)


def test_every_loss_type_has_an_entry_and_every_entry_a_known_loss_type():
    assert {a.loss_type for a in AGGREGATORS.values()} == {*TRL_LOSS_TYPES, "delta_l"}
    assert DEFAULT_AGGREGATORS == METHODS  # the lab's four, whose weights x_i lab.aggregation knows
    assert [a.name for a in AGGREGATORS.values() if a.weights_known] == list(METHODS)


def test_colours_and_display_names_are_distinct():
    colors = [a.color for a in AGGREGATORS.values()]
    assert len(set(colors)) == len(colors)
    assert all(re.fullmatch(r"#[0-9a-f]{6}", c) for c in colors)
    assert len({a.display for a in AGGREGATORS.values()}) == len(AGGREGATORS)


def test_names_parse_in_the_given_order_without_repeats():
    assert parse_names("cispo,dapo,delta_l") == ["cispo", "dapo", "delta_l"]
    assert parse_names(" gspo , grpo,gspo") == ["gspo", "grpo"]
    assert parse_names(["delta_l", "delta_l-a0.5", "delta_l-aauto"]) == [
        "delta_l",
        "delta_l-a0.5",
        "delta_l-aauto",
    ]


@pytest.mark.parametrize("text", ["", "cispo,nope", "dapo-a0.5", "delta_l-a-1"])
def test_bad_names_are_named(text):
    with pytest.raises(ValueError, match="unknown aggregator"):
        parse_names(text)


def test_labels_split_and_sort_in_registry_order():
    assert split_label("delta_l-a0.75") == ("delta_l", 0.75)
    assert split_label("gspo") == ("gspo", None)
    labels = ["gspo", "delta_l-a0.5", "cispo", "grpo", "delta_l"]
    assert sorted(labels, key=order_key) == ["grpo", "delta_l", "delta_l-a0.5", "cispo", "gspo"]
    with pytest.raises(ValueError, match="'nope'"):
        get("nope")
