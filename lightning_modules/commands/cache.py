"""``ctrlkit cache``: fill the disk feature cache (``system.cache_dir``) ahead of training.

The config is the training config (``conf/cache.yaml`` composes ``conf/train.yaml``), and the models, data and
training system are built as ``train`` builds them, with the trainer's device and precision applied as fit applies
them; every training item then goes through the system's own ``item_posterior`` and ``prompt_embedding``. So the
entries are exactly those a ``ctrlkit train`` with the same overrides looks up, and it never runs the VAE encoder.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from conditions.io import check_writable_dir
from lightning_modules.commands.config_checks import check_train_config
from lightning_modules.commands.value_checks import check_settings
from lightning_modules.errors import CtrlkitError

log = logging.getLogger(__name__)


@dataclass
class CacheReport:
    """What a ``ctrlkit cache`` run did: items encoded, entries written and found, per kind [found, written]."""

    items: int
    bad_items: int
    written: int
    found: int
    by_kind: dict[str, list[int]]
    folder: Path
    seconds: float

    def summary(self) -> str:
        kinds = ", ".join(f"{written} {kind}" for kind, (_, written) in self.by_kind.items() if written)
        bad = f" ({self.bad_items} bad items skipped)" if self.bad_items else ""
        return (
            f"ctrlkit cache: {self.items} items{bad}; {self.written} entries written"
            f"{f' ({kinds})' if kinds else ''}, {self.found} already there; {self.folder}; {self.seconds:.1f} s"
        )


def check_cache_config(cfg: DictConfig) -> None:
    """The settings ``ctrlkit cache`` needs beyond a valid training config; one line each."""
    if not cfg.system.get("cache_dir"):  # null, or `system.cache_dir=` (an empty string)
        raise CtrlkitError(
            "system.cache_dir is required: the folder a later ctrlkit train with the same setting reads, "
            "e.g. ctrlkit cache system.cache_dir=outputs/feature_cache"
        )
    if not cfg.system.cache_latents and not cfg.system.cache_text_embeddings:
        raise CtrlkitError(
            "system.cache_latents and system.cache_text_embeddings are both false: training would read nothing "
            "from system.cache_dir"
        )
    check_train_config(cfg)
    check_settings("cache", cfg)
    check_writable_dir(cfg.system.cache_dir, "the feature cache (system.cache_dir)")


def run_cache(cfg: DictConfig) -> CacheReport:
    """Encode the first ``limit`` training items (all when null) into ``system.cache_dir``; print the summary."""
    import pytorch_lightning as pl
    from hydra.utils import instantiate
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from lightning_modules.commands.train import build_system
    from lightning_modules.data.common import GuardedDataset, collate_skipping

    started = time.perf_counter()
    check_cache_config(cfg)
    pl.seed_everything(cfg.seed, workers=True)  # as train: a model built with random weights comes out the same
    _, datamodule, _, system = build_system(cfg)
    if not system.hparams.cache_latents:
        log.warning("system.cache_latents=false: training encodes every item itself; caching text embeddings only")
    # What fit does before the first step, as far as the entries go: the precision plugin's module conversion, the
    # device, and the system's own casts (on_fit_start); the fingerprints of the frozen models are taken after it.
    trainer = instantiate(
        cfg.trainer, callbacks=[], logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    precision = trainer.precision_plugin
    device = trainer.strategy.root_device
    system = precision.convert_module(system).to(device)
    system.apply_precision(str(trainer.precision))

    datamodule.prepare_data()
    datamodule.setup("fit")
    dataset = getattr(datamodule, "train_dataset", None)
    if dataset is None:  # data=webdataset streams its shards: there is no item i to encode ahead
        raise CtrlkitError(
            f"ctrlkit cache encodes a dataset item by item; {type(datamodule).__name__} streams shards: train with "
            "system.cache_dir set instead, which fills the cache as training reads the items"
        )
    count = len(dataset) if cfg.limit is None else min(int(cfg.limit), len(dataset))
    loader = DataLoader(
        GuardedDataset(dataset, datamodule.on_error),
        batch_size=cfg.batch_size,
        sampler=range(count),  # the first `count` items, in order
        num_workers=cfg.num_workers,
        collate_fn=collate_skipping,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    items, bad_items, prompts_done = 0, 0, set()
    with (
        tqdm(total=count, desc="ctrlkit cache", unit="item", disable=not cfg.progress, dynamic_ncols=True) as bar,
        precision.train_step_context(),  # the autocast training steps run under
    ):
        for batch in loader:
            bad_items += len(batch["skipped"])
            if "pixel_values" in batch:
                # as the fit loop hands a batch over: the precision's input conversion, then the device
                pixel_values = precision.convert_input(batch["pixel_values"]).to(device)
                system.fill_feature_cache(pixel_values, list(batch["prompt"]), prompts_done)
                items += len(batch["prompt"])
            bar.update(len(batch["skipped"]) + len(batch.get("prompt", [])))
        # validation and the sample grid embed the validation prompts through the same cache (a few items)
        validation = GuardedDataset(datamodule.val_dataset, datamodule.on_error)
        val_prompts = [validation[index].get("prompt") for index in range(len(validation))]
        system.fill_feature_cache(None, [prompt for prompt in val_prompts if prompt is not None], prompts_done)

    counts = system.feature_cache.counts
    report = CacheReport(
        items=items,
        bad_items=bad_items,
        written=counts.computed,
        found=counts.read,
        by_kind=dict(counts.by_kind),
        folder=system.feature_cache.root.resolve(),
        seconds=time.perf_counter() - started,
    )
    print(report.summary())
    return report
