"""The ``ctrlkit`` console script. It answers ``--help`` and an unknown command at once, without importing torch,
Lightning or diffusers (seconds), and hands every command to ``lightning_modules.commands.cli``."""

from __future__ import annotations

import os
import sys

USAGE = """usage: ctrlkit <command> [hydra overrides ...]

commands:
  train            train an adapter on a frozen base model (conf/train.yaml)
  cache            fill system.cache_dir with what training would encode: VAE posteriors, text embeddings
                   (conf/cache.yaml: the training config, so give it the training run's overrides)
  evaluate         score an adapter beside the base model: controllability and image quality (conf/evaluate.yaml)
  extract          write condition maps for a folder of images (conf/extract.yaml)
  shards           write a dataset as tar shards for data=webdataset, with a manifest (conf/shards.yaml)
  generate         sample prompts under a composition of adapters (conf/generate.yaml)
  demo             a browser page to compose adapters and generate (Gradio, the demo extra; conf/demo.yaml)
  pretrain-base    train the tiny base model that `model=tiny` ships (conf/pretrain_base.yaml)

Examples:
  ctrlkit train trainer.max_steps=20
  ctrlkit train logger=csv adapter.learning_rate=1e-4
  ctrlkit train -m adapter.learning_rate=1e-4,1e-5 trainer.max_steps=5   (a Hydra sweep)
  ctrlkit train -m hydra/launcher=joblib adapter.learning_rate=1e-3,3e-4   (its jobs at the same time)
  ctrlkit train -m hparams_search=optuna hydra.sweeper.n_trials=3        (an Optuna search: best trial)
  ctrlkit train --cfg job                                                  (print the composed config)
  ctrlkit cache system.cache_dir=outputs/feature_cache                     (then train with the same setting)
  ctrlkit evaluate adapter_path=outputs/train/runs/<run>                     (base vs adapter, metrics.json)
  ctrlkit extract condition=canny input=photos output=photos_canny
  ctrlkit shards source=shapes output=shards/shapes                         (train: data=webdataset data.urls=...)
  ctrlkit generate composition=examples/compose_three.yaml                (the three shipped tiny adapters)
  ctrlkit demo server_port=7860                                             (then open http://127.0.0.1:7860)
"""

# command -> its config in conf/ (the functions that run them are ``cli.COMMANDS``, with the same keys)
CONFIG_NAMES = {
    "train": "train",
    "cache": "cache",
    "evaluate": "evaluate",
    "extract": "extract",
    "shards": "shards",
    "generate": "generate",
    "demo": "demo",
    "pretrain-base": "pretrain_base",
}


def unknown_command(command: str) -> int:
    """Say which commands exist (stderr) and return the exit status 2."""
    print(f"ctrlkit: error: unknown command '{command}'; choose one of: {', '.join(CONFIG_NAMES)}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        try:
            print(USAGE, flush=True)
        except BrokenPipeError:  # `ctrlkit --help | head`: the reader has gone, which is no error
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nor is the flush at exit
        return 0
    if argv[0] not in CONFIG_NAMES:
        return unknown_command(argv[0])
    from lightning_modules.commands import cli  # the training stack: imported only for a command that runs

    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
