"""One ControlNet for several conditions at once (Uni-ControlNet, Zhao et al. 2023; ControlNet-Union style).

The condition is the stacked map of ``conditions.multi``: each part's channels, then one presence plane per part
(1 where the part is given). The ControlNet's hint encoder takes all of it, so a constant presence plane becomes,
behind its first convolution, a learned vector per part: the condition-type embedding. In training each item keeps
a random subset of its parts (``keep_probability`` each, never none): dropped parts get zero maps and zero presence,
exactly what inference without them looks like, so any subset works at inference. The weights are a plain
diffusers ``ControlNetModel`` whose ``conditioning_channels`` is the stacked map's; ``multi_condition.json`` names
the parts.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from adapters.base import AdapterFormatError, load_diffusers_folder
from adapters.controlnet import ControlNetAdapter

PARTS_NAME = "multi_condition.json"


def _rand(generator, batch_size: int) -> torch.Tensor:
    """(B,) uniform in [0, 1): from one generator, or one number from each row's generator (``system.draws=item``:
    an item draws its subset from its own generator, whatever batch carries it)."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.rand(batch_size, generator=generator)
    return torch.cat([torch.rand(1, generator=row) for row in generator])


class MultiConditionControlNetAdapter(ControlNetAdapter):
    """A ControlNet over a stacked multi-condition map, trained with random subsets of its parts.

    Args:
        controlnet: the diffusers model; its ``conditioning_channels`` = sum(part_channels) + len(part_names).
        part_names: the parts in layout order (``conf/condition/multi.yaml``'s ``parts``).
        part_channels: channels of each part's map.
        keep_probability: in training, the chance each part of an item is kept; an item that would keep none keeps
            all (with 3 parts at 0.5: the full set 1/4 of the time, each single part 1/8, each pair 1/8).
        single_probability: in training, the chance an item keeps exactly one of its given parts (each alike)
            instead of a ``keep_probability`` subset. A part that says less than another (canny edges beside a
            mask) is otherwise learned mostly beside it, where the model can ignore it; single-part items make each
            part work alone. 0 draws nothing extra (the random stream of runs without it is unchanged).
        single_weights: relative chance of each part (in ``part_names`` order) to be the one a single-part item
            keeps, among the parts it was given; ``None`` = each alike. Weighting the part hardest to follow alone
            (canny edges) gives it single-part items without taking them from the full set.
    """

    family = "controlnet_multi"
    title = "multi-condition ControlNet"

    def __init__(
        self,
        controlnet: ControlNetModel,
        part_names: list[str],
        part_channels: list[int],
        keep_probability: float = 0.5,
        single_probability: float = 0.0,
        single_weights: list[float] | None = None,
    ) -> None:
        super().__init__(controlnet)
        if len(part_names) != len(part_channels) or not part_names:
            raise ValueError(f"part_names {part_names} and part_channels {part_channels} must pair up, at least one")
        expected = sum(part_channels) + len(part_names)
        if controlnet.config.conditioning_channels != expected:
            raise ValueError(
                f"a multi-condition ControlNet over parts {part_names} ({part_channels} channels + presence planes) "
                f"takes {expected} channels; the ControlNet takes {controlnet.config.conditioning_channels}"
            )
        if not 0.0 < keep_probability <= 1.0:
            raise ValueError(f"keep_probability must be in (0, 1], got {keep_probability}")
        if not 0.0 <= single_probability <= 1.0:
            raise ValueError(f"single_probability must be in [0, 1], got {single_probability}")
        if single_weights is not None and (len(single_weights) != len(part_names) or min(single_weights) <= 0):
            raise ValueError(
                f"single_weights must give one positive weight per part of {part_names}, got {list(single_weights)}"
            )
        self.part_names = list(part_names)
        self.part_channels = list(part_channels)
        self.keep_probability = keep_probability
        self.single_probability = single_probability
        self.single_weights = [1.0] * len(part_names) if single_weights is None else [float(w) for w in single_weights]

    @classmethod
    def from_unet(
        cls,
        unet: UNet2DConditionModel,
        *,
        vae_scale_factor: int = 8,
        part_names: list[str] | None = None,
        part_channels: list[int] | None = None,
        keep_probability: float = 0.5,
        single_probability: float = 0.0,
        single_weights: list[float] | None = None,
        conditioning_embedding_out_channels: tuple[int, ...] | None = None,
    ) -> MultiConditionControlNetAdapter:
        """A ControlNet copied from ``unet`` (zero convolutions) taking the stacked map of ``part_names``."""
        if not part_names or not part_channels:
            raise ValueError(
                "the multi-condition ControlNet needs a condition with parts: use condition=multi "
                "(conf/condition/multi.yaml), or give part_names and part_channels"
            )
        plain = ControlNetAdapter.from_unet(
            unet,
            vae_scale_factor=vae_scale_factor,
            conditioning_channels=sum(part_channels) + len(part_names),
            conditioning_embedding_out_channels=conditioning_embedding_out_channels,
        )
        parts = (list(part_names), list(part_channels))
        return cls(plain.controlnet, *parts, keep_probability, single_probability, single_weights)

    def part_mask(self, kept: torch.Tensor) -> torch.Tensor:
        """(B, K) bool parts kept -> (B, channels) float: 1 on the kept parts' channels and presence planes."""
        repeats = torch.tensor(self.part_channels, device=kept.device)
        maps = torch.repeat_interleave(kept, repeats, dim=1)
        return torch.cat([maps, kept], dim=1).float()

    def training_condition(self, condition: torch.Tensor, generator) -> torch.Tensor:
        """``condition`` (B, channels, H, W) with a random subset of each item's parts (the others zeroed, maps and
        presence), drawn from the step's ``generator`` (one or one per item)."""
        batch = condition.shape[0]
        drawn = torch.stack([_rand(generator, batch) < self.keep_probability for _ in self.part_names], dim=1)
        given = (condition[:, sum(self.part_channels) :] > 0.5).flatten(2).any(dim=2).cpu()  # parts the data gave
        kept = drawn & given
        empty = ~kept.any(dim=1)
        kept[empty] = given[empty]  # an item never loses all its parts here (condition dropout does that)
        if self.single_probability > 0:
            single = (_rand(generator, batch) < self.single_probability) & given.any(dim=1)
            # one of the item's given parts, by weight: the first whose cumulative weight passes u * total (with
            # equal weights the k-th given part, k uniform over how many the item has)
            cumulative = (given.float() * torch.tensor(self.single_weights)).cumsum(dim=1)
            threshold = _rand(generator, batch)[:, None] * cumulative[:, -1:]
            # cumulative only grows, so the parts past the threshold are a tail; its head is a part with weight > 0,
            # that is a given one
            one = (cumulative > threshold).long().cumsum(dim=1) == 1
            kept[single] = one[single]
        mask = self.part_mask(kept.to(condition.device))
        return condition * mask.to(condition.dtype)[:, :, None, None]

    def save_weights(self, directory: Path) -> None:
        super().save_weights(directory)
        parts = {"part_names": self.part_names, "part_channels": self.part_channels}
        (directory / PARTS_NAME).write_text(json.dumps(parts, indent=2) + "\n")

    @classmethod
    def recognizes(cls, path: Path) -> bool:
        return path.is_dir() and (path / PARTS_NAME).is_file()

    @classmethod
    def from_pretrained(cls, path: str | Path, unet: UNet2DConditionModel | None = None) -> ControlNetAdapter:
        """A folder written by ``save_pretrained``: the diffusers ControlNet and ``multi_condition.json``."""
        path = Path(path)
        parts_file = path / PARTS_NAME
        if not parts_file.is_file():
            raise AdapterFormatError(f"{path} has no {PARTS_NAME}: it is not a multi-condition ControlNet folder")
        parts = json.loads(parts_file.read_text())
        adapter = cls(load_diffusers_folder(ControlNetModel, path), parts["part_names"], parts["part_channels"])
        adapter.source_format = "diffusers folder + parts"
        return adapter
