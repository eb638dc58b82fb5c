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


def test_variance_vs_length_within_prompt_slope_ignores_prompt_offsets():
    """One intercept per prompt: offsets between prompts do not leak into the slope."""
    import torch

    vvl = load("variance_vs_length")
    lengths = torch.tensor([5.0, 10, 20, 100, 200, 300], dtype=torch.float64)
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    variances = 3.0 * lengths + torch.tensor([0.0, 0, 0, 5000, 5000, 5000], dtype=torch.float64)
    assert vvl.within_prompt_slope(lengths, variances, groups) == pytest.approx(3.0)
    assert vvl.json_safe({"a": [float("nan"), 1.0], "b": float("inf")}) == {"a": [None, 1.0], "b": None}
    with pytest.raises(SystemExit):
        vvl.parse_args(["--num-generations", "2"])


def test_stored_variance_measurement_matches_its_rows():
    """The stored result has the keys the notebooks and README read, and its fits follow from its rows."""
    import torch

    from lab.probes import variance_length_fit

    stored = json.loads((BENCH / "results" / "variance_vs_length.smollm2.json").read_text(encoding="utf-8"))
    for key in ("slope", "intercept", "exponent", "n", "lengths_min", "lengths_max", "command"):
        assert stored[key] is not None, key
    for key in ("slope_ci", "intercept_ci", "exponent_ci"):
        lo, hi = stored[key]
        assert lo < hi, key
    rows = stored["rows"]
    lengths = torch.tensor(rows["length"], dtype=torch.float64)
    estimates = torch.tensor([float("nan") if v is None else v for v in rows["grad_variance"]])
    fit = variance_length_fit(lengths, estimates)
    assert fit["slope"] == pytest.approx(stored["slope"]) and fit["exponent"] == pytest.approx(
        stored["exponent"]
    )
    assert stored["n"] == fit["n"] >= 64 and len(set(rows["prompt"])) >= 8
    assert (stored["lengths_min"], stored["lengths_max"]) == (min(rows["length"]), max(rows["length"]))


def test_gpu_generation_quick_measures_every_arm_through_the_trainer(tmp_path):
    gen = load("gpu_generation")
    out = tmp_path / "gen.json"
    result = gen.main(["--quick", "--device", "cpu", "--threads", "1", "--json", str(out)])
    stored = json.loads(out.read_text())
    assert stored["arms"].keys() == result["arms"].keys() == set(gen.DEFAULT_ARMS)
    for key in ("device", "device_name", "load_before", "load_after", "shape", "versions", "fastest"):
        assert key in stored, key
    for name, arm in stored["arms"].items():
        assert arm["error"] or arm["tokens_per_s"] > 0, name  # measured, or failed with its reason
        assert arm["error"] is None or isinstance(arm["error"], str)
    assert stored["arms"]["generate"]["ratio_to_generate"] == 1.0
    # the same sampling in every arm; only the generation path's own fields differ
    path_fields = ("cache_implementation", "disable_compile", "continuous_batching", "prefill_prompts_once")
    sampling = [
        {k: v for k, v in a["sampling"].items() if k not in path_fields} for a in stored["arms"].values()
    ]
    assert all(s == sampling[0] for s in sampling)
    assert sampling[0] | {"max_new_tokens": None} == {
        "do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": None,
        "repetition_penalty": 1.0, "max_new_tokens": None,
    }  # fmt: skip
    compiled = stored["arms"]["static-compile"]["sampling"]
    assert compiled["cache_implementation"] == "static" and compiled["disable_compile"] is False
    assert stored["arms"]["continuous-batching"]["sampling"]["continuous_batching"] is True
    assert stored["arms"]["prefill-once"]["sampling"]["prefill_prompts_once"] is True


def test_gpu_generation_arms_are_the_lab_generation_flag():
    gen = load("gpu_generation")
    from lab.runner import GENERATION_CHOICES

    assert set(gen.ARMS) == set(GENERATION_CHOICES) - {"auto"}
    args = gen.parse_args(["--device", "cuda", "--arms", "static-cache,generate"])
    assert args.arms == ["generate", "static-cache"]  # the baseline first
    assert (args.prompts, args.num_generations) == (16, 8)
    with pytest.raises(SystemExit):
        gen.parse_args(["--arms", "generate,vllm"])


def _probe_run(root: Path, name: str, probe_steps: tuple[int, ...]) -> Path:
    writer = RunWriter(root / name)
    writer.write_config({"aggregator": "delta_l", "label": name.rsplit("-s", 1)[0], "seed": 0,
                         "task": "paperworld", "model": "paperworld-tiny", "max_steps": 6})  # fmt: skip
    for step in range(1, 7):
        row = {"step": step, "step_time": 0.5, "reward": 0.5, "delta_l/alpha": 1.0 + step / 10}
        if step in probe_steps:
            row |= {"step_time": 4.5, "probe/seconds": 4.0}
        writer.log_metrics(row)
    writer.set_status("finished", 6, 6)
    return root / name


def test_probe_cost_prices_the_probe_against_a_plain_step(tmp_path):
    probe_cost = load("probe_cost")
    costs = probe_cost.run_costs(_probe_run(tmp_path, "delta_l-aauto-s0", (1, 4)))
    assert costs["probe_s"] == [4.0, 4.0] and costs["step_s_plain"] == [0.5] * 4
    assert costs["alpha"][0] == [1, 1.1]
    summary = probe_cost.task_summary([costs])
    assert summary["overhead_at_every"]["2"] == pytest.approx(4.0 / (2 * 0.5))  # probe / (K * step)
    # what the run pays: the probed step's extra time (here 4.5 - 0.5), not only the probe's own timer
    assert summary["step_overhead_at_every"]["2"] == pytest.approx((4.5 - 0.5) / (2 * 0.5))
    assert summary["n_probes"] == 2
    # lab train --out DIR puts its run dir inside DIR: the reader finds it there
    (inner,) = probe_cost.run_dirs([tmp_path])
    assert inner.name == "delta_l-aauto-s0"


def test_probe_cost_refuses_a_missing_runs_dir(tmp_path):
    with pytest.raises(SystemExit, match="not a directory"):
        load("probe_cost").run_dirs([tmp_path / "nope"])


def test_lr_sweep_refuses_bad_rates():
    lr_sweep = load("lr_sweep")
    assert lr_sweep.parse_lrs("0.1,1") == [0.1, 1.0]
    for bad in ("", "0.1,x", "0", "-1", "1000"):
        with pytest.raises(SystemExit, match="--lrs"):
            lr_sweep.parse_lrs(bad)


def test_lr_sweep_corrects_over_every_rate():
    """Holm over all the sweep's tests: a raw p of 0.02 at each of 3 rates is not distinguishable."""
    lr_sweep = load("lr_sweep")
    rates = {lr: {"verdict": {"pairs": [{"p_value": 0.02}, {"p_value": 0.5}]}} for lr in ("0.1", "1", "3")}
    rates["10"] = {"verdict": {"pairs": [{"p_value": 0.001}, {"p_value": None}]}}
    assert lr_sweep.correct_over_sweep(rates) == 7
    assert rates["10"]["verdict"]["pairs"][0]["distinguishable_sweep"]  # 0.001 * 7 < 0.05
    assert not rates["0.1"]["verdict"]["pairs"][0]["distinguishable_sweep"]  # Holm: 0.02 * 6 > 0.05
    assert "p_holm_sweep" not in rates["10"]["verdict"]["pairs"][1]


def test_two_worlds_keeps_the_cells_it_does_not_run(tmp_path, monkeypatch):
    two_worlds = load("two_worlds")
    stored = tmp_path / "tw.json"
    stored.write_text(json.dumps({"cells": {"digitsum/adamw": {"wall_seconds": 12.0}}, "worlds": {"digitsum": {}},
                                  "wall_seconds": 99.0}))  # fmt: skip
    monkeypatch.setattr(two_worlds, "measure_world", lambda world, rows: {"variance_fit": {}})
    monkeypatch.setattr(two_worlds, "print_table", lambda summary: None)
    two_worlds.main(["--out", str(tmp_path / "runs"), "--json", str(stored), "--worlds", "digitsum",
                     "--optimizers", "adamw", "--resummarize"])  # fmt: skip
    kept = json.loads(stored.read_text())
    assert kept["cells"]["digitsum/adamw"]["wall_seconds"] == 12.0 and kept["wall_seconds"] == 99.0
