#!/usr/bin/env bash
# The GPU measurements behind the README's "On a GPU" figures: Qwen2.5-shaped throughput and memory, and a
# short `lab train` through the real GPU path (bf16, gradient checkpointing, CUDA generation).
# Usage: bash scripts/gpu_checks.sh OUTDIR   (a CUDA machine with torch, transformers, trl, peft installed)
set -uo pipefail
out=${1:?usage: gpu_checks.sh OUTDIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 - <<'PY' 2>&1 | tee "$out/env.txt"
import torch, transformers, trl, peft
print("gpu", torch.cuda.get_device_name(0), "torch", torch.__version__, "transformers", transformers.__version__,
      "trl", trl.__version__, "peft", peft.__version__)
PY
timeout 230 python3 benchmarks/qwen_throughput.py --size 0.5b --json "$out/qwen2.5-0.5b.json" 2>&1 | tail -40 | tee "$out/qwen05.txt"
timeout 200 python3 benchmarks/qwen_throughput.py --size 1.5b --json "$out/qwen2.5-1.5b.json" 2>&1 | tail -40 | tee "$out/qwen15.txt"
timeout 120 python3 -m lab.cli train --model tiny --steps 3 --prompts-per-step 4 --out "$out/gpu_run" 2>&1 | tail -5
python3 - "$out/gpu_run" <<'PY' 2>&1 | tee "$out/gpu_run.txt"
import sys
from lab.runlog import RunReader
r = RunReader(sys.argv[1] + "/delta_l-s0"); r.poll()
print("status", r.status.get("state"), "steps", [m["step"] for m in r.metrics])
for m in r.metrics:
    print({k: m.get(k) for k in ("step", "step_time", "loss", "grad_norm", "delta_l/weight_mean", "cv/delta_l")})
PY
