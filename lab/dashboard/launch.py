"""View 6, Launch: start ``lab compare`` as a subprocess (argument list, never a shell), follow it, stop it.

Everything the form sends is validated here before anything is created or started: the comparison name is
one folder name inside the runs dir, the numbers are within bounds, the model is a preset or a local folder,
and the extra arguments are parsed by ``lab compare``'s own parser and may not set an option the form sets.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from lab import rundir
from lab.access import MIN_TOKEN_LENGTH, TOKEN_ENV, is_loopback, launch_token, token_matches  # noqa: F401 (re-exported)
from lab.aggregators import AGGREGATORS
from lab.options import build_parser
from lab.runlog import STATUS, list_runs, read_json

LAUNCH_LOG = "launch.log"
# JSON-free override for tests/demos: LAB_LAUNCH_PREFIX="python -m lab.cli" (split with shlex, no shell)
PREFIX_ENV = "LAB_LAUNCH_PREFIX"
# Serving on the network: the Launch tab stays disabled unless this token is set (and typed in the tab)
MAX_STEPS = 100_000
MAX_SEEDS = 50
MAX_ALPHA = 4.0
MAX_NAME_LENGTH = 100
#: Bounds of the numbers the extra arguments may set (the form's own fields have theirs above): a run the
#: Launch tab starts stays the size of a lab run.
EXTRA_BOUNDS: dict[str, tuple[float, float]] = {
    "prompts_per_step": (1, 1024), "num_generations": (2, 64), "micro_batch_size": (1, 4096),
    "max_completion_length": (1, 32_768), "eval_prompts": (0, 10_000), "eval_k": (1, 64),
    "eval_every": (0, MAX_STEPS), "probe_every": (0, MAX_STEPS), "compare_gradients_every": (0, MAX_STEPS),
    "save_every": (1, MAX_STEPS), "workers": (1, os.cpu_count() or 1), "threads": (1, os.cpu_count() or 1),
    "lora_r": (1, 1024), "seed": (0, 2**32 - 1), "temperature": (1e-3, 10.0), "learning_rate": (1e-9, 1.0),
    "max_grad_norm": (0.0, 1e6),
}  # fmt: skip
# one folder name: starts with a letter or digit, then letters, digits, '-', '_', '.'
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_UNSET = object()


# -------------------------------------------------------------------------------------------------------
# where the dashboard listens, the launch token
# -------------------------------------------------------------------------------------------------------
# -------------------------------------------------------------------------------------------------------
# validation of the form
# -------------------------------------------------------------------------------------------------------
def comparison_dir(runs_dir: str | Path, name: str) -> Path:
    """``runs_dir/name`` for a comparison ``name`` that is one plain folder name, else ValueError."""
    name = name.strip()
    if not name:
        raise ValueError("the comparison name is empty: give a folder name such as compare-1")
    if len(name) > MAX_NAME_LENGTH or not _NAME_RE.fullmatch(name) or ".." in name:
        raise ValueError(
            f"comparison name {name!r} is not a plain folder name: use letters, digits, '-', '_' and '.', "
            f"start with a letter or digit, at most {MAX_NAME_LENGTH} characters, no '/' and no '..'"
        )
    root = Path(runs_dir)
    out = root / name
    if not out.resolve().is_relative_to(root.resolve()):  # e.g. an existing symlink pointing elsewhere
        raise ValueError(f"{out} leads outside the runs dir {root}")
    return out


def check_model(model: str) -> str:
    """A preset name or an existing local folder (the lab runs offline), else ValueError with the presets."""
    from lab import models  # at call time: the preset list may grow

    model = model.strip()
    if model in models.PRESETS or (model and Path(model).expanduser().is_dir()):
        return model
    raise ValueError(
        f"unknown model {model!r}: choose a preset ({', '.join(models.PRESETS)}) or an existing local folder"
    )


def _check_bounds(label: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ValueError(f"{label} must be between {low:g} and {high:g}, got {value:g}")


def _compare_parser() -> argparse.ArgumentParser:
    """``lab compare``'s own parser, raising ValueError instead of exiting and requiring nothing."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    compare = sub.choices["compare"]

    def fail(message: str) -> None:
        raise ValueError(message)

    def leave(status: int = 0, message: str | None = None) -> None:
        raise ValueError(message or "--help is not an argument to launch with")

    compare.error, compare.exit = fail, leave  # type: ignore[method-assign]
    compare.print_help = lambda file=None: None  # type: ignore[method-assign]  # -h: refused, not printed
    for action in compare._actions:
        action.required = False  # --out comes from the form
    return compare


def _parse(tokens: Sequence[str]) -> argparse.Namespace:
    """Parse ``tokens`` as ``lab compare`` arguments; every dest not given stays ``_UNSET``."""
    parser = _compare_parser()
    namespace = argparse.Namespace(**{a.dest: _UNSET for a in parser._actions if a.dest != argparse.SUPPRESS})
    return parser.parse_args(list(tokens), namespace=namespace)


def dests_set(tokens: Sequence[str]) -> dict[str, object]:
    """The options ``tokens`` set, by argparse dest (so ``--out=x``, ``--ou x`` and ``--out x`` are one)."""
    return {k: v for k, v in vars(_parse(tokens)).items() if v is not _UNSET}


def option_names(dests: Sequence[str]) -> list[str]:
    """The long option name of each dest (``out`` → ``--out``) for messages."""
    by_dest = {a.dest: a.option_strings[-1] for a in _compare_parser()._actions if a.option_strings}
    return [by_dest.get(d, d) for d in dests]


def split_extra(extra: str, form_args: Sequence[str], reserved: Sequence[str] = ()) -> list[str]:
    """``extra`` split like a shell would (never run by one), checked by ``lab compare``'s parser.

    It may not set an option the form sets (``--out`` included: argparse keeps the last one given), nor one
    of the ``reserved`` dests (a form field left empty on purpose, e.g. the model).
    """
    try:
        tokens = shlex.split(extra)
    except ValueError as err:
        raise ValueError(f"extra arguments {extra!r}: {err}") from None
    try:
        taken = sorted((dests_set(form_args).keys() | set(reserved)) & dests_set(tokens).keys())
    except ValueError as err:
        raise ValueError(f"extra arguments {extra!r}: {err}") from None
    if taken:
        names = ", ".join(option_names(taken))
        it = "it" if len(taken) == 1 else "them"
        raise ValueError(f"extra arguments may not set {names}: the form sets {it} (use the form's fields)")
    return tokens


def command_prefix() -> list[str]:
    """``[python, -m, lab.cli]``, or the ``LAB_LAUNCH_PREFIX`` override."""
    override = os.environ.get(PREFIX_ENV)
    return shlex.split(override) if override else [sys.executable, "-m", "lab.cli"]


def build_compare_args(
    out: str | Path,
    aggregators: Sequence[str],
    *,
    steps: int,
    seeds: int,
    model: str = "",
    alpha: float = 1.0,
    extra: str = "",
    prefix: Sequence[str] | None = None,
) -> list[str]:
    """The checked argument list of ``lab compare`` (``model`` empty: the default preset's model).

    The form passes every option it shows (the model only when one is given), and none of them can be set
    again in ``extra``.
    """
    if not aggregators:
        raise ValueError("choose at least one aggregator")
    unknown = [a for a in aggregators if a not in AGGREGATORS]
    if unknown:
        raise ValueError(f"unknown aggregator(s) {unknown}; choose from {', '.join(AGGREGATORS)}")
    _check_bounds("steps", int(steps), 1, MAX_STEPS)
    _check_bounds("seeds per aggregator", int(seeds), 1, MAX_SEEDS)
    _check_bounds("ΔL α", float(alpha), 0.0, MAX_ALPHA)
    form = ["--out", str(out), "--aggregators", ",".join(aggregators), "--steps", str(int(steps)),
            "--seeds", str(int(seeds)), "--alpha", f"{float(alpha):g}"]  # fmt: skip
    if model.strip():
        form += ["--model", check_model(model.strip())]
    tokens = split_extra(extra, form, reserved=("model",))
    check_extra_bounds(tokens)
    return [*(prefix if prefix is not None else command_prefix()), "compare", *form, *tokens]


def check_extra_bounds(tokens: Sequence[str]) -> None:
    """ValueError naming the first extra argument outside :data:`EXTRA_BOUNDS`."""
    values = dests_set(tokens)
    for dest, (low, high) in EXTRA_BOUNDS.items():
        value = values.get(dest)
        if value is not None:
            _check_bounds(option_names([dest])[0], float(value), low, high)


@dataclass
class LaunchPlan:
    """A checked launch: the argument list and the comparison folder it writes (not created yet)."""

    args: list[str]
    out: Path


def plan_launch(runs_dir: str | Path, name: str, aggregators: Sequence[str], **options) -> LaunchPlan:
    """Check the whole form (see :func:`build_compare_args` for ``options``); ValueError names what is wrong.

    A folder that already holds files is refused unless the extra arguments say ``--resume``.
    """
    out = comparison_dir(runs_dir, name)
    args = build_compare_args(out, aggregators, **options)
    busy = rundir.busy_runs(out)  # reliability: a comparison another process is writing
    if busy:
        raise ValueError(busy[0])
    resume = dests_set(shlex.split(options.get("extra", ""))).get("resume") is True
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not resume:
        raise ValueError(
            f"{out} already exists: choose another comparison name, or add --resume to continue it"
        )
    return LaunchPlan(args, out)


@dataclass
class Launch:
    """A running (or finished) comparison subprocess; its output goes to ``<out>/launch.log``."""

    args: list[str]
    out: Path
    process: subprocess.Popen | None = None
    started: float = field(default_factory=time.time)

    @property
    def log_path(self) -> Path:
        return self.out / LAUNCH_LOG

    def start(self, cwd: str | Path | None = None) -> Launch:
        """Start the process in its own process group (so Stop reaches its children too).

        A start that fails (e.g. the command is missing) removes the log and the folders it created.
        """
        created = [p for p in (self.out, *self.out.parents) if not p.exists()]
        self.out.mkdir(parents=True, exist_ok=True)
        had_log = self.log_path.exists()
        env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}  # the child needs no token
        env["PYTHONUNBUFFERED"] = "1"
        try:
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(
                    self.args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    cwd=cwd, env=env, start_new_session=True,
                )  # fmt: skip
        except OSError:
            if not had_log:
                self.log_path.unlink(missing_ok=True)
            for folder in created:  # deepest first
                folder.rmdir()
            raise
        return self

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the process group (the trainer saves and marks runs interrupted), SIGKILL after ``timeout``."""
        if not self.running:
            return self.returncode
        assert self.process is not None
        self._signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            return self.process.wait(5)

    def _signal(self, sig: int) -> None:
        assert self.process is not None
        try:
            os.killpg(self.process.pid, sig)  # its own group: only this launch and its children
        except (ProcessLookupError, PermissionError):
            self.process.send_signal(sig)

    def tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of the output."""
        try:
            data = self.log_path.read_bytes()[-20_000:]
        except FileNotFoundError:
            return ""
        return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


def progress_table(out: str | Path) -> pd.DataFrame:
    """One row per run dir under ``out``: state, step, max steps, fraction done."""
    rows = []
    for comparison, run_dirs in list_runs(out).items():
        for run_dir in run_dirs:
            status = read_json(run_dir / STATUS) or {}
            step, total = status.get("step") or 0, status.get("max_steps") or 0
            rows.append(
                {
                    "run": run_dir.name if comparison == "." else f"{comparison}/{run_dir.name}",
                    "state": status.get("state", "starting"),
                    "step": step,
                    "max_steps": total,
                    "progress": min(1.0, step / total) if total else 0.0,
                }
            )
    return pd.DataFrame(rows, columns=["run", "state", "step", "max_steps", "progress"])
