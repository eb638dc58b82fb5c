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

from lab import access
from lab.access import LOCALHOST
from lab.options import build_parser, run_option_values


def config_from_args(args: argparse.Namespace, aggregator: str):
    """The RunConfig of ``args`` (each option is a RunConfig field, lab.options): what is not given keeps its default."""
    from lab.run_config import RunConfig

    if args.vllm_gpu_memory_utilization is not None and not args.vllm:
        raise ValueError("--vllm-gpu-memory-utilization applies only with --vllm")
    return RunConfig(aggregator=aggregator, **run_option_values(args))


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
        from lab.aggregators import split_label

        # the comparison's base config: a label such as delta_l-aauto names the aggregator and its own α
        config = config_from_args(args, split_label(aggregators[0])[0])
        defaults = run_defaults(config)
        seeds = list(range(config.seed, config.seed + (args.seeds or defaults["seeds"])))
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
        "--server.headless", "true", "--browser.gatherUsageStats", "false", "--client.toolbarMode", "viewer",
        "--", "--runs-dir", args.runs_dir,
    ]  # fmt: skip


def network_warning(args: argparse.Namespace, env: dict[str, str] | os._Environ) -> str | None:
    """What serving on ``args.host`` exposes (None on localhost)."""
    if access.is_loopback(args.host):
        return None
    lines = [
        f"lab dashboard: WARNING: serving on {args.host or 'every interface'}:{args.port}, beyond this machine, "
        "over plain HTTP. Anyone who can reach the port can read the runs in "
        f"{args.runs_dir} (the runs dir is fixed). A safer way to look from elsewhere: "
        f"ssh -L {args.port}:{LOCALHOST}:{args.port} THIS_HOST, and keep the default --host.",
    ]
    given = env.get(access.TOKEN_ENV, "")
    if access.launch_token(env) is not None:
        lines.append(f"The Launch tab asks for {access.TOKEN_ENV} before it starts anything.")
    else:
        short = f" ({access.TOKEN_ENV} is shorter than {access.MIN_TOKEN_LENGTH} characters)" if given else ""
        lines.append(
            f"The Launch tab is disabled{short}. To enable it, set {access.TOKEN_ENV} to a secret of at least "
            f"{access.MIN_TOKEN_LENGTH} characters before starting, e.g. "
            f"export {access.TOKEN_ENV}=$(python -c 'import secrets; print(secrets.token_urlsafe(24))')"
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
