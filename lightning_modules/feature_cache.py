"""A disk cache of what the frozen models compute from an item: VAE posteriors and text embeddings.

The frozen VAE gives an image the same posterior in every run, every epoch and every sweep job, and the frozen
text encoder a prompt the same embedding, so they are computed once and shared through a folder. Entries are
content-addressed: the key hashes the model's weights (its fingerprint), what the model reads (the preprocessed
pixel tensor, which carries the image, the resize settings and any augmentation, or the tokenized prompt) and the
dtype. Any change to an image, the VAE or the preprocessing gives another key: a miss, never a stale entry.

An entry is one safetensors file written through a temporary name and renamed into place, so several writers
(sweep jobs, DDP ranks, ``ctrlkit cache`` workers) leave only complete entries, and a reader sees an entry whole or
not at all; safetensors reads it memory-mapped.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from conditions.io import write_atomically

log = logging.getLogger(__name__)


def module_fingerprint(module: torch.nn.Module, exclude: torch.nn.Module | None = None) -> str:
    """sha256 of a module's parameter and buffer names, dtypes, shapes and bytes: equal only for equal weights.

    ``exclude``: a module whose tensors are left out where ``module`` holds them too (an adapter whose layers live
    inside the UNet, as GLIGEN's gated layers: the base model's key must not change as they train)."""
    skipped = {tensor.data_ptr() for tensor in exclude.state_dict().values()} if exclude is not None else set()
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        if tensor.numel() and tensor.data_ptr() in skipped:
            continue
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(_bytes(tensor))
    return digest.hexdigest()


def _bytes(tensor: torch.Tensor) -> bytes:
    # reshape(-1): a 0-dim tensor (GLIGEN's gates) cannot be viewed as bytes directly
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def tensor_key_bytes(tensor: torch.Tensor) -> bytes:
    """A tensor's dtype, shape and bytes, as a key part."""
    return f"{tensor.dtype}:{tuple(tensor.shape)}".encode() + _bytes(tensor)


@dataclass
class CacheCounts:
    """How a run used the cache: entries read, and entries computed (then written)."""

    read: int = 0
    computed: int = 0
    by_kind: dict[str, list[int]] = field(default_factory=dict)

    def count(self, kind: str, hit: bool) -> None:
        read_computed = self.by_kind.setdefault(kind, [0, 0])
        read_computed[0 if hit else 1] += 1
        if hit:
            self.read += 1
        else:
            self.computed += 1


class FeatureCache:
    """Content-addressed entries under ``root``: ``<root>/<kind>/<key[:2]>/<key>.safetensors``.

    Args:
        root: the cache folder, shared by runs (e.g. ``${paths.log_dir}/feature_cache``).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        self.counts = CacheCounts()

    @staticmethod
    def key(*parts: bytes | str) -> str:
        digest = hashlib.sha256()
        for part in parts:
            data = part.encode() if isinstance(part, str) else part
            digest.update(len(data).to_bytes(8, "little"))  # lengths keep ("ab", "c") apart from ("a", "bc")
            digest.update(data)
        return digest.hexdigest()

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key[:2] / f"{key}.safetensors"

    def get(self, kind: str, key: str) -> dict[str, torch.Tensor] | None:
        """The entry's tensors, or None when there is none (or it cannot be read: then it is computed again)."""
        path = self.path(kind, key)
        if not path.is_file():
            return None
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            log.warning("feature cache entry %s is unreadable (%s); computing it again", path, error)
            return None

    def put(self, kind: str, key: str, tensors: dict[str, torch.Tensor]) -> None:
        path = self.path(kind, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, save({name: t.detach().cpu().contiguous() for name, t in tensors.items()}))

    def get_or_compute(self, kind: str, key: str, compute) -> dict[str, torch.Tensor]:
        """The entry under ``key``, or ``compute()``'s tensors, written for the next run."""
        found = self.get(kind, key)
        self.counts.count(kind, found is not None)
        if found is not None:
            return found
        tensors = compute()
        self.put(kind, key, tensors)
        return tensors

    def summary(self) -> str:
        parts = [f"{kind}: {read} read, {computed} computed" for kind, (read, computed) in self.counts.by_kind.items()]
        return f"feature cache {self.root}: " + ("; ".join(parts) if parts else "not used")
