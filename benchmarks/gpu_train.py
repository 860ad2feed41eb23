"""SD1.5- and SDXL-architecture ControlNet training on one GPU: samples/s and peak memory per recipe, ours against
diffusers' loop, in one process (random weights: nothing is downloaded). Under 5 minutes on one H100/H200-class GPU.

Run:  python benchmarks/gpu_train.py [--repeats 10] [--skip-sdxl]
Targets (issue 15): a recipe that trains SD1.5 at batch 1 in <= 10 GB (bf16 + checkpointing + 8-bit Adam, with
trainer.accumulate_grad_batches=4 for an effective batch of 4); bf16 batch 8 >= 1.3x the samples/s of diffusers'
loop; SDXL at 1024x1024 batch 1 in <= 24 GB. 8-bit Adam needs `pip install bitsandbytes`; without it those rows
say so and the rest run.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.real_size import sd15_step, sdxl_step, time_steps  # noqa: E402

SD15 = [  # (label, loop, precision, checkpointing, optimizer, compile or channels_last, batch)
    ("fp32", "ours", "fp32", False, "adamw", False, 8),
    ("bf16", "ours", "bf16", False, "adamw", False, 8),
    ("bf16 + checkpointing", "ours", "bf16", True, "adamw", False, 8),
    ("bf16 + checkpointing + 8-bit Adam (batch 1)", "ours", "bf16", True, "adamw8bit", False, 1),
    ("bf16 + compile", "ours", "bf16", False, "adamw", True, 8),
    ("bf16 + channels_last", "ours", "bf16", False, "adamw", "channels_last", 8),
    ("diffusers loop, bf16", "diffusers", "bf16", False, "adamw", False, 8),
    ("diffusers loop, 12 GB flags (fp16, ckpt, 8-bit, batch 1)", "diffusers", "fp16", True, "adamw8bit", False, 1),
]


def measure(build, config: dict, repeats: int) -> tuple[float, float] | str:
    """(samples/s, peak GB) of one configuration, or the reason it could not run."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        step = build(config, "cuda")
        seconds = time_steps(step, repeats=repeats, warmup=3, synchronize=torch.cuda.synchronize)
    except SystemExit as error:  # a missing optional extra
        return str(error)
    except torch.cuda.OutOfMemoryError:
        return "out of memory"
    finally:
        gc.collect()
    return config["batch"] / seconds, torch.cuda.max_memory_allocated() / 1024**3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--skip-sdxl", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_train.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, SD1.5 ControlNet at 512x512")
    print(f"{'recipe':58} {'samples/s':>10} {'peak GB':>9}")
    rows = {}
    for label, loop, precision, checkpointing, optimizer, compiled, batch in SD15:
        config = {"loop": loop, "precision": precision, "checkpointing": checkpointing, "optimizer": optimizer}
        config.update(compile=compiled is True, channels_last=compiled == "channels_last", batch=batch, size=512)
        result = measure(sd15_step, config, args.repeats)
        rows[label] = result
        print(f"{label:58} " + (f"{result[0]:10.2f} {result[1]:9.2f}" if isinstance(result, tuple) else result))
    ours, theirs = rows["bf16"], rows["diffusers loop, bf16"]
    if isinstance(ours, tuple) and isinstance(theirs, tuple):
        print(f"bf16 batch 8, ours / diffusers' loop: {ours[0] / theirs[0]:.2f}x samples/s (target >= 1.3x)")
    if not args.skip_sdxl:
        config = {"loop": "diffusers", "precision": "bf16", "checkpointing": True, "optimizer": "adamw8bit"}
        result = measure(sdxl_step, {**config, "batch": 1, "size": 1024}, args.repeats)
        if isinstance(result, str):  # no bitsandbytes: plain AdamW
            result = measure(sdxl_step, {**config, "optimizer": "adamw", "batch": 1, "size": 1024}, args.repeats)
        label = "SDXL 1024x1024 batch 1, bf16 + checkpointing"
        print(f"{label:58} " + (f"{result[0]:10.2f} {result[1]:9.2f}" if isinstance(result, tuple) else result))


if __name__ == "__main__":
    main()
