"""The ``lab`` command line's parser: every option of ``lab train``, ``lab compare`` and ``lab dashboard``.

Its own module so that the CLI (:mod:`lab.cli`) and the dashboard's Launch tab (:mod:`lab.dashboard.launch`,
which validates a form against ``lab compare``'s own parser) both import it, and neither imports the other.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lab.access import LOCALHOST
from lab.aggregators import AGGREGATORS, DEFAULT_AGGREGATORS, parse_names
from lab.auto_alpha import check_alpha_setting
from lab.devices import GENERATION_CHOICES
from lab.models import EMBEDDED_MODEL, PRESETS
from lab.run_config import OPTIMIZERS, RUN_PRESETS
from lab.tasks import TASKS


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port 1..65535, got {text!r}")
    return value


def _aggregator_list(text: str) -> list[str]:
    try:
        return parse_names(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _alpha(text: str) -> float | str:
    try:
        return check_alpha_setting(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


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
    p.add_argument("--alpha", type=_alpha, default=1.0,
                   help="ΔL exponent α >= 0 (default 1.0), or 'auto': α from the measured Var(g_i) ∝ L_i^k "
                   "(lab.auto_alpha; turns on probes, every 2 steps unless --probe-every says otherwise)")  # fmt: skip
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
    p.add_argument("--out", required=True, type=Path, help="output directory")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lab", description="ΔL Lab: compare loss aggregators for RLVR.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train one aggregator (× --seeds) into --out/<run_id>/")
    train.add_argument("--aggregator", default="delta_l", choices=list(AGGREGATORS))
    _add_run_options(train)
    compare = sub.add_parser(
        "compare", help="train several aggregators on identical prompts/seeds into --out"
    )
    compare.add_argument(
        "--aggregators",
        type=_aggregator_list,
        default=list(DEFAULT_AGGREGATORS),
        help=f"comma list of {','.join(AGGREGATORS)} (default {','.join(DEFAULT_AGGREGATORS)})",
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
