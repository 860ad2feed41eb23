"""Reliability, round two: decompression bombs, failed resumes, unwritable folders, bad compositions and unit
fields, refused weights in evaluate, and the end of training as resumable work."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conditions import CannyExtractor, ImageDecodeError, read_image
from lightning_modules.circles import write_circles
from lightning_modules.extract import MANIFEST, extract_folder
from lightning_modules.file_data import FileDataModule
from tests.helpers.bomb import write_bomb_png

# ------------------------------------------------------------------ decompression bombs and other undecodable files


def test_a_bomb_is_refused_from_its_header_naming_the_file(tmp_path):
    bomb = write_bomb_png(tmp_path / "bomb.png")  # 100000x100000: over PIL's own hard limit
    with pytest.raises(ImageDecodeError, match=r"bomb\.png"):
        read_image(bomb)
    # between our limit and PIL's: our header check refuses it before decoding, and says the size and the limit
    big = write_bomb_png(tmp_path / "big.png", 9000, 9000)
    with pytest.raises(ImageDecodeError, match=r"big\.png is 9000x9000 = 81000000 pixels, over the limit of 67108864"):
        read_image(big)
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(small)
    assert read_image(small).shape == (20, 30, 3)
    with pytest.raises(ImageDecodeError, match=r"30x20 = 600 pixels, over the limit of 599"):
        read_image(small, max_pixels=599)


def test_any_decoder_failure_is_an_image_decode_error(tmp_path, monkeypatch):
    image = tmp_path / "odd.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(image)

    def decoder_bug(self, *args, **kwargs):
        raise MemoryError("decoder ran out of memory")

    monkeypatch.setattr(Image.Image, "load", decoder_bug)
    with pytest.raises(ImageDecodeError, match=r"cannot decode image .*odd\.png: MemoryError: decoder ran out"):
        read_image(image)


def test_extract_writes_the_good_images_and_names_the_bomb(tmp_path):
    source = tmp_path / "in"
    for index in range(3):
        source.mkdir(exist_ok=True)
        Image.fromarray(np.full((32, 32, 3), 60 * index, np.uint8)).save(source / f"good{index}.png")
    write_bomb_png(source / "bomb.png")
    report = extract_folder(CannyExtractor(), source, tmp_path / "out", num_workers=0, chunk_size=8, progress=False)
    assert report.written == 3  # the good images of the bomb's own chunk are written
    ((name, reason),) = report.failed
    assert name == "bomb.png" and "bomb.png" in reason
    entries = [json.loads(line)["source"] for line in (tmp_path / "out" / MANIFEST).read_text().splitlines()]
    assert sorted(entries) == ["good0.png", "good1.png", "good2.png"]


def test_training_data_skips_and_counts_a_bomb(tmp_path):
    root = write_circles(tmp_path / "data", count=6, size=32)
    write_bomb_png(root / "target" / "1.png")
    datamodule = FileDataModule(str(root), CannyExtractor(), image_size=32, val_size=1, batch_size=8)
    (batch,) = list(datamodule.train_dataloader())
    (skipped,) = batch["skipped"]
    assert "prompt.json line 2" in skipped and "1.png" in skipped
    assert len(batch["prompt"]) == 4  # 5 training items - the bomb


def test_training_with_on_error_skip_survives_a_bomb(make_train_config, tmp_path):
    from lightning_modules.train import train

    root = write_circles(tmp_path / "data", count=6, size=32)
    write_bomb_png(root / "target" / "0.png")
    overrides = ["data=fill50k", f"data.root={root}", "data.image_size=32", "data.val_size=1", "data.batch_size=5"]
    _, objects = train(make_train_config(*overrides, "trainer.max_steps=2"))
    assert objects["trainer"].global_step == 2 and objects["system"].skipped_items == 2  # once per epoch
