"""What one run is: the presets' defaults and :class:`RunConfig`, every value checked before anything runs.

``RunConfig`` is what ``lab train``/``lab compare`` build from their flags and what ``config.json`` stores;
:meth:`RunConfig.resolved` fills every ``None`` from the preset and refuses a bad value by name. The device
checks it makes (generation path, vLLM) live in :mod:`lab.devices`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

from lab.aggregators import AGGREGATORS
from lab.aggregators import get as get_aggregator
from lab.auto_alpha import check_alpha_setting, check_auto_alpha, is_auto
from lab.devices import check_generation, check_vllm
from lab.models import EMBEDDED_MODEL, resolve_preset
from lab.runlog import run_id
from lab.tasks import DEMO, FAST, TASKS

AUTO_ALPHA_PROBE_EVERY = 2  # --alpha auto without --probe-every: a probe every 2 steps feeds the α estimate


#: Named bundles of defaults: ``fast`` (the default main job) and the SmolLM2 CountDown demo.
RUN_PRESETS: dict[str, dict[str, Any]] = {"fast": FAST, "smollm2-countdown": DEMO}
OPTIMIZERS = {"adamw": "adamw_torch", "sgd": "sgd"}  # --optimizer → transformers' optim name
#: Defaults outside the presets (a Qwen2.5 model on a GPU, the paper-like setting).
GENERAL = {"steps": 200, "prompts_per_step": 16, "num_generations": 8, "max_completion_length": 1024,
           "temperature": 1.0, "shaped": False, "learning_rate": {"adamw": 2e-5, "sgd": 1e-3}}  # fmt: skip


def infer_preset(model: str | None, task: str | None) -> str | None:
    """The preset whose defaults apply when none is named: ``fast`` with neither model nor task, the
    CountDown demo for the embedded model (and the ``tiny`` test model) on CountDown, else none."""
    if model in (None, FAST["model"]) and task in (None, FAST["task"]):
        return "fast"
    if model in (None, EMBEDDED_MODEL, "tiny") and task in (None, DEMO["task"]):
        return "smollm2-countdown"
    return None


@dataclass
class RunConfig:
    """Everything one run needs; saved as ``config.json`` so a run can be reproduced or resumed.

    ``None`` means "the default": from the named ``preset`` (``fast`` or ``smollm2-countdown``, see
    :data:`RUN_PRESETS`), else from the preset :func:`infer_preset` picks for the model and task, else the
    paper-like defaults for a real model (:data:`GENERAL`). :meth:`resolved` fills them in.
    """

    aggregator: str = "delta_l"
    alpha: float | str = 1.0  # or "auto": α from the probes (lab.auto_alpha)
    delta_l_scope: str = "batch"
    preset: str | None = None
    task: str | None = None
    model: str | None = None
    steps: int | None = None
    seed: int = 0
    prompts_per_step: int | None = None
    micro_batch_size: int | None = None  # rows per forward/backward; None: min(8, rows per step) (fast: all)
    num_generations: int | None = None
    max_completion_length: int | None = None
    temperature: float | None = None
    optimizer: str = "adamw"
    learning_rate: float | None = None
    max_grad_norm: float = 1.0
    equalize_step_size: bool = False
    length_range: tuple[int, int] | None = None  # digitsum: digits per problem (min, max)
    lora_r: int | None = None
    shaped_reward: bool | None = None
    task_options: dict[str, Any] | None = None
    eval_every: int = 0  # 0: evaluate only after the last step (if eval_prompts > 0)
    eval_prompts: int = 0
    eval_k: int = 4
    probe_every: int | None = None
    compare_gradients_every: int | None = None
    save_every: int | None = None
    threads: int | None = None
    log_texts: bool = False
    report_to: list[str] = field(default_factory=list)
    comparison: str | None = None
    vllm: bool = False  # generate with vLLM colocated in the training process (TRL's use_vllm), GPU only
    vllm_gpu_memory_utilization: float = 0.3  # the GPU memory fraction vLLM reserves (TRL's default)
    generation: str = "auto"  # a GENERATION_CHOICES entry: TRL's generation path (auto: per device)

    def resolved(self) -> RunConfig:
        """A copy with every ``None`` filled in and every value checked (ValueError names the bad one)."""
        c = dataclasses.replace(self)
        if c.aggregator not in AGGREGATORS:
            raise ValueError(f"unknown aggregator {c.aggregator!r}; expected one of {', '.join(AGGREGATORS)}")
        c.alpha = check_alpha_setting(c.alpha)
        if c.preset is not None and c.preset not in RUN_PRESETS:
            raise ValueError(f"unknown preset {c.preset!r}; expected one of {', '.join(RUN_PRESETS)}")
        if c.task is not None and c.task not in TASKS:
            raise ValueError(f"unknown task {c.task!r}; expected one of {', '.join(TASKS)}")
        if c.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {c.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
        if c.delta_l_scope not in ("batch", "group"):
            raise ValueError(f"delta_l_scope must be 'batch' or 'group', got {c.delta_l_scope!r}")
        c.preset = c.preset or infer_preset(c.model, c.task)
        d = RUN_PRESETS[c.preset] if c.preset else GENERAL
        c.task = c.task or d.get("task", DEMO["task"])
        c.model = c.model or d.get("model", EMBEDDED_MODEL)
        resolve_preset(c.model)
        _check_task_model(c.task, c.model)
        for name in ("steps", "prompts_per_step", "num_generations", "temperature", "micro_batch_size",
                     "probe_every", "compare_gradients_every", "save_every", "threads"):  # fmt: skip
            if getattr(c, name) is None:
                setattr(c, name, d.get(name))
        if c.learning_rate is None:
            c.learning_rate = d.get("learning_rate", GENERAL["learning_rate"])[c.optimizer]
        if c.shaped_reward is None:
            c.shaped_reward = d.get("shaped", False)
        if c.task_options is None:
            c.task_options = dict(d.get("task_options", {})) if c.task == d.get("task") else {}
        if c.length_range is not None:
            c.task_options.update(_length_range_options(c.task, c.length_range))
        if c.max_completion_length is None:
            c.max_completion_length = d.get("max_completion_length") or _default_max_length(c)
        c.probe_every = c.probe_every or 0
        if is_auto(c.alpha):  # refused here, before any run dir exists, where the probes cannot run
            check_auto_alpha(c.aggregator, c.num_generations)
            c.probe_every = c.probe_every or AUTO_ALPHA_PROBE_EVERY
        c.compare_gradients_every = c.compare_gradients_every or 0
        if not get_aggregator(c.aggregator).weights_known:  # the four aggregators' gradients need their x_i
            c.compare_gradients_every = 0
        c.save_every = c.save_every or 5
        _check_numbers(c)
        check_generation(c.generation, c.vllm)
        if c.vllm:
            check_vllm(c.vllm_gpu_memory_utilization)
        return c

    @property
    def run_id(self) -> str:
        return run_id(self.aggregator, self.seed, self.alpha)


def run_defaults(config: RunConfig) -> dict[str, int]:
    """Comparison-level defaults of the config's preset: ``seeds`` (fast: 5, else 1), ``workers`` (fast: as
    many as there are CPU cores, at most its preset value; else 1). Validates the config (ValueError)."""
    c = config.resolved()
    d = RUN_PRESETS.get(c.preset or "", {})
    return {
        "seeds": int(d.get("seeds", 1)),
        "workers": max(1, min(int(d.get("workers", 1)), os.cpu_count() or 1)),
    }


def _check_task_model(task: str, model: str) -> None:
    """The digitsum task and its model only make sense together (the model knows 16 words)."""
    if (task == FAST["task"]) != (model == FAST["model"]):
        raise ValueError(
            f"task {task!r} with model {model!r}: the {FAST['task']!r} task needs the {FAST['model']!r} model "
            "and that model knows only that task"
        )


def _length_range_options(task: str, length_range: tuple[int, int]) -> dict[str, int]:
    if task != FAST["task"]:
        raise ValueError(f"--length-range applies to the {FAST['task']!r} task only, not {task!r}")
    from lab.tasks.digitsum import check_digit_range

    lo, hi = check_digit_range(*length_range)
    return {"min_digits": lo, "max_digits": hi}


def _default_max_length(c: RunConfig) -> int:
    """digitsum: room for the longest scratchpad (2n + 4 tokens) plus 4 to ramble."""
    if c.task == FAST["task"]:
        from lab.tasks.digitsum import DEFAULT_DIGITS

        return 2 * int(c.task_options.get("max_digits", DEFAULT_DIGITS[1])) + 8
    return GENERAL["max_completion_length"]


def _check_numbers(c: RunConfig) -> None:
    rows = c.prompts_per_step * c.num_generations if isinstance(c.num_generations, int) else 0
    if c.micro_batch_size is None:
        c.micro_batch_size = (rows if c.preset == "fast" else math.gcd(rows, 8)) or 1
    for name in ("steps", "prompts_per_step", "num_generations", "max_completion_length", "eval_k",
                 "save_every", "micro_batch_size"):  # fmt: skip
        value = getattr(c, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if rows % c.micro_batch_size:
        raise ValueError(
            f"micro_batch_size={c.micro_batch_size!r} must divide the {rows} completions of a step"
        )
    if c.num_generations < 2:
        raise ValueError(
            f"num_generations must be >= 2 (a group needs a reward spread), got {c.num_generations!r}"
        )
    for name in ("eval_every", "eval_prompts", "probe_every", "compare_gradients_every"):
        value = getattr(c, name)
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    for name in ("temperature", "learning_rate"):
        value = getattr(c, name)
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if not (
        isinstance(c.max_grad_norm, (int, float)) and math.isfinite(c.max_grad_norm) and c.max_grad_norm >= 0
    ):
        raise ValueError(
            f"max_grad_norm must be a finite number >= 0 (0: no clipping), got {c.max_grad_norm!r}"
        )
    if c.threads is not None and (not isinstance(c.threads, int) or c.threads < 1):
        raise ValueError(f"threads must be a positive integer, got {c.threads!r}")
