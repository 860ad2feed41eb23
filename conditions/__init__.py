"""Condition extractors (image -> condition map or grounding record) and controllability metrics.

Pure numpy / OpenCV / torch: nothing here imports lightning, hydra or wandb, nor the ``adapters`` package.
"""

from conditions.base import ConditionExtractor, to_uint8_hwc
from conditions.canny import CannyExtractor
from conditions.io import ImageDecodeError, read_image

# Name -> extractor class. A Hydra config group (conf/condition/) picks one by ``_target_``; this table serves code
# that needs names outside Hydra (CLI listings, tests).
EXTRACTORS: dict[str, type[ConditionExtractor]] = {
    CannyExtractor.name: CannyExtractor,
}

__all__ = [
    "EXTRACTORS",
    "CannyExtractor",
    "ConditionExtractor",
    "ImageDecodeError",
    "read_image",
    "to_uint8_hwc",
]
