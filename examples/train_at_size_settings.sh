#!/usr/bin/env bash
# The memory and speed settings of a real-size run, on the tiny model so it finishes in a minute on a CPU:
# bf16 mixed precision (frozen weights in bf16, the adapter in fp32), gradient checkpointing, and the disk cache of
# VAE posteriors and text embeddings, batches of 2 accumulated twice per optimizer step, run twice.
# Prints, for each run, the precision line ("bf16-mixed: ...M frozen parameters cast to torch.bfloat16; trainable
# ones stay float32") and the cache line; the second run's says "(the VAE encoder never ran)".
# On a GPU add trainer=gpu, and optimizer=adamw8bit with `pip install 'ctrlkit[bnb]'`.
set -euo pipefail
cache="${CTRLKIT_OUTPUTS:-outputs}/feature_cache_example"
for run in first second; do
  ctrlkit train trainer.precision=bf16-mixed system.gradient_checkpointing=true system.cache_dir="$cache" \
    trainer.max_steps=10 logger=none callbacks.controllability.every_n_steps=0 callbacks.sample_grid.every_n_steps=0 \
    data.batch_size=2 trainer.accumulate_grad_batches=2 task_name="size_settings_$run" 2>&1 | grep -E "bf16-mixed|feature cache|gradient checkpointing"
done
