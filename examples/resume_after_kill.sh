#!/usr/bin/env bash
# Kill a training run, then resume it exactly where its last checkpoint left it.
# 1. starts a 40-step run in examples_runs/resume (a checkpoint every 10 steps) and SIGKILLs it after ~20 s;
# 2. resumes it with `resume=<run dir>`: prints "resuming from .../checkpoints/<newest>.ckpt; the run continues in
#    ..." and finishes with "ctrlkit train: 40 steps in ... s". (A CPU run resumed this way ends with the same adapter
#    weights, bit for bit, as one never interrupted: tests/lightning_modules/test_resume.py checks it.)
# 3. truncates the newest checkpoint and resumes again: the log reports "resume: skipping unreadable checkpoint ..."
#    and continues from the one before.
set -euo pipefail
run=examples_runs/resume
rm -rf "$run"
args=(trainer.max_steps=40 callbacks.model_checkpoint.every_n_train_steps=10 logger=none data.batch_size=4
      callbacks.controllability.num_samples=4 callbacks.sample_grid.every_n_steps=0)
ctrlkit train "${args[@]}" hydra.run.dir="$run" & pid=$!
sleep 20; kill -KILL "$pid" || true; wait "$pid" || true
ls "$run/checkpoints"
ctrlkit train "${args[@]}" resume="$run"
newest=$(ls -t "$run"/checkpoints/step_*.ckpt | head -1)
head -c 1000 "$newest" > "$newest.part" && mv "$newest.part" "$newest" && rm -f "$run/checkpoints/last.ckpt"
ctrlkit train "${args[@]}" trainer.max_steps=50 resume="$run" 2>&1 | grep -E "skipping unreadable|resuming from|steps in"
