#!/usr/bin/env bash
# Regional prompts on box-masked GLIGEN (adapters/regional_prompts.py): inside each box the frozen UNet's text
# cross-attention reads that box's phrase instead of the caption. 100 steps with the tiny model, logged to CSV.
# Expect: a progress bar, then "ctrlkit train: 100 steps in ... s; outputs in outputs/train/runs/<run>". In that
# run's controllability.json, "base_without_adapter" box_iou is ~0.19 and the curve's step-0 entry ~0.42: the gates
# are still closed there, so that gain is regional prompting alone, without training; step 100 reads ~0.54. The
# adapter's gligen_config.json says "regional_prompts": true, so `ctrlkit generate` and `ctrlkit evaluate` load it
# with them.
set -euo pipefail
ctrlkit train experiment=gligen_masked_boxes_shapes adapter.build.regional_prompts=true trainer.max_steps=100 \
  adapter.build.export_unet=false logger=csv "$@"
