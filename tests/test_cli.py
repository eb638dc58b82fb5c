"""`lab train` / `lab compare` end to end on the tiny model: logs, resume after a kill, Ctrl-C, 2 processes."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.machinery
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from lab.aggregation import delta_l_row_weights
from lab.cli import build_parser, config_from_args, main
from lab.options import run_options
from lab.runlog import RunReader, read_json
from lab.runner import RunConfig
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


class _StderrLog:
    """A background run's stderr in a file: a pipe nobody reads fills up (progress bars, warnings) and then blocks
    the run mid-write, so it neither trains nor answers Ctrl-C."""

    def __init__(self) -> None:
        self.file = tempfile.TemporaryFile("w+")

    def read(self) -> str:
        self.file.seek(0)
        return self.file.read()


def start_lab(*args: str) -> subprocess.Popen:
    """`lab ...` in the background (stderr kept in a file for failure messages: ``proc.stderr.read()``)."""
    log = _StderrLog()
    proc = subprocess.Popen([sys.executable, "-m", "lab.cli", *args], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=log.file, text=True)  # fmt: skip
    proc.stderr = log  # type: ignore[assignment]
    return proc


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
    out = tmp_path / "new"
    with pytest.raises(SystemExit) as refused:  # argparse refuses it (lab.auto_alpha.check_alpha_setting)
        main(["train", "--alpha", "-1", "--out", str(out), *FAST])
    assert refused.value.code == 2
    captured = capsys.readouterr()
    assert "-1" in captured.err and "[1/1]" not in captured.out  # refused before the run banner
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--length-range", "5,3"], "min_digits=5"),
        (["--length-range", "0,3"], "min_digits"),
        (["--task", "countdown", "--length-range", "2,5"], "'digitsum' task only"),
        (["--task", "digitsum", "--model", "tiny"], "'digitsum-tiny' model"),
        (["--model", "digitsum-tiny", "--task", "countdown"], "'digitsum-tiny' model"),
        (["--preset", "fast", "--learning-rate", "-1"], "learning_rate"),
        (["--prompts-per-step", "3", "--micro-batch-size", "5"], "micro_batch_size=5"),
    ],
)
def test_bad_run_settings_are_refused_before_anything_is_created(tmp_path, capsys, argv, match):
    out = tmp_path / "new"
    assert main(["compare", *argv, "--out", str(out)]) == 2
    assert match in capsys.readouterr().err
    assert not out.exists()


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("keep me")
    assert main(["train", "--out", str(target), *FAST]) == 2
    assert f"{target} exists and is not a directory" in capsys.readouterr().err
    assert target.read_text() == "keep me"


def test_a_model_that_cannot_load_leaves_no_run_dir(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "runs"
    assert (
        main(["train", "--model", "no-such-org/no-such-model", "--task", "countdown", "--out", str(out)]) == 2
    )
    assert "no-such-org/no-such-model" in capsys.readouterr().err
    assert not out.exists()


def test_sigterm_means_ctrl_c(monkeypatch):
    """lab train/compare handle SIGTERM (a process manager's or the Launch tab's stop) as Ctrl-C."""
    import lab.runner

    def fake_comparison(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)

    monkeypatch.setattr(lab.runner, "run_comparison", fake_comparison)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        assert main(["train", "--out", "unused", *FAST]) == 130
    finally:
        signal.signal(signal.SIGTERM, previous)


FAST_TASK = ["--steps", "3", "--save-every", "2"]  # the default preset (digitsum task, small model)


@pytest.mark.slow
def test_default_compare_trains_seeds_in_parallel_and_writes_a_verdict(tmp_path):
    result = lab("compare", "--seeds", "2", "--probe-every", "2", "--out", str(tmp_path), *FAST_TASK)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert runs == sorted(f"{a}-s{s}" for a in ("grpo", "dapo", "dr_grpo", "delta_l") for s in (0, 1))
    verdict = read_json(tmp_path / "verdict.json")
    assert verdict["seeds"] == 2 and verdict["workers"] == 2
    # 6 pairs × (final reward, reward area, the held-out reward the fast preset evaluates at the end)
    assert (
        verdict["metrics"] == ["final_reward", "auc", "eval/heldout_reward"] and len(verdict["pairs"]) == 18
    )
    pair = verdict["pairs"][0]
    assert set(pair) >= {"a", "b", "metric", "mean_diff", "ci", "distinguishable"}
    assert pair["metric"] in ("final_reward", "auc") and len(pair["ci"]) == 2
    assert "Verdict over 2 seed(s)" in result.stdout
    reader = RunReader(tmp_path / "delta_l-s1")
    reader.poll()
    assert reader.config["preset"] == "fast" and reader.config["task"] == "digitsum"
    first = reader.metrics[0]
    assert first["agg_grad/cos/grpo~delta_l"] == pytest.approx(1.0, abs=1e-4)  # batch scope: one direction
    assert first["agg_grad/cos/dapo~dr_grpo"] == pytest.approx(1.0, abs=1e-4)
    assert [p["step"] for p in reader.probes] == [1, 3] and reader.probes[0]["param_fraction"] > 0.95
    # the same prompts and first samples for every aggregator of a seed
    lengths = set()
    for agg in ("grpo", "dapo", "dr_grpo", "delta_l"):
        r = RunReader(tmp_path / f"{agg}-s1")
        r.poll()
        lengths.add(tuple(r.samples[0]["lengths"]))
    assert len(lengths) == 1


@pytest.mark.slow
def test_ctrl_c_stops_parallel_workers_cleanly_and_resume_completes(tmp_path):
    args = [sys.executable, "-m", "lab.cli", "compare", "--aggregators", "grpo,delta_l", "--seeds", "2",
            "--steps", "40", "--save-every", "100", "--out", str(tmp_path)]  # fmt: skip
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        wait_for_steps(tmp_path / "grpo-s0", 2, proc)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
        assert proc.wait(timeout=300) == 130, proc.stderr.read()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    states = {p.name: read_json(p / "status.json")["state"] for p in tmp_path.iterdir() if p.is_dir()}
    assert "interrupted" in states.values() and "running" not in states.values()
    assert "finished" not in states.values(), states  # no queued run starts after Ctrl-C
    assert not (tmp_path / "verdict.json").exists()
    result = lab(*args[3:], "--resume", "--steps", "40")
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("grpo-s0", "grpo-s1", "delta_l-s0", "delta_l-s1"):
        assert steps_of(tmp_path / name) == list(range(1, 41)), name
    assert read_json(tmp_path / "verdict.json")["seeds"] == 2


class Exec(Exception):
    """Raised by the stand-in for os.execv: the command lab dashboard would become."""


def dashboard_exec(argv: list[str], monkeypatch, capsys, token: str | None = None) -> tuple[list[str], str]:
    def fake_execv(path, command):
        raise Exec(command)

    monkeypatch.setattr(os, "execv", fake_execv)
    if token is None:
        monkeypatch.delenv("LAB_LAUNCH_TOKEN", raising=False)
    else:
        monkeypatch.setenv("LAB_LAUNCH_TOKEN", token)
    with pytest.raises(Exec) as raised:
        main(["dashboard", *argv])
    return raised.value.args[0], capsys.readouterr().err


def test_dashboard_serves_localhost_without_telemetry(monkeypatch, capsys):
    command, err = dashboard_exec(["--runs-dir", "r"], monkeypatch, capsys)
    flags = dict(zip(command[5:15:2], command[6:15:2], strict=True))
    assert flags == {"--server.address": "127.0.0.1", "--server.port": "8501", "--server.headless": "true",
                     "--browser.gatherUsageStats": "false", "--client.toolbarMode": "viewer"}  # fmt: skip
    assert command[-3:] == ["--", "--runs-dir", "r"] and err == ""


def test_dashboard_on_the_network_warns(monkeypatch, capsys):
    command, err = dashboard_exec(["--host", "0.0.0.0", "--port", "8600"], monkeypatch, capsys)
    assert command[command.index("--server.address") + 1] == "0.0.0.0"
    assert "WARNING: serving on 0.0.0.0:8600" in err and "The Launch tab is disabled" in err
    _, err = dashboard_exec(["--host", "0.0.0.0"], monkeypatch, capsys, token="short")
    assert "shorter than 16 characters" in err
    _, err = dashboard_exec(["--host", "0.0.0.0"], monkeypatch, capsys, token="a-long-enough-secret")
    assert "asks for LAB_LAUNCH_TOKEN" in err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["dashboard", "--port", "70000"])


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


def subcommand_dests(name: str) -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest for a in sub.choices[name]._actions if a.dest != "help"}


def test_the_run_options_are_the_run_config_fields():
    """Each option of lab train/compare is defined once, as a RunConfig field (lab.run_config.option)."""
    fields = {f.name for f in run_options()}
    assert fields <= {f.name for f in dataclasses.fields(RunConfig)}
    comparison = {"seeds", "workers", "resume", "out"}
    assert subcommand_dests("train") == fields | comparison | {"aggregator"}
    assert subcommand_dests("compare") == fields | comparison | {"aggregators"}
    assert not fields & {"aggregator", "task_options", "comparison"}  # set by the runner, not by a flag


def test_options_not_given_keep_the_run_config_defaults_and_given_ones_reach_their_fields():
    parse = build_parser().parse_args
    assert config_from_args(parse(["train", "--out", "x"]), "delta_l") == RunConfig()
    args = parse(["train", "--seed", "3", "--eval-k", "2", "--report-to", "wandb, tensorboard", "--no-shaped-reward",
                  "--length-range", "3,5", "--log-texts", "--alpha", "auto", "--out", "x"])  # fmt: skip
    c = config_from_args(args, "grpo")
    assert (c.aggregator, c.seed, c.eval_k, c.report_to) == ("grpo", 3, 2, ["wandb", "tensorboard"])
    assert (c.shaped_reward, c.length_range, c.log_texts, c.alpha) == (False, (3, 5), True, "auto")


def test_generation_flag_reaches_the_run_config(tmp_path):
    parse = build_parser().parse_args
    args = parse(["train", "--generation", "static-cache", "--out", str(tmp_path), *FAST])
    assert config_from_args(args, "delta_l").generation == "static-cache"
    assert config_from_args(parse(["train", "--out", str(tmp_path), *FAST]), "delta_l").generation == "auto"


def test_unknown_generation_path_is_named(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compare", "--generation", "paged", "--out", "x"])
    assert "'paged'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown generation path 'paged'"):
        RunConfig(model="tiny", generation="paged").resolved()  # callers other than the cli


def test_generation_cannot_be_combined_with_vllm(tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["train", "--generation", "static-cache", "--vllm", "--out", str(out), *FAST]) == 2
    assert "--generation static-cache cannot be combined with --vllm" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("path", ["continuous-batching", "static-compile"])
def test_gpu_only_generation_paths_are_refused_without_cuda(tmp_path, capsys, monkeypatch, path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "runs"
    assert (
        main(["compare", "--aggregators", "grpo,delta_l", "--generation", path, "--out", str(out), *FAST])
        == 2
    )
    assert f"--generation {path} needs a CUDA GPU" in capsys.readouterr().err
    assert not out.exists()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert RunConfig(model="tiny", generation=path).resolved().generation == path


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
def test_compare_may_start_with_a_delta_l_label_of_its_own_alpha(tmp_path, monkeypatch):
    """``--aggregators delta_l-aauto`` (the two-worlds ΔL(auto) pass) or ``delta_l-a0.5,...`` first: the label is
    split before the base config is checked, and each run gets its own α."""
    import lab.runner

    planned = {}

    def plan_only(config, *, aggregators, seeds, out, resume, workers):
        plan = lab.runner.comparison_plan(
            config, aggregators=aggregators, seeds=seeds, out=out, resume=resume
        )
        planned.update({c.run_id: c.alpha for c, _ in plan})
        return []

    monkeypatch.setattr(lab.runner, "run_comparison", plan_only)
    out = tmp_path / "c"
    argv = [
        "compare",
        "--aggregators",
        "delta_l-aauto,delta_l-a0.5,dr_grpo",
        "--seeds",
        "1",
        "--out",
        str(out),
    ]
    assert main([*argv, *FAST]) == 0
    assert planned == {"delta_l-aauto-s0": "auto", "delta_l-a0.5-s0": 0.5, "dr_grpo-s0": 1.0}


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
    runs = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert runs == ["delta_l-s0", "delta_l-s1", "grpo-s0", "grpo-s1"]
    assert read_json(tmp_path / "verdict.json")["seeds"] == 2
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
    # 20 steps: a loaded machine must not finish the run before the signal arrives
    args = ["train", "--steps", "20", "--save-every", "100", "--out", str(tmp_path), *FAST]
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
    assert steps_of(run_dir) == list(range(1, 21))


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


@pytest.mark.slow
def test_knobs_reach_the_trainer(tmp_path):
    """Every knob of the fast task, end to end through lab train: optimizer, lr, α, scope, length range, equalize."""
    result = lab("train", "--aggregator", "grpo", "--optimizer", "sgd", "--learning-rate", "0.05",
                 "--equalize-step-size", "--length-range", "3,5", "--steps", "2", "--max-grad-norm", "0",
                 "--out", str(tmp_path))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    reader = RunReader(tmp_path / "grpo-s0")
    reader.poll()
    run = reader.config["run"]
    assert (run["optimizer"], run["learning_rate"], run["max_grad_norm"]) == ("sgd", 0.05, 0.0)
    assert run["task_options"] == {"min_digits": 3, "max_digits": 5} and run["max_completion_length"] == 18
    first = reader.metrics[0]
    assert first["aggregator/step_scale"] == pytest.approx(1 / first["aggregator/relative_scale"])
    assert max(max(s["lengths"]) for s in reader.samples) <= 18
    checkpoint = next((tmp_path / "grpo-s0" / "checkpoints").glob("checkpoint-*"))
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=False)
    assert "momentum_buffer" in str(optimizer["state"]) or not optimizer["state"]  # SGD keeps no Adam moments
    assert "exp_avg" not in str(optimizer["state"])
    result = lab("train", "--aggregator", "delta_l", "--alpha", "0.5", "--delta-l-scope", "group", "--steps", "1",
                 "--out", str(tmp_path))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    reader = RunReader(tmp_path / "delta_l-a0.5-s0")
    reader.poll()
    sample = reader.samples[0]
    expected = delta_l_row_weights(sample["lengths"], alpha=0.5, max_length=32, group_size=8).tolist()
    assert sample["weights"] == pytest.approx(expected, rel=1e-6)
    assert reader.metrics[0]["agg_grad/cos/grpo~delta_l"] < 0.9999  # group scope: another direction than GRPO


# ---------------------------------------------------------------------------------------------------
# reliability (docs/reliability.md): one writer, config identity, resume, faults, early checks
# ---------------------------------------------------------------------------------------------------
DIGITSUM = ["--seeds", "1", "--prompts-per-step", "2", "--num-generations", "4", "--threads", "1"]


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--out", ""], "--out: is empty"),
        (["--out", "/proc/lab-runs"], "is not writable"),
        (["--seed", "-1"], "seed must be an integer"),
        (["--report-to", "bogus"], "unknown integration"),
    ],
)
def test_bad_out_seed_and_report_to_are_refused_before_any_dir(tmp_path, capsys, argv, match):
    out = tmp_path / "out"
    args = ["train", "--out", str(out), *argv] if argv[0] != "--out" else ["train", *argv]
    with pytest.raises(SystemExit) if argv[1] == "" else contextlib.nullcontext():
        assert main(args) == 2
    assert match in capsys.readouterr().err
    assert not out.exists() and not (Path.cwd() / "delta_l-s0").exists()


@pytest.mark.slow
def test_a_second_writer_is_refused_at_once_naming_the_dir_and_pid(tmp_path):
    args = ["train", "--steps", "2000", "--save-every", "5000", "--out", str(tmp_path), *DIGITSUM]
    proc = start_lab(*args)
    run_dir = tmp_path / "delta_l-s0"
    try:
        wait_for_steps(run_dir, 1, proc)
        for second in (["train", *args[1:], "--resume"], ["compare", "--aggregators", "delta_l", *args[1:]]):
            before = (run_dir / "metrics.jsonl").read_bytes()
            started = time.time()
            result = lab(*second)
            assert result.returncode == 2, result.stderr[-2000:]
            message = result.stderr.strip().splitlines()[-1]
            assert f"{run_dir} is being written by process {proc.pid}" in message, message
            assert time.time() - started < 60 and (run_dir / "metrics.jsonl").read_bytes().startswith(before)
        from lab.dashboard import launch

        with pytest.raises(ValueError, match=f"being written by process {proc.pid}"):
            launch.plan_launch(
                tmp_path.parent, tmp_path.name, ["delta_l"], steps=60, seeds=1, extra="--resume"
            )
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    assert steps_of(run_dir) == list(range(1, len(steps_of(run_dir)) + 1))  # each step logged once


@pytest.mark.slow
def test_changed_settings_are_refused_and_config_json_is_kept(tmp_path):
    args = ["train", "--steps", "2", "--out", str(tmp_path), *DIGITSUM]
    assert lab(*args).returncode == 0
    run_dir = tmp_path / "delta_l-s0"
    config = (run_dir / "config.json").read_bytes()
    for changed, named in (
        (["--steps", "3"], "steps: 2 → 3"),
        (["--learning-rate", "1e-3"], "learning_rate"),
    ):
        for extra in ([], ["--resume"]):
            result = lab(*args, *changed, *extra)
            assert result.returncode == 2 and named in result.stderr, result.stderr[-2000:]
    assert "already finished, skipped" in lab(*args, "--threads", "2", "--resume").stdout  # harmless change
    assert (run_dir / "config.json").read_bytes() == config and steps_of(run_dir) == [1, 2]


def _interrupted(run_dir: Path) -> None:
    status = read_json(run_dir / "status.json")
    (run_dir / "status.json").write_text(json.dumps({**status, "state": "interrupted"}))


@pytest.mark.slow
def test_resume_takes_the_previous_checkpoint_when_the_latest_is_broken_and_refuses_without_one(tmp_path):
    args = ["train", "--steps", "3", "--save-every", "1", "--out", str(tmp_path), *DIGITSUM]
    assert lab(*args).returncode == 0
    run_dir = tmp_path / "delta_l-s0"
    weights = run_dir / "checkpoints" / "checkpoint-3" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) * 9 // 10])  # truncated: a save cut short
    _interrupted(run_dir)
    result = lab(*args, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"checkpoint skipped, broken file: {weights}: truncated" in result.stderr
    assert steps_of(run_dir) == [1, 2, 3] and read_json(run_dir / "status.json")["state"] == "finished"
    shutil.rmtree(run_dir / "checkpoints")
    _interrupted(run_dir)
    result = lab(*args, "--resume")
    assert result.returncode == 2 and "nothing to resume from: no intact checkpoint" in result.stderr
    assert "Traceback" not in result.stderr and steps_of(run_dir) == [1, 2, 3]


@pytest.mark.slow
def test_a_killed_worker_is_reported_the_others_finish_and_the_verdict_of_what_finished_is_written(tmp_path):
    args = ["compare", "--aggregators", "grpo,dapo,delta_l", "--workers", "2", "--steps", "40",
            "--save-every", "100", "--out", str(tmp_path), *DIGITSUM]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "lab.cli", *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    victim = tmp_path / "grpo-s0"
    try:
        wait_for_steps(victim, 1, proc)
        os.kill(int((victim / ".lock").read_text()), signal.SIGKILL)  # the lock holds the worker's PID
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err[-3000:]
    assert "grpo-s0: failed: worker process killed by SIGKILL; the other runs go on" in out
    assert err.strip().splitlines()[-1] == (
        "lab compare: error: 1 run(s) did not finish: grpo-s0: failed: worker process killed by SIGKILL"
    )
    states = {
        n: read_json(tmp_path / n / "status.json")["state"] for n in ("grpo-s0", "dapo-s0", "delta_l-s0")
    }
    assert states == {"grpo-s0": "failed", "dapo-s0": "finished", "delta_l-s0": "finished"}
    assert set(read_json(tmp_path / "verdict.json")["labels"]) == {"dapo", "delta_l"}


def test_a_full_disk_fails_the_run_in_one_line_keeps_the_log_and_resume_works(tmp_path, monkeypatch, capsys):
    import errno

    from lab import runlog

    real_append, calls = runlog.append_jsonl, []

    def append_until_full(path, record):
        if Path(path).name == "metrics.jsonl":
            calls.append(record["step"])
            if record["step"] == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        real_append(path, record)

    args = ["train", "--steps", "3", "--save-every", "1", "--out", str(tmp_path), *DIGITSUM]
    monkeypatch.setattr(runlog, "append_jsonl", append_until_full)
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    run_dir = tmp_path / "delta_l-s0"
    assert err[-1].endswith(  # after the progress bar's unfinished line
        f"lab train: error: {run_dir}: no space left on the device: free some space, then continue with --resume"
    )
    status = read_json(run_dir / "status.json")
    assert status["state"] == "failed" and "no space left on the device" in status["error"]
    assert steps_of(run_dir) == [1] and not list(run_dir.rglob("*.tmp"))
    monkeypatch.setattr(runlog, "append_jsonl", real_append)  # space again
    assert main([*args, "--resume"]) == 0
    assert steps_of(run_dir) == [1, 2, 3] and read_json(run_dir / "status.json")["state"] == "finished"


def test_a_failure_before_the_first_step_leaves_no_run_dir(tmp_path, monkeypatch, capsys):
    from lab.trainer import DeltaLGRPOTrainer

    def fail(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(DeltaLGRPOTrainer, "train", fail)
    out = tmp_path / "new" / "out"
    assert main(["train", "--steps", "2", "--out", str(out), *DIGITSUM]) == 1
    assert "no space left on the device" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
