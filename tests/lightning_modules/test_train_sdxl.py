"""Training on an SDXL base (issue 20): the training step gives the UNet and the adapter SDXL's pooled text and
time ids; `ctrlkit train model=sdxl` trains a ControlNet and a T2I-Adapter on a tiny random SDXL pipeline (a
diffusers folder, or the same weights as one original-layout .safetensors + the folder's configs), exports folders
diffusers' SDXL pipelines load, and a run killed after a checkpoint resumes to identical weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLAdapterPipeline, StableDiffusionXLControlNetPipeline
from safetensors.torch import load_file

from adapters import ControlNetAdapter
from adapters.t2i_adapter import T2IAdapterAdapter
from lightning_modules.backbone import load_pretrained_backbone
from lightning_modules.commands.train import train
from lightning_modules.system import AdapterTrainingSystem
from tests.conftest import compose_train_config
from tests.helpers.tiny_sdxl import save_tiny_sdxl_pipeline
from tests.lightning_modules.test_resume import RUN, adapter_weights, assert_identical, straight_and_resumed


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    return save_tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl") / "pipeline")


@pytest.fixture(scope="module")
def sdxl_single_file(sdxl_folder):
    """The tiny SDXL weights as one .safetensors in the original layout (``conditioner.embedders.{0,1}``)."""
    checkpoint = sdxl_folder.parent / "tiny-sdxl.safetensors"
    load_pretrained_backbone(str(sdxl_folder)).save_single_file(checkpoint)
    return checkpoint


@pytest.fixture(params=["folder", "single_file"])
def sdxl_source(request, sdxl_folder) -> list[str]:
    """The model overrides for the tiny SDXL base as a pipeline folder, or as a single file + its config folder."""
    if request.param == "folder":
        return [f"model.path={sdxl_folder}"]
    return [f"model.path={request.getfixturevalue('sdxl_single_file')}", f"model.config={sdxl_folder}"]


def test_a_single_file_sdxl_checkpoint_loads_to_the_same_weights(sdxl_folder, sdxl_single_file):
    """Both text encoders come back from their own prefixes (the tiny encoders differ in width, as SDXL's do, so a
    mix-up could not load), with the UNet's text-time embedding (``label_emb``) and the VAE."""
    keys = load_file(sdxl_single_file).keys()
    assert "conditioner.embedders.1.model.text_projection" in keys
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    saved = load_pretrained_backbone(str(sdxl_folder))
    loaded = load_pretrained_backbone(str(sdxl_single_file), config=str(sdxl_folder))
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(saved, part).state_dict(), getattr(loaded, part).state_dict()
        assert ours.keys() == theirs.keys(), part
        for name, tensor in ours.items():
            assert torch.equal(theirs[name], tensor), f"{part}.{name}"
    assert loaded.force_zeros_for_empty_prompt is True


def sdxl_overrides(source: list[str]) -> list[str]:
    """The tiny SDXL base, without the sampling callbacks (their SDXL sampling is generate's, tested apart): the
    tiny SDXL model is several times the shipped one, and these runs test training."""
    return [
        "model=sdxl",
        *source,
        "recipe.adapter_learning_rate=1e-4",
        "callbacks.controllability.every_n_steps=0",
        "callbacks.sample_grid.every_n_steps=0",
    ]


def test_the_training_step_gives_the_unet_the_pooled_text_and_time_ids(sdxl_folder):
    backbone = load_pretrained_backbone(str(sdxl_folder))
    system = AdapterTrainingSystem(backbone, ControlNetAdapter.from_unet(backbone.unet, vae_scale_factor=2))
    batch = {
        "pixel_values": torch.rand(2, 3, 64, 64) * 2 - 1,
        "prompt": ["a red circle", "a blue square"],
        "condition": torch.rand(2, 3, 64, 64),
    }

    inputs = system.training_inputs(batch, generator=torch.Generator().manual_seed(0))

    added = inputs.added_cond_kwargs
    torch.testing.assert_close(added["text_embeds"], backbone.encode_pooled(batch["prompt"]))
    assert added["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]] * 2  # original size, crop, target size
    assert inputs.encoder_hidden_states.shape[-1] == backbone.unet.config.cross_attention_dim  # both encoders
    # the data's own micro-conditioning wins
    own = torch.tensor([[512.0, 384, 16, 0, 64, 64]] * 2)
    assert torch.equal(system.training_inputs({**batch, "time_ids": own}).added_cond_kwargs["time_ids"], own)
    assert torch.isfinite(system.prediction_loss(inputs))


@pytest.mark.parametrize(
    ("adapter", "extra"), [("controlnet", []), ("t2i_adapter", ["adapter.build.adapter_type=full_adapter_xl"])]
)
def test_train_on_sdxl_exports_what_diffusers_sdxl_pipelines_load(sdxl_folder, sdxl_source, tmp_path, adapter, extra):
    run = tmp_path / "run"
    _, objects = train(compose_train_config(run, [*sdxl_overrides(sdxl_source), f"adapter={adapter}", *extra,
                                                  "trainer.max_steps=5"]))  # fmt: skip
    assert objects["trainer"].global_step == 5

    backbone = load_pretrained_backbone(str(sdxl_folder))
    components = {k: v for k, v in backbone.to_pipeline().components.items() if v is not None}
    if adapter == "controlnet":
        model = ControlNetAdapter.from_pretrained(run / "adapter").controlnet
        pipeline = StableDiffusionXLControlNetPipeline(**components, controlnet=model, add_watermarker=False)
        condition = {"image": torch.rand(1, 3, 64, 64)}
    else:
        model = T2IAdapterAdapter.from_pretrained(run / "adapter").t2i_adapter
        pipeline = StableDiffusionXLAdapterPipeline(**components, adapter=model)
        condition = {"image": torch.rand(1, 3, 64, 64)}
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline("a red circle", **condition, height=64, width=64, num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    assert (run / "adapter" / "README.md").is_file()  # the model card


# in the slow set (~30 s a case): the default set resumes the tiny SD1.5-style model after a kill (test_resume.py),
# and an SDXL run loads a folder and a single file alike (test above)
@pytest.mark.slow
@pytest.mark.parametrize("sdxl_source", ["folder", "single_file"], indirect=True)
def test_a_killed_sdxl_run_resumes_to_identical_weights(sdxl_source, tmp_path):
    run = [*RUN, *sdxl_overrides(sdxl_source), "trainer.max_steps=4", "data.train_size=4"]  # 2 epochs
    straight, killed, global_step = straight_and_resumed(tmp_path, run)
    assert global_step == 4
    assert_identical(
        adapter_weights(straight / "checkpoints" / "last.ckpt"), adapter_weights(killed / "checkpoints" / "last.ckpt")
    )


def test_gligen_on_an_sdxl_unet_stops_with_one_line_saying_why(sdxl_folder):
    from adapters import AdapterFormatError
    from adapters.gligen import GligenAdapter

    unet = load_pretrained_backbone(str(sdxl_folder)).unet
    with pytest.raises(AdapterFormatError, match="addition_embed_type=text_time") as raised:
        GligenAdapter.from_unet(unet, vae_scale_factor=2)
    assert "\n" not in str(raised.value)
    assert unet.config.attention_type != "gated"  # the UNet was left as it was


def test_evaluate_scores_an_sdxl_run_with_its_base(sdxl_folder, tmp_path):
    """`ctrlkit evaluate adapter_path=<SDXL run>` takes the SDXL base from the run's config and samples the base and
    the adapter with SDXL's added inputs (without them the UNet call fails)."""
    from lightning_modules.commands.evaluate import run_evaluate
    from tests.lightning_modules.commands.test_evaluate import compose_evaluate_config

    run = tmp_path / "run"
    train(compose_train_config(run, [*sdxl_overrides([f"model.path={sdxl_folder}"]), "trainer.max_steps=2"]))
    settings = ["num_samples=2", "num_seeds=1", "batch_size=2", "sampling.num_inference_steps=2", "grid_rows=1"]
    summary = run_evaluate(compose_evaluate_config(tmp_path / "evaluation", [f"adapter_path={run}", *settings]))

    assert summary["primary_metric"] == "canny_f1"
    for model in ("base", "adapter"):
        assert 0.0 <= summary[model]["canny_f1"] <= 1.0 and 0.0 <= summary[model]["mask_iou"] <= 1.0
    assert (tmp_path / "evaluation" / "grid.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [["adapter=controlnet_xs"], ["adapter=control_lora"], ["adapter=controlnet_multi", "condition=multi"]],
    ids=["controlnet_xs", "control_lora", "controlnet_multi"],
)
def test_the_zoo_trains_and_evaluates_on_sdxl(sdxl_folder, tmp_path, extra):
    """ControlNet-XS, Control-LoRA and the multi-condition ControlNet train on the SDXL base and their runs are
    scored by `ctrlkit evaluate` (loaded back onto the SDXL UNet, sampled with SDXL's added inputs); a changed
    adapter the base does not equal."""
    from lightning_modules.commands.evaluate import run_evaluate
    from tests.lightning_modules.commands.test_evaluate import compose_evaluate_config

    run = tmp_path / "run"
    overrides = [*sdxl_overrides([f"model.path={sdxl_folder}"]), *extra, "trainer.max_steps=2"]
    _, objects = train(compose_train_config(run, overrides))
    assert objects["trainer"].global_step == 2
    settings = ["num_samples=2", "num_seeds=1", "batch_size=2", "sampling.num_inference_steps=2", "grid_rows=1"]
    summary = run_evaluate(compose_evaluate_config(tmp_path / "evaluation", [f"adapter_path={run}", *settings]))
    assert 0.0 <= summary["adapter"]["mask_iou"] <= 1.0 and summary["adapter"] != summary["base"]
