"""Canny edges (OpenCV), the condition of the original canny ControlNet."""

from __future__ import annotations

import ctypes
import math
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np

from conditions.base import ConditionExtractor
from conditions.resize import Resize


def _load_kernel():
    """``canny_edges`` of the compiled kernel (conditions/_canny_kernel.c, built by ``pip install``) and its scratch
    size function, or None when it was not compiled (no C compiler at install time): the OpenCV/numpy path gives the
    same maps."""
    try:
        from conditions import _canny_kernel
    except ImportError:
        return None
    library = ctypes.CDLL(_canny_kernel.__file__)
    edges, scratch_bytes = library.canny_edges, library.canny_scratch_bytes
    edges.argtypes = [ctypes.c_void_p] + [ctypes.c_int] * 4 + [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    edges.restype = None
    scratch_bytes.argtypes = [ctypes.c_int, ctypes.c_int]
    scratch_bytes.restype = ctypes.c_size_t
    return edges, scratch_bytes


CANNY_KERNEL = _load_kernel()


class CannyExtractor(ConditionExtractor):
    """Canny edge map, pixel-identical to controlnet_aux's ``CannyDetector`` at the input's own resolution.

    Like the reference annotator (lllyasviel/ControlNet ``annotator/canny``, controlnet_aux ``canny``) it finds the
    edges of the RGB image (at each pixel the gradient of the channel with the largest L1 gradient), not of a
    grayscale copy, so released canny ControlNets see the edges they were trained on. Unlike ``CannyDetector`` it
    never resizes unless ``resize`` asks (no rounding to multiples of 64).

    ``cv2.Canny`` on a 3-channel image runs a slow generic path (6.5x a grayscale Canny, performance.md §7). This
    class runs the whole of it (gradients, channel choice, non-maximum suppression, hysteresis, the HxWx``channels``
    map) in one row-by-row pass of a small compiled kernel (``_canny_kernel.c``, vectorised; ``kernel ==
    "compiled"``) or, where it was not built, computes the same per-pixel channel choice with OpenCV/numpy calls
    into reused buffers and gives ``cv2.Canny`` the chosen gradients (``kernel == "numpy"``); both are bit-identical
    to ``cv2.Canny`` on the RGB image (tests/conditions/test_conditions.py checks both).
    ``process_batch`` spreads a batch over ``threads`` threads (the kernel, OpenCV and numpy release the GIL).

    Args:
        low_threshold: hysteresis low threshold, 0..255 gradient units (controlnet_aux default 100).
        high_threshold: hysteresis high threshold (default 200); must be >= low_threshold.
        channels: 3 (edge map repeated to RGB, what released canny ControlNets and diffusers pipelines take) or 1.
        resize: detection resolution / output size (``conditions.resize.Resize`` or its fields); default: none.
        threads: threads a batch is spread over (1 = in the calling thread). Does not change the output, so it is
            not one of ``settings()``; keep 1 inside worker processes (``ctrlkit extract``'s pool).
    """

    name = "canny"
    kind = "image"

    def __init__(
        self,
        low_threshold: int = 100,
        high_threshold: int = 200,
        channels: int = 3,
        resize: Resize | dict | None = None,
        threads: int = 1,
    ) -> None:
        if not 0 <= low_threshold <= high_threshold:
            raise ValueError(
                "canny thresholds must satisfy 0 <= low_threshold <= high_threshold, "
                f"got {low_threshold}, {high_threshold}"
            )
        if channels not in (1, 3):
            raise ValueError(f"canny channels must be 1 or 3, got {channels}")
        if threads < 1:
            raise ValueError(f"canny threads must be >= 1, got {threads}")
        self.low_threshold = low_threshold
        self.high_threshold = high_threshold
        self.channels = channels
        self.resize = Resize.coerce(resize)
        self._threads = threads
        self._kernel = "compiled" if CANNY_KERNEL is not None else "numpy"  # same maps: not in settings()
        self._buffers = threading.local()  # per-thread scratch arrays: fresh allocations cost more than the maths
        self._executor: ThreadPoolExecutor | None = None  # started on the first batch that needs it

    @property
    def kernel(self) -> str:
        """ "compiled" (the C kernel was built at install) or "numpy" (OpenCV/numpy calls); the maps are the same."""
        return self._kernel

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        # Thread-local scratch space and a thread pool are neither picklable nor worth sending to a worker.
        del state["_buffers"], state["_executor"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._buffers = threading.local()
        self._executor = None

    def extract(self, image: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 RGB -> HxWx``channels`` uint8 edge map with values 0 or 255."""
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            # the C kernel reads H*W*3 bytes: anything else would be read out of bounds (process() converts)
            raise ValueError(f"extract takes an HxWx3 uint8 image, got {image.dtype} {image.shape}; use process()")
        if self._kernel == "compiled":
            return self._compiled(image)
        edges = self._edges(image)
        if self.channels == 3:
            return cv2.cvtColor(edges, cv2.COLOR_GRAY2RGB)
        return edges[:, :, None].copy()

    def _compiled(self, image: np.ndarray) -> np.ndarray:
        """The whole Canny in one call of the C kernel, written straight into the HxWx``channels`` map."""
        height, width = image.shape[:2]
        out = np.empty((height, width, self.channels), np.uint8)
        if out.size == 0:
            return out
        image = np.ascontiguousarray(image)
        scratch = getattr(self._buffers, "kernel_scratch", None)
        if scratch is None or scratch[0] != (height, width):  # reused while the size stays the same
            scratch = ((height, width), np.empty(CANNY_KERNEL[1](height, width), np.uint8))
            self._buffers.kernel_scratch = scratch
        # OpenCV floors the thresholds (L1 gradient); magnitudes are at most 2040, so clamping changes nothing.
        low, high = (min(math.floor(t), 1 << 20) for t in (self.low_threshold, self.high_threshold))
        CANNY_KERNEL[0](
            image.ctypes.data, height, width, low, high, out.ctypes.data, self.channels, scratch[1].ctypes.data
        )
        return out

    def extract_batch(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """HxWx3 uint8 images -> their maps, over ``threads`` threads when there is more than one image."""
        if self._threads == 1 or len(images) < 2:
            return [self.extract(image) for image in images]
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self._threads, thread_name_prefix="canny")
        return list(self._executor.map(self.extract, images))

    def _scratch(self, height: int, width: int) -> dict:
        """This thread's buffers for an image of ``height`` x ``width``, reused while the size stays the same.

        The three colour planes are stacked in one array, each with a padding row above and below, so one
        ``spatialGradient`` call and one numpy call per step serve all three channels.
        """
        scratch = getattr(self._buffers, "arrays", None)
        if scratch is None or scratch["size"] != (height, width):
            stacked = (3, height + 2, width)
            planes = np.empty(stacked, np.uint8)
            dx, dy, magnitude = (np.empty(stacked, np.int16) for _ in range(3))
            inner = slice(1, height + 1)  # the rows of the image inside each padded plane
            scratch = {
                "size": (height, width),
                "planes": planes,
                "plane_rows": [planes[c, inner] for c in range(3)],
                "dx": dx,
                "dy": dy,
                "magnitude": magnitude,
                "work": np.empty(stacked, np.int16),
                "dx_rows": [dx[c, inner] for c in range(3)],
                "dy_rows": [dy[c, inner] for c in range(3)],
                "magnitude_rows": [magnitude[c, inner] for c in range(3)],
                "larger": np.empty((height, width), np.int16),
                "larger1": np.empty((height, width), np.uint8),
                "larger2": np.empty((height, width), np.uint8),
            }
            self._buffers.arrays = scratch
        return scratch

    def _edges(self, image: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 -> HxW uint8 edges, equal to ``cv2.Canny(image, low, high)`` on the 3-channel image."""
        height, width = image.shape[:2]
        s = self._scratch(height, width)
        planes = s["planes"]
        cv2.split(image, s["plane_rows"])
        # OpenCV's multi-channel Canny: 3x3 Sobel with replicated borders per channel, L1 magnitude, and per pixel
        # the channel with the largest magnitude (the first one on ties). Replicating the first and last row into
        # each plane's padding rows makes one Sobel over the stacked planes equal three Sobels with
        # BORDER_REPLICATE (left and right borders are the stack's own).
        planes[:, 0] = planes[:, 1]
        planes[:, -1] = planes[:, -2]
        cv2.spatialGradient(
            planes.reshape(-1, width), s["dx"].reshape(-1, width), s["dy"].reshape(-1, width), 3, cv2.BORDER_REPLICATE
        )
        magnitude = np.abs(s["dx"], out=s["magnitude"])
        np.add(magnitude, np.abs(s["dy"], out=s["work"]), out=magnitude)
        magnitude0, magnitude1, magnitude2 = s["magnitude_rows"]
        cv2.compare(magnitude1, magnitude0, cv2.CMP_GT, dst=s["larger1"])
        cv2.max(magnitude0, magnitude1, dst=s["larger"])
        cv2.compare(magnitude2, s["larger"], cv2.CMP_GT, dst=s["larger2"])
        for gradient in (s["dx_rows"], s["dy_rows"]):
            cv2.copyTo(gradient[1], s["larger1"], gradient[0])
            cv2.copyTo(gradient[2], s["larger2"], gradient[0])
        return cv2.Canny(s["dx_rows"][0], s["dy_rows"][0], self.low_threshold, self.high_threshold)
