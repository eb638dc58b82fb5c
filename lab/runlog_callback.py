"""The run log written during training: a transformers ``TrainerCallback`` that fills a run dir step by step.

:mod:`lab.runlog` is the schema and the readers (it imports no trainer code); this callback is the writer's
side that a running ``DeltaLGRPOTrainer`` drives.
"""

from __future__ import annotations

import time
from typing import Any

from transformers import TrainerCallback

from lab.aggregation import counterfactual_cv
from lab.auto_alpha import is_auto
from lab.runlog import RunWriter


class RunLogCallback(TrainerCallback):
    """Writes metrics/samples/probes/status of a ``DeltaLGRPOTrainer`` run into a run dir, one step at a time.

    Needs ``logging_steps=1``. Only the main process writes. ``trainer`` is attached after the trainer is
    built (``callback.trainer = trainer``) so the callback can drain its ``generation_records`` and the
    records of any probe hook listed in ``probe_hooks``.
    """

    def __init__(self, writer: RunWriter, *, max_length: int, alpha: float | str = 1.0, on_step=None):
        self.writer = writer
        self.max_length = int(max_length)
        self.alpha = 1.0 if is_auto(alpha) else float(alpha)  # auto: the trainer's current α, read per step
        self.trainer = None
        self.probe_hooks: list = []
        self.on_step = on_step  # optional callable(step, trainer) for evaluation; may return an eval record
        self._step_started = time.perf_counter()
        self._last_tokens: float | None = None
        self.progress: tuple[str, int] | None = None  # (name, every k steps): print a short line

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_started = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return  # the end-of-training summary has no "loss" key of a step
        step = int(state.global_step)
        elapsed = time.perf_counter() - self._step_started
        record: dict[str, Any] = {
            "step": step,
            "wall_time": time.time(),
            "step_time": logs.get("step_time", elapsed),
        }
        tokens = logs.get("num_tokens")
        if tokens is not None and self._last_tokens is not None and elapsed > 0:
            record["tokens_per_second"] = (tokens - self._last_tokens) / elapsed
        if tokens is not None:
            self._last_tokens = tokens
        record.update(logs)
        record.update(self._write_samples(step))
        self._write_probes()
        self.writer.log_metrics(record)
        self.writer.set_status("running", step, state.max_steps)
        if self.progress and (step % self.progress[1] == 0 or step == state.max_steps):
            print(
                f"  {self.progress[0]}: step {step}/{state.max_steps}  reward {record.get('reward', float('nan')):.3f}  "
                f"mean length {record.get('completions/mean_length', float('nan')):.1f}  "
                f"{record['step_time']:.2f} s/step",
                flush=True,
            )

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.on_step is not None:
            result = self.on_step(int(state.global_step), self.trainer)
            if result:
                self.writer.log_eval(result)

    def _write_samples(self, step: int) -> dict[str, float]:
        """Write the generation records of this step; return its counterfactual CV per aggregator."""
        if self.trainer is None:
            return {}
        records, self.trainer.generation_records = self.trainer.generation_records, []
        self.alpha = float(getattr(self.trainer, "current_alpha", self.alpha))
        cv: dict[str, float] = {}
        for record in records:
            record = {**record, "step": step}
            self.writer.log_samples(record)
            lengths = [n for n in record["lengths"] if n > 0]
            if lengths:
                m = max(self.max_length, max(lengths))
                cv = {
                    f"cv/{k}": v
                    for k, v in counterfactual_cv(lengths, alpha=self.alpha, max_length=m).items()
                }
        return cv

    def _write_probes(self) -> None:
        for hook in self.probe_hooks:
            records, hook.records = list(hook.records), []
            for record in records:
                self.writer.log_probe(record)
