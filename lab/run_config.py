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

from lab import rundir
from lab.aggregators import AGGREGATORS
from lab.aggregators import get as get_aggregator
from lab.auto_alpha import check_alpha_setting, check_auto_alpha, is_auto
from lab.devices import GENERATION_CHOICES, SMALL_MODEL_PRESETS, check_generation, check_vllm
from lab.models import EMBEDDED_MODEL, PRESETS, resolve_preset
from lab.runlog import run_id
from lab.tasks import DEMO, FAST, PAPER_WORLD, TASKS

AUTO_ALPHA_PROBE_EVERY = 2  # --alpha auto without --probe-every: a probe every 2 steps feeds the α estimate


#: Named bundles of defaults: ``fast`` (the default main job) and the SmolLM2 CountDown demo.
RUN_PRESETS: dict[str, dict[str, Any]] = {"fast": FAST, "paper-world": PAPER_WORLD, "smollm2-countdown": DEMO}
#: The task each of the lab's own small models knows.
OWN_MODEL_TASKS = {FAST["model"]: FAST["task"], PAPER_WORLD["model"]: PAPER_WORLD["task"]}
OPTIMIZERS = {"adamw": "adamw_torch", "sgd": "sgd"}  # --optimizer → transformers' optim name
#: Defaults outside the presets (a Qwen2.5 model on a GPU, the paper-like setting).
GENERAL = {"steps": 200, "prompts_per_step": 16, "num_generations": 8, "max_completion_length": 1024,
           "temperature": 1.0, "shaped": False, "learning_rate": {"adamw": 2e-5, "sgd": 1e-3}}  # fmt: skip


def infer_preset(model: str | None, task: str | None) -> str | None:
    """The preset whose defaults apply when none is named: ``fast`` with neither model nor task,
    ``paper-world`` for its model or task, the CountDown demo for the embedded model (and the ``tiny`` test
    model) on CountDown, else none."""
    if model in (None, FAST["model"]) and task in (None, FAST["task"]):
        return "fast"
    paper_model, paper_task = model in (None, PAPER_WORLD["model"]), task in (None, PAPER_WORLD["task"])
    if paper_model and paper_task and (model, task) != (None, None):
        return "paper-world"
    if model in (None, EMBEDDED_MODEL, "tiny") and task in (None, DEMO["task"]):
        return "smollm2-countdown"
    return None


def option(default: Any, help: str, *, parse: str | None = None, **cli: Any) -> Any:
    """A :class:`RunConfig` field that is also an option of ``lab train``/``lab compare``: :mod:`lab.options`
    builds each flag from these fields (as TRL's ``HfArgumentParser`` does from its configs), so an option
    is defined once. ``help`` is its help text, ``parse`` names the converter of its text (lab.options'
    ``PARSERS``; else the field's type), ``cli`` holds further argparse settings (choices, metavar).
    ``default`` may be a factory (``list``) for a mutable default."""
    metadata = {"help": help, "parse": parse, "cli": cli}
    if callable(default):
        return field(default_factory=default, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class RunConfig:
    """Everything one run needs; saved as ``config.json`` so a run can be reproduced or resumed.

    ``None`` means "the default": from the named ``preset`` (``fast`` or ``smollm2-countdown``, see
    :data:`RUN_PRESETS`), else from the preset :func:`infer_preset` picks for the model and task, else the
    paper-like defaults for a real model (:data:`GENERAL`). :meth:`resolved` fills them in.
    """

    aggregator: str = "delta_l"  # lab train --aggregator / lab compare --aggregators (lab.options)
    alpha: float | str = option(
        1.0,
        "ΔL exponent α >= 0 (default 1.0), or 'auto': α from the measured Var(g_i) ∝ L_i^k "
        "(lab.auto_alpha; turns on probes, every 2 steps unless --probe-every says otherwise)",
        parse="alpha",
    )
    delta_l_scope: str = option(
        "batch",
        "normalize the ΔL weights over the whole generation batch (default, as the paper's code: "
        "then GRPO and ΔL(α=1) share one gradient direction) or per prompt group",
        choices=("batch", "group"),
    )
    preset: str | None = option(
        None,
        "a named set of defaults: 'fast' (the default: the digitsum task on the lab's small model, "
        "5 seeds in parallel) or 'smollm2-countdown' (the embedded SmolLM2 on CountDown, LoRA); any other flag "
        "overrides it. Without --preset, --model/--task pick the defaults",
        choices=tuple(RUN_PRESETS),
    )
    task: str | None = option(None, "task (default: the preset's)", choices=tuple(TASKS))
    model: str | None = option(
        None,
        f"preset ({', '.join(PRESETS)}), hub id or local path (default: the preset's; "
        f"{EMBEDDED_MODEL} is the embedded real model)",
    )
    steps: int | None = option(None, "optimizer steps (default: the preset's)", parse="positive_int")
    seed: int = option(0, "first seed (default 0)")
    prompts_per_step: int | None = option(
        None, "prompts per optimizer step (default: the preset's)", parse="positive_int"
    )
    micro_batch_size: int | None = option(
        None,
        "completions per forward/backward (default min(8, rows)); the step's batch is accumulated",
        parse="positive_int",
    )
    num_generations: int | None = option(None, "completions per prompt (G)", parse="positive_int")
    max_completion_length: int | None = option(None, "M, in tokens", parse="positive_int")
    temperature: float | None = option(None, "sampling temperature (default: the preset's)")
    optimizer: str = option(
        "adamw",
        "adamw (default) or plain sgd: Adam absorbs a per-step scale of the gradient, SGD does not",
        choices=tuple(OPTIMIZERS),
    )
    learning_rate: float | None = option(None, "learning rate (default: the preset's, per optimizer)")
    max_grad_norm: float = option(
        1.0, "gradient clipping (default 1.0, the paper's; 0 turns it off)", parse="non_negative_float"
    )
    equalize_step_size: bool = option(
        False,
        "scale each aggregator's loss by (1/M)/Σx_i per batch, so all have ΔL's expected step size "
        "and only the gradient direction differs",
    )
    length_range: tuple[int, int] | None = option(
        None,
        "digitsum: digits per problem (default 2,12); longer problems need longer scratchpads",
        parse="length_range",
        metavar="MIN,MAX",
    )
    lora_r: int | None = option(None, "LoRA rank (default: the model's)", parse="positive_int")
    shaped_reward: bool | None = option(None, "a partial-credit reward (default: the preset's)")
    task_options: dict[str, Any] | None = None
    eval_every: int = option(0, "steps between evals (0: only after the last)")
    eval_prompts: int | None = option(
        None, "eval prompts (0: no eval; default: the preset's held-out set, else 0)"
    )
    eval_k: int | None = option(
        None, "samples per eval prompt (Avg@k, Pass@k; default: the preset's, else 4)", parse="positive_int"
    )
    probe_every: int | None = option(
        None, "per-sample gradient probe every K steps: measured CV, Var(g_i) vs L_i (0: off; fast: 5)"
    )
    compare_gradients_every: int | None = option(
        None,
        "log the cosine and norm ratio of the four aggregators' gradients every K steps (0: off; fast: 1)",
    )
    save_every: int | None = option(None, "checkpoint every K steps", parse="positive_int")
    threads: int | None = option(None, "torch CPU threads", parse="positive_int")
    log_texts: bool = option(False, "keep completion texts in samples.jsonl")
    report_to: list[str] = option(  # noqa: RUF009 (option returns a dataclasses.field)
        list, "comma list for TRL, e.g. wandb,tensorboard (default none)", parse="comma_list"
    )
    comparison: str | None = None
    vllm: bool = option(
        False,
        "generate with vLLM colocated in the training process (TRL use_vllm, vllm_mode=colocate); "
        "needs a CUDA GPU and the vllm package",
    )
    vllm_gpu_memory_utilization: float = option(
        0.3, "GPU memory fraction vLLM reserves with --vllm (default 0.3, TRL's)"
    )
    generation: str = option(
        "auto",
        "TRL's generation path: auto (default: plain generate on a GPU; on CPU a static cache with each "
        "prompt prefilled once, except for the fast preset), generate, continuous-batching (GPU), static-cache, "
        "static-compile (GPU), prefill-once; benchmarks/gpu_generation.py measures them",
        choices=GENERATION_CHOICES,
    )

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
        if c.eval_prompts is None:
            c.eval_prompts = d.get("eval_prompts", 0)
        if c.eval_k is None:
            c.eval_k = d.get("eval_k", 4)
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
        rundir.check_seed(c.seed)  # reliability: before any dir is made
        rundir.check_report_to(c.report_to)
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
    """The lab's own tasks and their models only make sense together (each model knows its task's words)."""
    for own_model, own_task in OWN_MODEL_TASKS.items():
        if task == own_task and model != own_model:
            raise ValueError(
                f"task {task!r} with model {model!r}: the {task!r} task needs the {own_model!r} model"
            )
        if model == own_model and task != own_task:
            raise ValueError(
                f"task {task!r} with model {model!r}: the {model!r} model knows only the {own_task!r} task"
            )


def _length_range_options(task: str, length_range: tuple[int, int]) -> dict[str, int]:
    if task != FAST["task"]:
        raise ValueError(f"--length-range applies to the {FAST['task']!r} task only, not {task!r}")
    from lab.tasks.digitsum import check_digit_range

    lo, hi = check_digit_range(*length_range)
    return {"min_digits": lo, "max_digits": hi}


def _default_max_length(c: RunConfig) -> int:
    """digitsum: room for the longest scratchpad (2n + 4 tokens) plus 4 to ramble; paperworld: its own."""
    if c.task == PAPER_WORLD["task"]:
        from lab.tasks.paperworld import MAX_COMPLETION_LENGTH

        return MAX_COMPLETION_LENGTH
    if c.task == FAST["task"]:
        from lab.tasks.digitsum import DEFAULT_DIGITS

        return 2 * int(c.task_options.get("max_digits", DEFAULT_DIGITS[1])) + 8
    return GENERAL["max_completion_length"]


def _check_numbers(c: RunConfig) -> None:
    rows = c.prompts_per_step * c.num_generations if isinstance(c.num_generations, int) else 0
    if c.micro_batch_size is None:
        c.micro_batch_size = (rows if c.preset in SMALL_MODEL_PRESETS else math.gcd(rows, 8)) or 1
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
