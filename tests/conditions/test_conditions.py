"""Condition extractors: Canny against controlnet_aux on real photographs, the extractor contract, image reading."""

from __future__ import annotations

import contextlib
import ctypes
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conditions import CannyExtractor, ImageDecodeError, read_image

skimage_data = pytest.importorskip("skimage.data")


def photographs() -> dict[str, np.ndarray]:
    """Real photos shipped with scikit-image, cropped to sides that are multiples of 64 (controlnet_aux resizes
    to multiples of 64, so only such sizes are compared at the input's own resolution)."""
    photos = {
        "astronaut": skimage_data.astronaut(),
        "coffee": skimage_data.coffee(),
        "chelsea": skimage_data.chelsea(),
        "rocket": skimage_data.rocket(),
    }
    return {
        name: np.ascontiguousarray(p[: p.shape[0] // 64 * 64, : p.shape[1] // 64 * 64]) for name, p in photos.items()
    }


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea", "rocket"])
@pytest.mark.parametrize(("low", "high"), [(100, 200), (50, 120)])
def test_canny_equals_controlnet_aux(name, low, high):
    from controlnet_aux import CannyDetector

    photo = photographs()[name]
    reference = CannyDetector()(
        photo,
        low_threshold=low,
        high_threshold=high,
        detect_resolution=min(photo.shape[:2]),
        image_resolution=min(photo.shape[:2]),
    )
    assert reference.shape == photo.shape
    ours = CannyExtractor(low, high)(photo)
    assert ours.shape == (3, *photo.shape[:2]) and ours.dtype == torch.float32
    np.testing.assert_array_equal((ours * 255).round().byte().permute(1, 2, 0).numpy(), reference)
    assert 0 < ours.mean() < 0.5


def test_canny_contract_shape_range_determinism():
    photo = photographs()["astronaut"][:100, :130]  # any size, no rounding to 64
    extractor = CannyExtractor(channels=1)
    edges = extractor(photo)
    assert edges.shape == (1, 100, 130)
    assert set(torch.unique(edges).tolist()) <= {0.0, 1.0}
    assert torch.equal(edges, extractor(photo))


def test_canny_batch_equals_single_images():
    photos = [photographs()["astronaut"][:64, :96], photographs()["coffee"][:64, :96]]
    batch = torch.stack([torch.from_numpy(p).permute(2, 0, 1) for p in photos])  # (B, 3, H, W) uint8
    extractor = CannyExtractor()
    maps = extractor(batch)
    assert maps.shape == (2, 3, 64, 96)
    for index, photo in enumerate(photos):
        assert torch.equal(maps[index], extractor(photo))
    assert torch.equal(extractor(batch.float() / 255), maps)


def canny_kernels() -> list[str]:
    """The paths to test: numpy always; where the C kernel was built (CI requires it) "compiled" (AVX2 where the
    CPU has it) and "compiled-scalar" (its portable steps, what a CPU without AVX2 runs)."""
    from conditions.canny import CANNY_KERNEL

    if CANNY_KERNEL is None and os.environ.get("CI"):
        raise AssertionError("conditions._canny_kernel was not compiled by pip install (setup.py)")
    return ["numpy"] + (["compiled", "compiled-scalar"] if CANNY_KERNEL is not None else [])


@contextlib.contextmanager
def canny_kernel(kernel: str):
    """Run the body with ``kernel`` (one of ``canny_kernels()``); yields a function making extractors that use it."""
    scalar_only = None
    if kernel.startswith("compiled"):
        from conditions import _canny_kernel

        scalar_only = ctypes.c_int.in_dll(ctypes.CDLL(_canny_kernel.__file__), "canny_scalar_only")
        scalar_only.value = kernel == "compiled-scalar"

    def make(*args, **kwargs) -> CannyExtractor:
        extractor = CannyExtractor(*args, **kwargs)
        extractor._kernel = kernel.removesuffix("-scalar")
        return extractor

    try:
        yield make
    finally:
        if scalar_only is not None:
            scalar_only.value = 0


@pytest.mark.parametrize("kernel", canny_kernels())
@pytest.mark.parametrize("size", [(1, 1), (1, 9), (9, 1), (2, 2), (3, 5), (100, 130), (257, 123)])
def test_canny_equals_opencv_multichannel_canny_at_any_size(size, kernel):
    """Our Canny (compiled kernel, or stacked-plane numpy gradients) equals OpenCV's 3-channel Canny (what
    CannyDetector calls) at odd sizes and borders too, on a photo crop and on pure noise (the worst case for ties
    between channels)."""
    import cv2

    height, width = size
    noise = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    with canny_kernel(kernel) as make:
        for image in (np.ascontiguousarray(photographs()["coffee"][:height, :width]), noise):
            for low, high in [(100, 200), (0, 0), (20, 40)]:
                ours = make(low, high, channels=1).process(image)[:, :, 0]
                np.testing.assert_array_equal(ours, cv2.Canny(image, low, high))


def test_canny_extract_refuses_what_the_kernel_cannot_read():
    extractor = CannyExtractor()
    for image in (np.zeros((8, 8), np.uint8), np.zeros((8, 8, 4), np.uint8), np.zeros((8, 8, 3), np.float32)):
        with pytest.raises(ValueError, match="extract takes an HxWx3 uint8 image"):
            extractor.extract(image)
    # process() converts grayscale and RGBA first
    assert extractor.process(np.zeros((8, 8), np.uint8)).shape == (8, 8, 3)
    assert extractor.process(np.zeros((8, 8, 4), np.uint8)).shape == (8, 8, 3)


@pytest.mark.parametrize("kernel", canny_kernels())
def test_canny_edge_cases_equal_opencv(kernel):
    """Widths around the kernel's 16-pixel blocks, images with no gradient or the largest one, equal, zero,
    fractional and unreachable thresholds (magnitudes are at most 2040), 1 and 3 channels: all equal cv2.Canny."""
    import cv2

    rng = np.random.default_rng(1)
    photo = photographs()["astronaut"]
    with canny_kernel(kernel) as make:
        for height, width in [(4, 15), (5, 16), (6, 17), (3, 18), (7, 31), (9, 32), (8, 33), (2, 47), (40, 50)]:
            stripes = np.zeros((height, width, 3), np.uint8)
            stripes[:, ::2] = 255  # the largest horizontal gradient, 1020 per channel
            step = np.zeros((height, width, 3), np.uint8)
            step[height // 2 :, width // 3 :] = (255, 0, 90)
            images = [
                rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
                np.ascontiguousarray(photo[100 : 100 + height, 200 : 200 + width]),
                np.zeros((height, width, 3), np.uint8),
                np.full((height, width, 3), 200, np.uint8),
                stripes,
                step,
            ]
            for image in images:
                for low, high in [(0, 0), (50, 50), (0, 1), (10.5, 30.9), (2039, 2039), (2040, 2040), (5000, 9000)]:
                    expected = cv2.Canny(image, low, high)
                    for channels in (1, 3):
                        ours = make(low, high, channels=channels).process(image)
                        assert ours.shape == (height, width, channels)
                        for channel in range(channels):
                            np.testing.assert_array_equal(ours[:, :, channel], expected)


def test_canny_threaded_batch_equals_one_thread():
    import pickle

    photo = photographs()["rocket"]
    images = [np.ascontiguousarray(photo[i * 40 : i * 40 + 64, : 96 + (i % 3)]) for i in range(7)]
    threaded = CannyExtractor(threads=2)
    expected = CannyExtractor().process_batch(images)
    for extractor in (threaded, pickle.loads(pickle.dumps(threaded))):  # a worker process gets a pickled copy
        for got, want in zip(extractor.process_batch(images), expected):
            np.testing.assert_array_equal(got, want)
    assert threaded.settings() == CannyExtractor().settings()  # threads do not change maps: not a manifest setting


def test_canny_accepts_gray_and_rgba():
    gray = photographs()["astronaut"][:64, :64, 0]
    assert CannyExtractor()(gray).shape == (3, 64, 64)
    rgba = np.dstack([photographs()["astronaut"][:64, :64], np.full((64, 64), 255, np.uint8)])
    assert torch.equal(CannyExtractor()(rgba), CannyExtractor()(rgba[:, :, :3]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"low_threshold": 200, "high_threshold": 100}, "thresholds"),
        ({"channels": 2}, "channels must be 1 or 3"),
        ({"threads": 0}, "threads must be >= 1"),
    ],
)
def test_canny_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CannyExtractor(**kwargs)


def test_extractor_rejects_non_images():
    with pytest.raises(ValueError, match="uint8"):
        CannyExtractor()(np.zeros((8, 8, 3), dtype=np.float32))


def test_read_image_round_trip_and_errors(tmp_path):
    photo = photographs()["chelsea"][:64, :64]
    Image.fromarray(photo).save(tmp_path / "cat.png")
    np.testing.assert_array_equal(read_image(tmp_path / "cat.png"), photo)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ImageDecodeError, match=r"cannot decode image .*broken\.jpg"):
        read_image(tmp_path / "broken.jpg")
    with pytest.raises(ImageDecodeError, match=r"image file not found: .*missing\.png"):
        read_image(tmp_path / "missing.png")
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)).save(tmp_path / "deep.png")
    deep = read_image(tmp_path / "deep.png")
    assert deep.shape == (64, 64, 3) and deep.dtype == np.uint8 and deep.max() == 255
