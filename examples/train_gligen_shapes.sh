#!/usr/bin/env bash
# A 50-step GLIGEN run on the boxes of `shapes` scenes with 1-3 objects, with the tiny model, logged to CSV.
# Expect: a progress bar, then "ctrlkit train: 50 steps in ... s; outputs in outputs/train/runs/<run>" followed by
# the paths of config.yaml, checkpoints/, the sample grid samples/step_000050.png (boxes | sample with the boxes in
# magenta | target with the boxes) and adapter/ (gligen.safetensors, the GLIGEN layers only, and unet/, the gated
# UNet: UNet2DConditionModel.from_pretrained(<run>/adapter/unet) has attention_type "gated"); controllability.json
# holds val/box_iou for the base model, the scenes' own images and the adapter.
# The full run (1500 steps) is `ctrlkit train experiment=gligen_boxes_shapes`.
set -euo pipefail
ctrlkit train experiment=gligen_boxes_shapes trainer.max_steps=50 logger=csv "$@"
