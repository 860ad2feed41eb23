"""Every config group option composes; bad choices fail before anything loads, naming the problem."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from lightning_modules.commands.config_checks import CONF_DIR, check_group_overrides, check_train_config, group_options
from lightning_modules.errors import CtrlkitError

GROUPS = [
    "model",
    "adapter",
    "condition",
    "data",
    "system",
    "optimizer",
    "lr_scheduler",
    "trainer",
    "logger",
    "callbacks",
    "paths",
    "experiment",
    "debug",
]
# options that need a value the config cannot know; {name} is filled with the session fixture of that name
REQUIRED = {
    "model=sd15": ["model.path=/some/pipeline"],
    "model=sd2": ["model.path=/some/pipeline"],
    "model=sdxl": ["model.path=/some/pipeline"],
    "condition=hed": ["condition.extractor.weights_dir={hed_weights_dir}"],
    "condition=pose": ["condition.extractor.weights_dir={openpose_weights_dir}"],
    "condition=depth": ["condition.extractor.model={dpt_dir}"],
    "condition=seg": ["condition.extractor.model={segformer_dir}"],
    "data=fill50k": ["data.root={fill50k_root}"],
    "data=imagefolder": ["data.root={imagefolder_root}"],
    "data=webdataset": ["data.urls={webdataset_shards}"],
    # a grounding adapter and a grounding condition only come in pairs
    "adapter=gligen": ["condition=boxes"],
    "adapter=gligen_masked": ["condition=boxes"],
    "adapter=layout_controlnet": ["condition=boxes"],
    "condition=boxes": ["adapter=gligen"],
    "condition=detected_boxes": ["condition.extractor.model={owlvit_dir}", "condition.extractor.phrases=[a cat]"],
}
# conditions no training adapter takes yet: they serve `ctrlkit extract` (tests/conditions/test_detected_boxes.py)
EXTRACT_ONLY = {"condition=detected_boxes": "grounding"}
# strategies for CUDA GPUs (a Trainer on a CPU refuses FSDP; deepspeed is an extra): they compose here and
# tests/lightning_modules/test_strategies.py builds them
GPU_STRATEGIES = {"trainer=fsdp", "trainer=deepspeed"}


def required_values(override: str, request) -> list[str]:
    values = []
    for value in REQUIRED.get(override, []):
        names = [name for _, name, _, _ in string.Formatter().parse(value) if name]
        values.append(value.format(**{name: request.getfixturevalue(name) for name in names}))
    return values


def all_options():
    return [f"{group}={option}" for group in GROUPS for option in group_options(group)]


def test_every_group_has_options():
    for group in GROUPS:
        assert group_options(group), f"conf/{group}/ has no yaml"


@pytest.mark.parametrize("override", all_options())
def test_every_option_composes_and_its_light_parts_instantiate(make_train_config, override, request):
    cfg = make_train_config(override, *required_values(override, request))
    if override in GPU_STRATEGIES:
        assert cfg.trainer.strategy._target_.startswith("pytorch_lightning.strategies.")
        return
    if override in EXTRACT_ONLY:
        kind = EXTRACT_ONLY[override]
        with pytest.raises(CtrlkitError, match=rf"takes image conditions but condition '\w+' gives {kind} conditions"):
            check_train_config(cfg)
        assert instantiate(cfg.condition.extractor).kind == kind
        return
    check_train_config(cfg)
    extractor = instantiate(cfg.condition.extractor)
    datamodule = instantiate(cfg.data, extractor=extractor)
    condition = datamodule.fixed_batch(1)["condition"]
    if cfg.condition.kind == "image":
        assert condition.shape[1] == cfg.condition.channels
    else:
        assert condition.boxes.shape == (1, cfg.adapter.build.max_objects, 4)
        assert len(condition.phrases[0]) == cfg.adapter.build.max_objects
    with open_dict(cfg):
        cfg.trainer.accelerator = "cpu"
    assert instantiate(cfg.trainer).max_steps == cfg.trainer.max_steps or cfg.trainer.get("fast_dev_run")
    for callback in (cfg.callbacks or {}).values():
        instantiate(callback)
    # the optimizer and schedule partials take what the training system hands them
    parameter = torch.nn.Parameter(torch.zeros(2))
    if cfg.optimizer._target_.endswith("adamw8bit"):  # CUDA + bitsandbytes only: elsewhere a one-line error
        with pytest.raises(CtrlkitError, match=r"optimizer=adamw8bit (needs bitsandbytes|keeps 8-bit states)"):
            instantiate(cfg.optimizer)([{"params": [parameter], "lr": 1e-3}])
        return
    optimizer = instantiate(cfg.optimizer)([{"params": [parameter], "lr": 1e-3}])
    assert optimizer.param_groups[0]["lr"] == 1e-3
    lr_scheduler = instantiate(cfg.lr_scheduler)
    assert lr_scheduler["interval"] == "step" and lr_scheduler["scheduler"](optimizer).get_last_lr()


def test_unknown_option_names_the_group_and_the_choices():
    with pytest.raises(CtrlkitError, match=r"unknown adapter 'contrlnet'; choose one of: control_lora, controlnet"):
        check_group_overrides(["adapter=contrlnet"])
    choices = "sd15, sd15_random, sd2, sdxl, tiny, tiny_random"
    with pytest.raises(CtrlkitError, match=rf"unknown model 'sd99'; choose one of: {choices}"):
        check_group_overrides(["trainer.max_steps=3", "model=sd99"])
    with pytest.raises(CtrlkitError, match=r"unknown condition 'depht'"):
        check_group_overrides(["condition=canny,depht"])  # sweeps are checked per value
    check_group_overrides(["adapter=controlnet", "experiment=null", "adapter.learning_rate=1e-5", "+foo=bar"])


@pytest.mark.parametrize(
    ("adapter", "condition", "accepts", "gives"),
    [
        ("controlnet", "boxes", "image", "grounding"),
        ("t2i_adapter", "boxes", "image", "grounding"),
        ("t2i_adapter_light", "boxes", "image", "grounding"),
        ("gligen", "canny", "grounding", "image"),
        ("gligen", "shapes_mask", "grounding", "image"),
    ],
)
def test_incompatible_adapter_and_condition_fail_naming_both(make_train_config, adapter, condition, accepts, gives):
    cfg = make_train_config(f"adapter={adapter}", f"condition={condition}")
    with pytest.raises(
        CtrlkitError,
        match=rf"adapter '{adapter}' takes {accepts} conditions but condition '{condition}' gives {gives} conditions",
    ):
        check_train_config(cfg)


def test_missing_model_path_is_named(make_train_config):
    cfg = make_train_config("model=sd15")
    with pytest.raises(CtrlkitError, match=r"model.path is required"):
        check_train_config(cfg)


def test_missing_extractor_weights_dir_is_named(make_train_config):
    cfg = make_train_config("condition=hed")
    with pytest.raises(CtrlkitError, match=r"condition.extractor.weights_dir is required"):
        check_train_config(cfg)


def test_conf_dir_is_this_repository(make_train_config):
    """The commands compose this checkout's configs, not those of another copy of ctrlkit on the path: CONF_DIR is
    the conf/ beside these tests, and a composed config holds what its yaml files here say."""
    here = Path(__file__).resolve().parents[3] / "conf"
    assert CONF_DIR.resolve() == here
    cfg = make_train_config()
    for group, option in (("system", "default"), ("optimizer", "adamw"), ("lr_scheduler", "constant")):
        written = OmegaConf.to_container(OmegaConf.load(here / group / f"{option}.yaml"), resolve=False)
        composed = OmegaConf.to_container(cfg[group], resolve=False)
        if group == "system":  # the test settings turn the shared disk cache off (FAST_OVERRIDES)
            assert composed.pop("cache_dir") is None and written.pop("cache_dir") == "${paths.log_dir}/feature_cache"
        assert composed == written, group


@pytest.mark.parametrize(
    ("model", "learning_rate", "timestep_sampling"),
    [("tiny", 1e-3, "cubic"), ("tiny_random", 1e-3, "cubic"), ("sd15", 1e-5, "uniform"), ("sd2", 1e-5, "uniform")],
)
def test_the_base_model_recipe_sets_adapter_rate_and_timesteps(
    make_train_config, model, learning_rate, timestep_sampling
):
    cfg = make_train_config(f"model={model}")
    assert cfg.adapter.learning_rate == cfg.system.learning_rate == learning_rate
    assert cfg.system.timestep_sampling == timestep_sampling
    # a direct override still wins over the recipe
    cfg = make_train_config(f"model={model}", "adapter.learning_rate=3e-4", "system.timestep_sampling=uniform")
    assert cfg.system.learning_rate == 3e-4 and cfg.system.timestep_sampling == "uniform"


# ------------------------------------------------------------------ optimizer and lr_scheduler groups


def build_system(cfg, backbone, **build):
    adapter = instantiate(cfg.adapter.build, _convert_="all", **build)(backbone.unet, vae_scale_factor=4)
    return instantiate(cfg.system, backbone=backbone, adapter=adapter, _convert_="all")


def test_the_default_optimizer_and_schedule_are_the_recipe_of_before(make_train_config, tiny_backbone):
    """optimizer=adamw lr_scheduler=constant: AdamW(betas 0.9/0.999, eps 1e-8, weight decay 0.01) at the adapter's
    learning rate, constant, stepped per optimizer step -- what configure_optimizers hard-coded before."""
    system = build_system(make_train_config(), tiny_backbone)
    configured = system.configure_optimizers()
    optimizer, lr_scheduler = configured["optimizer"], configured["lr_scheduler"]
    before = torch.optim.AdamW(system.adapter.param_groups(1e-3), weight_decay=0.01, betas=(0.9, 0.999))
    assert type(optimizer) is torch.optim.AdamW
    settings = [{k: v for k, v in g.items() if k not in ("params", "initial_lr")} for g in optimizer.param_groups]
    assert settings == [{k: v for k, v in g.items() if k != "params"} for g in before.param_groups]
    assert lr_scheduler["interval"] == "step" and lr_scheduler["frequency"] == 1
    for _ in range(5):
        optimizer.step()
        lr_scheduler["scheduler"].step()
        assert lr_scheduler["scheduler"].get_last_lr() == [1e-3]
    assert "optimizer" not in system.hparams  # a partial would not load with weights_only=True


def test_param_groups_keep_their_own_rates_under_any_optimizer(make_train_config, tiny_backbone):
    cfg = make_train_config("optimizer=sgd", "lr_scheduler=cosine_warmup", "adapter.learning_rate=1e-4")
    system = build_system(cfg, tiny_backbone, unlock_unet_decoder=True, decoder_learning_rate=2e-6)
    configured = system.configure_optimizers()
    assert type(configured["optimizer"]) is torch.optim.SGD
    assert [group["initial_lr"] for group in configured["optimizer"].param_groups] == [1e-4, 2e-6]
    assert configured["lr_scheduler"]["scheduler"].get_last_lr() == [0.0, 0.0]  # warm-up from 0


def test_constant_with_warmup_rises_linearly_then_holds(make_train_config, tiny_backbone):
    cfg = make_train_config("lr_scheduler=constant_with_warmup", "lr_scheduler.scheduler.num_warmup_steps=4")
    configured = build_system(cfg, tiny_backbone).configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(6):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("+optimizer.lr=1e-2", r"optimizer.lr is not used: .* set adapter.learning_rate"),
        ("+optimizer.params=[]", r"optimizer.params is given by ctrlkit when it calls optimizer"),
        ("+lr_scheduler.scheduler.optimizer=x", r"lr_scheduler.scheduler.optimizer is given by ctrlkit"),
        ("+optimizer.weight_decy=0", r"unknown key 'optimizer.weight_decy'; optimizer takes: .*weight_decay"),
        ("optimizer.weight_decay=-1", r"optimizer.weight_decay=-1 is out of range; allowed: a finite number >= 0"),
        ("optimizer.betas=fast", r"optimizer.betas='fast' has the wrong type; allowed: list"),
        ("lr_scheduler.scheduler.num_warmup_steps=-2", r"num_warmup_steps=-2 must be >= 0"),
    ],
)
def test_bad_optimizer_and_schedule_settings_are_named(make_train_config, override, message):
    with pytest.raises(CtrlkitError, match=message):
        check_train_config(make_train_config(override))


def test_moved_system_keys_name_their_new_place():
    from lightning_modules.commands.config_checks import check_override_keys

    with pytest.raises(CtrlkitError, match=r"system.weight_decay is now optimizer.weight_decay"):
        check_override_keys("train", ["system.weight_decay=0.1"])
