#!/usr/bin/env bash
# Score a composition (a canny ControlNet + a GLIGEN unit) beside the base model: `ctrlkit evaluate composition=...`.
# Usage: examples/evaluate_composition.sh <controlnet run> <gligen run> [overrides]
#   (runs of examples/train_controlnet_shapes.sh and examples/train_gligen_shapes.sh)
# Expect: "ctrlkit evaluate: 2 units on 16 items x 2 seeds", the units as unit0 (canny) and unit1 (boxes), then
# base vs adapter for mask_iou (the grid's ranking score), box_iou, caption_accuracy, unit0/canny_f1,
# unit0/canny_ssim (fid/kid/clip_score "unavailable: ..." without local weights), and metrics.json, per_sample.csv,
# grid.png (canny map | boxes | base | composition | reference). With box_detector=<OWL-ViT folder> the GLIGEN unit
# is also scored by that detector (unit1/detected_box_iou, detected_box_ap50).
set -euo pipefail
controlnet="${1:?give a ControlNet run directory}"
gligen="${2:?give a GLIGEN run directory}"
shift 2
composition="$(mktemp -d)/composition.yaml"
cat > "$composition" <<YAML
units:
  - {adapter: $controlnet, scale: 1.0}
  - {adapter: $gligen, end: 0.3}
YAML
ctrlkit evaluate composition="$composition" logger=none "$@"
