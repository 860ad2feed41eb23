#!/usr/bin/env bash
# Run HERE (a machine with pip access), before a lent GPU's first call: fetches into .whl/ the wheels ctrlkit needs
# that the device image lacks (diffusers, hydra-core, omegaconf, antlr4, bitsandbytes; the image has torch,
# pytorch-lightning, transformers, peft, opencv, torchmetrics), for its Python 3.12 on x86-64. bitsandbytes is cut
# to its CUDA 13 and CPU libraries (43 MB -> ~7 MB) so the working tree stays under the 64 MiB a device call carries.
# wandb, controlnet-aux and webdataset are left out: benchmarks/device_checks.sh runs with logger=csv, canny and
# boxes conditions, and shapes data, none of which import them.
# Usage:   . .venv/bin/activate && bash benchmarks/device_wheels.sh            (then: device run with carry [".whl"], see device_checks.sh)
# Expect:  "ready: .whl/ holds 5 wheels, N MB" and .whl/ ignored by git (an entry in .gitignore).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
# the versions this project is tested with here (pip list), so the device runs the same code
version() { python3 -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }
pins=()
for name in diffusers hydra-core omegaconf; do
  found=$(version "$name")
  pins+=("$name${found:+==$found}")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d .whl "${pins[@]}" "bitsandbytes>=0.45"
# omegaconf 2.3 needs antlr4-python3-runtime 4.9.*, published as a source archive only: build its (pure Python) wheel
python3 -m pip wheel -q --no-deps -w .whl "antlr4-python3-runtime==4.9.3"
for wheel in .whl/bitsandbytes-*.whl; do
  # the device's torch is built for CUDA 13: drop the CUDA 11/12 and ROCm builds, keep cuda13x and cpu
  libraries=$(python3 -m zipfile -l "$wheel" | awk '{print $1}' | grep -E 'libbitsandbytes_(cuda1[12][0-9]|rocm[0-9]+)\.so$' || true)
  [ -z "$libraries" ] || zip -q -d "$wheel" $libraries
done
echo "ready: .whl/ holds $(ls .whl/*.whl | wc -l) wheels, $(du -sm .whl | cut -f1) MB"
