"""What every conditioned data module shares: collation of grounding items, a resumable sampler, bad items
skipped and counted, and the DataModule base that serves fixed validation batches."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torch.utils.data._utils.collate import collate as torch_collate
from torch.utils.data._utils.collate import default_collate_fn_map

from adapters.grounding import GroundingCondition
from conditions.io import ImageDecodeError
from lightning_modules.errors import BadDataError, CtrlkitError


def _collate_grounding(batch: list[GroundingCondition], *, collate_fn_map=None) -> GroundingCondition:
    return GroundingCondition.cat(batch)


# default_collate's table plus grounding (torch's documented way to extend it): items' GroundingConditions (batches
# of one) concatenate, so phrases stay one list of strings per item, where default_collate would transpose them
COLLATE_FN_MAP = {**default_collate_fn_map, GroundingCondition: _collate_grounding}


def collate(items: list[dict]) -> dict:
    """``default_collate``, except that grounding conditions concatenate into one ``GroundingCondition``."""
    return torch_collate(items, collate_fn_map=COLLATE_FN_MAP)


def item_condition(extractor, extracted):
    """What an extractor gave for one item -> the item's condition: a map as it is; a grounding extractor's padded
    slots (``conditions.boxes.pad_grounding``: boxes, masks, phrases) as a ``GroundingCondition`` of one. The
    ``conditions`` and ``adapters`` packages do not import each other, so the two meet here."""
    if getattr(extractor, "kind", "image") == "grounding":
        return GroundingCondition.from_slots(**extracted)
    return extracted


ON_ERROR = ("skip", "raise")
# Errors that mean "this item is bad" rather than "the code is wrong": skipped under on_error=skip.
ITEM_ERRORS = (BadDataError, ImageDecodeError)


class ResumableSampler(Sampler[int]):
    """Shuffles like ``RandomSampler`` but from ``(seed, epoch)`` alone, can start an epoch part-way through, and
    shards the epoch over ``num_replicas`` processes.

    Epoch ``e`` visits ``torch.randperm(n)`` drawn from a generator seeded with ``seed + e`` (Lightning calls
    ``set_epoch``), cut to a multiple of ``num_replicas``; process ``rank`` takes every ``num_replicas``-th item
    from position ``rank`` (as ``DistributedSampler`` does), so the processes' k-th batches together hold the
    items one process would take in its k-th batch of ``num_replicas`` times the size.
    ``resume_at = (epoch, items)`` skips that many items of that epoch -- counted over all processes, so a run can
    resume on another number of them -- when it is iterated: a resumed run continues the epoch exactly where the
    killed one stopped (a checkpoint taken on an epoch's last batch resumes with the next epoch, which is then
    iterated whole). ``consumed`` counts the epoch's items this process's training loop has used (the data module
    advances it per batch; an item fetched ahead is not consumed).
    """

    def __init__(self, length: int, seed: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        if not 0 <= rank < num_replicas:
            raise CtrlkitError(f"sampler rank {rank} is not in [0, {num_replicas})")
        if length < num_replicas:
            raise CtrlkitError(f"{length} training items cannot be split over {num_replicas} processes")
        self.length = length
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self.resume_at: tuple[int, int] | None = None
        self.consumed = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length // self.num_replicas

    @property
    def consumed_overall(self) -> int:
        """Items of this epoch consumed by all processes together (each consumes the same number)."""
        return self.consumed * self.num_replicas

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.length, generator=generator).tolist()
        usable = self.length - self.length % self.num_replicas
        mine = order[self.rank : usable : self.num_replicas]
        start = 0
        if self.resume_at is not None and self.resume_at[0] == self.epoch:
            start = self.resume_at[1] // self.num_replicas
        if self.resume_at is not None and self.resume_at[0] <= self.epoch:
            self.resume_at = None
        self.consumed = start
        return iter(mine[start:])


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a ``ResumableSampler`` whose position Lightning saves in checkpoints and restores
    (its ``state_dict`` / ``load_state_dict`` make it a stateful loader to Lightning's fit loop). The position is
    counted over all processes (rank zero writes the checkpoint; every rank reads it)."""

    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "consumed": self.sampler.consumed_overall, "seed": self.sampler.seed}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.set_epoch(int(state["epoch"]))
        self.sampler.resume_at = (int(state["epoch"]), int(state["consumed"]))
        self.sampler.consumed = int(state["consumed"]) // self.sampler.num_replicas


class GuardedDataset(Dataset):
    """Wraps a dataset so a bad item is skipped (returns a marker naming it) or stops the run (``on_error=raise``).

    A bad item is one whose loading raises ``ImageDecodeError`` / ``BadDataError`` (unreadable or missing image) or
    whose caption is empty. Skipped items travel in the batch as ``skipped`` (one "file: reason" string each), so
    the training system counts them in the main process whatever the number of workers.
    """

    def __init__(self, dataset: Dataset, on_error: str = "skip") -> None:
        self.dataset = dataset
        self.on_error = on_error

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):  # scene(), records, extractor ... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int) -> dict:
        try:
            item = self.dataset[index]
            if not str(item.get("prompt", "")).strip():
                raise BadDataError(f"{describe_item(self.dataset, index)}: empty caption")
        except ITEM_ERRORS as error:
            if self.on_error == "raise":
                raise BadDataError(f"{error} (data.on_error=skip skips such items)") from error
            return {"skipped": str(error)}
        return item


def check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise CtrlkitError(f"data.on_error='{on_error}'; choose one of: {', '.join(ON_ERROR)}")


def describe_item(dataset: Dataset, index: int) -> str:
    """How errors name item ``index``: its file when the dataset knows it (``describe``), else its index."""
    describe = getattr(dataset, "describe", None)
    return describe(index) if describe is not None else f"{type(dataset).__name__} item {index}"


def collate_skipping(items: list[dict]) -> dict:
    """``default_collate`` of the good items; the skipped ones' messages go in ``skipped`` (a list of str)."""
    good = [item for item in items if "skipped" not in item]
    skipped = [item["skipped"] for item in items if "skipped" in item]
    batch = collate(good) if good else {}
    batch["skipped"] = skipped
    return batch


class ConditionedDataModule(pl.LightningDataModule):
    """Loaders shared by every data module: subclasses set ``train_dataset``, ``val_dataset``, ``batch_size``,
    ``num_workers`` and ``on_error``; items are dicts with ``pixel_values``, ``condition``, ``prompt`` (and
    ``index``). Batches also carry ``skipped``: messages naming the bad items left out of them.

    The data order is resumable: the training sampler shuffles from ``(seed, epoch)``, the module counts the
    items the training loop consumed in the current epoch, and the training loader hands both to Lightning's
    checkpoint (``ResumableDataLoader``).
    """

    train_dataset: Dataset
    val_dataset: Dataset
    batch_size: int
    num_workers: int
    on_error: str = "skip"
    shuffle_seed: int = 0

    def processes(self) -> tuple[int, int]:
        """(world size, this process's rank) of the trainer running this module; (1, 0) outside one."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def train_sampler(self) -> ResumableSampler:
        if getattr(self, "_train_sampler", None) is None:
            world_size, rank = self.processes()
            self._train_sampler = ResumableSampler(len(self.train_dataset), self.shuffle_seed, world_size, rank)
        return self._train_sampler

    def train_dataloader(self) -> DataLoader:
        return ResumableDataLoader(
            GuardedDataset(self.train_dataset, self.on_error),
            batch_size=self.batch_size,
            sampler=self.train_sampler(),
            # keep a dataset smaller than one batch trainable
            drop_last=len(self.train_dataset) >= self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_skipping,
            # the loader's own generator: making workers' seeds never draws from (and shifts) the global RNG
            generator=torch.Generator().manual_seed(self.shuffle_seed),
        )

    def val_dataloader(self) -> DataLoader:
        # with several processes each validates its shard (padded by repeating items to equal shards, as
        # DistributedSampler does), and the system logs the mean over all of them
        world_size, rank = self.processes()
        sampler = DistributedSampler(self.val_dataset, world_size, rank, shuffle=False) if world_size > 1 else None
        return DataLoader(
            GuardedDataset(self.val_dataset, self.on_error),
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate_skipping,
            generator=torch.Generator().manual_seed(self.shuffle_seed),
        )

    def fixed_batch(self, count: int) -> dict:
        """The first ``count`` good validation items as one batch (what the sample grid shows)."""
        dataset = GuardedDataset(self.val_dataset, self.on_error)
        items = []
        for index in range(len(dataset)):
            item = dataset[index]
            if "skipped" not in item:
                items.append(item)
            if len(items) == count:
                break
        if not items:
            raise BadDataError("no usable validation item: every one was skipped as bad data")
        return collate(items)

    # ------------------------------------------------------------------ the data order survives a resume

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        # Called for each batch the loop actually uses (not the one Lightning prefetches): count training items.
        if self.trainer is not None and self.trainer.training:
            self.train_sampler().consumed += self.batch_size
        return batch
