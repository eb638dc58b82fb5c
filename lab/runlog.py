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

Beside the run dirs, a comparison dir holds ``verdict.json`` (written by ``lab compare`` when it ends,
:mod:`lab.verdict`): ``{"seeds": S, "pairs": [{"a", "b", "metric": "final_reward"|"auc", "mean_diff",
"ci": [lo, hi], "ci_t": [lo, hi], "distinguishable": bool, "n_seeds", "diffs"}, ...], "labels": {...},
"method", "note", "warnings", "created", "wall_seconds", "workers"}``. Read it with :func:`read_verdict`.

During training, ``lab.runner.RunLogCallback`` (a transformers ``TrainerCallback``) writes these files
through :class:`RunWriter`; this module itself imports no training code, so readers stay light.
Writers append whole lines and flush after each; a crash leaves at most one partial last line, which
:func:`read_jsonl` skips until it is complete. On resume, :func:`truncate_after` drops lines past the
checkpoint step so that no step is logged twice.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG = "config.json"
STATUS = "status.json"
METRICS = "metrics.jsonl"
SAMPLES = "samples.jsonl"
EVAL = "eval.jsonl"
PROBES = "probes.jsonl"
LOG_FILES = (METRICS, SAMPLES, EVAL, PROBES)
VERDICT = "verdict.json"
RUN_STATES = ("running", "finished", "interrupted", "failed")


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


def read_jsonl(path: str | Path, offset: int = 0) -> tuple[list[dict], int]:
    """Read the complete lines of ``path`` from byte ``offset``: ``(records, new_offset)``.

    - A missing file gives ``([], offset)``.
    - A last line without its newline (still being written) is not returned and ``new_offset`` stops
      before it, so the next call picks it up once complete.
    - A complete line that is not a JSON object is skipped (a warning is the caller's business:
      compare the number of complete lines with the records if needed).
    """
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n")
    if end < 0:
        return [], offset
    records: list[dict] = []
    for raw in data[: end + 1].splitlines():
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(record, dict):
            records.append(record)
    return records, offset + end + 1


def write_json_atomic(path: str | Path, data: Mapping[str, Any]) -> None:
    """Write a JSON file via a temp file and rename, so readers never see half of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_json_safe(data), indent=2, allow_nan=False), encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: str | Path) -> dict | None:
    """A JSON object from ``path``, or None if it is missing or not (yet) valid."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (
        FileNotFoundError,
        NotADirectoryError,
        IsADirectoryError,
        json.JSONDecodeError,
        UnicodeDecodeError,
    ):
        return None
    return data if isinstance(data, dict) else None


def read_verdict(comparison_dir: str | Path) -> dict | None:
    """The ``verdict.json`` of a comparison dir, or None if missing or unreadable."""
    verdict = read_json(Path(comparison_dir) / VERDICT)
    return verdict if verdict is not None and isinstance(verdict.get("pairs"), list) else None


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
    with open(tmp, "w", encoding="utf-8") as f:
        for r in kept:
            f.write(json.dumps(r, separators=(",", ":")) + "\n")
    os.replace(tmp, path)
    return len(kept)


def run_label(aggregator: str, alpha: float = 1.0) -> str:
    """``grpo``, ``dapo``, ``dr_grpo``, ``delta_l`` (α = 1) or ``delta_l-a0.75``."""
    if aggregator == "delta_l" and float(alpha) != 1.0:
        return f"delta_l-a{float(alpha):g}"
    return aggregator


def run_id(aggregator: str, seed: int, alpha: float = 1.0) -> str:
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
        write_json_atomic(
            self.dir / STATUS,
            {
                "state": state,
                "step": int(step),
                "max_steps": int(max_steps),
                "updated": time.time(),
                "error": error,
            },
        )

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

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)

    @property
    def config(self) -> dict:
        return read_json(self.run_dir / CONFIG) or {}

    @property
    def status(self) -> dict:
        return read_json(self.run_dir / STATUS) or {}

    @property
    def is_live(self) -> bool:
        return self.status.get("state") == "running"

    def poll(self) -> int:
        """Read new complete lines of every log file; returns how many records were added."""
        added = 0
        for name, bucket in (
            (METRICS, self.metrics),
            (SAMPLES, self.samples),
            (EVAL, self.evals),
            (PROBES, self.probes),
        ):
            records, self.offsets[name] = read_jsonl(self.run_dir / name, self.offsets.get(name, 0))
            bucket.extend(records)
            added += len(records)
        return added


def list_runs(root: str | Path) -> dict[str, list[Path]]:
    """``{comparison name: [run dirs]}`` under ``root``: a run dir is any folder holding config.json.

    A run dir directly under ``root`` is listed under the comparison ``"."``.
    """
    root = Path(root)
    found: dict[str, list[Path]] = {}
    if not root.is_dir():
        return found
    for config in sorted(root.glob("*/config.json")) + sorted(root.glob("*/*/config.json")):
        run_dir = config.parent
        comparison = "." if run_dir.parent == root else run_dir.parent.name
        found.setdefault(comparison, []).append(run_dir)
    return found
