"""Training-step time of ΔL (``loss_type="delta_l"``) against TRL's stock ``dr_grpo``, on identical batches.

What it measures
    The cost ΔL adds to a GRPO optimizer step. ΔL only rescales the advantages by per-row weights
    (``lab.speed``), so its step should cost the same as ``dr_grpo``'s. Target: median step time ratio
    ``delta_l / dr_grpo <= 1.03``.

How
    - One LoRA model (default: the embedded ``smollm2-135m``, the lab's CPU model; ``--model tiny`` for a
      quick run) is shared by two trainers: ``lab.speed.SpeedTrainer`` with ``loss_type="delta_l"``
      and TRL's own ``trl.GRPOTrainer`` with ``loss_type="dr_grpo"``. Same weights, same memory.
    - ``--batches`` generation batches of the lab's CPU demo (CountDown, ``lab.tasks.DEMO``: G completions
      for each of ``--prompts`` prompts, ``--max-completion-length`` tokens) are generated ONCE each with
      the ΔL trainer's ``_generate_and_score_completions`` (its generation time is reported too).
    - On every batch, ``--repeats`` times, both arms run one step on the identical inputs, interleaved
      A/B then B/A (alternating order cancels drift on a shared machine): ``trainer.compute_loss`` (the
      forward + loss that ``Trainer.training_step`` calls), ``loss.backward()``, and with ``--optimizer``
      (default on) ``clip_grad_norm_(1.0)`` + ``AdamW.step()``. After each step the LoRA weights are
      restored (untimed), so every step of both arms starts from the same weights.
    - ΔL's per-generation-batch work, ``attach_delta_l_weights`` (lengths → weights → batch column + weight
      stats), is timed separately (``--weight-repeats`` calls per batch); it runs once per generation, not
      once per micro-step.
    - Reported: median step time per arm (and its forward/backward/optimizer parts), the ratio of medians,
      and the median of the per-pair ratios (each ΔL step divided by its neighbouring dr_grpo step: the
      number least sensitive to load changes). Use ``--threads`` to set ``torch.set_num_threads`` (default 1;
      on the 2-core lab machine 1 thread is much faster for small models than the default).

Usage::

    .venv/bin/python benchmarks/step_time.py --quick          # tiny random model, ~30 s
    .venv/bin/python benchmarks/step_time.py                  # smollm2-135m + LoRA, the demo batch shape
    .venv/bin/python benchmarks/step_time.py --model tiny --repeats 30 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import torch

TARGET_RATIO = 1.03
ARMS = ("delta_l", "dr_grpo")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="lab model preset (default smollm2-135m; tiny with --quick)")
    p.add_argument("--quick", action="store_true", help="tiny model, fewer repeats (a smoke run)")
    p.add_argument("--batches", type=int, default=None, help="generation batches (default 2; 1 with --quick)")
    p.add_argument(
        "--repeats", type=int, default=None, help="A/B pairs per batch (default 4; 4 with --quick)"
    )
    p.add_argument(
        "--prompts",
        type=int,
        default=None,
        help="prompts per generation batch (default = demo: 4; 1 with --quick)",
    )
    p.add_argument(
        "--num-generations",
        type=int,
        default=None,
        help="completions per prompt G (default = demo: 8; 4 with --quick)",
    )
    p.add_argument("--max-completion-length", type=int, default=64, help="M in tokens (demo: 64)")
    p.add_argument("--alpha", type=float, default=1.0, help="ΔL exponent α")
    p.add_argument(
        "--optimizer",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="include grad clipping + AdamW.step in the timed step",
    )
    p.add_argument("--lora", action=argparse.BooleanOptionalAction, default=True, help="LoRA adapters")
    p.add_argument(
        "--weight-repeats", type=int, default=200, help="timed attach_delta_l_weights calls per batch"
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed A/B pairs per batch before timing")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the summary to this JSON file")
    args = p.parse_args(argv)
    if args.model is None:
        args.model = "tiny" if args.quick else "smollm2-135m"
    if args.batches is None:
        args.batches = 1 if args.quick else 2
    if args.repeats is None:
        args.repeats = 4
    if args.prompts is None:
        args.prompts = 1 if args.quick else 4
    if args.num_generations is None:
        args.num_generations = 4 if args.quick else 8
    for name in ("batches", "repeats", "prompts", "weight_repeats", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.num_generations < 2:
        p.error("--num-generations must be >= 2")
    return args


def build_trainers(args: argparse.Namespace, workdir: Path) -> tuple[Any, Any, Any]:
    """(ΔL trainer, stock TRL dr_grpo trainer, dataset) sharing one (LoRA) model."""
    from trl import GRPOConfig, GRPOTrainer

    from lab.models import load_model_and_tokenizer, lora_config, resolve_preset
    from lab.speed import SpeedConfig, SpeedTrainer
    from lab.tasks import DEMO, get_task

    task = get_task(DEMO["task"])
    data = task.train_dataset(
        args.batches * args.prompts,
        seed=args.seed,
        chat=resolve_preset(args.model).chat,
        **DEMO["task_options"],
    )
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=torch.float32)
    if args.lora:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(args.model))
    common = dict(  # the lab's own run settings (lab.runner._trl_args), on CPU
        per_device_train_batch_size=args.prompts * args.num_generations,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        temperature=DEMO["temperature"],
        learning_rate=2e-5,
        beta=0.0,
        epsilon=0.2,
        epsilon_high=0.3,
        max_grad_norm=1.0,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        gradient_checkpointing=False,
        save_strategy="no",
        logging_steps=1,
        seed=args.seed,
    )
    reward_funcs = task.reward_funcs(shaped=DEMO["shaped"])
    ours = SpeedTrainer(
        model=model,
        processing_class=tokenizer,
        reward_funcs=reward_funcs,
        args=SpeedConfig(
            output_dir=str(workdir / "delta_l"), loss_type="delta_l", delta_l_alpha=args.alpha, **common
        ),
        train_dataset=data,
    )
    stock = GRPOTrainer(
        model=ours.model,  # the same module object: identical weights by construction
        processing_class=tokenizer,
        reward_funcs=reward_funcs,
        args=GRPOConfig(output_dir=str(workdir / "dr_grpo"), loss_type="dr_grpo", **common),
        train_dataset=data,
    )
    for trainer in (ours, stock):
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
    return ours, stock, data


class Arm:
    """One loss type: its trainer, its own AdamW, and the timings of its steps."""

    def __init__(self, name: str, trainer: Any, params: list[torch.nn.Parameter], optimizer: bool):
        self.name = name
        self.trainer = trainer
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=2e-5) if optimizer else None
        self.times: dict[str, list[float]] = {"step": [], "forward": [], "backward": [], "optimizer": []}

    def step(self, batch: dict[str, Any], record: bool) -> float:
        model = self.trainer.model
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = self.trainer.compute_loss(model, batch)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        if self.optimizer is not None:
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.optimizer.step()
        t3 = time.perf_counter()
        if record:
            self.times["forward"].append(t1 - t0)
            self.times["backward"].append(t2 - t1)
            self.times["optimizer"].append(t3 - t2)
            self.times["step"].append(t3 - t0)
        self.trainer._metrics["train"].clear()  # TRL appends metrics per call; keep both arms' lists short
        return float(loss.detach())


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from lab.speed import apply_cpu_patches

    if not torch.cuda.is_available():
        apply_cpu_patches()  # as lab.runner does on CPU
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="step_time-") as tmp:
        t_build = time.perf_counter()
        ours, stock, data = build_trainers(args, Path(tmp))
        build_s = time.perf_counter() - t_build
        params = [p for p in ours.model.parameters() if p.requires_grad]
        snapshot = [p.detach().clone() for p in params]
        arms = {
            "delta_l": Arm("delta_l", ours, params, args.optimizer),
            "dr_grpo": Arm("dr_grpo", stock, params, args.optimizer),
        }
        pair_ratios: list[float] = []
        gen_times: list[float] = []
        weight_times: list[float] = []
        batch_shapes: list[dict[str, Any]] = []
        losses: dict[str, list[float]] = {a: [] for a in ARMS}
        rows_all = list(data)
        for b in range(args.batches):
            rows = [
                r
                for r in rows_all[b * args.prompts : (b + 1) * args.prompts]
                for _ in range(args.num_generations)
            ]
            t0 = time.perf_counter()
            with torch.no_grad():
                gen = ours._generate_and_score_completions(rows)
            gen_times.append(time.perf_counter() - t0)
            print(
                f"batch {b + 1}/{args.batches}: generated in {gen_times[-1]:.1f}s",
                file=sys.stderr,
                flush=True,
            )
            gen.pop("delta_l_weights", None)
            ours.generation_records.clear()
            lengths = gen["completion_mask"].sum(-1)
            batch_shapes.append(
                {
                    "rows": int(lengths.numel()),
                    "prompt_tokens": int(gen["prompt_ids"].shape[1]),
                    "completion_tokens_padded": int(gen["completion_ids"].shape[1]),
                    "mean_length": round(float(lengths.float().mean()), 1),
                    "min_length": int(lengths.min()),
                    "max_length": int(lengths.max()),
                }
            )
            # ΔL's extra work, once per generation batch
            for _ in range(args.weight_repeats):
                scratch = dict(gen)
                t0 = time.perf_counter()
                ours.attach_delta_l_weights(scratch)
                weight_times.append(time.perf_counter() - t0)
            ours._metrics["train"].clear()
            inputs = {"delta_l": dict(gen), "dr_grpo": dict(gen)}
            ours.attach_delta_l_weights(inputs["delta_l"])
            ours._metrics["train"].clear()

            for rep in range(args.warmup + args.repeats):
                record = rep >= args.warmup
                order = ARMS if rep % 2 == 0 else ARMS[::-1]
                step_times = {}
                for name in order:
                    loss = arms[name].step(inputs[name], record)
                    if record:
                        step_times[name] = arms[name].times["step"][-1]
                        losses[name].append(loss)
                    with torch.no_grad():  # back to the shared starting weights (untimed)
                        for p, s in zip(params, snapshot, strict=True):
                            p.copy_(s)
                if record:
                    pair_ratios.append(step_times["delta_l"] / step_times["dr_grpo"])
                    print(
                        f"batch {b + 1}/{args.batches} pair {rep - args.warmup + 1}/{args.repeats}: "
                        + "  ".join(f"{a} {step_times[a]:.3f}s" for a in ARMS),
                        file=sys.stderr,
                        flush=True,
                    )

    med = {a: {k: median(v) for k, v in arms[a].times.items()} for a in ARMS}
    ratio_of_medians = med["delta_l"]["step"] / med["dr_grpo"]["step"]
    median_pair_ratio = median(pair_ratios)
    q = statistics.quantiles(pair_ratios, n=4) if len(pair_ratios) >= 2 else [median_pair_ratio] * 3
    weight_med = median(weight_times)
    summary = {
        "benchmark": "step_time",
        "model": args.model,
        "lora": args.lora,
        "threads": args.threads,
        "optimizer_step": args.optimizer,
        "batches": args.batches,
        "repeats_per_batch": args.repeats,
        "batch_shapes": batch_shapes,
        "alpha": args.alpha,
        "median_step_s": {a: round(med[a]["step"], 5) for a in ARMS},
        "median_parts_s": {a: {k: round(v, 5) for k, v in med[a].items() if k != "step"} for a in ARMS},
        "ratio_of_medians": round(ratio_of_medians, 4),
        "median_pair_ratio": round(median_pair_ratio, 4),
        "pair_ratio_iqr": [round(q[0], 4), round(q[2], 4)],
        "attach_delta_l_weights_median_ms": round(weight_med * 1e3, 4),
        "generation_median_s": round(median(gen_times), 3),
        "weights_share_of_generation_step": round(
            weight_med / (median(gen_times) + med["delta_l"]["step"]), 6
        ),
        "losses_equal_alpha0": None,
        "target_ratio": TARGET_RATIO,
        "target_met": median_pair_ratio <= TARGET_RATIO,
        "build_s": round(build_s, 1),
        "torch": torch.__version__,
        "machine": platform.machine(),
    }
    if args.alpha == 0.0:
        summary["losses_equal_alpha0"] = all(
            abs(a - b) <= 1e-6 * max(1.0, abs(b))
            for a, b in zip(losses["delta_l"], losses["dr_grpo"], strict=True)
        )
    print_table(summary, weight_times)
    line = json.dumps(summary, separators=(",", ":"))
    print(line)
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def print_table(s: dict[str, Any], weight_times: list[float]) -> None:
    shape = s["batch_shapes"][0]
    print(
        f"\nstep time: {s['model']}{' + LoRA' if s['lora'] else ''}, {s['threads']} thread(s), "
        f"{s['batches']} batch(es) x {s['repeats_per_batch']} A/B pairs, batch {shape['rows']} rows x "
        f"({shape['prompt_tokens']} prompt + {shape['completion_tokens_padded']} completion) tokens"
    )
    print(f"{'arm':<10}{'step (s)':>12}{'forward':>12}{'backward':>12}{'optimizer':>12}")
    for arm in ARMS:
        parts = s["median_parts_s"][arm]
        print(
            f"{arm:<10}{s['median_step_s'][arm]:>12.4f}{parts['forward']:>12.4f}"
            f"{parts['backward']:>12.4f}{parts['optimizer']:>12.4f}"
        )
    print(
        f"ratio delta_l/dr_grpo: median of pairs {s['median_pair_ratio']:.4f} "
        f"(IQR {s['pair_ratio_iqr'][0]:.4f}-{s['pair_ratio_iqr'][1]:.4f}), of medians {s['ratio_of_medians']:.4f}; "
        f"target <= {s['target_ratio']}: {'met' if s['target_met'] else 'NOT met'}"
    )
    print(
        f"attach_delta_l_weights: median {s['attach_delta_l_weights_median_ms']:.3f} ms over {len(weight_times)} "
        f"calls (once per generation batch; generation itself {s['generation_median_s']:.2f} s)\n"
    )


if __name__ == "__main__":
    main()
