"""Device policy: which generation path, precision and thread count a run gets on this machine (measured choices).

TRL's generation paths as config fields (:data:`GENERATION_PATHS`), the checks that refuse a path or vLLM
where it cannot run, :func:`device_settings` (the per-device switches a run's TRL config gets) and the
CPU thread count.
"""

from __future__ import annotations

import importlib.util
import os
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from lab.run_config import RunConfig

#: ``--generation``: TRL's generation paths as GRPOConfig/DeltaLGRPOConfig fields (benchmarks/gpu_generation.py
#: measures each). ``auto`` (the default) is :func:`device_settings`' per-device choice.
#: The presets of the lab's own small models (one batched probe backward, the whole step in one micro-batch,
#: TRL's plain generation path).
SMALL_MODEL_PRESETS = ("fast", "paper-world")
GENERATION_PATHS: dict[str, dict[str, Any]] = {
    "generate": {},  # transformers' generate with a dynamic KV cache (TRL's default)
    "continuous-batching": {"use_transformers_continuous_batching": True},  # transformers' paged engine
    "static-cache": {"cache_implementation": "static"},
    "static-compile": {"cache_implementation": "static", "compile_generation": True},  # CUDA only
    "prefill-once": {"prefill_prompts_once": True},  # the lab's: each prompt prefilled once (lab.speed)
}
GENERATION_CHOICES = ("auto", *GENERATION_PATHS)
GPU_ONLY_GENERATION = {  # why each is refused without CUDA
    "static-compile": "transformers compiles generation only there; use --generation static-cache",
    "continuous-batching": "on CPU transformers sizes its KV cache at half the machine's RAM, and it was slower "
    "than generate there (benchmarks/gpu_generation.py --quick)",
}


def check_vllm(gpu_memory_utilization: float) -> None:
    """ValueError (before anything is created) unless vLLM can run here: importable, a CUDA GPU, a sane fraction."""
    if not 0 < gpu_memory_utilization < 1:
        raise ValueError(f"vllm_gpu_memory_utilization must be in (0, 1), got {gpu_memory_utilization!r}")
    if importlib.util.find_spec("vllm") is None:
        raise ValueError(
            "--vllm needs the vllm package, which is not installed in this environment: install a version TRL "
            "supports on a CUDA machine (`pip install 'trl[vllm]'`), or drop --vllm to generate with transformers"
        )
    if not torch.cuda.is_available():
        raise ValueError("--vllm needs a CUDA GPU (vLLM does not run on this machine's CPU); drop --vllm")


def check_generation(generation: str, vllm: bool) -> None:
    """ValueError unless ``generation`` names a path that can run here (and vLLM is not also asked for)."""
    if generation not in GENERATION_CHOICES:
        raise ValueError(
            f"unknown generation path {generation!r}; expected one of {', '.join(GENERATION_CHOICES)}"
        )
    if vllm and generation != "auto":
        raise ValueError(
            f"--generation {generation} cannot be combined with --vllm (vLLM does the generation)"
        )
    if generation in GPU_ONLY_GENERATION and not torch.cuda.is_available():
        raise ValueError(f"--generation {generation} needs a CUDA GPU: {GPU_ONLY_GENERATION[generation]}")


def device_settings(c: RunConfig, on_gpu: bool) -> dict[str, Any]:
    """TRL/transformers switches that trade memory against time, per device (measured choices).

    GPU: bf16 and activation checkpointing (TRL's defaults). CPU (measured on the demo, 2 cores:
    benchmarks/cpu_step_profile.py, benchmarks/prompt_sharing.py): fp32 (bf16 was not faster), no
    checkpointing, each distinct prompt prefilled once in generation and forwarded once per micro-batch in
    the loss, micro-batches cut by prompt (all exact; lab.speed) -- the demo's prompts are ~6x longer than
    its completions and each is repeated num_generations times -- and a static KV cache for sampling
    (transformers' own; the growing cache is re-copied at every token). vLLM: colocated. ``--generation``
    other than ``auto`` replaces the generation settings with exactly that :data:`GENERATION_PATHS` entry.

    The fast preset keeps TRL's plain path: its prompts are ~10 tokens (nothing to share), it reads the
    aggregators' gradients off the training backward (which needs one forward per row), and its stored
    results (benchmarks/results/fast_compare*.json) were measured that way. A run that compares gradients
    keeps the plain loss forward for the same reason.
    """
    share = not on_gpu and c.preset not in SMALL_MODEL_PRESETS
    if c.generation != "auto":
        generation = GENERATION_PATHS[c.generation]
    else:  # GPU and the fast preset: TRL's generate; CPU: a static cache, each prompt prefilled once
        generation = {**GENERATION_PATHS["static-cache"], **GENERATION_PATHS["prefill-once"]} if share else {}
    settings: dict[str, Any] = {
        "bf16": on_gpu and torch.cuda.is_bf16_supported(),
        "activation_checkpointing": on_gpu,
        "prefill_prompts_once": False,
        "forward_prompts_once": share and not c.compare_gradients_every,
        **generation,
    }
    if c.vllm:
        settings.update(
            use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=c.vllm_gpu_memory_utilization
        )
    return settings


def set_threads(c: RunConfig) -> None:
    if c.threads:
        torch.set_num_threads(c.threads)
    elif not torch.cuda.is_available():
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
