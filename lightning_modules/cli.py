"""The ``ctrlkit`` command: ``ctrlkit <subcommand> [hydra overrides]``, e.g. ``ctrlkit train trainer.max_steps=20``."""

from __future__ import annotations

import sys

import hydra
from hydra.errors import InstantiationException
from omegaconf import DictConfig

from lightning_modules.config_checks import CONF_DIR, check_group_overrides, check_override_keys
from lightning_modules.errors import USER_ERRORS

USAGE = """usage: ctrlkit <command> [hydra overrides ...]

commands:
  train            train an adapter on a frozen base model (conf/train.yaml)
  evaluate         score an adapter beside the base model: controllability and image quality (conf/evaluate.yaml)
  extract          write condition maps for a folder of images (conf/extract.yaml)
  generate         sample prompts under a composition of adapters (conf/generate.yaml)
  pretrain-base    train the tiny base model that `model=tiny` ships (conf/pretrain_base.yaml)

Examples:
  ctrlkit train trainer.max_steps=20
  ctrlkit train logger=csv adapter.learning_rate=1e-4
  ctrlkit train -m adapter.learning_rate=1e-4,1e-5 trainer.max_steps=5   (a Hydra sweep)
  ctrlkit train --cfg job                                                  (print the composed config)
  ctrlkit evaluate adapter_path=outputs/train/runs/<run>                     (base vs adapter, metrics.json)
  ctrlkit extract condition=canny input=photos output=photos_canny
  ctrlkit generate composition=examples/composition.yaml
"""


def _user_error(error: BaseException) -> BaseException | None:
    """The user-input error behind ``error`` (Hydra wraps errors raised while instantiating), if any."""
    while error is not None:
        if isinstance(error, USER_ERRORS):
            return error
        error = error.__cause__ or error.__context__
    return None


def _fail(command: str, error: BaseException) -> None:
    print(f"ctrlkit {command}: error: {error}", file=sys.stderr)
    raise SystemExit(2)


def _run(command: str, function, cfg: DictConfig):
    """``function(cfg)``, with a user error (also one Hydra wrapped while instantiating) as one line and exit 2."""
    try:
        return function(cfg)
    except (InstantiationException, *USER_ERRORS) as error:
        cause = _user_error(error)
        if cause is None:
            raise
        _fail(command, cause)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def train_main(cfg: DictConfig) -> float | None:
    from lightning_modules.train import train  # heavy imports only once the config composed

    metrics, _ = _run("train", train, cfg)
    return metrics.get("val/loss")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="extract")
def extract_main(cfg: DictConfig) -> None:
    from lightning_modules.extract import run_extract

    _run("extract", run_extract, cfg)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="evaluate")
def evaluate_main(cfg: DictConfig) -> None:
    from lightning_modules.evaluate import run_evaluate

    _run("evaluate", run_evaluate, cfg)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="pretrain_base")
def pretrain_base_main(cfg: DictConfig) -> None:
    from lightning_modules.pretrain_base import pretrain_base

    _run("pretrain-base", pretrain_base, cfg)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="generate")
def generate_main(cfg: DictConfig) -> None:
    from lightning_modules.generate import run_generate

    _run("generate", run_generate, cfg)


COMMANDS = {
    "train": train_main,
    "evaluate": evaluate_main,
    "extract": extract_main,
    "generate": generate_main,
    "pretrain-base": pretrain_base_main,
}
CONFIG_NAMES = {
    "train": "train",
    "evaluate": "evaluate",
    "extract": "extract",
    "generate": "generate",
    "pretrain-base": "pretrain_base",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, overrides = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"ctrlkit: error: unknown command '{command}'; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        check_group_overrides(overrides)
        if command in CONFIG_NAMES:
            check_override_keys(CONFIG_NAMES[command], overrides)
    except USER_ERRORS as error:
        _fail(command, error)
    sys.argv = [f"ctrlkit {command}", *overrides]
    COMMANDS[command]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
