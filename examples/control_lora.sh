#!/usr/bin/env bash
# A 50-step Control-LoRA run (adapter=control_lora: the ControlNet's encoder copy frozen, peft LoRA on it; needs
# pip install 'ctrlkit[lora]') on canny edges of `shapes` with the tiny model, then generation with its export.
# Expect: a progress bar, "ctrlkit train: 50 steps in ... s; outputs in <run>" with the run's paths; then the sizes
#   control_lora.safetensors  411304 bytes  (LoRA + hint encoder + zero convs; ctrlkit rebuilds the frozen copy
#                                            from the base UNet, and refuses a base with other weights)
#   controlnet/diffusion_pytorch_model.safetensors  about 2.8 MB  (the LoRA merged in: a diffusers ControlNetModel)
# and "ctrlkit generate: wrote .../image_000.png" twice: once from the Control-LoRA folder (logged as "Control-LoRA,
# Control-LoRA folder"), once from the merged folder as a plain ControlNet. 50 steps is a smoke test: control shows
# after a few hundred (the full run: ctrlkit train adapter=control_lora).
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
ctrlkit train adapter=control_lora trainer.max_steps=50 logger=csv hydra.run.dir="$work/run" "$@"
adapter="$work/run/adapter"
wc -c "$adapter/control_lora.safetensors" "$adapter/controlnet/diffusion_pytorch_model.safetensors"
prompt='prompts=[a red circle on a white background]'
for folder in "$adapter" "$adapter/controlnet"; do
  unit="{adapter: $folder, source_image: examples/images/compose_three_circle.png, extractor: canny}"
  ctrlkit generate "units=[$unit]" "$prompt" num_inference_steps=20 hydra.run.dir="$work/generated_$(basename "$folder")"
done
