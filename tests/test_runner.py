"""lab.runner and its parts (lab.run_config, lab.devices): the run config, device policy, TRL settings of every
aggregator, an interrupted run's record, a worker after Ctrl-C. End to end through the CLI: tests/test_cli.py."""

from __future__ import annotations

import signal
import types

import pytest

from lab import devices, run_config, runner
from lab.aggregators import AGGREGATORS
from lab.runlog import read_json
from lab.runner import RunConfig, device_settings


class FakeTrainer:
    """What lab.runner._save_interrupted uses of a trainer."""

    def __init__(self, step: int, error: Exception | None = None):
        self.state = types.SimpleNamespace(global_step=step)
        self.model, self.error, self.saved = None, error, 0

    def _save_checkpoint(self, model, trial):
        if self.error is not None:
            raise self.error
        self.saved += 1


@pytest.mark.parametrize(
    ("step", "error", "saved", "note"),
    [
        (3, None, 1, None),
        (0, None, 0, None),
        (3, OSError("disk full"), 0, "checkpoint not saved: OSError: disk full"),
    ],
)
def test_an_interrupted_run_is_marked_even_when_its_checkpoint_cannot_be_saved(
    tmp_path, step, error, saved, note
):
    from lab.runlog import RunWriter
    from lab.runner import _save_interrupted

    trainer, writer = FakeTrainer(step, error), RunWriter(tmp_path / "run")
    writer.set_status("running", 0, 10)
    _save_interrupted(trainer, writer, 10)
    status = read_json(tmp_path / "run" / "status.json")
    assert (status["state"], status["step"], status["error"], trainer.saved) == (
        "interrupted",
        step,
        note,
        saved,
    )


def test_a_worker_starts_no_queued_run_after_ctrl_c(tmp_path, monkeypatch):
    import multiprocessing

    from lab import runner

    stop = multiprocessing.get_context("spawn").Event()
    monkeypatch.setattr(runner, "_stop_event", stop)
    monkeypatch.setattr(runner, "train_run", lambda *a, **k: (tmp_path / "ran").mkdir())
    monkeypatch.setattr(runner, "_worker_init", lambda stop=None: None)  # a worker's setup, not pytest's
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert runner._worker_run(RunConfig(), str(tmp_path / "r"), False) == "finished"
        stop.set()
        (tmp_path / "ran").rmdir()
        assert runner._worker_run(RunConfig(), str(tmp_path / "r"), False) == "not started (interrupted)"
        assert not (tmp_path / "ran").exists()
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def test_vllm_passes_trl_its_colocate_settings():
    settings = device_settings(RunConfig(vllm=True, vllm_gpu_memory_utilization=0.45), on_gpu=True)
    assert settings["use_vllm"] is True and settings["vllm_mode"] == "colocate"
    assert settings["vllm_gpu_memory_utilization"] == 0.45
    assert "use_vllm" not in device_settings(RunConfig(), on_gpu=True)


GENERATION_FIELDS = ("cache_implementation", "compile_generation", "use_transformers_continuous_batching")


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("generate", {}),
        ("continuous-batching", {"use_transformers_continuous_batching": True}),
        ("static-cache", {"cache_implementation": "static"}),
        ("static-compile", {"cache_implementation": "static", "compile_generation": True}),
        ("prefill-once", {"prefill_prompts_once": True}),
    ],
)
def test_device_settings_map_each_generation_path_to_trl_fields(tmp_path, path, expected):
    from lab.speed import SpeedConfig

    for on_gpu in (True, False):  # an explicit path is the same on both devices
        settings = device_settings(RunConfig(model="tiny", generation=path), on_gpu=on_gpu)
        got = {k: settings[k] for k in (*GENERATION_FIELDS, "prefill_prompts_once") if settings.get(k)}
        assert got == expected, (path, on_gpu)
        assert settings["activation_checkpointing"] is on_gpu
        # TRL accepts it (and, for the compiled path, lab's own check that the cache is static passes)
        config = SpeedConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], **expected)
        assert config.use_transformers_continuous_batching is bool(
            expected.get("use_transformers_continuous_batching")
        )


def test_auto_generation_keeps_each_devices_settings():
    gpu = device_settings(RunConfig(model="tiny"), on_gpu=True)
    assert not any(gpu.get(k) for k in (*GENERATION_FIELDS, "prefill_prompts_once"))  # TRL's generate
    cpu = device_settings(RunConfig(model="tiny"), on_gpu=False)  # the demo's measured CPU settings
    assert cpu["cache_implementation"] == "static" and cpu["prefill_prompts_once"] is True
    plain = device_settings(RunConfig(model="tiny", generation="generate"), on_gpu=False)
    assert "cache_implementation" not in plain and plain["prefill_prompts_once"] is False
    assert plain["forward_prompts_once"] == cpu["forward_prompts_once"]  # the loss side is not generation


def test_compiled_generation_needs_a_static_cache(tmp_path):
    from lab.speed import SpeedConfig

    with pytest.raises(ValueError, match="compile_generation needs cache_implementation='static'"):
        SpeedConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], compile_generation=True)


@pytest.mark.parametrize("name", list(AGGREGATORS))
def test_every_aggregator_gets_trl_settings_trl_accepts(tmp_path, name):
    """The registry's loss type and extra fields reach TRL's config, which accepts them (its own checks run)."""
    entry = AGGREGATORS[name]
    c = RunConfig(aggregator=name, model="tiny", compare_gradients_every=1).resolved()
    args = runner._trl_args(c, tmp_path)
    assert args.loss_type == entry.loss_type
    assert args.importance_sampling_level == entry.trl_settings.get("importance_sampling_level", "token")
    # the four aggregators' gradients are compared only where their weights x_i are known
    assert c.compare_gradients_every == (1 if entry.weights_known else 0)


def test_gspo_is_grpo_with_sequence_level_importance_ratios(tmp_path):
    gspo = runner._trl_args(RunConfig(aggregator="gspo", model="tiny").resolved(), tmp_path)
    grpo = runner._trl_args(RunConfig(aggregator="grpo", model="tiny").resolved(), tmp_path)
    assert (gspo.loss_type, gspo.importance_sampling_level) == ("grpo", "sequence")
    assert grpo.importance_sampling_level == "token"


def test_an_unknown_aggregator_is_named():
    with pytest.raises(ValueError, match="unknown aggregator 'nope'"):
        RunConfig(aggregator="nope", model="tiny").resolved()


# What notebooks, benchmarks and tests import from lab.runner: the split keeps every one of them there.
RUNNER_NAMES = (
    "RunConfig", "run_comparison", "train_run", "run_defaults", "infer_preset", "write_verdict", "device_settings",
    "GENERATION_PATHS", "GENERATION_CHOICES", "GPU_ONLY_GENERATION", "OPTIMIZERS", "RUN_PRESETS", "GENERAL",
    "RunLogCallback", "raise_keyboard_interrupt", "check_generation", "check_vllm", "set_threads",
    "load_model_and_tokenizer", "_trl_args", "_save_interrupted", "_worker_run",
)  # fmt: skip


def test_the_names_others_import_from_the_runner_are_still_there():
    missing = [name for name in RUNNER_NAMES if not hasattr(runner, name)]
    assert not missing, missing
    assert runner.RunConfig is run_config.RunConfig and runner.device_settings is devices.device_settings
