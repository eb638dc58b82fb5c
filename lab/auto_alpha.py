r"""α from the measured variance (``delta_l_alpha="auto"``): a step beyond the paper.

If :math:`\mathrm{Var}(g_i) \propto L_i^k`, the minimum-variance unbiased weights are
:math:`x_i \propto 1/\mathrm{Var}(g_i) \propto L_i^{-k}`: ΔL with :math:`\alpha = k` (the paper's α = 1 is the
case k = 1). :class:`AlphaFromProbes` turns the gradient probes of a run (:mod:`lab.probes`: the unbiased
per-completion variances :math:`\hat t_i` and their lengths) into that α, step by step:

1. pool the rows of the last ``window`` probes (one probe has only a few dozen rows: its k is noisy);
2. fit :math:`E[\hat t_i] = c L_i^k` (:func:`lab.probes.power_law_exponent`; the scale c may differ between
   probes, the exponent is what is pooled), with a percentile bootstrap interval over prompt groups;
3. smooth: :math:`\alpha \leftarrow (1-\beta)\,\alpha + \beta\,\mathrm{clip}(k, 0, \alpha_{max})`;
4. until ``min_probes`` probes exist, α stays at ``start`` (1, the paper's choice).

Caveat the lab measures rather than hides: minimum variance is not the whole story when length carries
information about the reward (digitsum: a long answer is a thinking one); then a larger α also shifts weight
toward short answers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from lab.aggregation import check_alpha
from lab.probes import bootstrap_variance_fit, power_law_exponent

AUTO = "auto"
DEFAULT_ALPHA_MAX = 2.0  # k = 2 is what fully correlated token terms give; beyond it the fit is not trusted


@dataclass
class AlphaFromProbes:
    """The running α of a ``delta_l_alpha="auto"`` run (see the module docstring)."""

    alpha_max: float = DEFAULT_ALPHA_MAX
    window: int = 4
    min_probes: int = 2
    smoothing: float = 0.5
    start: float = 1.0
    group_size: int | None = None
    n_bootstrap: int = 200
    alpha: float = field(init=False)
    history: list[dict[str, Any]] = field(default_factory=list, init=False)
    _probes: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if not (isinstance(self.alpha_max, (int, float)) and 0 < self.alpha_max <= 10):
            raise ValueError(f"alpha_max must be in (0, 10], got {self.alpha_max!r}")
        if not (isinstance(self.window, int) and self.window >= 1):
            raise ValueError(f"window must be a positive integer, got {self.window!r}")
        if not (isinstance(self.min_probes, int) and 1 <= self.min_probes):
            raise ValueError(f"min_probes must be a positive integer, got {self.min_probes!r}")
        if not 0 < self.smoothing <= 1:
            raise ValueError(f"smoothing must be in (0, 1], got {self.smoothing!r}")
        if not 0 <= self.start <= self.alpha_max:
            raise ValueError(f"start must be in [0, alpha_max={self.alpha_max}], got {self.start!r}")
        self.alpha = float(self.start)

    def update(self, record: dict[str, Any], step: int) -> dict[str, Any]:
        """Take one probe record (``lengths``, ``grad_variances``) and return the fit and the new α."""
        L = torch.as_tensor(record["lengths"], dtype=torch.float64).reshape(-1)
        v = torch.as_tensor(record["grad_variances"], dtype=torch.float64).reshape(-1)
        if L.shape != v.shape:
            raise ValueError(f"probe record: {L.numel()} lengths but {v.numel()} variances")
        self._probes = [*self._probes, (L, v)][-self.window :]
        fit = self._fit()
        k = fit["k"]
        updated = len(self._probes) >= self.min_probes and math.isfinite(k)
        if updated:
            target = min(max(k, 0.0), self.alpha_max)  # $\mathrm{clip}(k, 0, \alpha_{max})$
            self.alpha = (1 - self.smoothing) * self.alpha + self.smoothing * target
        entry = {"step": int(step), "alpha": self.alpha, "updated": updated, **fit}
        self.history.append(entry)
        return entry

    def _fit(self) -> dict[str, Any]:
        """k and its interval on the pooled rows; groups are numbered apart across probes."""
        lengths, variances, groups, offset = [], [], [], 0
        for L, v in self._probes:
            size = self.group_size if self.group_size and L.numel() % self.group_size == 0 else L.numel()
            labels = torch.arange(L.numel()) // size + offset
            offset = int(labels.max()) + 1 if L.numel() else offset
            lengths.append(L)
            variances.append(v)
            groups.append(labels)
        L, v, g = torch.cat(lengths), torch.cat(variances), torch.cat(groups)
        ok = (L > 0) & torch.isfinite(v)
        k = power_law_exponent(L[ok], v[ok]) if int(ok.sum()) >= 3 else math.nan
        lo = hi = math.nan
        if math.isfinite(k) and len(g[ok].unique()) >= 3:
            interval = bootstrap_variance_fit(L[ok], v[ok], g[ok], n_bootstrap=self.n_bootstrap)["exponent"]
            lo, hi = interval
        return {"k": k, "k_lo": lo, "k_hi": hi, "rows": int(ok.sum()), "probes": len(self._probes)}


def is_auto(alpha: object) -> bool:
    """``alpha`` asks for α from the measured variance (the string ``"auto"``, any case)."""
    return isinstance(alpha, str) and alpha.strip().lower() == AUTO


def check_alpha_setting(value: object) -> float | str:
    """``"auto"`` or a valid α (:func:`lab.aggregation.check_alpha`); anything else: ValueError naming it."""
    if is_auto(value):
        return AUTO
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"alpha must be a number >= 0 or 'auto', got {value!r}") from None
    return check_alpha(value)


MIN_GROUP_FOR_AUTO = 3  # the unbiased per-completion variance needs >= 3 completions sharing a prompt


def check_auto_alpha(loss_type: str, num_generations: int | None) -> None:
    """Refuse ``alpha="auto"`` where it cannot work, saying why."""
    if loss_type != "delta_l":
        raise ValueError(f"alpha 'auto' sets ΔL's exponent: it needs loss_type 'delta_l', got {loss_type!r}")
    if num_generations is None or num_generations < MIN_GROUP_FOR_AUTO:
        raise ValueError(
            f"alpha 'auto' needs num_generations >= {MIN_GROUP_FOR_AUTO} (the probes' unbiased per-completion "
            f"variance compares each completion with >= 2 others of its prompt), got {num_generations!r}"
        )
