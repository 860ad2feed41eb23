"""Canny extraction throughput: ours against controlnet_aux's ``CannyDetector`` on 512x512 photographs.

Run by hand:  python benchmarks/canny_extraction.py [--images 64] [--repeats 10] [--workers 2]
Both produce the same 512x512x3 uint8 map (checked image by image before timing). Prints images/s, best of
``--repeats`` passes over the images, for:
  (a) CannyDetector()(image, 100, 200, detect_resolution=512, image_resolution=512), one process;
  (b) CannyExtractor().process(image), one process;
  (c) (b) in a worker pool of ``--workers`` processes (the pool ``ctrlkit extract`` uses); the workers hold the
      images and keep the maps, as extract's workers read and write files; and, for comparison, (a) in that pool.
OpenCV and torch run one thread per process, so the pool is the only parallelism (shared/reference/performance.md).
"""

import argparse
import time

import cv2
import numpy as np
import torch
from skimage import data

from conditions import CannyExtractor
from lightning_modules.extract import _pool_context

SIZE = 512


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


def _one_thread() -> None:
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def interleaved_images_per_second(functions, images: list[np.ndarray], repeats: int) -> list[float]:
    """Best pass of each function, passes interleaved (a, b, a, b, ...) so load drift on the shared machine hits
    both alike."""
    for function in functions:
        function(images[0])  # warm-up: imports, buffers
    best = [float("inf")] * len(functions)
    for _ in range(repeats):
        for index, function in enumerate(functions):
            start = time.perf_counter()
            for image in images:
                function(image)
            best[index] = min(best[index], time.perf_counter() - start)
    return [len(images) / seconds for seconds in best]


# Pool workers make the images themselves (same seed) and keep the maps, as ctrlkit extract's workers read and
# write files: only indices and a checksum cross the pipe, not 768 KiB arrays each way.
_IMAGES: list[np.ndarray] = []


def _init_pool_worker(count: int) -> None:
    _one_thread()
    _IMAGES.extend(photographs(count))


def _ours_by_index(index: int) -> int:
    return int(ours(_IMAGES[index])[::97, ::89].sum())


def _reference_by_index(index: int) -> int:
    return int(reference(_IMAGES[index])[::97, ::89].sum())


def pool_images_per_second(function, count: int, repeats: int, workers: int) -> float:
    with _pool_context().Pool(workers, initializer=_init_pool_worker, initargs=(count,)) as pool:
        pool.map(function, range(count), chunksize=8)  # warm-up every worker
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            pool.map(function, range(count), chunksize=8)
            best = min(best, time.perf_counter() - start)
    return count / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    _one_thread()
    images = photographs(args.images)
    for image in images:
        if not np.array_equal(reference(image), ours(image)):
            raise SystemExit("outputs differ: the comparison is void")
    print(f"{args.images} images {SIZE}x{SIZE}, outputs identical; best of {args.repeats} passes; 1 thread/process")
    ref, single = interleaved_images_per_second([reference, ours], images, args.repeats)
    pooled = pool_images_per_second(_ours_by_index, args.images, args.repeats, args.workers)
    ref_pooled = pool_images_per_second(_reference_by_index, args.images, args.repeats, args.workers)
    print(f"(a) controlnet_aux CannyDetector, 1 process : {ref:8.1f} img/s")
    print(f"(b) ctrlkit CannyExtractor, 1 process        : {single:8.1f} img/s  ({single / ref:.2f}x a)")
    print(f"(c) ctrlkit, pool of {args.workers} workers             : {pooled:8.1f} img/s  ({pooled / ref:.2f}x a)")
    print(f"    controlnet_aux, pool of {args.workers} workers      : {ref_pooled:8.1f} img/s  (for comparison)")


if __name__ == "__main__":
    main()
