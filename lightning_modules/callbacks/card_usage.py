"""The model card's "Use" section: how to load an exported adapter folder, in diffusers where its files are a
diffusers model, else through ctrlkit's ``load_adapter`` (the files name which)."""

from __future__ import annotations

import json
from pathlib import Path

HOW_TO_LOAD = {
    "controlnet": 'from diffusers import ControlNetModel\n\ncontrolnet = ControlNetModel.from_pretrained("{folder}")',
    "t2i-adapter": 'from diffusers import T2IAdapter\n\nadapter = T2IAdapter.from_pretrained("{folder}")',
    "controlnet-xs": (
        "from diffusers import ControlNetXSAdapter\n\n"
        "# for StableDiffusionControlNetXSPipeline(..., unet=<the base UNet>, controlnet=controlnet)\n"
        'controlnet = ControlNetXSAdapter.from_pretrained("{folder}")'
    ),
    "gligen": (
        "from diffusers import UNet2DConditionModel\n\n"
        '# the whole UNet with its gated layers (attention_type="gated"); gligen.safetensors holds those layers only\n'
        'unet = UNet2DConditionModel.from_pretrained("{folder}/unet")'
    ),
}
# a ControlNet-XS for a UNet with one layer per block (config.json says layers_per_block): diffusers builds two
CONTROLNET_XS_ONE_LAYER = (
    "from adapters import load_adapter\n\n"
    "# made for a UNet with one layer per block, which diffusers' ControlNet-XS classes do not build: load it with\n"
    "# ctrlkit, which runs it with your base model's UNet\n"
    'adapter, found = load_adapter("{folder}", unet)'
)
# a GLIGEN export without unet/ (adapter.build.export_unet=false): its layers load into a base UNet through ctrlkit
GLIGEN_LAYERS_ONLY = (
    "from adapters import load_adapter\n\n"
    "# gligen.safetensors holds GLIGEN's layers only: load_adapter adds them to your base model's UNet in place\n"
    'adapter, found = load_adapter("{folder}", unet)'
)

# one ControlNet over several conditions (adapters/multi_condition.py): a diffusers ControlNetModel whose condition
# is the stacked map of conditions/multi.py
MULTI_CONDITION = (
    "from diffusers import ControlNetModel\n\n"
    "# a ControlNetModel whose condition stacks the parts named in multi_condition.json (one map each, then a\n"
    "# presence plane per part, 1 where given): see conditions/multi.py. With ctrlkit, any subset of the parts:\n"
    "#   ctrlkit generate 'units=[{{adapter: {folder}, parts: {{canny: edges.png}}}}]' 'prompts=[...]'\n"
    'controlnet = ControlNetModel.from_pretrained("{folder}")'
)
# Control-LoRA (adapters/control_lora.py): its file loads with ctrlkit, which rebuilds the frozen copy from the base
CONTROL_LORA = (
    "from adapters import load_adapter\n\n"
    "# control_lora.safetensors holds the LoRA, hint encoder and zero convolutions; the frozen encoder copy is\n"
    "# rebuilt from the base UNet it was trained on (ctrlkit refuses a base with other weights)\n"
    'adapter, found = load_adapter("{folder}", unet)'
)
# ... and, exported with export_merged (the default), the LoRA merged into a plain diffusers ControlNetModel
CONTROL_LORA_MERGED = (
    "from diffusers import ControlNetModel\n\n"
    "# controlnet/ is the LoRA merged into a plain ControlNetModel; control_lora.safetensors (LoRA, hint encoder and\n"
    '# zero convolutions) loads with ctrlkit: adapters.load_adapter("{folder}", unet)\n'
    'controlnet = ControlNetModel.from_pretrained("{folder}/controlnet")'
)
# a layout ControlNet (adapters/layout_controlnet.py): a ControlNetModel whose map ctrlkit draws from boxes + phrases
LAYOUT_CONTROLNET = (
    "from adapters import load_adapter\n\n"
    "# a diffusers ControlNetModel whose condition is a layout map that adapter.layout_map(grounding, size) draws\n"
    "# from boxes + phrases through layout_projection.safetensors; load both with ctrlkit:\n"
    'adapter, found = load_adapter("{folder}", unet)'
)
# a ControlNet trained with its UNet's decoder (unlock_unet_decoder): the ControlNet alone is not the model
DECODER_NOTE = (
    "# unet_decoder.safetensors: this run also trained the base UNet's decoder (unlock_unet_decoder), so the\n"
    "# ControlNet alone is not the model: ctrlkit's load_adapter loads that decoder into the UNet it is given,\n"
    "# in place (every adapter then composed with it sees the changed decoder)\n"
)


def how_to_load(family: str, folder: Path) -> str:
    """The card's "Use" snippet for an exported adapter folder of ``family`` (a Hub tag: ``adapter_family``),
    chosen by the files the export wrote."""
    if family == "gligen" and not (folder / "unet").is_dir():
        return GLIGEN_LAYERS_ONLY.format(folder=folder.name)
    if family == "controlnet-xs" and "layers_per_block" in _json_or_empty(folder / "config.json"):
        return CONTROLNET_XS_ONE_LAYER.format(folder=folder.name)
    if (folder / "multi_condition.json").is_file():
        return MULTI_CONDITION.format(folder=folder.name)
    if (folder / "control_lora.safetensors").is_file():
        merged = (folder / "controlnet").is_dir()
        return (CONTROL_LORA_MERGED if merged else CONTROL_LORA).format(folder=folder.name)
    if (folder / "layout_controlnet.json").is_file():
        usage = LAYOUT_CONTROLNET
    else:
        usage = HOW_TO_LOAD.get(family, "# see the ctrlkit README for this adapter's format")
    if (folder / "unet_decoder.safetensors").is_file():
        usage = DECODER_NOTE + usage
    return usage.format(folder=folder.name)


def _json_or_empty(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
