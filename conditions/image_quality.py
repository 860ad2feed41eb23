"""Image quality of generated sets: FID and KID (torchmetrics with torch-fidelity's Inception), CLIP score.

Weights come only from local files. A metric whose weights are absent is reported as the string
``"unavailable: <path> not found"`` in place of its number: never estimated with other weights, never a crash.

- Inception: torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` (the TF FID Inception ported to
  PyTorch, what torchmetrics downloads by default), a plain state dict.
- CLIP: a local transformers ``CLIPModel`` folder with its processor (e.g. ``openai/clip-vit-base-patch16``,
  the model ControlNet++ reports CLIP score with).
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch

from conditions.weights import unsafe_pickle_message

log = logging.getLogger(__name__)

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


def unavailable(reason: str) -> str:
    return f"unavailable: {reason}"


def load_inception(path: str | Path | None, device: str = "cpu"):
    """torchmetrics' ``NoTrainInceptionV3`` (2048-d pool features) from a local torch-fidelity weights file, or
    an ``"unavailable: ..."`` string saying why not."""
    if path is None:
        return unavailable("no Inception weights file configured (quality.inception_weights)")
    path = Path(path)
    if not path.is_file():
        return unavailable(f"{path} not found")
    try:
        import torch_fidelity  # noqa: F401  (torchmetrics' Inception is torch-fidelity's network)
    except ImportError:
        return unavailable("torch-fidelity is not installed (pip install torch-fidelity)")
    try:
        # torch-fidelity unpickles the file without weights_only; reading it here first with weights_only=True
        # guarantees it holds tensors only before it gets there.
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            return unavailable(f"{path} is not a state dict")
        from torchmetrics.image.fid import NoTrainInceptionV3

        network = NoTrainInceptionV3(
            name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(path)
        )
    except pickle.UnpicklingError as error:  # weights_only refused it: a pickle that would run code
        message = unsafe_pickle_message(path, error)
        log.warning("image quality: %s", message)
        return unavailable(message)
    except (RuntimeError, ValueError, KeyError, OSError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return unavailable(f"{path} is not torch-fidelity's Inception state dict ({first_line})")
    return network.to(device)


def load_clip(folder: str | Path | None, device: str = "cpu"):
    """(CLIPModel, CLIPProcessor) from a local transformers folder, or an ``"unavailable: ..."`` string."""
    if folder is None:
        return unavailable("no CLIP model folder configured (quality.clip_model)")
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        return unavailable(f"{folder if not folder.is_dir() else folder / 'config.json'} not found")
    from transformers import CLIPModel, CLIPProcessor

    try:
        model = CLIPModel.from_pretrained(folder, local_files_only=True).eval().to(device)
        processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        return unavailable(f"{folder} is not a CLIP model folder ({first_line})")
    return model, processor


def load_quality_models(inception_weights: str | Path | None, clip_model: str | Path | None, device: str = "cpu"):
    """(Inception network or "unavailable: ..." string, (CLIP model, processor) or "unavailable: ..." string)."""
    return load_inception(inception_weights, device), load_clip(clip_model, device)


@torch.no_grad()
def image_quality(
    real: torch.Tensor,
    generated: dict[str, torch.Tensor],
    prompts: list[str],
    inception_weights: str | Path | None,
    clip_model: str | Path | None,
    kid_subset_size: int = 50,
    device: str = "cpu",
    models: tuple | None = None,
) -> dict[str, dict[str, float | str]]:
    """FID, KID (mean and std over subsets) and CLIP score of each generated set.

    Args:
        real: (N, 3, H, W) uint8 reference images (the evaluation set).
        generated: label -> (M, 3, H, W) uint8 images, e.g. {"base": ..., "adapter": ...}.
        prompts: M captions of each generated set, in order (for the CLIP score).
        models: ``load_quality_models``' result, loaded earlier (evaluate loads them before sampling, so a refused
            or missing file is said at the start); None loads them from the two paths here.
    Returns:
        label -> {"fid", "kid", "kid_std", "clip_score"}: numbers, or ``"unavailable: ..."`` strings.
        FID and KID on a few dozen images are biased and noisy: compare sets of the same size only.
    """
    results: dict[str, dict[str, float | str]] = {label: {} for label in generated}
    inception, clip = models or load_quality_models(inception_weights, clip_model, device)
    if isinstance(inception, str):
        for label in generated:
            results[label].update(fid=inception, kid=inception, kid_std=inception)
    else:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        smallest = min(len(real), *(len(images) for images in generated.values()))
        fid = FrechetInceptionDistance(feature=inception, reset_real_features=False).to(device)
        kid = KernelInceptionDistance(
            feature=inception, subset_size=max(2, min(kid_subset_size, smallest)), reset_real_features=False
        ).to(device)
        for metric in (fid, kid):
            metric.update(real.to(device), real=True)
        for label, images in generated.items():
            for metric in (fid, kid):
                metric.reset()  # keeps the real features
                metric.update(images.to(device), real=False)
            kid_mean, kid_std = kid.compute()
            results[label].update(fid=float(fid.compute()), kid=float(kid_mean), kid_std=float(kid_std))
    for label, images in generated.items():
        results[label]["clip_score"] = clip if isinstance(clip, str) else clip_score(*clip, images, prompts, device)
    return results


@torch.no_grad()
def clip_score(model, processor, images: torch.Tensor, prompts: list[str], device: str = "cpu") -> float:
    """Mean CLIPScore, ``max(100 * cos(image embedding, text embedding), 0)`` (Hessel et al. 2021, torchmetrics'
    definition). Computed here because torchmetrics 1.9's ``CLIPScore`` breaks on transformers 5, whose
    ``get_image_features`` returns an output object instead of a tensor.

    Args:
        images: (M, 3, H, W) uint8; prompts: M captions (truncated to the text encoder's length).
    """
    inputs = processor(
        text=list(prompts), images=list(images.cpu()), return_tensors="pt", padding=True, truncation=True
    ).to(device)
    output = model(**inputs)
    image_embeds = output.image_embeds / output.image_embeds.norm(dim=-1, keepdim=True)
    text_embeds = output.text_embeds / output.text_embeds.norm(dim=-1, keepdim=True)
    return float((100 * (image_embeds * text_embeds).sum(-1)).clamp(min=0).mean())
