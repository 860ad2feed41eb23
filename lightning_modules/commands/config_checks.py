"""Checks on the composed config that run before any model loads, each failing with a one-line message: overrides,
groups, plugins, strategies and launchers here; the values themselves in ``value_checks``."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lightning_modules.commands.value_checks import (
    check_node_against_signature,
    check_settings,
    check_values,
    target_nodes,
)
from lightning_modules.errors import CtrlkitError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
# Hydra functions that build sweep values; their arguments are not option names.
_SWEEP_FUNCTIONS = ("glob(", "range(", "choice(", "interval(", "tag(", "sort(", "shuffle(")


def group_options(group: str, conf_dir: Path = CONF_DIR) -> list[str]:
    """Option names of a config group (its yaml files), e.g. group_options("adapter") -> ["controlnet"]."""
    return sorted(path.stem for path in (conf_dir / group).glob("*.yaml"))


def load_condition_config(name: str) -> DictConfig:
    """``conf/condition/<name>.yaml`` as a config; a name that is no option is a one-line error listing them."""
    if name not in group_options("condition"):
        raise CtrlkitError(f"unknown extractor '{name}'; choose one of: {', '.join(group_options('condition'))}")
    # under a root `condition` key, as in a composed config, so its own ${condition.*} interpolations resolve
    return OmegaConf.create({"condition": OmegaConf.load(CONF_DIR / "condition" / f"{name}.yaml")}).condition


def unit_condition(extractor) -> DictConfig:
    """The condition config a composition unit's ``extractor`` names: a conf/condition name (``canny``), or a
    mapping of the name and settings of its extractor, e.g. ``{name: depth, model: /models/dpt-hybrid-midas}``
    for an extractor whose weights are local files (``model: ???`` in conf/condition/depth.yaml)."""
    if isinstance(extractor, str):
        name, settings = extractor, {}
    elif isinstance(extractor, dict) and isinstance(extractor.get("name"), str):
        settings = {key: value for key, value in extractor.items() if key != "name"}
        name = extractor["name"]
    else:
        raise CtrlkitError(
            f"extractor={extractor!r}; allowed: a conf/condition name, or {{name: <it>, <extractor setting>: <value>}}"
        )
    condition = load_condition_config(name)
    for key, value in settings.items():
        condition.extractor[key] = value
    check_node_against_signature(f"extractor {name}", condition.extractor)
    missing = [str(key) for key in condition.extractor if OmegaConf.is_missing(condition.extractor, str(key))]
    if missing:
        raise CtrlkitError(
            f"extractor {name} needs {missing[0]} (local files); write extractor: "
            f"{{name: {name}, {missing[0]}: <path>}}"
        )
    return condition


def check_group_overrides(overrides: list[str], conf_dir: Path = CONF_DIR) -> None:
    """Reject ``group=name`` overrides that name no yaml in ``conf/<group>/`` (for ``hydra/...`` groups: nor a
    config Hydra or an installed plugin registers), and options whose Hydra plugin is not installed, before Hydra
    composes anything."""
    for override in overrides:
        key, sep, value = override.lstrip("+~").partition("=")
        if not sep or "." in key or not (conf_dir / key).is_dir():
            continue
        if value.startswith(_SWEEP_FUNCTIONS) or value in ("null", "", "[]"):
            continue
        options = group_options(key, conf_dir)
        if key.startswith("hydra/"):
            options = sorted(set(options) | set(_registered_options(key)))
        for name in value.split(","):
            if name.strip() not in options:
                raise CtrlkitError(f"unknown {key} '{name.strip()}'; choose one of: {', '.join(options)}")
            check_plugin_installed(key, name.strip())


# config options that need a Hydra plugin: (group, option) -> (its distribution, its module); the `launchers` extra
# of ctrlkit installs all three
HYDRA_PLUGINS = {
    ("hydra/launcher", "joblib"): ("hydra-joblib-launcher", "hydra_plugins.hydra_joblib_launcher"),
    ("hydra/launcher", "submitit_local"): ("hydra-submitit-launcher", "hydra_plugins.hydra_submitit_launcher"),
    ("hydra/launcher", "submitit_slurm"): ("hydra-submitit-launcher", "hydra_plugins.hydra_submitit_launcher"),
    ("hydra/sweeper", "optuna"): ("hydra-optuna-sweeper", "hydra_plugins.hydra_optuna_sweeper"),
    ("hparams_search", "optuna"): ("hydra-optuna-sweeper", "hydra_plugins.hydra_optuna_sweeper"),
}


def module_installed(name: str) -> bool:
    """Whether ``name`` can be imported (found on the path), without importing it."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module set to None in sys.modules
        return False


def check_plugin_installed(group: str, option: str) -> None:
    """``hydra/launcher=joblib`` without hydra-joblib-launcher installed: one line naming the extra to install."""
    plugin = HYDRA_PLUGINS.get((group, option))
    if plugin is not None and not module_installed(plugin[1]):
        raise CtrlkitError(
            f"{group}={option} needs the Hydra plugin {plugin[0]}, which is not installed: "
            "pip install 'ctrlkit[launchers]'"
        )


def _registered_options(group: str) -> list[str]:
    """Options of a ``hydra/...`` group that Hydra itself or an installed plugin registers (``basic``, ``joblib``)."""
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins

    Plugins.instance()  # discovers the installed plugins, which register their configs
    try:
        names = ConfigStore.instance().list(group)
    except OSError:  # no such group in the store
        return []
    return [name.removesuffix(".yaml") for name in names if name.endswith(".yaml")]


def check_override_keys(config_name: str, overrides: list[str], conf_dir: Path = CONF_DIR) -> DictConfig | None:
    """Before Hydra runs anything, name a bad override in one line instead of Hydra's multi-line report: a key
    the config does not have (``system.learnng_rate=1``, or ``foo=1`` at the top), with the keys its parent takes;
    then any other composition error (override syntax, types) as its first lines joined. Sweeps, Hydra flags
    (``-m``, ``--cfg``) and ``+``/``~`` overrides are left to Hydra. Returns the composed config (with ``hydra``),
    or None where Hydra composes it per job (sweeps, flags)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if any(o.startswith("-") for o in overrides):  # Hydra's flags (-m, --cfg job, -cn ...): Hydra parses them
        return None
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as error:  # a syntax error in an override
        raise CtrlkitError(f"override not accepted: {one_line(error)}") from error
    sweeps = [override.input_line for override in parsed if override.is_sweep_override()]
    if sweeps:  # without -m (flags returned above)
        raise CtrlkitError(
            f"{sweeps[0]} is a sweep: add -m to run one job per value, write a list as [a,b] or quote a string "
            "with a comma"
        )
    settings = [o for o in overrides if "=" in o and not o.startswith(("+", "~", "hydra.", "hydra/"))]
    groups = [o for o in settings if _is_group(o.split("=")[0], conf_dir)]
    cfg = _compose(config_name, groups, conf_dir)
    if cfg is None:  # the groups themselves do not compose: Hydra reports it below
        settings = []
    for override in settings:
        key = override.split("=", 1)[0]
        if _is_group(key, conf_dir):
            continue
        parent_key, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key, throw_on_missing=False) if parent_key else cfg
        if isinstance(parent, DictConfig) and leaf not in parent.keys():
            keys = ", ".join(sorted(str(k) for k in parent.keys() if not str(k).startswith("_")))
            where = f"{parent_key} takes" if parent_key else f"ctrlkit's {config_name} config has"
            moved = f" ({key} is now {MOVED_KEYS[key]})" if key in MOVED_KEYS else ""
            raise CtrlkitError(f"unknown key '{key}'{moved}; {where}: {keys} (add a new key with +{key}=...)")
    try:
        return _compose(config_name, overrides, conf_dir, raise_errors=True)
    except Exception as error:  # Hydra's and OmegaConf's composition errors, as one line
        raise CtrlkitError(f"override not accepted: {one_line(error)}") from error


def first_job_overrides(overrides: list[str]) -> list[str] | None:
    """The overrides of a ``-m`` run's first job: each sweep replaced by its first value (``a=1,2`` -> ``a=1``;
    sweeps only a sweeper enumerates, such as Optuna's ``interval``, left out). None when other Hydra flags than
    ``-m`` are given or the overrides do not parse (Hydra reports those)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    settings = [o for o in overrides if o not in ("-m", "--multirun")]
    if any(o.startswith("-") for o in settings):
        return None
    try:
        parsed = OverridesParser.create().parse_overrides(settings)
    except Exception:
        return None
    first = []
    for override in parsed:
        if not override.is_sweep_override():
            first.append(override.input_line)
            continue
        try:
            value = next(iter(override.sweep_string_iterator()))
        except Exception:  # interval(), glob() ...: enumerated by the sweeper
            continue
        first.append(f"{override.input_line.partition('=')[0]}={value}")
    return first


def check_sweep_launch(config_name: str, overrides: list[str], conf_dir: Path = CONF_DIR) -> None:
    """Before a ``-m`` run launches anything: :func:`check_launch` on its first job's config, so a SLURM job whose
    trainer does not match its tasks fails here, not after waiting for its nodes. Overrides that do not compose are
    left to Hydra."""
    first = first_job_overrides(overrides)
    cfg = _compose(config_name, first, conf_dir) if first is not None else None
    if cfg is not None:
        check_launch(cfg)


# keys whose settings moved to a config group of their own (0.1: the optimizer and LR schedule groups)
MOVED_KEYS = {
    "system.weight_decay": "optimizer.weight_decay",
    "system.adam_betas": "optimizer.betas",
    "system.lr_warmup_steps": "lr_scheduler.scheduler.num_warmup_steps",
}


def _is_group(key: str, conf_dir: Path) -> bool:
    return "." not in key and (conf_dir / key.lstrip("+~")).is_dir()


def _compose(config_name: str, overrides: list[str], conf_dir: Path, raise_errors: bool = False):
    """The composed config (with ``hydra``), or None when it does not compose and ``raise_errors`` is False."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    try:
        GlobalHydra.instance().clear()
        with initialize_config_dir(version_base="1.3", config_dir=str(conf_dir)):
            return compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    except Exception:
        if raise_errors:
            raise
        return None
    finally:
        GlobalHydra.instance().clear()


def one_line(error: BaseException) -> str:
    """An error's message in one line: its lines joined, OmegaConf's ``full_key``/``object_type`` details dropped."""
    details = ("full_key:", "object_type", "reference_type", "See https://hydra.cc", "Set the environment variable")
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    kept = [line for line in lines if not line.startswith(details)] or [type(error).__name__]
    return kept[0] if len(kept) == 1 else "; ".join(line.rstrip(".") for line in kept)


def run_dir_of(cfg: DictConfig | None) -> Path | None:
    """The folder Hydra will create for a composed config (``hydra.run.dir``; None when it writes none there:
    no ``.hydra`` output and the current folder), or None when it cannot be told beforehand."""
    if cfg is None or OmegaConf.select(cfg, "hydra.output_subdir", default=None) is None:
        return None
    try:
        run_dir = OmegaConf.select(cfg, "hydra.run.dir")
    except Exception:  # an interpolation that only resolves inside a run
        return None
    return Path(str(run_dir)) if run_dir and str(run_dir) != "." else None


def check_train_config(cfg: DictConfig) -> None:
    """Everything about the config that can be wrong, checked before any model loads; each failure is one line
    naming the key and what is allowed: adapter x condition compatibility, required values, unknown keys and wrong
    types (against the signature of each ``_target_``), probabilities, batch size, image size against the model's
    VAE factor, and condition channels against the adapter."""
    accepts, kind = cfg.adapter.accepts, cfg.condition.kind
    if accepts != kind:
        raise CtrlkitError(
            f"adapter '{cfg.adapter.name}' takes {accepts} conditions but condition '{cfg.condition.name}' gives "
            f"{kind} conditions; pick a condition of kind '{accepts}'"
        )
    for key in ("model.path", "paths.output_dir"):
        if _is_missing(cfg, key):
            raise CtrlkitError(f"{key} is required with model={group_choice(cfg, 'model')}: add {key}=<path>")
    for key in ("condition.extractor.weights_dir", "condition.extractor.model", "data.root", "data.urls"):
        if _is_missing(cfg, key):
            raise CtrlkitError(f"{key} is required: add {key}=<path>")
    for path, node in target_nodes(cfg):
        check_node_against_signature(path, node)
    check_settings("train", cfg)
    check_values(cfg)
    check_strategy_installed(cfg)
    check_launch(cfg)


# trainer strategies that need a package of their own: the class name -> (package, ctrlkit's extra)
STRATEGY_PACKAGES = {"DeepSpeedStrategy": ("deepspeed", "deepspeed")}


# trainer strategies that run on CUDA GPUs only (Lightning refuses DeepSpeed on a CPU only once fit starts)
GPU_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy")


def check_strategy_installed(cfg: DictConfig) -> None:
    """``trainer=deepspeed`` without the deepspeed package: one line naming the extra to install; ``trainer=fsdp`` or
    ``deepspeed`` on a CPU (``trainer.accelerator=cpu``, or ``auto`` without a CUDA GPU): one line too."""
    target = str(OmegaConf.select(cfg, "trainer.strategy._target_", default="") or "")
    name = target.rpartition(".")[2]
    package = STRATEGY_PACKAGES.get(name)
    if package is not None and not module_installed(package[0]):
        raise CtrlkitError(
            f"trainer.strategy {name} needs the {package[0]} package, which is not installed: "
            f"pip install 'ctrlkit[{package[1]}]'"
        )
    if name not in GPU_STRATEGIES:
        return
    accelerator = OmegaConf.select(cfg, "trainer.accelerator", default="auto")
    on_cpus = "on CPUs use trainer=ddp trainer.accelerator=cpu"
    if accelerator == "cpu":
        raise CtrlkitError(f"trainer.strategy {name} runs on CUDA GPUs only, not trainer.accelerator=cpu; {on_cpus}")
    if not _cuda_available():
        raise CtrlkitError(f"trainer.strategy {name} runs on CUDA GPUs only, and torch finds none here; {on_cpus}")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def hydra_node(cfg: DictConfig) -> DictConfig | None:
    """The run's ``hydra`` config: the composed one (tests, ``return_hydra_config``), else the running app's."""
    if isinstance(cfg.get("hydra"), DictConfig):
        return cfg.hydra
    from hydra.core.hydra_config import HydraConfig

    try:
        return HydraConfig.get()
    except ValueError:  # not inside a Hydra app
        return None


def check_launch(cfg: DictConfig) -> None:
    """What a job's launcher and sweeper ask of the trainer and the metric, before any model loads:

    - ``hydra/launcher=submitit_slurm`` starts ``tasks_per_node`` processes on each of ``nodes`` nodes, and Lightning
      takes its ranks from SLURM, so ``trainer.devices`` must be ``tasks_per_node`` and ``trainer.num_nodes`` must be
      ``nodes`` (Lightning would otherwise stop every process with its own error after the job got its nodes).
    - an Optuna search's ``direction`` must fit ``optimized_metric`` (maximize a score, minimize ``depth_rmse``)."""
    hydra_cfg = hydra_node(cfg)
    if hydra_cfg is None:
        return
    from hydra.types import RunMode

    launcher = hydra_cfg.get("launcher") or {}
    # a single run (no -m) runs here whatever the launcher says
    if str(launcher.get("_target_", "")).endswith("SlurmLauncher") and hydra_cfg.get("mode") != RunMode.RUN:
        tasks, nodes = launcher.get("tasks_per_node"), launcher.get("nodes")
        asked = {"trainer.devices": (OmegaConf.select(cfg, "trainer.devices", default=1), tasks, "tasks_per_node")}
        asked["trainer.num_nodes"] = (OmegaConf.select(cfg, "trainer.num_nodes", default=1), nodes, "nodes")
        for key, (value, slurm, name) in asked.items():
            if value != slurm:
                raise CtrlkitError(
                    f"{key}={value} but hydra/launcher=submitit_slurm starts hydra.launcher.{name}={slurm}: Lightning "
                    f"takes one process per SLURM task; set {key}={slurm} (with trainer=ddp)"
                )
    direction = (hydra_cfg.get("sweeper") or {}).get("direction")
    metric = cfg.get("optimized_metric")
    if isinstance(direction, str) and metric is not None:
        from conditions.controllability import metric_of

        kind = metric_of(str(metric))
        wanted = None if kind is None else ("maximize" if kind.higher_is_better else "minimize")
        if wanted is not None and direction != wanted:
            raise CtrlkitError(
                f"optimized_metric={metric} is {'higher' if kind.higher_is_better else 'lower'} when better but "
                f"hydra.sweeper.direction={direction}; set hydra.sweeper.direction={wanted}"
            )


def group_choice(cfg: DictConfig, group: str) -> str:
    """The option the run picked for a config group (``model=sd15`` -> "sd15"): Hydra's record of the choice,
    else the group's ``name`` key, else its target's name."""
    from hydra.core.hydra_config import HydraConfig

    try:
        choice = HydraConfig.get().runtime.choices.get(group)
    except ValueError:  # composed outside a Hydra run
        choice = None
    node = cfg.get(group)
    if choice is None and isinstance(node, DictConfig):
        choice = node.get("name") or str(node.get("_target_", "?")).rpartition(".")[2]
    return str(choice or "?")


def _is_missing(cfg: DictConfig, dotted_key: str) -> bool:
    """True when ``dotted_key`` exists and is the mandatory-value marker ``???``."""
    parent_key, _, leaf = dotted_key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key, throw_on_missing=False) if parent_key else cfg
    # `leaf in parent` is False for a ??? value, so look at the keys themselves.
    return isinstance(parent, DictConfig) and leaf in parent.keys() and OmegaConf.is_missing(parent, leaf)


# what names a config group's option, to tell whether `group=<option>` picks the run's own
_GROUP_IDENTITY = {"model": "_target_", "adapter": "name", "condition": "name"}


def overlay_command_line(cfg: DictConfig, run: DictConfig, groups: tuple[str, ...]) -> DictConfig:
    """A trained run's config (``run``) with this command's overrides of ``groups`` on top, for the commands that
    take model, adapter and condition from the run (``ctrlkit evaluate``'s ``from_run``).

    A key (``model.path=/data/sd15``: the run moved machines; ``condition.extractor.low_threshold=50``) takes the
    command line's value. A group option (``condition=depth`` for a canny run) must be the run's own: its adapter
    was trained on that option, and the option is otherwise dropped without a word, so another stops with one line.
    """
    hydra_cfg = hydra_node(cfg)
    overrides = list(hydra_cfg.overrides.task) if hydra_cfg is not None else []
    run = run.copy()
    for override in overrides:
        prefix, key, _ = re.match(r"([+~]*)([\w.]*)(.*)", override).groups()
        group = key.split(".")[0]
        if group not in groups:
            continue
        if key == group:
            identity = _GROUP_IDENTITY[group]
            given, trained = OmegaConf.select(cfg, f"{group}.{identity}"), OmegaConf.select(run, f"{group}.{identity}")
            if given != trained:
                raise CtrlkitError(
                    f"{override}: this run was trained with {group} '{trained}' (its config.yaml), which evaluation "
                    f"follows (from_run=true); drop {override}, or add from_run=false to use it"
                )
        elif "~" in prefix:
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(run, parent)
            if isinstance(node, DictConfig) and leaf in node:
                del node[leaf]
        else:
            OmegaConf.update(run, key, OmegaConf.select(cfg, key), force_add=True)
    return run
