"""Pure logic of the benchmark scripts (no training): cpu_compare's run-log summary and argument pass-through."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from lab.runlog import RunWriter

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_compare_summarizes_a_run_dir(tmp_path):
    cpu_compare = load("cpu_compare")
    writer = RunWriter(tmp_path / "delta_l-s0")
    writer.write_config({"aggregator": "delta_l", "seed": 0, "max_steps": 3, "created": 1000.0})
    for step, reward in ((1, 0.25), (2, 0.5), (3, 0.75)):
        writer.log_metrics(
            {"step": step, "wall_time": 1000.0 + 10 * step, "step_time": 9.0, "reward": reward}
        )
    writer.set_status("finished", 3, 3)
    status = json.loads((tmp_path / "delta_l-s0" / "status.json").read_text())
    status["updated"] = 1031.5
    (tmp_path / "delta_l-s0" / "status.json").write_text(json.dumps(status))

    s = cpu_compare.summarize_run(tmp_path / "delta_l-s0")
    assert s["aggregator"] == "delta_l" and s["state"] == "finished" and s["steps"] == 3
    assert s["wall_s"] == pytest.approx(31.5) and s["sum_step_time_s"] == pytest.approx(27.0)
    assert (s["reward_first"], s["reward_last"]) == (0.25, 0.75)
    assert s["step_walls_s"] == [10.0, 10.0, 10.0]  # the first from config.json's "created"


def test_cpu_compare_summarizes_an_empty_run_dir(tmp_path):
    s = load("cpu_compare").summarize_run(tmp_path)
    assert s["steps"] == 0 and s["wall_s"] is None and s["reward_first"] is None


def test_cpu_compare_passes_unknown_arguments_through():
    cpu_compare = load("cpu_compare")
    args, extra = cpu_compare.parse_args(["--quick", "--json", "x.json", "--threads", "2"])
    assert args.json == Path("x.json")
    assert extra == [*cpu_compare.QUICK_ARGS, "--threads", "2"]
    with pytest.raises(SystemExit):
        cpu_compare.parse_args(["--", "--out", "elsewhere"])


def test_cpu_compare_train_runs_one_aggregator(monkeypatch, tmp_path):
    cpu_compare = load("cpu_compare")
    ran = []
    monkeypatch.setattr(
        cpu_compare.subprocess, "run", lambda cmd, **kw: ran.append(cmd) or SimpleNamespace(returncode=0)
    )
    s = cpu_compare.main(
        ["--train", "--out", str(tmp_path / "b"), "--quiet", "--", "--max-completion-length", "256"]
    )
    assert ran[0][2:] == ["lab.cli", *cpu_compare.TRAIN_ARGS, *cpu_compare.DEMO_FLAGS, "--out", str(tmp_path / "b"),
                          "--max-completion-length", "256"]  # fmt: skip
    assert s["runs"] == [] and s["median_step_s"] is None and not s["step_target_met"]
    assert s["peak_rss_gb"] >= 0 and "rss_target_met" in s


def test_qwen_throughput_defaults_follow_the_device():
    qwen = load("qwen_throughput")
    quick = qwen.parse_args(["--quick", "--device", "cpu"])
    assert (quick.gen_batch, quick.new_tokens, quick.grad_checkpointing) == (2, 16, False)
    gpu = qwen.parse_args(["--device", "cuda", "--size", "1.5b"])
    assert (gpu.gen_batch, gpu.new_tokens, gpu.grad_checkpointing) == (64, 512, True)
