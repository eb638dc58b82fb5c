"""One training run, and a fair comparison of aggregators: model + task + DeltaLGRPOTrainer + run log.

``train_run`` builds everything from a :class:`RunConfig` and writes ``<run_dir>/`` in the
:mod:`lab.runlog` schema; ``run_comparison`` repeats it for every aggregator and seed with the same
prompts, seeds and sampling settings (a fair A/B), one run after another or in worker processes.

Its parts live along their seams: the presets and the run config in :mod:`lab.run_config`, the device
policy in :mod:`lab.devices`, the run-log callback in :mod:`lab.runlog_callback`; their names stay
importable from here.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

from lab import rundir
from lab.aggregators import get as get_aggregator
from lab.aggregators import split_label
from lab.auto_alpha import is_auto
from lab.devices import (  # noqa: F401 (re-exported: lab.runner's names before the split)
    GENERATION_CHOICES,
    GENERATION_PATHS,
    GPU_ONLY_GENERATION,
    SMALL_MODEL_PRESETS,
    check_generation,
    check_vllm,
    device_settings,
    set_threads,
)
from lab.models import load_model_and_tokenizer, lora_config, model_path, resolve_preset
from lab.run_config import (  # noqa: F401 (re-exported)
    AUTO_ALPHA_PROBE_EVERY,
    GENERAL,
    OPTIMIZERS,
    RUN_PRESETS,
    RunConfig,
    infer_preset,
    run_defaults,
)
from lab.runlog import CONFIG, HELDOUT_METRIC, METRICS, STATUS, RunWriter, read_json, run_label
from lab.runlog_callback import RunLogCallback
from lab.tasks import get_task

CHECKPOINTS = "checkpoints"


def _trl_args(c: RunConfig, run_dir: Path):
    from lab.speed import SpeedConfig

    on_gpu = torch.cuda.is_available()
    accumulation = c.prompts_per_step * c.num_generations // c.micro_batch_size
    aggregator = get_aggregator(c.aggregator)
    return SpeedConfig(
        output_dir=str(run_dir / CHECKPOINTS),
        loss_type=aggregator.loss_type,  # TRL's own (grpo, dapo, cispo, ...) or the lab's delta_l
        **aggregator.trl_settings,  # e.g. GSPO: importance_sampling_level="sequence"
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

    small = (
        c.preset in SMALL_MODEL_PRESETS
    )  # the small models: one batched backward gives every row's gradient
    if c.probe_every:
        hook = make_probe_hook(
            c.probe_every, alpha=None if is_auto(c.alpha) else c.alpha, max_length=c.max_completion_length,
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
    c = config.resolved()
    run_dir = Path(run_dir)
    # reliability: busy dir, changed settings and the checkpoint are settled before anything is written
    rundir.check_before_writing(run_dir, dataclasses.asdict(c), resume=resume)
    check_run_dir(run_dir, c.aggregator, resume=resume)
    start = rundir.choose_checkpoint(run_dir) if resume else rundir.ResumePoint(None, [])
    for problem in start.skipped:
        print(f"{run_dir}: checkpoint skipped, broken file: {problem}", file=sys.stderr, flush=True)
    is_main = rundir.is_main_rank()  # the trainer's PartialState is not set up yet (its args do that)
    created = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
    lock = None
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = rundir.acquire_lock(run_dir)  # held for the run's lifetime; the OS drops it if we die
    try:
        return _train_locked(c, run_dir, start, created, is_main=is_main, resume=resume, quiet=quiet)
    finally:
        if lock is not None:
            lock.release()


def _train_locked(
    c: RunConfig, run_dir: Path, start: rundir.ResumePoint, created: list[Path], *, is_main: bool, resume: bool,
    quiet: bool,
) -> Path:  # fmt: skip
    """train_run's body, in a run dir this process holds the lock of."""
    from lab.speed import SpeedTrainer, cpu_patches

    writer = RunWriter(run_dir, enabled=is_main)  # one writer in a multi-process run
    try:
        set_threads(c)
        random.seed(c.seed)
        torch.manual_seed(c.seed)
        task = get_task(c.task)
        chat = resolve_preset(c.model).chat
        train_data = task.train_dataset(
            c.steps * c.prompts_per_step, seed=c.seed, chat=chat, **c.task_options
        )
        eval_data = (
            task.eval_dataset(c.eval_prompts, seed=c.seed, chat=chat, **c.task_options)
            if c.eval_prompts
            else None
        )
        model, tokenizer = load_model_and_tokenizer(c.model)
        args = _trl_args(c, run_dir)
        if not (resume and (run_dir / CONFIG).exists()):  # reliability: a resumed run keeps its config.json
            writer.write_config(_config_record(c))
        callback = RunLogCallback(
            writer,
            max_length=c.max_completion_length,
            alpha=c.alpha,
            on_step=_evaluator(c, task, tokenizer, eval_data),
        )
        trainer = SpeedTrainer(
            model=model,
            processing_class=tokenizer,
            reward_funcs=task.reward_funcs(shaped=c.shaped_reward),
            args=args,
            train_dataset=train_data,
            peft_config=lora_config(c.model, r=c.lora_r),
            callbacks=[callback],
        )
    except BaseException:
        if is_main:
            rundir.remove_created(created)  # a failed start leaves nothing behind
        raise
    trainer.log_completion_texts = c.log_texts
    callback.trainer = trainer
    _attach_probes(c, trainer, callback)
    if quiet:
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        trainer.remove_callback(ProgressCallback)
        trainer.remove_callback(PrinterCallback)
        callback.progress = (c.run_id, max(1, c.steps // 10))

    checkpoint = start.checkpoint
    writer.truncate_after(start.step)  # steps after the checkpoint are trained (and logged) again
    writer.set_status("running", start.step, c.steps)
    try:
        # CPU only: TRL's LM head and transformers' SDPA take their CPU-friendly paths (lab.speed), undone after.
        with cpu_patches(enabled=not torch.cuda.is_available()):
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except KeyboardInterrupt:
        if trainer.is_world_process_zero():
            _save_interrupted(trainer, writer, c.steps)
        raise
    except Exception as err:
        if trainer.is_world_process_zero():
            rundir.record_failure(writer, err, trainer.state.global_step, c.steps, created)  # reliability
        if isinstance(err, OSError):  # a full disk, a read-only file system: one line, not a traceback
            raise rundir.RunFailed(f"{run_dir}: {rundir.describe_os_error(err)}") from err
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
    rundir.check_out(out)  # reliability: empty or read-only --out
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
            name, alpha = split_label(agg)  # "delta_l-aauto" / "delta_l-a0.75": ΔL with its own α
            alpha = config.alpha if alpha is None else alpha
            c = dataclasses.replace(
                config, aggregator=name, alpha=alpha, seed=seed, comparison=out.name
            ).resolved()
            if any(p[0].run_id == c.run_id for p in plan):
                raise ValueError(f"aggregators {aggregators} give the run {c.run_id} twice")
            run_dir = out / c.run_id
            rundir.check_before_writing(run_dir, dataclasses.asdict(c), resume=resume or _finished(run_dir))
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
    failures: list[str] = []
    if workers == 1 or len(todo) <= 1:
        for i, c, run_dir in todo:
            print(f"[{i}/{len(plan)}] {c.run_id} → {run_dir}", flush=True)
            train_run(c, run_dir, resume=resume)
    else:
        failures = _run_parallel(todo, len(plan), workers=workers, resume=resume)
    run_dirs = [run_dir for _, run_dir in plan]
    if len(aggregators) > 1:
        from lab.verdict import compare_runs, format_verdict

        verdict = compare_runs([d for d in run_dirs if _finished(d)] if failures else run_dirs)  # reliability
        verdict["wall_seconds"] = time.perf_counter() - started
        verdict["workers"] = workers
        write_verdict(out, verdict)
        print(format_verdict(verdict), flush=True)
    if failures:  # reliability: the verdict of what finished is written first
        raise rundir.RunsFailed(failures)
    return run_dirs


def _run_parallel(
    todo: list[tuple[int, RunConfig, Path]], total: int, *, workers: int, resume: bool
) -> list[str]:
    """Run ``todo`` in ``workers`` processes (spawned: a clean interpreter, imports paid once per worker,
    :mod:`lab.workers`); returns one line per run that did not finish.

    Ctrl-C/SIGTERM reaches every worker (same process group): each saves a checkpoint and marks its run
    interrupted, no queued run starts, and KeyboardInterrupt is raised here. A failed run (its status.json
    says why) or a worker killed under its run (the run is marked failed here) fails the comparison after
    the others finish.
    """
    from lab.workers import Job, run_jobs

    jobs = []
    for i, c, run_dir in todo:
        print(f"[{i}/{total}] {c.run_id} → {run_dir}  (queued on {workers} workers)", flush=True)
        jobs.append(Job(c.run_id, (c, str(run_dir), resume)))
    dirs = {c.run_id: run_dir for _, c, run_dir in todo}

    def on_result(job: Job, result: str) -> None:
        print(f"  {job.name}: {result}", flush=True)

    def on_killed(job: Job, reason: str) -> None:
        rundir.mark_killed(dirs[job.name], reason)
        print(f"  {job.name}: {reason}; the other runs go on", flush=True)

    outcome = run_jobs(jobs, workers=workers, target=_worker_run, init=_worker_init, on_result=on_result,
                       on_killed=on_killed)  # fmt: skip
    results = outcome.results
    if any(r == "interrupted" for r in results.values()):
        raise KeyboardInterrupt
    return [f"{name}: {r}" for name, r in results.items() if r != "finished"]


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
