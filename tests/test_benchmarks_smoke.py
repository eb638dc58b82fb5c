"""Pure logic of the benchmark scripts (no training): cpu_compare's run-log summary and argument pass-through."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

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


def test_qwen_throughput_defaults_follow_the_device():
    qwen = load("qwen_throughput")
    quick = qwen.parse_args(["--quick", "--device", "cpu"])
    assert (quick.gen_batch, quick.new_tokens, quick.grad_checkpointing) == (2, 16, False)
    gpu = qwen.parse_args(["--device", "cuda", "--size", "1.5b"])
    assert (gpu.gen_batch, gpu.new_tokens, gpu.grad_checkpointing) == (64, 512, True)


def test_fast_compare_summarizes_a_run_dir_with_its_curves(tmp_path):
    fast = load("fast_compare")
    writer = RunWriter(tmp_path / "grpo-s1")
    writer.write_config({"aggregator": "grpo", "label": "grpo", "seed": 1})
    for step in (1, 2, 3):
        writer.log_metrics({"step": step, "step_time": 0.1 * step, "reward": step / 4,
                            "agg_grad/cos/grpo~delta_l": 1.0, "probe/seconds": 0.5})  # fmt: skip
    writer.set_status("finished", 3, 3)
    s = fast.run_summary(tmp_path / "grpo-s1")
    assert (s["label"], s["seed"], s["steps"], s["state"]) == ("grpo", 1, 3, "finished")
    assert s["median_step_s"] == pytest.approx(0.2) and s["probe_seconds"] == [0.5] * 3
    assert (
        s["curves"]["reward"] == [[1, 0.25], [2, 0.5], [3, 0.75]]
        and s["curves"]["completions/mean_length"] == []
    )
    _, extra = fast.parse_args(["--quick", "--", "--optimizer", "sgd"])
    assert extra == [*fast.QUICK_ARGS, "--optimizer", "sgd"]
    with pytest.raises(SystemExit):
        fast.parse_args(["--", "--out", "elsewhere"])
