"""The procedural shapes scenes and dataset: seeded, exact ground truth, the condition from the extractor."""

from __future__ import annotations

import numpy as np
import torch

from conditions import CannyExtractor
from conditions.shapes import COLOURS, SHAPES, VOCABULARY, render_scene
from lightning_modules.backbone import build_shapes_tokenizer
from lightning_modules.data.shapes import ShapesDataModule, ShapesDataset


def test_scene_ground_truth_matches_the_drawing():
    for seed in range(20):
        scene = render_scene(np.random.default_rng(seed), size=64, num_objects=1)
        (obj,) = scene.objects
        assert scene.caption == f"a {obj.colour} {obj.shape} on a {scene.background} background"
        assert obj.shape in SHAPES and obj.colour != scene.background
        # every masked pixel has the object's colour, every other pixel the background's
        assert (scene.image[obj.mask] == COLOURS[obj.colour]).all()
        assert (scene.image[~obj.mask] == COLOURS[scene.background]).all()
        ys, xs = np.nonzero(obj.mask)
        assert np.allclose(obj.box, (xs.min() / 64, ys.min() / 64, (xs.max() + 1) / 64, (ys.max() + 1) / 64))


def test_several_objects_are_all_named():
    scene = render_scene(np.random.default_rng(3), size=64, num_objects=3)
    assert len(scene.objects) == 3
    assert all(obj.phrase in scene.caption for obj in scene.objects)


def test_dataset_is_seeded_and_well_formed():
    dataset = ShapesDataset(CannyExtractor(), length=10, image_size=64, seed=7)
    item = dataset[3]
    assert (
        item["pixel_values"].shape == (3, 64, 64)
        and -1 <= item["pixel_values"].min() <= item["pixel_values"].max() <= 1
    )
    assert item["condition"].shape == (3, 64, 64) and item["condition"].max() == 1.0
    assert item["mask"].dtype == torch.bool and item["mask"].any()
    again = ShapesDataset(CannyExtractor(), length=10, image_size=64, seed=7)[3]
    assert torch.equal(item["pixel_values"], again["pixel_values"]) and item["prompt"] == again["prompt"]
    other = ShapesDataset(CannyExtractor(), length=10, image_size=64, seed=8)[3]
    assert not torch.equal(item["pixel_values"], other["pixel_values"])


def test_validation_split_is_fixed_and_differs_from_training():
    datamodule = ShapesDataModule(CannyExtractor(), val_size=4, batch_size=2)
    first, second = datamodule.fixed_batch(4), ShapesDataModule(CannyExtractor(), val_size=4).fixed_batch(4)
    assert torch.equal(first["pixel_values"], second["pixel_values"])
    assert not torch.equal(first["pixel_values"][0], datamodule.train_dataset[0]["pixel_values"])
    assert next(iter(datamodule.train_dataloader()))["condition"].shape == (2, 3, 64, 64)


def test_tokenizer_gives_each_shapes_word_one_token():
    tokenizer = build_shapes_tokenizer()
    for word in VOCABULARY:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    ids = tokenizer("a zebra!", add_special_tokens=False).input_ids  # unknown words still tokenize, by bytes
    assert len(ids) > 2 and tokenizer.unk_token_id not in ids
    # the same ids from every build (a BPE trainer's tie-breaking once made them differ within one process)
    caption = "a red circle and a blue square on a white background"
    assert all(build_shapes_tokenizer()(caption).input_ids == tokenizer(caption).input_ids for _ in range(5))
    assert build_shapes_tokenizer().get_vocab() == tokenizer.get_vocab()
