"""A new adapter family in a file of your own: it registers itself, saves, and loads back by the registry.

Run:  python -m examples.new_adapter   (as a module, so the marker names it `examples.new_adapter:PooledConvAdapter`)
Prints the registered families (yours among them), the marker written into the saved folder, and "round trip
exact: True". The same folder loads in `ctrlkit generate units=[{adapter: <folder>, condition_image: ...}]`
with no edit to ctrlkit, as long as this module is importable (its `module:Class` is in the marker).
To train it, give it a yaml in a config folder of your own and add it to Hydra's search path:
    ctrlkit train hydra.searchpath=[file://my_conf] adapter=pooled_conv
(tests/adapters/test_adapter_contract.py does exactly that with the same kind of adapter).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adapters import ConditioningAdapter, adapter_families, load_adapter  # noqa: E402
from lightning_modules.backbone import load_tiny_backbone  # noqa: E402


class PooledConvAdapter(ConditioningAdapter):
    """The condition average-pooled to the latent size, through a zero-initialised 1x1 convolution, added inside
    the UNet's first down block: the smallest adapter that follows the contract."""

    family = "pooled_conv"
    title = "pooled 1x1-conv adapter"
    accepts = "image"
    zero_initialized = True

    def __init__(self, conditioning_channels: int, out_channels: int, vae_scale_factor: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(conditioning_channels, out_channels, kernel_size=1)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        self.vae_scale_factor = vae_scale_factor

    @classmethod
    def from_unet(cls, unet, *, vae_scale_factor: int = 8, conditioning_channels: int = 3) -> PooledConvAdapter:
        return cls(conditioning_channels, unet.config.block_out_channels[0], vae_scale_factor)

    @property
    def condition_channels(self) -> int:
        return self.conv.in_channels

    def forward(self, condition, *, noisy_latents, timesteps, encoder_hidden_states):
        pooled = F.avg_pool2d(condition.to(noisy_latents.dtype), self.vae_scale_factor)
        return {"down_intrablock_additional_residuals": [self.conv(pooled)]}

    def save_weights(self, directory: Path) -> None:
        save_file(self.conv.state_dict(), str(directory / "conv.safetensors"))
        config = {"conditioning_channels": self.conv.in_channels, "out_channels": self.conv.out_channels}
        (directory / "conv_config.json").write_text(json.dumps({**config, "vae_scale_factor": self.vae_scale_factor}))

    @classmethod
    def from_pretrained(cls, path, unet=None) -> PooledConvAdapter:
        adapter = cls(**json.loads((Path(path) / "conv_config.json").read_text()))
        adapter.conv.load_state_dict(load_file(str(Path(path) / "conv.safetensors")))
        return adapter


def main() -> None:
    print("registered families:", ", ".join(adapter_families()))
    backbone = load_tiny_backbone()
    adapter = PooledConvAdapter.from_unet(backbone.unet, vae_scale_factor=backbone.vae_scale_factor)
    with torch.no_grad():
        adapter.conv.weight.normal_(std=0.1)  # as training would move it
    with tempfile.TemporaryDirectory() as folder:
        adapter.save_pretrained(folder)
        print("marker:", (Path(folder) / "ctrlkit_adapter.json").read_text().strip().replace("\n", " "))
        loaded, found = load_adapter(folder, backbone.unet)
        print("loaded as:", found)
        same = all(torch.equal(a, b) for a, b in zip(adapter.state_dict().values(), loaded.state_dict().values()))
        print("round trip exact:", same)


if __name__ == "__main__":
    main()
