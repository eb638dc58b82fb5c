r"""ΔL aggregation as a small subclass of TRL's ``GRPOTrainer``.

Read it top to bottom; the ΔL logic is two methods.

1. **Weights at generation time** (:meth:`DeltaLGRPOTrainer._generate_and_score_completions`).
   TRL generates one *generation batch*, then shuffles it and splits it into ``steps_per_generation``
   micro-batches before any loss is computed, so ``_compute_loss`` never sees all lengths of a group or
   batch. The weights are therefore computed right after generation, from the lengths of the *whole*
   generation batch (gathered over processes), and stored as a per-row tensor that TRL shuffles and
   splits along with everything else:

   .. math::  w_i = x_i \, N M = \frac{L_i^{-\alpha}}{\tfrac1N\sum_j L_j^{-\alpha}}

   (:func:`lab.aggregation.delta_l_row_weights`; ``delta_l_scope="group"`` normalizes per prompt group).

2. **Loss** (:meth:`DeltaLGRPOTrainer._compute_loss`). TRL's ``dr_grpo`` loss is
   :math:`\sum_i\sum_t \ell_{i,t} / (N M)` (a token sum over a constant). With the advantages scaled by
   :math:`w_i` it becomes :math:`\sum_i x_i \sum_t \ell_{i,t}`, the ΔL estimator. Scaling the advantage is
   exact for the clipped surrogate because :math:`w_i > 0`:
   :math:`\min(r A w, \mathrm{clip}(r) A w) = w \min(r A, \mathrm{clip}(r) A)`. As in the official
   implementation, a KL penalty (``beta > 0``) is not weighted.

3. **Optional: equal expected step size** (``equalize_step_size=True``, any loss type). Every aggregator is
   :math:`\hat g = \sum_i x_i g_i`; its scale :math:`\sum_i x_i` is :math:`1/M` for Dr. GRPO and ΔL but
   :math:`\mathrm{mean}(1/L)` for GRPO and :math:`N/\sum L` for DAPO, so at one learning rate they take
   steps of different sizes. With the switch on, the advantages of a generation batch are multiplied by
   :math:`c = (1/M) / \sum_i x_i` (exact, :math:`c > 0`), so every aggregator has ΔL's scale and only
   the *direction* differs. With batch-scope weights GRPO then equals ΔL(α=1) and DAPO equals Dr. GRPO.

4. **Each prompt once** (optional, exact; :attr:`DeltaLGRPOConfig.prefill_prompts_once` and
   :attr:`DeltaLGRPOConfig.forward_prompts_once`). A generation batch holds every prompt ``num_generations``
   times, and TRL prefills (generation) and forwards (loss) every copy. With these switches each distinct
   prompt is run once and its key/value cache is shared by the rows that repeat it: in generation through
   ``generate``'s own prefilled-cache path, in the loss by running the prompt (minus its last token) once per
   micro-batch with gradients and indexing its cache per row, so the backward sums every row's gradient into
   the one prompt forward. The arithmetic is the same as TRL's up to float rounding (tests/test_trainer.py).

Everything else (generation, rewards, advantages, clipping, logging, checkpoints, ``report_to``) is TRL's.
Every step logs ``aggregator/relative_scale`` (:math:`M\sum_i x_i` of this run's aggregator on this batch,
1 for the unbiased ones) and, with the switch on, ``aggregator/step_scale`` (:math:`c`).
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import trl.trainer.utils as _trl_utils
from transformers import StaticCache
from transformers.integrations import sdpa_attention as _sdpa_attention
from trl import GRPOConfig, GRPOTrainer
from trl.kernels.chunked_logprob import _use_triton

from lab.aggregation import check_alpha, delta_l_row_weights, sequence_weights

# TRL's fused LM head scores only the completion positions when Triton is available, and *every* position
# (prompt included) elsewhere, to spare Neuron devices a recompile per shape. On CPU that is pure waste: for
# the demo's 394-token prompts and 64-token completions, TRL's loss + backward took 9 s instead of 0.8 s
# (benchmarks/step_time.py). Compacting on CPU too uses TRL's own masked path, as on CUDA.
_trl_utils._use_triton = lambda device: device.type == "cpu" or _use_triton(device)

# transformers' SDPA path copies the key/value heads up to the query heads (`repeat_kv`) whenever there is a
# padding mask and more than one query, because CUDA's fast kernels cannot take grouped heads with a mask.
# PyTorch's CPU flash kernel can (`enable_gqa`, same output): on CPU that skips the copy, which autograd would
# otherwise keep for the backward (SmolLM2: 9 query heads on 3 key/value heads; 0.34 GB of a 1.42 GB
# micro-batch, benchmarks/cpu_step_profile.py) and halves the kernel's time. One-query steps (sampling) keep
# transformers' own packing, which is faster there (0.64 vs 0.87 ms per call at the demo's shapes).
_use_gqa_in_sdpa = _sdpa_attention.use_gqa_in_sdpa
_sdpa_attention.use_gqa_in_sdpa = lambda attention_mask, key, value: (
    (
        key.device.type == "cpu"
        and isinstance(attention_mask, torch.Tensor)
        and attention_mask.dim() == 4
        and attention_mask.shape[-2] > 1
        and key.shape[-1] == value.shape[-1]
    )
    or _use_gqa_in_sdpa(attention_mask, key, value)
)


# TRL 1.16's own loss types (GRPOTrainer._compute_loss), plus ours.
TRL_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")
LOSS_TYPES = (*TRL_LOSS_TYPES, "delta_l")
DELTA_L_SCOPES = ("batch", "group")
SCALED_LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "delta_l")  # those whose Σx_i the lab knows (lab.aggregation)


@dataclass
class DeltaLGRPOConfig(GRPOConfig):
    """``GRPOConfig`` plus ΔL. ``loss_type="delta_l"`` (the default here) selects ΔL aggregation.

    Args:
        delta_l_alpha: the exponent α in :math:`L_i^{-\\alpha}`; 1.0 is the minimum-variance unbiased
            choice, 0.0 is exactly ``dr_grpo``; the paper uses 0.75 for Math.
        delta_l_scope: ``"batch"`` normalizes the weights over the whole generation batch (the official
            implementation); ``"group"`` within each prompt's group of completions.
    """

    loss_type: str = field(
        default="delta_l",
        metadata={"help": f"Loss aggregation, one of {', '.join(LOSS_TYPES)}.", "choices": list(LOSS_TYPES)},
    )
    delta_l_alpha: float = field(default=1.0, metadata={"help": "ΔL exponent α >= 0 (weights L_i^-α)."})
    delta_l_scope: str = field(
        default="batch",
        metadata={
            "help": "Normalize ΔL weights over the generation 'batch' or per prompt 'group'.",
            "choices": list(DELTA_L_SCOPES),
        },
    )

    equalize_step_size: bool = field(
        default=False,
        metadata={
            "help": "Scale each generation batch's advantages by (1/M)/Σx_i so every loss type has ΔL's "
            "expected step size (only the gradient direction differs)."
        },
    )
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
        # Fail at config time, not at step 100 inside _compute_loss.
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {self.loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
        self.delta_l_alpha = check_alpha(self.delta_l_alpha)
        if self.delta_l_scope not in DELTA_L_SCOPES:
            raise ValueError(f"delta_l_scope must be one of {DELTA_L_SCOPES}, got {self.delta_l_scope!r}")
        if self.equalize_step_size and self.loss_type not in SCALED_LOSS_TYPES:
            raise ValueError(
                f"equalize_step_size needs loss_type in {SCALED_LOSS_TYPES}, got {self.loss_type!r}"
            )
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


class DeltaLGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` with ``loss_type="delta_l"``; any other loss type is TRL's own, unchanged.

    After each generation batch, :attr:`generation_records` (main process) gets one dict of per-completion
    lists (lengths, rewards, advantages, weights, truncated, group) that :mod:`lab.runlog` writes out, and
    each of :attr:`generation_hooks` is called with ``(trainer, generation_batch)``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.args.compile_generation:  # TRL hard-codes disable_compile=True in its GenerationConfig
            self.generation_config.disable_compile = False
        self.generation_records: list[dict[str, Any]] = []
        self.log_completion_texts = False  # set True to keep the completion texts in generation_records
        # Callables hook(trainer, generation_batch) run after each generation (e.g. lab.probes' gradient probe).
        self.generation_hooks: list[Callable[[DeltaLGRPOTrainer, dict[str, Any]], None]] = []
        self.prompt_rows_shared = 0  # rows whose prompt forward was shared (prefill_/forward_prompts_once)
        self.gradient_comparison = (
            None  # a lab.probes.AggregatorGradientHook: see compare_aggregator_gradients
        )

    def compare_aggregator_gradients(self, every: int = 1) -> None:
        """Log, every ``every`` steps, the cosine and norm ratio of the four aggregators' gradients on the
        step's batch, read off the training backward itself (:class:`lab.probes.AggregatorGradientHook`)."""
        from lab.probes import AggregatorGradientHook

        if (
            self.args.gradient_checkpointing
            or self.args.forward_prompts_once  # the hook needs one forward per row, not a shared prompt
            or self.accelerator.num_processes > 1
        ):
            warnings.warn(
                "aggregator gradient comparison is off: it needs one process, no gradient checkpointing and "
                "forward_prompts_once=False",
                stacklevel=2,
            )
            return
        if self.loss_type not in SCALED_LOSS_TYPES:
            raise ValueError(
                f"the gradient comparison needs loss_type in {SCALED_LOSS_TYPES}, got {self.loss_type!r}"
            )
        self.gradient_comparison = AggregatorGradientHook(every)
        self.generation_hooks.append(self.gradient_comparison.on_generation)

    # -- 1. weights, once per generation batch --------------------------------------------------------
    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        output = super()._generate_and_score_completions(inputs)
        lengths, weights = self.attach_delta_l_weights(output)
        self._record_generation(output, lengths, weights)
        for hook in self.generation_hooks:
            hook(self, output)
        return output

    def attach_delta_l_weights(self, output: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute the row weights of a generation batch and store this process's rows in ``output``.

        ``output["delta_l_weights"]``: the ΔL row weights (``loss_type="delta_l"``); with
        ``equalize_step_size`` every loss type also gets ``output["step_scale"]`` (the batch's :math:`c`,
        one value per row). Returns the gathered (all-process) lengths and the ΔL weights (all 1 for other
        loss types)."""
        mask = output["completion_mask"]
        if "tool_mask" in output:
            mask = mask * output["tool_mask"]
        local_lengths = mask.sum(-1)
        lengths = self.accelerator.gather(local_lengths)  # process order = TRL's process_slice order
        n_local = local_lengths.shape[0]
        start = self.accelerator.process_index * n_local
        M = max(self.max_completion_length, int(lengths.max()))
        weights = torch.ones_like(lengths, dtype=torch.float64)
        if self.loss_type == "delta_l":
            weights = delta_l_row_weights(
                lengths.cpu(),
                alpha=self.args.delta_l_alpha,
                max_length=M,
                group_size=self.num_generations if self.args.delta_l_scope == "group" else None,
            )
            output["delta_l_weights"] = weights[start : start + n_local].to(output["advantages"])
            self._log_weight_stats(weights)
        self._log_scale(lengths.cpu(), M, output, n_local)
        return lengths, weights

    def batch_scale(self, lengths: torch.Tensor, max_length: float) -> float:
        r""":math:`\sum_i x_i` of this run's aggregator over a whole generation batch (TRL normalizes over the
        batch: GRPO mean(1/L), DAPO N/ΣL, Dr. GRPO and ΔL 1/M)."""
        active = lengths[lengths > 0]
        if active.numel() == 0 or self.loss_type == "delta_l":
            return 1.0 / max_length
        return float(sequence_weights(active, self.loss_type, max_length=max_length).sum())

    def _log_scale(
        self, lengths: torch.Tensor, max_length: float, output: dict[str, Any], n_local: int
    ) -> None:
        if self.loss_type not in SCALED_LOSS_TYPES:
            return
        scale = self.batch_scale(lengths, max_length)
        metrics = self._metrics["train" if self.model.training else "eval"]
        metrics["aggregator/relative_scale"].append(scale * max_length)
        if self.args.equalize_step_size:
            step_scale = 1.0 / (max_length * scale)  # c = (1/M) / Σ x_i
            output["step_scale"] = torch.full((n_local,), step_scale).to(output["advantages"])
            metrics["aggregator/step_scale"].append(step_scale)

    # -- 2. loss: TRL's dr_grpo normalizer on weighted advantages ------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.gradient_comparison is not None:  # the backward is done: fold this micro-batch in
            self.gradient_comparison.after_backward(self)
        return loss

    def _compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        if self.gradient_comparison is not None:
            with self.gradient_comparison.capture(model, inputs):
                return self._weighted_loss(model, inputs)
        return self._weighted_loss(model, inputs)

    def _weighted_loss(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        advantages = inputs["advantages"]
        for key in ("delta_l_weights", "step_scale"):  # per-row multipliers, > 0: exact for the clipped loss
            if key in inputs:
                row = inputs[key]
                advantages = advantages * (row if advantages.dim() == 1 else row.unsqueeze(1))
        inputs = {**inputs, "advantages": advantages}
        if self.loss_type != "delta_l":
            return super()._compute_loss(model, inputs)
        self.loss_type = "dr_grpo"  # Σ_i Σ_t w_i·loss_{i,t} / (rows × max_completion_length)
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self.loss_type = "delta_l"

    # -- 3. each prompt once -----------------------------------------------------------------------------
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

    # -- logging ---------------------------------------------------------------------------------------
    def _log_weight_stats(self, weights: torch.Tensor) -> None:
        mode = "train" if self.model.training else "eval"
        active = weights[weights > 0]
        if active.numel() == 0:
            return
        metrics = self._metrics[mode]
        metrics["delta_l/weight_mean"].append(active.mean().item())
        metrics["delta_l/weight_min"].append(active.min().item())
        metrics["delta_l/weight_max"].append(active.max().item())
        metrics["delta_l/weight_std"].append(active.std().item() if active.numel() > 1 else 0.0)
        # Kish effective sample size as a fraction of the rows: 1 = uniform weights (Dr. GRPO).
        metrics["delta_l/effective_sample_fraction"].append(
            (active.sum().square() / active.square().sum() / active.numel()).item()
        )

    def _record_generation(
        self, output: dict[str, Any], lengths: torch.Tensor, weights: torch.Tensor
    ) -> None:
        """Per-completion data of this generation batch for the run log (gathered; main process keeps it)."""
        ids, mask = output["completion_ids"], output["completion_mask"]
        last = (mask.sum(-1) - 1).clamp(min=0).long().unsqueeze(1)
        eos = torch.tensor(list(self.eos_token_ids), device=ids.device)
        truncated = (mask.sum(-1) == 0) | ~torch.isin(ids.gather(1, last).squeeze(1), eos)
        truncated = self.accelerator.gather(truncated)
        advantages = self.accelerator.gather(output["advantages"])
        if not self.accelerator.is_main_process:
            return
        n = lengths.shape[0]
        reward_columns = [list(self._logs["rewards"][name])[-n:] for name in self.reward_func_names]
        reward_weights = self.reward_weights.tolist()
        rewards = (
            [
                sum(w * (r if r == r else 0.0) for w, r in zip(reward_weights, row, strict=True))
                for row in zip(*reward_columns, strict=True)
            ]
            if reward_columns
            else [0.0] * n
        )
        record = {
            "step": self.state.global_step + 1,  # the optimizer step these completions train
            "lengths": lengths.tolist(),
            "rewards": rewards,
            "advantages": advantages.tolist(),
            "weights": weights.tolist(),
            "truncated": truncated.tolist(),
            "group": [i // self.num_generations for i in range(n)],
        }
        if self.log_completion_texts:
            record["texts"] = [
                c if isinstance(c, str) else c[-1]["content"] for c in list(self._logs["completion"])[-n:]
            ]
        self.generation_records.append(record)


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
