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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from lab.aggregation import METHODS, check_alpha, counterfactual_cv
from lab.models import EMBEDDED_MODEL, load_model_and_tokenizer, lora_config, resolve_preset
from lab.runlog import CONFIG, RunWriter, read_json, run_id, run_label
from lab.tasks import DEMO, TASKS, get_task

CHECKPOINTS = "checkpoints"


@dataclass
class RunConfig:
    """Everything one run needs; saved as ``config.json`` so a run can be reproduced or resumed.

    ``None`` means "the default for this model": the measured CPU demo settings (``lab.tasks.DEMO``) for
    the embedded model, and the paper-like settings for the others (see :meth:`resolved`).
    """

    aggregator: str = "delta_l"
    alpha: float = 1.0
    delta_l_scope: str = "batch"
    task: str = DEMO["task"]
    model: str = EMBEDDED_MODEL
    steps: int | None = None  # CPU demo: DEMO['steps']; otherwise 200
    seed: int = 0
    prompts_per_step: int | None = None  # CPU demo: DEMO['prompts_per_step']; otherwise 16
    micro_batch_size: int | None = None  # rows per forward/backward; None: min(8, rows per step)
    num_generations: int | None = None
    max_completion_length: int | None = None
    temperature: float | None = None
    learning_rate: float = 2e-5
    lora_r: int | None = None
    shaped_reward: bool | None = None
    task_options: dict[str, Any] | None = None
    eval_every: int = 0  # 0: evaluate only after the last step (if eval_prompts > 0)
    eval_prompts: int = 0
    eval_k: int = 4
    probe_every: int = 0
    save_every: int = 5
    threads: int | None = None
    log_texts: bool = False
    report_to: list[str] = field(default_factory=list)
    comparison: str | None = None
    vllm: bool = False  # generate with vLLM colocated in the training process (TRL's use_vllm), GPU only
    vllm_gpu_memory_utilization: float = 0.3  # the GPU memory fraction vLLM reserves (TRL's default)

    def resolved(self) -> RunConfig:
        """A copy with every ``None`` filled in and every value checked (ValueError names the bad one)."""
        c = dataclasses.replace(self)
        if c.aggregator not in METHODS:
            raise ValueError(f"unknown aggregator {c.aggregator!r}; expected one of {', '.join(METHODS)}")
        c.alpha = check_alpha(c.alpha)
        if c.task not in TASKS:
            raise ValueError(f"unknown task {c.task!r}; expected one of {', '.join(TASKS)}")
        resolve_preset(c.model)
        demo = c.model in (EMBEDDED_MODEL, "tiny") and c.task == DEMO["task"]
        if c.steps is None:
            c.steps = DEMO["steps"] if demo else 200
        if c.prompts_per_step is None:
            c.prompts_per_step = DEMO["prompts_per_step"] if demo else 16
        if c.num_generations is None:
            c.num_generations = DEMO["num_generations"] if demo else 8
        if c.max_completion_length is None:
            c.max_completion_length = DEMO["max_completion_length"] if demo else 1024
        if c.temperature is None:
            c.temperature = DEMO["temperature"] if demo else 1.0
        if c.shaped_reward is None:
            c.shaped_reward = DEMO["shaped"] if demo else False
        if c.task_options is None:
            c.task_options = dict(DEMO["task_options"]) if demo else {}
        rows = c.prompts_per_step * c.num_generations if isinstance(c.num_generations, int) else 0
        if c.micro_batch_size is None:
            c.micro_batch_size = math.gcd(rows, 8) or 1
        positive = (
            "steps",
            "prompts_per_step",
            "num_generations",
            "max_completion_length",
            "eval_k",
            "save_every",
        )
        for name in (*positive, "micro_batch_size"):
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
        for name in ("eval_every", "eval_prompts", "probe_every"):
            value = getattr(c, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if c.vllm:
            check_vllm(c.vllm_gpu_memory_utilization)
        if not (c.temperature > 0 and c.learning_rate > 0):
            raise ValueError(
                f"temperature and learning_rate must be > 0, got {c.temperature!r}, {c.learning_rate!r}"
            )
        return c

    @property
    def run_id(self) -> str:
        return run_id(self.aggregator, self.seed, self.alpha)


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


def device_settings(c: RunConfig, on_gpu: bool) -> dict[str, Any]:
    """TRL/transformers switches that trade memory against time, per device (measured choices).

    GPU: bf16 and activation checkpointing (TRL's defaults). CPU (measured on the demo, 2 cores:
    benchmarks/cpu_step_profile.py, benchmarks/prompt_sharing.py): fp32 (bf16 was not faster), no
    checkpointing, each distinct prompt prefilled once in generation and forwarded once per micro-batch in
    the loss, micro-batches cut by prompt (all exact; lab.trainer) -- the demo's prompts are ~6x longer than
    its completions and each is repeated num_generations times -- and a static KV cache for sampling
    (transformers' own; the growing cache is re-copied at every token). vLLM: colocated.
    """
    settings: dict[str, Any] = {
        "bf16": on_gpu and torch.cuda.is_bf16_supported(),
        "activation_checkpointing": on_gpu,
        "prefill_prompts_once": not on_gpu,
        "forward_prompts_once": not on_gpu,
    }
    if not on_gpu:
        settings["cache_implementation"] = "static"
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
        learning_rate=c.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        beta=0.0,  # no KL, as in the paper's aggregator comparison
        epsilon=0.2,
        epsilon_high=0.3,  # the paper's clip 0.2 / 0.3
        max_grad_norm=1.0,
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


def _evaluator(c: RunConfig, task, tokenizer, eval_data):
    """on_step callable for RunLogCallback: Avg@k / Pass@k every eval_every steps and after the last."""
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
        )
        model.train(was_training)
        return {
            "step": step,
            "k": c.eval_k,
            "avg_at_k": result["avg@k"],
            "pass_at_k": result["pass@k"],
            "n_prompts": result["num_prompts"],
            "mean_length": result["mean_length"],
        }

    return on_step


def train_run(config: RunConfig, run_dir: str | Path, *, resume: bool = False) -> Path:
    """Train one run into ``run_dir``. Ctrl-C saves a checkpoint and marks the run "interrupted";
    ``resume=True`` continues from the last checkpoint, dropping log lines past it (none duplicated)."""
    from lab.trainer import DeltaLGRPOTrainer

    c = config.resolved()
    run_dir = Path(run_dir)
    from accelerate import PartialState

    writer = RunWriter(run_dir, enabled=PartialState().is_main_process)  # one writer in a multi-process run
    checkpoint = _last_checkpoint(run_dir) if resume else None
    if resume and (run_dir / CONFIG).exists():
        saved = read_json(run_dir / CONFIG) or {}
        if saved.get("run", {}).get("aggregator") not in (None, c.aggregator):
            raise ValueError(f"{run_dir} holds a {saved['run']['aggregator']!r} run, not {c.aggregator!r}")
    elif (run_dir / "metrics.jsonl").exists():
        raise FileExistsError(
            f"{run_dir} already holds a run; pass --resume to continue it or choose another --out"
        )
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

    writer.write_config(
        {
            "run": dataclasses.asdict(c),
            "run_id": c.run_id,
            "label": run_label(c.aggregator, c.alpha),
            "comparison": c.comparison,
            "aggregator": c.aggregator,
            "alpha": c.alpha,
            "seed": c.seed,
            "task": c.task,
            "model": c.model,
            "max_steps": c.steps,
            "num_generations": c.num_generations,
            "max_completion_length": c.max_completion_length,
            "versions": _versions(),
            "created": time.time(),
        }
    )
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
    trainer.log_completion_texts = c.log_texts
    callback.trainer = trainer
    if c.probe_every:
        from lab.probes import make_probe_hook

        hook = make_probe_hook(c.probe_every, alpha=c.alpha, max_length=c.max_completion_length, max_rows=16)
        trainer.generation_hooks.append(hook)
        callback.probe_hooks.append(hook)

    start_step = int(checkpoint.name.rsplit("-", 1)[1]) if checkpoint is not None else 0
    writer.truncate_after(start_step)  # steps after the checkpoint are trained (and logged) again
    writer.set_status("running", start_step, c.steps)
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except KeyboardInterrupt:
        step = trainer.state.global_step
        if trainer.is_world_process_zero():
            trainer._save_checkpoint(trainer.model, trial=None)  # TRL's own checkpoint format, for --resume
            writer.set_status("interrupted", step, c.steps)
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


def run_comparison(
    config: RunConfig, *, aggregators: list[str], seeds: list[int], out: str | Path, resume: bool = False
) -> list[Path]:
    """Train every aggregator × seed with otherwise identical settings into ``out/<run_id>/``.

    Runs already marked "finished" are skipped, so a re-run with ``resume=True`` completes a comparison.
    """
    out = Path(out)
    for agg in aggregators:
        dataclasses.replace(config, aggregator=agg).resolved()  # fail before hours of training, not after
    runs = []
    total = len(aggregators) * len(seeds)
    for i, (seed, agg) in enumerate(((s, a) for s in seeds for a in aggregators), start=1):
        c = dataclasses.replace(config, aggregator=agg, seed=seed, comparison=out.name)
        run_dir = out / c.run_id
        status = read_json(run_dir / "status.json") or {}
        if status.get("state") == "finished":
            print(f"[{i}/{total}] {c.run_id}: already finished, skipped", flush=True)
        else:
            print(f"[{i}/{total}] {c.run_id} → {run_dir}", flush=True)
            train_run(c, run_dir, resume=resume)
        runs.append(run_dir)
    return runs


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
