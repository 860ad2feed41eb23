"""data=webdataset: ranks x workers read each sample once per epoch, seeded shuffles, bad samples skipped and
counted, the saved position resumes the epoch, fixed validation, and the forms of data.urls."""

from __future__ import annotations

import json
from collections import Counter

import cv2
import numpy as np
import pytest
import torch
import webdataset as wds

from adapters.grounding import GroundingCondition
from conditions import CannyExtractor
from conditions.boxes import ShapesBoxesExtractor
from lightning_modules.data.shard_format import MANIFEST, resolve_shards
from lightning_modules.data.webdataset import WebDataModule
from lightning_modules.errors import BadDataError, CtrlkitError


def png(image: np.ndarray) -> bytes:
    return cv2.imencode(".png", image)[1].tobytes()


def write_shards(folder, shards: int = 4, per_shard: int = 6, prefix: str = "train", bad: tuple = ()) -> list[str]:
    """``shards`` tars of ``per_shard`` 16x16 samples numbered from 0 (image, caption, map, boxes, index) and a
    manifest as ctrlkit shards writes it; samples in ``bad`` get bytes that are no image."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    entries = []
    for shard in range(shards):
        name = f"{prefix}-{shard:06d}.tar"
        with wds.TarWriter(str(folder / name)) as writer:
            for index in range(shard * per_shard, (shard + 1) * per_shard):
                image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
                writer.write(
                    {
                        "__key__": f"{index:09d}",
                        "png": b"not a png" if index in bad else png(image),
                        "txt": f"sample {index}",
                        "cond.png": png((image > 127).astype(np.uint8) * 255),
                        "grounding.json": {"boxes": [[0.1, 0.2, 0.5, 0.6]], "phrases": ["red circle"]},
                        "json": {"index": index},
                    }
                )
        entries.append({"name": name, "samples": per_shard, "bad": []})
    manifest = {"maps": True, "grounding": True, "condition": None, "shards": entries}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return [str(folder / entry["name"]) for entry in entries]


@pytest.fixture
def shard_set(tmp_path):
    """4 training shards of 6 samples (indices 0-23) and one validation shard of 4 (indices 100-103)."""
    train = write_shards(tmp_path / "train")
    write_shards(tmp_path / "val", shards=1, per_shard=4, prefix="val")
    return tmp_path / "train", train, str(tmp_path / "val")


def module(urls, val_urls, **settings) -> WebDataModule:
    settings = {"image_size": 16, "val_size": 2, "batch_size": 2, "shuffle_buffer": 4, **settings}
    return WebDataModule(urls, CannyExtractor(), val_urls=val_urls, **settings)


def epoch_indices(datamodule: WebDataModule, epoch: int) -> list[int]:
    loader = datamodule.train_dataloader()
    loader.sampler.set_epoch(epoch)  # what Lightning's fit loop does before each epoch
    batches = list(loader)
    assert len(batches) == len(loader)
    return [index for batch in batches for index in batch["index"].tolist()]


def test_two_ranks_with_two_workers_read_every_sample_once_per_epoch(shard_set):
    folder, _, val = shard_set
    ranks = [module(str(folder), val, num_workers=2, rank=rank, world_size=2) for rank in (0, 1)]
    assert [len(datamodule.train_dataloader()) for datamodule in ranks] == [6, 6]  # 24 samples / 2 ranks / 2
    for epoch in (0, 1):
        seen = Counter(index for datamodule in ranks for index in epoch_indices(datamodule, epoch))
        assert seen == Counter(range(24)), epoch


def test_the_shuffle_is_seeded_and_differs_between_epochs(shard_set):
    folder, _, val = shard_set
    first, again = module(str(folder), val), module(str(folder), val)
    order = epoch_indices(first, 0)
    assert order == epoch_indices(again, 0) and sorted(order) == list(range(24))
    assert epoch_indices(first, 1) != order
    assert epoch_indices(module(str(folder), val, seed=1), 0) != order
    plain = module(str(folder), val, shardshuffle=False, shuffle_buffer=1)
    assert epoch_indices(plain, 0) == list(range(24))  # no shuffle: the shards' own order


def test_a_bad_image_in_a_shard_is_skipped_and_counted(tmp_path):
    urls = write_shards(tmp_path / "train", bad=(7,))
    val = write_shards(tmp_path / "val", shards=1, per_shard=2, prefix="val")
    datamodule = module(urls, val, shardshuffle=False, shuffle_buffer=1)
    batches = list(datamodule.train_dataloader())
    skipped = [message for batch in batches for message in batch["skipped"]]
    assert len(skipped) == 1 and "train-000001.tar sample 000000007" in skipped[0] and "cannot decode" in skipped[0]
    assert sorted(i for batch in batches for i in batch["index"].tolist()) == [i for i in range(24) if i != 7]
    raising = module(urls, val, shardshuffle=False, shuffle_buffer=1, on_error="raise")
    with pytest.raises(BadDataError, match=r"sample 000000007: cannot decode .*data.on_error=skip"):
        list(raising.train_dataloader())


@pytest.mark.parametrize("num_workers", [0, 2])
def test_the_saved_position_resumes_the_epoch_with_the_same_batches(shard_set, num_workers):
    folder, _, val = shard_set
    whole = module(str(folder), val, num_workers=num_workers)
    loader = whole.train_dataloader()
    loader.sampler.set_epoch(1)
    batches = [batch["index"].tolist() for batch in loader]
    killed = module(str(folder), val, num_workers=num_workers).train_dataloader()
    killed.sampler.set_epoch(1)
    for _ in zip(range(5), killed):
        killed.sampler.batches += 1  # the data module counts each batch the training loop uses
    state = killed.state_dict()
    assert state == {"epoch": 1, "batches": 5, "world_size": 1}
    resumed = module(str(folder), val, num_workers=num_workers).train_dataloader()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(1)
    assert [batch["index"].tolist() for batch in resumed] == batches[5:]


def test_ranks_with_unequal_shards_still_step_together(tmp_path):
    urls = write_shards(tmp_path / "train", shards=3)  # 18 samples: rank 0 gets 2 shards, rank 1 one
    val = write_shards(tmp_path / "val", shards=1, per_shard=2, prefix="val")
    counts = [len(list(module(urls, val, rank=rank, world_size=2).train_dataloader())) for rank in (0, 1)]
    assert counts == [4, 4]  # 18 // 2 // 2: rank 1 reads its shard again to fill its epoch
    with pytest.raises(CtrlkitError, match=r"3 shard\(s\) cannot be split over 4 processes"):
        module(urls, val, rank=0, world_size=4).train_dataloader()


def test_validation_is_fixed_and_left_out_of_training(shard_set):
    folder, urls, _ = shard_set
    datamodule = module(str(folder), None, val_size=3)
    fixed = datamodule.fixed_batch(3)
    assert fixed["index"].tolist() == [0, 1, 2] and fixed["pixel_values"].shape == (3, 3, 16, 16)
    assert fixed["pixel_values"].min() >= -1 and fixed["pixel_values"].max() <= 1
    assert set(fixed["condition"].unique().tolist()) <= {0.0, 1.0} and fixed["prompt"][0] == "sample 0"
    assert datamodule.epoch_samples == 21 and len(datamodule.train_dataloader()) == 10
    assert not {0, 1, 2} & set(epoch_indices(datamodule, 0))


def test_samples_carry_sdxl_micro_conditioning_from_the_stored_image(shard_set):
    folder, _, _ = shard_set
    fixed = module(str(folder), None, val_size=2, image_size=8).fixed_batch(2)
    # (original 16x16, no crop, target 8x8)
    assert fixed["time_ids"].tolist() == [[16, 16, 0, 0, 8, 8]] * 2


def test_grounding_records_and_the_extractor_on_the_fly(shard_set):
    folder, _, val = shard_set
    grounded = WebDataModule(str(folder), ShapesBoxesExtractor(max_boxes=4), val_urls=val, image_size=16)
    condition = grounded.fixed_batch(2)["condition"]
    assert isinstance(condition, GroundingCondition) and condition.boxes.shape == (2, 4, 4)
    assert condition.phrases[0] == ["red circle", "", "", ""]
    fly = module(str(folder), val, conditions="extractor").fixed_batch(2)
    files = module(str(folder), val).fixed_batch(2)
    assert fly["condition"].shape == files["condition"].shape and not torch.equal(fly["condition"], files["condition"])


def test_box_controllability_is_off_without_scenes_instead_of_failing(shard_set):
    from types import SimpleNamespace

    from lightning_modules.callbacks.controllability import ControllabilityCallback

    folder, _, val = shard_set
    datamodule = WebDataModule(str(folder), ShapesBoxesExtractor(max_boxes=4), val_urls=val, image_size=16)
    assert not hasattr(datamodule.val_dataset, "scene")  # not shards of shapes scenes: no box_iou to score
    callback = ControllabilityCallback("unused.json", jump_metric="box_iou")
    callback.base = {}  # what scoring the base model gives these items
    trainer = SimpleNamespace(datamodule=datamodule, is_global_zero=True)
    assert callback._prepare(trainer, None) is False and not callback.enabled


def test_urls_as_pattern_list_folder_or_manifest(shard_set):
    folder, urls, _ = shard_set
    pattern = str(folder / "train-{000000..000003}.tar")
    for given in (pattern, urls, str(folder), str(folder / MANIFEST)):
        shards = resolve_shards(given)
        assert shards.urls == urls and shards.samples == 24, given
    (folder / MANIFEST).unlink()  # without a manifest the count comes from the tar headers
    assert resolve_shards(pattern).samples is None and module(pattern, None).epoch_samples == 22
    with pytest.raises(CtrlkitError, match=r"shard not found: .*train-000008.tar"):
        resolve_shards(str(folder / "train-{000008..000009}.tar"))
