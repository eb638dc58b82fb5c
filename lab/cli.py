"""``lab`` command line: argument parsing only; the work is in :mod:`lab.runner`.

lab train   --aggregator delta_l --alpha 1.0 --steps 20 --out runs/mine      (→ runs/mine/delta_l-s0/)
lab compare --aggregators grpo,dapo,dr_grpo,delta_l --steps 20 --seeds 2 --out runs/demo
lab dashboard --runs-dir runs
accelerate launch -m lab.cli train ...     (data-parallel on several GPUs/nodes)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

# OpenMP threads that spin while they wait take the CPU from anything else running on a small machine, and
# then from each other: with one other busy process on 2 cores, sampling the demo's 16 completions took 42 s
# with 2 spinning threads, 19 s with 1 thread, and 20 s with 2 threads that sleep instead (14.5 s with no
# other job). libgomp reads this once when torch loads it, so it is set before the first torch import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from lab.aggregation import METHODS  # (imports torch: after the OpenMP setting)
from lab.models import EMBEDDED_MODEL, PRESETS


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value


def _aggregator_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in METHODS]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown aggregator(s) {bad or text!r}; choose from {','.join(METHODS)}"
        )
    return names


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--task", default=None, choices=["countdown", "math"], help="task (default: the CPU demo task)"
    )
    p.add_argument(
        "--model",
        default=EMBEDDED_MODEL,
        help=f"preset ({', '.join(PRESETS)}), hub id or local path (default: {EMBEDDED_MODEL})",
    )
    p.add_argument("--alpha", type=float, default=1.0, help="ΔL exponent α >= 0 (default 1.0)")
    p.add_argument("--delta-l-scope", default="batch", choices=["batch", "group"])
    p.add_argument("--steps", type=_positive_int, default=None, help="optimizer steps (default 20)")
    p.add_argument("--prompts-per-step", type=_positive_int, default=None)
    p.add_argument(
        "--micro-batch-size",
        type=_positive_int,
        default=None,
        help="completions per forward/backward (default min(8, rows)); the step's batch is accumulated",
    )
    p.add_argument("--num-generations", type=_positive_int, default=None, help="completions per prompt (G)")
    p.add_argument("--max-completion-length", type=_positive_int, default=None, help="M, in tokens")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--learning-rate", type=float, default=None)
    p.add_argument("--lora-r", type=_positive_int, default=None)
    p.add_argument("--shaped-reward", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument(
        "--eval-every", type=int, default=None, help="steps between evals (0: only after the last)"
    )
    p.add_argument("--eval-prompts", type=int, default=None, help="eval prompts (0: no eval)")
    p.add_argument(
        "--eval-k", type=_positive_int, default=None, help="samples per eval prompt (Avg@k, Pass@k)"
    )
    p.add_argument("--probe-every", type=int, default=None, help="gradient probe every K steps (0: off)")
    p.add_argument("--save-every", type=_positive_int, default=None, help="checkpoint every K steps")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    p.add_argument("--log-texts", action="store_true", help="keep completion texts in samples.jsonl")
    p.add_argument(
        "--report-to", default=None, help="comma list for TRL, e.g. wandb,tensorboard (default none)"
    )
    p.add_argument(
        "--vllm",
        action="store_true",
        help="generate with vLLM colocated in the training process (TRL use_vllm, vllm_mode=colocate); "
        "needs a CUDA GPU and the vllm package",
    )
    p.add_argument(
        "--vllm-gpu-memory-utilization",
        type=float,
        default=None,
        help="GPU memory fraction vLLM reserves with --vllm (default 0.3, TRL's)",
    )
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--seeds", type=_positive_int, default=1, help="repeat each aggregator with S seeds")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint(s) in --out")
    p.add_argument("--out", required=True, type=Path, help="output directory")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lab", description="ΔL Lab: compare loss aggregators for RLVR.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train one aggregator (× --seeds) into --out/<run_id>/")
    train.add_argument("--aggregator", default="delta_l", choices=list(METHODS))
    _add_run_options(train)
    compare = sub.add_parser(
        "compare", help="train several aggregators on identical prompts/seeds into --out"
    )
    compare.add_argument(
        "--aggregators",
        type=_aggregator_list,
        default=list(METHODS),
        help=f"comma list (default {','.join(METHODS)})",
    )
    _add_run_options(compare)
    dash = sub.add_parser("dashboard", help="open the Streamlit dashboard (streamlit run app.py)")
    dash.add_argument("--runs-dir", default="runs")
    dash.add_argument("--port", type=int, default=8501)
    return parser


def config_from_args(args: argparse.Namespace, aggregator: str):
    from lab.runner import RunConfig

    if args.vllm_gpu_memory_utilization is not None and not args.vllm:
        raise ValueError("--vllm-gpu-memory-utilization applies only with --vllm")
    fields = {
        "task": args.task,
        "model": args.model,
        "alpha": args.alpha,
        "delta_l_scope": args.delta_l_scope,
        "steps": args.steps,
        "prompts_per_step": args.prompts_per_step,
        "micro_batch_size": args.micro_batch_size,
        "num_generations": args.num_generations,
        "max_completion_length": args.max_completion_length,
        "temperature": args.temperature,
        "learning_rate": args.learning_rate,
        "lora_r": args.lora_r,
        "shaped_reward": args.shaped_reward,
        "eval_every": args.eval_every,
        "eval_prompts": args.eval_prompts,
        "eval_k": args.eval_k,
        "probe_every": args.probe_every,
        "save_every": args.save_every,
        "threads": args.threads,
        "vllm_gpu_memory_utilization": args.vllm_gpu_memory_utilization,
    }
    config = RunConfig(
        aggregator=aggregator,
        seed=args.seed,
        log_texts=args.log_texts,
        vllm=args.vllm,
        **{k: v for k, v in fields.items() if v is not None},
    )
    if args.report_to:
        config.report_to = [s.strip() for s in args.report_to.split(",") if s.strip()]
    return config


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "dashboard":
        app = Path(__file__).resolve().parent.parent / "app.py"
        return subprocess.call(
            [
                sys.executable,
                "-m",
                "streamlit",
                "run",
                str(app),
                "--server.port",
                str(args.port),
                "--",
                "--runs-dir",
                args.runs_dir,
            ]
        )

    from lab.models import ModelUnavailableError
    from lab.runner import run_comparison

    aggregators = [args.aggregator] if args.command == "train" else args.aggregators
    seeds = list(range(args.seed, args.seed + args.seeds))
    try:
        config = config_from_args(args, aggregators[0])
        run_comparison(config, aggregators=aggregators, seeds=seeds, out=args.out, resume=args.resume)
    except KeyboardInterrupt:
        print(
            "\ninterrupted: logs are flushed and a checkpoint saved; continue with --resume", file=sys.stderr
        )
        return 130
    except (ValueError, FileExistsError, ModelUnavailableError) as err:
        print(f"lab {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        _close_distributed()
    print(f"done: {args.out}  (dashboard: lab dashboard --runs-dir {args.out})")
    return 0


def _close_distributed() -> None:
    """Under torchrun/accelerate, shut the process group down (gloo aborts at exit otherwise)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
