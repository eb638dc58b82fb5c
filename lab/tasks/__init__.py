"""Tasks with verifiable rewards: CountDown and Math, plus the settings of the CPU demo.

>>> task = get_task("countdown")
>>> data = task.train_dataset(64, seed=0, chat=True, **DEMO["task_options"])
>>> reward_funcs = task.reward_funcs(shaped=DEMO["shaped"])   # pass to trl.GRPOTrainer
>>> task.score("<answer> 3 + 5 </answer>", numbers=[3, 5], target=8)
1.0
"""

from __future__ import annotations

from typing import Any

from lab.tasks.base import HubUnavailableError, RewardFunc, Task, completion_text, split_of
from lab.tasks.countdown import CountdownTask
from lab.tasks.digitsum import DigitSumTask
from lab.tasks.math import MathTask
from lab.tasks.paperworld import PaperWorldTask

TASKS: dict[str, type[Task]] = {
    "countdown": CountdownTask,
    "math": MathTask,
    "digitsum": DigitSumTask,
    "paperworld": PaperWorldTask,
}

# The CPU demo on the embedded SmolLM2-135M-Instruct (chat prompts). Chosen by measurement
# (benchmarks/learning_signal.py, numbers in "measured"): 2-number problems with + and -, two worked
# examples as earlier chat turns, and the paper's binary reward. At step 0, 45% of prompt groups hold
# both a rewarded and an unrewarded completion, so GRPO advantages are non-zero there. The paper's own
# setting (3-4 numbers up to 99, no examples) is beyond this model: when the demo was designed it gave
# no group with a reward spread, and nothing to learn from (an unstored measurement; rerun
# benchmarks/learning_signal.py to check a setting).
DEMO: dict[str, Any] = {
    "task": "countdown",
    "task_options": {"num_numbers": 2, "max_number": 10, "max_target": 100, "ops": "+-", "few_shot": 2},
    "shaped": False,  # the binary paper reward suffices at this difficulty; the shaped one stays optional
    "num_generations": 8,
    "max_completion_length": 64,
    "temperature": 0.7,
    "top_p": 1.0,
    # Run size of `lab compare --preset smollm2-countdown` on CPU (2 cores): a step of 2 prompts x 8
    # completions (394 prompt + <=64 completion tokens each) takes ~25 s with each prompt run once
    # (lab.runner.device_settings; 148 s before, benchmarks/results/cpu_step_profile.smollm2.2core.json),
    # so 4 steps x 4 aggregators take ~7 minutes. Measured with `python benchmarks/cpu_compare.py`.
    "steps": 4,
    "prompts_per_step": 2,
    "measured": {
        "command": "python benchmarks/learning_signal.py  # 20 train prompts (seed 0) x 8 samples, 2 threads",
        "fraction_mixed_groups": 0.45,
        "mean_reward": 0.0875,
        "fraction_all_wrong": 0.55,
        "fraction_all_correct": 0.0,
        "mean_length": 57.0,
        "length_std_within_group": 5.6,
        "fraction_truncated": 0.31,
    },
}


# The fast comparison, the default main job (`lab compare`): the digitsum task (lab.tasks.digitsum) on the
# lab's own small model, trained in full (no LoRA). A step is 8 prompts x 8 completions of up to 32 tokens:
# about 0.4 s through DeltaLGRPOTrainer on one CPU thread, so 4 aggregators x 5 seeds run side by side as
# two single-threaded workers (benchmarks/fast_compare.py measures the whole job).
FAST: dict[str, Any] = {
    "task": "digitsum",
    "model": "digitsum-tiny",
    "task_options": {"min_digits": 2, "max_digits": 12},
    "shaped": False,
    "num_generations": 8,
    "prompts_per_step": 8,
    "max_completion_length": None,  # 2 * max_digits + 8: the longest scratchpad (2n + 4) plus room to ramble
    "temperature": 1.0,
    "top_p": 1.0,
    "steps": 60,
    "learning_rate": {"adamw": 3e-4, "sgd": 0.1},
    "micro_batch_size": None,  # the whole step in one forward/backward
    "probe_every": 5,  # per-sample gradients: measured CV and Var(g_i) against L_i
    "compare_gradients_every": 1,  # cosine / norm ratio of the four aggregators' gradients on each batch
    "save_every": 20,
    "threads": 1,
    "seeds": 5,
    "workers": 2,
    # The held-out evaluation after the last step (lab.runlog.HELDOUT_METRIC): 128 eval problems x 8
    # samples, the same problems and sampling seed for every aggregator of a seed.
    "eval_prompts": 128,
    "eval_k": 8,
}

# The positive control (`lab compare --preset paper-world`): the paper-world task (lab.tasks.paperworld),
# where Var(g_i) = a + V L_i and the length says nothing about the reward, on its own small model. The
# same machinery and sizes as FAST; completions of up to 36 tokens.
PAPER_WORLD: dict[str, Any] = {
    **FAST,
    "task": "paperworld",
    "model": "paperworld-tiny",
    "task_options": {},
    "max_completion_length": None,  # lab.tasks.paperworld.MAX_COMPLETION_LENGTH
    # 12 held-out problems, each 8 times (a fixed list, the same for every seed) x 8 samples
    "eval_prompts": 96,
}


def get_task(name: str) -> Task:
    """The task called ``name`` (one of :data:`TASKS`)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(TASKS)}")
    return TASKS[name]()


__all__ = [
    "DEMO",
    "FAST",
    "PAPER_WORLD",
    "TASKS",
    "CountdownTask",
    "DigitSumTask",
    "HubUnavailableError",
    "MathTask",
    "PaperWorldTask",
    "RewardFunc",
    "Task",
    "completion_text",
    "get_task",
    "split_of",
]
