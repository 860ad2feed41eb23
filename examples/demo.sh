#!/usr/bin/env bash
# The browser demo on the shipped tiny model, offline: compose units, draw GLIGEN boxes, generate, download.
# Usage:   pip install -e ".[demo]" && bash examples/demo.sh [port, default 7860]
# Expect:  "ctrlkit demo: adapters found: tiny/controlnet_canny, tiny/gligen_masked_boxes, tiny/t2i_adapter_canny"
#          (and any adapter/ folder under outputs/), then "Running on local URL: http://127.0.0.1:7860". Open it:
#          load a photo (its canny map appears beside it), pick tiny/controlnet_canny in unit 1 (condition: canny),
#          press generate: within seconds the result follows the photo's edges, and image_000.png and
#          composition.yaml can be downloaded (the page looks like examples/demo_screenshot.png). Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
ctrlkit demo server_port="${1:-7860}"
