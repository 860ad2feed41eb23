"""Training through Hydra compose: fast_dev_run, what a run leaves behind, local pipelines, checkpoints, W&B."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import ControlNetModel
from PIL import Image

from lightning_modules.backbone import build_tiny_backbone, load_pretrained_backbone
from lightning_modules.commands.train import check_checkpoint, train
from lightning_modules.errors import CtrlkitError
from lightning_modules.loggers import wandb_api_key_configured
from tests.helpers.wandb_records import read_history


def test_fast_dev_run_trains_the_adapter(make_train_config):
    metrics, objects = train(make_train_config("debug=fdr"))
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    # one optimizer step moves the zero convolutions off zero (ControlNet FAQ: dL/dW = x != 0)
    assert objects["adapter"].controlnet.controlnet_mid_block.weight.abs().sum() > 0
    assert not any(p.requires_grad for n, p in objects["backbone"].named_parameters())


def test_short_run_leaves_checkpoint_adapter_and_grid(make_train_config, tmp_path):
    cfg = make_train_config("trainer.max_steps=3", "callbacks.model_checkpoint.every_n_train_steps=2")
    _, objects = train(cfg)
    run = Path(cfg.paths.output_dir)
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 3 and checkpoint["optimizer_states"]
    assert checkpoint["state_dict"] and all(name.startswith("adapter.") for name in checkpoint["state_dict"])
    assert (run / "checkpoints" / "step_000002.ckpt").is_file()
    exported = ControlNetModel.from_pretrained(run / "adapter")
    modes = {path.name: path.stat().st_mode & 0o777 for path in (run / "adapter").iterdir()}
    assert modes["diffusion_pytorch_model.safetensors"] == modes["config.json"]  # safetensors alone wrote 0600
    for name, tensor in objects["adapter"].controlnet.state_dict().items():
        assert torch.equal(exported.state_dict()[name], tensor), name
    grids = sorted(p.name for p in (run / "samples").glob("*.png"))
    assert grids == ["step_000000.png", "step_000003.png"]
    assert Image.open(run / "samples" / "step_000003.png").size == (3 * 64 + 4 * 2, 2 * 64 + 3 * 2)
    assert (run / "config.yaml").is_file()
    controllability = json.loads((run / "controllability.json").read_text())
    assert set(controllability["base_without_adapter"]) == {
        "mask_iou",
        "box_iou",
        "caption_accuracy",
        "canny_f1",
        "canny_ssim",
    }
    assert [point["step"] for point in controllability["curve"]] == [0, 3]

    # resuming continues from the checkpoint's step with its weights
    resumed_cfg = make_train_config("trainer.max_steps=4", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}")
    _, resumed = train(resumed_cfg)
    assert resumed["trainer"].global_step == 4


def test_checkpoint_of_another_adapter_is_refused(make_train_config):
    cfg = make_train_config("trainer.max_steps=1")
    _, objects = train(cfg)
    checkpoint = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["state_dict"].pop("adapter.controlnet.conv_in.weight")
    with pytest.raises(CtrlkitError, match=r"checkpoint does not match this adapter: 1 missing keys"):
        objects["system"].on_load_checkpoint(checkpoint)


def test_wrong_checkpoint_files_give_one_line_errors(tmp_path):
    (tmp_path / "noise.ckpt").write_bytes(b"\x00\x01 not a checkpoint")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "plain.pt")
    for name in ("noise.ckpt", "plain.pt"):
        with pytest.raises(CtrlkitError, match="is not a ctrlkit training checkpoint") as error:
            check_checkpoint(str(tmp_path / name))
        assert "\n" not in str(error.value)
    with pytest.raises(CtrlkitError, match="does not exist"):
        check_checkpoint(str(tmp_path / "absent.ckpt"))


def test_tiny_pipeline_folder_trains_through_model_sd15(make_train_config, tmp_path):
    saved = build_tiny_backbone(seed=3)
    saved.to_pipeline().save_pretrained(tmp_path / "pipeline")
    _, objects = train(make_train_config("model=sd15", f"model.path={tmp_path / 'pipeline'}", "debug=fdr"))
    for name, tensor in saved.unet.state_dict().items():
        assert torch.equal(objects["backbone"].unet.state_dict()[name], tensor), name
    assert objects["backbone"].tokenizer("a red circle").input_ids == saved.tokenizer("a red circle").input_ids


def test_single_file_checkpoint_trains_through_model_sd15(make_train_config, tmp_path):
    saved = build_tiny_backbone(seed=4)
    saved.to_pipeline().save_pretrained(tmp_path / "configs")
    saved.save_single_file(tmp_path / "tiny-sd.safetensors")
    cfg = make_train_config(
        "model=sd15",
        f"model.path={tmp_path / 'tiny-sd.safetensors'}",
        f"model.config={tmp_path / 'configs'}",
        "debug=fdr",
    )
    _, objects = train(cfg)
    for part in ("unet", "vae", "text_encoder"):
        loaded = getattr(objects["backbone"], part).state_dict()
        for name, tensor in getattr(saved, part).state_dict().items():
            assert torch.equal(loaded[name], tensor), f"{part}.{name}"


def test_bad_model_paths_are_named(tmp_path):
    with pytest.raises(CtrlkitError, match=r"model path .*nowhere does not exist"):
        load_pretrained_backbone(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CtrlkitError, match=r"is not a diffusers pipeline folder: missing unet, text_encoder"):
        load_pretrained_backbone(str(tmp_path / "empty"))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CtrlkitError, match=r"needs model.config=<local diffusers pipeline folder"):
        load_pretrained_backbone(str(tmp_path / "model.safetensors"))
    build_tiny_backbone().to_pipeline().save_pretrained(tmp_path / "configs")
    with pytest.raises(CtrlkitError, match=r"cannot load the single-file checkpoint .*model.safetensors"):
        load_pretrained_backbone(str(tmp_path / "model.safetensors"), config=str(tmp_path / "configs"))


def test_image_size_must_suit_the_model(make_train_config):
    with pytest.raises(CtrlkitError, match=r"data.image_size=60 must be a positive multiple of 16"):
        train(make_train_config("data.image_size=60", "debug=fdr"))


def test_wandb_runs_offline_without_a_key_and_logs_loss_and_grids(make_train_config, monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "absent-netrc"))
    assert not wandb_api_key_configured()
    cfg = make_train_config("logger=wandb", "trainer.max_steps=4", "trainer.log_every_n_steps=1")
    train(cfg)
    (run_dir,) = (Path(cfg.paths.output_dir) / "wandb").glob("offline-run-*")
    history = read_history(run_dir)
    assert len(history["train/loss"]) == 4
    assert [c[0].split(":")[0] for c in history["val/samples/captions"]] == ["step 0", "step 4"]
    assert len(history["val/mask_iou"]) == 2 and len(history["val/mask_iou_base"]) == 2
    for filenames in history["val/samples/filenames"]:
        assert (run_dir / "files" / filenames[0]).is_file()
    # resumed, the run goes on in the same W&B run (same id), not in a second one
    train(make_train_config("logger=wandb", "trainer.max_steps=5", f"resume={cfg.paths.output_dir}"))
    runs = sorted((Path(cfg.paths.output_dir) / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({run.name.rsplit("-", 1)[1] for run in runs}) == 1


def test_wandb_key_detection(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert not wandb_api_key_configured()
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert wandb_api_key_configured()
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_api_key_configured()


def test_latent_and_text_caches_encode_each_item_once(tiny_backbone):
    from adapters import ControlNetAdapter
    from conditions import CannyExtractor
    from lightning_modules.data.shapes import ShapesDataModule
    from lightning_modules.system import AdapterTrainingSystem

    adapter = ControlNetAdapter.from_unet(tiny_backbone.unet, vae_scale_factor=4)
    system = AdapterTrainingSystem(tiny_backbone, adapter, cache_latents=True)
    batch = ShapesDataModule(CannyExtractor(), val_size=4).fixed_batch(4)
    calls = []
    encode = tiny_backbone.encode_posterior
    tiny_backbone.encode_posterior = lambda pixels: calls.append(len(pixels)) or encode(pixels)
    first = system.training_latents(batch, generator=torch.Generator().manual_seed(0))
    again = system.training_latents(batch, generator=torch.Generator().manual_seed(0))
    # one item per VAE call (a cached value must not depend on its batch: exact resume), each item once
    assert calls == [1, 1, 1, 1] and torch.equal(first, again)  # same posterior, same noise -> same sample
    mean, std = encode(batch["pixel_values"])
    expected = tiny_backbone.sample_latents(mean, std, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(first, expected)
    prompts = list(batch["prompt"])
    torch.testing.assert_close(system.text_embeddings(prompts), tiny_backbone.encode_prompts(prompts))
    assert set(system._text_cache) == set(prompts)
