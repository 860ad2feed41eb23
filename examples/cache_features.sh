#!/usr/bin/env bash
# Fill the disk feature cache ahead of training, then train from it.
# 1. `ctrlkit cache` over 200 shapes items: a progress bar, then one line such as
#    "ctrlkit cache: 200 items; 329 entries written (200 vae_posterior, 129 text_embedding), 0 already there;
#    <abs path>/feature_cache_example; 2.9 s" (the counts of text embeddings depend on how many captions differ);
# 2. the same again: "0 entries written, 329 already there" (nothing is encoded twice);
# 3. a 12-step training run with the same overrides, whose cache line ends "vae_posterior: 192 read, 0 computed
#    (the VAE encoder never ran)".
set -euo pipefail
cache="${CTRLKIT_OUTPUTS:-outputs}/feature_cache_example"
args=(data.train_size=200 system.cache_dir="$cache" logger=none)
ctrlkit cache "${args[@]}"
ctrlkit cache "${args[@]}" progress=false
ctrlkit train "${args[@]}" trainer.max_steps=12 callbacks.controllability.every_n_steps=0 \
  callbacks.sample_grid.every_n_steps=0 callbacks.controllability.num_samples=4 2>&1 | grep -E "feature cache|steps in"
