"""Peak memory and seconds per step of an SD1.5-architecture ControlNet step on this CPU: ours and diffusers'.

Run by hand:  python benchmarks/memory.py [--size 128] [--repeats 2] [--profile]
One process per configuration (peak RSS is per process): fp32, bf16, bf16 + gradient checkpointing, each for our
training step and the diffusers-style loop (benchmarks/real_size.py), batch 1 at 128x128, random weights. On a CPU
bf16 matrix products are slow, so this is about memory and correctness, not speed. Needs ~11 GB free.
``--profile`` adds the tensor bytes one more step allocates (torch's profiler): peak RSS also holds the allocator's
slack, which moves by a few tenths of a GB from run to run.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

CONFIGS = [
    {"precision": "fp32", "checkpointing": False},
    {"precision": "bf16", "checkpointing": False},
    {"precision": "bf16", "checkpointing": True},
]


def run_one(config: dict) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.real_size import sd15_step, time_steps

    torch.set_num_threads(1)
    step = sd15_step(config, "cpu")
    seconds = time_steps(step, repeats=config["repeats"], warmup=1)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux
    result = {**config, "seconds_per_step": seconds, "peak_rss_gb": peak_gb}
    if config.get("profile"):  # the tensor bytes one more step allocates (the allocator's slack left out of it)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
            step()
        allocated = sum(max(event.self_cpu_memory_usage, 0) for event in profiler.key_averages())
        result["allocated_gb"] = allocated / 1024**3
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="also sum the tensor allocations of one more step")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a configuration, run in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))))
        return
    print(f"SD1.5-architecture ControlNet step, batch 1, {args.size}x{args.size}, 1 thread, one process each")
    print(
        f"{'loop':10} {'precision':10} {'checkpointing':14} {'s/step':>8} {'peak RSS GB':>12}"
        + (f" {'allocated GB':>14}" if args.profile else "")
    )
    for config in CONFIGS:
        for loop in ("ours", "diffusers"):
            one = {
                **config,
                "loop": loop,
                "optimizer": "adamw",
                "batch": 1,
                "size": args.size,
                "repeats": args.repeats,
                "profile": args.profile,
            }
            done = subprocess.run(
                [sys.executable, __file__, "--one", json.dumps(one)], capture_output=True, text=True, check=False
            )
            if done.returncode != 0:
                print(f"{loop:10} {config['precision']:10} failed: {done.stderr.strip().splitlines()[-1:]}")
                continue
            result = json.loads(done.stdout.strip().splitlines()[-1])
            print(
                f"{loop:10} {config['precision']:10} {str(config['checkpointing']):14} "
                f"{result['seconds_per_step']:8.1f} {result['peak_rss_gb']:12.2f}"
                + (f" {result['allocated_gb']:14.2f}" if args.profile else "")
            )


if __name__ == "__main__":
    main()
