#!/bin/bash
# The step's fixed cost on a lent GPU (issue 29), in one call (after `bash launch/gpu_wheels.sh`
# here). With the device tool: run(command="bash launch/gpu_floor.sh [STEPS]", carry=[".whl"],
# timeout_s=420). Runs
#   python3 launch/bench.py --suite floor --budget-steps STEPS --rounds 2 -- run.device=cuda
# (the fixed-cost config, configs/sine_gordon_1k.yaml at d = 100 and 1000 as it ships, the
# quickstart; each through launch/train.py, the loop's rate from metrics.jsonl) and writes
# bench-floor-gpu.json and the log to $OUT. STDE's published A100 rates for the same two-body
# problem are 1834 steps/s (d = 100) and 1559 (d = 1000), REFERENCE.md. Expected here: a step
# of about 700 small operations (docs/benchmarks.md, "The step's fixed cost"), each a kernel
# launch of several microseconds from Python, so a few ms per step, some 150 to 300 steps/s:
# this measures how far that is from STDE's fused XLA step. TF32 stays off.
source "$(dirname "$0")/gpu_env.sh"
STEPS=${1:-1000}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu-floor.log"
python3 launch/bench.py --suite floor --budget-steps "$STEPS" --rounds 2 --tmp /tmp/dstein-floor \
  --out "$OUT/bench-floor-gpu.json" -- run.device=cuda 2>&1 | grep -v '^ \|^[{}]' | tee -a "$OUT/gpu-floor.log"
