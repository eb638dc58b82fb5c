"""Data layer of the dashboard: run discovery, incremental loading, per-step summaries, seed statistics.

Nothing here imports streamlit, so every function is testable on plain run dirs. A :class:`RunData` wraps a
:class:`lab.runlog.RunReader`; :meth:`RunData.refresh` reads only the lines added since the last call and
stops polling once the run is no longer ``running``. Bad lines are counted (for warnings), never raised.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lab.aggregators import order_key
from lab.auto_alpha import is_auto
from lab.runlog import CONFIG, EVAL, METRICS, PROBES, SAMPLES, STATUS, RunReader, list_runs, read_json
from lab.verdict import t95

STALE_AFTER_S = 900  # a "running" run whose status.json is older than this gets a warning
_SEED_RE = re.compile(r"^(?P<label>.+)-s(?P<seed>\d+)$")


def _numeric_list(value: Any) -> np.ndarray | None:
    """A 1-D float array from a JSON list of numbers, or None if it is not one."""
    if not isinstance(value, list):
        return None
    try:
        arr = np.asarray([np.nan if v is None else v for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return arr if arr.ndim == 1 else None


class _Frame:
    """A DataFrame grown by appending records; rebuilt lazily and only from the new records."""

    def __init__(self) -> None:
        self._df = pd.DataFrame()
        self._pending: list[dict] = []

    def extend(self, records: Iterable[dict]) -> None:
        self._pending.extend(records)

    @property
    def df(self) -> pd.DataFrame:
        if self._pending:
            new = pd.DataFrame(self._pending)
            self._pending = []
            if "step" in new:
                new["step"] = pd.to_numeric(new["step"], errors="coerce")
                new = new.dropna(subset=["step"])
            self._df = new if self._df.empty else pd.concat([self._df, new], ignore_index=True)
            if "step" in self._df and self._df["step"].duplicated().any():
                self._df = self._df.drop_duplicates("step", keep="last").sort_values(
                    "step", ignore_index=True
                )
        return self._df


@dataclass
class SampleBatch:
    """One generation batch from samples.jsonl, as arrays (one entry per completion)."""

    step: int
    lengths: np.ndarray
    truncated: np.ndarray
    weights: np.ndarray | None
    rewards: np.ndarray | None


def parse_samples(record: dict) -> SampleBatch | None:
    """A :class:`SampleBatch` from a samples.jsonl record, or None if the record is malformed."""
    step, lengths = record.get("step"), _numeric_list(record.get("lengths"))
    if not isinstance(step, (int, float)) or lengths is None or lengths.size == 0 or np.isnan(lengths).any():
        return None
    trunc = record.get("truncated")
    truncated = (
        np.asarray(trunc, dtype=bool) if isinstance(trunc, list) and len(trunc) == lengths.size else None
    )
    weights, rewards = _numeric_list(record.get("weights")), _numeric_list(record.get("rewards"))
    return SampleBatch(
        step=int(step),
        lengths=lengths,
        truncated=truncated if truncated is not None else np.zeros(lengths.size, dtype=bool),
        weights=weights if weights is not None and weights.size == lengths.size else None,
        rewards=rewards if rewards is not None and rewards.size == lengths.size else None,
    )


def summarize_batch(batch: SampleBatch) -> dict[str, float]:
    """Per-step length summary: mean, max, quartiles and the truncation rate."""
    s = np.sort(batch.lengths)  # nearest-rank quartiles: one sort instead of np.percentile's overhead
    q25, q50, q75 = (float(s[round(p * (s.size - 1))]) for p in (0.25, 0.5, 0.75))
    return {
        "step": batch.step,
        "mean_length": float(s.mean()),
        "max_length": float(s[-1]),
        "min_length": float(s[0]),
        "q25": float(q25),
        "median": float(q50),
        "q75": float(q75),
        "truncation_rate": float(batch.truncated.mean()),
        "n": int(batch.lengths.size),
    }


@dataclass
class RunData:
    """One run dir, loaded incrementally. Use :meth:`refresh` to read what was appended since last time."""

    run_dir: Path
    comparison: str = "."
    reader: RunReader = field(init=False)
    config: dict = field(default_factory=dict)
    status: dict = field(default_factory=dict)
    corrupt: dict[str, int] = field(default_factory=dict)
    malformed_samples: int = 0
    batches: list[SampleBatch] = field(default_factory=list)
    loaded: bool = False

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        self.reader = RunReader(self.run_dir)
        self._metrics = _Frame()
        self._lengths = _Frame()
        self._evals = _Frame()
        self._batch_index: dict[int, int] = {}

    # -- identity ------------------------------------------------------------------------------------
    @property
    def run_id(self) -> str:
        return str(self.config.get("run_id") or self.run_dir.name)

    @property
    def label(self) -> str:
        """Aggregator label (``delta_l-a0.75`` ...): config ``label``, else the run id without ``-s<seed>``."""
        if self.config.get("label"):
            return str(self.config["label"])
        m = _SEED_RE.match(self.run_dir.name)
        return m.group("label") if m else str(self.config.get("aggregator") or self.run_dir.name)

    @property
    def seed(self) -> int | None:
        seed = self.config.get("seed")
        if isinstance(seed, int):
            return seed
        m = _SEED_RE.match(self.run_dir.name)
        return int(m.group("seed")) if m else None

    @property
    def aggregator(self) -> str:
        return str(self.config.get("aggregator") or self.label.split("-a")[0])

    @property
    def alpha_is_auto(self) -> bool:
        """The run set α from its probes (``--alpha auto``, lab.auto_alpha)."""
        return is_auto(self.config.get("alpha"))

    @property
    def alpha(self) -> float:
        """ΔL's α: the configured one, or with ``auto`` the last logged ``delta_l/alpha`` (1 before any)."""
        if self.alpha_is_auto:
            logged = numeric_column(self.metrics, "delta_l/alpha")
            return float(logged.iloc[-1]) if not logged.empty else 1.0
        try:
            return float(self.config.get("alpha", 1.0))
        except (TypeError, ValueError):
            return 1.0

    @property
    def state(self) -> str:
        return str(self.status.get("state") or "unknown")

    @property
    def is_live(self) -> bool:
        return self.state == "running"

    @property
    def max_steps(self) -> int | None:
        for source, key in ((self.status, "max_steps"), (self.config, "max_steps"), (self.config, "steps")):
            if isinstance(source.get(key), int) and source[key] > 0:
                return int(source[key])
        return None

    @property
    def max_completion_length(self) -> float | None:
        """The constant M of the aggregators: config ``max_completion_length`` (None if not logged)."""
        value = self.config.get("max_completion_length")
        return float(value) if isinstance(value, (int, float)) and value > 0 else None

    # -- loading -------------------------------------------------------------------------------------
    def refresh(self) -> int:
        """Re-read status and read new log lines (only while running, plus once after it stops)."""
        was_live = self.is_live
        self.status = read_json(self.run_dir / STATUS) or {}
        if not self.config or was_live:
            self.config = read_json(self.run_dir / CONFIG) or {}
        if self.loaded and not was_live and not self.is_live:
            return 0  # finished runs stop polling
        self.loaded = True
        before = {name: len(b) for name, b in self._buckets().items()}
        added = self.reader.poll()
        if self.reader.was_reset:  # a resume replaced a log file: rebuild everything from the files
            self.reader = RunReader(self.run_dir)
            added = self.reader.poll()
            self._reset_frames()
            before = dict.fromkeys(before, 0)
        for name, bucket in self._buckets().items():
            new = bucket[before[name] :]
            self._count_corrupt(name)
            if name == METRICS:
                self._metrics.extend(new)
            elif name == SAMPLES:
                self._add_samples(new)
                bucket.clear()  # parsed into arrays; the raw dicts are not needed again
            elif name == EVAL:
                self._evals.extend(new)
        return added

    def _buckets(self) -> dict[str, list[dict]]:
        r = self.reader
        return {METRICS: r.metrics, SAMPLES: r.samples, EVAL: r.evals, PROBES: r.probes}

    def _count_corrupt(self, name: str) -> None:
        skipped = self.reader.last_skipped.get(name, 0)  # counted by the bounded reader (lab.runlog)
        if skipped:
            self.corrupt[name] = self.corrupt.get(name, 0) + skipped

    def _reset_frames(self) -> None:
        self._metrics, self._lengths, self._evals = _Frame(), _Frame(), _Frame()
        self.batches, self._batch_index, self.corrupt, self.malformed_samples = [], {}, {}, 0

    def _add_samples(self, records: list[dict]) -> None:
        summaries = []
        for record in records:
            batch = parse_samples(record)
            if batch is None:
                self.malformed_samples += 1
                continue
            if batch.step in self._batch_index:  # a repeated step (resume): the last one wins
                self.batches[self._batch_index[batch.step]] = batch
            else:
                self._batch_index[batch.step] = len(self.batches)
                self.batches.append(batch)
            summaries.append(summarize_batch(batch))
        self._lengths.extend(summaries)

    # -- views of the data ---------------------------------------------------------------------------
    @property
    def metrics(self) -> pd.DataFrame:
        """metrics.jsonl as a DataFrame with a ``step`` column (numeric columns only)."""
        return self._metrics.df

    @property
    def length_summary(self) -> pd.DataFrame:
        """One row per samples.jsonl batch: mean/max/quartile lengths and truncation rate."""
        return self._lengths.df

    @property
    def evals(self) -> pd.DataFrame:
        return self._evals.df

    @property
    def probes(self) -> list[dict]:
        return self.reader.probes

    @property
    def sample_steps(self) -> list[int]:
        return [b.step for b in self.batches]

    def batch_at(self, step: int) -> SampleBatch | None:
        """The samples batch logged at ``step``, or the closest earlier one."""
        if not self.batches:
            return None
        if step in self._batch_index:
            return self.batches[self._batch_index[step]]
        earlier = [b for b in self.batches if b.step <= step]
        return earlier[-1] if earlier else self.batches[0]

    def warnings(self) -> list[str]:
        """Human-readable problems with this run's files (corrupt lines, missing status, ...)."""
        out = [f"{self.run_id}: {why}" for why in self.reader.problems.values()]  # refused files, size caps
        for name, n in sorted(self.corrupt.items()):
            out.append(f"{self.run_id}: {n} corrupt line(s) in {name} were skipped.")
        if self.malformed_samples:
            out.append(
                f"{self.run_id}: {self.malformed_samples} malformed record(s) in {SAMPLES} were skipped."
            )
        if not self.status:
            out.append(f"{self.run_id}: no readable {STATUS} (state unknown).")
        if not self.config:
            out.append(f"{self.run_id}: {CONFIG} is not readable yet.")
        updated = self.status.get("updated")
        if self.is_live and isinstance(updated, (int, float)) and time.time() - updated > STALE_AFTER_S:
            minutes = (time.time() - updated) / 60
            out.append(
                f"{self.run_id} is marked running but its status has not changed for {minutes:.0f} min."
            )
        if self.state == "failed":
            out.append(f"{self.run_id} failed: {self.status.get('error') or 'no error message'}")
        return out


class RunStore:
    """All runs the dashboard knows, keyed by run dir; keeps readers alive between refreshes."""

    def __init__(self) -> None:
        self.runs: dict[str, RunData] = {}

    def discover(self, root: str | Path) -> dict[str, list[Path]]:
        """``{comparison: [run dirs]}`` under ``root`` (see :func:`lab.runlog.list_runs`)."""
        return list_runs(root)

    def get(self, run_dir: Path, comparison: str = ".") -> RunData:
        key = str(Path(run_dir).resolve())
        if key not in self.runs:
            self.runs[key] = RunData(Path(run_dir), comparison=comparison)
        return self.runs[key]

    def load(self, run_dirs: Sequence[tuple[str, Path]]) -> list[RunData]:
        """RunData for ``(comparison, run_dir)`` pairs, each refreshed (new lines only)."""
        runs = [self.get(path, comparison) for comparison, path in run_dirs]
        for run in runs:
            run.refresh()
        return runs


# -------------------------------------------------------------------------------------------------------
# curves over steps, across seeds
# -------------------------------------------------------------------------------------------------------
def numeric_column(df: pd.DataFrame, column: str) -> pd.Series:
    """``df[column]`` as floats indexed by step (empty if missing)."""
    if df.empty or column not in df or "step" not in df:
        return pd.Series(dtype=float)
    values = pd.to_numeric(df[column], errors="coerce")
    return pd.Series(values.to_numpy(), index=df["step"].to_numpy()).dropna()


def smooth(series: pd.Series, window: int) -> pd.Series:
    """Trailing rolling mean over ``window`` steps (1 = no smoothing)."""
    return series if window <= 1 or series.empty else series.rolling(window, min_periods=1).mean()


def downsample(df: pd.DataFrame, max_points: int = 600) -> pd.DataFrame:
    """Bucket-average consecutive rows so that at most ``max_points`` remain (keeps the last row's step)."""
    if len(df) <= max_points:
        return df
    bucket = np.arange(len(df)) * max_points // len(df)
    return df.groupby(bucket).mean()


def frame_of(run: RunData, source: str) -> pd.DataFrame:
    """The run's ``metrics``, ``lengths`` (per-step length summary) or ``evals`` table."""
    return {"metrics": run.metrics, "lengths": run.length_summary, "evals": run.evals}[source]


def label_curve(
    runs: Sequence[RunData],
    column: str,
    *,
    source: str = "metrics",
    window: int = 1,
    band_column: str | None = None,
    seed_band: str = "ci95",
    bounds: tuple[float, float] | None = None,
) -> pd.DataFrame:
    """Mean curve of ``column`` over the runs (seeds) of one label: columns step, mean, lo, hi, n.

    With several seeds, lo/hi is the 95% t-interval of the mean over seeds (``seed_band="ci95"``), ± one
    std over seeds (``"std"``) or nothing (``"none"``). With one seed, lo/hi is
    mean ± ``band_column`` (e.g. ``reward_std``, the within-batch spread) when given, else the mean itself.
    ``bounds``: the range the quantity cannot leave (a reward in [0, 1]); lo/hi are clipped to it.
    """
    series = []
    for run in runs:
        s = smooth(numeric_column(frame_of(run, source), column), window)
        if not s.empty:
            series.append(s)
    if not series:
        return pd.DataFrame(columns=["step", "mean", "lo", "hi", "n"])
    table = pd.concat(series, axis=1).sort_index()
    n = table.notna().sum(axis=1)
    mean = table.mean(axis=1)
    if len(series) > 1:
        std = table.std(axis=1, ddof=1)
        half = {"ci95": std / np.sqrt(n) * n.map(t95), "std": std}.get(seed_band, std * 0)
    elif band_column is not None:
        half = smooth(numeric_column(frame_of(runs[0], source), band_column), window).reindex(mean.index)
    else:
        half = pd.Series(0.0, index=mean.index)
    half = half.fillna(0.0)
    lo, hi = mean - half, mean + half
    if bounds is not None:
        lo, hi = lo.clip(*bounds), hi.clip(*bounds)
    out = pd.DataFrame({"step": mean.index.to_numpy(), "mean": mean, "lo": lo, "hi": hi, "n": n})
    return out.reset_index(drop=True)


def reward_range(runs: Iterable[RunData], column: str = "reward") -> tuple[float, float]:
    """The range a logged reward can take: [0, number of reward functions], widened to what was logged.

    Each of the lab's reward functions returns values in [0, 1] and TRL sums them with unit weights: the
    binary one alone gives [0, 1], with the shaped one (config ``shaped_reward``) [0, 2]. Widening to the
    logged values keeps a clip from ever hiding data (e.g. runs of another task).
    """
    low, high = 0.0, 1.0
    for run in runs:
        if (run.config.get("run") or {}).get("shaped_reward") or run.config.get("shaped_reward"):
            high = 2.0
        values = numeric_column(run.metrics, column)
        if not values.empty:
            low, high = min(low, float(values.min())), max(high, float(values.max()))
    return low, high


def group_by_label(runs: Iterable[RunData]) -> dict[str, list[RunData]]:
    """Runs grouped by aggregator label, labels in a stable order (the registry's order, lab.aggregators)."""
    groups: dict[str, list[RunData]] = {}
    for run in runs:
        groups.setdefault(run.label, []).append(run)
    return dict(sorted(groups.items(), key=lambda kv: order_key(kv[0])))  # registry order


def final_value(series: pd.Series, fraction: float = 0.1) -> float:
    """Mean over the last ``fraction`` of the steps (at least one), NaN when empty."""
    if series.empty:
        return float("nan")
    k = max(1, int(len(series) * fraction))
    return float(series.iloc[-k:].mean())
