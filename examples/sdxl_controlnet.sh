#!/usr/bin/env bash
# A ControlNet on an SDXL base: train on canny edges of `shapes`, then generate with it under a second unit.
# Usage:   bash examples/sdxl_controlnet.sh <local SDXL pipeline folder> [steps, default 5] [size, default 64]
#          [more ctrlkit train overrides]
#          A real SDXL folder trains at size 1024 on a GPU (add trainer=gpu trainer.precision=bf16-mixed
#          system.gradient_checkpointing=true); to try it here, make a tiny random SDXL folder first:
#          python -c "from pathlib import Path; from tests.helpers.tiny_sdxl import save_tiny_sdxl_pipeline as s; s(Path('/tmp/sdxl_tiny'))"
#          bash examples/sdxl_controlnet.sh /tmp/sdxl_tiny 5 64 callbacks.controllability.every_n_steps=0
#          (67 s on this 2-core CPU: "ctrlkit train: 5 steps in 45 s"; without the last override the controllability
#          callback first scores the base model on 32 items x 25 steps: 523 s for the 5 steps beside another job)
# Expect:  "ctrlkit train: 5 steps in ... s; outputs in <run>" with <run>/adapter a diffusers ControlNetModel folder
#          (StableDiffusionXLControlNetPipeline loads it), then "ctrlkit generate: wrote .../image_000.png" and its
#          grid.png (canny map | image). With the tiny random model the image is noise-like: it shows the plumbing.
set -euo pipefail
cd "$(dirname "$0")/.."
folder=${1:?give a local SDXL pipeline folder}
steps=${2:-5}
size=${3:-64}
run=${CTRLKIT_OUTPUTS:-outputs}/sdxl_controlnet
ctrlkit train model=sdxl model.path="$folder" experiment=controlnet_canny_shapes \
  data.image_size="$size" trainer.max_steps="$steps" logger=csv hydra.run.dir="$run" "${@:4}"
python - "$run" "$size" <<'PY'
import sys

import numpy as np
from PIL import Image

from conditions.shapes import render_scene

Image.fromarray(render_scene(np.random.default_rng(7), int(sys.argv[2])).image).save(f"{sys.argv[1]}/scene.png")
PY
ctrlkit generate model=sdxl model.path="$folder" height="$size" width="$size" 'prompts=[a red circle]' \
  "units=[{adapter: $run/adapter, source_image: $run/scene.png, extractor: canny}]" hydra.run.dir="$run/generate"
