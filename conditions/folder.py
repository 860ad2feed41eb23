"""A condition map (PNG) for every image under a folder, with a manifest, resumable (``ctrlkit extract``'s core).

Layout of the output folder: the input's relative paths with a ``.png`` suffix, plus ``manifest.jsonl``, one JSON
object per finished image: ``{"source": <path relative to input>, "condition": <path relative to output>,
"extractor": <name and settings>}``. A line is appended only after its PNG is completely written (write to a temporary
name, then rename), so after an interruption the manifest lists exactly the finished images and a rerun skips them.

A grounding extractor (``condition=detected_boxes``) writes a JSON record per image instead of a PNG (``.json``
suffix: ``{"file_name", "boxes" (normalised xyxy), "phrases", ...}``), and at the end of every run
``grounding.jsonl`` gathers all finished records in the JSON-lines layout ``conditions.read_grounding`` reads.
"""

from __future__ import annotations

import json
import multiprocessing
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from conditions.base import ConditionExtractor
from conditions.io import MAX_IMAGE_PIXELS, ImageDecodeError, check_writable_dir, read_image, write_atomically


class ExtractionError(ValueError):
    """The folders or settings of an extraction are wrong (folders nested, a manifest of other settings); one line."""


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
MANIFEST = "manifest.jsonl"
GROUNDING_INDEX = "grounding.jsonl"


@dataclass
class ExtractReport:
    """What one ``extract_folder`` call did: counts, and the unreadable files with the reason."""

    written: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)


def find_images(input_dir: Path) -> list[Path]:
    """Image files under ``input_dir`` (recursive, by suffix, case-insensitive), as sorted relative paths."""
    return sorted(p.relative_to(input_dir) for p in input_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def condition_paths(sources: list[Path], suffix: str = ".png") -> dict[Path, Path]:
    """Source -> condition path relative to the output: ``a/b.jpg`` -> ``a/b.png``; when two sources would share a
    name (``b.jpg`` and ``b.png``), both keep their suffix: ``a/b.jpg.png``, ``a/b.png.png``."""
    plain = {source: source.with_suffix(suffix) for source in sources}
    counts: dict[Path, int] = {}
    for target in plain.values():
        counts[target] = counts.get(target, 0) + 1
    return {s: (t if counts[t] == 1 else s.with_name(s.name + suffix)) for s, t in plain.items()}


def check_folders(input_dir: Path, output_dir: Path) -> None:
    if not input_dir.is_dir():
        raise ExtractionError(f"input folder not found: {input_dir}")
    if output_dir == input_dir or input_dir in output_dir.parents:
        raise ExtractionError(
            f"output {output_dir} is inside the input folder {input_dir}; choose a folder outside it"
        )
    if output_dir in input_dir.parents:
        # maps go to output/<path relative to input>, which can land inside input (output/in/x.jpg -> output/in/x.png)
        raise ExtractionError(f"input {input_dir} is inside the output folder {output_dir}; choose folders apart")


def read_manifest(output_dir: Path, settings: dict) -> dict[str, dict]:
    """Finished entries of an earlier run, by source. A truncated last line (the run was killed while writing it) is
    dropped and its image redone; entries written with other extractor settings are refused."""
    path = output_dir / MANIFEST
    if not path.is_file():
        return {}
    lines = path.read_text().splitlines()
    done = {}
    for number, line in enumerate(lines, start=1):
        try:
            entry = json.loads(line)
            source, condition, extractor = entry["source"], entry["condition"], entry["extractor"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            if number == len(lines):
                break  # interrupted mid-write: redo that image
            raise ExtractionError(
                f"{path} line {number} is not a manifest entry ({error}); remove the file"
            ) from error
        if extractor != settings:
            raise ExtractionError(
                f"{output_dir} holds maps made with other settings ({extractor}, now {settings}); "
                "use another output folder"
            )
        if (output_dir / condition).is_file():
            done[source] = entry
    # Rewrite without a truncated tail, so appended lines start on a line of their own.
    path.write_text("".join(json.dumps(entry) + "\n" for entry in done.values()))
    return done


def write_map(path: Path, condition_map: np.ndarray) -> None:
    """Write an HxWx(1|3) uint8 map as PNG, atomically (temporary name, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = condition_map[:, :, 0] if condition_map.shape[2] == 1 else cv2.cvtColor(condition_map, cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"cannot encode the map for {path}")
    write_atomically(path, encoded.tobytes())


def write_record(path: Path, source: str, record) -> None:
    """Write a grounding record (``to_json()``) as JSON, with its source image as ``file_name``, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps({"file_name": source, **record.to_json()}).encode())


def write_grounding_index(output_dir: Path, sources: list[str], conditions: dict[str, str]) -> None:
    """``grounding.jsonl``: the finished records of ``sources`` (in that order), one JSON line each."""
    lines = [(output_dir / conditions[source]).read_text() + "\n" for source in sources if source in conditions]
    write_atomically(output_dir / GROUNDING_INDEX, "".join(lines).encode())


# A worker process keeps its own extractor (set once by the pool initializer).
_WORKER_EXTRACTOR: ConditionExtractor | None = None


def _init_worker(extractor: ConditionExtractor) -> None:
    global _WORKER_EXTRACTOR
    setup_worker_process()
    _WORKER_EXTRACTOR = extractor


def setup_worker_process() -> None:
    """One thread per worker process, and freed memory kept for reuse.

    The pool is the parallelism; nested threads only contend for the same cores. glibc returns freed blocks of
    maps this size (768 KiB) to the OS and faults fresh pages in for the next map; on a loaded VM those faults
    cost as much as the Canny itself (``benchmarks/canny_extraction.py --profile``: 0.75 ms of a 3.5 ms image for
    one 512x512x3 output), so workers keep their freed memory, bounded by their peak use.
    """
    cv2.setNumThreads(1)
    import torch

    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            libc = ctypes.CDLL("libc.so.6")
        except OSError:  # not glibc (e.g. musl): keep its defaults
            return
        m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's mallopt parameter numbers
        libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024)  # the largest glibc allows on 64-bit
        libc.mallopt(m_trim_threshold, 1024 * 1024 * 1024)


def _run_chunk(task: tuple[list[tuple[str, str]], str, str, int]) -> list[tuple[str, str, str | None]]:
    """Read, extract and write one chunk; returns (source, condition, error or None) per image."""
    jobs, input_dir, output_dir, max_pixels = task
    return process_chunk(_WORKER_EXTRACTOR, jobs, Path(input_dir), Path(output_dir), max_pixels)


def process_chunk(
    extractor: ConditionExtractor,
    jobs: list[tuple[str, str]],
    input_dir: Path,
    output_dir: Path,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> list[tuple[str, str, str | None]]:
    """Read, extract and write one chunk; an image that does not read (missing, corrupt, over ``max_pixels``) is
    reported in its result and the others are still written."""
    results, images, readable = [], [], []
    for source, condition in jobs:
        try:
            images.append(read_image(input_dir / source, max_pixels))
            readable.append((source, condition))
        except ImageDecodeError as error:
            results.append((source, condition, str(error)))
    if images:
        for (source, condition), result in zip(readable, extractor.process_batch(images)):
            if extractor.kind == "grounding":
                write_record(output_dir / condition, source, result)
            else:
                write_map(output_dir / condition, result)
            results.append((source, condition, None))
    return results


def _chunks(jobs: list[tuple[str, str]], size: int) -> Iterator[list[tuple[str, str]]]:
    for start in range(0, len(jobs), size):
        yield jobs[start : start + size]


def extract_folder(
    extractor: ConditionExtractor,
    input_dir: str | Path,
    output_dir: str | Path,
    num_workers: int = 2,
    chunk_size: int = 8,
    progress: bool = True,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
) -> ExtractReport:
    """Extract a map (or grounding record) for every image under ``input_dir`` into ``output_dir``; skip the ones
    already done.

    Args:
        extractor: an image-kind extractor, or a grounding one that reads pixels (``detected_boxes``).
        num_workers: worker processes (0 = in this process).
        chunk_size: images per task sent to a worker (a neural extractor batches same-sized images of a chunk).
        max_image_pixels: larger images (width x height, from the header) are reported unreadable, not decoded.
    """
    if getattr(extractor, "reads_scene", False):
        raise ExtractionError(f"condition '{extractor.name}' reads shapes scenes, not image files; pick e.g. canny")
    if getattr(extractor, "kind", "image") == "image" and extractor.channels > 4:
        raise ExtractionError(
            f"condition '{extractor.name}' makes {extractor.channels}-channel maps, which no image file holds; "
            "extract each of its parts as its own condition (e.g. condition=canny)"
        )
    if num_workers < 0 or chunk_size < 1 or max_image_pixels < 1:
        raise ExtractionError(
            f"num_workers must be >= 0, chunk_size >= 1 and max_image_pixels >= 1, got {num_workers}, {chunk_size}, "
            f"{max_image_pixels}"
        )
    input_dir, output_dir = Path(input_dir).resolve(), Path(output_dir).resolve()
    check_folders(input_dir, output_dir)
    check_writable_dir(output_dir, "output")
    settings = json.loads(json.dumps(extractor.settings()))  # as the manifest stores it (tuples -> lists)
    output_dir.mkdir(parents=True, exist_ok=True)
    done = read_manifest(output_dir, settings)
    sources = find_images(input_dir)
    targets = condition_paths(sources, ".json" if extractor.kind == "grounding" else ".png")
    jobs = [(str(s), str(targets[s])) for s in sources if str(s) not in done]
    report = ExtractReport(skipped=len(sources) - len(jobs))
    tasks = [(chunk, str(input_dir), str(output_dir), max_image_pixels) for chunk in _chunks(jobs, chunk_size)]
    with (
        open(output_dir / MANIFEST, "a") as manifest,
        tqdm(total=len(jobs), desc=f"extract {extractor.name}", unit="img", disable=not progress) as bar,
    ):
        if num_workers == 0:
            results = (process_chunk(extractor, chunk, input_dir, output_dir, max_image_pixels) for chunk, *_ in tasks)
            _collect(results, manifest, bar, report, settings)
        else:
            context = _pool_context()
            with context.Pool(num_workers, initializer=_init_worker, initargs=(extractor,)) as pool:
                _collect(pool.imap_unordered(_run_chunk, tasks), manifest, bar, report, settings)
    if extractor.kind == "grounding":
        finished = {e["source"]: e["condition"] for e in read_manifest(output_dir, settings).values()}
        write_grounding_index(output_dir, [str(source) for source in sources], finished)
    return report


def _pool_context() -> multiprocessing.context.BaseContext:
    """Worker processes forked from a clean server process where the platform has one: plain ``fork`` copies a
    parent whose OpenMP threads (torch) were running and the children can hang; ``spawn`` re-imports torch per
    worker. The server imports the extractors once, so each worker starts in milliseconds."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["conditions", "conditions.folder"])
    return context


def _collect(results, manifest, bar, report: ExtractReport, settings: dict) -> None:
    for chunk in results:
        for source, condition, error in chunk:
            if error is None:
                manifest.write(json.dumps({"source": source, "condition": condition, "extractor": settings}) + "\n")
                report.written += 1
            else:
                report.failed.append((source, error))
        manifest.flush()
        bar.update(len(chunk))


def format_report(report: ExtractReport, output_dir: str | Path, written: str = "maps") -> str:
    lines = [
        f"ctrlkit extract: {report.written} {written} written, {report.skipped} already done, "
        f"{len(report.failed)} unreadable; outputs in {output_dir}"
    ]
    lines += [f"  unreadable: {source} ({error})" for source, error in sorted(report.failed)]
    return "\n".join(lines)
