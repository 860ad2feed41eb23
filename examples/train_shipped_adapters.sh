#!/usr/bin/env bash
# Retrain the four tiny adapters ctrlkit ships for the shipped base (lightning_modules/assets/tiny_adapters/), with
# the documented experiments, and copy each run's exported adapter/ folder (weights, config, model card README.md,
# samples.png) and its config.yaml (as train_config.yaml) over the shipped one. `model=tiny` users load them by name: `adapter: tiny/controlnet_canny`.
# Usage:   bash examples/train_shipped_adapters.sh [destination folder]
# Expect:  five `ctrlkit train` runs (on a 2-core CPU about 9, 4, 13, 18 and 10 minutes), then "shipped:
#          <destination>/controlnet_canny", ".../t2i_adapter_canny", ".../gligen_masked_boxes", ".../controlnet_multi".
set -euo pipefail
destination=${1:-lightning_modules/assets/tiny_adapters}
runs=${CTRLKIT_OUTPUTS:-outputs}/shipped

ship() {
  local name=$1
  shift
  ctrlkit train "$@" logger=csv hydra.run.dir="$runs/$name"
  rm -rf "${destination:?}/$name"
  mkdir -p "$destination"
  cp -r "$runs/$name/adapter" "$destination/$name"
  # the run's config (its condition, for `ctrlkit evaluate adapter_path=tiny/<name>`), paths relative to here
  sed "s#$PWD/##g" "$runs/$name/config.yaml" > "$destination/$name/train_config.yaml"
  echo "shipped: $destination/$name"
}

# ControlNet on canny edges: the default run (1000 steps)
ship controlnet_canny experiment=controlnet_canny_shapes
# T2I-Adapter on canny edges: control appears by step 300; 500 steps
ship t2i_adapter_canny experiment=t2i_adapter_canny_shapes trainer.max_steps=500
# the grounding adapter that places objects: box-masked GLIGEN, 700 steps; its gated layers only (no unet/ copy)
ship gligen_masked_boxes experiment=gligen_masked_boxes_shapes adapter.build.export_unet=false
# one ControlNet for canny + shapes depth + shapes mask, any subset at inference: 2000 steps on one-object scenes,
# then 1000 on 1-3-object scenes from those weights (experiment=controlnet_multi_scenes; its card counts 3000 in all)
ctrlkit train experiment=controlnet_multi_shapes trainer.max_steps=2000 logger=csv hydra.run.dir="$runs/controlnet_multi_stage1"
ship controlnet_multi experiment=controlnet_multi_scenes init_adapter="$runs/controlnet_multi_stage1/adapter"
