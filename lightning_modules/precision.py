"""Memory and speed settings of a run: mixed precision as diffusers' scripts do it, SDPA attention checked.

Frozen weights go to the compute dtype, trained ones stay fp32.

Under ``trainer.precision=bf16-mixed`` or ``16-mixed`` autocast runs the matrix products in half precision, but
weights kept in fp32 still take twice the memory they need. The frozen VAE, text encoder and UNet (and any frozen
part of an adapter) are cast to the compute dtype; the weights that train stay fp32, so the optimizer updates
them in full precision (a run whose trainable weights are not fp32, e.g. ``bf16-true``, stops with one line).
The VAE may keep its own dtype (``vae_dtype``: SDXL's VAE overflows in fp16 and is run in fp32).
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_modules.errors import CtrlkitError

# Lightning precision setting -> the dtype frozen weights are cast to
MIXED_PRECISION_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str | None, what: str) -> torch.dtype | None:
    """ "float32" / "float16" / "bfloat16" -> the torch dtype; None stays None; anything else is a one-line error."""
    if name is None:
        return None
    if name not in DTYPES:
        raise CtrlkitError(f"{what}='{name}'; allowed: {', '.join(DTYPES)} or null")
    return DTYPES[name]


def cast_frozen(module: nn.Module, dtype: torch.dtype) -> int:
    """Cast the parameters of ``module`` that do not train (and its floating buffers) to ``dtype`` in place; the
    trainable ones keep theirs. Returns the number of parameters cast."""
    cast = 0
    for parameter in module.parameters():
        if not parameter.requires_grad and parameter.is_floating_point() and parameter.dtype != dtype:
            parameter.data = parameter.data.to(dtype)
            cast += parameter.numel()
    for submodule in module.modules():
        for name, buffer in submodule.named_buffers(recurse=False):
            if buffer is not None and buffer.is_floating_point():
                setattr(submodule, name, buffer.to(dtype))
    return cast


def check_trainable_fp32(module: nn.Module) -> None:
    """One-line error when a trainable weight is not fp32 (half-precision weights lose small updates)."""
    wrong = sorted({str(p.dtype).removeprefix("torch.") for p in module.parameters() if p.requires_grad} - {"float32"})
    if wrong:
        raise CtrlkitError(
            f"the adapter's trainable weights are {', '.join(wrong)}; they must stay float32 (use trainer.precision="
            "bf16-mixed or 16-mixed, which keep them fp32 and cast only the frozen model, not a '-true' precision)"
        )


def check_sdpa_attention(modules: dict[str, nn.Module]) -> dict[str, set[str]]:
    """The attention processors of diffusers models in ``modules`` that do not run PyTorch's
    scaled_dot_product_attention (flash / memory-efficient kernels); logged, and returned by module name."""
    import logging

    from diffusers.models.attention_processor import AttnProcessor2_0

    slow: dict[str, set[str]] = {}
    for name, module in modules.items():
        for submodule in module.modules():
            processors = getattr(submodule, "attn_processors", None)
            if isinstance(processors, dict):
                found = {type(p).__name__ for p in processors.values() if not isinstance(p, AttnProcessor2_0)}
                if found:
                    slow.setdefault(name, set()).update(found)
    for name, found in slow.items():
        logging.getLogger(__name__).warning("%s attention without SDPA: %s", name, ", ".join(sorted(found)))
    return slow


def compile_repeated_blocks(module: nn.Module) -> int:
    """``torch.compile`` each down/mid/up block of every diffusers UNet-like model inside ``module`` (the UNet, a
    ControlNet's encoder copy), in place: the repeated blocks hold nearly all the compute, and compiling them one by
    one keeps compile time short and tolerates the Python between them. Returns the number of blocks compiled."""
    # one code object per block class, so each resolution and grad mode of a class is one more graph of it
    dynamo = torch._dynamo.config
    name = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
    setattr(dynamo, name, max(getattr(dynamo, name), 64))
    compiled = 0
    for submodule in module.modules():
        blocks = [*getattr(submodule, "down_blocks", []), *getattr(submodule, "up_blocks", [])]
        middle = getattr(submodule, "mid_block", None)
        for block in [*blocks, *([middle] if middle is not None else [])]:
            if isinstance(block, nn.Module):
                block.compile(dynamic=False)  # dynamic shapes trip inductor on CPU (sympy truth value)
                compiled += 1
    return compiled


def allow_tf32(device: torch.device) -> bool:
    """TF32 matrix products and convolutions on CUDA GPUs that have them (Ampere and later): float32 training at
    tensor-core speed, with a 10-bit mantissa in the products (PyTorch's default keeps them off). No effect
    elsewhere; returns whether it was turned on."""
    if device.type != "cuda":
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True
