#!/bin/bash
# dstein's column beside STDE's published A100 table (REFERENCE.md; docs/benchmarks.md, "The
# peers' benchmarks"), in one call on a lent GPU machine (after `bash launch/gpu_wheels.sh`
# here). With the device tool: run(command="bash launch/gpu_peers.sh [STEPS]", carry=[".whl"],
# timeout_s=540). Runs
#   python3 launch/bench.py --suite peers --pdes allen_cahn --dims 100 1000 10000 100000 1000000 \
#       --peer-methods config --budget-steps STEPS -- run.device=cuda train.adam=fused
# (configs/sine_gordon_1k.yaml's settings at every d: width 128 x 3 hidden, 100 points per
# step, stein-subspace with 8 samples, output_init=fit) and writes bench-peers-gpu.json and the
# log to $OUT. STDE's table is 10,000 steps; the default here, 2000, fits one device call
# (STEPS=10000 for the table's budget). TF32 stays off (run.matmul_precision=highest).
source "$(dirname "$0")/gpu_env.sh"
STEPS=${1:-2000}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu-peers.log"
python3 launch/bench.py --suite peers --pdes allen_cahn --dims 100 1000 10000 100000 1000000 \
  --peer-methods config --budget-steps "$STEPS" --tmp /tmp/dstein-peers --out "$OUT/bench-peers-gpu.json" \
  -- run.device=cuda train.adam=fused eval.samples=16 2>&1 | grep -v '^ \|^[{}]' | tee -a "$OUT/gpu-peers.log"
