"""Condition extractors (image -> condition map or grounding record) and controllability metrics.

Pure numpy / OpenCV / torch: nothing here imports lightning, hydra or wandb, nor the ``adapters`` package.
"""

from conditions.base import ConditionExtractor, to_uint8_hwc
from conditions.boxes import (
    AnnotationError,
    GroundingRecord,
    ShapesBoxesExtractor,
    pad_grounding,
    read_grounding,
    shapes_grounding,
)
from conditions.canny import CannyExtractor
from conditions.depth import DepthExtractor
from conditions.detected_boxes import DetectedBoxes, DetectedBoxesExtractor
from conditions.hed import HEDExtractor
from conditions.io import ImageDecodeError, read_image
from conditions.pose import PoseExtractor
from conditions.resize import RESIZE_MODES, Resize
from conditions.seg import SegExtractor
from conditions.shapes_truth import ShapesTruthExtractor
from conditions.weights import UnsafeWeightsError, WeightsNotFoundError, load_state_dict_file

# Name -> extractor class. A Hydra config group (conf/condition/) picks one by ``_target_``; this table serves code
# that needs names outside Hydra (CLI listings, tests).
EXTRACTORS: dict[str, type[ConditionExtractor]] = {
    CannyExtractor.name: CannyExtractor,
    HEDExtractor.name: HEDExtractor,
    DepthExtractor.name: DepthExtractor,
    SegExtractor.name: SegExtractor,
    PoseExtractor.name: PoseExtractor,
    ShapesTruthExtractor.name: ShapesTruthExtractor,
    ShapesBoxesExtractor.name: ShapesBoxesExtractor,
    DetectedBoxesExtractor.name: DetectedBoxesExtractor,
}

__all__ = [
    "EXTRACTORS",
    "AnnotationError",
    "DepthExtractor",
    "DetectedBoxes",
    "DetectedBoxesExtractor",
    "GroundingRecord",
    "PoseExtractor",
    "SegExtractor",
    "ShapesBoxesExtractor",
    "pad_grounding",
    "read_grounding",
    "shapes_grounding",
    "CannyExtractor",
    "ConditionExtractor",
    "HEDExtractor",
    "ImageDecodeError",
    "RESIZE_MODES",
    "Resize",
    "ShapesTruthExtractor",
    "UnsafeWeightsError",
    "WeightsNotFoundError",
    "load_state_dict_file",
    "read_image",
    "to_uint8_hwc",
]
