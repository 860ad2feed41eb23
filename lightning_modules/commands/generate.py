"""``ctrlkit generate``: sample a batch of prompts under a composition of conditioning units.

Each unit names adapter weights (whatever ``ctrlkit train`` exported, a diffusers folder or an original single
file), its condition (a condition image, or a source image and the extractor to run on it, fitted to the
generation size pixel-perfectly) and its scale, step window, guidance mode and optional region mask. Writes each
image as PNG, a grid (conditions | result, one row per prompt) and the composition used, and prints the paths.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import torch
import yaml
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from PIL import Image
from torchvision.utils import make_grid

from adapters import InitImage, make_scheduler, sample_latents
from adapters.composition import Composition
from adapters.grounding import GroundingCondition
from adapters.registry import load_adapters
from conditions import read_image
from conditions.boxes import GroundingRecord, draw_boxes, pad_grounding
from conditions.io import check_writable_dir
from conditions.multi import stack_parts
from conditions.ranges import images_to_numpy, uint8_to_unit
from conditions.resize import fit_map
from lightning_modules.backbone import Backbone
from lightning_modules.commands.config_checks import hydra_node, unit_condition
from lightning_modules.commands.unit_checks import read_composition_settings, unit_from_spec, unit_specs
from lightning_modules.commands.value_checks import check_settings
from lightning_modules.errors import CtrlkitError
from lightning_modules.shipped_adapters import resolve_adapter

log = logging.getLogger(__name__)


def build_extractor(extractor: str | dict, size: tuple[int, int]):
    """The extractor a unit names (``conf/condition/<name>.yaml``, or ``{name: <it>, <setting>: <value>}``),
    fitting its map to ``size`` (crop and resize, pixel perfect: the detector runs at the resolution that maps the
    source onto the generation size)."""
    condition = unit_condition(extractor)
    extractor_cfg = OmegaConf.to_container(condition.extractor, resolve=False)
    if "channels" in extractor_cfg:
        extractor_cfg["channels"] = condition.channels
    extractor_cfg["resize"] = {"output_size": list(size), "mode": "crop_and_resize", "pixel_perfect": True}
    return instantiate(extractor_cfg)


def condition_map(spec: dict, size: tuple[int, int]) -> np.ndarray:
    """A unit's condition as an HxWxC uint8 map at the generation size."""
    if spec.get("condition_image"):
        image = read_image(spec["condition_image"])
        return fit_map(image, size, "crop_and_resize", cv2.INTER_AREA)
    if spec.get("source_image") and spec.get("extractor"):
        return build_extractor(spec["extractor"], size).process(read_image(spec["source_image"]))
    raise CtrlkitError(
        f"unit {spec.get('adapter')}: give condition_image=<map>, or source_image=<photo> and extractor=<name>"
    )


def parts_map(spec: dict, adapter, size: tuple[int, int]) -> np.ndarray:
    """A multi-condition unit's ``parts`` ({part name: map image}, any subset) -> its stacked HxWxC uint8 map
    (``conditions.multi``: the given parts, zeros and no presence for the others)."""
    if not hasattr(adapter, "part_names"):
        raise CtrlkitError(
            f"unit {spec['adapter']}: parts= is for a multi-condition adapter (adapter=controlnet_multi); give this "
            "one condition_image=<map>"
        )
    layout, parts = dict(zip(adapter.part_names, adapter.part_channels)), spec.get("parts")
    if not parts:
        raise CtrlkitError(
            f"unit {spec['adapter']}: a multi-condition adapter takes parts={{<part>: <map image>, ...}}, any of: "
            f"{', '.join(layout)} (not condition_image or source_image)"
        )
    maps = {name: fit_map(read_image(file), size, "crop_and_resize", cv2.INTER_AREA) for name, file in parts.items()}
    try:
        return stack_parts(maps, layout, size)
    except ValueError as error:
        raise CtrlkitError(f"unit {spec['adapter']}: {error}") from error


def to_condition_tensor(condition: np.ndarray, channels: int, batch: int) -> torch.Tensor:
    """HxWxC uint8 -> (batch, channels, H, W) float in [0, 1]; grey maps fill RGB, RGB maps give one channel."""
    tensor = uint8_to_unit(condition)
    tensor = tensor[:channels] if tensor.shape[0] >= channels else tensor[:1].expand(channels, -1, -1)
    return tensor.unsqueeze(0).expand(batch, -1, -1, -1).contiguous()


def build_units(specs: list[dict], backbone: Backbone, size: tuple[int, int], batch: int) -> tuple[list, list]:
    """Unit specs (checked by ``unit_checks.unit_specs``) -> ControlUnits and the condition maps (for the grid)."""
    units, maps = [], []
    for index, (spec, (adapter, found)) in enumerate(
        zip(specs, load_adapters([resolve_adapter(s["adapter"]) for s in specs], backbone.unet))
    ):
        log.info("unit %d: %s read as %s", index, spec["adapter"], found)
        if adapter.accepts == "grounding":
            condition, drawn = grounding_condition(spec, adapter, backbone, size, batch)
        elif spec.get("parts") or hasattr(adapter, "part_names"):
            drawn = parts_map(spec, adapter, size)
            condition = to_condition_tensor(drawn, adapter.condition_channels, batch)
        else:
            drawn = condition_map(spec, size)
            condition = to_condition_tensor(drawn, adapter.condition_channels, batch)
        units.append(
            unit_from_spec(spec, adapter.eval(), condition, size, name=f"{index}: {Path(spec['adapter']).name}")
        )
        maps.append(drawn if drawn.ndim == 3 else drawn[..., None])
    return units, maps


def grounding_condition(spec: dict, adapter, backbone: Backbone, size: tuple[int, int], batch: int):
    """``boxes`` (normalised xyxy) + ``phrases`` -> GLIGEN's ``GroundingCondition`` (phrases embedded) for
    ``batch`` prompts, and a picture of the boxes for the grid."""
    if not spec.get("boxes") or not spec.get("phrases"):
        raise CtrlkitError(f"unit {spec['adapter']}: a GLIGEN unit needs boxes=[[x0, y0, x1, y1], ...] and phrases")
    try:
        slots = pad_grounding(GroundingRecord(np.array(spec["boxes"]), list(spec["phrases"])), adapter.max_objects)
    except ValueError as error:
        raise CtrlkitError(f"unit {spec['adapter']}: {error}") from error
    condition = GroundingCondition.from_slots(**slots).expand(batch)
    condition = backbone.embed_grounding(condition, contexts=adapter.reads_phrase_contexts)
    boxes = torch.tensor(spec["boxes"], dtype=torch.float32)[None]
    drawn = images_to_numpy(draw_boxes(torch.zeros(1, 3, *size), boxes))[0]
    return condition, drawn


def save_grid(maps: list[np.ndarray], images: np.ndarray, path: Path) -> None:
    """One row per prompt: each unit's condition map, then the generated image (uint8 HxWx3 tiles, no padding)."""
    conditions = [torch.from_numpy(np.ascontiguousarray(m)).permute(2, 0, 1) for m in maps]
    conditions = [c.expand(3, -1, -1) if c.shape[0] == 1 else c[:3] for c in conditions]
    tiles = [tile for image in images for tile in (*conditions, torch.from_numpy(image).permute(2, 0, 1))]
    grid = make_grid(tiles, nrow=len(maps) + 1, padding=0)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)


def init_image(cfg: DictConfig, backbone: Backbone, size: tuple[int, int], batch: int, generator) -> InitImage | None:
    """``init_image`` (and ``mask_image``) -> where sampling starts (``adapters.sampling.InitImage``), or None.

    As diffusers' ControlNet img2img / inpainting pipelines: the image in [-1, 1] is encoded with a posterior sample
    from ``generator``; the mask is binarized at 0.5 and taken to latent size by nearest neighbour; an inpainting
    UNet (9 input channels) also gets the latents of the image with the masked part blacked out."""
    if not cfg.get("init_image"):
        if cfg.get("mask_image"):
            raise CtrlkitError("mask_image needs init_image=<the image to repaint>")
        return None
    strength = cfg.get("strength")
    if strength is not None and strength > 1:
        raise CtrlkitError(f"strength={strength}; allowed: a number in [0, 1]")
    pixels = _read_fitted(cfg.init_image, "init_image", size)
    pixels = (uint8_to_unit(pixels) * 2 - 1).unsqueeze(0).expand(batch, -1, -1, -1)
    mask = masked = None
    if cfg.get("mask_image"):
        mask = _pixel_mask(cfg, size).unsqueeze(0).expand(batch, -1, -1, -1)
    if strength is None:
        strength = 1.0 if mask is not None else 0.8
    device = backbone.unet.device
    latents = backbone.encode_images(pixels.to(device), generator=generator)
    if mask is not None:
        if backbone.unet.config.in_channels > latents.shape[1]:  # an inpainting UNet reads the masked image too
            masked = backbone.encode_images((pixels * (mask < 0.5)).to(device), generator=generator)
        mask = torch.nn.functional.interpolate(mask, size=latents.shape[-2:]).to(device)
    return InitImage(latents, float(strength), mask, masked)


def paste_unmasked(images: torch.Tensor, cfg: DictConfig, size: tuple[int, int]) -> torch.Tensor:
    """The init image's own pixels where the mask is black: the VAE decoder (its mid-block attention sees the whole
    image) otherwise shifts the kept part's colours too (diffusers' ``apply_overlay``; keep_unmasked_pixels=false
    returns the decoder's output, as diffusers' inpainting pipelines do by default)."""
    init = uint8_to_unit(_read_fitted(cfg.init_image, "init_image", size)).to(images.device)
    mask = _pixel_mask(cfg, size).to(images.device)
    return mask * images + (1 - mask) * init


def _pixel_mask(cfg: DictConfig, size: tuple[int, int]) -> torch.Tensor:
    """``mask_image`` -> (1, H, W) in {0, 1}, 1 where to repaint (grey >= 0.5, as diffusers binarizes)."""
    grey = _read_fitted(cfg.mask_image, "mask_image", size).mean(axis=-1, keepdims=True).astype(np.uint8)
    return (uint8_to_unit(grey) >= 0.5).float()


def _read_fitted(path: str, key: str, size: tuple[int, int]) -> np.ndarray:
    if not Path(path).expanduser().is_file():
        raise CtrlkitError(f"{key}={path!r} is not an image file")
    return fit_map(read_image(str(Path(path).expanduser())), size, "crop_and_resize", cv2.INTER_AREA)


# settings a composition file may carry beside its units (the composition.yaml generate writes has them all)
FILE_SETTINGS = ("prompts", "negative_prompt", "seed")


def apply_file_settings(cfg: DictConfig) -> None:
    """Take ``prompts``, ``negative_prompt`` and ``seed`` from the composition file where it has them, unless the
    command line sets them (``prompts=[...]`` wins over the file), so a written composition.yaml reruns as it ran."""
    if not cfg.get("composition"):
        return
    given = read_composition_settings(Path(str(cfg.composition)))
    hydra = hydra_node(cfg)
    overridden = {str(o).split("=", 1)[0].lstrip("+~") for o in (hydra.overrides.task if hydra is not None else [])}
    with open_dict(cfg):
        for key in FILE_SETTINGS:
            if key in given and key not in overridden:
                cfg[key] = given[key]
                log.info("%s from %s: %s", key, cfg.composition, given[key])


def run_generate(cfg: DictConfig, backbone: Backbone | None = None) -> list[Path]:
    """Generate, write PNGs + grid + composition.yaml to ``cfg.output_dir``; returns the image paths.
    ``backbone``: the base model already loaded from ``cfg.model`` (the demo keeps one); None loads it."""
    apply_file_settings(cfg)
    check_settings("generate", cfg)
    prompts = list(cfg.prompts) if isinstance(cfg.prompts, ListConfig | list) else [cfg.prompts]
    if not prompts or not all(isinstance(prompt, str) for prompt in prompts):
        raise CtrlkitError(f"prompts={cfg.prompts!r}; allowed: a prompt or a non-empty list of prompts (strings)")
    size = (int(cfg.height), int(cfg.width))
    specs = unit_specs(cfg)  # every unit checked before the model loads
    check_writable_dir(cfg.output_dir, "output_dir")
    backbone = backbone if backbone is not None else instantiate(cfg.model)
    backbone.check_image_size(size[0], "height")
    backbone.check_image_size(size[1], "width")
    units, maps = build_units(specs, backbone, size, len(prompts))
    try:  # units that cannot be composed together (an adapter that runs the UNet itself, with others)
        composition = Composition(units) if units else None
    except ValueError as error:
        raise CtrlkitError(str(error)) from error
    factor = backbone.vae_scale_factor
    generator = torch.Generator().manual_seed(cfg.seed)
    init = init_image(cfg, backbone, size, len(prompts), generator)  # drawn first, as diffusers' pipelines do
    hidden_states, added = backbone.prompt_inputs(prompts, size)
    uncond_hidden_states, uncond_added = backbone.prompt_inputs(
        [cfg.negative_prompt] * len(prompts), size, negative=True
    )
    latents = sample_latents(
        backbone.unet,
        make_scheduler(cfg.scheduler, backbone.noise_scheduler.config),
        hidden_states,
        (len(prompts), backbone.unet.config.in_channels, size[0] // factor, size[1] // factor),
        composition=composition,
        uncond_hidden_states=uncond_hidden_states,
        added_cond_kwargs=added,
        uncond_added_cond_kwargs=uncond_added,
        guidance_scale=cfg.guidance_scale,
        num_inference_steps=cfg.num_inference_steps,
        generator=generator,
        init=init,
        progress=True,
    )
    decoded = backbone.decode_latents(latents)
    if init is not None and init.mask is not None and cfg.get("keep_unmasked_pixels", True):
        decoded = paste_unmasked(decoded, cfg, size)
    images = images_to_numpy(decoded)

    output = Path(cfg.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        paths.append(output / f"image_{index:03d}.png")
        Image.fromarray(image).save(paths[-1])
    save_grid(maps, images, output / "grid.png")
    used = {"prompts": prompts, "negative_prompt": cfg.negative_prompt, "seed": cfg.seed, "units": specs}
    (output / "composition.yaml").write_text(yaml.safe_dump(used, sort_keys=False))
    for path in paths:
        print(f"ctrlkit generate: wrote {path}")
    print(f"ctrlkit generate: grid (conditions | result) {output / 'grid.png'}")
    print(f"ctrlkit generate: composition used {output / 'composition.yaml'}")
    return paths
