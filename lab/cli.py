"""``lab`` command line: argument parsing only; the work is in :mod:`lab.runner`.

lab compare --out runs/fast                 (the main job: 4 aggregators x 5 seeds on the fast task + verdict)
lab compare --preset smollm2-countdown --out runs/demo      (the embedded real model on CountDown)
lab train   --aggregator delta_l --alpha 0.75 --optimizer sgd --out runs/mine   (→ runs/mine/delta_l-a0.75-s0/)
lab dashboard --runs-dir runs             (localhost; --host 0.0.0.0 serves on the network)
accelerate launch -m lab.cli train ...     (data-parallel on several GPUs/nodes)
"""

from __future__ import annotations

import argparse
import os
import signal
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
from lab.tasks import TASKS

LOCALHOST = "127.0.0.1"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value


def _out_dir(text: str) -> Path:
    if not text.strip():
        raise argparse.ArgumentTypeError(
            "is empty: give the folder to write the runs into, e.g. --out runs/mine"
        )
    return Path(text)


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port 1..65535, got {text!r}")
    return value


def _aggregator_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in METHODS]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown aggregator(s) {bad or text!r}; choose from {','.join(METHODS)}"
        )
    return names


def _length_range(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX (two integers), got {text!r}") from None
    return lo, hi


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def _add_run_options(p: argparse.ArgumentParser) -> None:
    from lab.runner import GENERATION_CHOICES, OPTIMIZERS, RUN_PRESETS

    p.add_argument(
        "--preset",
        default=None,
        choices=list(RUN_PRESETS),
        help="a named set of defaults: 'fast' (the default: the digitsum task on the lab's small model, "
        "5 seeds in parallel) or 'smollm2-countdown' (the embedded SmolLM2 on CountDown, LoRA); any flag "
        "below overrides it. Without --preset, --model/--task pick the defaults",
    )
    p.add_argument("--task", default=None, choices=list(TASKS), help="task (default: the preset's)")
    p.add_argument(
        "--model",
        default=None,
        help=f"preset ({', '.join(PRESETS)}), hub id or local path (default: the preset's; "
        f"{EMBEDDED_MODEL} is the embedded real model)",
    )
    p.add_argument("--alpha", type=float, default=1.0, help="ΔL exponent α >= 0 (default 1.0)")
    p.add_argument(
        "--delta-l-scope",
        default="batch",
        choices=["batch", "group"],
        help="normalize the ΔL weights over the whole generation batch (default, as the paper's code: "
        "then GRPO and ΔL(α=1) share one gradient direction) or per prompt group",
    )
    p.add_argument(
        "--optimizer",
        default="adamw",
        choices=list(OPTIMIZERS),
        help="adamw (default) or plain sgd: Adam absorbs a per-step scale of the gradient, SGD does not",
    )
    p.add_argument(
        "--equalize-step-size",
        action="store_true",
        help="scale each aggregator's loss by (1/M)/Σx_i per batch, so all have ΔL's expected step size "
        "and only the gradient direction differs",
    )
    p.add_argument(
        "--max-grad-norm",
        type=_non_negative_float,
        default=1.0,
        help="gradient clipping (default 1.0, the paper's; 0 turns it off)",
    )
    p.add_argument(
        "--length-range",
        type=_length_range,
        default=None,
        metavar="MIN,MAX",
        help="digitsum: digits per problem (default 2,12); longer problems need longer scratchpads",
    )
    p.add_argument(
        "--steps", type=_positive_int, default=None, help="optimizer steps (default: the preset's)"
    )
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
    p.add_argument(
        "--probe-every",
        type=int,
        default=None,
        help="per-sample gradient probe every K steps: measured CV, Var(g_i) vs L_i (0: off; fast: 5)",
    )
    p.add_argument(
        "--compare-gradients-every",
        type=int,
        default=None,
        help="log the cosine and norm ratio of the four aggregators' gradients every K steps (0: off; fast: 1)",
    )
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
    p.add_argument(
        "--generation",
        default=None,
        choices=list(GENERATION_CHOICES),
        help="TRL's generation path: auto (default: plain generate on a GPU; on CPU a static cache with each "
        "prompt prefilled once, except for the fast preset), generate, continuous-batching (GPU), static-cache, "
        "static-compile (GPU), prefill-once; benchmarks/gpu_generation.py measures them",
    )
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument(
        "--seeds",
        type=_positive_int,
        default=None,
        help="repeat each aggregator with S seeds (fast: 5, else 1)",
    )
    p.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        help="runs trained at the same time, each in its own process (fast: 2, else 1)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint(s) in --out")
    p.add_argument("--out", required=True, type=_out_dir, help="output directory")


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
    dash = sub.add_parser(
        "dashboard", help="serve the Streamlit dashboard on localhost (streamlit run app.py)"
    )
    dash.add_argument("--runs-dir", default="runs", help="the runs to show (default runs)")
    dash.add_argument("--port", type=_port, default=8501, help="default 8501")
    dash.add_argument(
        "--host",
        default=LOCALHOST,
        help=f"address to listen on (default {LOCALHOST}: this machine only). 0.0.0.0 serves on the network: "
        "the runs dir is then fixed and the Launch tab disabled unless LAB_LAUNCH_TOKEN is set",
    )
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
        "compare_gradients_every": args.compare_gradients_every,
        "save_every": args.save_every,
        "threads": args.threads,
        "preset": args.preset,
        "length_range": args.length_range,
        "vllm_gpu_memory_utilization": args.vllm_gpu_memory_utilization,
        "generation": args.generation,
    }
    config = RunConfig(
        aggregator=aggregator,
        seed=args.seed,
        log_texts=args.log_texts,
        optimizer=args.optimizer,
        equalize_step_size=args.equalize_step_size,
        max_grad_norm=args.max_grad_norm,
        vllm=args.vllm,
        **{k: v for k, v in fields.items() if v is not None},
    )
    if args.report_to:
        config.report_to = [s.strip() for s in args.report_to.split(",") if s.strip()]
    return config


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "dashboard":
        return serve_dashboard(args)

    from lab.models import ModelUnavailableError
    from lab.rundir import RunFailed, RunsFailed, describe_os_error
    from lab.runner import raise_keyboard_interrupt, run_comparison, run_defaults

    aggregators = [args.aggregator] if args.command == "train" else args.aggregators
    signal.signal(
        signal.SIGTERM, raise_keyboard_interrupt
    )  # a process manager's stop = Ctrl-C: save, mark, exit
    try:
        config = config_from_args(args, aggregators[0])
        defaults = run_defaults(config)
        seeds = list(range(args.seed, args.seed + (args.seeds or defaults["seeds"])))
        workers = args.workers or defaults["workers"]
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            workers = 1  # under accelerate/torchrun every process is already one rank of the same run
        run_comparison(
            config, aggregators=aggregators, seeds=seeds, out=args.out, resume=args.resume, workers=workers
        )
    except KeyboardInterrupt:
        print(
            "\ninterrupted: logs are flushed and a checkpoint saved; continue with --resume", file=sys.stderr
        )
        return 130
    except (ValueError, FileExistsError, ModelUnavailableError) as err:
        print(f"lab {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (RunFailed, RunsFailed) as err:  # reliability: one line; each run's status.json says why
        print(f"lab {args.command}: error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # e.g. a full disk while a run dir is set up
        print(f"lab {args.command}: error: {describe_os_error(err)}", file=sys.stderr)
        return 1
    finally:
        _close_distributed()
    print(f"done: {args.out}  (dashboard: lab dashboard --runs-dir {args.out})")
    return 0


def dashboard_command(args: argparse.Namespace) -> list[str]:
    """``streamlit run app.py`` with the lab's settings as flags (they do not depend on the working dir)."""
    app = Path(__file__).resolve().parent.parent / "app.py"
    return [
        sys.executable, "-m", "streamlit", "run", str(app),
        "--server.address", args.host, "--server.port", str(args.port),
        "--server.headless", "true", "--browser.gatherUsageStats", "false",
        "--", "--runs-dir", args.runs_dir,
    ]  # fmt: skip


def network_warning(args: argparse.Namespace, env: dict[str, str] | os._Environ) -> str | None:
    """What serving on ``args.host`` exposes (None on localhost)."""
    from lab.dashboard import launch

    if launch.is_loopback(args.host):
        return None
    lines = [
        f"lab dashboard: WARNING: serving on {args.host or 'every interface'}:{args.port}, beyond this machine, "
        "over plain HTTP. Anyone who can reach the port can read the runs in "
        f"{args.runs_dir} (the runs dir is fixed). A safer way to look from elsewhere: "
        f"ssh -L {args.port}:{LOCALHOST}:{args.port} THIS_HOST, and keep the default --host.",
    ]
    given = env.get(launch.TOKEN_ENV, "")
    if launch.launch_token(env) is not None:
        lines.append(f"The Launch tab asks for {launch.TOKEN_ENV} before it starts anything.")
    else:
        short = f" ({launch.TOKEN_ENV} is shorter than {launch.MIN_TOKEN_LENGTH} characters)" if given else ""
        lines.append(
            f"The Launch tab is disabled{short}. To enable it, set {launch.TOKEN_ENV} to a secret of at least "
            f"{launch.MIN_TOKEN_LENGTH} characters before starting, e.g. "
            f"export {launch.TOKEN_ENV}=$(python -c 'import secrets; print(secrets.token_urlsafe(24))')"
        )
    return "\n".join(lines)


def serve_dashboard(args: argparse.Namespace) -> int:
    """Run the streamlit server in place of this process, so a signal to ``lab dashboard`` reaches it."""
    warning = network_warning(args, os.environ)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    command = dashboard_command(args)
    if os.name == "posix":
        sys.stdout.flush()
        os.execv(command[0], command)  # no child left holding the port after SIGTERM/SIGKILL
    return subprocess.call(command)  # elsewhere: the console delivers Ctrl-C to both


def _close_distributed() -> None:
    """Under torchrun/accelerate, shut the process group down (gloo aborts at exit otherwise)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
