"""``ctrlkit shards``: a dataset as tar shards for ``data=webdataset`` (layout: ``data/shard_format.py``).

Sources: ``imagefolder`` (``metadata.jsonl``), ``fill50k`` (``prompt.json``), ``extract`` (a ``ctrlkit extract``
output folder, with the images it read and their captions) and ``shapes`` (the procedural scenes ``data=shapes``
draws, written directly: scene ``i`` of ``seed`` becomes sample ``i``, with its condition map and exact boxes).

Sample ``i`` of the source goes to shard ``i // maxcount``, so a shard's contents do not depend on earlier runs. A
shard is written under a temporary name and renamed when complete, then ``manifest.json`` is rewritten
(atomically) with it; a rerun skips the shards the manifest lists, so an interrupted run continues where it
stopped. Unreadable images (``conditions.read_image``'s errors), missing files and empty captions are named in the
log and left out; the manifest lists them per shard.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from omegaconf import DictConfig, OmegaConf

from conditions import ImageDecodeError, read_image
from conditions.io import check_writable_dir, write_atomically
from lightning_modules.data.shard_format import CONDITION_EXTENSION, GROUNDING_EXTENSION, MANIFEST
from lightning_modules.errors import BadDataError, CtrlkitError

log = logging.getLogger(__name__)

SOURCES = ("imagefolder", "fill50k", "extract", "shapes")
FORMAT = "ctrlkit-shards/1"
KEPT_FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}  # image bytes stored as they are; others as PNG
MTIME = 946684800.0  # 2000-01-01: tar members carry a fixed time, so a rewritten shard has the same bytes


@dataclass
class Sample:
    """One sample to write: ``load()`` gives its tar members ({extension: bytes}) or raises a bad-data error."""

    index: int
    source: str
    load: Callable[[], dict[str, bytes]]


@dataclass
class Source:
    """What a source gives: its samples, whether they hold maps and grounding, and what made the maps (if known)."""

    samples: list[Sample]
    maps: bool
    grounding: bool = False
    condition: dict | None = None
    bad_lines: int = 0  # index lines left out before any sample was read (named in the log by read_index)


@dataclass
class ShardsReport:
    written: list[str] = field(default_factory=list)
    done: list[str] = field(default_factory=list)
    samples: int = 0
    bad: list[str] = field(default_factory=list)
    bad_lines: int = 0

    def summary(self, output: Path, seconds: float) -> str:
        shards = len(self.written) + len(self.done)
        lines = f" and {self.bad_lines} bad index lines" if self.bad_lines else ""
        return (
            f"ctrlkit shards: {self.samples} samples in {shards} shards ({len(self.written)} written, "
            f"{len(self.done)} already done), {len(self.bad)} bad samples{lines} left out; {output / MANIFEST}; "
            f"{seconds:.1f} s"
        )


def png_bytes(rgb: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]))  # OpenCV writes BGR
    if not ok:
        raise OSError("cannot encode a PNG")
    return encoded.tobytes()


def image_member(path: Path, max_pixels: int) -> tuple[str, bytes]:
    """(extension, bytes) of an image file, checked to decode; PNG/JPEG/WebP kept as they are, others as PNG."""
    from PIL import Image

    image = read_image(path, max_pixels)  # the check: ImageDecodeError names the file
    with Image.open(path) as opened:
        kept = KEPT_FORMATS.get(opened.format)
    return (kept, path.read_bytes()) if kept else ("png", png_bytes(image))


def caption_member(caption: str | None, where: str) -> bytes:
    if not isinstance(caption, str) or not caption.strip():
        raise BadDataError(f"{where}: empty caption")
    return caption.encode("utf-8")


def file_pair(image: Path, condition: Path | None, caption: str, where: str, max_pixels: int) -> dict:
    """The members of an image file, its caption and its map file (re-encoded as PNG: a lossless ``.cond.png``)."""
    extension, data = image_member(image, max_pixels)
    members = {extension: data, "txt": caption_member(caption, where)}
    if condition is not None:
        members[CONDITION_EXTENSION] = png_bytes(read_image(condition, max_pixels))
    return members


def folder_source(root: str | Path, layout: str, columns: tuple[str, str, str], max_pixels: int) -> Source:
    """imagefolder / fill50k (``layout``): the index file's lines, bad ones named and left out as ``data=`` does.
    ``columns``: the imagefolder (image, conditioning image, caption) columns; its maps are written when the
    conditioning column is in the index."""
    from lightning_modules.data.files import FileDataModule, read_index

    index_name, fixed = FileDataModule.LAYOUTS[layout]
    columns = fixed or columns
    index_file = Path(root) / index_name
    if not index_file.is_file():  # what data=imagefolder / fill50k reads: one JSON line per image, with its caption
        raise CtrlkitError(
            f"{root} has no {index_name}: data={layout} reads one JSON line per image there, e.g. "
            f'{{"{columns[0]}": "a.png", "{columns[2]}": "a caption"}}'
        )
    entries, _ = json_lines(index_file)
    maps = layout == "fill50k" or any(columns[1] in entry for entry in entries[:1])
    records, bad_lines = read_index(index_file, columns, maps, on_error="skip")

    def load(record) -> Callable[[], dict]:
        return lambda: file_pair(record.image, record.condition, record.prompt, record.where, max_pixels)

    return Source([Sample(i, r.where, load(r)) for i, r in enumerate(records)], maps=maps, bad_lines=bad_lines)


def extract_source(
    output: str | Path, images: str | Path, image_column: str, caption_column: str, max_pixels: int
) -> Source:
    """A ``ctrlkit extract`` output (``manifest.jsonl``: source image, map or grounding record, extractor) with the
    ``images`` it read, captioned by ``<images>/metadata.jsonl`` (``image_column`` -> ``caption_column``) or by a
    ``.txt`` beside each image."""
    output, images = Path(output), Path(images)
    entries, bad_lines = json_lines(output / "manifest.jsonl")
    if not entries:
        raise CtrlkitError(f"{output / 'manifest.jsonl'} lists no extracted image")
    captions = {}
    if (images / "metadata.jsonl").is_file():
        lines, _ = json_lines(images / "metadata.jsonl")
        captions = {entry.get(image_column): entry.get(caption_column) for entry in lines}
    grounding = str(entries[0].get("condition", "")).endswith(".json")

    def load(entry: dict) -> Callable[[], dict]:
        def members() -> dict:
            image = images / entry["source"]
            caption = captions.get(entry["source"])
            if caption is None and image.with_suffix(".txt").is_file():
                caption = image.with_suffix(".txt").read_text()
            if not grounding:
                return file_pair(image, output / entry["condition"], caption, str(image), max_pixels)
            record = json.loads((output / entry["condition"]).read_text())
            found = {"boxes": record["boxes"], "phrases": record["phrases"]}
            return {**file_pair(image, None, caption, str(image), max_pixels), GROUNDING_EXTENSION: found}

        return members

    samples = [Sample(i, str(images / e.get("source")), load(e)) for i, e in enumerate(entries)]
    condition = None if grounding else entries[0].get("extractor")
    return Source(samples, maps=not grounding, grounding=grounding, condition=condition, bad_lines=bad_lines)


def shapes_source(extractor, count: int, image_size: int = 64, seed: int = 0, num_objects=1) -> Source:
    """``count`` shapes scenes of ``seed`` as ``data=shapes`` draws them (sample ``i`` is its item ``i``): the image,
    caption, exact boxes, and the map of ``extractor`` (none for a grounding condition)."""
    from conditions.boxes import shapes_grounding
    from lightning_modules.data.shapes import ShapesDataset

    dataset = ShapesDataset(extractor, count, image_size, seed, num_objects)
    maps, reads_scene = extractor.kind == "image", getattr(extractor, "reads_scene", False)

    def load(index: int) -> Callable[[], dict]:
        def members() -> dict:
            scene = dataset.scene(index)
            found = {
                "png": png_bytes(scene.image),
                "txt": scene.caption.encode("utf-8"),
                GROUNDING_EXTENSION: shapes_grounding(scene).to_json(),
            }
            if maps:  # as ShapesDataset computes it: float (C, H, W) in [0, 1] -> lossless 8-bit RGB PNG
                condition = extractor.from_scene(scene) if reads_scene else extractor(scene.image)
                levels = condition.mul(255).round().byte().permute(1, 2, 0).numpy()
                found[CONDITION_EXTENSION] = png_bytes(np.repeat(levels, 3 // levels.shape[2], axis=2))
            return found

        return members

    samples = [Sample(i, dataset.describe(i), load(i)) for i in range(count)]
    return Source(samples, maps=maps, grounding=True, condition=extractor.settings() if maps else None)


def json_lines(path: Path) -> tuple[list[dict], int]:
    """The JSON objects of a JSON-lines file; malformed lines are named in the log and counted."""
    if not path.is_file():
        raise CtrlkitError(f"not found: {path}")
    entries, bad = [], 0
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict):
                raise ValueError("not a JSON object")
        except ValueError as error:
            log.warning("left out %s line %d: %s", path, number, error)
            bad += 1
            continue
        entries.append(entry)
    return entries, bad


def write_shard(path: Path, samples: list[Sample], bar) -> tuple[int, list[str]]:
    """Write ``samples`` to ``path`` through a temporary name; returns (samples written, "source: reason" of the
    bad ones left out)."""
    import webdataset as wds

    temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    written, bad = 0, []
    try:
        with open(temporary, "wb") as stream, wds.TarWriter(stream, mtime=MTIME) as writer:
            for sample in samples:
                try:
                    members = sample.load()
                except (ImageDecodeError, BadDataError, OSError, ValueError, KeyError) as error:
                    reason = str(error) if sample.source in str(error) else f"{sample.source}: {error}"
                    log.warning("left out %s", reason)
                    bad.append(reason)
                else:
                    meta = {"index": sample.index, "source": sample.source}
                    writer.write({"__key__": f"{sample.index:09d}", **members, "json": meta})
                    written += 1
                bar.update(1)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return written, bad


def write_shards(
    source: Source,
    output: str | Path,
    maxcount: int = 1000,
    prefix: str = "shard",
    settings: dict | None = None,
    progress: bool = False,
) -> ShardsReport:
    """Write ``source``'s samples to ``<output>/<prefix>-NNNNNN.tar``, ``maxcount`` each, skipping the shards that
    ``manifest.json`` lists as finished; ``settings`` (plain values) are recorded, and a rerun with others is
    refused."""
    from tqdm import tqdm

    output = Path(output)
    settings = json.loads(json.dumps({**(settings or {}), "maxcount": maxcount, "prefix": prefix}))
    fields = json.loads(
        json.dumps({"maps": source.maps, "grounding": source.grounding, "condition": source.condition})
    )
    manifest = {"format": FORMAT, **fields, "settings": settings, "shards": []}
    path = output / MANIFEST
    if path.is_file():
        earlier = json.loads(path.read_text())
        before = {**(earlier.get("settings") or {}), "condition": earlier.get("condition")}
        now = {**settings, "condition": fields["condition"]}
        changed = [key for key in {**before, **now} if before.get(key) != now.get(key)]
        if changed:
            was = ", ".join(f"{key}={before.get(key)!r}" for key in changed)
            raise CtrlkitError(
                f"{output} holds shards written with {was}; use another output folder or those settings"
            )
        manifest["shards"] = [shard for shard in earlier["shards"] if (output / shard["name"]).is_file()]
    output.mkdir(parents=True, exist_ok=True)
    report = ShardsReport(bad_lines=source.bad_lines)
    finished = {shard["name"] for shard in manifest["shards"]}
    samples = source.samples
    plan = [
        (f"{prefix}-{number:06d}.tar", samples[start : start + maxcount])
        for number, start in enumerate(range(0, len(samples), maxcount))
    ]
    todo = sum(len(part) for name, part in plan if name not in finished)
    with tqdm(total=todo, desc="ctrlkit shards", unit="sample", disable=not progress, dynamic_ncols=True) as bar:
        for name, part in plan:
            if name in finished:
                report.done.append(name)
                continue
            count, bad = write_shard(output / name, part, bar)
            manifest["shards"] = sorted(
                [*manifest["shards"], {"name": name, "samples": count, "bad": bad}], key=lambda shard: shard["name"]
            )
            write_manifest(path, manifest)
            report.written.append(name)
    write_manifest(path, manifest)
    report.samples = manifest["samples"]
    report.bad = [reason for shard in manifest["shards"] for reason in shard["bad"]]
    return report


def run_shards(cfg: DictConfig) -> ShardsReport:
    """``ctrlkit shards``: gather the source's samples, write the shards not yet done, print the summary."""
    from hydra.utils import instantiate

    from lightning_modules.commands.value_checks import check_settings

    started = time.perf_counter()
    check_settings("shards", cfg)
    if cfg.source not in SOURCES:
        raise CtrlkitError(f"source='{cfg.source}'; choose one of: {', '.join(SOURCES)}")
    if cfg.source != "shapes" and cfg.input is None:
        raise CtrlkitError(f"input is required with source={cfg.source}: ctrlkit shards input=<dir> output=<dir>")
    if cfg.source == "extract" and cfg.images is None:
        raise CtrlkitError("images is required with source=extract: the folder ctrlkit extract read (its input)")
    output = Path(cfg.output).expanduser().absolute()
    check_writable_dir(output, "output")
    plain = OmegaConf.to_container(cfg, resolve=True)
    settings = {"source": cfg.source, "input": str(Path(cfg.input).resolve()) if cfg.input is not None else None}
    if cfg.source == "shapes":
        count = 10_000 if cfg.count is None else cfg.count
        extractor = instantiate(cfg.condition.extractor, _convert_="all")
        source = shapes_source(extractor, count, cfg.image_size, cfg.seed, plain["num_objects"])
        settings.update(seed=cfg.seed, image_size=cfg.image_size, num_objects=plain["num_objects"])
    elif cfg.source == "extract":
        source = extract_source(cfg.input, cfg.images, cfg.image_column, cfg.caption_column, cfg.max_image_pixels)
        settings["images"] = str(Path(cfg.images).resolve())
    else:
        columns = (cfg.image_column, cfg.conditioning_image_column, cfg.caption_column)
        source = folder_source(cfg.input, cfg.source, columns, cfg.max_image_pixels)
    if cfg.count is not None:
        source.samples = source.samples[: cfg.count]
    settings["count"] = len(source.samples)
    report = write_shards(source, output, cfg.maxcount, cfg.prefix, settings, cfg.progress)
    print(report.summary(output, time.perf_counter() - started))
    return report


def write_manifest(path: Path, manifest: dict) -> None:
    manifest["samples"] = sum(shard["samples"] for shard in manifest["shards"])
    manifest["bad"] = sum(len(shard["bad"]) for shard in manifest["shards"])
    write_atomically(path, json.dumps(manifest, indent=1))
