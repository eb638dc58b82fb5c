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

The lab's exact speed paths (each prompt prefilled/forwarded once, compiled decoding) are a subclass in
:mod:`lab.speed`; so are the CPU-only patches of TRL and transformers, applied by an explicit call. This file
patches nothing.

Everything else (generation, rewards, advantages, clipping, logging, checkpoints, ``report_to``) is TRL's.
Every step logs ``aggregator/relative_scale`` (:math:`M\sum_i x_i` of this run's aggregator on this batch,
1 for the unbiased ones) and, with the switch on, ``aggregator/step_scale`` (:math:`c`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from trl import GRPOConfig, GRPOTrainer

from lab.aggregation import METHODS, delta_l_row_weights, sequence_weights
from lab.aggregators import LOSS_TYPES, TRL_LOSS_TYPES  # noqa: F401 (TRL_LOSS_TYPES: re-exported)
from lab.auto_alpha import DEFAULT_ALPHA_MAX, AlphaFromProbes, check_alpha_setting, check_auto_alpha, is_auto

DELTA_L_SCOPES = ("batch", "group")
SCALED_LOSS_TYPES = METHODS  # those whose Σx_i the lab knows (lab.aggregation)


@dataclass
class DeltaLGRPOConfig(GRPOConfig):
    """``GRPOConfig`` plus ΔL. ``loss_type="delta_l"`` (the default here) selects ΔL aggregation.

    Args:
        delta_l_alpha: α in :math:`L_i^{-\\alpha}`: 1.0 is the minimum-variance unbiased choice if
            Var(g_i) ∝ L_i, 0.0 is exactly ``dr_grpo``, the paper uses 0.75 for Math; ``"auto"``: α = the
            measured k of Var(g_i) ∝ L_i^k, from the gradient probes (:mod:`lab.auto_alpha`).
        delta_l_scope: ``"batch"`` normalizes the weights over the whole generation batch (the official
            implementation); ``"group"`` within each prompt's group of completions.
    """

    loss_type: str = field(
        default="delta_l",
        metadata={"help": f"Loss aggregation, one of {', '.join(LOSS_TYPES)}.", "choices": list(LOSS_TYPES)},
    )
    delta_l_alpha: float | str = field(
        default=1.0, metadata={"help": "ΔL exponent α >= 0 (weights L_i^-α), or 'auto' (α from the probes)."}
    )
    delta_l_alpha_max: float = field(default=DEFAULT_ALPHA_MAX, metadata={"help": "'auto': α in [0, this]."})
    delta_l_scope: str = field(
        default="batch",
        metadata={"help": "Normalize ΔL weights over the generation 'batch' or per prompt 'group'."},
    )
    equalize_step_size: bool = field(
        default=False,
        metadata={
            "help": "Scale each generation batch's advantages by (1/M)/Σx_i so every loss type has ΔL's "
            "expected step size (only the gradient direction differs)."
        },
    )

    def __post_init__(self) -> None:
        # Fail at config time, not at step 100 inside _compute_loss.
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {self.loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
        self.delta_l_alpha = check_alpha_setting(self.delta_l_alpha)
        if is_auto(self.delta_l_alpha):
            check_auto_alpha(self.loss_type, self.num_generations)
        if self.delta_l_scope not in DELTA_L_SCOPES:
            raise ValueError(f"delta_l_scope must be one of {DELTA_L_SCOPES}, got {self.delta_l_scope!r}")
        if self.equalize_step_size and self.loss_type not in SCALED_LOSS_TYPES:
            raise ValueError(
                f"equalize_step_size needs loss_type in {SCALED_LOSS_TYPES}, got {self.loss_type!r}"
            )
        super().__post_init__()


class DeltaLGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` with ``loss_type="delta_l"``; any other loss type is TRL's own, unchanged.

    After each generation batch, :attr:`generation_records` (main process) gets one dict of per-completion
    lists (lengths, rewards, advantages, weights, truncated, group) that :mod:`lab.runlog` writes out, and
    each of :attr:`generation_hooks` is called with ``(trainer, generation_batch)``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.generation_records: list[dict[str, Any]] = []
        self.log_completion_texts = False  # set True to keep the completion texts in generation_records
        # Callables hook(trainer, generation_batch) run after each generation (e.g. lab.probes' gradient probe).
        self.generation_hooks: list[Callable[[DeltaLGRPOTrainer, dict[str, Any]], Any]] = []
        # delta_l_alpha="auto": α follows the probes' measured exponent (a probe hook must be attached)
        self.alpha_from_probes = (
            AlphaFromProbes(alpha_max=self.args.delta_l_alpha_max, group_size=self.num_generations)
            if is_auto(self.args.delta_l_alpha)
            else None
        )
        self.gradient_comparison = None  # a lab.probes.AggregatorGradientHook: compare_aggregator_gradients

    def compare_aggregator_gradients(self, every: int = 1) -> None:
        """Log, every ``every`` steps, the cosine and norm ratio of the four aggregators' gradients on the
        step's batch, read off the training backward itself (:class:`lab.probes.AggregatorGradientHook`)."""
        from lab.probes import AggregatorGradientHook

        if (
            self.args.gradient_checkpointing
            or getattr(self.args, "forward_prompts_once", False)  # needs one forward per row (lab.speed)
            or self.accelerator.num_processes > 1
        ):
            message = "aggregator gradient comparison is off: it needs one process, no gradient checkpointing"
            return warnings.warn(message + " and forward_prompts_once=False", stacklevel=2)
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
            record = hook(self, output)
            if self.alpha_from_probes is not None and isinstance(record, dict) and "grad_variances" in record:
                self._log_alpha_fit(self.alpha_from_probes.update(record, step=self.state.global_step + 1))
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
                alpha=self.current_alpha,
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

    # -- logging ---------------------------------------------------------------------------------------
    @property
    def current_alpha(self) -> float:
        """The α the weights use now: ``delta_l_alpha``, or with ``"auto"`` the probes' running estimate."""
        return self.alpha_from_probes.alpha if self.alpha_from_probes is not None else self.args.delta_l_alpha

    def _log_alpha_fit(self, fit: dict[str, Any]) -> None:
        for key in (
            ("k", "k_lo", "k_hi") if fit["updated"] else ()
        ):  # the fit behind a new α, with its interval
            if fit[key] == fit[key]:  # not NaN
                self._metrics["train"][f"delta_l/alpha_fit_{key}"].append(float(fit[key]))

    def _log_weight_stats(self, weights: torch.Tensor) -> None:
        mode = "train" if self.model.training else "eval"
        active = weights[weights > 0]
        if active.numel() == 0:
            return
        metrics = self._metrics[mode]
        metrics["delta_l/alpha"].append(float(self.current_alpha))
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
