"""`lab train` / `lab compare` end to end on the tiny model: logs, resume after a kill, Ctrl-C, 2 processes."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lab.aggregation import delta_l_row_weights
from lab.cli import build_parser, main
from lab.runlog import RunReader, read_json
from lab.runner import RunConfig, device_settings
from tests.helpers import free_port

FAST = [
    "--model",
    "tiny",
    "--prompts-per-step",
    "2",
    "--num-generations",
    "4",
    "--max-completion-length",
    "8",
    "--threads",
    "1",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def lab(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lab.cli", *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
        **kwargs,
    )


def start_lab(*args: str) -> subprocess.Popen:
    """`lab ...` in the background (stderr kept for failure messages)."""
    return subprocess.Popen([sys.executable, "-m", "lab.cli", *args], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def steps_of(run_dir: Path) -> list[int]:
    reader = RunReader(run_dir)
    reader.poll()
    return [m["step"] for m in reader.metrics]


def wait_for_steps(run_dir: Path, n: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while len(steps_of(run_dir)) < n:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, "training made no progress"
        time.sleep(0.2)


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "train" in out and "compare" in out and "dashboard" in out


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["train", "--aggregator", "mean", "--out", "x"], "invalid choice: 'mean'"),
        (["compare", "--aggregators", "grpo,median", "--out", "x"], "median"),
        (["train", "--steps", "0", "--out", "x"], "'0'"),
    ],
)
def test_bad_arguments_are_named(argv, match, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
    assert match in capsys.readouterr().err


def test_bad_values_give_a_clear_error(tmp_path, capsys):
    assert main(["train", "--alpha", "-1", "--out", str(tmp_path), *FAST]) == 2
    assert "-1" in capsys.readouterr().err


@pytest.mark.parametrize(("given", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_openmp_threads_sleep_while_waiting_unless_the_user_says_otherwise(given, expected):
    env = {k: v for k, v in ENV.items() if k != "OMP_WAIT_POLICY"} | (
        {"OMP_WAIT_POLICY": given} if given else {}
    )
    code = "import os, lab.cli, torch; print(os.environ['OMP_WAIT_POLICY'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected


def _pretend_vllm_is(installed: bool, monkeypatch) -> None:
    find_spec = importlib.util.find_spec

    def fake(name, *args):
        if name == "vllm":
            return importlib.machinery.ModuleSpec("vllm", None) if installed else None
        return find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", fake)


@pytest.mark.parametrize(
    ("installed", "extra", "match"),
    [
        (False, [], "--vllm needs the vllm package"),
        (True, [], "--vllm needs a CUDA GPU"),
        (True, ["--vllm-gpu-memory-utilization", "1.5"], "must be in (0, 1), got 1.5"),
    ],
)
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answers")
def test_vllm_problems_are_named_before_anything_is_created(
    tmp_path, capsys, monkeypatch, installed, extra, match
):
    _pretend_vllm_is(installed, monkeypatch)
    out = tmp_path / "runs"
    for command in (["train"], ["compare", "--aggregators", "grpo,delta_l"]):
        assert main([*command, "--vllm", *extra, "--out", str(out), *FAST]) == 2
        assert match in capsys.readouterr().err
        assert not out.exists()


def test_vllm_memory_fraction_needs_vllm(tmp_path, capsys):
    assert main(["train", "--vllm-gpu-memory-utilization", "0.5", "--out", str(tmp_path / "x"), *FAST]) == 2
    assert "applies only with --vllm" in capsys.readouterr().err


def test_vllm_passes_trl_its_colocate_settings():
    settings = device_settings(RunConfig(vllm=True, vllm_gpu_memory_utilization=0.45), on_gpu=True)
    assert settings["use_vllm"] is True and settings["vllm_mode"] == "colocate"
    assert settings["vllm_gpu_memory_utilization"] == 0.45
    assert "use_vllm" not in device_settings(RunConfig(), on_gpu=True)


@pytest.mark.slow
def test_train_writes_the_run_log(tmp_path):
    result = lab("train", "--aggregator", "delta_l", "--alpha", "0.75", "--steps", "2", "--out", str(tmp_path),
                 "--probe-every", "1", "--eval-prompts", "2", "--eval-k", "2", *FAST)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "delta_l-a0.75-s0"
    reader = RunReader(run_dir)
    reader.poll()
    assert [m["step"] for m in reader.metrics] == [1, 2]
    assert reader.status["state"] == "finished"
    config = reader.config
    assert (
        config["aggregator"] == "delta_l"
        and config["alpha"] == 0.75
        and config["run"]["num_generations"] == 4
    )
    metric = reader.metrics[0]
    for key in (
        "loss",
        "grad_norm",
        "reward",
        "reward_std",
        "frac_reward_zero_std",
        "entropy",
        "step_time",
        "completions/mean_length",
        "delta_l/weight_mean",
        "cv/grpo",
        "cv/dapo",
        "cv/dr_grpo",
        "cv/delta_l",
    ):
        assert key in metric, key
    sample = reader.samples[0]
    assert len(sample["lengths"]) == len(sample["weights"]) == len(sample["rewards"]) == 8
    expected = delta_l_row_weights(sample["lengths"], alpha=0.75, max_length=8).tolist()
    assert sample["weights"] == pytest.approx(expected, rel=1e-6)
    assert [p["step"] for p in reader.probes] == [1, 2]  # --probe-every 1
    assert set(reader.probes[0]["cv"]) == {"grpo", "dapo", "dr_grpo", "delta_l"}
    assert len(reader.probes[0]["grad_variances"]) == len(reader.probes[0]["lengths"]) > 0
    assert "probe/seconds" in metric
    assert [e["step"] for e in reader.evals] == [2] and 0.0 <= reader.evals[0]["pass_at_k"] <= 1.0


@pytest.mark.slow
def test_compare_runs_every_aggregator_and_seed(tmp_path):
    result = lab(
        "compare",
        "--aggregators",
        "grpo,delta_l",
        "--seeds",
        "2",
        "--steps",
        "1",
        "--out",
        str(tmp_path),
        *FAST,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p.name for p in tmp_path.iterdir())
    assert runs == ["delta_l-s0", "delta_l-s1", "grpo-s0", "grpo-s1"]
    # a fair A/B: the same prompts for every aggregator of a seed
    prompts = {r: read_json(tmp_path / r / "config.json")["run"]["seed"] for r in runs}
    assert prompts == {"delta_l-s0": 0, "delta_l-s1": 1, "grpo-s0": 0, "grpo-s1": 1}
    again = lab(
        "compare",
        "--aggregators",
        "grpo,delta_l",
        "--seeds",
        "2",
        "--steps",
        "1",
        "--out",
        str(tmp_path),
        "--resume",
        *FAST,
    )
    assert again.returncode == 0 and again.stdout.count("already finished") == 4


@pytest.mark.slow
def test_resume_after_kill_neither_loses_nor_duplicates_steps(tmp_path):
    args = ["train", "--steps", "8", "--save-every", "2", "--out", str(tmp_path), *FAST]
    proc = start_lab(*args)
    run_dir = tmp_path / "delta_l-s0"
    try:
        wait_for_steps(run_dir, 3, proc)
    finally:
        proc.kill()  # SIGKILL: no cleanup at all
        proc.wait()
    logged = steps_of(run_dir)
    assert logged[:3] == [1, 2, 3] and read_json(run_dir / "status.json")["state"] == "running"
    result = lab(*args, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert steps_of(run_dir) == list(range(1, 9))
    assert read_json(run_dir / "status.json")["state"] == "finished"


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_resumes(tmp_path):
    args = ["train", "--steps", "8", "--save-every", "100", "--out", str(tmp_path), *FAST]
    proc = start_lab(*args)
    run_dir = tmp_path / "delta_l-s0"
    wait_for_steps(run_dir, 2, proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=300) == 130
    status = read_json(run_dir / "status.json")
    assert status["state"] == "interrupted"
    done = steps_of(run_dir)
    assert (
        done == list(range(1, len(done) + 1))
        and (run_dir / "checkpoints" / f"checkpoint-{status['step']}").exists()
    )
    result = lab(*args, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert steps_of(run_dir) == list(range(1, 9))


@pytest.mark.slow
def test_train_under_two_processes(tmp_path):
    """`accelerate launch -m lab.cli train` with 2 CPU processes (gloo), as on 2 GPUs."""
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
        str(free_port()), "-m", "lab.cli", "train", "--steps", "2", "--out", str(tmp_path), *FAST,
    ]  # fmt: skip
    result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    reader = RunReader(tmp_path / "delta_l-s0")
    reader.poll()
    assert [m["step"] for m in reader.metrics] == [1, 2]  # one writer, no duplicate lines
    sample = reader.samples[0]
    assert len(sample["lengths"]) == 16  # 2 processes × 2 prompts × 4 generations, gathered
    expected = delta_l_row_weights(sample["lengths"], alpha=1.0, max_length=8).tolist()
    assert sample["weights"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.slow
def test_math_task_trains_end_to_end(tmp_path):
    result = lab(
        "train", "--task", "math", "--aggregator", "dr_grpo", "--steps", "1", "--out", str(tmp_path), *FAST
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reader = RunReader(tmp_path / "dr_grpo-s0")
    reader.poll()
    assert reader.config["task"] == "math" and [m["step"] for m in reader.metrics] == [1]
    assert "rewards/math_reward/mean" in reader.metrics[0]
