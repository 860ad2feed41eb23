"""The grounding condition (GLIGEN-style boxes + phrases), batched: what grounding adapters take.

It travels as this one type from the collated batch (or the dataset item, a batch of one) to the adapter; the
methods below are everything callers do with it (move, index, stack, drop), so none of them looks inside.
Plain tensors and lists only: the ``conditions`` package builds padded slots, ``lightning_modules`` turns them into
this, and the text encoder fills ``phrase_embeddings`` (and, for adapters that read them, ``phrase_contexts``) from
``phrases`` (``Backbone.embed_grounding``). The last two functions are the geometry of boxes over a UNet block's
token grid, shared by the box-masked attention and regional prompts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass
class GroundingCondition:
    """B images with N grounding slots each (GLIGEN's padded layout).

    Args:
        boxes: (B, N, 4) float, normalised xyxy in [0, 1]; zeros in empty slots.
        masks: (B, N) float, 1 for a real box, 0 for an empty slot.
        phrases: B lists of N strings ("" in empty slots), or None once only the embeddings are needed.
        phrase_embeddings: (B, N, D) pooled text-encoder embeddings of the phrases (D = the text encoder's width),
            or None until the text encoder has embedded ``phrases``.
        phrase_contexts: (B, N, L, D) each phrase encoded alone as a prompt is (the text encoder's hidden states,
            L tokens), or None: only adapters with ``reads_phrase_contexts`` ask for them (regional prompts).
    """

    boxes: torch.Tensor
    masks: torch.Tensor
    phrases: list[list[str]] | None = None
    phrase_embeddings: torch.Tensor | None = None
    phrase_contexts: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.boxes.ndim != 3 or self.boxes.shape[-1] != 4 or self.masks.shape != self.boxes.shape[:2]:
            raise ValueError(
                f"grounding needs boxes (B, N, 4) and masks (B, N), got {tuple(self.boxes.shape)} and "
                f"{tuple(self.masks.shape)}"
            )
        batch, slots = self.masks.shape
        if self.phrases is not None and (len(self.phrases) != batch or any(len(row) != slots for row in self.phrases)):
            raise ValueError(f"grounding phrases must be {batch} lists of {slots} strings (one per slot)")
        if self.phrase_embeddings is not None and (
            self.phrase_embeddings.ndim != 3 or self.phrase_embeddings.shape[:2] != (batch, slots)
        ):
            raise ValueError(
                f"phrase_embeddings {tuple(self.phrase_embeddings.shape)} do not match ({batch}, {slots}, D) slots"
            )
        if self.phrase_contexts is not None and (
            self.phrase_contexts.ndim != 4 or self.phrase_contexts.shape[:2] != (batch, slots)
        ):
            raise ValueError(
                f"phrase_contexts {tuple(self.phrase_contexts.shape)} do not match ({batch}, {slots}, L, D) slots"
            )

    @classmethod
    def from_slots(
        cls,
        boxes: torch.Tensor,
        masks: torch.Tensor,
        phrases: list[str],
        phrase_embeddings: torch.Tensor | None = None,
    ) -> GroundingCondition:
        """One image's padded slots (``conditions.boxes.pad_grounding``: boxes (N, 4), masks (N,), N phrases;
        optional embeddings (N, D)) -> a batch of one."""
        return cls(
            boxes=torch.as_tensor(boxes, dtype=torch.float32)[None],
            masks=torch.as_tensor(masks, dtype=torch.float32)[None],
            phrases=[list(phrases)],
            phrase_embeddings=None if phrase_embeddings is None else phrase_embeddings[None],
        )

    @classmethod
    def cat(cls, conditions: list[GroundingCondition]) -> GroundingCondition:
        """The conditions stacked along the batch (collation; classifier-free guidance's two halves). Phrases and
        embeddings are kept only if every part has them."""
        if not conditions:
            raise ValueError("nothing to concatenate")
        has_phrases = all(c.phrases is not None for c in conditions)
        has_embeddings = all(c.phrase_embeddings is not None for c in conditions)
        has_contexts = all(c.phrase_contexts is not None for c in conditions)
        return cls(
            boxes=torch.cat([c.boxes for c in conditions]),
            masks=torch.cat([c.masks for c in conditions]),
            phrases=[row for c in conditions for row in c.phrases] if has_phrases else None,
            phrase_embeddings=torch.cat([c.phrase_embeddings for c in conditions]) if has_embeddings else None,
            phrase_contexts=torch.cat([c.phrase_contexts for c in conditions]) if has_contexts else None,
        )

    def __len__(self) -> int:
        """The batch size B."""
        return self.masks.shape[0]

    @property
    def num_slots(self) -> int:
        return self.masks.shape[1]

    def __getitem__(self, index: int | slice | torch.Tensor) -> GroundingCondition:
        """Items of the batch, still batched: an int gives a batch of one, a slice or index tensor a sub-batch."""
        if isinstance(index, int):
            position = range(len(self))[index]  # IndexError outside the batch
            index = slice(position, position + 1)
        rows = range(len(self))[index] if isinstance(index, slice) else torch.as_tensor(index).tolist()
        return GroundingCondition(
            boxes=self.boxes[index],
            masks=self.masks[index],
            phrases=None if self.phrases is None else [self.phrases[row] for row in rows],
            phrase_embeddings=None if self.phrase_embeddings is None else self.phrase_embeddings[index],
            phrase_contexts=None if self.phrase_contexts is None else self.phrase_contexts[index],
        )

    def expand(self, batch: int) -> GroundingCondition:
        """A batch of one repeated ``batch`` times (the same grounding for every prompt)."""
        if len(self) != 1:
            raise ValueError(f"only a batch of one expands, this grounding has {len(self)}")
        return GroundingCondition.cat([self] * batch)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> GroundingCondition:
        """The tensors on ``device`` and, if given, in floating ``dtype``; phrases are kept."""
        return dataclasses.replace(
            self,
            boxes=self.boxes.to(device=device, dtype=dtype),
            masks=self.masks.to(device=device, dtype=dtype),
            phrase_embeddings=None
            if self.phrase_embeddings is None
            else self.phrase_embeddings.to(device=device, dtype=dtype),
            phrase_contexts=None
            if self.phrase_contexts is None
            else self.phrase_contexts.to(device=device, dtype=dtype),
        )

    def pin_memory(self) -> GroundingCondition:
        """Pinned host tensors (the data loader's ``pin_memory=True`` calls this)."""
        return dataclasses.replace(
            self,
            boxes=self.boxes.pin_memory(),
            masks=self.masks.pin_memory(),
            phrase_embeddings=None if self.phrase_embeddings is None else self.phrase_embeddings.pin_memory(),
            phrase_contexts=None if self.phrase_contexts is None else self.phrase_contexts.pin_memory(),
        )

    def drop(self, dropped: torch.Tensor) -> GroundingCondition:
        """Null grounding for the items where ``dropped`` (B,) bool is True: every slot empty (masks 0), so a
        grounding adapter reads only its learnt null tokens there; the other items are unchanged."""
        keep = (~dropped).to(device=self.masks.device, dtype=self.masks.dtype)
        return dataclasses.replace(self, masks=self.masks * keep[:, None])

    def with_embeddings(
        self, phrase_embeddings: torch.Tensor, phrase_contexts: torch.Tensor | None = None
    ) -> GroundingCondition:
        """The same grounding with ``phrase_embeddings`` (B, N, D) and ``phrase_contexts`` (B, N, L, D) or None."""
        return dataclasses.replace(self, phrase_embeddings=phrase_embeddings, phrase_contexts=phrase_contexts)

    def filled_slots(self) -> list[tuple[torch.Tensor, list[str]]]:
        """Per image, the real boxes (n, 4) and their phrases, in slot order (needs ``phrases``)."""
        if self.phrases is None:
            raise ValueError("this grounding has no phrases")
        filled = []
        for boxes, masks, phrases in zip(self.boxes, self.masks, self.phrases):
            slots = [slot for slot in range(len(phrases)) if masks[slot] > 0]
            filled.append((boxes[slots], [phrases[slot] for slot in slots]))
        return filled


def token_grid(latent_size: tuple[int, int], num_tokens: int) -> tuple[int, int, int]:
    """(rows, cols, stride) of a block's ``num_tokens`` visual tokens (row-major). The UNet halves the latent
    (H, W) per level, rounding up, so a block's grid is ceil(H / s) x ceil(W / s) for the stride s = 2^k whose cell
    count is ``num_tokens``."""
    height, width = latent_size
    stride = 1
    while True:
        rows, cols = -(-height // stride), -(-width // stride)
        if rows * cols == num_tokens:
            return rows, cols, stride
        if rows * cols < num_tokens:
            raise ValueError(
                f"{num_tokens} visual tokens fit no grid of a {height}x{width} latent halved per level "
                f"(ceil(H / 2^k) x ceil(W / 2^k))"
            )
        stride *= 2


def cell_box_overlap(boxes: torch.Tensor, latent_size: tuple[int, int], num_tokens: int) -> torch.Tensor:
    """(B, num_tokens, N) bool: whether each visual token's cell overlaps each box (B, N, 4, normalised xyxy) with
    positive area. Cell (r, c) covers latent rows [r s, (r + 1) s) and columns [c s, (c + 1) s), clipped to the
    latent, in normalised coordinates."""
    rows, cols, stride = token_grid(latent_size, num_tokens)
    height, width = latent_size
    row_edges = (torch.arange(rows + 1, device=boxes.device) * stride).clamp(max=height) / height
    col_edges = (torch.arange(cols + 1, device=boxes.device) * stride).clamp(max=width) / width
    x0, y0, x1, y1 = boxes.float().unbind(-1)  # each (B, N)
    in_rows = (y0[:, None, :] < row_edges[None, 1:, None]) & (y1[:, None, :] > row_edges[None, :-1, None])
    in_cols = (x0[:, None, :] < col_edges[None, 1:, None]) & (x1[:, None, :] > col_edges[None, :-1, None])
    return (in_rows[:, :, None, :] & in_cols[:, None, :, :]).reshape(boxes.shape[0], rows * cols, -1)
