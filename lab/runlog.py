"""Run logs: the one contract between training (writer) and the dashboard / notebooks (readers).

A comparison is a folder of run dirs, ``runs/<comparison>/<run_id>/`` with ``run_id = <label>-s<seed>``
(label = the aggregator, ``delta_l-a0.75`` for ΔL with α ≠ 1). Each run dir holds:

``config.json``
    Everything needed to reproduce the run: the CLI arguments (aggregator, alpha, task, model, steps,
    seed, sampling settings, ...), plus ``run_id``, ``comparison``, ``label``, versions and start time.
``status.json``
    ``{"state": "running"|"finished"|"interrupted"|"failed", "step": int, "max_steps": int,
    "updated": unix_time, "error": str|null}``. Readers stop polling when the state is not "running".
``metrics.jsonl``
    One JSON object per optimizer step: ``step`` (int, 1-based), ``wall_time`` (unix s), ``step_time`` (s),
    ``tokens_per_second``; TRL's own metric names (``loss``, ``grad_norm``, ``reward``, ``reward_std``,
    ``frac_reward_zero_std``, ``entropy``, ``clip_ratio/region_mean``, ``kl``, ``completions/mean_length``,
    ``completions/max_length``, ``completions/clipped_ratio``, ``rewards/<func>/mean``, ``delta_l/*``, ...);
    and ``cv/<method>`` for each of grpo, dapo, dr_grpo, delta_l: the theoretical gradient CV
    (:func:`lab.aggregation.estimator_stats`) that aggregator would have had on this step's lengths, so
    every run carries the counterfactual comparison. Probe steps add ``probe/*`` keys.
``samples.jsonl``
    One object per generation batch: ``step`` and parallel lists, one entry per completion:
    ``lengths``, ``rewards``, ``advantages``, ``weights`` (the ΔL row weight w_i the loss used; 1.0 for
    other aggregators), ``truncated`` (bool), ``group`` (prompt index in the batch); optionally ``texts``.
``eval.jsonl``
    One object per evaluation: ``step``, ``k``, ``avg_at_k``, ``pass_at_k``, ``n_prompts``, ``mean_length``,
    ``heldout_reward`` and its sampling error ``heldout_reward_se`` (also in that step's ``metrics.jsonl``
    line as ``eval/heldout_reward`` and ``eval/heldout_reward_se``: the fast presets evaluate after the last
    step by default).
``probes.jsonl``
    One object per gradient probe: ``step``, ``lengths``, ``grad_variances`` (per-sample unbiased
    estimates of tr Var(g_i), ``lab.probes.grad_variances``; null where not estimable), ``slope``,
    ``intercept``, ``correlation``, ``exponent`` (Var(g_i) against L_i), ``cv`` ({method: measured CV}).
``checkpoints/``
    Trainer checkpoints (``checkpoint-<step>``) for ``--resume``.
``.lock``
    Held (``flock``) by the one process that writes the run; holds its PID (:mod:`lab.rundir`). Readers
    never touch it.

Beside the run dirs, a comparison dir holds ``verdict.json`` (written by ``lab compare`` when it ends,
:mod:`lab.verdict`): ``{"seeds": S, "pairs": [{"a", "b", "metric": "final_reward"|"auc"|"eval_avg_at_k"|
"eval/<name>", "mean_diff", "ci": [lo, hi], "ci_t": [lo, hi], "ci_t_family": [lo, hi], "p_value", "p_holm",
"distinguishable": bool (after the Holm correction), "excludes_0_uncorrected": bool, "sd_diff", "mde",
"mde_level", "n_seeds", "diffs"}, ...], "labels": {...}, "metrics", "left_out_metrics", "alpha", "power",
"n_tests", "method", "note", "warnings", "created", "wall_seconds", "workers"}``. Read it with
:func:`read_verdict`.

During training, ``lab.runner.RunLogCallback`` (a transformers ``TrainerCallback``) writes these files
through :class:`RunWriter`; this module itself imports no training code, so readers stay light.
Writers append whole lines and flush after each; a crash leaves at most one partial last line, which
:func:`read_jsonl` skips until it is complete. On resume, :func:`truncate_after` drops lines past the
checkpoint step so that no step is logged twice.

Readers are bounded and never trust a file (docs/reliability.md): they open regular files only (a FIFO, a
device or a directory in a log file's place is refused with a warning, and never blocks), refuse a path
that leads out of the run dir (a symlink), read at most :data:`MAX_LOG_BYTES` of a log file and
:data:`MAX_JSON_BYTES` of a JSON file, skip lines longer than :data:`MAX_LINE_BYTES`, and skip (and count)
lines that are not a JSON object, nest deeper than Python can parse, hold an integer of more than
:data:`MAX_INT_DIGITS` digits or a non-finite number, or carry a ``step`` that is not an integer in
0..:data:`MAX_STEP`. A log file that was replaced or cut (a resume) is read again from its start.
"""

from __future__ import annotations

import json
import math
import os
import stat
import time
import zlib
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The held-out evaluation's metric in ``metrics.jsonl`` (written by lab.runner on the steps that evaluate, with
#: its sampling standard error in ``<name>_se``; read by lab.verdict as an outcome).
HELDOUT_METRIC = "eval/heldout_reward"

CONFIG = "config.json"
STATUS = "status.json"
METRICS = "metrics.jsonl"
SAMPLES = "samples.jsonl"
EVAL = "eval.jsonl"
PROBES = "probes.jsonl"
LOG_FILES = (METRICS, SAMPLES, EVAL, PROBES)
VERDICT = "verdict.json"
RUN_STATES = ("running", "finished", "interrupted", "failed")
# bounds of the readers (a run of 200,000 logged steps is ~300 MB of metrics.jsonl at ~1.5 kB a line)
MAX_LOG_BYTES = 512 * 2**20  # per log file; lines past it are not read (and a warning says so)
MAX_LINE_BYTES = 16 * 2**20  # a longer line is skipped (a samples line with texts is ~100 kB)
MAX_JSON_BYTES = 4 * 2**20  # config.json, status.json, verdict.json
MAX_INT_DIGITS = 18  # an integer beyond int64 is not a value the lab writes
MAX_STEP = 10**9
TAIL_CHECK_BYTES = 4096  # bytes before the read offset compared at each incremental read


def _json_safe(value: Any) -> Any:
    """NaN/inf are not JSON: write them as null so every reader (browsers included) can parse the line."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return _json_safe(value.item())  # torch / numpy scalars
    if hasattr(value, "tolist"):
        return _json_safe(value.tolist())
    return value


def append_jsonl(path: str | Path, record: Mapping[str, Any]) -> None:
    """Append one record as a whole line and flush it to disk."""
    line = json.dumps(_json_safe(record), separators=(",", ":"), allow_nan=False) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


class Refused(OSError):
    """A path a reader will not open: not a regular file, or leading out of its root."""


def open_regular(path: str | Path, root: str | Path | None = None) -> int:
    """A read-only descriptor of ``path`` if it is a regular file inside ``root`` (when given).

    Opened non-blocking, so a FIFO never hangs the reader before it is refused. Raises FileNotFoundError
    for a missing file and :class:`Refused` (naming the reason) for anything else that is not read.
    """
    path = Path(path)
    if root is not None and not path.resolve().is_relative_to(Path(root).resolve()):
        raise Refused(f"{path.name} leads outside {root} (a symlink): not read")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a special file"
        raise Refused(f"{path.name} is {kind}, not a regular file: not read")
    return fd


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text)} digits")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("a non-finite number")
    return value


def _no_constant(text: str) -> None:
    raise ValueError(f"{text} is not JSON")


def parse_record(raw: bytes | str) -> tuple[dict | None, str | None]:
    """``(record, None)`` for a line holding a JSON object within the readers' bounds, else ``(None, why)``."""
    try:  # the number hooks cost ~1.5x json's plain C parse (a regex pre-filter cost more than that)
        value = json.loads(
            raw, parse_int=_bounded_int, parse_float=_finite_float, parse_constant=_no_constant
        )
    except RecursionError:
        return None, "nested too deep"
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        return None, "not JSON" if isinstance(err, json.JSONDecodeError) else str(err).split(":")[0][:60]
    if not isinstance(value, dict):
        return None, "not a JSON object"
    step = value.get("step")
    if "step" in value:
        if isinstance(step, float) and step.is_integer():
            value["step"] = step = int(step)
        if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= MAX_STEP:
            return None, "a step that is not an integer in range"
    return value, None


@dataclass
class LogRead:
    """What one bounded read of a log file found (see :func:`read_log`)."""

    records: list[dict]
    offset: int
    identity: tuple[int, int, int] | None = None  # (device, inode, CRC of the bytes before offset)
    skipped: int = 0  # complete lines that were not a record within bounds
    reasons: Counter = field(default_factory=Counter)
    warning: str | None = None  # why the file (or its tail) was not read
    reset: bool = False  # the file was replaced or cut since ``offset``: these records start at byte 0


def read_log(
    path: str | Path,
    offset: int = 0,
    *,
    identity: tuple[int, int, int] | None = None,
    root: str | Path | None = None,
) -> LogRead:
    """The complete lines of ``path`` from byte ``offset``, within the readers' bounds (module docstring).

    ``identity`` is what the previous read returned: (device, inode, CRC of the :data:`TAIL_CHECK_BYTES`
    before ``offset``). If the file is another one now (a resume replaced it), is shorter than ``offset``, or
    its bytes before ``offset`` changed (cut in place and written again), it is read from the start and
    ``reset`` is True.
    """
    path = Path(path)
    try:
        fd = open_regular(path, root)
    except FileNotFoundError:
        return LogRead([], 0 if identity else offset, reset=identity is not None)
    except OSError as err:
        return LogRead([], offset, warning=str(err) if isinstance(err, Refused) else f"{path.name}: {err}")
    try:
        info = os.fstat(fd)
        reset = info.st_size < offset or (
            identity is not None
            and (identity[:2] != (info.st_dev, info.st_ino) or identity[2] != _tail_crc(fd, offset))
        )
        start = 0 if reset else offset
        data = b""
        if start < MAX_LOG_BYTES:
            os.lseek(fd, start, os.SEEK_SET)
            data = _read_up_to(fd, min(info.st_size, MAX_LOG_BYTES) - start)
        end = data.rfind(b"\n")
        endless = len(data) - (end + 1) > MAX_LINE_BYTES  # an endless partial last line: step over it
        new_offset = start + (len(data) if endless else end + 1)
        result = LogRead([], new_offset, (info.st_dev, info.st_ino, _tail_crc(fd, new_offset)), reset=reset)
    finally:
        os.close(fd)
    if start + len(data) >= MAX_LOG_BYTES:
        result.warning = _cap_warning(path)
    if endless:
        result.skipped = 1
        result.reasons["longer than MAX_LINE_BYTES"] += 1
    for raw in data[: end + 1].split(b"\n") if end >= 0 else ():
        if not raw.strip():
            continue
        record, why = (None, "longer than MAX_LINE_BYTES") if len(raw) > MAX_LINE_BYTES else parse_record(raw)
        if record is None:
            result.skipped += 1
            result.reasons[why] += 1
        else:
            result.records.append(record)
    return result


def _tail_crc(fd: int, offset: int) -> int:
    """CRC of the bytes just before ``offset``: a file cut in place and written again no longer matches."""
    n = min(TAIL_CHECK_BYTES, offset)
    return zlib.crc32(os.pread(fd, n, offset - n)) if n > 0 else 0


def _cap_warning(path: Path) -> str:
    return f"{path.name} is larger than {MAX_LOG_BYTES // 2**20} MiB: lines past that are not read"


def _read_up_to(fd: int, n: int) -> bytes:
    chunks, left = [], max(0, n)
    while left > 0:
        chunk = os.read(fd, min(left, 2**24))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_jsonl(path: str | Path, offset: int = 0) -> tuple[list[dict], int]:
    """Read the complete lines of ``path`` from byte ``offset``: ``(records, new_offset)``.

    - A missing file gives ``([], offset)``.
    - A last line without its newline (still being written) is not returned and ``new_offset`` stops
      before it, so the next call picks it up once complete.
    - A complete line that is not a JSON object within the readers' bounds is skipped
      (:func:`read_log` counts them and says why).
    """
    result = read_log(path, offset)
    return result.records, result.offset


def write_json_atomic(path: str | Path, data: Mapping[str, Any]) -> None:
    """Write a JSON file via a temp file and rename, so readers never see half of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(_json_safe(data), indent=2, allow_nan=False), encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no stray temp file
        raise


def overwrite_in_place(path: str | Path, data: Mapping[str, Any]) -> None:
    """Overwrite an existing small JSON file in place, padded with spaces to its old length.

    The fallback of a status write when the disk is full: the old file's block holds the new ~150 bytes,
    so no new block is needed (a temp file would need one).
    """
    text = json.dumps(_json_safe(data), allow_nan=False).encode()
    with open(path, "r+b") as f:
        old = len(f.read(MAX_JSON_BYTES))
        f.seek(0)
        f.write(text + b" " * max(0, old - len(text)))
        f.truncate(max(old, len(text)))


def read_json(path: str | Path, root: str | Path | None = None) -> dict | None:
    """A JSON object from ``path``, or None if it is missing, not (yet) valid, or refused by the readers'
    bounds (a special file, beyond ``root``, larger than :data:`MAX_JSON_BYTES`, malformed values)."""
    try:
        fd = open_regular(path, root)
    except OSError:
        return None
    try:
        data = _read_up_to(fd, MAX_JSON_BYTES + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(data) > MAX_JSON_BYTES:
        return None
    record, _ = parse_record(data)
    return record


def read_verdict(comparison_dir: str | Path) -> dict | None:
    """The ``verdict.json`` of a comparison dir, or None if missing or unreadable."""
    verdict = read_json(Path(comparison_dir) / VERDICT)
    if verdict is None or not isinstance(verdict.get("pairs"), list):
        return None
    pairs = [p for p in verdict["pairs"] if _is_pair(p)]
    warnings = verdict.get("warnings")
    verdict["warnings"] = [str(w) for w in warnings] if isinstance(warnings, list) else []
    if len(pairs) < len(verdict["pairs"]):
        verdict["warnings"].append(
            f"{len(verdict['pairs']) - len(pairs)} malformed pair(s) in {VERDICT} left out"
        )
    verdict["pairs"] = pairs
    if not isinstance(verdict.get("labels"), dict):
        verdict["labels"] = {}
    return verdict


def _is_number(value: Any) -> bool:
    """A finite number, or None (NaN as written: e.g. an interval over one seed)."""
    return value is None or (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    )


def _is_pair(pair: Any) -> bool:
    """A verdict pair with the fields and types the views and :func:`lab.verdict.format_verdict` use."""
    if not isinstance(pair, dict):
        return False
    intervals = [pair.get("ci"), pair.get("ci_t")]
    return (
        all(isinstance(pair.get(k), str) for k in ("a", "b", "metric"))
        and _is_number(pair.get("mean_diff"))
        and all(isinstance(ci, list) and len(ci) == 2 and all(map(_is_number, ci)) for ci in intervals)
        and isinstance(pair.get("distinguishable"), bool)
        and isinstance(pair.get("n_seeds"), int)
    )


def truncate_after(path: str | Path, step: int) -> int:
    """Drop the records of ``path`` whose ``step`` is > ``step`` (and any partial last line).

    Used on resume from the checkpoint at ``step``: the steps after it are trained again, so their old
    lines must go. Returns the number of records kept.
    """
    path = Path(path)
    records, _ = read_jsonl(path)
    kept = [r for r in records if not isinstance(r.get("step"), (int, float)) or r["step"] <= step]
    if not path.exists():
        return 0
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in kept:
                f.write(json.dumps(r, separators=(",", ":")) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return len(kept)


def run_label(aggregator: str, alpha: float | str = 1.0) -> str:
    """``grpo``, ``dapo``, ``dr_grpo``, ``delta_l`` (α = 1), ``delta_l-a0.75`` or ``delta_l-aauto``."""
    if aggregator == "delta_l" and isinstance(alpha, str) and alpha.strip().lower() == "auto":
        return "delta_l-aauto"  # α from the measured variance (lab.auto_alpha)
    if aggregator == "delta_l" and float(alpha) != 1.0:
        return f"delta_l-a{float(alpha):g}"
    return aggregator


def run_id(aggregator: str, seed: int, alpha: float | str = 1.0) -> str:
    return f"{run_label(aggregator, alpha)}-s{int(seed)}"


class RunWriter:
    """Writes one run dir. Every method appends or atomically replaces; nothing is held in memory."""

    def __init__(self, run_dir: str | Path, *, enabled: bool = True):
        self.dir = Path(run_dir)
        self.enabled = enabled  # False on non-main processes of a distributed run: they write nothing
        if enabled:
            self.dir.mkdir(parents=True, exist_ok=True)

    def write_config(self, config: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        write_json_atomic(self.dir / CONFIG, config)

    def set_status(self, state: str, step: int, max_steps: int, error: str | None = None) -> None:
        if not self.enabled:
            return
        if state not in RUN_STATES:
            raise ValueError(f"unknown run state {state!r}; expected one of {RUN_STATES}")
        status = {"state": state, "step": int(step), "max_steps": int(max_steps), "updated": time.time(),
                  "error": error}  # fmt: skip
        try:
            write_json_atomic(self.dir / STATUS, status)
        except OSError:  # e.g. the disk is full: the old file's block still takes the new status
            if not (self.dir / STATUS).is_file():
                raise
            overwrite_in_place(self.dir / STATUS, status)

    def _append(self, name: str, record: Mapping[str, Any]) -> None:
        if self.enabled:
            append_jsonl(self.dir / name, record)

    def log_metrics(self, record: Mapping[str, Any]) -> None:
        self._append(METRICS, record)

    def log_samples(self, record: Mapping[str, Any]) -> None:
        self._append(SAMPLES, record)

    def log_eval(self, record: Mapping[str, Any]) -> None:
        self._append(EVAL, record)

    def log_probe(self, record: Mapping[str, Any]) -> None:
        self._append(PROBES, record)

    def truncate_after(self, step: int) -> None:
        if not self.enabled:
            return
        for name in LOG_FILES:
            truncate_after(self.dir / name, step)


@dataclass
class RunReader:
    """Incremental reader of one run dir: each :meth:`poll` reads only the lines added since the last."""

    run_dir: Path
    metrics: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    probes: list[dict] = field(default_factory=list)
    offsets: dict[str, int] = field(default_factory=dict)
    identities: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)  # bad lines per file, over all polls
    last_skipped: dict[str, int] = field(default_factory=dict)  # bad lines per file, in the last poll
    problems: dict[str, str] = field(default_factory=dict)  # per file: why it (or its tail) is not read
    was_reset: bool = False  # the last poll found a file replaced or cut (its bucket was re-read)

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)

    @property
    def config(self) -> dict:
        return read_json(self.run_dir / CONFIG, root=self.run_dir) or {}

    @property
    def status(self) -> dict:
        return read_json(self.run_dir / STATUS, root=self.run_dir) or {}

    @property
    def warnings(self) -> list[str]:
        """Files refused or cut short, and lines skipped (with why), for the views to show."""
        out = [f"{self.run_dir.name}: {why}" for why in self.problems.values()]
        out += [
            f"{self.run_dir.name}: {n} bad line(s) in {name} skipped" for name, n in self.skipped.items() if n
        ]
        return out

    @property
    def is_live(self) -> bool:
        return self.status.get("state") == "running"

    def poll(self) -> int:
        """Read new complete lines of every log file; returns how many records were added."""
        added, self.was_reset = 0, False
        for name, bucket in (
            (METRICS, self.metrics),
            (SAMPLES, self.samples),
            (EVAL, self.evals),
            (PROBES, self.probes),
        ):
            result = read_log(self.run_dir / name, self.offsets.get(name, 0),
                              identity=self.identities.get(name), root=self.run_dir)  # fmt: skip
            if result.reset:
                bucket.clear()
                self.skipped[name] = 0
                self.was_reset = True
            self.offsets[name] = result.offset
            if result.identity is not None:
                self.identities[name] = result.identity
            else:
                self.identities.pop(name, None)
            self.last_skipped[name] = result.skipped
            self.skipped[name] = self.skipped.get(name, 0) + result.skipped
            if result.warning:
                self.problems[name] = result.warning
            else:
                self.problems.pop(name, None)
            bucket.extend(result.records)
            added += len(result.records)
        return added


def list_runs(root: str | Path) -> dict[str, list[Path]]:
    """``{comparison name: [run dirs]}`` under ``root``: a run dir is any folder holding config.json.

    A run dir directly under ``root`` is listed under the comparison ``"."``.
    """
    root = Path(root)
    found: dict[str, list[Path]] = {}
    if not root.is_dir():
        return found
    inside = root.resolve()
    for config in sorted(root.glob("*/config.json")) + sorted(root.glob("*/*/config.json")):
        run_dir = config.parent
        if not run_dir.resolve().is_relative_to(inside):
            continue  # a symlink to a folder elsewhere: not one of these runs
        comparison = "." if run_dir.parent == root else run_dir.parent.name
        found.setdefault(comparison, []).append(run_dir)
    return found
