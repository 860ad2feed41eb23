"""OpenPose body pose (controlnet_aux's network and ``body_pose_model.pth``): the rendered map and the keypoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from conditions.base import ConditionExtractor
from conditions.resize import Resize
from conditions.weights import load_state_dict_file, weights_file

# OpenPose COCO body order, the order of each person's 18 keypoints.
BODY_PARTS = (
    "nose", "neck", "right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow", "left_wrist",
    "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle", "right_eye", "left_eye",
    "right_ear", "left_ear",
)  # fmt: skip


# OpenPose's estimator scales an image's height to 184 px and its width alike, so a wide strip (1 x 700 px) becomes
# a 184 x 128,800 network input (minutes of CPU and gigabytes for one image) and a tall one (600 x 2 px) a width
# under one pixel (an OpenCV assertion). Images longer than this ratio either way are padded with black (below or
# to the right) up to it, detected there and mapped back: the same people, bounded work.
MAX_ASPECT = 4


def pad_to_aspect(image: np.ndarray) -> np.ndarray:
    """HxWx3 -> H'xW'x3, black rows below a wide image and columns right of a tall one, so that neither side is
    more than ``MAX_ASPECT`` times the other; the image itself when it already is."""
    height, width = image.shape[:2]
    padded_height, padded_width = max(height, -(-width // MAX_ASPECT)), max(width, -(-height // MAX_ASPECT))
    if (padded_height, padded_width) == (height, width):
        return image
    padded = np.zeros((padded_height, padded_width, *image.shape[2:]), dtype=image.dtype)
    padded[:height, :width] = image
    return padded


class PoseExtractor(ConditionExtractor):
    """OpenPose body skeletons drawn as controlnet_aux's ``OpenposeDetector`` draws them (body only), at the input's
    size; ``keypoints`` gives the detected people as normalised coordinates.

    Uses controlnet_aux's own ``Body`` estimator and drawing code, so the map equals ``OpenposeDetector`` for the
    same weights at the same resolution. The estimator takes one image at a time (its multi-scale search and
    peak grouping are per image), so a batch is a loop.

    Args:
        weights_dir: local folder holding ``filename`` (lllyasviel/Annotators ``body_pose_model.pth``).
        filename: the upstream checkpoint name.
        hub_id: download ``filename`` from this Hugging Face repo instead (only when given).
        device: torch device the network runs on.
        resize: detection resolution / output size (``conditions.resize.Resize`` or its fields); default: none.
    """

    name = "pose"
    kind = "image"

    def __init__(
        self,
        weights_dir: str | Path | None = None,
        filename: str = "body_pose_model.pth",
        hub_id: str | None = None,
        device: str = "cpu",
        resize: Resize | dict | None = None,
    ) -> None:
        path = weights_file(weights_dir, filename, "lllyasviel/Annotators", hub_id)
        from controlnet_aux.open_pose import OpenposeDetector, util
        from controlnet_aux.open_pose.body import Body
        from controlnet_aux.open_pose.model import bodypose_model

        # Body(path) would torch.load without weights_only on older torch; load the state dict safely here and
        # hand Body the network (util.transfer maps the upstream key names onto the module's).
        body = Body.__new__(Body)
        body.model = bodypose_model()
        state = load_state_dict_file(path)
        body.model.load_state_dict(util.transfer(body.model, state))
        body.model.eval().requires_grad_(False).to(device)
        self._detector = OpenposeDetector(body)
        self.weights = str(path)
        self.channels = 3
        self.device = device
        self.resize = Resize.coerce(resize)

    def keypoints(self, image: np.ndarray) -> list[list[tuple[float, float] | None]]:
        """HxWx3 uint8 RGB -> one list per person of 18 ``(x, y)`` in [0, 1] (``BODY_PARTS`` order), None where
        a part was not found."""
        padded = pad_to_aspect(image)
        # detect_poses normalises by the padded size; points in the padding (none expected on black) are dropped
        stretch_x, stretch_y = padded.shape[1] / image.shape[1], padded.shape[0] / image.shape[0]
        people = []
        for pose in self._detector.detect_poses(padded):
            points = [
                None if k is None else (float(k.x * stretch_x), float(k.y * stretch_y)) for k in pose.body.keypoints
            ]
            people.append([None if p is None or max(p) > 1 else p for p in points])
        return people

    def extract(self, image: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 RGB -> HxWx3 uint8 skeleton drawing on black."""
        from controlnet_aux.open_pose import draw_poses

        padded = pad_to_aspect(image)
        poses = self._detector.detect_poses(padded)
        drawing = draw_poses(poses, *padded.shape[:2], draw_body=True, draw_hand=False, draw_face=False)
        return drawing[: image.shape[0], : image.shape[1]]
