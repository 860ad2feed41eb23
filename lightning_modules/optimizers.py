"""Optimizer factories the ``conf/optimizer`` group names where torch's own class is not enough: AdamW fused on
CUDA, and 8-bit AdamW from bitsandbytes (an optional extra) with a one-line error where it cannot run."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from lightning_modules.errors import CtrlkitError


def _on_cuda(params: list[dict]) -> bool:
    parameters = [p for group in params for p in group["params"]]
    return bool(parameters) and all(p.is_cuda for p in parameters)


def adamw(
    params: Iterable[dict],
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    amsgrad: bool = False,
) -> torch.optim.AdamW:
    """``torch.optim.AdamW``, with the fused CUDA kernel when every parameter is on a GPU (one kernel per step
    instead of one per tensor); on a CPU the plain implementation, as before."""
    params = list(params)  # param groups, each with its own lr (``lr`` is torch's default for groups without)
    fused = True if _on_cuda(params) else None
    return torch.optim.AdamW(
        params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, fused=fused
    )


def adamw8bit(
    params: Iterable[dict],
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.01,
):
    """bitsandbytes' ``AdamW8bit``: optimizer states in 8 bits (a quarter of AdamW's memory for them), CUDA only."""
    params = list(params)
    try:
        import bitsandbytes
    except ImportError as error:
        raise CtrlkitError(
            "optimizer=adamw8bit needs bitsandbytes, an optional extra: pip install 'ctrlkit[bnb]' (CUDA only)"
        ) from error
    if not _on_cuda(params):
        raise CtrlkitError(
            "optimizer=adamw8bit keeps 8-bit states on a CUDA GPU; this run's parameters are not on one "
            "(use optimizer=adamw, or trainer=gpu)"
        )
    return bitsandbytes.optim.AdamW8bit(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
