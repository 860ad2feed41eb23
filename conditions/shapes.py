"""Procedural ``shapes`` scenes: coloured shapes on a coloured background, with exact ground truth.

Every scene is a pure function of a numpy ``Generator``, so a dataset index plus a seed reproduces it bit for bit.
The ground truth (per-object mask and box, caption) is what the drawing used, not an estimate; the controllability
metrics and the ground-truth condition extractors read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

# Well-separated RGB values, so a generated image can be segmented back by colour.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 50, 190),
    "orange": (245, 135, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Every word a shapes caption can use; the tiny model's tokenizer gives each one a single token.
VOCABULARY: tuple[str, ...] = ("a", "and", "on", "background", *COLOURS, *SHAPES)


@dataclass
class ShapeObject:
    """One drawn shape. ``box`` is normalised xyxy in [0, 1]; ``mask`` is HxW bool (pixels drawn, before occlusion)."""

    shape: str
    colour: str
    box: tuple[float, float, float, float]
    mask: np.ndarray = field(repr=False)

    @property
    def phrase(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class ShapeScene:
    """A rendered scene: HxWx3 uint8 ``image``, its ``caption``, the ``background`` colour name and the objects in
    drawing order (later objects occlude earlier ones)."""

    image: np.ndarray = field(repr=False)
    caption: str
    background: str
    objects: list[ShapeObject]

    @property
    def foreground_mask(self) -> np.ndarray:
        """HxW bool: pixels covered by any object."""
        mask = np.zeros(self.image.shape[:2], dtype=bool)
        for obj in self.objects:
            mask |= obj.mask
        return mask


def _draw(canvas: np.ndarray, shape: str, centre: tuple[int, int], radius: int, value) -> None:
    cx, cy = centre
    if shape == "circle":
        cv2.circle(canvas, (cx, cy), radius, value, thickness=-1, lineType=cv2.LINE_8)
        return
    if shape == "square":
        points = [
            (cx - radius, cy - radius),
            (cx + radius, cy - radius),
            (cx + radius, cy + radius),
            (cx - radius, cy + radius),
        ]
    elif shape == "triangle":
        points = [(cx, cy - radius), (cx + radius, cy + radius), (cx - radius, cy + radius)]
    else:
        raise ValueError(f"unknown shape '{shape}'; choose one of: {', '.join(SHAPES)}")
    cv2.fillPoly(canvas, [np.array(points, dtype=np.int32)], value, lineType=cv2.LINE_8)


def caption_for(objects: list[ShapeObject], background: str) -> str:
    """'a red circle on a blue background', or 'a red circle and a green square on a blue background'."""
    named = " and ".join(f"a {obj.phrase}" for obj in objects)
    return f"{named} on a {background} background"


def render_scene(
    rng: np.random.Generator,
    size: int = 64,
    num_objects: int | tuple[int, int] = 1,
    min_radius: float = 0.15,
    max_radius: float = 0.3,
) -> ShapeScene:
    """Draw one scene.

    Args:
        rng: the only source of randomness.
        size: image height and width in pixels.
        num_objects: a count, or an inclusive (low, high) range to draw it from.
        min_radius, max_radius: shape half-extent as a fraction of ``size``.
    """
    if isinstance(num_objects, int):
        count = num_objects
    else:
        count = int(rng.integers(num_objects[0], num_objects[1] + 1))
    if count < 1:
        raise ValueError(f"num_objects must be >= 1, got {num_objects}")
    colour_names = list(COLOURS)
    background = colour_names[rng.integers(len(colour_names))]
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = COLOURS[background]
    objects = []
    for _ in range(count):
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = rng.choice([c for c in colour_names if c != background])
        radius = max(2, int(round(size * rng.uniform(min_radius, max_radius))))
        cx, cy = (int(v) for v in rng.integers(radius, size - radius, size=2))
        mask = np.zeros((size, size), dtype=np.uint8)
        _draw(mask, shape, (cx, cy), radius, 1)
        _draw(image, shape, (cx, cy), radius, COLOURS[str(colour)])
        ys, xs = np.nonzero(mask)
        box = (xs.min() / size, ys.min() / size, (xs.max() + 1) / size, (ys.max() + 1) / size)
        objects.append(ShapeObject(shape=shape, colour=str(colour), box=box, mask=mask.astype(bool)))
    return ShapeScene(image=image, caption=caption_for(objects, background), background=background, objects=objects)
