"""The ``ctrlkit`` command: ``ctrlkit <subcommand> [hydra overrides]``, e.g. ``ctrlkit train trainer.max_steps=20``."""

from __future__ import annotations

import errno
import shutil
import sys
import warnings
from pathlib import Path

import hydra
from hydra.errors import InstantiationException
from hydra.types import RunMode
from omegaconf import DictConfig

from conditions.io import check_writable_dir
from lightning_modules.commands.config_checks import (
    CONF_DIR,
    check_group_overrides,
    check_launch,
    check_override_keys,
    check_sweep_launch,
    one_line,
    run_dir_of,
)
from lightning_modules.commands.entry import CONFIG_NAMES, USAGE, unknown_command
from lightning_modules.commands.value_checks import check_settings
from lightning_modules.distributed import install_rank_in_log_records
from lightning_modules.errors import USER_ERRORS

# [script, subcommand, overrides...] of this process (set by ``main``)
LAUNCH_ARGV: list[str] = []
install_rank_in_log_records()  # conf/hydra's log format prints each record's rank when there are several
# conf/hydra/launcher/*.yaml carry the names of the launcher plugins' own configs, which Hydra 1.3 then uses as their
# schema (types; the plugin's defaults for keys a file leaves out), warning that this matching by name is deprecated.
# The files set every key, so they do not depend on it: the warning is noise on every sweep.
warnings.filterwarnings(
    "ignore", message=r"\s*'hydra/launcher/\w+' is validated against ConfigStore schema", category=UserWarning
)

# OSErrors that are the machine's state, not a bug: reported as one line naming the path
ENVIRONMENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR}


def _user_error(error: BaseException) -> BaseException | None:
    """The user-input error behind ``error`` (Hydra wraps errors raised while instantiating), if any."""
    while error is not None:
        if isinstance(error, USER_ERRORS):
            return error
        error = error.__cause__ or error.__context__
    return None


def _refused_setting(error: InstantiationException) -> str | None:
    """A class built from config that refused its arguments (its constructor raised ValueError or TypeError):
    "<config key>: <its message>"; None for anything else."""
    cause = error.__cause__
    if not isinstance(cause, ValueError | TypeError):
        return None
    key = next((line.split(":", 1)[1].strip() for line in str(error).splitlines() if line.startswith("full_key:")), "")
    return f"{key + ': ' if key else ''}{one_line(cause)}"


def _fail(command: str, error: BaseException | str) -> None:
    message = one_line(error) if isinstance(error, BaseException) else error
    print(f"ctrlkit {command}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _run(command: str, function, cfg: DictConfig):
    """``function(cfg)``, with a user error (also one Hydra wrapped while instantiating) or an unwritable path as
    one line and exit 2; a run folder the failed job left with nothing but Hydra's files is removed."""
    try:
        return function(cfg)
    except (InstantiationException, *USER_ERRORS) as error:
        cause = _user_error(error)
        if cause is None and isinstance(error, InstantiationException):
            cause = _refused_setting(error)
        if cause is None:
            raise
        _remove_empty_run_dir()
        _fail(command, cause)
    except OSError as error:
        if error.errno not in ENVIRONMENT_ERRNOS:
            raise
        _remove_empty_run_dir()
        _fail(command, f"cannot write {error.filename or 'a file'}: {error.strerror}")


def _remove_empty_run_dir() -> None:
    """Remove this job's Hydra run folder when it holds only Hydra's own files (``.hydra/``, the job log)."""
    from hydra.core.hydra_config import HydraConfig

    try:
        hydra_cfg = HydraConfig.get()
        run_dir = Path(hydra_cfg.runtime.output_dir)
    except ValueError:  # no Hydra run (a test calling a command function)
        return
    if not run_dir.is_dir() or run_dir.resolve() == Path.cwd().resolve():
        return
    own = {hydra_cfg.output_subdir, f"{hydra_cfg.job.name}.log"}
    if all(entry.name in own for entry in run_dir.iterdir()):
        shutil.rmtree(run_dir, ignore_errors=True)


def train_and_score(cfg: DictConfig) -> float | None:
    """Train, then the value a Hydra sweeper gets: ``optimized_metric`` of the finished run (an Optuna search's
    condition score, e.g. val/canny_f1), else val/loss; a named metric the run did not log is a one-line error."""
    from lightning_modules.commands.train import train  # heavy imports only once the config composed
    from lightning_modules.sweeps import optimized_value

    metrics, _ = train(cfg)
    return optimized_value(cfg, metrics)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def train_main(cfg: DictConfig) -> float | None:
    if LAUNCH_ARGV:
        # Hydra has read the overrides; Lightning's DDP launcher starts the other processes with
        # ``sys.argv[0]`` (or ``-m <module>``) + ``sys.argv[1:]``, which must name the subcommand again
        sys.argv = list(LAUNCH_ARGV)

    return _run("train", train_and_score, cfg)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="cache")
def cache_main(cfg: DictConfig) -> None:
    from lightning_modules.commands.cache import run_cache

    _run("cache", run_cache, cfg)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="extract")
def extract_main(cfg: DictConfig) -> None:
    from lightning_modules.commands.extract import run_extract

    _run("extract", run_extract, cfg)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="shards")
def shards_main(cfg: DictConfig) -> None:
    from lightning_modules.commands.shards import run_shards

    _run("shards", run_shards, cfg)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="evaluate")
def evaluate_main(cfg: DictConfig) -> None:
    from lightning_modules.commands.evaluate import run_evaluate

    _run("evaluate", run_evaluate, cfg)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="pretrain_base")
def pretrain_base_main(cfg: DictConfig) -> None:
    from lightning_modules.commands.pretrain_base import pretrain_base

    _run("pretrain-base", pretrain_base, cfg)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="generate")
def generate_main(cfg: DictConfig) -> None:
    from lightning_modules.commands.generate import run_generate

    _run("generate", run_generate, cfg)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="demo")
def demo_main(cfg: DictConfig) -> None:
    from lightning_modules.commands.demo import run_demo

    _run("demo", run_demo, cfg)


COMMANDS = {
    "train": train_main,
    "cache": cache_main,
    "evaluate": evaluate_main,
    "extract": extract_main,
    "shards": shards_main,
    "generate": generate_main,
    "demo": demo_main,
    "pretrain-base": pretrain_base_main,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, overrides = argv[0], argv[1:]
    if command not in COMMANDS:
        return unknown_command(command)
    try:
        check_group_overrides(overrides)
        composed = check_override_keys(CONFIG_NAMES[command], overrides)
        if composed is not None:
            check_settings(command, composed)  # before Hydra builds its job from them (task_name -> job name)
            if command == "train" and composed.hydra.get("mode") == RunMode.MULTIRUN:
                check_launch(composed)  # a sweep without -m (hparams_search=optuna sets hydra.mode)
        elif command == "train" and ("-m" in overrides or "--multirun" in overrides):
            check_sweep_launch(CONFIG_NAMES[command], overrides)  # e.g. SLURM tasks vs trainer.devices
        run_dir = run_dir_of(composed)
        if run_dir is not None:
            check_writable_dir(run_dir, "the run folder (hydra.run.dir)")
    except USER_ERRORS as error:
        _fail(command, error)
    # what a process launched later (Lightning's DDP runs this command again per extra process) must run
    LAUNCH_ARGV[:] = [sys.argv[0], command, *overrides]
    sys.argv = [f"ctrlkit {command}", *overrides]
    COMMANDS[command]()
    return 0


if __name__ == "__main__":
    # ``python -m lightning_modules.commands.cli``: run the functions of the module imported under its own name, not
    # of ``__main__``: the joblib and submitit launchers pickle the job's function for a worker process, which then
    # imports this module (installing its log-record and warning settings) instead of receiving a copy without them
    from lightning_modules.commands import cli

    sys.exit(cli.main())
