#!/usr/bin/env bash
# The shapes training set as tar shards, then a short ControlNet run that streams them (data=webdataset).
# 1. `ctrlkit shards source=shapes`: 2000 scenes (data=shapes' training items 0-1999, with their canny maps and
#    exact boxes) in 8 shards of 250, a progress bar, then
#    "ctrlkit shards: 2000 samples in 8 shards (8 written, 0 already done), 0 bad samples left out;
#    <abs path>/shapes/manifest.json; ... s";
# 2. the validation scenes (data=shapes' fixed set, seed 1000003) as one shard of 16: "16 samples in 1 shards";
# 3. the first command again: "(0 written, 8 already done)" -- finished shards are never rewritten;
# 4. a 12-step run on the shards with 2 DataLoader workers (each reads 4 of the 8 shards), whose summary starts
#    "ctrlkit train: 12 steps in ... s; outputs in ...".
set -euo pipefail
shards="${CTRLKIT_OUTPUTS:-outputs}/shards_example"
ctrlkit shards source=shapes count=2000 maxcount=250 output="$shards/shapes"
ctrlkit shards source=shapes count=16 seed=1000003 progress=false output="$shards/shapes_val"
ctrlkit shards source=shapes count=2000 maxcount=250 progress=false output="$shards/shapes"
ctrlkit train data=webdataset data.urls="$shards/shapes" data.val_urls="$shards/shapes_val" data.num_workers=2 \
  trainer.max_steps=12 logger=none callbacks.controllability.every_n_steps=0 callbacks.sample_grid.every_n_steps=0 \
  callbacks.controllability.num_samples=4 2>&1 | grep -E "ctrlkit train:|bad data"
