#!/usr/bin/env bash
# The GPU measurements behind the README's "On a GPU" figures, in one run of about 8 minutes:
#   1. generation through TRL's paths, side by side (benchmarks/gpu_generation.py), Qwen2.5-0.5B and 1.5B shapes
#   2. `lab train --model tiny` end to end on the CUDA path with --generation continuous-batching,
#      static-compile and the default (auto)
#   3. Qwen2.5-shaped throughput and memory of a LoRA step (benchmarks/qwen_throughput.py), 0.5B and 1.5B
# Usage: bash scripts/gpu_checks.sh OUTDIR   (a CUDA machine with torch, transformers, trl, peft, datasets)
# Steps run in that order, each under its own timeout; one starts only if its timeout still fits in
# GPU_CHECKS_LIMIT_S (default 540 s), so the script never runs past it, and a skipped step says so in log.txt.
# OUTDIR gets at most 5 files: log.txt and one JSON per benchmark (the runs of step 2 go to a temp dir).
set -uo pipefail
out=${1:?usage: gpu_checks.sh OUTDIR}
limit=${GPU_CHECKS_LIMIT_S:-540}
mkdir -p "$out"
log="$out/log.txt"
runs=$(mktemp -d)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

# step SECONDS NAME COMMAND...: run COMMAND under a timeout if it fits in the limit, logging its output's tail
step() {
  local seconds=$1 name=$2
  shift 2
  if ((SECONDS + seconds > limit)); then
    echo "[gpu_checks] SKIPPED $name: ${SECONDS} s used, its ${seconds} s would pass the ${limit} s limit" | tee -a "$log"
    return
  fi
  echo "[gpu_checks] $name (timeout ${seconds} s, at ${SECONDS} s)" | tee -a "$log"
  timeout "$seconds" "$@" >"$runs/$name.out" 2>&1
  local rc=$?
  grep -v -i "warn" "$runs/$name.out" | tail -30 | tee -a "$log"
  echo "[gpu_checks] $name: exit $rc after $((SECONDS)) s$([ $rc = 124 ] && echo ' (timed out)')" | tee -a "$log"
}

python3 - <<'PY' 2>&1 | tee "$log"
import torch, transformers, trl, peft
print("gpu", torch.cuda.get_device_name(0), "torch", torch.__version__, "transformers", transformers.__version__,
      "trl", trl.__version__, "peft", peft.__version__)
PY

# 1. generation paths: 16 prompts x 8 completions x 256 tokens; pass 1 times every arm, pass 2 what fits in 90 s
for size in 0.5b 1.5b; do
  step 150 "generation-$size" python3 benchmarks/gpu_generation.py --size "$size" --max-completion-length 256 \
    --budget-s 90 --json "$out/generation-qwen2.5-$size.json"
done

# 2. the flag end to end (3 steps each), then a summary of each run's log
for gen in continuous-batching static-compile auto; do
  step 75 "train-$gen" python3 -m lab.cli train --model tiny --steps 3 --prompts-per-step 4 --generation "$gen" \
    --out "$runs/train-$gen"
done
python3 - "$runs" <<'PY' 2>&1 | tee -a "$log"
import sys
from pathlib import Path
from lab.runlog import RunReader
for run in sorted(Path(sys.argv[1]).glob("train-*/delta_l-s0")):
    r = RunReader(run); r.poll()
    print(run.parent.name, "status", r.status.get("state"), r.status.get("error", ""),
          "step_time", [round(m.get("step_time") or 0, 3) for m in r.metrics],
          "loss", [round(m.get("loss") or 0, 4) for m in r.metrics])
PY

# 3. LoRA step throughput and memory (re-measures benchmarks/results/qwen2.5-*.h100.json)
step 90 "throughput-0.5b" python3 benchmarks/qwen_throughput.py --size 0.5b --json "$out/qwen2.5-0.5b.json"
step 90 "throughput-1.5b" python3 benchmarks/qwen_throughput.py --size 1.5b --json "$out/qwen2.5-1.5b.json"
echo "[gpu_checks] done in ${SECONDS} s (limit ${limit} s)" | tee -a "$log"
