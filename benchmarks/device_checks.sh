#!/usr/bin/env bash
# The GPU checks of issues 15, 16 and 17 in one device call of at most 10 minutes, for a session lent a GPU.
# First, here:   . .venv/bin/activate && bash benchmarks/device_wheels.sh      (.whl/: what the device image lacks)
# Then:          device run  command="bash benchmarks/device_checks.sh"  carry=[".whl"]  timeout_s=600
# gpu_train.py may take most of the 10 minutes (each recipe builds full-size models; compile); in a 15-minute lease
# call it twice back to back (the machine goes back after 30 s idle): first SKIP=gligen, then
# SKIP="gpu_train ddp50 fsdp50" BUDGET=<device seconds left minus 90> for the GLIGEN curve.
# Each result lands in $OUT (the device tool brings it back):
#   gpu_train.log   benchmarks/gpu_train.py: SD1.5 at 512 px, fp32 / bf16 / checkpointing / 8-bit Adam / compile /
#                   channels_last, ours against diffusers' loop, and SDXL at 1024 px (issue 15, item 3)
#   ddp50.log, fsdp50.log   the default run on the GPU for 50 steps with trainer=ddp / trainer=fsdp, devices=1
#                   (issue 16, item 5)
#   gligen.log, gligen_metrics.csv   plain GLIGEN (experiment=gligen_boxes_shapes,
#                   fp32 as on the CPU) for whatever is left of BUDGET, val box IoU every 1000 steps: its curve past
#                   the 6000 steps measured on the CPU (issue 17, item 2); the run is stopped by SIGINT when the
#                   budget ends (Lightning's graceful shutdown), so metrics.csv holds every validation until then
#   summary.txt     versions, each part's exit status and seconds, the GLIGEN curve
# Env: BUDGET seconds for the whole script (default 560, under the call's 600); SKIP="gpu_train ddp fsdp gligen"
#      leaves parts out; ACCEL=cpu STEPS=3 EVERY=20 BUDGET=240 is a dry run on a CPU (gpu_train.py then says it
#      needs CUDA, and fsdp that it runs on CUDA GPUs only).
set -uo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
budget=${BUDGET:-560}
accelerator=${ACCEL:-gpu}
steps=${STEPS:-50}
every=${EVERY:-1000}  # GLIGEN validation interval
skip=" ${SKIP:-} "
out=${OUT:-outputs/device_checks}
mkdir -p "$out"
summary=$out/summary.txt
: > "$summary"
export WANDB_MODE=disabled PYTHONUNBUFFERED=1

if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ctrlkit_site \
    .whl/*.whl || { echo "installing .whl/ failed" | tee -a "$summary"; exit 1; }
  export PYTHONPATH=/tmp/ctrlkit_site:$PWD
else
  export PYTHONPATH=$PWD
fi
python3 - >> "$summary" 2>&1 <<'PY'
import diffusers, hydra, pytorch_lightning, torch, transformers
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA GPU"
print(f"{gpu}; torch {torch.__version__}, diffusers {diffusers.__version__}, lightning {pytorch_lightning.__version__},"
      f" transformers {transformers.__version__}, hydra {hydra.__version__}")
PY

ctrlkit() { python3 -m lightning_modules.commands.cli "$@"; }

part() {  # part NAME SECONDS COMMAND...: run unless skipped, log to $out/NAME.log, record status and time
  local name=$1 limit=$2
  shift 2
  if [[ "$skip" == *" $name "* ]]; then
    echo "$name: skipped" >> "$summary"
    return
  fi
  local began=$SECONDS
  timeout --signal=INT --kill-after=20 "$limit" "$@" > "$out/$name.log" 2>&1
  echo "$name: exit $? in $((SECONDS - began)) s" >> "$summary"
}

part gpu_train 360 python3 benchmarks/gpu_train.py --repeats 10
short=(trainer.accelerator="$accelerator" trainer.devices=1 trainer.max_steps="$steps" logger=csv)
part ddp50 75 ctrlkit train trainer=ddp "${short[@]}" hydra.run.dir=/tmp/ctrlkit_ddp50
part fsdp50 75 ctrlkit train trainer=fsdp "${short[@]}" hydra.run.dir=/tmp/ctrlkit_fsdp50

left=$((budget - (SECONDS - start) - 15))
if [ "$left" -gt 60 ]; then
  run=/tmp/ctrlkit_gligen
  rm -rf "$run"
  part gligen "$left" ctrlkit train experiment=gligen_boxes_shapes trainer.accelerator="$accelerator" \
    trainer.max_steps=100000 trainer.val_check_interval="$every" callbacks.controllability.every_n_steps="$every" \
    callbacks.sample_grid.every_n_steps=5000 callbacks.model_checkpoint.every_n_train_steps=5000 logger=csv \
    hydra.run.dir="$run"
  cat "$run"/csv/version_*/metrics.csv > "$out/gligen_metrics.csv" 2>/dev/null
  python3 - "$run" >> "$summary" 2>&1 <<'PY'
import csv, glob, sys

rows = {}  # step -> the metrics logged at it (one CSV row per logging call)
for path in sorted(glob.glob(f"{sys.argv[1]}/csv/version_*/metrics.csv")):
    for row in csv.DictReader(open(path)):
        rows.setdefault(int(row["step"]), {}).update({key: value for key, value in row.items() if value})
points = []
for step, metrics in sorted(rows.items()):
    if "val/box_iou" in metrics:
        # validation logs the loss terms at the step before the callback's (Lightning's counter moves after it)
        gain = metrics.get("val/condition_gain") or rows.get(step - 1, {}).get("val/condition_gain", "nan")
        points.append(f"{step}: {float(metrics['val/box_iou']):.3f} / {float(gain):.3f}")
print("plain GLIGEN, step: val box IoU / val condition gain")
print("  ".join(points) or "no validation")
PY
else
  echo "gligen: no time left ($left s)" >> "$summary"
fi
echo "total: $((SECONDS - start)) s" >> "$summary"
cat "$summary"
