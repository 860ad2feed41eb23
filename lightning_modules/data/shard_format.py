"""The shard layout that ``ctrlkit shards`` writes and ``data=webdataset`` reads, and how a sample becomes an item.

A shard is a tar of samples (webdataset's layout); the files of sample ``<key>`` are ``<key>.png`` (or ``.jpg``,
``.jpeg``, ``.webp``: the image), ``<key>.txt`` (the caption), ``<key>.cond.png`` (the condition map, read under
``conditions: files``), ``<key>.grounding.json`` (``{"boxes": normalised xyxy, "phrases": [...]}``, for grounding
conditions) and ``<key>.json`` (``{"index": <the sample's number in the whole set>, "source": <where it came
from>}``). Items are the ones ``FileDataModule`` gives: ``pixel_values`` (3, S, S) float in [-1, 1], ``condition``
(C, S, S) float in [0, 1] or a ``GroundingCondition`` of one, ``prompt`` str, ``index`` int.

``manifest.json`` beside the shards: ``{"format", "maps": bool (samples hold .cond.png), "grounding": bool,
"condition": <settings of the extractor that made the maps, null when unknown>, "settings": <source, input, count,
maxcount, ...>, "shards": [{"name", "samples", "bad": ["<source>: <reason>", ...]}], "samples", "bad"}``, rewritten
(atomically) after every finished shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tarfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import webdataset as wds

from conditions import ConditionExtractor, GroundingRecord, ImageDecodeError, pad_grounding
from conditions.io import MAX_IMAGE_PIXELS, decode_image
from lightning_modules.data.common import ITEM_ERRORS, item_condition
from lightning_modules.data.files import micro_conditioning, pair_tensors, resize_and_centre_crop
from lightning_modules.errors import BadDataError, CtrlkitError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
CONDITION_EXTENSION = "cond.png"
GROUNDING_EXTENSION = "grounding.json"


@dataclass
class ShardSet:
    """Shard urls and their sample count (None when no manifest lists them all)."""

    urls: list[str]
    samples: int | None
    manifest: dict | None


def read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text())
        manifest["shards"] = list(manifest["shards"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CtrlkitError(f"{path} is not a ctrlkit shards manifest ({type(error).__name__}: {error})") from error
    return manifest


def resolve_shards(urls: str | list[str]) -> ShardSet:
    """``urls`` as ``data.urls`` gives them -> the shard list and its sample count.

    Accepted: a folder or ``manifest.json`` written by ``ctrlkit shards`` (its finished shards), a brace pattern
    (``/x/shapes-{000000..000003}.tar``) or a list of urls/patterns. The count comes from a manifest in the shards'
    folder when it lists every shard. Local shards must exist.
    """
    if isinstance(urls, str) and (Path(urls).is_dir() or Path(urls).name == MANIFEST):
        path = Path(urls) / MANIFEST if Path(urls).is_dir() else Path(urls)
        if not path.is_file():
            raise CtrlkitError(f"data.urls={urls}: no {MANIFEST} there (write the folder with ctrlkit shards)")
        manifest = read_manifest(path)
        shards = [shard for shard in manifest["shards"] if (path.parent / shard["name"]).is_file()]
        if not shards:
            raise CtrlkitError(f"{path} lists no finished shard")
        return ShardSet([str(path.parent / s["name"]) for s in shards], sum(s["samples"] for s in shards), manifest)
    patterns = [urls] if isinstance(urls, str) else list(urls)
    expanded = [url for pattern in patterns for url in wds.shardlists.expand_urls(str(pattern))]
    if not expanded:
        raise CtrlkitError("data.urls names no shard")
    for url in expanded:
        if ":" not in url.split("/")[0] and not Path(url).is_file():  # local paths; pipe:/http: are not checked
            raise CtrlkitError(f"shard not found: {url} (data.urls={urls})")
    beside = Path(expanded[0]).parent / MANIFEST
    manifest = read_manifest(beside) if beside.is_file() else None
    counts = {str(beside.parent / s["name"]): s["samples"] for s in manifest["shards"]} if manifest else {}
    samples = sum(counts[url] for url in expanded) if all(url in counts for url in expanded) else None
    return ShardSet(expanded, samples, manifest)


def count_samples(urls: list[str]) -> int:
    """Samples in local shards, counted from the tar headers (no file is read)."""
    keys = 0
    for url in urls:
        with tarfile.open(url) as archive:
            keys += len({member.name.split("/")[-1].split(".", 1)[0] for member in archive if member.isfile()})
    return keys


def log_and_continue(error: Exception) -> bool:
    """webdataset handler under ``on_error=skip``: an unreadable shard or tar member is named and passed over."""
    log.warning("skipping unreadable shard data: %s", error)
    return True


def sample_index(sample: dict) -> int:
    """The sample's ``index`` (the training system's latent-cache key): ``<key>.json``'s ``index`` when present,
    else a hash of (shard name, key), unique where keys repeat across shards."""
    try:
        index = json.loads(sample["json"]).get("index") if "json" in sample else None
    except (ValueError, AttributeError) as error:
        raise BadDataError(f"{sample['__url__']} sample {sample['__key__']}: bad .json ({error})") from error
    if isinstance(index, int):
        return index
    name = f"{Path(sample['__url__']).name}/{sample['__key__']}"
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little") >> 2


class SampleDecoder:
    """A tar sample (dict of bytes) -> a training item, or ``{"skipped": reason}`` for a bad one under
    ``on_error=skip`` (an image or map that does not decode, no image, an empty caption, a missing map).

    Args:
        extractor: the condition (``conf/condition``): applied to the image under ``conditions=extractor``; gives
            the map channels, or the grounding slots (``max_boxes``) for ``<key>.grounding.json``.
        conditions: ``files`` (``<key>.cond.png`` / ``<key>.grounding.json``) or ``extractor``.
    """

    def __init__(
        self,
        extractor: ConditionExtractor,
        image_size: int,
        conditions: str,
        on_error: str,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
    ) -> None:
        self.extractor = extractor
        self.image_size = image_size
        self.conditions = conditions
        self.on_error = on_error
        self.max_image_pixels = max_image_pixels

    def __call__(self, sample: dict) -> dict:
        try:
            return self.decode(sample)
        except ITEM_ERRORS as error:
            where = f"{sample.get('__url__')} sample {sample.get('__key__')}"
            message = str(error) if where in str(error) else f"{where}: {error}"
            if self.on_error == "raise":
                raise BadDataError(f"{message} (data.on_error=skip skips such items)") from error
            return {"skipped": message}

    def decode(self, sample: dict) -> dict:
        where = f"{sample['__url__']} sample {sample['__key__']}"
        extension = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
        if extension is None:
            raise BadDataError(f"{where}: no image ({', '.join('.' + ext for ext in IMAGE_EXTENSIONS)})")
        prompt = sample.get("txt", b"").decode("utf-8", errors="replace").strip()
        if not prompt:
            raise BadDataError(f"{where}: empty caption")
        image = self.image(sample, extension, where)
        time_ids = micro_conditioning(*image.shape[:2], self.image_size)  # from the image as stored
        if getattr(self.extractor, "kind", "image") == "grounding":
            image = resize_and_centre_crop(image, self.image_size, cv2.INTER_AREA)
            pixel_values = torch.from_numpy(image).permute(2, 0, 1).float().div(127.5).sub(1.0)
            condition = self.grounding(sample, where, image)
        else:
            condition_map = None
            if self.conditions == "files":
                if CONDITION_EXTENSION not in sample:
                    raise BadDataError(
                        f"{where}: no .{CONDITION_EXTENSION} map (without maps: data.conditions=extractor)"
                    )
                condition_map = self.image(sample, CONDITION_EXTENSION, where)
            pixel_values, condition = pair_tensors(image, condition_map, self.extractor, self.image_size)
        return {
            "index": sample_index(sample),
            "pixel_values": pixel_values,
            "condition": condition,
            "prompt": prompt,
            "time_ids": time_ids,
        }

    def image(self, sample: dict, extension: str, where: str) -> np.ndarray:
        try:
            return decode_image(sample[extension], f".{extension}", self.max_image_pixels)
        except ImageDecodeError as error:
            raise ImageDecodeError(f"{where}: {error}") from error

    def grounding(self, sample: dict, where: str, image: np.ndarray):
        if self.conditions == "extractor":  # a detector that reads pixels (condition=detected_boxes)
            return item_condition(self.extractor, self.extractor(image))
        if GROUNDING_EXTENSION not in sample:
            raise BadDataError(f"{where}: no .{GROUNDING_EXTENSION} for the grounding condition")
        try:
            entry = json.loads(sample[GROUNDING_EXTENSION])
            record = GroundingRecord(entry["boxes"], list(entry["phrases"]))
        except (ValueError, KeyError, TypeError) as error:  # malformed json, boxes outside [0, 1] ...
            raise BadDataError(f"{where}: bad .{GROUNDING_EXTENSION} ({error})") from error
        return item_condition(self.extractor, pad_grounding(record, self.extractor.max_boxes))


def check_condition(manifest: dict | None, extractor: ConditionExtractor, conditions: str) -> None:
    """Shards from ``ctrlkit shards`` say which maps they hold: training under ``conditions: files`` on maps of
    another condition (canny maps for condition=hed) or on none stops here, naming both."""
    if manifest is None or conditions != "files":
        return
    if getattr(extractor, "kind", "image") == "grounding":
        if not manifest.get("grounding"):
            raise CtrlkitError("the shards hold no grounding records (.grounding.json); set data.conditions=extractor")
        return
    written = manifest.get("condition")
    if not manifest.get("maps"):
        raise CtrlkitError(
            "the shards hold no condition maps (.cond.png): set data.conditions=extractor, or write them with "
            "ctrlkit shards condition=<name>"
        )
    if written is None:  # maps of a folder source: what made them is not known
        return
    # channels may differ: maps are stored as RGB and cut to the channels the condition takes
    wanted = {key: value for key, value in extractor.settings().items() if key != "channels"}
    held = {key: value for key, value in written.items() if key != "channels"}
    if json.loads(json.dumps(wanted)) != held:
        raise CtrlkitError(
            f"the shards hold maps made by {held} but the condition is {wanted}: train with the shards' condition, "
            "set data.conditions=extractor, or write shards with this one"
        )
