#!/usr/bin/env bash
# The `paper` preset of `resnets reproduce cifar10` on a lent GPU machine (issue 4), as much as fits one call.
#
# CIFAR-10 is over one call's 64 MiB carry; stage it first (see ../shared/gpu/README.md):
#   ../shared/gpu/stage-cifar10 .devdata
#   device call 1: carry [".devdata/p1"]  command: true
#   device call 2: carry [".devdata/p2"]  command: true
#   device call 3: carry [".devdata/p3"]  command: bash .devdata/p3/assemble.sh .devdata && bash benchmarks/gpu_reproduce.sh
# Default: plain-20 and ResNet-20, 64k iterations each (about 2.3 min each with the whole-step CUDA graph on an
# H100, per ../shared/gpu/README.md; ~6 min in all). DEPTHS=20,56 SEEDS=1 STEPS=64000 override.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-./gpu-reproduce-out}
mkdir -p "$out"
data=${DATA:-.devdata}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(0))' | tee "$out/device.txt"
args=(reproduce cifar10 --preset paper --depths "${DEPTHS:-20}" --seeds "${SEEDS:-1}" --data "$data"
      --out "$out/reproduce" --no-progress)
[[ -n ${STEPS:-} ]] && args+=(--steps "$STEPS")
python3 -m resnets.cli "${args[@]}" 2>&1 | tee "$out/log.txt"
# checkpoints are large and not needed back; the logs, results and figures are
find "$out/reproduce" -name '*.safetensors' -o -name 'state.pt' | xargs -r rm -f
