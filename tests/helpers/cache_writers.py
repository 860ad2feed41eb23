"""A feature-cache writer for the concurrent-writers test, in its own module: a spawned process imports the module
of its target, and this one imports only torch and the cache (not the training stack: seconds per process)."""

from __future__ import annotations

import torch

from lightning_modules.feature_cache import FeatureCache


def write_many(root: str, seed: int) -> None:
    """200 writes over 4 keys, each entry a (256, 256) tensor filled with ``seed``: long enough that the test reads
    while both write."""
    cache = FeatureCache(root)
    for round_index in range(200):
        cache.put("x", FeatureCache.key(str(round_index % 4)), {"value": torch.full((256, 256), float(seed))})
