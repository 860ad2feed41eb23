"""``init_adapter=``: a run that starts from saved adapter weights (a shipped adapter, a released ControlNet, an
earlier export) instead of the zero-initialized build, and the one-line refusals when they do not fit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adapters.registry import load_adapter
from lightning_modules.backbone import load_tiny_backbone
from lightning_modules.callbacks.model_card import read_card
from lightning_modules.commands.train import build_system, initialize_adapter, train
from lightning_modules.errors import CtrlkitError
from lightning_modules.shipped_adapters import SHIPPED_TINY_ADAPTERS

CANNY = SHIPPED_TINY_ADAPTERS / "controlnet_canny"


def built_and_initialized(cfg):
    backbone, _, adapter, _ = build_system(cfg)
    initialize_adapter(cfg, adapter, backbone, resuming=False)
    return backbone, adapter


def assert_same_tensors(found: dict, expected: dict) -> None:
    assert found.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(found[name], tensor), name


def test_a_run_starts_from_the_shipped_weights(make_train_config):
    cfg = make_train_config("init_adapter=tiny/controlnet_canny", "trainer.max_steps=1")
    _, objects = train(cfg)
    shipped = load_file(CANNY / "diffusion_pytorch_model.safetensors")
    exported = load_file(Path(cfg.paths.output_dir) / "adapter" / "diffusion_pytorch_model.safetensors")
    assert exported.keys() == shipped.keys() and objects["trainer"].global_step == 1
    # one AdamW step moves each weight by at most about the learning rate (Adam's first step is lr * sign)
    learning_rate = cfg.adapter.learning_rate
    moved = max(float((exported[name] - shipped[name]).abs().max()) for name in shipped)
    assert 0 < moved <= 1.1 * learning_rate
    assert shipped["controlnet_mid_block.weight"].abs().sum() > 0  # not the zero-initialized build's
    # its card names the weights it started from and counts their steps (the shipped card's 1000) with its own
    run = Path(cfg.paths.output_dir)
    for session in ("first", "resumed"):
        front, body = read_card(run / "adapter")
        facts = front["ctrlkit"]
        assert (facts["step"], facts["init_adapter"], facts["total_steps"]) == (1, "tiny/controlnet_canny", 1001)
        assert "from the weights of `tiny/controlnet_canny` (1000 steps before these: 1001 in all)" in body
        assert "| started from | `tiny/controlnet_canny` (1000 steps) |" in body
        if session == "first":  # killed before its card; resumed without init_adapter=: the checkpoint remembers
            (run / "adapter" / "README.md").unlink()
            train(make_train_config("trainer.max_steps=1", f"resume={run}"))


def test_an_unlocked_decoder_the_saved_controlnet_did_not_train_starts_from_the_base(make_train_config):
    cfg = make_train_config("init_adapter=tiny/controlnet_canny", "adapter.build.unlock_unet_decoder=true")
    backbone, adapter = built_and_initialized(cfg)
    assert_same_tensors(adapter.controlnet.state_dict(), load_file(CANNY / "diffusion_pytorch_model.safetensors"))
    assert adapter.unet_decoder.conv_out.weight is backbone.unet.conv_out.weight


def test_gligen_starts_from_saved_gated_layers_without_adding_them_twice(make_train_config):
    cfg = make_train_config("experiment=gligen_masked_boxes_shapes", "init_adapter=tiny/gligen_masked_boxes")
    backbone, adapter = built_and_initialized(cfg)
    # read into a fresh base UNet of its own: the GLIGEN load adds its gated layers to the UNet it is given
    reference, _ = load_adapter(SHIPPED_TINY_ADAPTERS / "gligen_masked_boxes", load_tiny_backbone().unet)
    assert_same_tensors(adapter.state_dict(), reference.state_dict())
    fresh_backbone, _, _, _ = build_system(cfg)  # the same config without the init: as many UNet tensors
    assert len(backbone.unet.state_dict()) == len(fresh_backbone.unet.state_dict())


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["adapter=t2i_adapter"], "holds a ControlNet (controlnet); this run builds a T2I-Adapter"),
        (["adapter=controlnet_multi", "condition=multi"], "holds a ControlNet (controlnet); this run builds a multi"),
        (["condition=multi"], "of other shapes: controlnet.controlnet_cond_embedding.conv_in.weight"),
        (["ckpt_path=/nowhere/last.ckpt"], "not both"),
    ],
    ids=["other-family", "multi-from-plain", "other-channels", "with-ckpt_path"],
)
def test_weights_that_do_not_fit_are_refused_in_one_line(make_train_config, overrides, named):
    cfg = make_train_config("init_adapter=tiny/controlnet_canny", *overrides)
    backbone, _, adapter, _ = build_system(cfg)
    with pytest.raises(CtrlkitError, match="init_adapter") as error:
        initialize_adapter(cfg, adapter, backbone, resuming=False)
    assert named in str(error.value) and "\n" not in str(error.value)


def test_a_resumed_run_takes_its_weights_from_the_checkpoint(make_train_config):
    cfg = make_train_config("init_adapter=tiny/controlnet_canny")
    backbone, _, adapter, _ = build_system(cfg)
    initialize_adapter(cfg, adapter, backbone, resuming=True)
    assert adapter.controlnet.controlnet_mid_block.weight.abs().sum() == 0  # still the zero-initialized build


def test_a_saved_decoder_needs_a_run_that_unlocks_it(make_train_config, tmp_path):
    """A ControlNet saved with a trained UNet decoder into a run that keeps the decoder frozen would be trained and
    exported without it: refused, naming the decoder's tensors, before the saved decoder reaches the base UNet."""
    backbone, _, unlocked, _ = build_system(make_train_config("adapter.build.unlock_unet_decoder=true"))
    with torch.no_grad():
        unlocked.unet_decoder.conv_out.weight.add_(1.0)  # a decoder that trained away from the base
    unlocked.save_pretrained(tmp_path / "with_decoder")
    cfg = make_train_config(f"init_adapter={tmp_path / 'with_decoder'}")
    backbone, _, adapter, _ = build_system(cfg)
    base = {name: tensor.clone() for name, tensor in backbone.unet.state_dict().items()}
    with pytest.raises(CtrlkitError, match=r"saved but not built: unet_decoder\.") as error:
        initialize_adapter(cfg, adapter, backbone, resuming=False)
    assert "\n" not in str(error.value)
    assert_same_tensors(backbone.unet.state_dict(), base)


@pytest.mark.parametrize(
    ("path", "named"),
    [("/nowhere/adapter", "/nowhere/adapter not found"), ("tiny/controlnet_cany", "shipped for model=tiny")],
)
def test_a_wrong_path_fails_before_the_models_load(make_train_config, monkeypatch, path, named):
    monkeypatch.setattr("lightning_modules.commands.train.build_system", lambda cfg: pytest.fail("models loaded"))
    with pytest.raises(CtrlkitError, match=f"^init_adapter={path}: ") as error:
        train(make_train_config(f"init_adapter={path}"))
    assert named in str(error.value) and "\n" not in str(error.value)


def test_a_corrupt_weights_file_is_named_in_one_line(make_train_config, tmp_path):
    """A truncated download or a half-written export: the run stops naming the file, not with a safetensors trace."""
    import shutil

    corrupt = tmp_path / "corrupt"
    shutil.copytree(CANNY, corrupt)
    weights = corrupt / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    cfg = make_train_config(f"init_adapter={corrupt}")
    backbone, _, adapter, _ = build_system(cfg)
    with pytest.raises(CtrlkitError, match="init_adapter") as error:
        initialize_adapter(cfg, adapter, backbone, resuming=False)
    assert "diffusion_pytorch_model.safetensors" in str(error.value) and "\n" not in str(error.value)


def test_the_second_stage_experiment_starts_from_the_first_or_names_it(make_train_config, monkeypatch):
    """experiment=controlnet_multi_scenes continues the first stage's adapter from where its documented command
    writes it; without it the run stops at once naming the path, not a run from zero-initialized weights."""
    cfg = make_train_config("experiment=controlnet_multi_scenes")
    assert cfg.init_adapter == f"{cfg.paths.log_dir}/multi_stage1/adapter"
    assert list(cfg.adapter.build.single_weights) == [4, 1, 1] and list(cfg.data.num_objects) == [1, 3]
    monkeypatch.setattr("lightning_modules.commands.train.build_system", lambda cfg: pytest.fail("models loaded"))
    with pytest.raises(CtrlkitError, match=r"^init_adapter=\S+/multi_stage1/adapter: adapter \S+ not found") as error:
        train(cfg)
    assert "\n" not in str(error.value)
