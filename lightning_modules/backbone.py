"""The frozen base model: VAE, tokenizer + text encoder, UNet and noise scheduler.

Sources: the tiny SD-architecture model built in code (random weights, for tests and the default run), a local
diffusers pipeline folder, or a single-file SD checkpoint read offline.
"""

from __future__ import annotations

import functools
import json
import pickle
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import save_file
from tokenizers import pre_tokenizers
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from adapters.grounding import GroundingCondition
from adapters.ldm_layout import (
    SDXL_OPEN_CLIP_PREFIX,
    SDXL_TEXT_ENCODER_PREFIX,
    text_encoder_to_ldm,
    text_encoder_to_open_clip,
    unet_to_ldm,
    vae_to_ldm,
)
from adapters.sampling import make_scheduler, sample_latents
from conditions.ranges import signed_to_unit
from conditions.shapes import VOCABULARY
from conditions.weights import UnsafeWeightsError, unsafe_pickle_message
from lightning_modules.errors import CtrlkitError
from lightning_modules.precision import parse_dtype
from lightning_modules.step_inputs import Draws, randn

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


class Backbone(nn.Module):
    """Frozen components of an SD-style model. ``vae=None`` means the UNet works in pixel space.

    The modules are registered as children so Lightning moves them with the system; they never train
    (``requires_grad_(False)`` and eval mode) unless an adapter deliberately unlocks a part of the UNet.
    ``vae_dtype``: the dtype the VAE runs in under mixed precision (None: the compute dtype); the VAE always runs
    outside autocast, in its own dtype.
    """

    def __init__(
        self,
        vae: AutoencoderKL | None,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        noise_scheduler: DDPMScheduler,
        vae_dtype: torch.dtype | None = None,
        *,
        text_encoder_2: CLIPTextModelWithProjection | None = None,
        tokenizer_2: CLIPTokenizer | None = None,
        force_zeros_for_empty_prompt: bool = False,
    ) -> None:
        super().__init__()
        self.vae_dtype = vae_dtype
        self.vae = vae
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.unet = unet
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        # SDXL pipelines' rule: an empty negative prompt is all-zero embeddings, not the encoding of ""
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self.noise_scheduler = noise_scheduler
        self.requires_grad_(False)
        self.eval()

    @property
    def vae_scale_factor(self) -> int:
        """Pixel size / latent size (8 for SD, 1 in pixel space)."""
        return 1 if self.vae is None else 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE factor times the UNet's total downsampling."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def check_image_size(self, image_size: int, setting: str = "data.image_size") -> None:
        """One line naming ``setting`` (the key the user set) when ``image_size`` does not fit the model."""
        if image_size < 1 or image_size % self.image_size_multiple:
            multiple = self.image_size_multiple
            nearest = max(multiple, round(image_size / multiple) * multiple)
            raise CtrlkitError(
                f"{setting}={image_size} must be a positive multiple of {multiple} for this model (VAE factor "
                f"{self.vae_scale_factor} x UNet downsampling); e.g. {nearest}"
            )

    @torch.no_grad()
    def encode_posterior(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) in [-1, 1] -> the VAE posterior's mean and std (B, 4, H/f, W/f), unscaled."""
        with torch.autocast(pixel_values.device.type, enabled=False):  # the VAE runs in its own dtype
            posterior = self.vae.encode(pixel_values.to(self.vae.dtype)).latent_dist
        return posterior.mean, posterior.std

    def sample_latents(self, mean: torch.Tensor, std: torch.Tensor, generator: Draws = None):
        """A scaled latent sample ``(mean + std * eps) * scaling_factor`` from posterior parameters; ``generator``:
        one, or one per row (``step_inputs.randn``)."""
        eps = randn(mean.shape, generator, dtype=mean.dtype).to(mean.device)
        return (mean + std * eps) * self.vae.config.scaling_factor

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor, generator: Draws = None) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> scaled latents (B, 4, H/f, W/f), sampled from the VAE posterior."""
        if self.vae is None:
            return pixel_values
        return self.sample_latents(*self.encode_posterior(pixel_values), generator=generator)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images (B, 3, H, W) in [0, 1]."""
        return self.decode_latents_with_grad(latents)

    def decode_latents_with_grad(self, latents: torch.Tensor) -> torch.Tensor:
        """``decode_latents`` with gradients flowing to ``latents`` through the frozen decoder (reward losses)."""
        if self.vae is None:
            return signed_to_unit(latents)
        with torch.autocast(latents.device.type, enabled=False):
            images = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return signed_to_unit(images.float())

    @torch.no_grad()
    def vae_round_trip(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] encoded (the posterior mean) and decoded by the VAE, in [0, 1]: what this
        VAE keeps of an image, and so about the best a sample it decodes is expected to score."""
        if self.vae is None:
            return images
        mean, _ = self.encode_posterior(images * 2.0 - 1.0)
        return self.decode_latents(mean * self.vae.config.scaling_factor).clamp(0.0, 1.0)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> text embeddings (B, L, D) from the frozen text encoder's last hidden state, as SD1.x/2.x use;
        with a second text encoder (SDXL) both encoders' penultimate hidden states, concatenated (D = D1 + D2)."""
        if self.text_encoder_2 is None:
            return self._encode_text(prompts)[0]
        return self._encode_two(prompts)[0]

    def _encode_two(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL's text conditioning, as its pipelines compute it: (hidden states (B, L, D1 + D2), pooled (B, P) from
        the second encoder's projection)."""
        hidden = []
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            tokens = tokenizer(
                list(prompts),
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            )
            output = encoder(tokens.input_ids.to(encoder.device), output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
        return torch.cat(hidden, dim=-1), output.text_embeds

    @property
    def takes_added_inputs(self) -> bool:
        """Whether the UNet takes inputs beside the text (SDXL's ``addition_embed_type="text_time"``)."""
        return self.unet.config.addition_embed_type == "text_time"

    @torch.no_grad()
    def encode_pooled(self, prompts: list[str]) -> torch.Tensor | None:
        """The pooled prompt embeddings (B, P) the UNet's added inputs hold (SDXL: the second encoder's projected
        EOS token); None for a UNet that takes none."""
        return self._encode_two(prompts)[1] if self.takes_added_inputs else None

    def added_inputs(
        self, pooled: torch.Tensor | None, image_size: tuple[int, int], time_ids: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor] | None:
        """The UNet's ``added_cond_kwargs`` from pooled embeddings (B, P) (None: the UNet takes none -> None).

        SDXL: ``text_embeds`` = ``pooled`` and ``time_ids`` (B, 6), the micro-conditioning (original size, crop
        top-left, target size): each item's own where the data gives them, else (H, W, 0, 0, H, W) for an
        uncropped image of ``image_size`` (H, W), as SDXL's pipelines set it by default."""
        if pooled is None:
            return None
        if time_ids is None:
            height, width = image_size
            time_ids = torch.tensor([[height, width, 0, 0, height, width]]).expand(len(pooled), -1)
        return {"text_embeds": pooled, "time_ids": time_ids.to(device=pooled.device, dtype=pooled.dtype)}

    @torch.no_grad()
    def unet_added_inputs(self, prompts: list[str], image_size: tuple[int, int]) -> dict[str, torch.Tensor] | None:
        """``added_inputs`` for ``prompts`` generated at ``image_size``; None for a UNet without added inputs."""
        return self.added_inputs(self.encode_pooled(prompts), image_size)

    @torch.no_grad()
    def prompt_inputs(
        self, prompts: list[str], image_size: tuple[int, int], *, negative: bool = False
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """(text embeddings, ``unet_added_inputs``) for ``prompts``. ``negative``: they are negative prompts, which
        for a pipeline with ``force_zeros_for_empty_prompt`` (SDXL) give all-zero embeddings when all are empty."""
        hidden, added = self.encode_prompts(prompts), self.unet_added_inputs(prompts, image_size)
        return self.null_empty_negatives(prompts, hidden, added) if negative else (hidden, added)

    def null_empty_negatives(
        self, negative_prompts: list[str], hidden: torch.Tensor, added: dict[str, torch.Tensor] | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """The negative prompts' (embeddings, added inputs), zeroed where the pipeline says an empty negative prompt
        is all zeros (``force_zeros_for_empty_prompt``, SDXL's default); the time ids stay."""
        if not self.force_zeros_for_empty_prompt or any(negative_prompts):
            return hidden, added
        if added is not None:
            added = {**added, "text_embeds": torch.zeros_like(added["text_embeds"])}
        return torch.zeros_like(hidden), added

    def _encode_text(self, texts: list[str]):
        """The frozen text encoder's output (last hidden state, pooled EOS) for ``texts`` padded to its length."""
        tokens = self.tokenizer(
            list(texts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        return self.text_encoder(tokens.input_ids.to(self.text_encoder.device))

    @torch.no_grad()
    def encode_phrases(self, phrases: list[str]) -> torch.Tensor:
        """Phrases -> pooled embeddings (N, D): the final-layer EOS token of the frozen text encoder, "before
        projection", which GLIGEN uses as a box's phrase feature."""
        return self._encode_text(phrases)[1]

    @torch.no_grad()
    def embed_grounding(
        self, condition: GroundingCondition, cache: dict[str, torch.Tensor] | None = None, contexts: bool = False
    ) -> GroundingCondition:
        """``condition`` with ``phrase_embeddings`` (B, N, D) of its phrases (``encode_phrases``), on its boxes'
        device: the one phrase encoder of training, sampling grids, ``generate`` and ``evaluate``. Each distinct
        phrase is encoded once; ``cache`` (phrase -> (D,) embedding), when given, is read and filled, so a training
        system encodes a phrase once per run. ``contexts``: also ``phrase_contexts`` (B, N, L, D), each phrase's
        hidden states as a prompt's (regional prompts); not cached (L x D per phrase would grow without bound on a
        real dataset), so each call encodes its distinct phrases once."""
        if condition.phrases is None:
            raise CtrlkitError("this grounding has no phrases to embed")
        cache = {} if cache is None else cache
        new = sorted({phrase for row in condition.phrases for phrase in row} - cache.keys())
        if new:
            for phrase, embedding in zip(new, self.encode_phrases(new)):
                cache[phrase] = embedding
        embeddings = torch.stack([torch.stack([cache[phrase] for phrase in row]) for row in condition.phrases])
        phrase_contexts = None
        if contexts:
            distinct = sorted({phrase for row in condition.phrases for phrase in row})
            encoded = dict(zip(distinct, self.encode_prompts(distinct)))
            rows = [torch.stack([encoded[phrase] for phrase in row]) for row in condition.phrases]
            phrase_contexts = torch.stack(rows).to(condition.boxes.device)
        return condition.with_embeddings(embeddings.to(condition.boxes.device), phrase_contexts)

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        image_size: tuple[int, int],
        *,
        num_inference_steps: int = 20,
        guidance_scale: float = 5.0,
        scheduler: str = "unipc",
        seed: int = 0,
        negative_prompt: str = "",
        encode_prompts=None,
        **conditioning,
    ) -> torch.Tensor:
        """Sample images (B, 3, H, W) in [0, 1] of ``image_size`` (H, W) for ``prompts``, with classifier-free
        guidance against ``negative_prompt``. ``conditioning``: ``adapter`` + ``condition`` or ``composition``
        (``adapters.sampling.sample_latents``), nothing for the base model alone; ``encode_prompts``: a cached
        prompt encoder to use instead of the text encoder's."""
        encode = encode_prompts or self.encode_prompts
        height, width = image_size
        factor = self.vae_scale_factor
        negative_prompts = [negative_prompt] * len(prompts)
        uncond_hidden, uncond_added = self.null_empty_negatives(
            negative_prompts, encode(negative_prompts), self.unet_added_inputs(negative_prompts, image_size)
        )
        latents = sample_latents(
            self.unet,
            make_scheduler(scheduler, self.noise_scheduler.config),
            encode(list(prompts)),
            (len(prompts), self.unet.config.in_channels, height // factor, width // factor),
            uncond_hidden_states=uncond_hidden,
            added_cond_kwargs=self.unet_added_inputs(list(prompts), image_size),  # SDXL's; None for SD1.x/2.x
            uncond_added_cond_kwargs=uncond_added,
            guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps,
            generator=torch.Generator().manual_seed(seed),
            **conditioning,
        )
        return self.decode_latents(latents)

    def save_single_file(self, path: str | Path) -> None:
        """Write one .safetensors in the original SD layout (``model.diffusion_model.*``, ``first_stage_model.*``,
        and SD1's CLIP ``cond_stage_model.transformer.*``, SD 2.x's OpenCLIP ``cond_stage_model.model.*``, or SDXL's
        two encoders ``conditioner.embedders.{0,1}.*``), the form A1111/ComfyUI and ``from_single_file`` read."""
        if self.vae is None:
            raise CtrlkitError("the single-file SD layout needs a VAE; this backbone works in pixel space")
        if self.text_encoder_2 is not None:  # SDXL: OpenAI CLIP first, OpenCLIP bigG (with its projection) second
            text_state = {
                **text_encoder_to_ldm(self.text_encoder.state_dict(), prefix=SDXL_TEXT_ENCODER_PREFIX),
                **text_encoder_to_open_clip(self.text_encoder_2.state_dict(), prefix=SDXL_OPEN_CLIP_PREFIX),
            }
        elif self.text_encoder.config.hidden_act == "gelu":  # SD 2.x's text encoder is OpenCLIP's (gelu)
            text_state = text_encoder_to_open_clip(self.text_encoder.state_dict())
        else:  # SD1's is OpenAI CLIP (quick_gelu)
            text_state = text_encoder_to_ldm(self.text_encoder.state_dict())
        state = {
            **unet_to_ldm(self.unet.state_dict(), self.unet.config),
            **vae_to_ldm(self.vae.state_dict(), self.vae.config),
            **text_state,
        }
        save_file({key: tensor.detach().contiguous() for key, tensor in state.items()}, str(path))

    def to_pipeline(self) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
        """A diffusers pipeline over the same modules (for saving, or for comparing with diffusers): SDXL's when
        there is a second text encoder."""
        if self.text_encoder_2 is not None:
            return StableDiffusionXLPipeline(
                vae=self.vae,
                text_encoder=self.text_encoder,
                text_encoder_2=self.text_encoder_2,
                tokenizer=self.tokenizer,
                tokenizer_2=self.tokenizer_2,
                unet=self.unet,
                scheduler=self.noise_scheduler,
                force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt,
            )
        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=self.noise_scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )


# ------------------------------------------------------------------ the tiny SD-architecture model


@functools.singledispatch
def prepare_condition(
    condition,
    backbone: Backbone,
    device,
    phrase_cache: dict[str, torch.Tensor] | None = None,
    phrase_contexts: bool = False,
):
    """A batch's condition -> what adapters take, on ``device``. One rule per condition form, never per adapter:
    a map (B, C, H, W) is moved; a ``GroundingCondition`` is moved and its phrases embedded by
    ``backbone.embed_grounding`` (``phrase_cache``, ``phrase_contexts``: see there; the caller passes the adapter's
    ``reads_phrase_contexts``)."""
    raise CtrlkitError(f"a batch condition must be a tensor or a GroundingCondition, got {type(condition).__name__}")


@prepare_condition.register
def _prepare_map(
    condition: torch.Tensor, backbone: Backbone, device, phrase_cache=None, phrase_contexts=False
) -> torch.Tensor:
    return condition.to(device)


@prepare_condition.register
def _prepare_grounding(
    condition: GroundingCondition, backbone: Backbone, device, phrase_cache=None, phrase_contexts=False
) -> GroundingCondition:
    return backbone.embed_grounding(condition.to(device), phrase_cache, contexts=phrase_contexts)


def build_shapes_tokenizer(max_length: int = 32) -> CLIPTokenizer:
    """A CLIP BPE tokenizer for the ``shapes`` vocabulary: each shapes word is one token, and any other text still
    tokenizes byte by byte (nothing maps to the unknown token).

    Built without a trainer, as a pure function of ``VOCABULARY``: each word's pieces are merged left to right, in
    sorted word order (the ``tokenizers`` BPE trainer breaks frequency ties differently from call to call, so two
    tokenizers built in one process gave one caption different ids)."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    # CLIP marks the last character of a word with </w>; every byte has both forms, so unseen words tokenize
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in sorted(set(VOCABULARY)):
        pieces = _bpe_pieces(word, {merge: rank for rank, merge in enumerate(merges)})
        while len(pieces) > 1:  # merges added later rank below the earlier ones: earlier words stay one token
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            vocab.setdefault(pieces[0], len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def _bpe_pieces(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE of one word under ``ranks``: the lowest-ranked adjacent pair merged until none applies."""
    pieces = [*word[:-1], word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [(ranks.get(pair, len(ranks)), index) for index, pair in enumerate(zip(pieces, pieces[1:]))]
        rank, index = min(pairs)
        if rank == len(ranks):
            break
        pieces[index : index + 2] = [pieces[index] + pieces[index + 1]]
    return pieces


def build_tiny_backbone(
    seed: int = 0, image_size: int = 64, noise_schedule: dict | None = None, vae_dtype: str | None = None
) -> Backbone:
    """The tiny SD-architecture model (random weights): f=4 VAE (64 px -> 16x16x4), a 2-layer CLIP text encoder and
    a 3-level UNet with cross-attention in every down block but the last, as SD1.5 is laid out.

    ``noise_schedule`` overrides SD1.5's DDPMScheduler settings (e.g. zero terminal SNR with v-prediction)."""
    torch.manual_seed(seed)
    tokenizer = build_shapes_tokenizer()
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        # narrow at full resolution: (32, 64, 64) trains 2.3x slower on one CPU thread
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=16,
        sample_size=image_size,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=image_size // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    scheduler = DDPMScheduler(
        **{
            "num_train_timesteps": 1000,
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "clip_sample": False,
            "prediction_type": "epsilon",
            "steps_offset": 1,
            **(noise_schedule or {}),
        }
    )
    return Backbone(vae, text_encoder, tokenizer, unet, scheduler, parse_dtype(vae_dtype, "model.vae_dtype"))


# The published component configs of SD1.5 and SDXL (assets/architectures/<name>/), no weights.
ARCHITECTURES = Path(__file__).resolve().parent / "assets" / "architectures"


def _architecture_folder(name: str) -> Path:
    folder = ARCHITECTURES / name
    if not (folder / "unet" / "config.json").is_file():
        known = sorted(path.name for path in ARCHITECTURES.iterdir() if path.is_dir())
        raise CtrlkitError(f"architecture '{name}' is not shipped; known: {', '.join(known)}")
    return folder


def architecture_unet(name: str, seed: int = 0) -> UNet2DConditionModel:
    """The full-size UNet of ``name`` ("sd15": 860M parameters, "sdxl": 2.6B) with random weights, frozen."""
    torch.manual_seed(seed)
    config = json.loads((_architecture_folder(name) / "unet" / "config.json").read_text())
    return UNet2DConditionModel.from_config(config).requires_grad_(False).eval()


def build_random_backbone(name: str = "sd15", seed: int = 0, vae_dtype: str | None = None) -> Backbone:
    """A full-size SD-architecture model with random weights, built from the shipped configs without a download:
    for benchmarks and slow tests of memory and speed at the size researchers train (outputs are noise). The
    tokenizer is the shapes one padded to CLIP's 77 tokens (CLIP's vocabulary files are not shipped); SD1.5 only,
    as the backbone holds one text encoder."""
    folder = _architecture_folder(name)
    if (folder / "text_encoder_2").is_dir():
        raise CtrlkitError(f"architecture '{name}' has two text encoders; build its UNet with architecture_unet")
    torch.manual_seed(seed)
    vae = AutoencoderKL.from_config(json.loads((folder / "vae" / "config.json").read_text()))
    text_config = json.loads((folder / "text_encoder" / "config.json").read_text())
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    tokenizer = build_shapes_tokenizer(max_length=text_config["max_position_embeddings"])
    scheduler = DDPMScheduler.from_config(json.loads((folder / "scheduler" / "scheduler_config.json").read_text()))
    unet = architecture_unet(name, seed)
    return Backbone(vae, text_encoder, tokenizer, unet, scheduler, parse_dtype(vae_dtype, "model.vae_dtype"))


# ------------------------------------------------------------------ pretrained models from local files

# Trained by `ctrlkit pretrain-base` (conf/pretrain_base.yaml) and shipped inside the package.
SHIPPED_TINY_MODEL = Path(__file__).resolve().parent / "assets" / "tiny_shapes_sd"


def load_tiny_backbone(vae_dtype: str | None = None) -> Backbone:
    """The tiny base model that ships with ctrlkit (a diffusers pipeline folder, local files only)."""
    if not (SHIPPED_TINY_MODEL / "model_index.json").is_file():
        raise CtrlkitError(
            f"the shipped tiny model is missing at {SHIPPED_TINY_MODEL}; reinstall ctrlkit, or rebuild it with "
            f"`ctrlkit pretrain-base` and copy its output folder there"
        )
    return load_pretrained_backbone(str(SHIPPED_TINY_MODEL), vae_dtype=vae_dtype)


def load_pretrained_backbone(
    path: str, config: str | None = None, torch_dtype: str = "float32", vae_dtype: str | None = None
) -> Backbone:
    """Load a frozen backbone from local files only (never the network).

    Args:
        path: a diffusers pipeline folder (the layout ``StableDiffusionPipeline.save_pretrained`` writes), or a
            single-file SD checkpoint (.safetensors / .ckpt).
        config: for a single file, a local diffusers pipeline folder whose configs (no weights needed) describe it;
            diffusers would otherwise fetch them from the hub.
        torch_dtype: dtype of the frozen weights ("float32", "float16", "bfloat16").
        vae_dtype: the VAE's dtype under mixed precision (e.g. "float32" for SDXL's VAE); None: the compute dtype.
    """
    vae_dtype = parse_dtype(vae_dtype, "model.vae_dtype")
    dtype = getattr(torch, torch_dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise CtrlkitError(f"model.torch_dtype='{torch_dtype}' is not a torch dtype; use float32, float16 or bfloat16")
    source = Path(path).expanduser()
    if not source.exists():
        raise CtrlkitError(
            f"model path {source} does not exist; set model.path to a diffusers pipeline folder "
            f"(StableDiffusionPipeline.save_pretrained) or a single-file .safetensors/.ckpt checkpoint"
        )
    if source.is_dir():
        backbone = _load_pipeline_folder(source, dtype)
        backbone.vae_dtype = vae_dtype
        return backbone
    if source.suffix not in SINGLE_FILE_SUFFIXES:
        raise CtrlkitError(f"model path {source} is a file but not a checkpoint ({', '.join(SINGLE_FILE_SUFFIXES)})")
    backbone = _load_single_file(source, config, dtype)
    backbone.vae_dtype = vae_dtype
    return backbone


def _load_pipeline_folder(folder: Path, dtype: torch.dtype) -> Backbone:
    required = ["unet", "text_encoder", "tokenizer", "scheduler", "model_index.json"]
    missing = [name for name in required if not (folder / name).exists()]
    if missing:
        raise CtrlkitError(
            f"{folder} is not a diffusers pipeline folder: missing {', '.join(missing)} "
            f"(expected the layout StableDiffusionPipeline.save_pretrained writes)"
        )
    try:
        vae = None
        if (folder / "vae").exists():
            vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype, local_files_only=True)
        text_encoder = CLIPTextModel.from_pretrained(
            folder, subfolder="text_encoder", torch_dtype=dtype, local_files_only=True
        )
        tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer", local_files_only=True)
        unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype, local_files_only=True)
        # Training uses DDPM noising with the pipeline's betas and prediction type, as diffusers' scripts do.
        scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
        second = {}
        if (folder / "text_encoder_2").is_dir():  # SDXL: a second text encoder with a projection (pooled embeds)
            second = {
                "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(
                    folder, subfolder="text_encoder_2", torch_dtype=dtype, local_files_only=True
                ),
                "tokenizer_2": CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2", local_files_only=True),
                "force_zeros_for_empty_prompt": json.loads((folder / "model_index.json").read_text()).get(
                    "force_zeros_for_empty_prompt", True
                ),
            }
    except (OSError, ValueError, RuntimeError) as error:
        raise CtrlkitError(f"cannot load the pipeline in {folder}: {_first_line(error)}") from error
    return Backbone(vae, text_encoder, tokenizer, unet, scheduler, **second)


def _load_single_file(checkpoint: Path, config: str | None, dtype: torch.dtype) -> Backbone:
    if config is None or not Path(config).is_dir():
        raise CtrlkitError(
            f"loading the single-file checkpoint {checkpoint} offline needs model.config=<local diffusers pipeline "
            f"folder with the matching configs>; got model.config={config}"
        )
    # an SDXL checkpoint reads its two text encoders through SDXL's pipeline (the config folder says which)
    pipeline_class = (
        StableDiffusionXLPipeline if (Path(config) / "text_encoder_2").is_dir() else StableDiffusionPipeline
    )
    sd_only = (
        {}
        if pipeline_class is StableDiffusionXLPipeline
        else {"safety_checker": None, "requires_safety_checker": False}
    )
    try:
        pipeline = pipeline_class.from_single_file(
            str(checkpoint),
            config=str(config),
            local_files_only=True,
            torch_dtype=dtype,
            **sd_only,
        )
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        unsafe = _unsafe_pickle_cause(error)
        if unsafe is not None:  # diffusers' message hides why the file was refused
            raise UnsafeWeightsError(unsafe_pickle_message(checkpoint, unsafe)) from error
        raise CtrlkitError(f"cannot load the single-file checkpoint {checkpoint}: {_first_line(error)}") from error
    scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    second = {}
    if pipeline_class is StableDiffusionXLPipeline:
        second = {
            "text_encoder_2": pipeline.text_encoder_2,
            "tokenizer_2": pipeline.tokenizer_2,
            "force_zeros_for_empty_prompt": pipeline.config.force_zeros_for_empty_prompt,
        }
    return Backbone(pipeline.vae, pipeline.text_encoder, pipeline.tokenizer, pipeline.unet, scheduler, **second)


def _unsafe_pickle_cause(error: BaseException) -> BaseException | None:
    """The weights-only unpickler's refusal of a code-running global behind ``error``, if that is what it was."""
    while error is not None:
        if isinstance(error, pickle.UnpicklingError) and "Weights only load failed" in str(error):
            return error
        error = error.__cause__ or error.__context__
    return None


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
