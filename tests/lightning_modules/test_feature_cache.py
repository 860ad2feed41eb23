"""The disk feature cache: a second run encodes nothing, any change misses, concurrent writers leave whole entries."""

from __future__ import annotations

import multiprocessing

import torch
from omegaconf import open_dict

from lightning_modules.backbone import build_tiny_backbone
from lightning_modules.commands.train import train
from lightning_modules.feature_cache import FeatureCache, module_fingerprint, tensor_key_bytes
from tests.helpers.cache_writers import write_many


def test_a_second_run_encodes_nothing_and_trains_the_same(make_train_config, tmp_path, monkeypatch):
    from lightning_modules.backbone import Backbone

    calls = {"vae": 0, "text": 0}
    encode_posterior, encode_prompts = Backbone.encode_posterior, Backbone.encode_prompts

    def counting_posterior(self, pixel_values):
        calls["vae"] += 1
        return encode_posterior(self, pixel_values)

    def counting_prompts(self, prompts):
        calls["text"] += 1
        return encode_prompts(self, prompts)

    monkeypatch.setattr(Backbone, "encode_posterior", counting_posterior)
    monkeypatch.setattr(Backbone, "encode_prompts", counting_prompts)

    def run(name: str) -> tuple[dict, torch.Tensor]:
        cfg = make_train_config(
            f"system.cache_dir={tmp_path / 'cache'}",
            "trainer.max_steps=3",
            "callbacks.controllability.every_n_steps=0",
            "callbacks.sample_grid.every_n_steps=0",
        )
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / name)
        calls.update(vae=0, text=0)
        metrics, objects = train(cfg)
        system = objects["system"]
        weights = torch.cat([p.detach().flatten() for p in system.adapter.trainable_parameters()])
        return dict(system.feature_cache.counts.by_kind), weights, dict(calls)

    first_counts, first_weights, first_calls = run("first")
    assert first_counts["vae_posterior"][1] == 6 and first_calls["vae"] >= 6  # 3 steps x batch 2, all new
    second_counts, second_weights, second_calls = run("second")
    assert second_counts["vae_posterior"] == [6, 0] and second_counts["text_embedding"][1] == 0
    # nothing encoded for training; validation and sampling still encode their own prompts, not from the cache
    assert second_calls["vae"] == first_calls["vae"] - 6
    assert torch.equal(first_weights, second_weights)  # cached values are bit-identical to computed ones


def test_a_changed_image_or_vae_gives_another_key(tmp_path):
    backbone = build_tiny_backbone(seed=0)
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    key = FeatureCache.key(module_fingerprint(backbone.vae), tensor_key_bytes(image))
    changed_image = image.clone()
    changed_image[0, 0, 0, 0] += 1e-3
    assert FeatureCache.key(module_fingerprint(backbone.vae), tensor_key_bytes(changed_image)) != key
    assert FeatureCache.key(module_fingerprint(build_tiny_backbone(seed=1).vae), tensor_key_bytes(image)) != key
    with torch.no_grad():
        next(backbone.vae.parameters()).view(-1)[0] += 1e-6  # one weight, by a hair
    assert FeatureCache.key(module_fingerprint(backbone.vae), tensor_key_bytes(image)) != key
    assert FeatureCache.key(module_fingerprint(backbone.vae), tensor_key_bytes(image.half())) != key

    cache = FeatureCache(tmp_path)
    cache.put("vae_posterior", key, {"mean": torch.ones(4, 2, 2)})
    assert torch.equal(cache.get("vae_posterior", key)["mean"], torch.ones(4, 2, 2))
    assert cache.get("vae_posterior", FeatureCache.key("another")) is None
    cache.path("vae_posterior", key).write_bytes(b"truncated")  # a damaged entry is computed again
    assert cache.get_or_compute("vae_posterior", key, lambda: {"mean": torch.zeros(1)})["mean"].item() == 0


def test_two_writers_at_once_leave_readable_entries(tmp_path):
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=write_many, args=(str(tmp_path), seed)) for seed in (1, 2)]
    for writer in writers:
        writer.start()
    cache, reads = FeatureCache(tmp_path), 0
    while any(writer.is_alive() for writer in writers):
        for index in range(4):
            entry = cache.get("x", FeatureCache.key(str(index)))
            if entry is not None:  # whole: every value one writer's
                assert entry["value"].shape == (256, 256) and entry["value"].unique().numel() == 1
                reads += 1
    for writer in writers:
        writer.join()
        assert writer.exitcode == 0
    assert reads > 0  # the reader met entries while the writers were writing
    assert all(cache.get("x", FeatureCache.key(str(index))) is not None for index in range(4))
    assert not list(tmp_path.rglob("*.tmp-*"))  # no temporary files left behind
