"""Fuzzing the inputs users actually have: random bytes, 1x1, grayscale, RGBA, 16-bit and extreme-aspect images go
through every extractor (neural ones with tiny random networks) and both file dataset loaders. Each must give a
correct result or a clear one-line error naming the file -- never a crash, never a hang (every call has a timeout)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conditions import (
    CannyExtractor,
    DepthExtractor,
    HEDExtractor,
    ImageDecodeError,
    PoseExtractor,
    SegExtractor,
    read_image,
)
from lightning_modules.data.files import FileDataModule
from lightning_modules.errors import USER_ERRORS, CtrlkitError

TIMEOUT_S = 30


def assert_clear_error(error: BaseException, *named: object) -> None:
    """``error`` is one ctrlkit reports as one line (``USER_ERRORS``: ``CtrlkitError`` and the packages' own error
    classes, not a bare ``ValueError`` from numpy, OpenCV or torch) and its one-line message names ``named``."""
    assert isinstance(error, USER_ERRORS), f"{type(error).__name__} is not one of ctrlkit's errors: {error!r}"
    message = str(error).strip()
    assert message and "\n" not in message, repr(error)
    missing = [str(value) for value in named if str(value) not in message]
    assert not missing, f"the message does not name {missing}: {message}"


def test_only_our_errors_naming_the_problem_are_clear():
    """The judge itself: a bare ValueError (numpy's broadcast error, say) or a message that does not name the
    offending value fails it."""
    with pytest.raises(AssertionError, match="not one of ctrlkit's errors"):
        assert_clear_error(ValueError("operands could not be broadcast together with shapes (1,700) (3,)"), 1, 700)
    with pytest.raises(AssertionError, match="does not name"):
        assert_clear_error(CtrlkitError("the image is too small"), 1, 700)
    assert_clear_error(CtrlkitError("the image is 1x700 px; extractors need at least 2x2"), 1, 700)


def within_timeout(function, *args):
    """``function(*args)`` in a thread; a call still running after ``TIMEOUT_S`` fails the test as a hang."""
    outcome: dict = {}

    def run():
        try:
            outcome["value"] = function(*args)
        except BaseException as error:  # noqa: BLE001 -- handed back to the test
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(TIMEOUT_S)
    assert not thread.is_alive(), f"{getattr(function, '__name__', function)} hung for {TIMEOUT_S} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def write_image(path: Path, kind: str, height: int, width: int, seed: int = 0) -> Path:
    """An image file of ``kind``: rgb, gray, rgba, 16bit (PNG ``I;16``), or junk (random bytes)."""
    rng = np.random.default_rng(seed)
    if kind == "junk":
        path.write_bytes(rng.integers(0, 256, size=height * width + 7, dtype=np.uint8).tobytes())
        return path
    shapes = {"rgb": (height, width, 3), "gray": (height, width), "rgba": (height, width, 4)}
    if kind == "16bit":
        Image.fromarray(rng.integers(0, 65536, size=(height, width), dtype=np.uint16)).save(path)
    else:
        Image.fromarray(rng.integers(0, 256, size=shapes[kind], dtype=np.uint8)).save(path)
    return path


EDGE_CASES = [
    ("junk", 8, 8),
    ("rgb", 1, 1),
    ("gray", 17, 23),
    ("rgba", 20, 12),
    ("16bit", 16, 16),
    ("rgb", 1, 700),  # huge aspect, both ways
    ("gray", 600, 2),
]


def check_extraction(extractor, path: Path) -> None:
    """Decode ``path`` and extract: either a (C, H, W) map in [0, 1] of the image's size, or a clear error."""
    try:
        image = within_timeout(read_image, path)
    except ImageDecodeError as error:
        assert_clear_error(error, path)
        return
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    try:
        condition = within_timeout(extractor, image)
    except Exception as error:  # noqa: BLE001 -- judged here: only a clear error naming the image's size passes
        assert_clear_error(error, *image.shape[:2])
        return
    assert condition.shape == (extractor.channels, *image.shape[:2])
    assert condition.dtype == torch.float32 and 0 <= condition.min() and condition.max() <= 1


@pytest.fixture(scope="module")
def neural_extractors(request):
    return {
        "hed": lambda: HEDExtractor(request.getfixturevalue("hed_weights_dir")),
        "depth": lambda: DepthExtractor(request.getfixturevalue("dpt_dir")),
        "seg": lambda: SegExtractor(request.getfixturevalue("segformer_dir")),
        "pose": lambda: PoseExtractor(weights_dir=request.getfixturevalue("openpose_weights_dir")),
    }


@pytest.mark.parametrize(
    "name", ["canny", "hed", "depth", "seg", pytest.param("pose", marks=pytest.mark.slow)]
)  # pose: a VGG-sized network, seconds per image on 2 cores
def test_every_extractor_survives_odd_images(neural_extractors, tmp_path, name):
    extractor = CannyExtractor() if name == "canny" else neural_extractors[name]()
    for index, (kind, height, width) in enumerate(EDGE_CASES):
        check_extraction(extractor, write_image(tmp_path / f"{index}_{kind}.png", kind, height, width, seed=index))


image_kinds = st.sampled_from(["rgb", "gray", "rgba", "16bit", "junk"])
sides = st.one_of(st.integers(1, 48), st.sampled_from([1, 2, 300]))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=image_kinds, height=sides, width=sides, seed=st.integers(0, 2**16))
def test_canny_fuzz(tmp_path, kind, height, width, seed):
    check_extraction(CannyExtractor(), write_image(tmp_path / "fuzz.png", kind, height, width, seed))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=256))
def test_random_bytes_are_a_clear_decode_error(tmp_path, data):
    path = tmp_path / "bytes.png"
    path.write_bytes(data)
    with pytest.raises(ImageDecodeError, match="cannot decode image .*bytes.png"):
        within_timeout(read_image, path)


@pytest.mark.parametrize("layout", ["fill50k", "imagefolder"])
@pytest.mark.parametrize("conditions", ["files", "extractor"])
def test_dataset_loaders_survive_odd_images(tmp_path, layout, conditions):
    """Every edge case as a training image (and condition map): good items load at the configured size, bad ones
    are skipped with a message naming their line; the loader itself never fails."""
    root = tmp_path / layout
    (root / "images").mkdir(parents=True)
    lines = []
    for index, (kind, height, width) in enumerate([*EDGE_CASES, ("rgb", 40, 40)]):
        image = write_image(root / "images" / f"{index}.png", kind, height, width, seed=index)
        names = {"image": f"images/{image.name}", "condition": f"images/{image.name}", "prompt": f"item {index}"}
        if layout == "fill50k":
            lines.append({"target": names["image"], "source": names["condition"], "prompt": names["prompt"]})
        else:
            lines.append(
                {"file_name": names["image"], "conditioning_image": names["condition"], "text": names["prompt"]}
            )
    index_name = "prompt.json" if layout == "fill50k" else "metadata.jsonl"
    (root / index_name).write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    datamodule = FileDataModule(
        str(root), CannyExtractor(), layout=layout, conditions=conditions, image_size=16, val_size=1, batch_size=1
    )
    batches = within_timeout(lambda: list(datamodule.train_dataloader()))
    skipped = [message for batch in batches for message in batch["skipped"]]
    good = sum(len(batch["prompt"]) for batch in batches if "prompt" in batch)
    assert good + len(skipped) == len(EDGE_CASES)  # every item accounted for
    assert len(skipped) == 1 and "line 1" in skipped[0]  # only the junk file is bad
    for batch in batches:
        if "pixel_values" in batch:
            assert batch["pixel_values"].shape[1:] == (3, 16, 16) and batch["condition"].shape[1:] == (3, 16, 16)
            assert torch.isfinite(batch["pixel_values"]).all()
