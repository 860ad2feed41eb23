#!/usr/bin/env bash
# Score a trained adapter beside the base model without it: `ctrlkit evaluate` on 16 fixed shapes scenes x 2 seeds.
# Usage: examples/evaluate_adapter.sh outputs/train/runs/<run> [overrides]   (a run of examples/train_controlnet_shapes.sh)
# Expect: "ctrlkit evaluate: <run>/adapter, condition canny on 16 items x 2 seeds", then a table of base | adapter |
# truth | truth_vae scores (truth: the items' own images, canny_f1 1.0 and mask_iou 1.0; truth_vae: the same through
# the tiny VAE, the level a sample can be expected to reach; canny_f1 marked as the primary score, canny_ssim,
# mask_iou, box_iou, caption_accuracy; fid, kid and
# clip_score read "unavailable: weights/... not found" unless CTRLKIT_WEIGHTS points at a folder holding
# weights-inception-2015-12-05-6726825d.pth and clip-vit-base-patch16/), and the output folder with metrics.json,
# per_sample.csv and grid.png (best and worst adapter samples: condition | base | adapter | reference).
# Run it again on the same set (this adapter or another): the log says "base model: 2 of 2 batches of samples read
# from outputs/base_samples", since the base model's samples are kept there (base_cache_dir=null: sampled again).
set -euo pipefail
run="${1:?give a ctrlkit train run directory}"
shift
ctrlkit evaluate adapter_path="$run" logger=none "$@"
