#!/usr/bin/env bash
# Compose the three adapters ctrlkit ships for the tiny base model in one `ctrlkit generate` call, without training:
# ControlNet (canny edges of a circle, acting in the top-left region), T2I-Adapter (canny edges of a square, top
# right region) and box-masked GLIGEN ("green triangle" in a box at the bottom); see examples/compose_three.yaml.
# Usage:   bash examples/compose_three.sh [more ctrlkit generate overrides, e.g. seed=3]
# Expect:  in ~15 s on a 2-core CPU, "ctrlkit generate: wrote .../image_000.png" and the paths of grid.png (the two
#          canny maps | the boxes | the result) and of composition.yaml. The result: a green triangle in the bottom
#          box, a shape at the top left and one at the top right. Three adapters trained apart on a 1.5M-parameter
#          model compose roughly: shapes and colours bleed (the top-right one is often green rather than a blue
#          square); tests/lightning_modules/test_shipped_adapters.py checks that each unit brings its own part.
set -euo pipefail
cd "$(dirname "$0")/.."
ctrlkit generate composition=examples/compose_three.yaml "$@"
