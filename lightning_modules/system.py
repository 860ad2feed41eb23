"""``AdapterTrainingSystem``: trains any conditioning adapter on a frozen backbone. It never branches on the adapter.

The step reads like diffusers' ``examples/controlnet/train_controlnet.py``: encode -> noise -> adapter -> UNet -> MSE.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from diffusers.optimization import get_constant_schedule

from adapters.base import ConditioningAdapter, run_unet
from adapters.grounding import GroundingCondition
from lightning_modules.backbone import Backbone, prepare_condition
from lightning_modules.checkpoints import apply_configured_learning_rates, capture_rng_states, restore_rng_states
from lightning_modules.distributed import all_ranks
from lightning_modules.errors import CtrlkitError, NonFiniteLossError
from lightning_modules.feature_cache import FeatureCache, module_fingerprint, tensor_key_bytes
from lightning_modules.loss_terms import LossTerm
from lightning_modules.precision import (
    MIXED_PRECISION_DTYPES,
    allow_tf32,
    cast_frozen,
    check_sdpa_attention,
    check_trainable_fp32,
    compile_repeated_blocks,
)
from lightning_modules.step_inputs import (
    DRAWS,
    ConditionDropout,
    Draws,
    TrainingInputs,
    item_generators,
    rand,
    randint,
    randn,
)

log = logging.getLogger(__name__)
TIMESTEP_SAMPLINGS = ("uniform", "cubic")
# seeds validation's per-item draws (system.draws=item): the same noise and timesteps at every validation
VALIDATION_SEED = 1_000_003


# the optimizer of a system built without one (conf/optimizer/adamw.yaml's values)
default_optimizer = partial(torch.optim.AdamW, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


class AdapterTrainingSystem(pl.LightningModule):
    """Trains ``adapter`` on the frozen ``backbone``.

    Args:
        backbone: frozen VAE, text encoder, UNet and noise scheduler.
        adapter: built from ``backbone.unet``; only its parameters reach the optimizer.
        learning_rate: the learning rate of the adapter's param groups (``adapter.learning_rate`` in the config);
            ``adapter.param_groups`` may give a group its own.
        optimizer: a partial that takes the param groups and returns the optimizer (the ``optimizer`` config group,
            ``_partial_: true``); None: AdamW with betas (0.9, 0.999), eps 1e-8, weight decay 0.01.
        lr_scheduler: Lightning's lr_scheduler config whose ``scheduler`` is a partial that takes the optimizer (the
            ``lr_scheduler`` config group), e.g. ``{"scheduler": partial(...), "interval": "step"}``; None: a
            constant learning rate, stepped per optimizer step.
        condition_dropout: ``{text, condition, both}`` probabilities (``ConditionDropout``), so classifier-free
            guidance works with the adapter; the adapter config sets its method's recipe.
        timestep_sampling: "uniform", or "cubic" (t = (1 - u^3) T, T2I-Adapter's bias towards early, noisy steps).
        cache_latents: keep each training item's VAE posterior (mean, std) after its first encoding, keyed by the
            batch's ``index``, and sample from it later (the frozen VAE gives the same posterior every epoch).
            Datasets whose items change between epochs (random crops, flips) must not use it.
        cache_text_embeddings: keep the frozen text encoder's output per prompt string.
        cache_limit: most cached items; beyond it new items are encoded every time.
        cache_dir: a folder shared by runs for VAE posteriors and text embeddings (``FeatureCache``: content-
            addressed by the frozen weights and the preprocessed item, so a changed image or VAE misses); None: off.
            Items are looked up there before they are encoded, behind the in-memory caches.
        gradient_checkpointing: recompute activations in the backward pass, in the UNet (gradients flow through it to
            every adapter) and in the adapter's diffusers models: less memory for ~30% more compute.
        compile: ``torch.compile`` the repeated blocks of the UNet and of the adapter's diffusers models.
        tf32: TF32 matrix products on CUDA GPUs that have them (no effect on a CPU).
        seed: seeds the training generator that draws every random number of a training step (posterior sample,
            noise, timesteps, prompt dropout). Its state is saved in checkpoints with the global RNG states, so a
            resumed run draws exactly what the uninterrupted run would have.
        draws: ``item``: each item's random numbers (posterior sample, noise, timestep, dropout) come from its own
            generator seeded by (seed, epoch, item index), so the run does not depend on how items are batched,
            accumulated or split over processes (2 processes x batch 8 train as 1 x batch 16), and a resume on any
            rank is exact without saving generator states. ``stream``: one generator for the run (``seed``).
        max_nonfinite_steps: a step whose loss is NaN/inf is skipped (no update) and counted; this many in a row
            stop the run with ``NonFiniteLossError`` naming the step (the last checkpoint is left as it was).
        loss_terms: name -> ``LossTerm`` added to the diffusion loss in training steps (``lightning_modules.
            loss_terms``, e.g. ControlNet++'s cycle-consistency reward: ``reward=canny``); each logs
            ``train/<its scalars>``. val/loss stays the diffusion loss alone, comparable across runs.
    """

    def __init__(
        self,
        backbone: Backbone,
        adapter: ConditioningAdapter,
        learning_rate: float = 1e-4,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        lr_scheduler: dict | None = None,
        condition_dropout: dict | ConditionDropout | None = None,
        timestep_sampling: str = "uniform",
        cache_latents: bool = False,
        cache_text_embeddings: bool = True,
        cache_limit: int = 50_000,
        cache_dir: str | None = None,
        gradient_checkpointing: bool = False,
        compile: bool = False,
        tf32: bool = True,
        seed: int = 0,
        draws: str = "item",
        max_nonfinite_steps: int = 5,
        loss_terms: dict[str, LossTerm] | None = None,
    ) -> None:
        super().__init__()
        if draws not in DRAWS:
            raise CtrlkitError(f"system.draws='{draws}'; choose one of: {', '.join(DRAWS)}")
        if timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise CtrlkitError(
                f"system.timestep_sampling='{timestep_sampling}'; choose one of: {', '.join(TIMESTEP_SAMPLINGS)}"
            )
        dropout = condition_dropout if condition_dropout is not None else {"text": 0.5}
        dropout = dict(vars(dropout)) if isinstance(dropout, ConditionDropout) else dict(dropout)
        unknown = set(dropout) - {"text", "condition", "both"}
        if unknown:
            raise CtrlkitError(
                f"system.condition_dropout has unknown keys {sorted(unknown)}; use text, condition, both"
            )
        self.condition_dropout = ConditionDropout(**dropout)
        # The modules are not hyperparameters: keeping them out of hparams keeps them out of the checkpoint pickle;
        # nor are the optimizer and scheduler partials (functions do not load with weights_only=True; config.yaml
        # records them).
        self.save_hyperparameters(ignore=["backbone", "adapter", "optimizer", "lr_scheduler", "loss_terms"])
        self.loss_terms = dict(loss_terms or {})
        self.optimizer_factory = optimizer if optimizer is not None else default_optimizer
        self.lr_scheduler_config = dict(lr_scheduler) if lr_scheduler is not None else {"interval": "step"}
        self.lr_scheduler_config.setdefault("scheduler", get_constant_schedule)
        self.backbone = backbone
        self.adapter = adapter
        # Checkpoints hold the adapter only; on_load_checkpoint checks those keys itself.
        self.strict_loading = False
        self._latent_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._text_cache: dict[str, dict[str, torch.Tensor]] = {}  # prompt -> prompt_features
        self._phrase_cache: dict[str, torch.Tensor] = {}
        self.feature_cache = FeatureCache(cache_dir) if cache_dir else None
        self._fingerprints: dict[str, str] = {}  # of the frozen VAE and text encoder, computed on first use
        self.training_generator = torch.Generator().manual_seed(seed)
        self.skipped_items = 0  # bad data items left out of training batches
        self.nonfinite_steps = 0  # steps skipped for a NaN/inf loss, in all
        self.nonfinite_in_a_row = 0
        self._rng_states_to_restore: dict | None = None

    def on_fit_start(self) -> None:
        # The frozen backbone is in eval mode on purpose; Lightning warns about any eval-mode module.
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
        self.apply_precision(str(self.trainer.precision))
        if self.hparams.gradient_checkpointing:
            self.backbone.unet.enable_gradient_checkpointing()
            inside = self.adapter.enable_gradient_checkpointing()
            log.info("gradient checkpointing in the UNet%s", " and the adapter" if inside else "")
        check_sdpa_attention({"unet": self.backbone.unet, "adapter": self.adapter})
        if self.hparams.tf32 and allow_tf32(self.device):
            log.info("TF32 matrix products on")
        if self.hparams.compile:
            blocks = compile_repeated_blocks(self.backbone.unet) + compile_repeated_blocks(self.adapter)
            log.info("torch.compile: %d UNet and adapter blocks (compiled on their first step)", blocks)
            # Compiled code runs in training steps only (training_step asks for it): validation, sampling and the
            # controllability scores call the blocks at other batch sizes and without gradients, a recompile each,
            # and past dynamo's recompile limit the training shapes themselves would fall back to eager.
            torch.compiler.set_stance("force_eager")

    def on_fit_end(self) -> None:
        if self.hparams.compile:
            torch.compiler.set_stance("default")

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)  # frees the gradients between steps instead of zero-filling them

    def attached_trainer(self) -> pl.Trainer | None:
        """The trainer running this module; None outside a fit (a test calling a step directly)."""
        try:
            return self.trainer
        except RuntimeError:  # Lightning's public ``trainer`` raises when the module is not attached
            return None

    def precision_context(self):
        """The trainer's autocast (``bf16-mixed`` / ``16-mixed``) for work outside its steps, as callbacks sampling
        images; nothing when the module is not attached to a trainer."""
        try:
            return self.trainer.precision_plugin.forward_context()
        except RuntimeError:  # not attached to a trainer (Lightning's public ``trainer`` raises then)
            return contextlib.nullcontext()

    def apply_precision(self, precision: str) -> None:
        """Under ``bf16-mixed`` / ``16-mixed``: the frozen weights (backbone, frozen adapter parts) in the compute
        dtype, the VAE in ``backbone.vae_dtype`` if set; the trainable weights must be fp32 in any precision."""
        check_trainable_fp32(self.adapter)
        dtype = MIXED_PRECISION_DTYPES.get(precision)
        if dtype is None:
            return
        cast = cast_frozen(self.backbone, dtype) + cast_frozen(self.adapter, dtype)
        if self.backbone.vae is not None and self.backbone.vae_dtype is not None:
            self.backbone.vae.to(self.backbone.vae_dtype)
        log.info("%s: %.1fM frozen parameters cast to %s; trainable ones stay float32", precision, cast / 1e6, dtype)

    def train(self, mode: bool = True) -> AdapterTrainingSystem:
        """Lightning switches the whole module to train mode each epoch; the frozen backbone stays in eval mode."""
        super().train(mode)
        self.backbone.eval()
        return self

    # ------------------------------------------------------------------ the training step

    def sample_timesteps(self, batch_size: int, generator: Draws = None) -> torch.Tensor:
        num_train_timesteps = self.backbone.noise_scheduler.config.num_train_timesteps
        if self.hparams.timestep_sampling == "cubic":
            u = rand(batch_size, generator)
            timesteps = ((1 - u**3) * num_train_timesteps).long().clamp_(0, num_train_timesteps - 1)
        else:
            timesteps = randint(num_train_timesteps, batch_size, generator)
        return timesteps.to(self.device)

    def training_latents(self, batch: dict, generator: Draws = None) -> torch.Tensor:
        """Scaled latents of a training batch, from the posterior cache where possible."""
        if not self.hparams.cache_latents or self.backbone.vae is None:
            return self.backbone.encode_images(batch["pixel_values"], generator=generator)
        if "index" not in batch:
            raise CtrlkitError("system.cache_latents=true needs datasets whose items carry an 'index'")
        indices = batch["index"].tolist()
        missing = [row for row, index in enumerate(indices) if index not in self._latent_cache]
        fresh = {}
        # One item per VAE call: a cached posterior then depends on its item alone, not on which batch first met
        # it (CPU kernels may round differently for different batch sizes), so a resumed run -- whose cache starts
        # empty -- sees bit-identical latents.
        for row in missing:
            fresh[row] = self.item_posterior(batch["pixel_values"][row : row + 1])
            if len(self._latent_cache) < self.hparams.cache_limit:
                self._latent_cache[indices[row]] = fresh[row]
        pairs = [fresh[row] if row in fresh else self._latent_cache[index] for row, index in enumerate(indices)]
        mean = torch.stack([pair[0] for pair in pairs]).to(self.device)
        std = torch.stack([pair[1] for pair in pairs]).to(self.device)
        return self.backbone.sample_latents(mean, std, generator=generator)

    def item_posterior(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One item's VAE posterior (mean, std), each (4, h, w) on the CPU: from the disk cache when it has it."""

        def encode() -> dict[str, torch.Tensor]:
            means, stds = self.backbone.encode_posterior(pixel_values)
            return {"mean": means[0].cpu(), "std": stds[0].cpu()}

        if self.feature_cache is None:
            entry = encode()
        else:
            key = FeatureCache.key(self.fingerprint("vae"), tensor_key_bytes(pixel_values))
            entry = self.feature_cache.get_or_compute("vae_posterior", key, encode)
        return entry["mean"], entry["std"]

    def prompt_embedding(self, prompt: str) -> torch.Tensor:
        """One prompt's text embedding (L, D): from the disk cache when it has it (keyed by its token ids)."""
        return self.prompt_features(prompt)["embedding"]

    def prompt_features(self, prompt: str) -> dict[str, torch.Tensor]:
        """One prompt's text features: ``embedding`` (L, D) and, for a UNet with added inputs (SDXL), ``pooled``
        (P,); from the disk cache when it has them (keyed by the text encoders and the token ids)."""

        def encode() -> dict[str, torch.Tensor]:
            features = {"embedding": self.backbone.encode_prompts([prompt])[0]}
            pooled = self.backbone.encode_pooled([prompt])
            return features if pooled is None else {**features, "pooled": pooled[0]}

        if self.feature_cache is None:
            return encode()
        tokens = self.backbone.tokenizer(prompt, truncation=True, max_length=self.backbone.tokenizer.model_max_length)
        encoders = [name for name in ("text_encoder", "text_encoder_2") if getattr(self.backbone, name) is not None]
        key = FeatureCache.key("".join(self.fingerprint(name) for name in encoders), repr(tokens.input_ids))
        entry = self.feature_cache.get_or_compute("text_embedding", key, encode)
        return {name: tensor.to(self.device) for name, tensor in entry.items()}

    def fingerprint(self, part: str) -> str:
        """``module_fingerprint`` of the backbone's frozen ``part`` ("vae", "text_encoder", "text_encoder_2"),
        computed once."""
        if part not in self._fingerprints:
            self._fingerprints[part] = module_fingerprint(getattr(self.backbone, part))
        return self._fingerprints[part]

    def fill_feature_cache(
        self, pixel_values: torch.Tensor | None, prompts: list[str], prompts_done: set[str]
    ) -> None:
        """Put in the disk cache what a training run reads from it for these items (``ctrlkit cache``), through
        the methods training uses, so the keys are the same: each item's VAE posterior (one item per VAE call) when
        ``cache_latents`` is on and ``pixel_values`` are given, and the embedding of each prompt not in
        ``prompts_done`` when ``cache_text_embeddings`` is on -- with the empty prompt (text dropout's caption,
        sampling's negative prompt)."""
        if self.feature_cache is None:
            raise CtrlkitError("system.cache_dir is null: there is no feature cache to fill")
        if pixel_values is not None and self.hparams.cache_latents and self.backbone.vae is not None:
            for row in range(pixel_values.shape[0]):
                self.item_posterior(pixel_values[row : row + 1])
        if self.hparams.cache_text_embeddings:
            for prompt in sorted({"", *prompts} - prompts_done):
                self.prompt_embedding(prompt)
                prompts_done.add(prompt)

    def on_train_end(self) -> None:
        if self.feature_cache is not None:
            counts = self.feature_cache.counts.by_kind.get("vae_posterior", [0, 0])
            never = " (the VAE encoder never ran)" if counts[0] and not counts[1] else ""
            log.info("%s%s", self.feature_cache.summary(), never)

    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """Frozen text-encoder output (B, L, D), computed once per distinct prompt when caching is on."""
        if not self.hparams.cache_text_embeddings:
            return self.backbone.encode_prompts(prompts)
        return self._cached_text(prompts, "embedding")

    def pooled_text_embeddings(self, prompts: list[str]) -> torch.Tensor | None:
        """The pooled prompt embeddings (B, P) of the UNet's added inputs (SDXL), cached as ``text_embeddings``;
        None for a UNet that takes none."""
        if not self.backbone.takes_added_inputs or not self.hparams.cache_text_embeddings:
            return self.backbone.encode_pooled(prompts)
        return self._cached_text(prompts, "pooled")

    def _cached_text(self, prompts: list[str], name: str) -> torch.Tensor:
        # one prompt per call, for the same reason as the latent cache: values independent of the batch
        for prompt in sorted(set(prompts) - self._text_cache.keys()):
            self._text_cache[prompt] = self.prompt_features(prompt)
        return torch.stack([self._text_cache[prompt][name] for prompt in prompts]).to(self.device)

    def prepare_condition(self, condition: Any) -> Any:
        """A batch's condition -> what adapters take, on this device (``backbone.prepare_condition``): a map is
        moved; a ``GroundingCondition`` has its phrases embedded by the frozen text encoder, cached per phrase (and
        encoded as prompts when the adapter ``reads_phrase_contexts``)."""
        contexts = self.adapter.reads_phrase_contexts
        return prepare_condition(condition, self.backbone, self.device, self._phrase_cache, contexts)

    def compute_loss(
        self,
        batch: dict,
        dropout: ConditionDropout | None = None,
        generator: Draws = None,
        use_latent_cache: bool = False,
        with_loss_terms: bool = False,
    ):
        """MSE between the UNet's prediction (with the adapter's kwargs) and the scheduler's target; ``dropout``
        drops texts and conditions of some items (training only); ``with_loss_terms``: plus ``loss_terms``."""
        inputs = self.training_inputs(batch, dropout, generator, use_latent_cache, with_loss_terms)
        loss = self.prediction_loss(inputs)
        if with_loss_terms:
            for name, term in self.loss_terms.items():
                value, scalars = term(self, inputs, inputs.term_draws[name])
                loss = loss + value
                for scalar, number in scalars.items():
                    self.log(f"train/{scalar}", number, batch_size=1)
        return loss

    def training_inputs(
        self,
        batch: dict,
        dropout: ConditionDropout | None = None,
        generator: Draws = None,
        use_latent_cache: bool = False,
        with_loss_terms: bool = False,
    ) -> TrainingInputs:
        """Everything of a step before the adapter and the UNet run: latents (from the posterior cache where
        possible), noise, timesteps, text embeddings, the prepared condition, dropout and the target."""
        if use_latent_cache:
            latents = self.training_latents(batch, generator=generator)
        else:
            latents = self.backbone.encode_images(batch["pixel_values"], generator=generator)
        noise = randn(latents.shape, generator, dtype=latents.dtype).to(latents.device)
        timesteps = self.sample_timesteps(latents.shape[0], generator)
        noisy_latents = self.backbone.noise_scheduler.add_noise(latents, noise, timesteps)
        prompts = list(batch["prompt"])
        condition = self.prepare_condition(batch["condition"])
        condition_kept = torch.ones(len(prompts), dtype=torch.bool, device=latents.device)
        if dropout is not None:
            drop_text, drop_condition = dropout.sample(len(prompts), generator)
            prompts = ["" if drop else prompt for prompt, drop in zip(prompts, drop_text.tolist())]
            condition_kept = ~drop_condition.to(latents.device)
            if drop_condition.any():
                condition = self.adapter.drop_condition(condition, drop_condition.to(self.device))
            condition = self.adapter.training_condition(condition, generator)
        prediction_type = self.backbone.noise_scheduler.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        elif prediction_type == "v_prediction":
            target = self.backbone.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise CtrlkitError(
                f"unsupported prediction_type '{prediction_type}'; ctrlkit trains epsilon or v_prediction"
            )
        image_size = tuple(side * self.backbone.vae_scale_factor for side in latents.shape[-2:])
        added = self.backbone.added_inputs(self.pooled_text_embeddings(prompts), image_size, batch.get("time_ids"))
        # drawn after everything else, so a run without loss terms draws what it always did
        terms = self.loss_terms if with_loss_terms else {}
        draws = {name: term.draw(latents, generator) for name, term in terms.items()}
        text = self.text_embeddings(prompts)
        images = batch.get("pixel_values")
        return TrainingInputs(
            noisy_latents, timesteps, text, condition, target, added, latents, condition_kept, draws, images
        )

    def prediction_loss(self, inputs: TrainingInputs) -> torch.Tensor:
        """The adapter's kwargs, the UNet's prediction and its MSE to the target (computed in fp32)."""
        return F.mse_loss(self.unet_prediction(inputs).float(), inputs.target.float())

    def unet_prediction(self, inputs: TrainingInputs) -> torch.Tensor:
        """The UNet's prediction (B, 4, h, w) for the noisy latents with the adapter's kwargs."""
        unet_kwargs = self.adapter(
            inputs.condition,
            noisy_latents=inputs.noisy_latents,
            timesteps=inputs.timesteps,
            encoder_hidden_states=inputs.encoder_hidden_states,
            **inputs.added_kwargs,
        )
        return run_unet(
            self.backbone.unet,
            inputs.noisy_latents,
            inputs.timesteps,
            inputs.encoder_hidden_states,
            **inputs.added_kwargs,
            **unet_kwargs,
        )

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        """The loss of one batch, or None (no update) for a batch of only bad items or a non-finite loss."""
        self.count_skipped_items(batch)
        trainer = self.attached_trainer()
        # with several processes a step is skipped by all or by none (see distributed.all_ranks)
        if not all_ranks(trainer, "pixel_values" in batch):
            return None
        with torch.compiler.set_stance("default") if self.hparams.compile else contextlib.nullcontext():
            loss = self.compute_loss(
                batch,
                dropout=self.condition_dropout,
                generator=self.step_draws(batch),
                use_latent_cache=True,
                with_loss_terms=True,
            )
        if not all_ranks(trainer, bool(torch.isfinite(loss))):
            return self.skip_nonfinite_step(loss)
        self.nonfinite_in_a_row = 0
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["prompt"]))
        for name, value in self.adapter.training_scalars().items():  # written every log_every_n_steps
            self.log(f"train/{name}", value, batch_size=1)
        return loss

    def step_draws(self, batch: dict, validation_batch: int | None = None) -> Draws:
        """Where a step's random numbers come from (``system.draws``): ``item``: one generator per item, seeded by
        (seed, epoch, index), so a run trains the same on any number of processes and with any accumulation;
        ``stream``: the run's training generator (validation: one generator per validation batch)."""
        if self.hparams.draws == "stream":
            if validation_batch is not None:
                return torch.Generator().manual_seed(validation_batch)
            return self.training_generator
        if "index" not in batch:
            raise CtrlkitError("system.draws=item needs items that carry an 'index'; use system.draws=stream")
        if validation_batch is not None:  # the same draws at every validation: val/loss compares across steps
            return item_generators(VALIDATION_SEED, 0, batch["index"].tolist())
        return item_generators(self.hparams.seed, self.current_epoch, batch["index"].tolist())

    def count_skipped_items(self, batch: dict) -> None:
        skipped = batch.pop("skipped", [])
        for message in skipped:
            log.warning("skipped bad data item: %s", message)
        self.skipped_items += len(skipped)
        if skipped or self.skipped_items:
            self.log("train/skipped_items", float(self.skipped_items), batch_size=1)

    def skip_nonfinite_step(self, loss: torch.Tensor) -> None:
        """Count a NaN/inf loss and skip its update; stop the run after ``max_nonfinite_steps`` in a row."""
        self.nonfinite_steps += 1
        self.nonfinite_in_a_row += 1
        step = self.global_step + 1  # the optimizer step this batch would have made
        log.warning(
            "non-finite loss %s at step %d: step skipped (%d in a row)", loss.item(), step, self.nonfinite_in_a_row
        )
        self.log("train/nonfinite_steps", float(self.nonfinite_steps), batch_size=1)
        limit = self.hparams.max_nonfinite_steps
        if self.nonfinite_in_a_row >= limit:
            raise NonFiniteLossError(
                f"loss was {loss.item()} for {self.nonfinite_in_a_row} steps in a row, the last at step {step} "
                f"(system.max_nonfinite_steps={limit}); stopped, the last good checkpoint is kept -- lower the "
                f"learning rate or check the data"
            )
        return None

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # Fixed noise and timesteps per batch, so val/loss is comparable across validations.
        batch.pop("skipped", None)  # bad items are counted where they are trained on, not here
        if "pixel_values" not in batch:
            return
        size = len(batch["prompt"])
        loss = self.compute_loss(batch, generator=self.step_draws(batch, validation_batch=batch_idx))
        self.log("val/loss", loss, prog_bar=True, batch_size=size, sync_dist=True)
        # The same noise and timesteps with every item's condition replaced by the adapter's null condition: how
        # much the condition lowers the loss. It moves before the controllability scores do (a GLIGEN run on the
        # tiny model: a gain after a few hundred steps while box IoU has not moved yet).
        without = self.compute_loss(
            batch,
            dropout=ConditionDropout(condition=1.0),
            generator=self.step_draws(batch, validation_batch=batch_idx),
        )
        # sync_dist: with several processes each validates a shard; the logged value is the mean over all of them
        self.log("val/loss_without_condition", without, batch_size=size, sync_dist=True)
        self.log("val/condition_gain", without - loss, batch_size=size, sync_dist=True)

    def configure_optimizers(self):
        """The configured optimizer over the adapter's param groups (each with its learning rate) and the
        configured schedule, stepped as its config says (``interval: step``: after every optimizer step)."""
        optimizer = self.optimizer_factory(self.adapter.param_groups(self.hparams.learning_rate))
        scheduler = {**self.lr_scheduler_config, "scheduler": self.lr_scheduler_config["scheduler"](optimizer)}
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    # ------------------------------------------------------------------ checkpoints hold the adapter only

    def checkpoint_keys(self) -> set[str]:
        """The state-dict keys a checkpoint holds: the adapter's, less its frozen parameters, which the adapter's
        build makes again from the base model and the config (Control-LoRA's frozen copy of the UNet encoder: a
        1.4 GB fp32 copy of SD1.5's in every checkpoint otherwise)."""
        frozen = {
            f"adapter.{name}" for name, parameter in self.adapter.named_parameters() if not parameter.requires_grad
        }
        return {name for name in self.state_dict() if name.startswith("adapter.")} - frozen

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        kept = self.checkpoint_keys()
        checkpoint["state_dict"] = {name: tensor for name, tensor in checkpoint["state_dict"].items() if name in kept}
        # Everything random a resumed run needs to continue bit for bit (plain values: weights_only loads them).
        checkpoint["ctrlkit_resume"] = {
            "training_generator": self.training_generator.get_state(),
            "rng": capture_rng_states(),
            "skipped_items": self.skipped_items,
            "nonfinite_steps": self.nonfinite_steps,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
        }

    def on_train_start(self) -> None:
        # The global RNGs are set back here, just before the first resumed batch, so nothing Lightning does while
        # restoring can shift them.
        if self._rng_states_to_restore is not None:
            restore_rng_states(self._rng_states_to_restore)
            self._rng_states_to_restore = None

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        resume = checkpoint.get("ctrlkit_resume")
        if resume is not None:
            self.training_generator.set_state(resume["training_generator"])
            self._rng_states_to_restore = resume["rng"]
            self.skipped_items = int(resume["skipped_items"])
            self.nonfinite_steps = int(resume["nonfinite_steps"])
            self.nonfinite_in_a_row = int(resume["nonfinite_in_a_row"])
        self.check_checkpoint_fits(checkpoint)
        # Lightning restores the optimizer and schedule from the checkpoint after this hook: the config's rates win
        apply_configured_learning_rates(
            checkpoint, [group["lr"] for group in self.adapter.param_groups(self.hparams.learning_rate)]
        )

    def check_checkpoint_fits(self, checkpoint: dict) -> None:
        """Raise a one-line error when a training checkpoint's weights are not this adapter's (another family or
        build); ``train`` calls it before writing anything to the run it resumes."""
        expected = self.checkpoint_keys()  # the frozen parameters too in checkpoints written before they were left out
        allowed = {name for name in self.state_dict() if name.startswith("adapter.")}
        found = set(checkpoint.get("state_dict", {}))
        if not expected <= found <= allowed:
            missing, unexpected = sorted(expected - found), sorted(found - allowed)
            raise CtrlkitError(
                f"checkpoint does not match this adapter: {len(missing)} missing keys (e.g. {missing[:2]}), "
                f"{len(unexpected)} unexpected keys (e.g. {unexpected[:2]})"
            )

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def generate(
        self,
        condition: Any,
        prompts: list[str],
        *,
        image_size: tuple[int, int] | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 5.0,
        scheduler: str = "unipc",
        seed: int = 0,
        negative_prompt: str = "",
        use_adapter: bool = True,
    ) -> torch.Tensor:
        """Sample images (B, 3, H, W) in [0, 1] for ``prompts`` under ``condition``: a map (B, C, H, W), whose
        size is the images' unless ``image_size`` says, or a ``GroundingCondition`` (``image_size`` required)."""
        condition = self.prepare_condition(condition)
        if image_size is None:
            if isinstance(condition, GroundingCondition):
                raise CtrlkitError("generate() needs image_size for a condition that is not a map")
            image_size = tuple(condition.shape[-2:])
        conditioning = {"adapter": self.adapter, "condition": condition} if use_adapter else {}
        with self.precision_context():
            images = self.backbone.generate(
                prompts,
                image_size,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                scheduler=scheduler,
                seed=seed,
                negative_prompt=negative_prompt,
                encode_prompts=self.text_embeddings,
                **conditioning,
            )
        return images.float()
