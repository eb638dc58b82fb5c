"""The private TRL methods the lab overrides, pinned: a TRL upgrade that changes one fails here, loudly.

lab.trainer overrides ``_generate_and_score_completions``, ``_compute_loss`` and ``training_step``;
lab.speed also ``_generate_single_turn``, ``_prepare_inputs`` and ``_get_per_token_logps_and_entropies``.
An override calls ``super()`` with the parameters below; if TRL renames, adds or drops one, the override
may silently stop matching. Update the override first, then this table.
"""

from __future__ import annotations

import inspect

import pytest
import trl
from trl import GRPOTrainer

from lab.speed import SpeedTrainer
from lab.trainer import DeltaLGRPOTrainer

TESTED_TRL = "1.16.0"
PINNED = {
    "_generate_and_score_completions": "(self, inputs: list[dict[str, torch.Tensor | typing.Any]]) -> dict[str, torch.Tensor | typing.Any]",
    "_compute_loss": "(self, model, inputs)",
    "training_step": "(self, model, inputs, num_items_in_batch)",
    "_generate_single_turn": "(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False)",
    "_prepare_inputs": "(self, generation_batch: dict[str, torch.Tensor | typing.Any]) -> dict[str, torch.Tensor | typing.Any]",
    "_get_per_token_logps_and_entropies": "(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False, compute_aux_loss=False, pixel_values=None, image_grid_thw=None, num_images=None, pixel_attention_mask=None, spatial_shapes=None, num_tiles=None, image_sizes=None, token_type_ids=None, mm_token_type_ids=None, image_position_ids=None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]",
}


def overridden() -> set[str]:
    """Every method of TRL's GRPOTrainer (or its bases) that the lab's two trainers define themselves."""
    names = set()
    for cls in (DeltaLGRPOTrainer, SpeedTrainer):
        for name, value in vars(cls).items():
            if (
                callable(value)
                and name.startswith("_")
                and not name.startswith("__")
                and hasattr(GRPOTrainer, name)
            ):
                names.add(name)
            elif callable(value) and not name.startswith("_") and hasattr(GRPOTrainer, name):
                names.add(name)
    return names


def test_every_overridden_trl_method_is_pinned():
    assert overridden() == set(PINNED), "an override was added or removed: pin its TRL signature here"


@pytest.mark.parametrize("name", sorted(PINNED))
def test_trl_signature_is_the_one_the_override_was_written_for(name):
    got = str(inspect.signature(getattr(GRPOTrainer, name)))
    assert got == PINNED[name], (
        f"TRL {trl.__version__} changed GRPOTrainer.{name}{got} (the lab's override was written for TRL "
        f"{TESTED_TRL}: {PINNED[name]}); update lab.trainer / lab.speed and this pin"
    )
