r"""The lab's speed paths, apart from the ΔL core (:mod:`lab.trainer`): exact, optional, picked by the runner.

:class:`SpeedConfig` / :class:`SpeedTrainer` are :class:`lab.trainer.DeltaLGRPOConfig` /
:class:`lab.trainer.DeltaLGRPOTrainer` plus three switches; with all of them off a ``SpeedTrainer`` trains
exactly as a ``DeltaLGRPOTrainer``. ``lab train`` and ``lab compare`` always build these (``lab.runner``), and
:func:`cpu_patches` is the one place where TRL and transformers internals are changed: an explicit, undoable
call the runner makes on CPU only. Nothing here is applied at import.

- **Each prompt once** (``prefill_prompts_once``, ``forward_prompts_once``). A generation batch holds every
  prompt ``num_generations`` times, and TRL prefills (generation) and forwards (loss) every copy. With these
  switches each distinct prompt is run once and its key/value cache is shared by the rows that repeat it: in
  generation through ``generate``'s own prefilled-cache path, in the loss by running the prompt (minus its last
  token) once per micro-batch with gradients and indexing its cache per row, so the backward sums every row's
  gradient into the one prompt forward. Same arithmetic as TRL's up to float rounding (tests/test_speed.py).
- **Compiled decoding** (``compile_generation``, CUDA only): lets transformers compile the static-cache decode
  step, which TRL's GenerationConfig forbids.
- **Continuous batching keeps LoRA in float32**: TRL casts the whole model to bf16 before that path generates;
  the originals are given back afterwards (:func:`_dtypes_kept`).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import trl.trainer.utils as _trl_utils
from transformers import StaticCache
from transformers.integrations import sdpa_attention as _sdpa_attention
from trl.kernels.chunked_logprob import _use_triton

from lab.trainer import DeltaLGRPOConfig, DeltaLGRPOTrainer


# -------------------------------------------------------------------------------------------------------
# CPU patches: explicit and undoable
# -------------------------------------------------------------------------------------------------------
def _cpu_use_triton(device: torch.device) -> bool:
    # TRL's fused LM head scores only the completion positions when Triton is available, and *every* position
    # (prompt included) elsewhere, to spare Neuron devices a recompile per shape. On CPU that is pure waste
    # (benchmarks/step_time.py measures it); compacting on CPU too uses TRL's own masked path, as on CUDA.
    return device.type == "cpu" or _use_triton(device)


def _cpu_use_gqa_in_sdpa(original: Callable[..., bool]) -> Callable[..., bool]:
    # transformers' SDPA path copies the key/value heads up to the query heads (`repeat_kv`) whenever there is
    # a padding mask and more than one query, because CUDA's fast kernels cannot take grouped heads with a mask.
    # PyTorch's CPU flash kernel can (`enable_gqa`, same output): on CPU that skips the copy, which autograd
    # would otherwise keep for the backward (benchmarks/cpu_step_profile.py). One-query steps (sampling) keep
    # transformers' own packing, which is faster there.
    def use_gqa_in_sdpa(attention_mask, key, value) -> bool:
        return (
            key.device.type == "cpu"
            and isinstance(attention_mask, torch.Tensor)
            and attention_mask.dim() == 4
            and attention_mask.shape[-2] > 1
            and key.shape[-1] == value.shape[-1]
        ) or original(attention_mask, key, value)

    return use_gqa_in_sdpa


def apply_cpu_patches() -> Callable[[], None]:
    """Patch TRL's ``_use_triton`` and transformers' ``use_gqa_in_sdpa`` for CPU training (same results, less
    time and memory); returns the function that undoes both. :func:`cpu_patches` is the context-manager form.
    """
    saved = (_trl_utils._use_triton, _sdpa_attention.use_gqa_in_sdpa)
    _trl_utils._use_triton = _cpu_use_triton
    _sdpa_attention.use_gqa_in_sdpa = _cpu_use_gqa_in_sdpa(saved[1])

    def undo() -> None:
        _trl_utils._use_triton, _sdpa_attention.use_gqa_in_sdpa = saved

    return undo


@contextlib.contextmanager
def cpu_patches(enabled: bool = True) -> Iterator[None]:
    """``with cpu_patches(): trainer.train()``: :func:`apply_cpu_patches` for the block, undone afterwards."""
    undo = apply_cpu_patches() if enabled else (lambda: None)
    try:
        yield
    finally:
        undo()


# -------------------------------------------------------------------------------------------------------
# the config and trainer with the speed paths
# -------------------------------------------------------------------------------------------------------
@dataclass
class SpeedConfig(DeltaLGRPOConfig):
    """:class:`lab.trainer.DeltaLGRPOConfig` plus the lab's exact speed switches (all off by default)."""

    prefill_prompts_once: bool = field(
        default=False,
        metadata={
            "help": "Generation (transformers.generate path, text prompts): prefill each distinct prompt once "
            "and share its KV cache among its completions instead of prefilling every copy."
        },
    )
    forward_prompts_once: bool = field(
        default=False,
        metadata={
            "help": "Loss: forward each distinct prompt of a micro-batch once (with gradients) and share its KV "
            "cache among the rows that repeat it. Exact; ignored with gradient checkpointing."
        },
    )
    compile_generation: bool = field(
        default=False,
        metadata={
            "help": "Let transformers torch.compile the decode step (its auto-compile, CUDA only; needs "
            "cache_implementation='static'). TRL builds its GenerationConfig with disable_compile=True, which "
            "generation_kwargs cannot override."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.compile_generation and (
            self.cache_implementation != "static"
            or self.use_vllm
            or self.use_transformers_continuous_batching
        ):
            raise ValueError(
                "compile_generation needs cache_implementation='static' and transformers' generate (no vLLM, no "
                f"continuous batching); got cache_implementation={self.cache_implementation!r}, "
                f"use_vllm={self.use_vllm}, use_transformers_continuous_batching="
                f"{self.use_transformers_continuous_batching}"
            )


class SpeedTrainer(DeltaLGRPOTrainer):
    """:class:`lab.trainer.DeltaLGRPOTrainer` with the speed paths of :class:`SpeedConfig`.

    It overrides three more private TRL methods (``_generate_single_turn``, ``_prepare_inputs``,
    ``_get_per_token_logps_and_entropies``); tests/test_trl_contract.py pins their signatures.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.args.compile_generation:  # TRL hard-codes disable_compile=True in its GenerationConfig
            self.generation_config.disable_compile = False
        self.prompt_rows_shared = 0  # rows whose prompt forward was shared (prefill_/forward_prompts_once)

    def _generate_single_turn(
        self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False
    ):
        plain = not (
            self.use_vllm or self.use_transformers_continuous_batching or images or multimodal_fields
        )
        model = self.accelerator.unwrap_model(self.model_wrapped)
        sharing = (
            self._prompt_prefill_shared(model)
            if self.args.prefill_prompts_once
            and plain
            and self.generation_config.cache_implementation in (None, "static")
            else contextlib.nullcontext()
        )
        casts = self.use_transformers_continuous_batching and (self.args.bf16 or self.args.fp16)
        with sharing, _dtypes_kept(model) if casts else contextlib.nullcontext():
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )

    @contextlib.contextmanager
    def _prompt_prefill_shared(self, model: torch.nn.Module) -> Iterator[None]:
        """While active, ``model.generate`` (the call TRL makes) prefills each distinct prompt row once."""
        generate = model.generate

        def generate_sharing_prompts(input_ids, attention_mask, **kwargs):
            firsts, inverse = distinct_rows(input_ids[:, :-1], attention_mask[:, :-1])
            if input_ids.size(1) < 2 or len(firsts) == len(input_ids):
                return generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            head_ids, head_mask = input_ids[firsts, :-1], attention_mask[firsts, :-1]
            # the positions generate() itself derives from a left-padded mask
            positions = (head_mask.long().cumsum(-1) - 1).masked_fill(head_mask == 0, 0)
            cache = model(
                input_ids=head_ids,
                attention_mask=head_mask,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=1,
            ).cache
            config = kwargs.get("generation_config")
            if config is not None and config.cache_implementation == "static":
                # the static cache generate() would make, filled with each row's prompt (a user cache excludes
                # cache_implementation)
                static = StaticCache(
                    config=model.config, max_cache_len=input_ids.size(1) + config.max_new_tokens
                )
                for i, layer in enumerate(cache.layers):
                    static.update(layer.keys[inverse], layer.values[inverse], i)
                cache, kwargs["generation_config"] = static, copy.copy(config)
                kwargs["generation_config"].cache_implementation = None
            else:
                cache.batch_select_indices(inverse)  # row i continues from its prompt's cache
            self.prompt_rows_shared += len(input_ids) - len(firsts)
            # generate() runs only the tokens the cache lacks: each row's last prompt token, then sampling
            return generate(input_ids=input_ids, attention_mask=attention_mask, cache=cache, **kwargs)

        model.generate = generate_sharing_prompts
        try:
            yield
        finally:
            del model.generate  # the class's method again

    # The loss types whose step gradient does not depend on how the step's rows are cut into micro-batches
    # of equal size (TRL's bnpo does: it normalizes by each micro-batch's own token count).
    _PARTITION_FREE_LOSSES = ("grpo", "dr_grpo", "dapo", "delta_l")

    def _prepare_inputs(self, generation_batch: Any) -> dict[str, Any]:
        """TRL's ``_prepare_inputs``, except that with ``forward_prompts_once`` the micro-batches are cut from
        the generation batch *unshuffled*: TRL's sampler lays each prompt's completions out together, so a
        micro-batch holds as few distinct prompts as possible (one, when it has num_generations rows) and the
        loss forwards each of them once. The step's gradient is unchanged: one optimizer step per generation
        batch sums every micro-batch, and these loss types do not depend on the partition."""
        grouped = (
            self.args.forward_prompts_once
            and self.model.training
            and self.num_iterations == 1
            and self.args.steps_per_generation == self.args.gradient_accumulation_steps
            and self.args.loss_type in self._PARTITION_FREE_LOSSES
            and not self._is_vlm  # images: TRL's own splitting (and no prompt sharing)
        )
        if not grouped:
            return super()._prepare_inputs(generation_batch)
        if self._step % self.args.steps_per_generation == 0 or self._buffered_inputs is None:
            batch = self._generate_and_score_completions(generation_batch)
            self._buffered_inputs = _trl_utils.split_tensor_dict(batch, self.args.steps_per_generation)
        return self._buffered_inputs[self._step % self.args.steps_per_generation]

    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        batch_size=None,
        compute_entropy=False,
        compute_aux_loss=False,
        **multimodal,
    ):
        prompt_length = input_ids.size(1) - logits_to_keep
        if (
            not self.args.forward_prompts_once
            or self.args.gradient_checkpointing  # its recompute cannot keep a cache across two forwards
            or compute_aux_loss
            or prompt_length < 2
            or any(v is not None for v in multimodal.values())
        ):
            return super()._get_per_token_logps_and_entropies(
                model,
                input_ids,
                attention_mask,
                logits_to_keep,
                batch_size,
                compute_entropy,
                compute_aux_loss,
                **multimodal,
            )
        batch_size = batch_size or input_ids.size(0)
        parts = [
            self._logps_sharing_prompts(
                model,
                input_ids[i : i + batch_size],
                attention_mask[i : i + batch_size],
                prompt_length,
                compute_entropy,
            )
            for i in range(0, input_ids.size(0), batch_size)
        ]
        logps = torch.cat([p[0] for p in parts])
        return logps, torch.cat([p[1] for p in parts]) if compute_entropy else None, None

    def _logps_sharing_prompts(self, model, input_ids, attention_mask, prompt_length, compute_entropy):
        """TRL's per-token log-probs (and entropies) of the completion tokens, each distinct prompt run once.

        Prompt tokens 0..P-2 of each distinct prompt go through the model once, keeping their key/value cache
        (with gradients). Each row then runs its last prompt token and its completion on top of its prompt's
        cache: the hidden state at the last prompt token scores the first completion token, as in TRL's single
        forward. Positions and masks are TRL's (``arange`` over the padded row, padding masked out)."""
        head = prompt_length - 1
        firsts, inverse = distinct_rows(input_ids[:, :head], attention_mask[:, :head])
        with self.accelerator.autocast():
            cache = model(
                input_ids=input_ids[firsts, :head],
                attention_mask=attention_mask[firsts, :head],
                use_cache=True,
                logits_to_keep=1,
            ).cache
        cache.batch_select_indices(
            inverse
        )  # an index: the backward adds every row's gradient into its prompt
        tail = input_ids[:, head:]
        labels = tail.masked_fill(attention_mask[:, head:] == 0, -100)
        labels[:, 0] = -100  # the last prompt token is context, not scored
        with self.accelerator.autocast():
            outputs = model(
                input_ids=tail, attention_mask=attention_mask, cache=cache, labels=labels, fused_lm_head=True
            )
        self.prompt_rows_shared += len(input_ids) - len(firsts)
        # the fused head scores positions 1.. of `tail` (labels shifted by one): the completion tokens
        return outputs.log_probs, outputs.entropy if compute_entropy else None


@contextlib.contextmanager
def _dtypes_kept(model: torch.nn.Module) -> Iterator[None]:
    """Give the model its own parameters and buffers back afterwards. TRL's continuous-batching path casts the
    whole model to bf16/fp16 before it generates (``model.to``), LoRA adapters (kept in float32 by peft) and
    RoPE's ``inv_freq`` included, so training would go on with half-precision adapters and AdamW states,
    rounded again at every generation. ``Module.to`` swaps in new tensors, so the originals come back exact."""
    params = [(p, p.data) for p in model.parameters()]
    buffers = [(m, name, b) for m in model.modules() for name, b in m._buffers.items() if b is not None]
    try:
        yield
    finally:
        for param, data in params:
            param.data = data
        for module, name, buffer in buffers:
            module._buffers[name] = buffer


def distinct_rows(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(firsts, inverse)``: the index of the first row of each distinct (ids, mask) row, and for every row
    the position of its distinct row in ``firsts`` (so ``ids[firsts][inverse] == ids``)."""
    _, inverse = torch.unique(torch.cat([ids, mask.to(ids.dtype)], dim=1), dim=0, return_inverse=True)
    rows = torch.arange(len(ids), device=ids.device)
    firsts = torch.full((int(inverse.max()) + 1,), len(ids), device=ids.device).scatter_reduce(
        0, inverse, rows, reduce="amin"
    )
    return firsts, inverse
