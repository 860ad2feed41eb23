#!/usr/bin/env bash
# A 50-step T2I-Adapter run on canny edges of `shapes` with the tiny model, logged to CSV.
# Expect: a progress bar, then "ctrlkit train: 50 steps in ... s; outputs in outputs/train/runs/<run>" followed by
# the paths of config.yaml, checkpoints/, the sample grid samples/step_000050.png (condition | sample | target) and
# adapter/ (a diffusers T2IAdapter folder: T2IAdapter.from_pretrained(<run>/adapter)), and the metrics, among them
# val/mask_iou in controllability.json. The full run (1500 steps) is `ctrlkit train experiment=t2i_adapter_canny_shapes`.
set -euo pipefail
ctrlkit train experiment=t2i_adapter_canny_shapes trainer.max_steps=50 logger=csv "$@"
