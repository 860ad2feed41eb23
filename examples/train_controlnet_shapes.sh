#!/usr/bin/env bash
# A 50-step ControlNet run on canny edges of `shapes` with the tiny model, logged to CSV.
# Expect: a progress bar, then "ctrlkit train: 50 steps in ... s; outputs in outputs/train/runs/<run>" followed by
# the paths of config.yaml, checkpoints/, the sample grid samples/step_000050.png and adapter/ (diffusers format).
set -euo pipefail
ctrlkit train experiment=controlnet_canny_shapes trainer.max_steps=50 logger=csv "$@"
