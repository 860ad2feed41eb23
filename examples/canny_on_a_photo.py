"""Canny edges of a real photograph, identical to controlnet_aux's CannyDetector at the photo's own resolution.

Prints:  "astronaut 512x512: 1 channel map, edge fraction 0.xxx, identical to controlnet_aux: True"
Draws:   canny_astronaut.png (photo | edges) in the current directory.
"""

import numpy as np
from controlnet_aux import CannyDetector
from PIL import Image
from skimage import data

from conditions import CannyExtractor

photo = data.astronaut()
edges = CannyExtractor(low_threshold=100, high_threshold=200, channels=1)(photo)  # (1, H, W) float in [0, 1]
reference = CannyDetector()(photo, 100, 200, detect_resolution=512, image_resolution=512)
identical = np.array_equal((edges[0].numpy() * 255).astype(np.uint8), reference[:, :, 0])
print(
    f"astronaut {photo.shape[0]}x{photo.shape[1]}: 1 channel map, edge fraction {edges.mean():.3f}, "
    f"identical to controlnet_aux: {identical}"
)
edge_image = np.repeat((edges[0].numpy() * 255).astype(np.uint8)[:, :, None], 3, axis=2)
Image.fromarray(np.concatenate([photo, edge_image], axis=1)).save("canny_astronaut.png")
