"""Every aggregator the lab runs, in one place: name, display name, colour, order, TRL settings, known weights.

The trainer, runner, CLI, verdict, dashboard and app read this registry; adding an aggregator is one entry
here. The lab's four (GRPO, DAPO, Dr. GRPO, ΔL) have closed-form weights x_i in :mod:`lab.aggregation`; TRL's
other loss types (and GSPO, TRL's ``importance_sampling_level="sequence"``) run through the same trainer and
run log, but the views that need x_i (theoretical CV, weights) say "not defined for this loss".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lab.aggregation import METHODS


@dataclass(frozen=True)
class Aggregator:
    """One aggregator: ``name`` is what ``--aggregator`` takes and run dirs are named by."""

    name: str
    display: str
    color: str  # #rrggbb, the same in every chart
    loss_type: str  # TRL's GRPOConfig.loss_type ("delta_l" is the lab's)
    trl_settings: dict[str, Any] = field(default_factory=dict)  # further GRPOConfig fields it needs
    summary: str = ""

    @property
    def weights_known(self) -> bool:
        """The lab has its weights x_i (lab.aggregation.sequence_weights): CV and weight views apply."""
        return self.name in METHODS


_ENTRIES = (
    Aggregator("grpo", "GRPO", "#1f77b4", "grpo", summary="mean over tokens, then over responses"),
    Aggregator("dapo", "DAPO", "#ff7f0e", "dapo", summary="one token mean over the generation batch"),
    Aggregator("dr_grpo", "Dr. GRPO", "#9467bd", "dr_grpo", summary="token sum over a constant"),
    Aggregator(
        "delta_l", "ΔL", "#2ca02c", "delta_l", summary="weights L_i^-α, unbiased, min variance at α=k"
    ),
    Aggregator("bnpo", "BNPO", "#d62728", "bnpo", summary="TRL: token mean of each micro-batch"),
    Aggregator("cispo", "CISPO", "#8c564b", "cispo", summary="TRL: clipped importance weights (ScaleRL)"),
    Aggregator("sapo", "SAPO", "#e377c2", "sapo", summary="TRL: soft temperature gate instead of clipping"),
    Aggregator(
        "luspo",
        "LUSPO",
        "#7f7f7f",
        "luspo",
        {"importance_sampling_level": "sequence"},
        summary="TRL: sequence-level loss scaled by length",
    ),
    Aggregator("vespo", "VESPO", "#393b79", "vespo", summary="TRL: Gamma weighting of sequence ratios"),
    Aggregator(
        "gspo",
        "GSPO",
        "#ad494a",
        "grpo",
        {"importance_sampling_level": "sequence"},
        summary="TRL: sequence-level importance ratio (GSPO paper's setup)",
    ),
)
AGGREGATORS: dict[str, Aggregator] = {a.name: a for a in _ENTRIES}
#: The comparison ``lab compare`` runs by default: the four whose weights the lab knows.
DEFAULT_AGGREGATORS: tuple[str, ...] = METHODS
#: TRL 1.16's own loss types (GRPOTrainer._compute_loss) and the lab's.
TRL_LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")
LOSS_TYPES: tuple[str, ...] = (*TRL_LOSS_TYPES, "delta_l")


def get(name: str) -> Aggregator:
    """The registry entry of ``name``, or a ValueError that lists the known ones."""
    if name not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {name!r}; choose from {', '.join(AGGREGATORS)}")
    return AGGREGATORS[name]


def split_label(label: str) -> tuple[str, float | str | None]:
    """``"delta_l-a0.75"`` → ``("delta_l", 0.75)``, ``"delta_l-aauto"`` → ``("delta_l", "auto")``, a plain
    name → ``(name, None)`` (the comparison's α); ValueError for an unknown name or a bad α."""
    from lab.auto_alpha import check_alpha_setting

    name, _, alpha = label.partition("-a")
    if name not in AGGREGATORS or (alpha and name != "delta_l"):
        raise ValueError(
            f"unknown aggregator {label!r}; choose from {', '.join(AGGREGATORS)} or delta_l-a<α>"
        )
    return name, (check_alpha_setting(alpha) if alpha else None)


def parse_names(text: str | list[str]) -> list[str]:
    """``"cispo,dapo,delta_l"`` (or a list) → validated names, in the given order, no duplicates. ΔL with its
    own α is written like its run label: ``delta_l-a0.75``, ``delta_l-aauto`` (beside ``delta_l``)."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    bad = []
    for n in names:
        try:
            split_label(n)
        except ValueError:
            bad.append(n)
    if bad or not names:
        raise ValueError(f"unknown aggregator(s) {bad or text!r}; choose from {','.join(AGGREGATORS)}")
    return list(dict.fromkeys(names))


def order_key(label: str) -> tuple[int, str]:
    """Sort key of a run label (``delta_l-a0.75`` sorts with ``delta_l``): registry order, then the label."""
    base = label.split("-a")[0]
    index = list(AGGREGATORS).index(base) if base in AGGREGATORS else len(AGGREGATORS)
    return index, label
