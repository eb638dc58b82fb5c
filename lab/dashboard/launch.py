"""View 6, Launch: start ``lab compare`` as a subprocess (argument list, never a shell), follow it, stop it."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from lab.runlog import list_runs, read_json

LAUNCH_LOG = "launch.log"
# JSON-free override for tests/demos: LAB_LAUNCH_PREFIX="python -m lab.cli" (split with shlex, no shell)
PREFIX_ENV = "LAB_LAUNCH_PREFIX"


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
    """The argument list of ``lab compare`` (``extra`` is split like a shell would, but never run by one)."""
    if not aggregators:
        raise ValueError("choose at least one aggregator")
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps!r}")
    args = [*(prefix if prefix is not None else command_prefix()), "compare", "--out", str(out)]
    args += [
        "--aggregators",
        ",".join(aggregators),
        "--steps",
        str(int(steps)),
        "--seeds",
        str(int(seeds)),
    ]
    if float(alpha) != 1.0:
        args += ["--alpha", f"{float(alpha):g}"]
    if model.strip():
        args += ["--model", model.strip()]
    return args + shlex.split(extra)


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
        """Start the process in its own process group (so Stop reaches its children too)."""
        self.out.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=cwd, env=env, start_new_session=True,
            )  # fmt: skip
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
            status = read_json(run_dir / "status.json") or {}
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
