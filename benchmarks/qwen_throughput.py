"""Tokens/s and peak memory of a Qwen2.5-0.5B-shaped model: generation, a LoRA GRPO step, ΔL vs dr_grpo.

What it measures
    The GPU path's costs without downloading Qwen2.5: ``lab.models.qwen25_shaped_config`` builds the real
    architecture (``--size 0.5b``: hidden 896, 24 layers, 14 heads / 2 KV heads, vocab 151936, tied
    embeddings; ``--size 1.5b`` too) with random weights, which has the same compute and memory cost.

    (a) generation: ``model.generate`` on ``--gen-batch`` random prompts of ``--prompt-len`` tokens,
        sampling (temperature 1), exactly ``--new-tokens`` new tokens (``min_new_tokens`` = max, so a
        random model's early EOS cannot shorten it). Reported: generated tokens/s (batch x new tokens /
        wall time), wall time, peak memory.
    (b) a GRPO-style LoRA training step: forward on ``--train-batch`` x (prompt + completion) tokens with
        logits kept only for the completion, per-token log-probs, the clipped GRPO surrogate with random
        advantages and a dr_grpo-style normalizer, backward, grad clipping and AdamW. LoRA: the lab's
        ``qwen2.5-<size>`` preset (all attention + MLP projections). On CUDA: bf16 weights + gradient
        checkpointing (the lab's GPU settings); on CPU: float32, no checkpointing. Reported: median step
        time, tokens/s (all B x (P+C) tokens per step), peak memory.
    (c) optional (``--trainer-ratio``, on by default): the same shapes through the real trainers, TRL's
        own ``_compute_loss`` (fused LM head) + backward: ``lab.speed.SpeedTrainer`` with
        ``loss_type="delta_l"`` against TRL's ``GRPOTrainer`` with ``"dr_grpo"``, sharing one model, on one
        synthetic generation batch with varied completion lengths, interleaved A/B. Target ratio <= 1.03.

    Memory: on CUDA ``torch.cuda.max_memory_allocated`` per phase (reset before each) and the GPU name;
    on CPU the process's peak RSS so far (``resource.getrusage``; monotonic over the run).

How to run
    .venv/bin/python benchmarks/qwen_throughput.py --quick            # CPU smoke run (< 2 min)
    python benchmarks/qwen_throughput.py --json qwen.json             # on a GPU: the defaults, < 4 min
    python benchmarks/qwen_throughput.py --size 1.5b --json q15.json

No model hub, no extra packages (torch, transformers, trl, peft, accelerate): the model is built from
its config and the trainers get a small in-memory tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import torch

TARGET_RATIO = 1.03
GPU_DEFAULTS = dict(
    gen_batch=64, prompt_len=128, new_tokens=512, train_batch=16, completion_len=512, repeats=5
)
CPU_DEFAULTS = dict(gen_batch=8, prompt_len=64, new_tokens=64, train_batch=4, completion_len=64, repeats=3)
QUICK_DEFAULTS = dict(gen_batch=2, prompt_len=32, new_tokens=16, train_batch=2, completion_len=32, repeats=2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="0.5b", choices=["0.5b", "1.5b", "3b", "7b"], help="Qwen2.5 shape")
    p.add_argument("--quick", action="store_true", help="small shapes (CPU smoke run)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cpu")
    p.add_argument("--gen-batch", type=int, default=None, help="prompts generated in parallel (B)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (P)")
    p.add_argument("--new-tokens", type=int, default=None, help="generated tokens per prompt (N)")
    p.add_argument("--train-batch", type=int, default=None, help="rows per training step")
    p.add_argument("--completion-len", type=int, default=None, help="completion tokens per row (C)")
    p.add_argument("--repeats", type=int, default=None, help="timed training steps (and A/B pairs)")
    p.add_argument("--lora-r", type=int, default=None, help="LoRA rank (default: the preset's)")
    p.add_argument(
        "--grad-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="default: on for CUDA, off for CPU",
    )
    p.add_argument(
        "--trainer-ratio",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time delta_l vs dr_grpo through the real trainers",
    )
    p.add_argument("--skip-generation", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: min(2, cores))")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the results to this JSON file")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    defaults = QUICK_DEFAULTS if args.quick else GPU_DEFAULTS if args.device == "cuda" else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in defaults:
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.grad_checkpointing is None:
        args.grad_checkpointing = args.device == "cuda"
    return args


# ---------------------------------------------------------------------------------------------------
# measurement helpers
# ---------------------------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib(device: str) -> float:
    """CUDA: peak allocated since the last reset; CPU: the process's peak RSS so far."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def dtype_for(device: str) -> torch.dtype:
    if device == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def build_model(size: str, device: str, dtype: torch.dtype):
    """A Qwen2.5-shaped causal LM with random weights, created directly on ``device``."""
    from transformers import Qwen2ForCausalLM

    from lab.models import qwen25_shaped_config

    config = qwen25_shaped_config(size)
    config.pad_token_id, config.bos_token_id, config.eos_token_id = 0, 1, 1
    with torch.device(device):
        model = Qwen2ForCausalLM._from_config(config, dtype=dtype)
    return model


def random_ids(rows: int, length: int, vocab: int, device: str, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(3, vocab, (rows, length), generator=generator).to(device)


# ---------------------------------------------------------------------------------------------------
# (a) generation
# ---------------------------------------------------------------------------------------------------
def bench_generation(model, args: argparse.Namespace, gen: torch.Generator) -> dict[str, Any]:
    model.eval()
    vocab = model.config.vocab_size
    ids = random_ids(args.gen_batch, args.prompt_len, vocab, args.device, gen)
    mask = torch.ones_like(ids)
    common = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, pad_token_id=0, eos_token_id=1)
    with torch.no_grad():
        model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, **common
        )  # warmup
        reset_peak(args.device)
        t0 = time.perf_counter()
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            **common,
        )
        sync(args.device)
        wall = time.perf_counter() - t0
    new = out.shape[1] - ids.shape[1]
    tokens = args.gen_batch * new
    return {
        "batch": args.gen_batch,
        "prompt_len": args.prompt_len,
        "new_tokens": new,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "ms_per_decode_step": round(1e3 * wall / max(new, 1), 2),
        "peak_mem_gib": round(peak_memory_gib(args.device), 3),
    }


# ---------------------------------------------------------------------------------------------------
# (b) plain GRPO-style LoRA step
# ---------------------------------------------------------------------------------------------------
def synthetic_batch(args: argparse.Namespace, vocab: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One generation batch: random prompts/completions, varied completion lengths, random advantages."""
    B, P, C = args.train_batch, args.prompt_len, args.completion_len
    lengths = torch.randint(max(1, C // 8), C + 1, (B,), generator=gen)
    lengths[0] = C  # one row uses the full budget: the padded width is C
    completion_mask = (torch.arange(C).unsqueeze(0) < lengths.unsqueeze(1)).long()
    batch = {
        "prompt_ids": random_ids(B, P, vocab, "cpu", gen),
        "prompt_mask": torch.ones(B, P, dtype=torch.long),
        "completion_ids": random_ids(B, C, vocab, "cpu", gen),
        "completion_mask": completion_mask,
        "advantages": torch.randn(B, generator=gen),
        "num_items_in_batch": completion_mask.sum(),
    }
    return {k: v.to(args.device) for k, v in batch.items()}


def grpo_loss(model, batch: dict[str, torch.Tensor], max_len: int, temperature: float = 1.0) -> torch.Tensor:
    from trl.trainer.utils import selective_log_softmax

    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attn = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    C = batch["completion_ids"].shape[1]
    logits = model(input_ids=ids, attention_mask=attn, logits_to_keep=C + 1).logits[:, :-1] / temperature
    logps = selective_log_softmax(logits, batch["completion_ids"])
    ratio = torch.exp(logps - logps.detach())
    adv = batch["advantages"].unsqueeze(1)
    per_token = -torch.min(ratio * adv, torch.clamp(ratio, 0.8, 1.3) * adv)
    mask = batch["completion_mask"]
    return (per_token * mask).sum() / (mask.shape[0] * max_len)


def bench_train_step(model, args: argparse.Namespace, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)
    times = []
    reset_peak(args.device)
    for i in range(args.repeats + 1):  # the first step is a warmup
        sync(args.device)
        t0 = time.perf_counter()
        loss = grpo_loss(model, batch, args.completion_len)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(args.device)
        if i:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    tokens = args.train_batch * (args.prompt_len + args.completion_len)
    return {
        "batch": args.train_batch,
        "prompt_len": args.prompt_len,
        "completion_len": args.completion_len,
        "tokens_per_step": tokens,
        "median_step_s": round(med, 4),
        "step_times_s": [round(t, 4) for t in times],
        "tokens_per_s": round(tokens / med, 1),
        "peak_mem_gib": round(peak_memory_gib(args.device), 3),
        "trainable_params": sum(p.numel() for p in params),
    }


# ---------------------------------------------------------------------------------------------------
# (c) ΔL vs dr_grpo through the real trainers
# ---------------------------------------------------------------------------------------------------
def offline_tokenizer():
    """A tiny in-memory tokenizer: the trainers need one, but the benchmark feeds token ids directly."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def bench_trainer_ratio(model, args: argparse.Namespace, batch: dict[str, torch.Tensor], workdir: Path):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from lab.speed import SpeedConfig, SpeedTrainer

    def reward(completions, **kwargs):
        return [0.0 for _ in completions]

    on_cuda = args.device == "cuda"
    common = dict(
        per_device_train_batch_size=args.train_batch,
        num_generations=2 if args.train_batch % 2 == 0 else args.train_batch,
        max_completion_length=args.completion_len,
        steps_per_generation=1,
        beta=0.0,
        epsilon=0.2,
        epsilon_high=0.3,
        report_to=[],
        use_cpu=not on_cuda,
        bf16=model.dtype == torch.bfloat16,
        gradient_checkpointing=False,  # the model is already set up (checkpointing enabled on it if asked)
        save_strategy="no",
        seed=args.seed,
    )
    data = Dataset.from_dict({"prompt": ["x"] * max(args.train_batch, 2)})
    tokenizer = offline_tokenizer()
    ours = SpeedTrainer(
        model=model,
        processing_class=tokenizer,
        reward_funcs=reward,
        args=SpeedConfig(output_dir=str(workdir / "dl"), loss_type="delta_l", **common),
        train_dataset=data,
    )
    stock = GRPOTrainer(
        model=ours.model,
        processing_class=tokenizer,
        reward_funcs=reward,
        args=GRPOConfig(output_dir=str(workdir / "dr"), loss_type="dr_grpo", **common),
        train_dataset=data,
    )
    inputs = {"delta_l": dict(batch), "dr_grpo": dict(batch)}
    t0 = time.perf_counter()
    ours.attach_delta_l_weights(inputs["delta_l"])
    sync(args.device)
    attach_ms = 1e3 * (time.perf_counter() - t0)
    arms = {"delta_l": ours, "dr_grpo": stock}
    times: dict[str, list[float]] = {"delta_l": [], "dr_grpo": []}
    pair_ratios = []
    for trainer in arms.values():
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
    reset_peak(args.device)
    for rep in range(args.repeats + 1):
        order = ("delta_l", "dr_grpo") if rep % 2 == 0 else ("dr_grpo", "delta_l")
        step = {}
        for name in order:
            trainer = arms[name]
            trainer.model.zero_grad(set_to_none=True)
            sync(args.device)
            t = time.perf_counter()
            loss = trainer.compute_loss(trainer.model, inputs[name])
            loss.backward()
            sync(args.device)
            step[name] = time.perf_counter() - t
            trainer._metrics["train"].clear()
        if rep:  # the first pair warms up (kernels, allocator)
            for name in arms:
                times[name].append(step[name])
            pair_ratios.append(step["delta_l"] / step["dr_grpo"])
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens = args.train_batch * (args.prompt_len + args.completion_len)
    ratio = statistics.median(pair_ratios)
    return {
        "median_step_s": {k: round(v, 4) for k, v in med.items()},
        "tokens_per_s": {k: round(tokens / v, 1) for k, v in med.items()},
        "median_pair_ratio": round(ratio, 4),
        "ratio_of_medians": round(med["delta_l"] / med["dr_grpo"], 4),
        "pair_ratios": [round(r, 4) for r in pair_ratios],
        "attach_delta_l_weights_ms": round(attach_ms, 3),
        "target_ratio": TARGET_RATIO,
        "target_met": ratio <= TARGET_RATIO,
        "peak_mem_gib": round(peak_memory_gib(args.device), 3),
        "note": "compute_loss + backward (no optimizer step); TRL fused LM head",
    }


# ---------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    from lab.speed import apply_cpu_patches

    if not torch.cuda.is_available():
        apply_cpu_patches()  # as lab.runner does on CPU
    args = parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads or max(1, min(2, os.cpu_count() or 1)))
    elif args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    dtype = dtype_for(args.device)
    started = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "qwen_throughput",
        "model": f"Qwen2.5-{args.size.upper()} shape, random weights",
        "device": args.device,
        "device_name": torch.cuda.get_device_name()
        if args.device == "cuda"
        else platform.processor() or "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "gradient_checkpointing": args.grad_checkpointing,
        "threads": torch.get_num_threads(),
        "memory_metric": "torch.cuda.max_memory_allocated"
        if args.device == "cuda"
        else "peak RSS of the process (ru_maxrss)",
        "versions": _versions(),
    }
    t0 = time.perf_counter()
    model = build_model(args.size, args.device, dtype)
    sync(args.device)
    result["build_s"] = round(time.perf_counter() - t0, 1)
    result["params"] = sum(p.numel() for p in model.parameters())

    if not args.skip_generation:
        _progress("generation")
        result["generation"] = bench_generation(model, args, gen)

    from peft import get_peft_model

    from lab.models import lora_config

    if args.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model = get_peft_model(model, lora_config(f"qwen2.5-{args.size}", r=args.lora_r))
    batch = synthetic_batch(args, model.config.vocab_size, gen)
    _progress("train step")
    result["train_step"] = bench_train_step(model, args, batch)
    if args.trainer_ratio:
        _progress("trainer ratio")
        with tempfile.TemporaryDirectory(prefix="qwen_tp-") as tmp:
            result["trainer_ratio"] = bench_trainer_ratio(model, args, batch, Path(tmp))
    result["total_s"] = round(time.perf_counter() - started, 1)
    print_table(result)
    print(json.dumps(result, separators=(",", ":")))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


def _progress(what: str) -> None:
    print(f"[qwen_throughput] {what} ...", file=sys.stderr, flush=True)


def _versions() -> dict[str, str]:
    import transformers
    import trl

    return {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__}


def print_table(r: dict[str, Any]) -> None:
    print(
        f"\n{r['model']} ({r['params'] / 1e6:.0f} M params) on {r['device']} [{r['device_name']}], "
        f"{r['dtype']}, grad ckpt {r['gradient_checkpointing']}, memory = {r['memory_metric']}"
    )
    print(f"{'phase':<28}{'shape':<26}{'time (s)':>10}{'tokens/s':>12}{'peak GiB':>10}")
    g = r.get("generation")
    if g:
        shape = f"B={g['batch']} P={g['prompt_len']} N={g['new_tokens']}"
        print(
            f"{'generate (sampling)':<28}{shape:<26}{g['wall_s']:>10.3f}{g['tokens_per_s']:>12.1f}{g['peak_mem_gib']:>10.2f}"
        )
    t = r["train_step"]
    shape = f"B={t['batch']} P={t['prompt_len']} C={t['completion_len']}"
    print(
        f"{'LoRA GRPO step (median)':<28}{shape:<26}{t['median_step_s']:>10.3f}{t['tokens_per_s']:>12.1f}"
        f"{t['peak_mem_gib']:>10.2f}"
    )
    tr = r.get("trainer_ratio")
    if tr:
        for arm in ("delta_l", "dr_grpo"):
            print(
                f"{'trainer loss+bwd ' + arm:<28}{shape:<26}{tr['median_step_s'][arm]:>10.3f}"
                f"{tr['tokens_per_s'][arm]:>12.1f}{tr['peak_mem_gib']:>10.2f}"
            )
        print(
            f"ratio delta_l/dr_grpo: median of pairs {tr['median_pair_ratio']:.4f}, of medians "
            f"{tr['ratio_of_medians']:.4f} (target <= {tr['target_ratio']}: "
            f"{'met' if tr['target_met'] else 'NOT met'})"
        )
    print(f"total {r['total_s']} s\n")


if __name__ == "__main__":
    main()
