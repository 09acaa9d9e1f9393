#!/bin/bash
# Fill .whl/ with the wheels the lent GPU machine lacks (its image has torch, h5py, mpi4py,
# numpy, einops, msgpack, ninja, psutil, py-cpuinfo, pyyaml, tqdm; no network there).
# Run HERE, in the repository root, before the device call; .whl/ is ignored by git and
# travels with `carry: [".whl", ...]`. Versions are the ones this project tests with.
#   bash launch/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=.venv/bin/pip
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
# pure-Python packages (DeepSpeed and antlr4 come as source: built here without build
# isolation, so that no CUDA torch is fetched to build them)
$PIP wheel -q --no-deps --no-build-isolation -w .whl \
  deepspeed==0.19.8 hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3 hjson==3.1.0
# pydantic (DeepSpeed's config) with its compiled core, for the machine's Python 3.12
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.7.0 typing-inspection==0.4.5 typing-extensions==4.15.0
ls -l .whl
