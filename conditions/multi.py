"""Several conditions in one map, for one multi-condition adapter (Uni-ControlNet / ControlNet-Union style).

``MultiConditionExtractor`` runs its part extractors (e.g. canny, shapes_depth, shapes_mask) and stacks their maps,
then one presence plane per part: 255 where the part is given, 0 where it is left out. A part left out (not in
``use``) has an all-zero map *and* a zero presence plane, so "no edges" and "no edge condition" differ. Behind
the adapter's first convolution a constant presence plane is a learned vector per part: the condition-type
embedding that tells the model which conditions it was given.

Layout of the map (H, W, sum(part channels) + K), K parts in the order of ``parts``:
``[part 0's channels, ..., part K-1's channels, presence 0, ..., presence K-1]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from conditions.base import ConditionExtractor, _to_chw_float


class MultiConditionExtractor(ConditionExtractor):
    """The maps of several extractors stacked, with a presence plane per part.

    Args:
        parts: part name -> extractor (a conf/condition name and its extractor), in layout order.
        use: the parts given (a subset of ``parts``, e.g. ``[canny]`` at inference); None: all of them.
        channels: the map's channel count as the condition config states it (checked against the parts).
    """

    name = "multi"
    kind = "image"

    def __init__(
        self, parts: Mapping[str, ConditionExtractor], use: Sequence[str] | None = None, channels: int | None = None
    ) -> None:
        if not parts:
            raise ValueError("a multi-condition extractor needs at least one part")
        for part_name, part in parts.items():
            if getattr(part, "kind", "image") != "image":
                raise ValueError(f"multi-condition part '{part_name}' is a {part.kind} condition; parts are maps")
        self.parts = dict(parts)
        chosen = list(self.parts) if use is None else list(use)
        unknown = [name for name in chosen if name not in self.parts]
        if unknown or not chosen or len(set(chosen)) != len(chosen):
            raise ValueError(
                f"use={chosen}: give one or more distinct parts of this multi condition: {', '.join(self.parts)}"
            )
        self.use = chosen
        self.part_channels = [part.channels for part in self.parts.values()]
        expected = sum(self.part_channels) + len(self.parts)
        if channels is not None and channels != expected:
            raise ValueError(
                f"condition channels={channels}, but parts {', '.join(self.parts)} with {self.part_channels} "
                f"channels and {len(self.parts)} presence planes make {expected}"
            )
        self.channels = expected
        # the shapes dataset hands ground-truth extractors the drawn scene (conditions.shapes_truth)
        self.reads_scene = any(getattr(self.parts[name], "reads_scene", False) for name in self.use)

    def settings(self) -> dict:
        return {"name": self.name, "use": list(self.use), "parts": {n: p.settings() for n, p in self.parts.items()}}

    def part_slices(self) -> dict[str, slice]:
        """Part name -> its channels in the stacked map (presence planes excluded)."""
        return part_slices(dict(zip(self.parts, self.part_channels)))

    def stack(self, part_maps: Mapping[str, np.ndarray], shape: tuple[int, int]) -> np.ndarray:
        """Used parts' HxWxC_k uint8 maps -> the HxWxchannels uint8 multi map (zeros for parts not used)."""
        layout = dict(zip(self.parts, self.part_channels))
        return stack_parts({name: part_maps[name] for name in self.use}, layout, shape)

    def extract(self, image: np.ndarray) -> np.ndarray:
        """Image parts only (a ground-truth part reads the scene: ``from_scene``)."""
        return self.stack({name: self.parts[name].process(image) for name in self.use}, image.shape[:2])

    def from_scene(self, scene) -> torch.Tensor:
        """(channels, H, W) float32 in [0, 1] for a drawn ``shapes`` scene: ground-truth parts read the scene,
        image parts its pixels."""
        maps = {}
        for name in self.use:
            part = self.parts[name]
            if getattr(part, "reads_scene", False):
                maps[name] = part.scene_map(scene)
            else:
                maps[name] = part.process(scene.image)
        return _to_chw_float(self.stack(maps, scene.image.shape[:2]))

    def split(self, condition_map: np.ndarray) -> dict[str, np.ndarray]:
        """A multi map HxWxchannels -> the maps of the parts it gives (presence plane set), each HxWxC_k."""
        presence_start = sum(self.part_channels)
        return {
            name: condition_map[:, :, where]
            for index, (name, where) in enumerate(self.part_slices().items())
            if condition_map[:, :, presence_start + index].max() > 127
        }


def part_slices(layout: Mapping[str, int]) -> dict[str, slice]:
    """{part name: channels}, in layout order -> part name -> its channels in the stacked map."""
    slices, start = {}, 0
    for name, count in layout.items():
        slices[name] = slice(start, start + count)
        start += count
    return slices


def stack_parts(part_maps: Mapping[str, np.ndarray], layout: Mapping[str, int], shape: tuple[int, int]) -> np.ndarray:
    """The given parts' HxWxC uint8 maps -> the HxWx(sum(C) + K) uint8 stacked map of ``layout`` ({part name:
    channels}, in order): each given part's map in its channels (a grey map fills them, a wider one gives its first
    channels) with its presence plane at 255; zeros for the parts not given."""
    unknown = sorted(set(part_maps) - set(layout))
    if unknown:
        raise ValueError(f"unknown part(s) {unknown}; this multi condition has: {', '.join(layout)}")
    stacked = np.zeros((*shape, sum(layout.values()) + len(layout)), dtype=np.uint8)
    presence_start = sum(layout.values())
    for index, (name, where) in enumerate(part_slices(layout).items()):
        if name in part_maps:
            part = part_maps[name] if part_maps[name].ndim == 3 else part_maps[name][:, :, None]
            count = where.stop - where.start
            stacked[:, :, where] = part[:, :, :count] if part.shape[2] >= count else part[:, :, :1]
            stacked[:, :, presence_start + index] = 255
    return stacked
