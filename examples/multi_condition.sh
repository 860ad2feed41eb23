#!/usr/bin/env bash
# One ControlNet, several conditions (adapter=controlnet_multi, condition=multi): the shipped tiny multi-condition
# ControlNet (canny + shapes depth + shapes mask, trained with random subsets of the three) given each subset of
# three maps drawn from one shapes scene ("a green circle and a purple triangle on a orange background":
# examples/images/multi_{canny,depth,mask}.png), with no retraining between them.
# Usage:   bash examples/multi_condition.sh [output folder]
# Expect:  in ~30 s on a 2-core CPU, four "ctrlkit generate: wrote <out>/<subset>/image_000.png" lines (canny, depth,
#          mask, all three) and each grid.png (the stacked map's parts as RGB: edges red, depth green, mask blue |
#          the result). In each the purple triangle sits where the maps put it, and the circle behind it, at the
#          right, comes out as a blend of green and purple (the 1.5M-parameter base binds two colours to two touching
#          objects poorly). To train one: the two commands of conf/experiment/controlnet_multi_scenes.yaml; to score
#          a subset: ctrlkit evaluate adapter_path=<run> condition_subset=[canny]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-outputs/multi_condition}
prompt='prompts=[a green circle and a purple triangle on a orange background]'
maps=examples/images
declare -A subsets=(
  [canny]="canny: $maps/multi_canny.png"
  [depth]="shapes_depth: $maps/multi_depth.png"
  [mask]="shapes_mask: $maps/multi_mask.png"
  [all]="canny: $maps/multi_canny.png, shapes_depth: $maps/multi_depth.png, shapes_mask: $maps/multi_mask.png"
)
for subset in canny depth mask all; do
  ctrlkit generate "units=[{adapter: tiny/controlnet_multi, parts: {${subsets[$subset]}}}]" "$prompt" \
    num_inference_steps=20 hydra.run.dir="$out/$subset"
done
