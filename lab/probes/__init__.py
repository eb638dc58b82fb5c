r"""Gradient probes: per-sample gradients of the trainable (LoRA) parameters, and what they say about ΔL.

The paper's assumption (docs/paper.md) is that the unnormalized per-response gradient

.. math::  g_i = \sum_{t=1}^{L_i} A_i \nabla_\theta \log \pi_\theta(o_{i,t} \mid q, o_{i,<t})

has variance growing linearly with the response length, :math:`\mathrm{Var}(g_i) \approx V L_i`.
This module measures it instead of assuming it:

1. :func:`per_sample_gradients` computes :math:`g_i` (one row per completion, flattened over the trainable
   parameters) on a real generation batch. With ``advantages=None`` every :math:`A_i = 1`, which gives the
   *score-function* gradient :math:`s_i = \sum_t \nabla_\theta \log\pi_\theta(o_{i,t}\mid\cdot)`: the object
   the :math:`\mathrm{Var} \propto L` assumption is about (:math:`g_i = A_i s_i`).
2. :func:`grad_variances` estimates :math:`\mathrm{tr}\,\mathrm{Var}(g_i)` of each row without bias (the
   naive group-centred :math:`\lVert g_i - \bar g\rVert^2` is not: it adds an intercept and flattens the
   exponent); :func:`probe_statistics` fits it against :math:`L_i` and measures, by bootstrap
   over responses, the coefficient of variation of every aggregator's :math:`\hat g = \sum_i x_i g_i`
   (weights :math:`x_i` from :func:`lab.aggregation.sequence_weights`, never re-derived here).
3. :func:`make_probe_hook` runs both inside :class:`lab.trainer.DeltaLGRPOTrainer` every ``k`` steps and
   logs ``probe/*`` metrics and a ``probes.jsonl`` record (:mod:`lab.runlog`).

Cost (measured on a 2-core CPU, 1 thread, SmolLM2-135M with LoRA r=16 on q/k/v/o,
1.8 M trainable parameters): one forward + backward per completion, about
:data:`MEASURED_SECONDS_PER_ROW` seconds per completion of ~210 tokens (150 prompt + up to 64 completion),
i.e. ~20 s for 8 completions, ~40 s for 16: the FLOPs of one more forward + backward over the batch
(``benchmarks/results/variance_vs_length.smollm2.json`` stores its own run's seconds per completion, for
completions of up to 256 tokens). Use ``torch.set_num_threads(1)`` on a small shared CPU.
``torch.func.vmap(grad(...))`` does not work on HF models here (the attention-mask code branches on tensor
values: "vmap: ... data-dependent control flow"), hence the row loop.

The code is in three modules along these seams: :mod:`lab.probes.gradients` (1), :mod:`lab.probes.statistics`
(2) and :mod:`lab.probes.hooks` (3, and the four aggregators' gradients on one batch); every name is importable
from ``lab.probes`` as before.
"""

from lab.probes.gradients import (  # noqa: F401
    MEASURED_SECONDS_PER_ROW,
    linear_per_sample_gradients,
    own_linear_layers,
    per_sample_gradients,
    sample_generation_batch,
    trainable_parameters,
)
from lab.probes.hooks import (  # noqa: F401
    AggregatorGradientHook,
    ProbeHook,
    aggregator_gradient_stats,
    make_probe_hook,
    pair_name,
)
from lab.probes.statistics import (  # noqa: F401
    bootstrap_cv,
    bootstrap_variance_fit,
    grad_variances,
    group_centred_norms,
    group_labels,
    least_squares,
    power_law_exponent,
    probe_statistics,
    unbiased_variances,
    variance_length_fit,
)
