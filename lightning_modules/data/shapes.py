"""The procedural ``shapes`` dataset: scenes drawn on the fly, the condition extracted inside the data loader."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from conditions.base import ConditionExtractor
from conditions.shapes import ShapeScene, render_scene
from lightning_modules.data.common import ConditionedDataModule, check_on_error, item_condition


class ShapesDataset(Dataset):
    """Item ``i`` is the scene drawn from ``numpy.random.default_rng([seed, i])``: the same on every worker and run.

    Items:
        pixel_values: (3, S, S) float in [-1, 1]; condition: (C, S, S) float in [0, 1] from ``extractor``, or a
        ``GroundingCondition`` of one image (``conditions.boxes.pad_grounding``'s slots) from a grounding extractor;
        prompt: caption str; mask: (S, S) bool foreground ground truth; box: (4,) normalised xyxy of the first object;
        index: the item's index (the key of the training system's latent cache).
    """

    def __init__(
        self,
        extractor: ConditionExtractor,
        length: int,
        image_size: int = 64,
        seed: int = 0,
        num_objects: int | tuple[int, int] = 1,
    ) -> None:
        if length < 1:
            raise ValueError(f"dataset length must be >= 1, got {length}")
        self.extractor = extractor
        self.length = length
        self.image_size = image_size
        self.seed = seed
        self.num_objects = tuple(num_objects) if isinstance(num_objects, list | tuple) else num_objects
        # ground-truth extractors (conditions.shapes_truth) take the drawn scene, image extractors its pixels
        self._reads_scene = getattr(extractor, "reads_scene", False)

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> ShapeScene:
        """The full scene record of item ``index`` (objects, colours, masks): the ground truth of the metrics."""
        if not 0 <= index < self.length:
            raise IndexError(index)
        return render_scene(np.random.default_rng([self.seed, index]), self.image_size, self.num_objects)

    def describe(self, index: int) -> str:
        return f"shapes scene {index} (seed {self.seed})"

    def __getitem__(self, index: int) -> dict:
        scene = self.scene(index)
        image = torch.from_numpy(scene.image).permute(2, 0, 1).float().div(127.5).sub(1.0)
        extracted = self.extractor.from_scene(scene) if self._reads_scene else self.extractor(scene.image)
        return {
            "index": index,
            "pixel_values": image,
            "condition": item_condition(self.extractor, extracted),
            "prompt": scene.caption,
            "mask": torch.from_numpy(scene.foreground_mask),
            "box": torch.tensor(scene.objects[0].box, dtype=torch.float32),
        }


class ShapesDataModule(ConditionedDataModule):
    """Train and fixed validation splits of ``shapes``; the validation split has its own seed.

    Args:
        extractor: builds the condition of each item (from ``conf/condition``).
        image_size: side in pixels; must suit the model (checked before training).
        train_size: items per epoch (scenes are drawn, not stored, so this only sets the epoch length).
        val_size: items in the fixed validation set; the sample grid uses its first items.
        seed: the scenes' seed, also the shuffling seed.
        on_error: ``skip`` (default: a bad item is reported, left out of its batch and counted) or ``raise``.
    """

    def __init__(
        self,
        extractor: ConditionExtractor,
        image_size: int = 64,
        train_size: int = 100_000,
        val_size: int = 16,
        batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 0,
        val_seed: int = 1_000_003,
        num_objects: int | tuple[int, int] = 1,
        on_error: str = "skip",
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        check_on_error(on_error)
        self.on_error = on_error
        self.shuffle_seed = seed
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_dataset = ShapesDataset(extractor, train_size, image_size, seed, num_objects)
        self.val_dataset = ShapesDataset(extractor, val_size, image_size, val_seed, num_objects)
