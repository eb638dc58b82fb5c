"""Generated tokens/s of TRL's generation paths, side by side, through the lab's real trainer.

What it measures
    One GRPO generation batch (``--prompts`` prompts x ``--num-generations`` completions of up to
    ``--max-completion-length`` tokens) sampled by ``lab.speed.SpeedTrainer._generate_single_turn``
    -- TRL's own generation call with TRL's own sampling settings (temperature 1.0, top_k 0, top_p 1.0) --
    on a Qwen2.5-shaped model with random weights (``lab.models.qwen25_shaped_config``: the real
    architecture and cost, no download) with the lab's LoRA preset, as ``lab train`` runs it on a GPU (bf16,
    activation checkpointing switched off by TRL while it generates, the model in train mode).

    Arms (``--arms``; each is one trainer built from the same config plus the arm's TRL/lab fields):
      generate             TRL's default: ``transformers.generate``, dynamic KV cache
      continuous-batching  ``use_transformers_continuous_batching=True`` (``transformers_continuous_batching_config``
                           from ``--cb-config``; TRL's default leaves 50% of free GPU memory to its KV cache)
      static-cache         ``cache_implementation="static"``
      static-compile       static cache + transformers' auto-compile of the decode step (``torch.compile``,
                           CUDA only). TRL builds its GenerationConfig with ``disable_compile=True`` and a
                           ``generation_kwargs`` entry cannot override it (duplicate keyword), so the lab sets
                           it back (``SpeedConfig.compile_generation``)
      prefill-once         the lab's ``prefill_prompts_once``: each prompt prefilled once, its KV cache shared
                           by its num_generations completions
    Each arm is exactly ``lab train --generation <arm>`` on a GPU (``lab.runner.GENERATION_PATHS``).

    Order: pass 1 builds, warms up (a few tokens; the compiled arm at the full shape, so compilation is
    not timed but reported as ``warmup_s``) and times each arm in turn; later passes time them again,
    alternately reversed (A B C D, D C B A, ...). Each pass uses fresh random prompts (the same for every
    arm) of 3/4 P to P tokens, left-padded to P as TRL pads them. TRL's continuous-batching path casts the
    model to bf16, LoRA adapters included; lab.trainer gives it back, so the arms share one model unchanged
    (``dtypes_kept``). Reported per arm: generated tokens (counted: a completion ends at EOS, which random
    weights rarely sample), median tokens/s over passes and its ratio to ``generate``, peak memory (CUDA:
    ``torch.cuda.max_memory_allocated`` during the call and its excess over what was allocated before; CPU:
    the process's peak RSS, monotonic), whether the decode step ran compiled; and the device, the load. An
    arm that fails records its error and the others go on. ``--budget-s`` bounds the arms' time; the JSON
    is rewritten after every rep, so a run stopped by a timeout keeps what it measured.

How to run
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gpu_generation.py --quick        # CPU smoke (< 2 min)
    python benchmarks/gpu_generation.py --size 0.5b --json gen05.json              # GPU, 16 x 8 x 512 tokens
    python benchmarks/gpu_generation.py --size 1.5b --max-completion-length 256 --budget-s 90   # as gpu_checks
    python benchmarks/gpu_generation.py --size 1.5b --arms generate,static-compile --passes 4

No model hub and no packages beyond the lab's: the model is built from its config and the trainer gets a
small in-memory tokenizer (benchmarks/qwen_throughput.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # qwen_throughput's helpers
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import torch
from qwen_throughput import _versions, dtype_for, offline_tokenizer, peak_memory_gib, reset_peak, sync

from lab.runner import GENERATION_PATHS

ARMS: dict[str, dict[str, Any]] = GENERATION_PATHS  # the arms are `lab train --generation` choices
# most likely to matter first: a run cut short by a timeout loses the last ones
DEFAULT_ARMS = ("generate", "continuous-batching", "static-compile", "static-cache", "prefill-once")
BASELINE = "generate"
COMPILED_ARMS = ("static-compile",)  # warmed up at the full shape: compilation is specialised to it
GPU_DEFAULTS = dict(prompts=16, num_generations=8, max_completion_length=512, prompt_len=128, passes=2)
CPU_DEFAULTS = dict(prompts=2, num_generations=4, max_completion_length=32, prompt_len=32, passes=2)
QUICK_DEFAULTS = dict(prompts=2, num_generations=4, max_completion_length=16, prompt_len=16, passes=2)
TINY_SHAPE = dict(  # --quick: Qwen2.5's structure (GQA, tied embeddings, bias on q/k/v) at toy size
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=2048,
    tie_word_embeddings=True,
)
WARMUP_TOKENS = 4
EOS, PAD = 1, 0  # the in-memory tokenizer's ids


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="0.5b", choices=["tiny", "0.5b", "1.5b", "3b", "7b"], help="model shape")
    p.add_argument("--quick", action="store_true", help="tiny shape, few tokens (CPU smoke run, < 2 min)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cpu")
    p.add_argument("--arms", default=",".join(DEFAULT_ARMS), help=f"comma list of {', '.join(ARMS)}")
    p.add_argument("--prompts", type=int, default=None, help="distinct prompts per generation batch")
    p.add_argument("--num-generations", type=int, default=None, help="completions per prompt (G)")
    p.add_argument("--max-completion-length", type=int, default=None, help="M, tokens per completion")
    p.add_argument("--prompt-len", type=int, default=None, help="P: prompts have 3/4 P to P tokens")
    p.add_argument("--passes", type=int, default=None, help="timed passes over the arms (alternating order)")
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="seconds for the arms (builds and warmups included): an arm's first rep starts only while some "
        "are left, a later one only if the arm's last rep fits in what is left (default: no bound)",
    )
    p.add_argument("--cb-config", type=json.loads, default=None, help="JSON for ContinuousBatchingConfig")
    p.add_argument(
        "--lora", action=argparse.BooleanOptionalAction, default=True, help="the lab's LoRA preset"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: min(2, cores))")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the results here (after every rep)")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.quick:
        args.size = "tiny"
    defaults = QUICK_DEFAULTS if args.quick else GPU_DEFAULTS if args.device == "cuda" else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.prompt_len < 2:
        p.error(f"--prompt-len must be >= 2, got {args.prompt_len}")
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown or not args.arms:
        p.error(f"unknown arm(s) {unknown or args.arms!r}; expected a comma list of {', '.join(ARMS)}")
    if BASELINE in args.arms:  # the baseline first, so every ratio has a denominator early
        args.arms.remove(BASELINE)
        args.arms.insert(0, BASELINE)
    return args


# ---------------------------------------------------------------------------------------------------
def build_model(size: str, device: str, dtype: torch.dtype, lora: bool):
    """A Qwen2.5-shaped causal LM with random weights on ``device``, with the lab's LoRA preset."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from lab.models import lora_config, qwen25_shaped_config

    config = Qwen2Config(**TINY_SHAPE) if size == "tiny" else qwen25_shaped_config(size)
    config.pad_token_id, config.bos_token_id, config.eos_token_id = PAD, EOS, EOS
    with torch.device(device):
        model = Qwen2ForCausalLM._from_config(config, dtype=dtype)
    if lora:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config("qwen2.5-0.5b" if size == "tiny" else f"qwen2.5-{size}"))
    return model


def prompt_batch(args: argparse.Namespace, vocab: int, seed: int) -> list[list[int]]:
    """TRL's layout: each of ``prompts`` random prompts repeated ``num_generations`` times in a row; lengths
    3/4 P..P with one at P, so the padded width (and a static cache's shape) is the same every pass."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(
        max(1, 3 * args.prompt_len // 4), args.prompt_len + 1, (args.prompts,), generator=gen
    )
    lengths[0] = args.prompt_len
    prompts = [torch.randint(3, vocab, (int(n),), generator=gen).tolist() for n in lengths]
    return [p for p in prompts for _ in range(args.num_generations)]


def build_trainer(model, tokenizer, args: argparse.Namespace, arm: str, workdir: Path):
    from datasets import Dataset

    from lab.speed import SpeedConfig, SpeedTrainer

    on_cuda = args.device == "cuda"
    overrides = dict(ARMS[arm])
    if "use_transformers_continuous_batching" in overrides:
        cb = args.cb_config if args.cb_config is not None else None if on_cuda else cpu_cb_config(args)
        if cb is not None:
            overrides["transformers_continuous_batching_config"] = cb
    config = SpeedConfig(
        output_dir=str(workdir / arm),
        per_device_train_batch_size=args.num_generations,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        beta=0.0,
        report_to=[],
        use_cpu=not on_cuda,
        bf16=model.dtype == torch.bfloat16,
        activation_checkpointing=on_cuda,  # as lab.runner.device_settings: TRL switches it off to generate
        save_strategy="no",
        seed=args.seed,
        **overrides,
    )
    trainer = SpeedTrainer(
        model=model,
        processing_class=tokenizer,
        reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        args=config,
        train_dataset=Dataset.from_dict({"prompt": ["x"] * args.num_generations}),
    )
    trainer.model.train()  # generation happens inside training
    return trainer


def cpu_cb_config(args: argparse.Namespace) -> dict[str, int]:
    """A KV cache for exactly this batch: on CPU transformers would otherwise size it at half the RAM."""
    page = 32
    blocks = args.prompts * args.num_generations * -(-(args.prompt_len + args.max_completion_length) // page)
    return {"page_size": page, "num_blocks": blocks + 4, "max_batch_tokens": max(256, args.prompt_len * 4)}


def sampling_settings(trainer) -> dict[str, Any]:
    """The generation settings TRL uses for this arm (identical across arms except the cache/compile ones)."""
    g = trainer.generation_config
    keys = ("do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "max_new_tokens")
    settings = {k: getattr(g, k, None) for k in keys}
    settings.update(cache_implementation=g.cache_implementation, disable_compile=g.disable_compile)
    settings["continuous_batching"] = bool(trainer.use_transformers_continuous_batching)
    settings["prefill_prompts_once"] = bool(trainer.args.prefill_prompts_once)
    return settings


def generate_once(trainer, prompt_ids: list[list[int]], num_generations: int, device: str) -> dict[str, Any]:
    """One generation batch through TRL's ``_generate_single_turn``: wall time, tokens, memory."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    reset_peak(device)
    before = torch.cuda.memory_allocated() / 2**30 if device == "cuda" else 0.0
    t0 = time.perf_counter()
    completions, _ = trainer._generate_single_turn(prompt_ids, None, {}, num_generations)
    sync(device)
    wall = time.perf_counter() - t0
    peak = peak_memory_gib(device)
    lengths = [len(c) for c in completions]
    return {
        "wall_s": wall,
        "tokens": sum(lengths),
        "rows": len(lengths),
        "rows_at_max_length": sum(n >= trainer.max_completion_length for n in lengths),
        "peak_mem_gib": peak,
        "extra_mem_gib": peak - before if device == "cuda" else None,
    }


def is_compiled(trainer) -> bool:
    """Whether this arm's decode steps ran compiled: compilation allowed, and transformers made the compiled
    call (``get_compiled_call`` keeps it on the base model, shared by all arms, hence the first test)."""
    model = trainer.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return not trainer.generation_config.disable_compile and hasattr(base, "_compiled_call")


def tensors(model):
    """Parameters and buffers (RoPE's inv_freq is one), as ``Module.to(dtype)`` casts both."""
    yield from model.named_parameters()
    yield from (("buffer:" + name, buf) for name, buf in model.named_buffers())


def error_text(err: BaseException) -> str:
    frames = traceback.extract_tb(err.__traceback__)[-3:]
    where = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames))
    return f"{type(err).__name__}: {err}"[:1000] + (f" (at {where})" if where else "")


# ---------------------------------------------------------------------------------------------------
def run_arms(model, tokenizer, args: argparse.Namespace, result: dict[str, Any], workdir: Path) -> None:
    """Pass 1 builds, warms up and times each arm in turn (so a run cut short by a timeout keeps a rep of
    every arm it reached); later passes time them again in alternating order."""
    arms: dict[str, dict[str, Any]] = result["arms"]
    trainers: dict[str, Any] = {}
    vocab = model.config.vocab_size
    dtypes = {name: tensor.dtype for name, tensor in tensors(model)}
    result["param_dtypes"] = sorted({str(d).removeprefix("torch.") for d in dtypes.values()})
    started = time.perf_counter()
    for rep in range(args.passes):
        order = list(args.arms) if rep % 2 == 0 else list(reversed(args.arms))
        prompts = prompt_batch(args, vocab, args.seed + rep)
        for arm in order:
            if rep == 0:
                arms[arm] = {"overrides": ARMS[arm], "reps": [], "error": None}
                if args.budget_s is not None and time.perf_counter() - started > args.budget_s:
                    arms[arm]["error"] = f"not run: the {args.budget_s:g} s budget was spent before its turn"
                    continue
                trainers[arm] = warm_up(model, tokenizer, args, arm, arms[arm], workdir)
                _write(args, result)
            if trainers.get(arm) is None:
                continue
            last = arms[arm]["reps"][-1]["wall_s"] if arms[arm]["reps"] else 0.0
            if rep and args.budget_s is not None and time.perf_counter() - started + last > args.budget_s:
                arms[arm]["skipped_reps"] = arms[arm].get("skipped_reps", 0) + 1
                continue
            _progress(f"pass {rep + 1}/{args.passes}: {arm}")
            try:
                measured = generate_once(trainers[arm], prompts, args.num_generations, args.device)
                arms[arm]["reps"].append({"pass": rep, **measured})
                arms[arm]["compiled"] = is_compiled(trainers[arm])
                # the arms share the model: none may leave it changed (lab.trainer undoes TRL's bf16 cast)
                arms[arm]["dtypes_kept"] = all(t.dtype == dtypes[n] for n, t in tensors(model))
            except Exception as err:  # an unsupported path is a finding, not a crash
                arms[arm]["error"] = error_text(err)
                _progress(f"{arm}: FAILED {arms[arm]['error']}")
                trainers[arm] = None
            summarize(result)
            _write(args, result)
    result["arms_s"] = round(time.perf_counter() - started, 1)


def warm_up(model, tokenizer, args: argparse.Namespace, arm: str, record: dict[str, Any], workdir: Path):
    """The arm's trainer after one untimed generation (``WARMUP_TOKENS`` tokens; compiled arms at the full
    shape, as compilation is specialised to it), or None with ``record["error"]`` set."""
    _progress(f"{arm}: build + warmup")
    try:
        trainer = build_trainer(model, tokenizer, args, arm, workdir)
        record["sampling"] = sampling_settings(trainer)
        if trainer.continuous_batching_config is not None:
            record["continuous_batching_config"] = {
                k: v for k, v in vars(trainer.continuous_batching_config).items() if v is not None
            }
        full = trainer.generation_config.max_new_tokens
        record["warmup_tokens"] = full if arm in COMPILED_ARMS else min(full, WARMUP_TOKENS)
        trainer.generation_config.max_new_tokens = record["warmup_tokens"]
        t0 = time.perf_counter()
        try:
            generate_once(
                trainer,
                prompt_batch(args, model.config.vocab_size, args.seed + 999),
                args.num_generations,
                args.device,
            )
        finally:
            trainer.generation_config.max_new_tokens = full
        record["warmup_s"] = round(time.perf_counter() - t0, 2)
        return trainer
    except Exception as err:
        record["error"] = error_text(err)
        _progress(f"{arm}: FAILED {record['error']}")
        return None


def summarize(result: dict[str, Any]) -> None:
    """Per arm: median tokens/s over its reps, ratio to the baseline's median, peak memory."""
    arms = result["arms"]
    for arm in arms.values():
        reps = arm["reps"]
        if not reps:
            continue
        rates = [r["tokens"] / r["wall_s"] for r in reps]
        arm["tokens_per_s"] = round(statistics.median(rates), 1)
        arm["tokens_per_s_reps"] = [round(x, 1) for x in rates]
        arm["median_wall_s"] = round(statistics.median(r["wall_s"] for r in reps), 3)
        arm["tokens"] = [r["tokens"] for r in reps]
        arm["peak_mem_gib"] = round(max(r["peak_mem_gib"] for r in reps), 3)
        extra = [r["extra_mem_gib"] for r in reps if r["extra_mem_gib"] is not None]
        arm["extra_mem_gib"] = round(max(extra), 3) if extra else None
    base = arms.get(BASELINE, {}).get("tokens_per_s")
    for arm in arms.values():
        if "tokens_per_s" in arm:
            arm["ratio_to_generate"] = round(arm["tokens_per_s"] / base, 3) if base else None
    rated = {k: v["ratio_to_generate"] for k, v in arms.items() if v.get("ratio_to_generate")}
    result["fastest"] = max(rated, key=rated.get) if rated else None


# ---------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads or max(1, min(2, os.cpu_count() or 1)))
    elif args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dtype = dtype_for(args.device)
    started = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "gpu_generation",
        "model": f"Qwen2.5-{args.size.upper()} shape, random weights"
        if args.size != "tiny"
        else "tiny Qwen2",
        "lora": args.lora,
        "device": args.device,
        "device_name": torch.cuda.get_device_name()
        if args.device == "cuda"
        else platform.processor() or "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "load_before": [round(x, 2) for x in os.getloadavg()],
        "memory_metric": "torch.cuda.max_memory_allocated during the call"
        if args.device == "cuda"
        else "peak RSS of the process so far (ru_maxrss; monotonic over the run)",
        "shape": {
            "prompts": args.prompts,
            "num_generations": args.num_generations,
            "rows": args.prompts * args.num_generations,
            "max_completion_length": args.max_completion_length,
            "prompt_len": f"{max(1, 3 * args.prompt_len // 4)}..{args.prompt_len} (padded to {args.prompt_len})",
        },
        "passes": args.passes,
        "budget_s": args.budget_s,
        "baseline": BASELINE,
        "versions": _versions(),
        "arms": {},
    }
    t0 = time.perf_counter()
    model = build_model(args.size, args.device, dtype, args.lora)
    sync(args.device)
    result["build_s"] = round(time.perf_counter() - t0, 1)
    result["params"] = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory(prefix="gpu_gen-") as tmp:
        run_arms(model, offline_tokenizer(), args, result, Path(tmp))
    summarize(result)
    result["load_after"] = [round(x, 2) for x in os.getloadavg()]
    result["total_s"] = round(time.perf_counter() - started, 1)
    _write(args, result)
    print_table(result)
    return result


def _write(args: argparse.Namespace, result: dict[str, Any]) -> None:
    if args.json is not None:  # after every rep: a run stopped by a timeout keeps what it measured
        tmp = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(args.json)


def _progress(what: str) -> None:
    print(f"[gpu_generation] {what}", file=sys.stderr, flush=True)


def print_table(r: dict[str, Any]) -> None:
    s = r["shape"]
    print(
        f"\n{r['model']} ({r['params'] / 1e6:.1f} M params, LoRA {r['lora']}) on {r['device']} "
        f"[{r['device_name']}], {r['dtype']}; {s['prompts']} prompts x {s['num_generations']} completions "
        f"<= {s['max_completion_length']} tokens, prompts {s['prompt_len']}; load {r['load_before']} -> "
        f"{r['load_after']}; memory = {r['memory_metric']}"
    )
    print(
        f"{'arm':<22}{'reps':>5}{'tokens':>9}{'tokens/s':>11}{'x generate':>12}{'peak GiB':>10}{'warmup s':>10}  notes"
    )
    for name, a in r["arms"].items():
        if "tokens_per_s" not in a:
            print(f"{name:<22}{0:>5}  {'' if a['error'].startswith('not run') else 'FAILED: '}{a['error']}")
            continue
        ratio = a.get("ratio_to_generate")
        notes = ("compiled " if a.get("compiled") else "") + (
            f"ERROR after reps: {a['error']}" if a["error"] else ""
        )
        print(
            f"{name:<22}{len(a['reps']):>5}{statistics.median(a['tokens']):>9.0f}{a['tokens_per_s']:>11.1f}"
            f"{(f'{ratio:.2f}x' if ratio else '-'):>12}{a['peak_mem_gib']:>10.2f}{a.get('warmup_s', 0):>10.1f}  {notes}"
        )
    print(f"fastest: {r['fastest']}; total {r['total_s']} s\n")


if __name__ == "__main__":
    main()
