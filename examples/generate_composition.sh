#!/usr/bin/env bash
# Generate with a composition: a ControlNet trained by `ctrlkit train` (its <run>/adapter folder), its condition
# extracted on the fly (canny) from a shapes scene, active in the first 60% of the steps, for two prompts.
# Usage:   bash examples/generate_composition.sh outputs/train/runs/<run>
# Expect:  "ctrlkit generate: wrote .../image_000.png" and image_001.png, then the paths of grid.png (the canny map |
#          the result, one row per prompt: the shape sits where the scene's edges are, in the prompt's colours) and
#          of composition.yaml (what was used).
set -euo pipefail
run=${1:?usage: bash examples/generate_composition.sh <run dir of ctrlkit train>}
work=$(mktemp -d)
python - "$work/scene.png" <<'PY'
import sys

import numpy as np
from PIL import Image

from conditions.shapes import render_scene

Image.fromarray(render_scene(np.random.default_rng(7), 64).image).save(sys.argv[1])
PY
cat > "$work/composition.yaml" <<YAML
# one entry per unit; see conf/generate.yaml for every field
units:
  - adapter: $run/adapter
    source_image: $work/scene.png
    extractor: canny
    scale: 1.0
    start: 0.0
    end: 0.6
    mode: balanced
YAML
ctrlkit generate composition="$work/composition.yaml" \
  'prompts=[a red square on a white background,a blue triangle on a yellow background]' "${@:2}"
