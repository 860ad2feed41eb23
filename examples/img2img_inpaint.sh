#!/usr/bin/env bash
# img2img and inpainting under a composition, with the shipped tiny ControlNet (no training): a shapes scene is
# (1) re-drawn at strength 0.5 under the canny edges of a circle, (2) inpainted in its left half only.
# Usage:   bash examples/img2img_inpaint.sh
# Expect:  two `ctrlkit generate` runs, each printing "ctrlkit generate: wrote .../image_000.png" and its grid.png
#          (canny map | result): (1) the scene (a purple square on black) redrawn with a circle at the circle's
#          edges, on the scene's black; (2) the right half of the scene pixel for pixel, the left half repainted.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
python - "$work" <<'PY'
import sys

import numpy as np
from PIL import Image

from conditions.shapes import render_scene

Image.fromarray(render_scene(np.random.default_rng(7), 64).image).save(f"{sys.argv[1]}/scene.png")
mask = np.zeros((64, 64), np.uint8)
mask[:, :32] = 255  # white: repaint
Image.fromarray(mask).save(f"{sys.argv[1]}/mask.png")
PY
unit='{adapter: tiny/controlnet_canny, source_image: examples/images/compose_three_circle.png, extractor: canny}'
prompt='prompts=[a purple square and a red circle on a black background]'
ctrlkit generate "units=[$unit]" "$prompt" init_image="$work/scene.png" strength=0.5 hydra.run.dir="$work/img2img"
ctrlkit generate "units=[$unit]" "$prompt" init_image="$work/scene.png" mask_image="$work/mask.png" \
  hydra.run.dir="$work/inpaint"
