"""Hydra launchers and the Optuna search as config (lightning-hydra-template's tests/test_sweeps.py, for ctrlkit):
the launcher options compose to their plugins, the search maximises the condition's own score and a training job
returns it, the best trial is reported, and a missing plugin is one line naming the extra. The sweeps themselves
run from the command line in the slow tests."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra.utils import get_class, get_object
from omegaconf import OmegaConf

from conditions.controllability import METRICS, primary_metric
from lightning_modules.commands.config_checks import (
    CONF_DIR,
    check_group_overrides,
    check_launch,
    check_sweep_launch,
    first_job_overrides,
    group_options,
)
from lightning_modules.errors import CtrlkitError
from lightning_modules.sweeps import TRIAL_SCORE_FILE, best_trial_report, optimized_value
from tests.conftest import FAST_OVERRIDES
from tests.lightning_modules.commands.test_cli import run_ctrlkit

PLUGIN = "hydra_plugins.hydra_{}.{}"
LAUNCHERS = {
    "joblib": PLUGIN.format("joblib_launcher", "joblib_launcher.JoblibLauncher"),
    "submitit_local": PLUGIN.format("submitit_launcher", "submitit_launcher.LocalLauncher"),
    "submitit_slurm": PLUGIN.format("submitit_launcher", "submitit_launcher.SlurmLauncher"),
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_each_launcher_composes_to_its_plugin(make_train_config, launcher):
    cfg = make_train_config(f"hydra/launcher={launcher}")
    assert cfg.hydra.launcher._target_ == LAUNCHERS[launcher]
    assert get_class(LAUNCHERS[launcher])  # the plugin is installed (the `launchers` extra, in `dev`)
    if launcher == "joblib":
        assert cfg.hydra.launcher.n_jobs == 2
    else:
        assert cfg.hydra.launcher.submitit_folder == f"{cfg.hydra.sweep.dir}/.submitit/%j"
    if launcher == "submitit_slurm":  # one task (process) per GPU
        assert cfg.hydra.launcher.tasks_per_node == cfg.hydra.launcher.gpus_per_node == 8


def test_launcher_options_are_ours_and_hydras():
    assert group_options("hydra/launcher") == sorted(LAUNCHERS)
    check_group_overrides(["hydra/launcher=basic", "hydra/launcher=joblib", "hydra/sweeper=optuna"])
    with pytest.raises(CtrlkitError, match=r"unknown hydra/launcher 'jobib'; choose one of: basic, joblib, submitit"):
        check_group_overrides(["hydra/launcher=jobib"])


@pytest.mark.parametrize(
    ("override", "plugin"),
    [
        ("hydra/launcher=joblib", "hydra_joblib_launcher"),
        ("hydra/launcher=submitit_slurm", "hydra_submitit_launcher"),
        ("hparams_search=optuna", "hydra_optuna_sweeper"),
    ],
)
def test_a_missing_plugin_is_one_line_naming_the_extra(override, plugin, monkeypatch):
    monkeypatch.setitem(sys.modules, f"hydra_plugins.{plugin}", None)  # as if it were not installed
    distribution = plugin.replace("_", "-")
    with pytest.raises(CtrlkitError, match=rf"^{override} needs the Hydra plugin {distribution}, which is not "):
        check_group_overrides(["-m", override, "trainer.max_steps=20"])


def test_a_missing_plugin_from_the_command_line(tmp_path):
    """What the user sees: one line and exit code 2, before Hydra composes anything."""
    code = (
        "import sys; sys.modules['hydra_plugins.hydra_joblib_launcher'] = None\n"
        "from lightning_modules.commands.cli import main\n"
        "sys.exit(main(['train', '-m', 'hydra/launcher=joblib', 'adapter.learning_rate=1e-3,3e-4']))"
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip() == (
        "ctrlkit train: error: hydra/launcher=joblib needs the Hydra plugin hydra-joblib-launcher, which is not "
        "installed: pip install 'ctrlkit[launchers]'"
    )
    assert not (tmp_path / "outputs").exists()


# ------------------------------------------------------------------ the Optuna search


@pytest.mark.parametrize(
    ("overrides", "metric"),
    [
        ([], "val/canny_f1"),
        (["condition=shapes_mask"], "val/mask_iou"),
        (["adapter=gligen", "condition=boxes"], "val/box_iou"),
    ],
)
def test_the_search_maximises_the_conditions_own_score(make_train_config, overrides, metric):
    cfg = make_train_config("hparams_search=optuna", *overrides)
    assert cfg.optimized_metric == metric
    sweeper = cfg.hydra.sweeper
    assert get_class(sweeper._target_).__name__ == "OptunaSweeper"
    assert sweeper.direction == "maximize" and sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert sweeper.sampler.seed == cfg.seed and sweeper.n_trials == 20
    assert sweeper.params["adapter.learning_rate"] == "tag(log, interval(1e-4, 3e-3))"
    assert get_object(cfg.hydra.callbacks.report_best_trial._target_)
    check_launch(cfg)


def test_every_condition_names_its_own_score():
    """`metric` in conf/condition/*.yaml is a known score, and the one its re-extraction scorer calls primary."""
    for name in group_options("condition"):
        condition = OmegaConf.load(CONF_DIR / "condition" / f"{name}.yaml")
        assert condition.metric in METRICS, name
        extractor = SimpleNamespace(
            name=get_class(condition.extractor._target_).name, target=condition.extractor.get("target")
        )
        if "parts" in condition.extractor:  # a multi condition: its score is its first part's
            parts = condition.extractor.parts
            first = SimpleNamespace(name=get_class(parts[next(iter(parts))]._target_).name, target=None)
            extractor = SimpleNamespace(name=extractor.name, parts={"first": first}, use=["first"])
        assert primary_metric(extractor) in (None, condition.metric), name


def test_a_lower_is_better_score_needs_minimize(make_train_config):
    cfg = make_train_config("hparams_search=optuna", "condition=shapes_depth")
    assert cfg.optimized_metric == "val/depth_rmse"
    with pytest.raises(CtrlkitError, match=r"val/depth_rmse is lower when better .* set hydra.sweeper.direction=min"):
        check_launch(cfg)
    search = ["hparams_search=optuna", "condition=shapes_depth"]
    check_launch(make_train_config(*search, "hydra.sweeper.direction=minimize"))


def test_the_slurm_launcher_and_the_trainer_must_agree(make_train_config):
    ddp = ["hydra/launcher=submitit_slurm", "trainer=ddp"]
    with pytest.raises(CtrlkitError, match=r"trainer.devices=2 but .*hydra.launcher.tasks_per_node=8: .* set trainer"):
        check_launch(make_train_config(*ddp))
    with pytest.raises(CtrlkitError, match=r"trainer.num_nodes=1 but .*hydra.launcher.nodes=4"):
        check_launch(make_train_config(*ddp, "trainer.devices=8", "hydra.launcher.nodes=4"))
    check_launch(make_train_config(*ddp, "trainer.devices=4", "trainer.num_nodes=2", "hydra.launcher.gpus_per_node=4",
                                   "hydra.launcher.nodes=2"))  # fmt: skip
    check_launch(make_train_config(*ddp, "hydra.mode=RUN"))  # without -m the job runs here, whatever the launcher


def test_a_sweep_is_checked_before_it_launches():
    """``ctrlkit train -m ...`` checks its first job's launcher and trainer before submitting anything."""
    assert first_job_overrides(["-m", "adapter.learning_rate=1e-3,3e-4", "+a=range(2,4)", "b=interval(0,1)"]) == [
        "adapter.learning_rate=0.001",
        "+a=2",
    ]
    assert first_job_overrides(["-m", "--cfg", "job"]) is None
    with pytest.raises(CtrlkitError, match=r"trainer.devices=2 but hydra/launcher=submitit_slurm starts"):
        check_sweep_launch("train", ["-m", "hydra/launcher=submitit_slurm", "trainer=ddp", "seed=0,1"])
    with pytest.raises(CtrlkitError, match=r"hydra.sweeper.direction=minimize"):
        check_sweep_launch("train", ["-m", "hparams_search=optuna", "condition=shapes_depth"])
    check_sweep_launch("train", ["-m", "hparams_search=optuna", "condition=canny,shapes_mask"])


def test_train_main_returns_the_searched_score(make_train_config):
    """The Hydra main returns what the sweeper optimises: the condition's score at the end of the run."""
    from lightning_modules.commands.cli import train_main

    cfg = make_train_config("hparams_search=optuna", "trainer.max_steps=2")
    value = train_main(cfg)  # hydra.main passes a given config straight to the function
    scores = __import__("json").loads((Path(cfg.paths.output_dir) / "controllability.json").read_text())
    assert isinstance(value, float) and value == pytest.approx(scores["final"]["canny_f1"])


def test_a_metric_the_run_did_not_log_is_one_line_naming_it():
    cfg = OmegaConf.create({"optimized_metric": "val/canny_f"})
    with pytest.raises(CtrlkitError) as raised:
        optimized_value(cfg, {"train/loss": 0.3, "val/canny_f1": 0.2})
    assert str(raised.value) == (
        "optimized_metric=val/canny_f was not logged by this run, so the sweeper gets no score; it logged: "
        "train/loss, val/canny_f1"
    )
    assert optimized_value(OmegaConf.create({"optimized_metric": None}), {"val/loss": 0.5}) == 0.5


def test_the_best_trial_is_reported_with_its_run(tmp_path):
    for number, (rate, score) in enumerate([(1e-3, 0.25), (3e-4, 0.5), (2e-3, None)]):
        job = tmp_path / str(number)
        (job / ".hydra").mkdir(parents=True)
        overrides = [f"adapter.learning_rate={rate}", "trainer.max_steps=20"]
        (job / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(overrides)))
        if score is not None:
            (job / TRIAL_SCORE_FILE).write_text(f"metric: val/canny_f1\nvalue: {score}\n")
    results = {"name": "optuna", "best_params": {"adapter.learning_rate": 3e-4}, "best_value": 0.5}
    (tmp_path / "optimization_results.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(results)))
    lines = best_trial_report(tmp_path, "val/canny_f1", "maximize", ["adapter.learning_rate"]).splitlines()
    assert lines[:3] == [
        "  trial 0: val/canny_f1=0.2500  adapter.learning_rate=0.001",
        "  trial 1: val/canny_f1=0.5000  adapter.learning_rate=0.0003",
        "  trial 2: val/canny_f1=failed or no score  adapter.learning_rate=0.002",
    ]
    assert lines[3] == (
        "ctrlkit train: best trial: trial 1 of 3: val/canny_f1=0.5000 (maximize) with adapter.learning_rate=0.0003; "
        f"its run: {tmp_path / '1'}; results: {tmp_path / 'optimization_results.yaml'}"
    )


def test_sweep_jobs_share_a_wandb_group_and_a_single_run_has_none(make_train_config, tmp_path):
    from lightning_modules.loggers import build_wandb_logger

    def group(*overrides: str) -> str | None:
        make_train_config(*overrides)  # sets Hydra's runtime config, as a job has it
        return build_wandb_logger("ctrlkit", str(tmp_path / "run"), mode="offline", group="auto")._wandb_init.get(
            "group"
        )

    assert group() is None
    sweep_group = group("hydra.mode=MULTIRUN", "hydra.sweep.dir=outputs/train/multiruns/2026-01-31_12-00-00")
    assert sweep_group == "train-2026-01-31_12-00-00"


# ------------------------------------------------------------------ the sweeps from the command line (slow)

FAST = [override for override in FAST_OVERRIDES if override != "trainer=cpu"]


def job_times(job: Path) -> tuple[datetime, datetime]:
    """First and last timestamp of a job's log (``[2026-01-31 12:00:00,123][...]``)."""
    stamps = [line[1:24] for line in (job / "train.log").read_text().splitlines() if line.startswith("[20")]
    return tuple(datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f") for stamp in (stamps[0], stamps[-1]))


@pytest.mark.slow
def test_joblib_runs_the_jobs_at_the_same_time(tmp_path):
    result = run_ctrlkit(
        "train", "-m", "hydra/launcher=joblib", "adapter.learning_rate=1e-3,3e-4", "trainer.max_steps=2", *FAST,
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Logging error" not in result.stderr and "validated against ConfigStore schema" not in result.stderr
    (sweep,) = (tmp_path / "outputs" / "train" / "multiruns").iterdir()
    (start0, end0), (start1, end1) = job_times(sweep / "0"), job_times(sweep / "1")
    assert start1 < end0 and start0 < end1  # the two jobs overlap
    assert all((sweep / job / "adapter" / "config.json").is_file() for job in "01")


@pytest.mark.slow
def test_submitit_local_runs_a_job_in_a_subprocess(tmp_path):
    result = run_ctrlkit("train", "-m", "hydra/launcher=submitit_local", "trainer.max_steps=2", *FAST, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "train" / "multiruns").iterdir()
    assert (sweep / "0" / "adapter" / "config.json").is_file()
    # submitit's own record of the subprocess (beside the literal `%j` folder the plugin's pattern leaves)
    (job_folder,) = (folder for folder in (sweep / ".submitit").iterdir() if folder.name.isdigit())
    (out,) = job_folder.glob("*_log.out")
    assert "ctrlkit train: 2 steps in" in out.read_text()


@pytest.mark.slow
def test_the_optuna_search_prints_its_best_trial(tmp_path):
    result = run_ctrlkit(
        "train", "-m", "hparams_search=optuna", "hydra.sweeper.n_trials=2", "trainer.max_steps=2", *FAST,
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    best = [line for line in result.stdout.splitlines() if line.startswith("ctrlkit train: best trial:")]
    assert len(best) == 1 and "val/canny_f1=" in best[0] and "(maximize)" in best[0], result.stdout[-3000:]
    assert "setup plugin alembic" not in result.stdout  # optuna's database layer kept quiet
    (sweep,) = (tmp_path / "outputs" / "train" / "multiruns").iterdir()
    assert (sweep / "optimization_results.yaml").is_file()
