#!/usr/bin/env bash
# An Optuna search (hparams_search=optuna) of 3 short ControlNet trials on canny edges of `shapes`, maximising each
# run's final Canny F1 (val/canny_f1, the condition's own score) over adapter.learning_rate and the prompt dropout.
# Expect: Optuna's "Study name / Sampler / Directions" lines, each trial's training, then one line per trial
#   "  trial N: val/canny_f1=0.0xxx  adapter.learning_rate=... adapter.condition_dropout.text=..."
# and "ctrlkit train: best trial: trial N of 3: val/canny_f1=... (maximize) with ...; its run: <sweep>/<N>; results:
# <sweep>/optimization_results.yaml". Each trial is its own run folder under outputs/train/multiruns/<date>_<time>/.
# Needs the launcher plugins: pip install 'ctrlkit[launchers]' (part of .[dev]).
set -euo pipefail
ctrlkit train -m hparams_search=optuna hydra.sweeper.n_trials=3 trainer.max_steps=20 logger=csv "$@"
