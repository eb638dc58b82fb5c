"""Each prompt once: generation and loss + backward with and without prompt sharing, interleaved A/B.

What it measures
    The two exact switches of ``lab.speed`` (``prefill_prompts_once``: generation prefills each distinct
    prompt once; ``forward_prompts_once``: the loss forwards each distinct prompt of a micro-batch once and
    shares its grad-carrying KV cache) against TRL's own paths, on the CPU demo (embedded SmolLM2-135M +
    LoRA, ``lab.tasks.DEMO``: prompts_per_step prompts × 8 completions of <= 64 tokens, micro-batches of 8).

How
    - One ``SpeedTrainer`` built by ``lab.runner`` (the lab's own settings); only the two switches flip.
    - Generation: per batch, ``--repeats`` pairs, order alternating (A B, B A, ...), each arm from the same
      seed; timed ``_generate_and_score_completions``. Check: identical completion ids in both arms.
    - Loss: the generation batch of the plain arm, shuffled and split into micro-batches as TRL does; per
      pair both arms run ``compute_loss`` + ``backward`` over all micro-batches from the same weights.
      The advantages are replaced by a fixed non-zero pattern (early demo groups often have no reward spread,
      and 0 = 0 checks nothing). Check: the gradients' relative difference ||g_once - g_trl|| / ||g_trl||.
    - Reported: medians per arm, the median of the per-pair ratios (once / trl; the number least sensitive
      to a changing machine load), the load average before and after.

Usage::

    .venv/bin/python benchmarks/prompt_sharing.py                    # the demo (2 batches x 3 pairs)
    .venv/bin/python benchmarks/prompt_sharing.py --quick            # tiny model, smoke run
    .venv/bin/python benchmarks/prompt_sharing.py --max-completion-length 256 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import lab.cli  # noqa: F401  (before torch: lab's OpenMP wait policy, as under `lab train`)

# isort: split

import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model preset (default smollm2-135m; tiny with --quick)")
    p.add_argument("--batches", type=int, default=2, help="generation batches (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="A/B pairs per batch and part (default 3)")
    p.add_argument("--max-completion-length", type=int, default=None, help="M (default: the demo's 64)")
    p.add_argument("--micro-batch-size", type=int, default=None, help="rows per micro-batch (default: lab's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: lab's choice)")
    p.add_argument("--quick", action="store_true", help="tiny model, 1 batch, 2 pairs")
    p.add_argument("--json", type=Path, default=None, help="also write the summary to this JSON file")
    args = p.parse_args(argv)
    if args.model is None:
        args.model = "tiny" if args.quick else "smollm2-135m"
    if args.quick:
        args.batches, args.repeats = 1, 2
    if args.batches < 1 or args.repeats < 1:
        p.error("--batches and --repeats must be >= 1")
    return args


def build_trainer(args: argparse.Namespace, workdir: Path):
    import lab.runner as runner
    from lab.models import load_model_and_tokenizer, lora_config, resolve_preset
    from lab.speed import SpeedTrainer
    from lab.tasks import get_task

    fields = {"model": args.model, "threads": args.threads, "steps": args.batches}
    if args.max_completion_length:
        fields["max_completion_length"] = args.max_completion_length
    if args.micro_batch_size:
        fields["micro_batch_size"] = args.micro_batch_size
    c = runner.RunConfig(**fields).resolved()
    runner.set_threads(c)
    task = get_task(c.task)
    data = task.train_dataset(
        args.batches * c.prompts_per_step, seed=0, chat=resolve_preset(c.model).chat, **c.task_options
    )
    model, tokenizer = load_model_and_tokenizer(c.model)
    trainer = SpeedTrainer(
        model=model,
        processing_class=tokenizer,
        reward_funcs=task.reward_funcs(shaped=c.shaped_reward),
        args=runner._trl_args(c, workdir),
        train_dataset=data,
        peft_config=lora_config(c.model, r=c.lora_r),
    )
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = c.prompts_per_step * c.num_generations // c.micro_batch_size
    return trainer, c, data


def generate(trainer, rows, share: bool, seed: int) -> tuple[float, dict[str, Any]]:
    trainer.args.prefill_prompts_once = share
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    batch = trainer._generate_and_score_completions(rows)
    return time.perf_counter() - t0, batch


def loss_and_backward(trainer, parts, share: bool, weights) -> tuple[float, torch.Tensor]:
    trainer.args.forward_prompts_once = share
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p, w in zip(params, weights, strict=True):
            p.copy_(w)
    trainer.model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    for part in parts:
        trainer.compute_loss(trainer.model, part).backward()
    seconds = time.perf_counter() - t0
    trainer._metrics["train"].clear()
    return seconds, torch.cat([p.grad.flatten() for p in params])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from lab.speed import apply_cpu_patches

    if not torch.cuda.is_available():
        apply_cpu_patches()  # as lab.runner does on CPU
    from trl.trainer.utils import shuffle_sequence_dict, split_tensor_dict

    args = parse_args(argv)
    load_before = [round(x, 2) for x in os.getloadavg()]
    times: dict[str, dict[str, list[float]]] = {
        part: {"trl": [], "once": []} for part in ("generate", "loss")
    }
    ratios: dict[str, list[float]] = {"generate": [], "loss": []}
    same_completions, grad_rel_diffs = [], []
    with tempfile.TemporaryDirectory(prefix="prompt-sharing-") as tmp:
        trainer, c, data = build_trainer(args, Path(tmp))
        weights = [p.detach().clone() for p in trainer.model.parameters() if p.requires_grad]
        for b in range(args.batches):
            prompts = list(data)[b * c.prompts_per_step : (b + 1) * c.prompts_per_step]
            rows = [row for row in prompts for _ in range(c.num_generations)]
            batch = None
            for r in range(args.repeats + 1):  # pair 0 is a warm-up
                pair = {}
                for share in (False, True) if r % 2 == 0 else (True, False):
                    seconds, out = generate(trainer, rows, share, seed=1000 + b)
                    pair[share] = seconds
                    if not share:
                        batch = out
                    else:
                        shared_ids = out["completion_ids"]
                if r:
                    times["generate"]["trl"].append(pair[False])
                    times["generate"]["once"].append(pair[True])
                    ratios["generate"].append(pair[True] / pair[False])
                same_completions.append(bool(torch.equal(batch["completion_ids"], shared_ids)))
                print(
                    f"batch {b} generate pair {r}: trl {pair[False]:.2f} s, once {pair[True]:.2f} s",
                    flush=True,
                )
            # A fixed non-zero advantage per row (the demo's early groups often have no reward spread, and a
            # zero gradient would make the equality check trivial); the cost does not depend on the values.
            batch["advantages"] = torch.linspace(-1.0, 1.0, len(rows))
            parts = split_tensor_dict(shuffle_sequence_dict(batch), len(rows) // c.micro_batch_size)
            for r in range(args.repeats + 1):
                pair, grads = {}, {}
                for share in (False, True) if r % 2 == 0 else (True, False):
                    pair[share], grads[share] = loss_and_backward(trainer, parts, share, weights)
                if r:
                    times["loss"]["trl"].append(pair[False])
                    times["loss"]["once"].append(pair[True])
                    ratios["loss"].append(pair[True] / pair[False])
                grad_rel_diffs.append(((grads[True] - grads[False]).norm() / grads[False].norm()).item())
                print(
                    f"batch {b} loss+backward pair {r}: trl {pair[False]:.2f} s, once {pair[True]:.2f} s",
                    flush=True,
                )
    summary = {
        "benchmark": "prompt_sharing",
        "model": args.model,
        "prompts_per_step": c.prompts_per_step,
        "num_generations": c.num_generations,
        "max_completion_length": c.max_completion_length,
        "micro_batch_size": c.micro_batch_size,
        "threads": torch.get_num_threads(),
        "batches": args.batches,
        "pairs": args.repeats,
        "median_s": {
            part: {arm: round(statistics.median(v), 3) for arm, v in t.items()} for part, t in times.items()
        },
        "median_pair_ratio_once_over_trl": {k: round(statistics.median(v), 3) for k, v in ratios.items()},
        "pair_ratios": {k: [round(x, 3) for x in v] for k, v in ratios.items()},
        "same_completions": all(same_completions),
        "max_grad_relative_difference": max(grad_rel_diffs),
        "load_average_before": load_before,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
    }
    print(
        f"\n{args.model}: {c.prompts_per_step} prompts x {c.num_generations} completions (<= "
        f"{c.max_completion_length} tokens), micro-batches of {c.micro_batch_size}, {summary['threads']} threads"
    )
    for part in ("generate", "loss"):
        m = summary["median_s"][part]
        print(
            f"{part:<9} TRL {m['trl']:7.2f} s   once {m['once']:7.2f} s   median pair ratio "
            f"{summary['median_pair_ratio_once_over_trl'][part]:.3f}"
        )
    print(
        f"same completions: {summary['same_completions']}; max gradient relative difference "
        f"{summary['max_grad_relative_difference']:.2e}; load average before {load_before}, after "
        f"{summary['load_average_after']}\n"
    )
    print(json.dumps(summary, separators=(",", ":")))
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    main()
