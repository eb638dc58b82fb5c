"""Gradient probes, part 3: the trainer hooks that run them during training (see :mod:`lab.probes`)."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from typing import Any

import torch

from lab.aggregation import METHODS, batch_weights, check_alpha
from lab.probes.gradients import (
    linear_per_sample_gradients,
    own_linear_layers,
    per_sample_gradients,
)
from lab.probes.statistics import (
    probe_statistics,
)


# ---------------------------------------------------------------------------------------------------
# 3. the trainer hook
# ---------------------------------------------------------------------------------------------------
class ProbeHook:
    """``hook(trainer, output)``: a gradient probe on every ``every``-th generation batch.

    Called by the trainer after each generation batch (``trainer.generation_hooks``) with TRL's output
    dict (``prompt_ids``, ``prompt_mask``, ``completion_ids``, ``completion_mask``, ``advantages``, ...).
    When ``trainer.state.global_step % every == 0`` it computes the score-function gradients of (at most
    ``max_rows``) completions, :func:`probe_statistics` on them, appends a record to :attr:`records`
    (``step`` = ``global_step + 1``, the optimizer step these completions train, as in ``samples.jsonl``;
    plus ``seconds``, the probe's cost) and flat metrics ``probe/cv/<method>``, ``probe/var_length_slope``,
    ``probe/var_length_corr``, ``probe/var_length_exponent``, ``probe/seconds`` to
    ``trainer._metrics["train"]`` (non-finite values are not logged: a CV is ``inf`` when the probed rows do
    not resolve the mean gradient from its noise, see :func:`bootstrap_cv`). Only the main process probes
    (its own rows).

    ``alpha`` and ``max_length`` default to the trainer's ``current_alpha`` (1.0 if absent) and
    ``max_completion_length``; ``max_rows`` caps the cost (rounded down to whole prompt groups).
    """

    def __init__(
        self,
        every: int,
        *,
        alpha: float | None = None,
        max_length: float | None = None,
        max_rows: int | None = None,
        n_bootstrap: int = 200,
        seed: int = 0,
        batched: bool = False,
    ):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        self.every, self.max_rows, self.n_bootstrap, self.seed = every, max_rows, n_bootstrap, seed
        self.batched = batched  # one batched backward (linear_per_sample_gradients) instead of a row loop
        self.alpha = None if alpha is None else check_alpha(alpha)
        self.max_length = max_length
        self.records: list[dict[str, Any]] = []

    def __call__(self, trainer: Any, output: dict[str, Any]) -> dict[str, Any] | None:
        step = int(trainer.state.global_step)
        accelerator = getattr(trainer, "accelerator", None)
        if step % self.every or (accelerator is not None and not accelerator.is_main_process):
            return None
        record = self.probe(trainer, output)
        record["step"] = step + 1
        self.records.append(record)
        self._log_metrics(trainer, record)
        return record

    def probe(self, trainer: Any, output: dict[str, Any]) -> dict[str, Any]:
        """The probe record of one generation batch (no step, no side effects on the trainer)."""
        start = time.perf_counter()
        group = getattr(trainer, "num_generations", None)
        rows = self._rows(output["completion_ids"].shape[0], group)
        mask = output["completion_mask"]
        if "tool_mask" in output:
            mask = mask * output["tool_mask"]
        mask = mask[:rows]
        batch = (
            output["prompt_ids"][:rows],
            output["prompt_mask"][:rows],
            output["completion_ids"][:rows],
            mask,
        )
        temperature = float(getattr(trainer, "temperature", 1.0))
        covered = 1.0
        if self.batched:
            grads, covered = linear_per_sample_gradients(trainer.model, *batch, temperature=temperature)
        else:
            grads = per_sample_gradients(trainer.model, *batch, temperature=temperature)
        lengths = mask.sum(-1).cpu()
        record = probe_statistics(
            grads,
            lengths,
            alpha=self.alpha if self.alpha is not None else float(getattr(trainer, "current_alpha", 1.0)),
            max_length=max(float(self.max_length or trainer.max_completion_length), float(lengths.max())),
            group_size=group if group and rows % group == 0 else None,
            advantages=output["advantages"][:rows].detach().cpu().reshape(rows, -1)[:, 0],
            n_bootstrap=self.n_bootstrap,
            seed=self.seed,
        )
        record["seconds"] = time.perf_counter() - start
        record["param_fraction"] = covered
        return record

    def _rows(self, n: int, group: int | None) -> int:
        """How many leading rows to probe: all, or ``max_rows`` rounded down to whole groups."""
        if self.max_rows is None or self.max_rows >= n:
            return n
        if group and self.max_rows >= group:
            return self.max_rows - self.max_rows % group
        return max(self.max_rows, 3)  # grad_variances needs >= 3 rows sharing a mean

    @staticmethod
    def _log_metrics(trainer: Any, record: dict[str, Any]) -> None:
        metrics = getattr(trainer, "_metrics", None)
        if metrics is None:
            return
        train = metrics["train"]
        flat = {f"probe/cv/{m}": v for m, v in record["cv"].items()}
        flat |= {
            "probe/var_length_slope": record["slope"],
            "probe/var_length_corr": record["correlation"],
            "probe/var_length_exponent": record["exponent"],
            "probe/seconds": record["seconds"],
        }
        for name, value in flat.items():
            if value is not None and math.isfinite(value):
                train[name].append(float(value))


def make_probe_hook(
    every: int,
    *,
    alpha: float | None = None,
    max_length: float | None = None,
    max_rows: int | None = None,
    n_bootstrap: int = 200,
    seed: int = 0,
    batched: bool = False,
) -> ProbeHook:
    """A :class:`ProbeHook` for ``trainer.generation_hooks``: probes every ``every`` steps; records in ``.records``.

    Cost: about :data:`MEASURED_SECONDS_PER_ROW` s per completion on the embedded model on CPU.
    """
    return ProbeHook(
        every, alpha=alpha, max_length=max_length, max_rows=max_rows, n_bootstrap=n_bootstrap, seed=seed,
        batched=batched,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# 4. the four aggregators' gradients on the same batch
# ---------------------------------------------------------------------------------------------------
def pair_name(a: str, b: str) -> str:
    """``grpo~delta_l``: the metric suffix of a pair of aggregators."""
    return f"{a}~{b}"


def aggregator_gradient_stats(grads: torch.Tensor, methods: Sequence[str] = METHODS) -> dict[str, float]:
    r"""Cosine and norm ratio of every pair of aggregated gradients :math:`\hat g_m` (rows of ``grads``).

    Keys ``agg_grad/norm/<m>`` (:math:`\lVert\hat g_m\rVert`), ``agg_grad/cos/<a>~<b>`` and
    ``agg_grad/norm_ratio/<a>~<b>`` (:math:`\lVert\hat g_a\rVert / \lVert\hat g_b\rVert`) for a before b in
    ``methods``. A cosine of 1 with a norm ratio that moves from batch to batch is a per-batch scalar: the
    same direction at a different step size.
    """
    g = grads.double()
    gram = g @ g.T
    norms = gram.diagonal().clamp(min=0).sqrt()
    out = {f"agg_grad/norm/{m}": float(n) for m, n in zip(methods, norms, strict=True)}
    for i, a in enumerate(methods):
        for j in range(i + 1, len(methods)):
            b = methods[j]
            denom = float(norms[i] * norms[j])
            out[f"agg_grad/cos/{pair_name(a, b)}"] = float(gram[i, j]) / denom if denom > 0 else math.nan
            out[f"agg_grad/norm_ratio/{pair_name(a, b)}"] = (
                float(norms[i] / norms[j]) if norms[j] > 0 else math.nan
            )
    return out


class AggregatorGradientHook:
    r"""The gradient each of the four aggregators would take on a step's batch, compared pairwise and logged.

    The gradients are :math:`\hat g_m = \sum_i x_{m,i} A_i s_i` with the weights of
    :func:`lab.aggregation.batch_weights` (TRL's batch normalization; ΔL with the run's α and scope),
    restricted to the trainable weights of ``nn.Linear`` layers (:func:`linear_per_sample_gradients`).

    It costs no extra forward or backward pass: it listens to the training step's own backward. On policy
    (one optimizer step per generation batch, ratio 1, so no clipping), the run's loss gives row i the output
    gradients :math:`\delta_{i,t} = -x_{\text{run},i} A_i\,\partial_h \log\pi`; dividing by the run's own
    weight and multiplying by each aggregator's, :math:`r_{m,i} = x_{m,i}/x_{\text{run},i}`, turns them into every
    aggregator's (the common minus sign changes no cosine or ratio). So the trainer calls
    :meth:`on_generation` (a generation hook: stores :math:`r` with the batch, which TRL shuffles and splits),
    :meth:`capture` around each micro-batch's forward, and :meth:`after_backward` after each backward; when
    all rows of the batch are in, :func:`aggregator_gradient_stats` goes to the step's metrics.

    Not with gradient checkpointing (the recomputed forward would be captured twice) nor with several
    processes (each holds a slice of the batch); the trainer switches it off there with a warning.
    """

    KEY = "aggregator_ratios"

    def __init__(self, every: int = 1):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        self.every = every
        self._rows_expected = 0
        self._rows_done = 0
        self._rows_in_flight = 0  # rows whose forward was captured, backward not yet folded in
        self._sums: dict[str, torch.Tensor] = {}
        self.last: dict[str, float] | None = None  # the stats of the last completed step

    def on_generation(self, trainer: Any, output: dict[str, Any]) -> None:
        """Generation hook: the ratios :math:`r_{m,i}` of this batch, one row per completion."""
        if int(trainer.state.global_step) % self.every:
            return
        mask = output["completion_mask"]
        if "tool_mask" in output:
            mask = mask * output["tool_mask"]
        lengths = mask.sum(-1).cpu()
        args = trainer.args
        M = max(float(trainer.max_completion_length), float(lengths.max()))
        x = batch_weights(
            lengths,
            alpha=float(getattr(trainer, "current_alpha", 1.0)),
            max_length=M,
            delta_l_group_size=trainer.num_generations
            if getattr(args, "delta_l_scope", "batch") == "group"
            else None,
        )
        x_run = x[list(METHODS).index(trainer.loss_type)]
        if "step_scale" in output:  # equalize_step_size multiplies the run's loss by c
            x_run = x_run * output["step_scale"].detach().cpu().double()
        ratios = torch.where(x_run > 0, x / x_run.clamp(min=1e-300), torch.zeros_like(x)).T  # (N, 4)
        output[self.KEY] = ratios.to(torch.float32)
        self._rows_expected, self._rows_done, self._sums = int(lengths.shape[0]), 0, {}

    @contextlib.contextmanager
    def capture(self, model: torch.nn.Module, inputs: dict[str, Any]):
        """Around one micro-batch's loss forward: hooks that fold each row's gradient into the four sums."""
        ratios = inputs.get(self.KEY)
        if ratios is None:
            yield
            return
        ratios = ratios.float()
        self._rows_in_flight += int(ratios.shape[0])
        handles = [
            module.register_forward_hook(self._forward_hook(name, ratios))
            for name, module in own_linear_layers(model)
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _forward_hook(self, name: str, ratios: torch.Tensor):
        def hook(module, args, output):
            x = args[0].detach()
            if x.shape[0] != ratios.shape[0]:
                return  # a forward in chunks smaller than the micro-batch: rows cannot be matched, skip

            def on_grad(delta: torch.Tensor) -> None:
                d = delta.float()
                # $\sum_i r_{m,i}\,\delta_{i,t}^\top x_{i,t}$ for the four aggregators m at once
                weighted = (ratios.T.to(d)[:, :, None, None] * d).flatten(1, 2)  # (4, B·T, out)
                grad = weighted.transpose(1, 2) @ x.float().flatten(0, 1)  # (4, out, in)
                flat = grad.reshape(grad.shape[0], -1)
                if module.bias is not None and module.bias.requires_grad:
                    flat = torch.cat([flat, ratios.T.to(d) @ d.sum(1)], dim=1)
                self._sums[name] = self._sums[name] + flat if name in self._sums else flat

            output.register_hook(on_grad)

        return hook

    def after_backward(self, trainer: Any) -> dict[str, float] | None:
        """After a micro-batch's backward: when the whole batch is in, log the pairwise stats."""
        rows, self._rows_in_flight = self._rows_in_flight, 0
        if not self._rows_expected:
            return None
        self._rows_done += rows
        if self._rows_done < self._rows_expected:
            return None
        grads = torch.cat([self._sums[k] for k in sorted(self._sums)], dim=1) if self._sums else None
        self._rows_expected, self._sums = 0, {}
        if grads is None:
            return None
        stats = aggregator_gradient_stats(grads)
        metrics = trainer._metrics["train"]
        for name, value in stats.items():
            if math.isfinite(value):
                metrics[name].append(value)
        self.last = stats
        return stats
