#!/bin/bash
# Issue 6's GPU check, in one call on a lent GPU machine (after `bash launch/gpu_wheels.sh`
# here). With the device tool: run(command="bash launch/gpu_check.sh", carry=[".whl"],
# timeout_s=540). It installs the carried wheels, prints the GPU, then runs
#   python3 launch/bench.py --suite gpu --warmup 2 --steps 10 --max-step-seconds 60
# (every method's derivatives on the GPU in float32 against CPU float64, then HJB steps
# with stein-subspace at d = 10^4, 10^5, 10^6 and the other methods at d = 10^4) and writes
# bench-gpu.json and the log to $OUT (or the current folder). TF32 stays off: the config's
# run.matmul_precision is highest (MATH.md, precision).
source "$(dirname "$0")/gpu_env.sh"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu-check.log"
python3 -c "import torch, deepspeed, hydra, h5py; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'deepspeed', deepspeed.__version__)" 2>&1 | grep -v WARNING | tee -a "$OUT/gpu-check.log"
python3 launch/bench.py --suite gpu --warmup 2 --steps 10 --max-step-seconds 60 --tmp /tmp/dstein-bench \
  --out "$OUT/bench-gpu.json" "$@" 2>&1 | grep -v '^ \|^[{}]' | tee -a "$OUT/gpu-check.log"
