#!/usr/bin/env bash
# ControlNet++ reward fine-tuning (conf/reward/canny.yaml, conf/reward/shapes_mask.yaml): continue a trained
# ControlNet with the cycle-consistency reward, and the same continuation without it, then evaluate both on the same
# items and seeds.
# Usage:   bash examples/reward_finetune.sh [run dir of a trained ControlNet] [more steps, default 300] [condition]
#          condition: canny (default; soft-Canny reward) or shapes_mask (the shipped shapes segmenter's reward);
#          with no run dir it first trains the default ControlNet on that condition (1000 steps, ~8.5 min here)
# Expect:  two "ctrlkit train: 1300 steps in ... s" lines (with the reward ~2.4x slower per step: a second UNet +
#          adapter pass at t < 200 and the VAE decoder's backward), then two `ctrlkit evaluate` tables
#          (canny_f1 or mask_iou <- primary score, caption_accuracy, base beside adapter). The README's "Reward fine-tuning"
#          gives the figures measured here.
set -euo pipefail
cd "$(dirname "$0")/.."
outputs=${CTRLKIT_OUTPUTS:-outputs}
run=${1:-}
more=${2:-300}
condition=${3:-canny}
if [ -z "$run" ]; then
  run=$outputs/reward_base_$condition
  ctrlkit train condition="$condition" logger=csv hydra.run.dir="$run"
fi
steps=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['final']['step'])" "$run/controllability.json")
for variant in reward plain; do
  extra=(); [ "$variant" = reward ] && extra=(reward="$condition")
  ctrlkit train condition="$condition" "${extra[@]}" ckpt_path="$run/checkpoints/last.ckpt" trainer.max_steps=$((steps + more)) logger=csv \
    hydra.run.dir="$outputs/reward_$variant"
done
for variant in reward plain; do
  ctrlkit evaluate adapter_path="$outputs/reward_$variant" num_samples=64 num_seeds=2 hydra.run.dir="$outputs/reward_${variant}_eval"
done
