"""Shared fixtures: a tiny backbone built in code, and the training config composed like the CLI composes it."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from lightning_modules.backbone import Backbone, build_tiny_backbone
from lightning_modules.commands.config_checks import CONF_DIR

# Tests never reach a hub, and W&B never goes online from a test.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# CTRLKIT_TEST_THREADS=1 keeps the suite from oversubscribing a machine that runs something else; under pytest-xdist
# (-n N) the cores are shared among the N workers
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(int(os.environ.get("CTRLKIT_TEST_THREADS", max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))))

# Overrides that keep a training test to seconds: tiny validation, 2-step sampling, no experiment logger.
FAST_OVERRIDES = [
    "trainer=cpu",
    "logger=none",
    "data.batch_size=2",
    "data.val_size=2",
    "callbacks.sample_grid.num_samples=2",
    "callbacks.sample_grid.num_inference_steps=2",
    "callbacks.controllability.num_samples=2",
    "callbacks.controllability.num_inference_steps=2",
    "callbacks.controllability.base_cache_dir=null",  # each test scores its own base model
    "callbacks.sample_grid.base_cache_dir=null",
    "system.cache_dir=null",  # each test encodes its own items, unless it sets a folder of its own
    "callbacks.progress_bar.refresh_rate=0",
    "+trainer.enable_model_summary=false",
]


@pytest.fixture
def cli(tmp_path, capsys, monkeypatch):
    """``cli(argv)`` runs ``ctrlkit <argv>`` in this process from tmp_path, its run folders under tmp_path/outputs
    (``CTRLKIT_OUTPUTS``), so nothing lands in the repository -> (exit status, the non-empty lines of stderr)."""
    from tests.helpers.cli import run_cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CTRLKIT_OUTPUTS", str(tmp_path / "outputs"))
    return lambda argv: run_cli(capsys, list(argv))


@pytest.fixture
def tiny_backbone() -> Backbone:
    return build_tiny_backbone(seed=0)


def compose_config(config_name: str, output_dir: Path, overrides: list[str]) -> DictConfig:
    """Compose conf/<config_name>.yaml with the Hydra runtime filled in, as its `ctrlkit` command would see it."""
    GlobalHydra.instance().clear()
    if config_name == "evaluate":  # each test samples its own base model, unless it names a folder of its own
        overrides = ["base_cache_dir=null", *overrides]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose(config_name=config_name, return_hydra_config=True, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
    HydraConfig().set_config(cfg)
    return cfg


def compose_train_config(output_dir: Path, overrides: list[str] | None = None) -> DictConfig:
    """conf/train.yaml with the fast test settings first."""
    return compose_config("train", output_dir, FAST_OVERRIDES + list(overrides or []))


@pytest.fixture
def make_train_config(tmp_path):
    def make(*overrides: str) -> DictConfig:
        return compose_train_config(tmp_path / "run", list(overrides))

    yield make
    GlobalHydra.instance().clear()


@pytest.fixture(scope="session")
def hed_weights_dir(tmp_path_factory) -> Path:
    """A folder with ``ControlNetHED.pth`` as lllyasviel/Annotators lays it out: a state dict of controlnet_aux's
    ``ControlNetHED_Apache2``, here with seeded random weights."""
    from controlnet_aux.hed import ControlNetHED_Apache2

    folder = tmp_path_factory.mktemp("hed_weights")
    torch.manual_seed(0)
    torch.save(ControlNetHED_Apache2().state_dict(), folder / "ControlNetHED.pth")
    return folder


@pytest.fixture(scope="session")
def fill50k_root(tmp_path_factory) -> Path:
    """A small circles set in ControlNet's fill50k layout (prompt.json, source/, target/)."""
    from conditions.circles import write_circles

    return write_circles(tmp_path_factory.mktemp("fill50k"), count=6, size=64, layout="fill50k")


@pytest.fixture(scope="session")
def imagefolder_root(tmp_path_factory) -> Path:
    """A small circles set in diffusers' imagefolder layout (metadata.jsonl)."""
    from conditions.circles import write_circles

    return write_circles(tmp_path_factory.mktemp("imagefolder"), count=6, size=64, layout="imagefolder")


@pytest.fixture(scope="session")
def webdataset_shards(tmp_path_factory) -> Path:
    """16 shapes scenes with canny maps as 4 tar shards and a manifest (``ctrlkit shards source=shapes``)."""
    from conditions import CannyExtractor
    from lightning_modules.commands.shards import shapes_source, write_shards

    folder = tmp_path_factory.mktemp("shards")
    write_shards(shapes_source(CannyExtractor(), count=16), folder, maxcount=4)
    return folder


@pytest.fixture(scope="session")
def openpose_weights_dir(tmp_path_factory) -> Path:
    """``body_pose_model.pth`` laid out as lllyasviel/Annotators ships it: controlnet_aux ``bodypose_model`` weights
    under the upstream key names (without the block prefix that ``util.transfer`` adds back), seeded random."""
    from controlnet_aux.open_pose.model import bodypose_model

    folder = tmp_path_factory.mktemp("openpose_weights")
    torch.manual_seed(0)
    state = {name.split(".", 1)[1]: tensor for name, tensor in bodypose_model().state_dict().items()}
    torch.save(state, folder / "body_pose_model.pth")
    return folder


@pytest.fixture(scope="session")
def dpt_dir(tmp_path_factory) -> Path:
    """A tiny random DPT depth model saved as a transformers folder (config, weights, image processor)."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    folder = tmp_path_factory.mktemp("dpt")
    torch.manual_seed(0)
    config = DPTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=4,
        backbone_out_indices=[0, 1, 2, 3],
        num_attention_heads=4,
        intermediate_size=37,
        neck_hidden_sizes=[16, 16, 32, 32],
        fusion_hidden_size=16,
        reassemble_factors=[4, 2, 1, 0.5],
    )
    DPTForDepthEstimation(config).save_pretrained(folder)
    DPTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def segformer_dir(tmp_path_factory) -> Path:
    """A tiny random 150-class (ADE20K) Segformer saved as a transformers folder."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

    folder = tmp_path_factory.mktemp("segformer")
    torch.manual_seed(0)
    config = SegformerConfig(
        num_encoder_blocks=2,
        depths=[1, 1],
        sr_ratios=[4, 2],
        hidden_sizes=[8, 16],
        patch_sizes=[7, 3],
        strides=[4, 2],
        num_attention_heads=[1, 2],
        mlp_ratios=[2, 2],
        decoder_hidden_size=16,
        num_labels=150,
    )
    SegformerForSemanticSegmentation(config).save_pretrained(folder)
    SegformerImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def build_clip_tokenizer(max_length: int = 16):
    """A CLIP BPE tokenizer laid out as OpenAI's: the 256 byte tokens, their ``</w>`` forms, then
    ``<|startoftext|>`` and ``<|endoftext|>`` as the two highest ids (no merges: text tokenizes byte by byte).
    OWL-ViT pools the text at ``input_ids.argmax()``, which is the end token only if it has the highest id, so a
    tokenizer with the special tokens first (ids 0 and 1) silently pools the wrong position. Pads with "!" as
    google/owlvit-* do."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {char: index for index, char in enumerate(alphabet)}
    vocab.update({char + "</w>": len(alphabet) + index for index, char in enumerate(alphabet)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length, pad_token="!")


def _save_tiny_owl(folder: Path, model_type: str) -> Path:
    """A tiny random OWL-ViT or OWLv2 detector (64x64 input, 16-pixel patches) with its processor, saved as
    transformers saves the hub folders."""
    from transformers import (
        Owlv2Config,
        Owlv2ForObjectDetection,
        Owlv2ImageProcessor,
        Owlv2Processor,
        OwlViTConfig,
        OwlViTForObjectDetection,
        OwlViTImageProcessor,
        OwlViTProcessor,
    )

    tokenizer = build_clip_tokenizer()
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": tokenizer.model_max_length,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 64,
        "patch_size": 16,
    }
    size = {"height": 64, "width": 64}
    torch.manual_seed(0)
    if model_type == "owlvit":
        model = OwlViTForObjectDetection(OwlViTConfig(text_config=text, vision_config=vision, projection_dim=32))
        processor = OwlViTProcessor(OwlViTImageProcessor(size=size, crop_size=size), tokenizer)
    else:
        model = Owlv2ForObjectDetection(Owlv2Config(text_config=text, vision_config=vision, projection_dim=32))
        processor = Owlv2Processor(Owlv2ImageProcessor(size=size), tokenizer)
    # Untrained heads saturate: every box collapses to a corner and every score to 0 or 1. Shrinking their
    # weights leaves boxes near each patch's prior box and scores spread around 0.5, so records vary like real ones.
    with torch.no_grad():
        for head in (model.box_head, model.class_head):
            for parameter in head.parameters():
                parameter.mul_(0.01)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def owlvit_dir(tmp_path_factory) -> Path:
    return _save_tiny_owl(tmp_path_factory.mktemp("owlvit"), "owlvit")


@pytest.fixture(scope="session")
def owlv2_dir(tmp_path_factory) -> Path:
    return _save_tiny_owl(tmp_path_factory.mktemp("owlv2"), "owlv2")


def build_tiny_sd2_pipeline(seed: int = 0):
    """A tiny SD 2.x-architecture pipeline with random weights, as diffusers' own SD2 tests build theirs
    (``tests/pipelines/stable_diffusion_2/test_stable_diffusion.py``): a UNet with linear projections in its
    transformers and an attention head width per block, an OpenCLIP-like text encoder (``gelu``, not CLIP's
    ``quick_gelu``), a two-level VAE (64 px -> 32x32x4) and SD 2.x 768-v's scheduler: DDIM, ``v_prediction``."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_clip_tokenizer(16)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
    )
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=128,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=5,
            hidden_act="gelu",
            projection_dim=512,
            vocab_size=len(tokenizer),
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    # as stabilityai/stable-diffusion-2-1's scheduler config (2.x-base folders say prediction_type epsilon)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction",
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@pytest.fixture(scope="session")
def sd2_pipeline_dir(tmp_path_factory) -> Path:
    """The tiny SD 2.x pipeline (``build_tiny_sd2_pipeline``) saved with ``save_pretrained``: what
    ``model=sd2 model.path=<folder>`` loads."""
    folder = tmp_path_factory.mktemp("sd2") / "pipeline"
    build_tiny_sd2_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture
def no_network(monkeypatch):
    """Any network connection fails the test: shipped models and adapters must load offline."""

    def refuse(*args, **kwargs):
        raise AssertionError("this must load without the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
