"""Measure the learning signal of the CPU demo at step 0: the share of prompt groups with mixed rewards.

GRPO learns only from groups that hold both a rewarded and an unrewarded completion (otherwise every
advantage is zero). This samples ``--num-generations`` completions for ``--prompts`` training prompts of
the demo task (``lab.tasks.DEMO``) on the embedded model and prints ``lab.evaluation.learning_signal``.

    .venv/bin/python benchmarks/learning_signal.py                    # the DEMO settings
    .venv/bin/python benchmarks/learning_signal.py --few-shot 0 --num-numbers 3 --max-number 99
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from lab.evaluation import learning_signal
from lab.models import load_model_and_tokenizer, resolve_preset
from lab.tasks import DEMO, get_task


def parse_args() -> argparse.Namespace:
    opts = DEMO["task_options"]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default=DEMO["task"])
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--num-generations", type=int, default=DEMO["num_generations"])
    p.add_argument("--max-new-tokens", type=int, default=DEMO["max_completion_length"])
    p.add_argument("--temperature", type=float, default=DEMO["temperature"])
    p.add_argument("--shaped", action=argparse.BooleanOptionalAction, default=DEMO["shaped"])
    p.add_argument("--few-shot", type=int, default=opts.get("few_shot", 0))
    p.add_argument("--num-numbers", type=int, default=opts.get("num_numbers", 3))
    p.add_argument("--max-number", type=int, default=opts.get("max_number", 99))
    p.add_argument("--ops", default=opts.get("ops", "+-*/"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--show", type=int, default=3, help="print this many example completions")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model_and_tokenizer(args.model)
    model.eval()
    task = get_task(args.task)
    options = {}
    if args.task == "countdown":
        options = dict(
            DEMO["task_options"],
            few_shot=args.few_shot,
            num_numbers=args.num_numbers,
            max_number=args.max_number,
            ops=args.ops,
        )
    data = task.train_dataset(args.prompts, seed=args.seed, chat=resolve_preset(args.model).chat, **options)
    start = time.perf_counter()
    result = learning_signal(
        model,
        tokenizer,
        data,
        task,
        num_generations=args.num_generations,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        shaped=args.shaped,
        seed=args.seed,
    )
    examples = result.pop("examples")
    for ex in examples[: args.show]:
        print(f"--- {ex['columns']} reward={ex['reward']}\n{ex['completion']}")
    settings = dict(vars(args), task_options=options, wall_seconds=round(time.perf_counter() - start, 1))
    print(json.dumps({"settings": settings, "result": result}, indent=1))


if __name__ == "__main__":
    main()
