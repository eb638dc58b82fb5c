"""What every task shares: the ``Task`` interface, completion text, deterministic train/eval splits.

A task turns seeded problems into a ``datasets.Dataset`` with a ``prompt`` column (raw text for base
models, a list of chat messages for instruct models, as TRL's ``GRPOTrainer`` expects) plus the columns
its rewards need, and scores a completion with an exact, binary rule.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any

RewardFunc = Callable[..., list[float | None]]

# A problem goes to the eval split when the first byte of sha256(key) is below this (≈ 1 in 8):
# the split depends only on the problem itself, never on seeds or sizes, so train and eval are disjoint.
_EVAL_BUCKET = 32


def completion_text(completion: Any) -> str:
    """The text of one TRL completion: a str (base models) or a list of messages (chat models).

    For messages, the contents of the assistant messages are joined (TRL passes exactly one); other
    shapes become ``""`` so that a reward never crashes on them.
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):
        content = completion.get("content")
        return content if isinstance(content, str) else ""
    if isinstance(completion, Sequence):
        parts = [
            m.get("content")
            for m in completion
            if isinstance(m, Mapping) and m.get("role", "assistant") == "assistant"
        ]
        return "".join(p for p in parts if isinstance(p, str))
    return ""


def split_of(key: str) -> str:
    """``"eval"`` or ``"train"`` for a problem key: a fixed hash bucket (about 1/8 of problems are eval)."""
    return "eval" if hashlib.sha256(key.encode()).digest()[0] < _EVAL_BUCKET else "train"


def check_split(split: str) -> None:
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")


def check_count(n: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")


class HubUnavailableError(RuntimeError):
    """A hub data set that cannot be loaded here (offline); the message says what to use instead."""


def load_hub_dataset(path: str, *args: Any, **kwargs: Any):
    """``datasets.load_dataset`` with one clear error when the hub is not reachable."""
    import datasets

    try:
        return datasets.load_dataset(path, *args, **kwargs)
    except Exception as err:  # connection errors come in many types across datasets/huggingface_hub versions
        raise HubUnavailableError(
            f"could not load the hub data set {path!r} ({type(err).__name__}: {str(err)[:200]}). The hub is not "
            "reachable from here (or the id is wrong); use the offline generated problems instead "
            "(source='generated', the default)."
        ) from err


class Task(ABC):
    """A verifiable-reward task: data, TRL reward functions and the exact score used for evaluation."""

    name: str

    @abstractmethod
    def _dataset(self, n: int, *, seed: int, chat: bool, split: str, **options: Any):
        """``n`` problems of ``split`` ("train" or "eval") as a ``datasets.Dataset``."""

    def train_dataset(self, n: int, *, seed: int, chat: bool, **options: Any):
        """``n`` training problems as a ``datasets.Dataset`` (column ``prompt`` plus the task's columns)."""
        return self._dataset(n, seed=seed, chat=chat, split="train", **options)

    def eval_dataset(self, n: int, *, seed: int, chat: bool, **options: Any):
        """``n`` evaluation problems, disjoint from every training set of the same task."""
        return self._dataset(n, seed=seed, chat=chat, split="eval", **options)

    @abstractmethod
    def reward_funcs(self, *, shaped: bool = False) -> list[RewardFunc]:
        """TRL reward functions; each function's ``__name__`` is what TRL logs as ``rewards/<name>/mean``."""

    @abstractmethod
    def score(self, completion: Any, **columns: Any) -> float:
        """The exact binary correctness (1.0 or 0.0) used for evaluation."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
