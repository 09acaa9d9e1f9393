# Sourced by the lent-GPU scripts (gpu_check.sh, gpu_peers.sh, gpu_floor.sh): from the repository root,
# install the wheels carried in .whl/ (launch/gpu_wheels.sh: what the GPU image lacks) into
# /tmp/site, put them on PYTHONPATH, and set OUT (the device tool's output folder, or here).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
OUT=${OUT:-.}
