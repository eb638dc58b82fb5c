"""Where one training step of the CPU demo spends its time and its memory, and what a setting changes.

What it measures
    ``lab.runner.train_run`` exactly as ``lab train`` runs it (the embedded SmolLM2-135M + LoRA, the demo
    settings of ``lab.tasks.DEMO``), for ``--steps`` steps, in a fresh subprocess per measurement (so peak
    RSS is that run's alone). Inside, timers wrap TRL's phases of a step:

    - ``generate``: ``_generate_single_turn`` (``transformers.generate`` or continuous batching);
    - ``score``: the rest of ``_generate_and_score_completions`` (rewards, advantages, ΔL weights, logging);
    - ``forward``: ``compute_loss`` (the policy forward over prompt + completion, TRL's loss);
    - ``backward``: ``accelerator.backward``;
    - ``other``: the rest of the step's wall time (optimizer, clipping, callbacks, run log, checkpoints).

    A thread samples the process's RSS every 5 ms and keeps the peak seen during each phase. On the first
    forward, a ``saved_tensors_hooks`` pair adds up the bytes autograd keeps for the backward (the activation
    memory), by the module that saved them (layer index stripped; frozen weights not counted).

    ``--variant NAME:key=value,...`` compares settings (each run ``--repeats`` times, the variants interleaved
    A, B, A, B so both see the same machine load). Keys: any ``RunConfig`` field (``micro_batch_size=4``,
    ``max_completion_length=256``) and any ``SpeedConfig`` field (``activation_checkpointing=true``,
    ``use_transformers_continuous_batching=true``), plus ``attn=eager|sdpa`` (the model's attention kernel),
    ``cpu_gqa=false`` (transformers' own ``repeat_kv`` instead of lab.speed's grouped-query SDPA on CPU),
    ``omp_wait_policy=ACTIVE`` (OpenMP threads spin while waiting, libgomp's default; lab.cli sets PASSIVE) and
    ``cb_max_memory_percent=0.02`` (continuous batching's KV-cache reservation; its default, 0.5, reserves half
    of the machine's memory).

Usage::

    .venv/bin/python benchmarks/cpu_step_profile.py                          # the demo as configured
    .venv/bin/python benchmarks/cpu_step_profile.py --steps 3 --repeats 2 \\
        --variant base: --variant mb4:micro_batch_size=4 --json out.json
    .venv/bin/python benchmarks/cpu_step_profile.py --steps 4 --variant before:$BEFORE --variant after:
    # BEFORE=prefill_prompts_once=false,forward_prompts_once=false,cache_implementation=none,cpu_gqa=false,
    #        omp_wait_policy=ACTIVE   (the lab before issue 11)
    .venv/bin/python benchmarks/cpu_step_profile.py --quick                  # tiny model, smoke run

Printed: per variant, the median over steps (after the first, which includes one-time set-up) of each phase,
the step's wall time, the peak RSS per phase and overall, and the activation bytes by module.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import lab.cli  # noqa: F401  (before torch: lab's OpenMP wait policy, as under `lab train`)

# isort: split

PHASES = ("generate", "score", "forward", "backward", "other")
_PAGE = os.sysconf("SC_PAGE_SIZE")


# --------------------------------------------------------------------------------------------------
# the worker: one train_run with timers and an RSS sampler
# --------------------------------------------------------------------------------------------------
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class PhaseMonitor:
    """Wall time per phase and step, and the peak RSS seen while each phase ran (5 ms sampling)."""

    def __init__(self) -> None:
        self.stack: list[str] = []
        self.times: dict[str, float] = defaultdict(float)  # this step's
        self.peaks: dict[str, int] = defaultdict(int)  # whole run
        self.step_peaks: dict[str, int] = defaultdict(int)  # this step's
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            rss = _rss_bytes()
            self.peak = max(self.peak, rss)
            phase = self.stack[-1] if self.stack else "other"
            self.peaks[phase] = max(self.peaks[phase], rss)
            self.step_peaks[phase] = max(self.step_peaks[phase], rss)

    @contextmanager
    def phase(self, name: str):
        self.stack.append(name)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] += time.perf_counter() - t0
            self.stack.pop()
            # the time of a nested phase is not counted again in its parent
            for outer in self.stack[-1:]:
                self.times[outer] -= time.perf_counter() - t0

    def take_step(self) -> tuple[dict[str, float], dict[str, int]]:
        """This step's times and peak RSS per phase; starts the next step's."""
        step, self.times = dict(self.times), defaultdict(float)
        peaks, self.step_peaks = dict(self.step_peaks), defaultdict(int)
        return step, peaks

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _category(module_name: str) -> str:
    name = re.sub(r"(^|\.)base_model\.model\.", r"\1", module_name)
    name = re.sub(r"\.layers\.\d+\.", ".layers.*.", name)
    return re.sub(r"\.default$", "", name) or "(model)"


@contextmanager
def saved_activation_bytes(model, into: dict[str, int]):
    """Add up the bytes autograd saves for the backward, by the innermost module running when saved."""
    import torch

    frozen = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    stack: list[str] = []
    names = {m: n for n, m in model.named_modules()}

    def enter(module, args) -> None:
        stack.append(names.get(module, type(module).__name__))

    def leave(module, args, output) -> None:  # must return None: a returned value replaces the output
        if stack:
            stack.pop()

    handles = [
        torch.nn.modules.module.register_module_forward_pre_hook(enter),
        torch.nn.modules.module.register_module_forward_hook(leave),
    ]

    def pack(t):
        if isinstance(t, torch.Tensor) and t.device.type == "cpu":
            ptr = t.untyped_storage().data_ptr()
            if ptr not in frozen and ptr not in seen:
                seen.add(ptr)
                into[_category(stack[-1]) if stack else "(outside modules)"] += t.untyped_storage().nbytes()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
    finally:
        for h in handles:
            h.remove()


def _coerce(text: str) -> Any:
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def parse_settings(text: str) -> dict[str, Any]:
    """'a=1,b=true' → {'a': 1, 'b': True}."""
    settings = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        if "=" not in item:
            raise ValueError(f"setting {item!r} is not key=value")
        key, value = item.split("=", 1)
        settings[key.strip()] = _coerce(value.strip())
    return settings


def worker(settings: dict[str, Any], steps: int, model: str, threads: int | None) -> dict[str, Any]:
    import torch
    from accelerate import Accelerator

    import lab.runner as runner
    from lab.runlog import SAMPLES
    from lab.speed import SpeedConfig, SpeedTrainer

    settings = dict(settings)
    attn = settings.pop("attn", None)
    from transformers.integrations import sdpa_attention

    from lab.speed import apply_cpu_patches

    original_gqa = sdpa_attention.use_gqa_in_sdpa
    apply_cpu_patches()  # what lab.runner does on CPU (this worker process ends after one arm)
    if settings.pop("cpu_gqa", True) is False:  # transformers' own repeat_kv instead of lab.speed's patch
        sdpa_attention.use_gqa_in_sdpa = original_gqa
    if (cb_memory := settings.pop("cb_max_memory_percent", None)) is not None:  # a dict field, by one number
        settings["transformers_continuous_batching_config"] = {"max_memory_percent": cb_memory}
    run_fields = {f.name for f in dataclasses.fields(runner.RunConfig)}
    run_settings = {k: settings.pop(k) for k in list(settings) if k in run_fields}
    trl_fields = {f.name for f in dataclasses.fields(SpeedConfig)}
    unknown = [k for k in settings if k not in trl_fields]
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}: not a RunConfig or SpeedConfig field, nor attn")

    monitor = PhaseMonitor()
    record: dict[str, Any] = {"steps": [], "activation_bytes": defaultdict(int)}

    original_trl_args = runner._trl_args

    def trl_args(c, run_dir):
        args = original_trl_args(c, run_dir)
        for key, value in settings.items():
            setattr(args, key, value)
            if key in ("activation_checkpointing", "gradient_checkpointing"):
                args.activation_checkpointing = args.gradient_checkpointing = (
                    value  # transformers 5 keeps both
                )
        record["trl"] = {
            k: getattr(args, k)
            for k in (
                "activation_checkpointing",
                "prefill_prompts_once",
                "forward_prompts_once",
                "use_transformers_continuous_batching",
                "per_device_train_batch_size",
                "gradient_accumulation_steps",
                *settings,
            )
        }
        return args

    runner._trl_args = trl_args
    if attn is not None:
        original_load = runner.load_model_and_tokenizer

        def load(name, **kw):
            m, t = original_load(name, **kw)
            m.set_attn_implementation(attn)
            return m, t

        runner.load_model_and_tokenizer = load

    def timed(cls, method: str, phase: str, first_hook=None):
        original = getattr(cls, method)

        def wrapper(self, *a, **kw):
            with monitor.phase(phase):
                if first_hook is not None and not record.get("activations_measured"):
                    record["activations_measured"] = True
                    with first_hook(self):
                        return original(self, *a, **kw)
                return original(self, *a, **kw)

        setattr(cls, method, wrapper)

    timed(SpeedTrainer, "_generate_single_turn", "generate")
    timed(SpeedTrainer, "_generate_and_score_completions", "score")
    timed(
        SpeedTrainer,
        "compute_loss",
        "forward",
        first_hook=lambda self: saved_activation_bytes(self.model, record["activation_bytes"]),
    )
    timed(Accelerator, "backward", "backward")

    original_on_log = runner.RunLogCallback.on_log
    last = {"t": None}

    def on_log(self, args, state, control, logs=None, **kw):
        if state.is_world_process_zero and logs and "loss" in logs:
            now = time.perf_counter()
            parts, peaks = monitor.take_step()
            wall = now - last["t"] if last["t"] is not None else logs.get("step_time")
            last["t"] = now
            parts["other"] = max(0.0, wall - sum(v for k, v in parts.items() if k != "other"))
            record["steps"].append(
                {
                    "step": int(state.global_step),
                    "wall_s": wall,
                    **parts,
                    "load": os.getloadavg()[0],
                    "peak_rss_by_phase_bytes": peaks,
                }
            )
        return original_on_log(self, args, state, control, logs=logs, **kw)

    runner.RunLogCallback.on_log = on_log
    original_begin = runner.RunLogCallback.on_train_begin

    def on_train_begin(self, args, state, control, **kw):
        last["t"] = time.perf_counter()
        monitor.take_step()
        record["rss_at_start_bytes"] = _rss_bytes()  # model, LoRA, optimizer-to-be, libraries
        return original_begin(self, args, state, control, **kw)

    runner.RunLogCallback.on_train_begin = on_train_begin

    config = runner.RunConfig(model=model, steps=steps, threads=threads, save_every=10**6, **run_settings)
    with tempfile.TemporaryDirectory(prefix="step-profile-") as tmp:
        t0 = time.perf_counter()
        runner.train_run(config, Path(tmp) / "run")
        record["total_s"] = time.perf_counter() - t0
        samples = [json.loads(line) for line in (Path(tmp) / "run" / SAMPLES).read_text().splitlines()]
    monitor.stop()
    import resource

    record["completion_lengths"] = [s["lengths"] for s in samples]
    record["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    record["peak_rss_by_phase_bytes"] = dict(monitor.peaks)
    record["threads"] = torch.get_num_threads()
    record["resolved"] = {
        k: v for k, v in dataclasses.asdict(config.resolved()).items() if k in ("micro_batch_size",)
    }
    return record


# --------------------------------------------------------------------------------------------------
# the driver: variants × repeats in subprocesses, then a table
# --------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model preset (default smollm2-135m; tiny with --quick)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per run (default 3)")
    p.add_argument("--repeats", type=int, default=1, help="runs per variant, interleaved (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: lab's own choice)")
    p.add_argument(
        "--variant",
        action="append",
        default=None,
        help="NAME:key=value,... (repeatable; default one variant 'default' with no change)",
    )
    p.add_argument("--quick", action="store_true", help="tiny model, 2 steps (a smoke run)")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.model is None:
        args.model = "tiny" if args.quick else "smollm2-135m"
    if args.quick:
        args.steps = min(args.steps, 2)
    if args.steps < 2 or args.repeats < 1:
        p.error("--steps must be >= 2 (the first step is set-up) and --repeats >= 1")
    variants = {}
    for v in args.variant or ["default:"]:
        name, _, settings = v.partition(":")
        try:
            variants[name or "default"] = parse_settings(settings)
        except ValueError as err:
            p.error(str(err))
    args.variants = variants
    return args


def run_worker(args: argparse.Namespace, settings: dict[str, Any]) -> dict[str, Any]:
    settings = dict(settings)
    env = dict(os.environ)
    if (policy := settings.pop("omp_wait_policy", None)) is not None:  # read by libgomp at start-up
        env["OMP_WAIT_POLICY"] = str(policy)
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            out.name,
            "--model",
            args.model,
            "--steps",
            str(args.steps),
            "--variant",
            "w:" + ",".join(f"{k}={v}" for k, v in settings.items()),
        ]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
        return json.loads(Path(out.name).read_text())


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    steps = [s for r in records for s in r["steps"][1:]]  # the first step of a run includes set-up
    med = {k: statistics.median(s.get(k, 0.0) for s in steps) for k in ("wall_s", *PHASES)}
    by_phase: dict[str, int] = defaultdict(int)
    for r in records:
        for k, v in r["peak_rss_by_phase_bytes"].items():
            by_phase[k] = max(by_phase[k], v)
    return {
        "median_s": {k: round(v, 2) for k, v in med.items()},
        "step_walls_s": [round(s["wall_s"], 2) for s in steps],
        "loads": [round(s["load"], 2) for s in steps],
        "peak_rss_gb": round(max(r["peak_rss_bytes"] for r in records) / 1e9, 2),
        "peak_rss_by_phase_gb": {k: round(v / 1e9, 2) for k, v in by_phase.items()},
        "first_step_peak_rss_by_phase_gb": {
            k: round(v / 1e9, 2) for k, v in records[0]["steps"][0]["peak_rss_by_phase_bytes"].items()
        },
        "rss_at_start_gb": round(records[0]["rss_at_start_bytes"] / 1e9, 2),
        "activation_gb": {
            k: round(v / 1e9, 3)
            for k, v in sorted(records[0]["activation_bytes"].items(), key=lambda kv: -kv[1])
        },
        "activation_total_gb": round(sum(records[0]["activation_bytes"].values()) / 1e9, 3),
        "trl": records[0].get("trl"),
        "micro_batch_size": records[0]["resolved"]["micro_batch_size"],
        "threads": records[0]["threads"],
        "completion_lengths": [r["completion_lengths"] for r in records],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.worker:
        (settings,) = args.variants.values()
        record = worker(settings, args.steps, args.model, args.threads)
        Path(args.worker).write_text(json.dumps(record))
        return record
    records: dict[str, list[dict[str, Any]]] = {name: [] for name in args.variants}
    load_before = [round(x, 2) for x in os.getloadavg()]
    for _ in range(args.repeats):
        for name, settings in args.variants.items():
            t0 = time.perf_counter()
            records[name].append(run_worker(args, settings))
            print(f"  {name}: run {len(records[name])} took {time.perf_counter() - t0:.0f} s", flush=True)
    summary = {
        "benchmark": "cpu_step_profile",
        "model": args.model,
        "steps_per_run": args.steps,
        "repeats": args.repeats,
        "variants": {
            name: {"settings": args.variants[name], **summarize(rs)} for name, rs in records.items()
        },
        "load_average_before": load_before,
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "cpu_count": os.cpu_count(),
    }
    print_table(summary)
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def print_table(s: dict[str, Any]) -> None:
    print(
        f"\n{s['model']}: {s['steps_per_run']} steps × {s['repeats']} run(s) per variant; medians of steps 2+"
    )
    head = f"{'variant':<14}{'step':>7}" + "".join(f"{p:>10}" for p in PHASES) + f"{'peak RSS':>10}"
    print(head + "   (seconds; GB)")
    for name, v in s["variants"].items():
        m = v["median_s"]
        print(
            f"{name:<14}{m['wall_s']:>7.1f}"
            + "".join(f"{m[p]:>10.2f}" for p in PHASES)
            + f"{v['peak_rss_gb']:>10.2f}"
        )
    for name, v in s["variants"].items():
        print(
            f"\n{name}: RSS at the start of training {v['rss_at_start_gb']} GB; peak RSS by phase (GB) in step 1 "
            f"{v['first_step_peak_rss_by_phase_gb']}, over the run {v['peak_rss_by_phase_gb']}; loads {v['loads']}"
        )
        top = list(v["activation_gb"].items())[:8]
        print(f"  saved for backward, first micro-batch: {v['activation_total_gb']} GB; largest: {top}")
    print(f"\nload average before {s['load_average_before']}, after {s['load_average_after']}")


if __name__ == "__main__":
    main()
