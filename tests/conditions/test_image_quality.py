"""FID / KID / CLIP score through the real loading path, with networks of random weights saved as the real files
are laid out; missing weights are reported as unavailable."""

from pathlib import Path

import numpy as np
import pytest
import torch

from conditions.image_quality import INCEPTION_FILE, image_quality, load_clip, load_inception
from conditions.shapes import render_scene


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory) -> Path:
    """torch-fidelity's Inception file layout (a plain state dict of ``FeatureExtractorInceptionV3``), with seeded
    random weights. Building the network normally downloads the weights, so the build skips that step here."""
    import torch_fidelity.feature_extractor_inceptionv3 as fidelity

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fidelity, "load_state_dict_from_url", lambda *args, **kwargs: {})
        patch.setattr(fidelity.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        torch.manual_seed(0)
        network = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for module in network.modules():  # variance-preserving init, so random features do not vanish with depth
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / INCEPTION_FILE
    torch.save(network.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    """A tiny random CLIP model + processor saved as a transformers folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from lightning_modules.backbone import build_shapes_tokenizer

    tokenizer = build_shapes_tokenizer()
    torch.manual_seed(0)
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = CLIPConfig(
        text_config={
            **small,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": tokenizer.model_max_length,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={**small, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    folder = tmp_path_factory.mktemp("clip")
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def _images(seeds) -> tuple[torch.Tensor, list[str]]:
    scenes = [render_scene(np.random.default_rng(seed), size=64) for seed in seeds]
    images = torch.from_numpy(np.stack([scene.image for scene in scenes])).permute(0, 3, 1, 2).contiguous()
    return images, [scene.caption for scene in scenes]


def test_fid_kid_clip_with_local_random_weights(inception_weights, clip_dir):
    real, prompts = _images(range(4))
    noise = torch.randint(0, 256, real.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    results = image_quality(
        real, {"same": real, "noise": noise}, prompts, inception_weights, clip_dir, kid_subset_size=3
    )
    same, different = results["same"], results["noise"]
    assert same["fid"] == pytest.approx(0.0, abs=1e-2)
    assert different["fid"] > same["fid"] + 1.0
    assert different["kid"] > same["kid"]
    for scores in (same, different):
        assert isinstance(scores["clip_score"], float) and 0.0 <= scores["clip_score"] <= 100.0


def test_missing_weights_are_reported_unavailable(tmp_path):
    real, prompts = _images(range(3))
    missing_inception, missing_clip = tmp_path / INCEPTION_FILE, tmp_path / "clip-vit-base-patch16"
    results = image_quality(real, {"adapter": real}, prompts, missing_inception, missing_clip)
    assert results["adapter"]["fid"] == f"unavailable: {missing_inception} not found"
    assert results["adapter"]["kid"] == f"unavailable: {missing_inception} not found"
    assert results["adapter"]["clip_score"] == f"unavailable: {missing_clip} not found"
    assert load_inception(None).startswith("unavailable: no Inception weights")


def test_a_foreign_file_is_unavailable_not_a_crash(tmp_path):
    wrong = tmp_path / INCEPTION_FILE
    torch.save({"weight": torch.zeros(2)}, wrong)
    assert load_inception(wrong).startswith(f"unavailable: {wrong} is not torch-fidelity's Inception")
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text("{}")
    assert load_clip(tmp_path / "clip").startswith("unavailable:")
