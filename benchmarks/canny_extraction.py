"""Canny extraction throughput: ours against controlnet_aux's ``CannyDetector`` on 512x512 photographs.

Run by hand:  python benchmarks/canny_extraction.py [--images 64] [--repeats 30] [--batch 16] [--workers 2] [--profile]

Both produce the same 512x512x3 uint8 map (checked image by image before timing). Every comparison runs in this
one process with its passes interleaved (a, b, a, b, ...) so load drift on a shared machine hits both sides alike;
it prints images/s from the median pass and the median of the per-round ratios (ours / theirs), and whether that
ratio meets 3x. torch runs one thread throughout. The comparisons, like with like:

  1. one thread each (``cv2.setNumThreads(1)``): ``CannyDetector()(image, 100, 200, detect_resolution=512,
     image_resolution=512)`` per image against ``CannyExtractor().process(image)`` per image;
  2. one process, all cores, as a user calls each: theirs per image with OpenCV's default thread count (OpenCV
     parallelises inside ``cv2.Canny``), ours ``CannyExtractor(threads=<cores>).process_batch(batch)`` (a batch
     spread over a thread pool; OpenCV and numpy release the GIL);
  3. a pool of ``--workers`` processes set up as ``ctrlkit extract``'s workers are (one thread, freed memory kept
     for reuse) running each extractor; the workers hold the images and keep the maps, as extract's workers read
     and write files.
"""

import argparse
import os
import statistics
import time
from collections.abc import Callable

import cv2
import numpy as np
import torch
from skimage import data

from conditions import CannyExtractor
from conditions.folder import _pool_context, setup_worker_process

SIZE = 512
TARGET = 3.0


def photographs(count: int) -> list[np.ndarray]:
    """``count`` 512x512 crops of scikit-image's photographs, each upscaled from a random 256x256 window."""
    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    rng = np.random.default_rng(0)
    images = []
    for index in range(count):
        photo = photos[index % len(photos)]
        top, left = (int(rng.integers(0, side - 256)) for side in photo.shape[:2])
        images.append(cv2.resize(photo[top : top + 256, left : left + 256], (SIZE, SIZE), cv2.INTER_CUBIC))
    return images


def reference(image: np.ndarray) -> np.ndarray:
    from controlnet_aux import CannyDetector

    return CannyDetector()(image, 100, 200, detect_resolution=SIZE, image_resolution=SIZE)


_OURS = CannyExtractor()


def ours(image: np.ndarray) -> np.ndarray:
    return _OURS.process(image)


def interleaved(passes: list[Callable[[], object]], repeats: int) -> list[list[float]]:
    """Seconds of each pass in each of ``repeats`` rounds, the passes run in turn within a round."""
    for run_pass in passes:
        run_pass()  # warm-up: imports, buffers, thread pools
    seconds: list[list[float]] = [[] for _ in passes]
    for _ in range(repeats):
        for index, run_pass in enumerate(passes):
            start = time.perf_counter()
            run_pass()
            seconds[index].append(time.perf_counter() - start)
    return seconds


def report(title: str, theirs_label: str, ours_label: str, count: int, seconds: list[list[float]]) -> float:
    """Print images/s (median pass) of both sides and the median per-round ratio; return that ratio."""
    theirs, mine = seconds
    ratio = statistics.median(t / o for t, o in zip(theirs, mine))
    print(title)
    print(f"   {theirs_label:44s} {count / statistics.median(theirs):8.1f} img/s")
    print(f"   {ours_label:44s} {count / statistics.median(mine):8.1f} img/s")
    verdict = "meets" if ratio >= TARGET else "does NOT meet"
    print(f"   ratio {ratio:.2f}x (median of {len(mine)} rounds; {verdict} {TARGET:.0f}x)")
    return ratio


def profile(images: list[np.ndarray], repeats: int) -> None:
    """Where one image's time goes, one thread, medians: both sides' cv2.Canny and what surrounds it."""
    from controlnet_aux.util import HWC3, resize_image

    from conditions.canny import CANNY_KERNEL

    numpy_path = CannyExtractor()
    numpy_path._kernel = "numpy"  # the fallback without a C compiler: same maps
    parts = {
        "theirs: whole CannyDetector call": lambda: [reference(i) for i in images],
        "theirs: cv2.Canny on the RGB image": lambda: [cv2.Canny(i, 100, 200) for i in images],
        "theirs: HWC3 + 2 resize_image + map resize": lambda: [
            cv2.resize(HWC3(resize_image(resize_image(HWC3(i), SIZE), SIZE)[:, :, 0]), (SIZE, SIZE)) for i in images
        ],
        "ours: whole process()": lambda: [ours(i) for i in images],
        "ours, numpy fallback: whole process()": lambda: [numpy_path.process(i) for i in images],
    }
    if CANNY_KERNEL is not None:
        _OURS.process(images[0])
        scratch = _OURS._buffers.kernel_scratch[1]
        out = np.empty((SIZE, SIZE, 3), np.uint8)
        kernel = CANNY_KERNEL[0]
        parts["ours: the C kernel alone, into a reused map"] = lambda: [
            kernel(i.ctypes.data, SIZE, SIZE, 100, 200, out.ctypes.data, 3, scratch.ctypes.data) for i in images
        ]
    seconds = interleaved(list(parts.values()), repeats)
    print("profile, 1 thread, ms per image (median):")
    for name, times in zip(parts, seconds):
        print(f"   {name:50s} {1000 * statistics.median(times) / len(images):6.3f}")


# Pool workers make the images themselves (same seed) and keep the maps, as ctrlkit extract's workers read and
# write files: only indices and a checksum cross the pipe, not 768 KiB arrays each way.
_IMAGES: list[np.ndarray] = []


def _init_pool_worker(count: int) -> None:
    setup_worker_process()  # what ctrlkit extract's workers do, for both extractors
    _IMAGES.extend(photographs(count))


def _ours_by_index(index: int) -> int:
    return int(ours(_IMAGES[index])[::97, ::89].sum())


def _reference_by_index(index: int) -> int:
    return int(reference(_IMAGES[index])[::97, ::89].sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30, help="rounds; figures are medians over them")
    parser.add_argument("--batch", type=int, default=16, help="images per process_batch call in comparison 2")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="only print where one image's time goes")
    args = parser.parse_args()
    torch.set_num_threads(1)
    default_threads = cv2.getNumThreads()
    cores = os.cpu_count() or 1
    images = photographs(args.images)
    for image in images:
        if not np.array_equal(reference(image), ours(image)):
            raise SystemExit("outputs differ: the comparison is void")
    print(
        f"{args.images} images {SIZE}x{SIZE}, outputs identical; {cores} cores, OpenCV {cv2.__version__} "
        f"(default {default_threads} threads), torch 1 thread; {args.repeats} rounds; "
        f"ctrlkit Canny kernel: {_OURS.kernel}"
    )
    ratios = {}

    cv2.setNumThreads(1)
    if args.profile:
        profile(images, args.repeats)
        return
    seconds = interleaved([lambda: [reference(i) for i in images], lambda: [ours(i) for i in images]], args.repeats)
    ratios["1 thread"] = report(
        "1. one thread each (cv2.setNumThreads(1))",
        "controlnet_aux CannyDetector, per image",
        "ctrlkit CannyExtractor.process, per image",
        args.images,
        seconds,
    )

    cv2.setNumThreads(default_threads)
    threaded = CannyExtractor(threads=cores)
    batches = [images[start : start + args.batch] for start in range(0, len(images), args.batch)]
    seconds = interleaved(
        [lambda: [reference(i) for i in images], lambda: [threaded.process_batch(b) for b in batches]], args.repeats
    )
    ratios["1 process"] = report(
        f"2. one process, {cores} cores, as a user calls each",
        f"controlnet_aux, per image, OpenCV {default_threads} threads",
        f"ctrlkit process_batch({args.batch} images), {cores} threads",
        args.images,
        seconds,
    )

    context = _pool_context()
    pool_args = {"initializer": _init_pool_worker, "initargs": (args.images,)}
    indices = range(args.images)
    with context.Pool(args.workers, **pool_args) as their_pool, context.Pool(args.workers, **pool_args) as our_pool:
        seconds = interleaved(
            [
                lambda: their_pool.map(_reference_by_index, indices, chunksize=8),
                lambda: our_pool.map(_ours_by_index, indices, chunksize=8),
            ],
            args.repeats,
        )
    ratios["pool"] = report(
        f"3. pool of {args.workers} worker processes, 1 thread each (ctrlkit extract's pool)",
        "controlnet_aux in the pool",
        "ctrlkit in the pool",
        args.images,
        seconds,
    )
    summary = ", ".join(f"{name} {ratio:.2f}x" for name, ratio in ratios.items())
    print(f"summary (target {TARGET:.0f}x): {summary}")


if __name__ == "__main__":
    main()
