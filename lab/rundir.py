"""Guards of a run dir's writer: one writer at a time, a run's config as its identity, a checkpoint to resume
from that is intact, OS errors in one line, and the settings checked before any dir is made.

The outcomes are listed in docs/reliability.md. Readers of a run dir (the dashboard's views,
:mod:`lab.verdict`) never lock; ``lab compare`` and the Launch tab only probe the lock (:func:`is_locked`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import struct
import time
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab.runlog import CONFIG, METRICS, STATUS, open_regular, read_json

LOCK = ".lock"
LOCK_ATTEMPTS = 5  # 0.1 s in all
CHECKPOINTS = "checkpoints"
#: RunConfig fields that do not change what is trained or logged, so a resume may give them anew: CPU threads,
#: completion texts kept or not, TRL's reporting, checkpoint spacing, the comparison's folder name, vLLM's
#: memory fraction. Every other field is the run's identity.
HARMLESS_FIELDS = frozenset(
    {"threads", "log_texts", "report_to", "save_every", "comparison", "vllm_gpu_memory_utilization"}
)
MAX_SEED = 2**32 - 1  # numpy's seed range; transformers' set_seed seeds numpy with it


class RunDirError(ValueError):
    """A run dir that this run may not write (the CLI prints it as one line and exits 2)."""


class RunDirBusy(RunDirError):
    """Another live process holds the run dir's lock."""


class RunFailed(RuntimeError):
    """A run stopped by an OS error (disk full, read-only): one line for the user; status.json says it too."""


class RunsFailed(RuntimeError):
    """Runs of a comparison that did not finish (the verdict of those that did is written)."""

    def __init__(self, failures: list[str]):
        self.failures = failures
        super().__init__(f"{len(failures)} run(s) did not finish: " + "; ".join(failures))


def is_main_rank() -> bool:
    """Rank 0 of a torchrun/accelerate launch (they set ``RANK``), or a plain single process."""
    return os.environ.get("RANK", "0") == "0"


def check_before_writing(run_dir: Path, requested: Mapping[str, Any], *, resume: bool) -> None:
    """Refuse (RunDirError), before anything is written, a run dir another process writes, or one whose
    stored run trains something else than ``requested`` (a resume, or a finished run to be skipped).

    Under torchrun/accelerate only rank 0 writes (and locks), so only rank 0 probes the lock: another rank
    would find its own run's lock held.
    """
    if is_main_rank() and is_locked(run_dir):
        raise RunDirBusy(busy_message(run_dir))
    if resume and run_dir.is_dir():
        check_same_config(run_dir, requested)
        if (read_json(run_dir / STATUS) or {}).get("state") != "finished":
            choose_checkpoint(run_dir)  # no intact checkpoint for logged steps: refused now, not mid-way


# -------------------------------------------------------------------------------------------------------
# one writer per run dir
# -------------------------------------------------------------------------------------------------------
@dataclass
class RunLock:
    """An exclusive ``flock`` on ``<run_dir>/.lock``, held while the file descriptor is open.

    The OS drops it when the holder dies (kill -9 included), so a stale lock cannot exist; the file itself
    stays and holds the last holder's PID for the message.
    """

    path: Path
    fd: int

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = -1


def holder_pid(run_dir: Path) -> int | None:
    """The PID written into the lock file by its last holder (None if missing or unreadable)."""
    try:
        fd = open_regular(Path(run_dir) / LOCK)  # never blocks on a FIFO planted there
    except OSError:
        return None
    try:
        return int(os.read(fd, 32).decode("ascii", "replace").strip())
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


def acquire_lock(run_dir: str | Path) -> RunLock:
    """Lock ``run_dir`` (which must exist) for this process, or RunDirBusy naming the dir and the holder."""
    path = Path(run_dir) / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise RunDirError(f"{path} is not a regular file: remove it to write this run dir")
    for attempt in range(LOCK_ATTEMPTS):  # a busy probe (is_locked) holds it for microseconds: try again
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if attempt == LOCK_ATTEMPTS - 1:
                os.close(fd)
                raise RunDirBusy(busy_message(Path(run_dir))) from None
            time.sleep(0.02)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return RunLock(path, fd)


def busy_message(run_dir: Path) -> str:
    pid = holder_pid(run_dir)
    who = f"process {pid}" if pid is not None else "another process"
    return f"{run_dir} is being written by {who} (its lock {LOCK} is held); wait for it or stop it first"


def is_locked(run_dir: str | Path) -> bool:
    """Whether a live process holds ``run_dir``'s lock (creates nothing). The probe takes the lock for an
    instant if it is free; a writer starting in that instant retries (:data:`LOCK_ATTEMPTS`)."""
    path = Path(run_dir) / LOCK
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases the probe's lock, if it got it
    return False


def busy_runs(out: str | Path) -> list[str]:
    """One message per run dir directly under ``out`` (or ``out`` itself) that a live process writes."""
    out = Path(out)
    if not out.is_dir():
        return []
    dirs = [out, *sorted(p for p in out.iterdir() if p.is_dir() and not p.is_symlink())]
    return [busy_message(d) for d in dirs if is_locked(d)]


def remove_created(created: list[Path]) -> None:
    """Remove the run dir a failed start made (its files included) and the then-empty parents it made."""
    import shutil

    if created:
        shutil.rmtree(created[0], ignore_errors=True)
    for folder in created[1:]:
        try:
            folder.rmdir()
        except OSError:
            break  # not empty: something else lives there now


# -------------------------------------------------------------------------------------------------------
# a run's config is its identity
# -------------------------------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    """JSON's view of a value (tuples become lists), as config.json stores it."""
    return json.loads(json.dumps(value, default=str))


def config_differences(stored: Mapping[str, Any], requested: Mapping[str, Any]) -> list[str]:
    """``"name: stored → requested"`` for every field that differs and changes training."""
    out = []
    for name in sorted(set(stored) | set(requested)):
        if name in HARMLESS_FIELDS:
            continue
        old, new = _plain(stored.get(name)), _plain(requested.get(name))
        if old != new:
            out.append(f"{name}: {old!r} → {new!r}")
    return out


def check_same_config(run_dir: Path, requested: Mapping[str, Any]) -> None:
    """RunDirError unless ``run_dir``'s stored config (config.json ``run``) trains what ``requested`` does.

    Called before a finished run is skipped or an interrupted one resumed. A run dir without a readable
    config.json but with logged steps is refused too: nothing says what those steps trained.
    """
    stored = read_json(run_dir / CONFIG)
    if stored is None or not isinstance(stored.get("run"), dict):
        if (run_dir / METRICS).exists():
            raise RunDirError(
                f"{run_dir / CONFIG} is missing or unreadable, so the logged steps cannot be matched to "
                "these settings; move the run dir away to start over"
            )
        return
    diffs = config_differences(stored["run"], requested)
    if diffs:
        raise RunDirError(
            f"{run_dir} holds a run with other settings ({'; '.join(diffs)}); give the same settings to "
            "resume it, or choose another --out"
        )


# -------------------------------------------------------------------------------------------------------
# a checkpoint to resume from
# -------------------------------------------------------------------------------------------------------
def checkpoint_step(path: Path) -> int | None:
    try:
        return int(path.name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return None


def broken_file(checkpoint: Path) -> str | None:
    """Why ``checkpoint`` cannot be resumed from (naming the file), or None if it looks intact.

    Checks what a truncated or garbled save breaks, without loading tensors: trainer_state.json is a JSON
    object whose ``global_step`` is the folder's step; a model file exists; every safetensors file is as long
    as its header says; every torch file (``.pt``, ``.pth``, ``.bin``) is a complete zip archive.
    """
    state_path = checkpoint / "trainer_state.json"
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:
        return f"{state_path}: not readable JSON ({type(err).__name__})"
    if not isinstance(state, dict) or state.get("global_step") != checkpoint_step(checkpoint):
        return f"{state_path}: no global_step {checkpoint_step(checkpoint)}"
    models = [p for p in checkpoint.iterdir() if p.name.endswith((".safetensors", "pytorch_model.bin"))]
    if not models:
        return f"{checkpoint}: no model weights (*.safetensors)"
    for path in sorted(checkpoint.iterdir()):
        problem = None
        if path.suffix == ".safetensors":
            problem = _safetensors_problem(path)
        elif path.suffix in (".pt", ".pth", ".bin"):
            problem = _zip_problem(path)
        if problem:
            return f"{path}: {problem}"
    return None


def _safetensors_problem(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > 100_000_000:
                return "header length is not plausible"
            header = json.loads(f.read(header_len))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    except (OSError, struct.error, ValueError, KeyError, TypeError, IndexError) as err:
        return f"unreadable header ({type(err).__name__})"
    if path.stat().st_size < 8 + header_len + max(ends, default=0):
        return "truncated (shorter than its header says)"
    return None


def _zip_problem(path: Path) -> str | None:
    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.header_offset + info.compress_size > size:
                    return "truncated"
    except (OSError, zipfile.BadZipFile, ValueError) as err:
        return f"not a complete torch file ({type(err).__name__})"
    return None


@dataclass
class ResumePoint:
    """Where a resume starts: ``checkpoint`` (None: from step 0) and what was skipped on the way."""

    checkpoint: Path | None
    skipped: list[str]

    @property
    def step(self) -> int:
        return 0 if self.checkpoint is None else checkpoint_step(self.checkpoint) or 0


def choose_checkpoint(run_dir: Path) -> ResumePoint:
    """The newest intact checkpoint of ``run_dir``; broken newer ones are named in ``skipped``.

    RunDirError when steps were logged but no checkpoint is intact: a restart from step 0 would replace
    the logged steps, so it is refused rather than done in silence.
    """
    folder = run_dir / CHECKPOINTS
    candidates = sorted(
        (p for p in folder.glob("checkpoint-*") if p.is_dir() and checkpoint_step(p) is not None),
        key=checkpoint_step,
        reverse=True,
    )
    skipped = []
    for checkpoint in candidates:
        problem = broken_file(checkpoint)
        if problem is None:
            return ResumePoint(checkpoint, skipped)
        skipped.append(problem)
    logged = read_json(run_dir / STATUS) or {}
    if (run_dir / METRICS).exists() and (run_dir / METRICS).stat().st_size > 0:
        found = f"; broken: {'; '.join(skipped)}" if skipped else ""
        raise RunDirError(
            f"{run_dir}: nothing to resume from: no intact checkpoint in {CHECKPOINTS}/{found} (the run logged "
            f"up to step {logged.get('step', '?')}; checkpoints are saved every --save-every steps). Move the "
            "run dir away to start over"
        )
    return ResumePoint(None, skipped)


# -------------------------------------------------------------------------------------------------------
# OS errors in one line
# -------------------------------------------------------------------------------------------------------
def record_failure(writer: Any, err: BaseException, step: int, max_steps: int, created: list[Path]) -> None:
    """Mark a run failed with a readable reason; a run that failed before its first step and made its dir
    leaves no dir behind. Never raises: the caller raises ``err`` (a full disk may refuse the status too)."""
    reason = describe_os_error(err) if isinstance(err, OSError) else f"{type(err).__name__}: {err}"
    if step == 0 and created:
        remove_created(created)
        return
    try:
        writer.set_status("failed", step, max_steps, error=reason)
    except OSError:
        pass


def mark_killed(run_dir: Path, reason: str) -> None:
    """Mark the run of a worker that died under it as failed (the worker could not), if it got started."""
    from lab.runlog import RunWriter

    status = read_json(run_dir / STATUS)
    if status is None or status.get("state") != "running":
        return
    step, total = status.get("step"), status.get("max_steps")
    RunWriter(run_dir).set_status(
        "failed", step if isinstance(step, int) else 0, total if isinstance(total, int) else 0, error=reason
    )


def describe_os_error(err: OSError) -> str:
    """One line for an OS error of a run: what it means for the user, and the path."""
    where = f" ({err.filename})" if err.filename else ""
    if err.errno == errno.ENOSPC:
        return f"no space left on the device{where}: free some space, then continue with --resume"
    if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write{where}: {os.strerror(err.errno)}; choose a writable --out"
    return f"{type(err).__name__}: {err}"


# -------------------------------------------------------------------------------------------------------
# settings checked before any dir is made
# -------------------------------------------------------------------------------------------------------
def check_out(out: str | Path) -> None:
    """ValueError unless ``out`` can hold run dirs: not an empty string (``Path("")`` would mean the current
    folder), and its nearest existing folder writable."""
    if not str(out).strip():
        raise ValueError("--out is empty: give the folder to write the runs into, e.g. --out runs/mine")
    out = Path(out)
    existing = next((p for p in (out, *out.parents) if p.exists()), Path("."))
    if existing.is_dir() and not _writable(existing):
        raise ValueError(f"--out {out}: {existing} is not writable (read-only or no permission)")


def _writable(folder: Path) -> bool:
    """Whether a file can be created in ``folder`` (tried, since root passes every os.access check)."""
    probe = folder / f".lab-write-probe.{os.getpid()}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return True
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


def check_seed(seed: Any) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be an integer in 0..{MAX_SEED}, got {seed!r}")


def check_report_to(report_to: list[str]) -> None:
    """ValueError naming an integration transformers does not know (``none`` and ``all`` are fine)."""
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    known = {"none", "all", *INTEGRATION_TO_CALLBACK}
    bad = [name for name in report_to if name not in known]
    if bad:
        raise ValueError(
            f"--report-to: unknown integration(s) {bad}; expected some of {', '.join(sorted(known))}"
        )
