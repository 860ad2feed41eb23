"""Write a fill50k-style dataset of circles (any count, any size), in the ``fill50k`` or ``imagefolder`` layout.

Like lllyasviel/ControlNet's Fill50K: the condition is a white circle outline on black, the image the same circle
filled with one named colour on a background of another, the prompt "<colour> circle with <colour> background".

    python -m conditions.circles <root> [count] [size] [layout]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np

# CSS colour names, written as words the way Fill50K's prompts spell them ("light coral", "burly wood").
COLOURS: dict[str, tuple[int, int, int]] = {
    "light coral": (240, 128, 128),
    "aqua": (0, 255, 255),
    "light pink": (255, 182, 193),
    "burly wood": (222, 184, 135),
    "orange": (255, 165, 0),
    "dark slate blue": (72, 61, 139),
    "white": (255, 255, 255),
    "forest green": (34, 139, 34),
    "gold": (255, 215, 0),
    "medium purple": (147, 112, 219),
    "crimson": (220, 20, 60),
    "navy": (0, 0, 128),
}
LAYOUTS = ("fill50k", "imagefolder")


def write_circles(root: str | Path, count: int, size: int = 512, seed: int = 0, layout: str = "fill50k") -> Path:
    """Write ``count`` (condition, image, prompt) triples of ``size`` x ``size`` PNGs under ``root``; returns root.

    ``fill50k``: ``source/i.png``, ``target/i.png``, ``prompt.json`` (JSON lines with source, target, prompt).
    ``imagefolder``: ``conditioning_images/i.png``, ``images/i.png``, ``metadata.jsonl`` (file_name, text,
    conditioning_image).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout '{layout}'; choose one of: {', '.join(LAYOUTS)}")
    if count < 1 or size < 8:
        raise ValueError(f"need count >= 1 and size >= 8, got {count}, {size}")
    root = Path(root)
    condition_dir, image_dir, index_name = (
        ("source", "target", "prompt.json")
        if layout == "fill50k"
        else ("conditioning_images", "images", "metadata.jsonl")
    )
    (root / condition_dir).mkdir(parents=True, exist_ok=True)
    (root / image_dir).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    lines = []
    for index in range(count):
        fill, background = rng.choice(len(names), size=2, replace=False)
        radius = int(rng.integers(max(2, size // 16), max(3, size // 4)))
        centre = tuple(int(v) for v in rng.integers(radius, size - radius, size=2))
        outline = np.zeros((size, size, 3), np.uint8)
        cv2.circle(outline, centre, radius, (255, 255, 255), thickness=max(1, size // 128))
        image = np.empty((size, size, 3), np.uint8)
        image[:] = COLOURS[names[background]]
        cv2.circle(image, centre, radius, COLOURS[names[fill]], thickness=-1)
        condition_file, image_file = f"{condition_dir}/{index}.png", f"{image_dir}/{index}.png"
        cv2.imwrite(str(root / condition_file), outline)
        cv2.imwrite(str(root / image_file), image[:, :, ::-1])  # RGB -> OpenCV's BGR
        prompt = f"{names[fill]} circle with {names[background]} background"
        if layout == "fill50k":
            lines.append({"source": condition_file, "target": image_file, "prompt": prompt})
        else:
            lines.append({"file_name": image_file, "text": prompt, "conditioning_image": condition_file})
    (root / index_name).write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0)
    out = write_circles(args[0], *(int(a) for a in args[1:3]), layout=args[3] if len(args) > 3 else "fill50k")
    print(f"wrote {out}")
