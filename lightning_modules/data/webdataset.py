"""``data=webdataset``: training from tar shards (layout: ``shard_format.py``), each process streaming its own.

One epoch: the shard list is shuffled from ``seed + epoch`` (``shardshuffle``), dealt to the ranks (every
``world_size``-th shard from ``rank``) and then to each rank's DataLoader workers in the same way; each worker
shuffles its samples in a buffer (``shuffle_buffer``) seeded from (seed, epoch, rank, worker). Every rank
yields exactly ``epoch samples // world_size // batch_size`` batches, so the ranks step together: a rank whose
shards run out first starts them again (a second pass, shuffled anew), one with more stops there. With shards that
divide evenly over ranks x workers and sample counts that divide by the batch size, every sample is read once per
epoch (tests/lightning_modules/data/test_webdataset.py); each worker's last batch of a pass may be smaller.

Resume: the loader's ``state_dict`` holds (epoch, batches this rank consumed). A resumed run sets up the same
epoch and each worker drops its share of those batches' samples before decoding them. Exact -- the same batches
follow -- with the same shards, seed, batch size, number of workers and world size, as long as every worker still
had samples at the resume point; in the last batches of an epoch, where workers run out unevenly, and on another
world size (the position is then rescaled to it) it is approximate: a few samples may be seen twice or not at
all in that epoch. The next epoch is exact again.

Validation is fixed: the first ``val_size`` good samples of ``val_urls``, or of the training shards in order (then
every sample read for it is left out of training), decoded once and kept in memory; shards of shapes scenes also
redraw their scenes (``ShapesItems``) for controllability's shapes scores.
"""

from __future__ import annotations

import functools
import itertools
import logging

import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset, IterableDataset

from conditions import ConditionExtractor
from conditions.io import MAX_IMAGE_PIXELS
from conditions.shapes import ShapeScene
from lightning_modules.data.common import ConditionedDataModule, check_on_error, collate_skipping
from lightning_modules.data.files import check_condition_source
from lightning_modules.data.shapes import ShapesDataset
from lightning_modules.data.shard_format import (
    SampleDecoder,
    check_condition,
    count_samples,
    log_and_continue,
    resolve_shards,
)
from lightning_modules.errors import CtrlkitError

log = logging.getLogger(__name__)


def take_share(src, place: int, places: int):
    """Every ``places``-th item from ``place``: what ``wds.split_by_node`` and ``wds.split_by_worker`` do, with the
    place given instead of read from torch.distributed / the worker info. Ranks come from the trainer (and tests
    simulate them without a process group); a worker's place is its role, which a resume rotates."""
    yield from itertools.islice(src, place, None, places)


class ShardStream(IterableDataset):
    """One rank's training samples for one pass over its shards (see the module docstring for the order).

    ``epoch``, ``repeat`` (the pass within the epoch) and ``skip_batches`` (resume) are set by ``ShardLoader``
    before each pass; the DataLoader copies them into its workers when it starts them.
    """

    def __init__(
        self,
        urls: list[str],
        decoder: SampleDecoder,
        rank: int,
        world_size: int,
        batch_size: int,
        seed: int = 0,
        shardshuffle: bool = True,
        shuffle_buffer: int = 1000,
        exclude: frozenset = frozenset(),
    ) -> None:
        super().__init__()
        self.urls = urls
        self.decoder = decoder
        self.rank = rank
        self.world_size = world_size
        self.batch_size = batch_size
        self.seed = seed
        self.shardshuffle = shardshuffle
        self.shuffle_buffer = shuffle_buffer
        self.exclude = exclude  # (url, key) of the validation samples
        self.epoch = 0
        self.repeat = 0
        self.skip_batches = 0

    def keep(self, sample: dict) -> bool:
        return (sample["__url__"], sample["__key__"]) not in self.exclude

    def pipeline(self) -> wds.DataPipeline:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # The DataLoader takes batches from its workers in turn, from worker 0: batch i is role (i % workers)'s.
        # A resume after k batches gives worker w the role (w + k) % workers -- its shards, seed and skip -- so
        # the new loader's first batch is the one the killed run would have taken next.
        role = (worker + self.skip_batches) % workers
        skip = len(range(role, self.skip_batches, workers)) * self.batch_size
        handler = wds.reraise_exception if self.decoder.on_error == "raise" else log_and_continue
        shuffle_seed = f"{self.seed}:{self.epoch}:{self.repeat}:{self.rank}:{role}"
        return wds.DataPipeline(
            # the same shard order on every rank and worker (seed + epoch), then dealt out
            wds.SimpleShardList(self.urls, seed=self.seed + self.epoch if self.shardshuffle else None),
            functools.partial(take_share, place=self.rank, places=self.world_size),
            functools.partial(take_share, place=role, places=workers),
            wds.tarfile_to_samples(handler=handler),
            wds.select(self.keep),
            wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, seed=shuffle_seed)
            if self.shuffle_buffer > 1
            else None,
            wds.slice(skip, None),  # resume: this worker's share of the consumed batches, dropped undecoded
            wds.map(self.decoder),
        )

    def __iter__(self):
        return iter(self.pipeline())


class ShardPosition:
    """The epoch and the batches of it this rank's training loop consumed. It stands where a sampler stands, so
    Lightning's ``set_epoch`` reaches it; ``resume_at = (epoch, batches)`` starts that epoch part-way."""

    def __init__(self) -> None:
        self.epoch = 0
        self.batches = 0
        self.resume_at: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def start(self) -> int:
        """Batches of the current epoch to skip (a resume), once."""
        start = self.resume_at[1] if self.resume_at is not None and self.resume_at[0] == self.epoch else 0
        if self.resume_at is not None and self.resume_at[0] <= self.epoch:
            self.resume_at = None
        return start


class ShardLoader:
    """The training loader: exactly ``len(self)`` batches per epoch on every rank (``collate_skipping`` batches:
    bad samples arrive as ``skipped``), its position saved in checkpoints (``state_dict``) like
    ``ResumableDataLoader``'s."""

    def __init__(self, stream: ShardStream, batches_per_epoch: int, num_workers: int) -> None:
        self.stream = stream
        self.batches_per_epoch = batches_per_epoch
        self.num_workers = num_workers
        self.sampler = ShardPosition()

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self):
        position, stream = self.sampler, self.stream
        position.batches = produced = start = position.start()
        stream.epoch, stream.repeat = position.epoch, 0
        while produced < len(self):
            stream.skip_batches = start if stream.repeat == 0 else 0
            # new workers each pass: they take this pass's epoch, repeat and skip with their copy of the stream
            loader = DataLoader(
                stream,
                batch_size=stream.batch_size,
                num_workers=self.num_workers,
                collate_fn=collate_skipping,
                # the loader's own generator: starting workers never draws from (and shifts) the global RNG
                generator=torch.Generator().manual_seed(stream.seed),
            )
            got = 0
            for batch in loader:
                got, produced = got + 1, produced + 1
                yield batch
                if produced >= len(self):
                    break
            if got == 0 and stream.skip_batches == 0:
                raise CtrlkitError(f"rank {stream.rank} read no training sample from its shards")
            stream.repeat += 1

    def state_dict(self) -> dict:
        stream = self.stream
        return {"epoch": self.sampler.epoch, "batches": self.sampler.batches, "world_size": stream.world_size}

    def load_state_dict(self, state: dict) -> None:
        if "batches" not in state:  # a checkpoint of another data module (data=shapes ...): its position is not ours
            log.warning("the checkpoint's data position is not a shard stream's; the epoch starts from its beginning")
            self.sampler.set_epoch(int(state.get("epoch", 0)))
            return
        # on another world size a rank's batches hold another share of the epoch: rescale (approximate)
        batches = int(state["batches"]) * int(state.get("world_size", 1)) // self.stream.world_size
        self.sampler.set_epoch(int(state["epoch"]))
        self.sampler.resume_at = (int(state["epoch"]), batches)
        self.sampler.batches = batches


class LoadedItems(Dataset):
    """Decoded items kept in memory (the fixed validation set); ``extractor`` as the other datasets have it."""

    def __init__(self, items: list[dict], extractor: ConditionExtractor) -> None:
        self.items = items
        self.extractor = extractor

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


class ShapesItems(LoadedItems):
    """Validation items of shards written from shapes scenes (``ctrlkit shards source=shapes``): ``scene(index)``
    redraws the scene of item ``index``, so controllability adds the shapes scores (mask and box IoU, caption
    accuracy) as on ``data=shapes``."""

    def __init__(self, items: list[dict], extractor: ConditionExtractor, scenes: ShapesDataset) -> None:
        super().__init__(items, extractor)
        self.scenes = scenes

    def scene(self, index: int) -> ShapeScene:
        return self.scenes.scene(index)


def validation_dataset(items: list[dict], extractor, manifest: dict | None, image_size: int) -> LoadedItems:
    """``ShapesItems`` when the manifest says the shards hold shapes scenes drawn at ``image_size``, else
    ``LoadedItems``."""
    settings = (manifest or {}).get("settings") or {}
    if settings.get("source") != "shapes" or settings.get("image_size") != image_size:
        return LoadedItems(items, extractor)
    scenes = ShapesDataset(extractor, settings["count"], image_size, settings["seed"], settings["num_objects"])
    return ShapesItems(items, extractor, scenes)


def read_validation(urls: list[str], decoder: SampleDecoder, count: int) -> tuple[list[dict], frozenset]:
    """The first ``count`` good samples of ``urls`` in order, and the (url, key) of every sample read for them."""
    handler = wds.reraise_exception if decoder.on_error == "raise" else log_and_continue
    samples = wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(handler=handler))
    items, read = [], set()
    for sample in samples:
        read.add((sample["__url__"], sample["__key__"]))
        item = decoder(sample)
        if "skipped" in item:
            log.warning("validation: skipped bad data item: %s", item["skipped"])
            continue
        items.append(item)
        if len(items) == count:
            break
    return items, frozenset(read)


class WebDataModule(ConditionedDataModule):
    """Training from tar shards streamed by webdataset; the fixed validation set in memory.

    Args:
        urls: the training shards: a folder or ``manifest.json`` from ``ctrlkit shards``, a brace pattern
            (``/data/shapes-{000000..000009}.tar``) or a list of them.
        extractor: the configured condition (``conf/condition``).
        conditions: ``files`` (the shards' ``.cond.png`` maps / ``.grounding.json`` records) or ``extractor``
            (applied to the image on the fly).
        val_urls: shards of the validation set; None: the first ``val_size`` samples of ``urls``, left out of
            training.
        shardshuffle: shuffle the shard list every epoch (from ``seed + epoch``); else shards go in their order.
        shuffle_buffer: samples each worker shuffles among (1: no shuffle); memory grows with it.
        epoch_samples: training samples in an epoch over all ranks; None: from the manifest, else counted from the
            tar headers (local shards).
        on_error: ``skip`` (default: a bad sample is reported, left out of its batch and counted) or ``raise``.
        rank, world_size: this process's place; None: the trainer's (tests simulate ranks with them).
    """

    def __init__(
        self,
        urls: str | list[str],
        extractor: ConditionExtractor,
        conditions: str = "files",
        val_urls: str | list[str] | None = None,
        image_size: int = 64,
        val_size: int = 16,
        batch_size: int = 16,
        num_workers: int = 0,
        shardshuffle: bool = True,
        shuffle_buffer: int = 1000,
        epoch_samples: int | None = None,
        on_error: str = "skip",
        seed: int = 0,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        check_condition_source(
            conditions,
            extractor,
            "use data.conditions=files with shards that hold its maps (ctrlkit shards source=shapes condition=...)",
        )
        for key, value, least in (
            ("batch_size", batch_size, 1),
            ("val_size", val_size, 1),
            ("shuffle_buffer", shuffle_buffer, 1),
            ("num_workers", num_workers, 0),
        ):
            if value < least:
                raise CtrlkitError(f"data.{key}={value} must be >= {least}")
        check_on_error(on_error)
        self.on_error = on_error
        self.shuffle_seed = seed
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shardshuffle = shardshuffle
        self.shuffle_buffer = shuffle_buffer
        self.rank, self.world_size = rank, world_size
        self.shards = resolve_shards(urls)
        check_condition(self.shards.manifest, extractor, conditions)
        self.decoder = SampleDecoder(extractor, image_size, conditions, on_error, max_image_pixels)
        val_shards = resolve_shards(val_urls) if val_urls is not None else self.shards
        items, read = read_validation(val_shards.urls, self.decoder, val_size)
        if not items:
            raise CtrlkitError(f"no usable validation sample in {val_shards.urls[0]}: every one read was bad data")
        self.val_dataset = validation_dataset(items, extractor, val_shards.manifest, image_size)
        self.exclude = read if val_urls is None else frozenset()  # validation samples never train
        if epoch_samples is None:
            total = self.shards.samples
            if total is None:
                log.info("counting the samples of %d shards from their tar headers", len(self.shards.urls))
                total = count_samples(self.shards.urls)
            epoch_samples = total - len(self.exclude)
        self.epoch_samples = epoch_samples
        self._loader: ShardLoader | None = None

    def processes(self) -> tuple[int, int]:
        if self.world_size is not None:
            return self.world_size, self.rank or 0
        return super().processes()

    def train_dataloader(self) -> ShardLoader:
        if self._loader is None:
            world_size, rank = self.processes()
            shards = len(self.shards.urls)
            if shards < world_size:
                raise CtrlkitError(
                    f"{shards} shard(s) cannot be split over {world_size} processes; write more, smaller shards "
                    "(ctrlkit shards maxcount=...)"
                )
            readers = world_size * max(1, self.num_workers)
            if shards % readers:
                log.warning(
                    "%d shards over %d processes x %d workers: some readers get one shard more, so their samples "
                    "are read more often; a multiple of %d shards reads each sample once per epoch",
                    shards,
                    world_size,
                    max(1, self.num_workers),
                    readers,
                )
            batches = self.epoch_samples // world_size // self.batch_size
            if batches < 1:
                raise CtrlkitError(
                    f"{self.epoch_samples} training samples make no batch of {self.batch_size} on each of "
                    f"{world_size} processes"
                )
            stream = ShardStream(
                self.shards.urls,
                self.decoder,
                rank,
                world_size,
                self.batch_size,
                self.shuffle_seed,
                self.shardshuffle,
                self.shuffle_buffer,
                self.exclude,
            )
            self._loader = ShardLoader(stream, batches, self.num_workers)
        return self._loader

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        # each batch the loop actually uses (not the one Lightning fetches ahead) moves the saved position
        if self.trainer is not None and self.trainer.training and self._loader is not None:
            self._loader.sampler.batches += 1
        return batch
