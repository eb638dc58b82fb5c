"""Shared test setup: offline, one thread (like the lab's CPU runs; tiny models gain nothing from more)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def default_signal_handlers():
    """Every test starts with Python's own SIGINT/SIGTERM handling. An in-process call of the runner's worker
    code sets SIG_IGN (what an idle pool worker wants), and an ignored signal is inherited by every process
    a later test starts: its Ctrl-C would then never arrive."""
    import signal

    def reset() -> None:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    reset()
    yield
    reset()
