#!/usr/bin/env bash
# Fine-tune saved adapter weights (`init_adapter=`): a new run whose adapter starts from a saved one -- here the
# shipped tiny ControlNet for canny edges; a released ControlNet folder or single file, or an earlier run's adapter/,
# on its own base model, works the same way -- trained a few more steps at lr 1e-4.
# Usage:   bash examples/finetune_saved_adapter.sh [adapter, default tiny/controlnet_canny] [steps, default 20]
#          Add a reward to the command for ControlNet++-style fine-tuning of released weights (`reward=canny`).
# Expect:  "init_adapter: the adapter starts from tiny/controlnet_canny (ControlNet, diffusers folder)", the run's
#          summary (20 steps in ~1-3 min), then "step 0 (the saved weights): canny_f1 0.501; the base model without
#          them: 0.039" (measured here): the run's first validation already scores as the shipped adapter, where a
#          fresh build would score as the base model does.
set -euo pipefail
cd "$(dirname "$0")/.."
outputs=${CTRLKIT_OUTPUTS:-outputs}
adapter=${1:-tiny/controlnet_canny}
steps=${2:-20}
run=$outputs/finetune_saved_adapter
ctrlkit train init_adapter="$adapter" adapter.learning_rate=1e-4 trainer.max_steps="$steps" logger=csv \
  hydra.run.dir="$run"
python - "$run/controllability.json" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
first, base = report["curve"][0], report["base_without_adapter"]
print(f"step 0 (the saved weights): canny_f1 {first['canny_f1']:.3f}; the base model without them: {base['canny_f1']:.3f}")
PY
