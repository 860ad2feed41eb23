#!/usr/bin/env bash
# Plain GLIGEN's learning curve well past 3000 steps (issue 17): the recipe of experiment=gligen_boxes_shapes run to
# 6000 steps, validation, val/box_iou and val/condition_gain every 250 steps, a checkpoint every 250.
# Run it ALONE on this 2-core CPU (48 min for 6000 steps, measured; anything else running beside it slows it
# several times over), or on a GPU (trainer=gpu) in minutes. Rerun the same command to continue a killed run: it
# resumes exactly from the newest checkpoint.
# Usage:   nice bash benchmarks/gligen_plain_curve.sh [run dir, default outputs/gligen_plain_6000] [overrides]
# Expect:  "ctrlkit train: 6000 steps in ... s"; the curve is <run>/csv/version_*/metrics.csv (val/box_iou per step)
#          and <run>/controllability.json.
set -euo pipefail
run=${1:-outputs/gligen_plain_6000}
args=(experiment=gligen_boxes_shapes trainer.max_steps=6000 trainer.val_check_interval=250
      callbacks.controllability.every_n_steps=250 callbacks.sample_grid.every_n_steps=1000 logger=csv "${@:2}")
if [ -d "$run/checkpoints" ]; then
  ctrlkit train "${args[@]}" resume="$run"
else
  ctrlkit train "${args[@]}" hydra.run.dir="$run"
fi
python - "$run" <<'PY'
import csv
import glob
import sys

curve = {}  # step -> the metrics logged at it (one CSV row per logging call)
for path in sorted(glob.glob(f"{sys.argv[1]}/csv/version_*/metrics.csv")):
    for row in csv.DictReader(open(path)):
        curve.setdefault(int(row["step"]), {}).update({key: value for key, value in row.items() if value})
for step, metrics in sorted(curve.items()):
    if "val/box_iou" in metrics:
        # validation logs at the step before the callback's (Lightning's step counter moves after it)
        gain = metrics.get("val/condition_gain") or curve.get(step - 1, {}).get("val/condition_gain")
        gain = f"{float(gain):.4f}" if gain else "-"
        print(f"step {step:>5}  val/box_iou {float(metrics['val/box_iou']):.3f}  val/condition_gain {gain}")
PY
