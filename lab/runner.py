"""One training run, and a fair comparison of aggregators: model + task + DeltaLGRPOTrainer + run log.

``train_run`` builds everything from a :class:`RunConfig` and writes ``<run_dir>/`` in the
:mod:`lab.runlog` schema; ``run_comparison`` repeats it for every aggregator and seed with the same
prompts, seeds and sampling settings (a fair A/B), one run after another on one device.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from lab.aggregation import METHODS, check_alpha, counterfactual_cv
from lab.models import EMBEDDED_MODEL, load_model_and_tokenizer, lora_config, model_path, resolve_preset
from lab.runlog import CONFIG, METRICS, STATUS, RunWriter, read_json, run_id, run_label
from lab.tasks import DEMO, FAST, PAPER_WORLD, TASKS, get_task

CHECKPOINTS = "checkpoints"


#: Named bundles of defaults: ``fast`` (the default main job), ``paper-world`` (the positive control) and the
#: SmolLM2 CountDown demo.
RUN_PRESETS: dict[str, dict[str, Any]] = {"fast": FAST, "paper-world": PAPER_WORLD, "smollm2-countdown": DEMO}
#: The presets of the lab's own small models (one batched probe backward, the whole step in one micro-batch,
#: TRL's plain generation path) and the task each model knows.
SMALL_MODEL_PRESETS = ("fast", "paper-world")
OWN_MODEL_TASKS = {FAST["model"]: FAST["task"], PAPER_WORLD["model"]: PAPER_WORLD["task"]}
OPTIMIZERS = {"adamw": "adamw_torch", "sgd": "sgd"}  # --optimizer → transformers' optim name
#: ``--generation``: TRL's generation paths as GRPOConfig/DeltaLGRPOConfig fields (benchmarks/gpu_generation.py
#: measures each). ``auto`` (the default) is :func:`device_settings`' per-device choice.
GENERATION_PATHS: dict[str, dict[str, Any]] = {
    "generate": {},  # transformers' generate with a dynamic KV cache (TRL's default)
    "continuous-batching": {"use_transformers_continuous_batching": True},  # transformers' paged engine
    "static-cache": {"cache_implementation": "static"},
    "static-compile": {"cache_implementation": "static", "compile_generation": True},  # CUDA only
    "prefill-once": {"prefill_prompts_once": True},  # the lab's: each prompt prefilled once (lab.trainer)
}
GENERATION_CHOICES = ("auto", *GENERATION_PATHS)
GPU_ONLY_GENERATION = {  # why each is refused without CUDA
    "static-compile": "transformers compiles generation only there; use --generation static-cache",
    "continuous-batching": "on CPU transformers sizes its KV cache at half the machine's RAM, and it was slower "
    "than generate there (benchmarks/gpu_generation.py --quick)",
}
#: Defaults outside the presets (a Qwen2.5 model on a GPU, the paper-like setting).
GENERAL = {"steps": 200, "prompts_per_step": 16, "num_generations": 8, "max_completion_length": 1024,
           "temperature": 1.0, "shaped": False, "learning_rate": {"adamw": 2e-5, "sgd": 1e-3}}  # fmt: skip


def infer_preset(model: str | None, task: str | None) -> str | None:
    """The preset whose defaults apply when none is named: ``fast`` with neither model nor task,
    ``paper-world`` for its model or task, the CountDown demo for the embedded model (and the ``tiny`` test model) on CountDown, else none."""
    if model in (None, FAST["model"]) and task in (None, FAST["task"]):
        return "fast"
    paper_model, paper_task = model in (None, PAPER_WORLD["model"]), task in (None, PAPER_WORLD["task"])
    if paper_model and paper_task and (model, task) != (None, None):
        return "paper-world"
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
    alpha: float = 1.0
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
    eval_prompts: int | None = None  # None: the preset's (the fast presets' held-out evaluation), else 0
    eval_k: int | None = None  # None: the preset's, else 4
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
        if c.aggregator not in METHODS:
            raise ValueError(f"unknown aggregator {c.aggregator!r}; expected one of {', '.join(METHODS)}")
        c.alpha = check_alpha(c.alpha)
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
        c.compare_gradients_every = c.compare_gradients_every or 0
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


# ---------------------------------------------------------------------------------------------------
# the run log written during training (lab.runlog is the schema and the readers; it imports no trainer code)
# ---------------------------------------------------------------------------------------------------
class RunLogCallback(TrainerCallback):
    """Writes metrics/samples/probes/status of a ``DeltaLGRPOTrainer`` run into a run dir, one step at a time.

    Needs ``logging_steps=1``. Only the main process writes. ``trainer`` is attached after the trainer is
    built (``callback.trainer = trainer``) so the callback can drain its ``generation_records`` and the
    records of any probe hook listed in ``probe_hooks``.
    """

    def __init__(self, writer: RunWriter, *, max_length: int, alpha: float = 1.0, on_step=None):
        self.writer = writer
        self.max_length = int(max_length)
        self.alpha = float(alpha)
        self.trainer = None
        self.probe_hooks: list = []
        self.on_step = on_step  # optional callable(step, trainer) for evaluation; may return an eval record
        self._step_started = time.perf_counter()
        self._last_tokens: float | None = None
        self.progress: tuple[str, int] | None = None  # (name, every k steps): print a short line

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_started = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return  # the end-of-training summary has no "loss" key of a step
        step = int(state.global_step)
        elapsed = time.perf_counter() - self._step_started
        record: dict[str, Any] = {
            "step": step,
            "wall_time": time.time(),
            "step_time": logs.get("step_time", elapsed),
        }
        tokens = logs.get("num_tokens")
        if tokens is not None and self._last_tokens is not None and elapsed > 0:
            record["tokens_per_second"] = (tokens - self._last_tokens) / elapsed
        if tokens is not None:
            self._last_tokens = tokens
        record.update(logs)
        record.update(self._write_samples(step))
        self._write_probes()
        self.writer.log_metrics(record)
        self.writer.set_status("running", step, state.max_steps)
        if self.progress and (step % self.progress[1] == 0 or step == state.max_steps):
            print(
                f"  {self.progress[0]}: step {step}/{state.max_steps}  reward {record.get('reward', float('nan')):.3f}  "
                f"mean length {record.get('completions/mean_length', float('nan')):.1f}  "
                f"{record['step_time']:.2f} s/step",
                flush=True,
            )

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.on_step is not None:
            result = self.on_step(int(state.global_step), self.trainer)
            if result:
                self.writer.log_eval(result)

    def _write_samples(self, step: int) -> dict[str, float]:
        """Write the generation records of this step; return its counterfactual CV per aggregator."""
        if self.trainer is None:
            return {}
        records, self.trainer.generation_records = self.trainer.generation_records, []
        cv: dict[str, float] = {}
        for record in records:
            record = {**record, "step": step}
            self.writer.log_samples(record)
            lengths = [n for n in record["lengths"] if n > 0]
            if lengths:
                m = max(self.max_length, max(lengths))
                cv = {
                    f"cv/{k}": v
                    for k, v in counterfactual_cv(lengths, alpha=self.alpha, max_length=m).items()
                }
        return cv

    def _write_probes(self) -> None:
        for hook in self.probe_hooks:
            records, hook.records = list(hook.records), []
            for record in records:
                self.writer.log_probe(record)


def check_vllm(gpu_memory_utilization: float) -> None:
    """ValueError (before anything is created) unless vLLM can run here: importable, a CUDA GPU, a sane fraction."""
    if not 0 < gpu_memory_utilization < 1:
        raise ValueError(f"vllm_gpu_memory_utilization must be in (0, 1), got {gpu_memory_utilization!r}")
    if importlib.util.find_spec("vllm") is None:
        raise ValueError(
            "--vllm needs the vllm package, which is not installed in this environment: install a version TRL "
            "supports on a CUDA machine (`pip install 'trl[vllm]'`), or drop --vllm to generate with transformers"
        )
    if not torch.cuda.is_available():
        raise ValueError("--vllm needs a CUDA GPU (vLLM does not run on this machine's CPU); drop --vllm")


def check_generation(generation: str, vllm: bool) -> None:
    """ValueError unless ``generation`` names a path that can run here (and vLLM is not also asked for)."""
    if generation not in GENERATION_CHOICES:
        raise ValueError(
            f"unknown generation path {generation!r}; expected one of {', '.join(GENERATION_CHOICES)}"
        )
    if vllm and generation != "auto":
        raise ValueError(
            f"--generation {generation} cannot be combined with --vllm (vLLM does the generation)"
        )
    if generation in GPU_ONLY_GENERATION and not torch.cuda.is_available():
        raise ValueError(f"--generation {generation} needs a CUDA GPU: {GPU_ONLY_GENERATION[generation]}")


def device_settings(c: RunConfig, on_gpu: bool) -> dict[str, Any]:
    """TRL/transformers switches that trade memory against time, per device (measured choices).

    GPU: bf16 and activation checkpointing (TRL's defaults). CPU (measured on the demo, 2 cores:
    benchmarks/cpu_step_profile.py, benchmarks/prompt_sharing.py): fp32 (bf16 was not faster), no
    checkpointing, each distinct prompt prefilled once in generation and forwarded once per micro-batch in
    the loss, micro-batches cut by prompt (all exact; lab.trainer) -- the demo's prompts are ~6x longer than
    its completions and each is repeated num_generations times -- and a static KV cache for sampling
    (transformers' own; the growing cache is re-copied at every token). vLLM: colocated. ``--generation``
    other than ``auto`` replaces the generation settings with exactly that :data:`GENERATION_PATHS` entry.

    The fast preset keeps TRL's plain path: its prompts are ~10 tokens (nothing to share), it reads the
    aggregators' gradients off the training backward (which needs one forward per row), and its stored
    results (benchmarks/results/fast_compare*.json) were measured that way. A run that compares gradients
    keeps the plain loss forward for the same reason.
    """
    share = not on_gpu and c.preset not in SMALL_MODEL_PRESETS
    if c.generation != "auto":
        generation = GENERATION_PATHS[c.generation]
    else:  # GPU and the fast preset: TRL's generate; CPU: a static cache, each prompt prefilled once
        generation = {**GENERATION_PATHS["static-cache"], **GENERATION_PATHS["prefill-once"]} if share else {}
    settings: dict[str, Any] = {
        "bf16": on_gpu and torch.cuda.is_bf16_supported(),
        "activation_checkpointing": on_gpu,
        "prefill_prompts_once": False,
        "forward_prompts_once": share and not c.compare_gradients_every,
        **generation,
    }
    if c.vllm:
        settings.update(
            use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=c.vllm_gpu_memory_utilization
        )
    return settings


def _trl_args(c: RunConfig, run_dir: Path):
    from lab.trainer import DeltaLGRPOConfig

    on_gpu = torch.cuda.is_available()
    accumulation = c.prompts_per_step * c.num_generations // c.micro_batch_size
    return DeltaLGRPOConfig(
        output_dir=str(run_dir / CHECKPOINTS),
        loss_type=c.aggregator,  # TRL's grpo / dapo / dr_grpo, or our delta_l
        delta_l_alpha=c.alpha,
        delta_l_scope=c.delta_l_scope,
        max_steps=c.steps,
        # One generation batch of prompts_per_step × num_generations completions per optimizer step, split
        # into micro-batches (TRL shuffles and splits it; the ΔL weights are computed on the whole batch first).
        per_device_train_batch_size=c.micro_batch_size,
        gradient_accumulation_steps=accumulation,
        steps_per_generation=accumulation,
        num_generations=c.num_generations,
        max_completion_length=c.max_completion_length,
        temperature=c.temperature,
        top_k=0,  # plain sampling at the temperature, as the completions' log-probs assume
        top_p=1.0,
        learning_rate=c.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        beta=0.0,  # no KL, as in the paper's aggregator comparison
        epsilon=0.2,
        epsilon_high=0.3,  # the paper's clip 0.2 / 0.3
        max_grad_norm=c.max_grad_norm,
        optim=OPTIMIZERS[c.optimizer],
        equalize_step_size=c.equalize_step_size,
        logging_steps=1,
        save_strategy="steps",
        save_steps=c.save_every,
        save_total_limit=2,
        report_to=c.report_to,
        seed=c.seed,
        data_seed=c.seed,
        use_cpu=not on_gpu,
        disable_tqdm=False,
        **device_settings(c, on_gpu),
    )


def _set_threads(c: RunConfig) -> None:
    if c.threads:
        torch.set_num_threads(c.threads)
    elif not torch.cuda.is_available():
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _last_checkpoint(run_dir: Path) -> Path | None:
    ckpts = [p for p in (run_dir / CHECKPOINTS).glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    return max(ckpts, key=lambda p: int(p.name.rsplit("-", 1)[1]), default=None)


#: The held-out evaluation's metric in ``metrics.jsonl`` (on the steps that evaluate; TRL-style name): the
#: mean score of every eval sample, with its sampling standard error beside it (``..._se``).
HELDOUT_METRIC = "eval/heldout_reward"


def heldout_reward(per_prompt: list[dict[str, Any]]) -> tuple[float, float]:
    r"""Mean score over the eval samples and its sampling standard error for these fixed prompts:
    :math:`\sqrt{\sum_i \hat p_i (1 - \hat p_i) / (k - 1)} / n` over the n prompts' k samples each
    (the binomial error of each prompt's mean, unbiased; prompt-to-prompt spread is not sampling error)."""
    n = len(per_prompt)
    means = [sum(p["scores"]) / len(p["scores"]) for p in per_prompt]
    spread = sum(m * (1 - m) / max(len(p["scores"]) - 1, 1) for m, p in zip(means, per_prompt, strict=True))
    return sum(means) / n, math.sqrt(spread) / n


def _evaluator(c: RunConfig, task, tokenizer, eval_data):
    """on_step callable for RunLogCallback: Avg@k / Pass@k every eval_every steps and after the last.

    The result also goes into the step's metrics (:data:`HELDOUT_METRIC`, through the trainer's metric
    buffer, which TRL logs right after this call): the verdict reads it like the training reward.
    """
    from lab.evaluation import evaluate_model

    def on_step(step: int, trainer) -> dict | None:
        due = (c.eval_every and step % c.eval_every == 0) or step == c.steps
        if eval_data is None or not due:
            return None
        model = trainer.model
        was_training = model.training
        model.eval()
        result = evaluate_model(
            model,
            tokenizer,
            eval_data,
            task,
            k=c.eval_k,
            max_new_tokens=c.max_completion_length,
            temperature=c.temperature,
            seed=c.seed,
            batch_size=512,
        )
        model.train(was_training)
        reward, error = heldout_reward(result["per_prompt"])
        metrics = getattr(trainer, "_metrics", None)
        if metrics is not None:
            metrics["train"][HELDOUT_METRIC].append(reward)
            metrics["train"][f"{HELDOUT_METRIC}_se"].append(error)
        return {
            "step": step,
            "k": c.eval_k,
            "avg_at_k": result["avg@k"],
            "pass_at_k": result["pass@k"],
            "n_prompts": result["num_prompts"],
            "mean_length": result["mean_length"],
            "heldout_reward": reward,
            "heldout_reward_se": error,
        }

    return on_step


def check_run_dir(run_dir: Path, aggregator: str, *, resume: bool) -> None:
    """Refuse, before anything is created, a run dir that cannot hold this run (ValueError/FileExistsError)."""
    for parent in (run_dir, *run_dir.parents):
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"--out: {parent} exists and is not a directory")
    if resume and (run_dir / CONFIG).exists():
        saved = read_json(run_dir / CONFIG) or {}
        if saved.get("run", {}).get("aggregator") not in (None, aggregator):
            raise ValueError(f"{run_dir} holds a {saved['run']['aggregator']!r} run, not {aggregator!r}")
    elif not resume and (run_dir / METRICS).exists():
        raise FileExistsError(
            f"{run_dir} already holds a run; pass --resume to continue it or choose another --out"
        )


def _attach_probes(c: RunConfig, trainer, callback: RunLogCallback) -> None:
    from lab.probes import make_probe_hook

    # the small models: one batched backward gives every row's gradient
    small = c.preset in SMALL_MODEL_PRESETS
    if c.probe_every:
        hook = make_probe_hook(
            c.probe_every, alpha=c.alpha, max_length=c.max_completion_length,
            max_rows=None if small else 16, batched=small,
        )  # fmt: skip
        trainer.generation_hooks.append(hook)
        callback.probe_hooks.append(hook)
    if c.compare_gradients_every:
        trainer.compare_aggregator_gradients(c.compare_gradients_every)


def train_run(config: RunConfig, run_dir: str | Path, *, resume: bool = False, quiet: bool = False) -> Path:
    """Train one run into ``run_dir``. Ctrl-C (or SIGTERM) saves a checkpoint and marks the run
    "interrupted"; ``resume=True`` continues from the last checkpoint, dropping log lines past it.

    Everything that can fail on bad input (settings, the run dir, the model, the data) is checked before the
    run dir is created; a run that fails before its first step removes the dir it created. ``quiet``
    replaces transformers' progress bar and log dicts by one short line every 10% of the steps (for runs
    that share a terminal with others).
    """
    from accelerate import PartialState

    from lab.trainer import DeltaLGRPOTrainer

    c = config.resolved()
    run_dir = Path(run_dir)
    check_run_dir(run_dir, c.aggregator, resume=resume)
    _set_threads(c)
    random.seed(c.seed)
    torch.manual_seed(c.seed)
    task = get_task(c.task)
    chat = resolve_preset(c.model).chat
    train_data = task.train_dataset(c.steps * c.prompts_per_step, seed=c.seed, chat=chat, **c.task_options)
    eval_data = (
        task.eval_dataset(c.eval_prompts, seed=c.seed, chat=chat, **c.task_options)
        if c.eval_prompts
        else None
    )
    model, tokenizer = load_model_and_tokenizer(c.model)
    args = _trl_args(c, run_dir)

    is_main = PartialState().is_main_process
    created = not run_dir.exists()
    writer = RunWriter(run_dir, enabled=is_main)  # one writer in a multi-process run
    try:
        writer.write_config(_config_record(c))
        callback = RunLogCallback(
            writer,
            max_length=c.max_completion_length,
            alpha=c.alpha,
            on_step=_evaluator(c, task, tokenizer, eval_data),
        )
        trainer = DeltaLGRPOTrainer(
            model=model,
            processing_class=tokenizer,
            reward_funcs=task.reward_funcs(shaped=c.shaped_reward),
            args=args,
            train_dataset=train_data,
            peft_config=lora_config(c.model, r=c.lora_r),
            callbacks=[callback],
        )
    except BaseException:
        if created and is_main:
            shutil.rmtree(run_dir, ignore_errors=True)  # a failed start leaves nothing behind
        raise
    trainer.log_completion_texts = c.log_texts
    callback.trainer = trainer
    _attach_probes(c, trainer, callback)
    if quiet:
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        trainer.remove_callback(ProgressCallback)
        trainer.remove_callback(PrinterCallback)
        callback.progress = (c.run_id, max(1, c.steps // 10))

    checkpoint = _last_checkpoint(run_dir) if resume else None
    start_step = int(checkpoint.name.rsplit("-", 1)[1]) if checkpoint is not None else 0
    writer.truncate_after(start_step)  # steps after the checkpoint are trained (and logged) again
    writer.set_status("running", start_step, c.steps)
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except KeyboardInterrupt:
        if trainer.is_world_process_zero():
            _save_interrupted(trainer, writer, c.steps)
        raise
    except Exception as err:
        if trainer.is_world_process_zero():
            writer.set_status(
                "failed", trainer.state.global_step, c.steps, error=f"{type(err).__name__}: {err}"
            )
        raise
    if trainer.is_world_process_zero():
        writer.set_status("finished", trainer.state.global_step, c.steps)
    return run_dir


def _save_interrupted(trainer: Any, writer: RunWriter, max_steps: int) -> None:
    """Mark an interrupted run, then checkpoint it for --resume (TRL's own format). The status comes first,
    so a save that fails (or a Ctrl-C before the first step, when there is no optimizer to save yet) still
    leaves the run marked "interrupted"; --resume then restarts from the last checkpoint on disk."""
    step = trainer.state.global_step
    writer.set_status("interrupted", step, max_steps)
    if step == 0:
        return
    try:
        trainer._save_checkpoint(trainer.model, trial=None)
    except Exception as err:  # the logged steps are on disk; resume re-trains from the last checkpoint
        writer.set_status(
            "interrupted", step, max_steps, error=f"checkpoint not saved: {type(err).__name__}: {err}"
        )


def _config_record(c: RunConfig) -> dict[str, Any]:
    return {
        "run": dataclasses.asdict(c),
        "run_id": c.run_id,
        "label": run_label(c.aggregator, c.alpha),
        "comparison": c.comparison,
        "aggregator": c.aggregator,
        "alpha": c.alpha,
        "seed": c.seed,
        "task": c.task,
        "model": c.model,
        "preset": c.preset,
        "optimizer": c.optimizer,
        "learning_rate": c.learning_rate,
        "equalize_step_size": c.equalize_step_size,
        "delta_l_scope": c.delta_l_scope,
        "max_steps": c.steps,
        "num_generations": c.num_generations,
        "max_completion_length": c.max_completion_length,
        "versions": _versions(),
        "created": time.time(),
    }


# ---------------------------------------------------------------------------------------------------
# a comparison: every aggregator x seed, one after another or in parallel worker processes
# ---------------------------------------------------------------------------------------------------
def comparison_plan(
    config: RunConfig, *, aggregators: list[str], seeds: list[int], out: str | Path, resume: bool = False
) -> list[tuple[RunConfig, Path]]:
    """The ``(config, run dir)`` of every run of a comparison, each fully checked (nothing is created).

    Same prompts, seeds and sampling settings for every aggregator: only ``aggregator`` differs between
    the runs of one seed. Raises ValueError/FileExistsError naming the first bad value.
    """
    out = Path(out)
    if not aggregators:
        raise ValueError("no aggregators to compare")
    if len(set(aggregators)) != len(aggregators):
        raise ValueError(f"aggregators repeat: {aggregators}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and at least one, got {seeds}")
    plan = []
    for seed in seeds:
        for agg in aggregators:
            c = dataclasses.replace(config, aggregator=agg, seed=seed, comparison=out.name).resolved()
            run_dir = out / c.run_id
            check_run_dir(run_dir, agg, resume=resume or _finished(run_dir))
            plan.append((c, run_dir))
    return plan


def _finished(run_dir: Path) -> bool:
    return (read_json(run_dir / STATUS) or {}).get("state") == "finished"


def run_comparison(
    config: RunConfig,
    *,
    aggregators: list[str],
    seeds: list[int],
    out: str | Path,
    resume: bool = False,
    workers: int = 1,
) -> list[Path]:
    """Train every aggregator × seed with otherwise identical settings into ``out/<run_id>/``, then write
    ``out/verdict.json`` (:func:`lab.verdict.compare_runs`) and print it.

    ``workers > 1`` runs that many runs at a time, each in its own process (one CPU thread each by
    default for the small model). Runs already marked "finished" are skipped, so a re-run with
    ``resume=True`` completes a comparison.
    """
    out = Path(out)
    plan = comparison_plan(config, aggregators=aggregators, seeds=seeds, out=out, resume=resume)
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    todo = []
    for i, (c, run_dir) in enumerate(plan, start=1):
        if _finished(run_dir):
            print(f"[{i}/{len(plan)}] {c.run_id}: already finished, skipped", flush=True)
        else:
            todo.append((i, c, run_dir))
    started = time.perf_counter()
    if todo:
        model_path(todo[0][1].model)  # build/convert a lab-made model once, here, not in every worker
    if workers == 1 or len(todo) <= 1:
        for i, c, run_dir in todo:
            print(f"[{i}/{len(plan)}] {c.run_id} → {run_dir}", flush=True)
            train_run(c, run_dir, resume=resume)
    else:
        _run_parallel(todo, len(plan), workers=workers, resume=resume)
    run_dirs = [run_dir for _, run_dir in plan]
    if len(aggregators) > 1:
        from lab.verdict import compare_runs, format_verdict

        verdict = compare_runs(run_dirs)
        verdict["wall_seconds"] = time.perf_counter() - started
        verdict["workers"] = workers
        write_verdict(out, verdict)
        print(format_verdict(verdict), flush=True)
    return run_dirs


def _run_parallel(todo: list[tuple[int, RunConfig, Path]], total: int, *, workers: int, resume: bool) -> None:
    """Run ``todo`` in ``workers`` processes (spawned: a clean interpreter, imports paid once per worker).

    Ctrl-C/SIGTERM reaches every worker (same process group): each saves a checkpoint and marks its run
    interrupted, then the pool shuts down and KeyboardInterrupt is raised here. A failed run fails the
    comparison after the others finish (its status.json says why).
    """
    import concurrent.futures as futures
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    stop = context.Event()  # set on Ctrl-C: a worker starts no queued run after it
    failures: list[str] = []
    interrupted = False
    with futures.ProcessPoolExecutor(
        max_workers=workers, mp_context=context, initializer=_worker_init, initargs=(stop,)
    ) as pool:
        jobs = {}
        for i, c, run_dir in todo:
            print(f"[{i}/{total}] {c.run_id} → {run_dir}  (queued on {workers} workers)", flush=True)
            jobs[pool.submit(_worker_run, c, str(run_dir), resume)] = c.run_id
        try:
            for job in futures.as_completed(jobs):
                result = job.result()
                print(f"  {jobs[job]}: {result}", flush=True)
                if result not in ("finished",):
                    interrupted |= result == "interrupted"
                    failures.append(f"{jobs[job]}: {result}")
        except KeyboardInterrupt:
            interrupted = True
            stop.set()
            for job in jobs:
                job.cancel()
            pool.shutdown(wait=True, cancel_futures=True)  # workers finish saving their checkpoints
    if interrupted:
        raise KeyboardInterrupt
    if failures:
        raise RuntimeError("runs failed (see their status.json): " + "; ".join(failures))


_stop_event: Any = None  # in a worker: the comparison's Ctrl-C event (_run_parallel)


def _worker_init(stop: Any = None) -> None:
    import signal
    import warnings

    global _stop_event
    if stop is not None:
        _stop_event = stop

    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renames, once per run otherwise
    hf_logging.disable_progress_bar()  # "Writing model shards" bars of every checkpoint, interleaved

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # an idle worker ignores Ctrl-C/SIGTERM; a running one
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # saves its run (see _worker_run)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _worker_run(config: RunConfig, run_dir: str, resume: bool) -> str:
    """One run in a worker process; returns "finished", "interrupted" or "failed: <error>" (never raises,
    so one failure or Ctrl-C does not break the pool)."""
    import signal

    if _stop_event is not None and _stop_event.is_set():
        return "not started (interrupted)"  # queued before Ctrl-C: the pool cannot take it back
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)
    try:
        train_run(config, run_dir, resume=resume, quiet=True)
        return "finished"
    except KeyboardInterrupt:
        if _stop_event is not None:
            _stop_event.set()  # before the parent may have: this worker takes no next run
        return "interrupted"
    except Exception as err:  # reported by the parent; status.json holds the run's own record
        return f"failed: {type(err).__name__}: {err}"
    finally:
        _worker_init()


def raise_keyboard_interrupt(signum, frame) -> None:
    """A signal handler that turns SIGTERM into Ctrl-C: the run saves, is marked interrupted, and stops."""
    raise KeyboardInterrupt


def write_verdict(out: Path, verdict: dict[str, Any]) -> None:
    from lab.runlog import VERDICT, write_json_atomic

    write_json_atomic(out / VERDICT, verdict)


def _versions() -> dict[str, str]:
    import peft
    import transformers
    import trl

    import lab

    return {
        "lab": lab.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "peft": peft.__version__,
    }
