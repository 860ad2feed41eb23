"""The model card beside the exported adapter, and the adapter as a W&B artifact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from wandb.proto import wandb_internal_pb2

from lightning_modules.callbacks.model_card import read_card, steps_behind
from lightning_modules.commands.train import train
from tests.helpers.wandb_records import read_records


def table_row(body: str, score: str) -> list[str]:
    (row,) = [line for line in body.splitlines() if line.startswith(f"| {score} |")]
    return [cell.strip() for cell in row.strip("|").split("|")]


def test_card_holds_the_runs_real_figures(make_train_config):
    cfg = make_train_config("trainer.max_steps=3", "callbacks.controllability.every_n_steps=2")
    train(cfg)
    run = Path(cfg.paths.output_dir)
    folder = run / "adapter"
    front, body = read_card(folder)
    summary = json.loads((run / "controllability.json").read_text())

    assert front["base_model"] == "lightning_modules.backbone.load_tiny_backbone"
    assert front["license"] and {"ctrlkit", "controlnet", "canny"} <= set(front["tags"])
    facts = front["ctrlkit"]
    assert facts["step"] == 3 == summary["final"]["step"]
    assert facts["wall_seconds"] > 0
    assert facts["control_step"] == summary["control_step"]
    assert facts["base_without_adapter"] == summary["base_without_adapter"]
    assert facts["final"] == {key: value for key, value in summary["final"].items() if key != "step"}
    # the table shows the same numbers: base without adapter vs the adapter at the final step
    # and, on shapes, the ceiling: the items' own images ("-" where not scored)
    assert "| score | base without adapter | adapter at step 3 | the items' own images |" in body
    assert f"first {summary['num_items']} validation items" in body
    truth = summary["dataset_images"]
    for score, value in facts["final"].items():
        assert table_row(body, score) == [
            score,
            f"{summary['base_without_adapter'][score]:.4f}",
            f"{value:.4f}",
            f"{truth[score]:.4f}" if score in truth else "-",
        ]
    assert table_row(body, "mask_iou")[3] == "1.0000"
    # the final grid, copied beside the card so the folder is self-contained
    assert "](samples.png)" in body
    assert (folder / "samples.png").read_bytes() == (run / "samples" / "step_000003.png").read_bytes()
    # the command with the run's overrides, and the settings
    assert "ctrlkit train trainer=cpu logger=none" in body and "trainer.max_steps=3" in body
    assert "ControlNet" in body and "conditions.canny.CannyExtractor" in body and "`train_size=10000`" in body
    assert "ControlNetModel.from_pretrained" in body


def test_gligen_run_gets_a_card(make_train_config):
    cfg = make_train_config("adapter=gligen", "condition=boxes", "adapter.build.max_objects=4", "trainer.max_steps=2")
    train(cfg)
    run = Path(cfg.paths.output_dir)
    front, body = read_card(run / "adapter")
    summary = json.loads((run / "controllability.json").read_text())
    assert {"gligen", "boxes"} <= set(front["tags"]) and front["ctrlkit"]["step"] == 2
    assert summary["jump_metric"] == "box_iou" == front["ctrlkit"]["jump_metric"]
    assert table_row(body, "box_iou")[1:] == [
        f"{summary['base_without_adapter']['box_iou']:.4f}",
        f"{summary['final']['box_iou']:.4f}",
        f"{summary['dataset_images']['box_iou']:.4f}",
    ]
    assert "GLIGEN" in body and "`max_objects=4`" in body and "(samples.png)" in body
    assert 'UNet2DConditionModel.from_pretrained("adapter/unet")' in body  # the exported gated UNet


def test_a_gligen_card_without_the_unet_export_loads_its_layers_through_ctrlkit(tmp_path):
    from lightning_modules.callbacks.card_usage import how_to_load

    (tmp_path / "with" / "unet").mkdir(parents=True)
    (tmp_path / "without").mkdir()
    assert "from_pretrained" in how_to_load("gligen", tmp_path / "with")
    usage = how_to_load("gligen", tmp_path / "without")
    assert 'load_adapter("without", unet)' in usage and "from_pretrained" not in usage


def test_multi_condition_and_control_lora_cards_say_how_their_files_load(tmp_path):
    from lightning_modules.callbacks.card_usage import how_to_load

    for name, files in {"multi": ["multi_condition.json"], "lora": ["control_lora.safetensors"]}.items():
        (tmp_path / name).mkdir()
        for file in files:
            (tmp_path / name / file).touch()
    (tmp_path / "merged" / "controlnet").mkdir(parents=True)
    (tmp_path / "merged" / "control_lora.safetensors").touch()
    multi = how_to_load("controlnet", tmp_path / "multi")
    assert "multi_condition.json" in multi and "parts: {canny: edges.png}" in multi
    assert 'load_adapter("lora", unet)' in how_to_load("controlnet", tmp_path / "lora")
    merged = how_to_load("controlnet", tmp_path / "merged")
    assert 'ControlNetModel.from_pretrained("merged/controlnet")' in merged


def test_layout_controlnet_and_unlocked_decoder_cards_say_the_controlnet_alone_is_not_the_model(tmp_path):
    from lightning_modules.callbacks.card_usage import how_to_load

    for name, files in {
        "layout": ["layout_controlnet.json"],
        "unlocked": ["unet_decoder.safetensors"],
        "plain": [],
        "layout_unlocked": ["layout_controlnet.json", "unet_decoder.safetensors"],
    }.items():
        (tmp_path / name).mkdir()
        for file in files:
            (tmp_path / name / file).touch()
    layout = how_to_load("layout_controlnet", tmp_path / "layout")
    assert 'load_adapter("layout", unet)' in layout and "layout_map" in layout and "decoder" not in layout
    plain = how_to_load("controlnet", tmp_path / "plain")
    assert 'ControlNetModel.from_pretrained("plain")' in plain and "decoder" not in plain
    unlocked = how_to_load("controlnet", tmp_path / "unlocked")
    assert "not the model" in unlocked and 'ControlNetModel.from_pretrained("unlocked")' in unlocked
    both = how_to_load("layout_controlnet", tmp_path / "layout_unlocked")
    assert "not the model" in both and 'load_adapter("layout_unlocked", unet)' in both


def test_a_resumed_run_that_redoes_its_end_gets_a_card(make_train_config, tmp_path):
    import shutil

    cfg = make_train_config("trainer.max_steps=2")
    train(cfg)
    finished = Path(cfg.paths.output_dir)
    expected, _ = read_card(finished / "adapter")
    for missing in ("card", "export"):  # killed after the export, before its card; or before the export
        killed = tmp_path / f"killed-{missing}"
        shutil.copytree(finished, killed)
        if missing == "card":
            (killed / "adapter" / "README.md").unlink()
        else:
            shutil.rmtree(killed / "adapter")
        # init_adapter= given to a resumed run is not applied (its checkpoint holds the weights): the card says so
        train(make_train_config("trainer.max_steps=2", f"resume={killed}", "init_adapter=tiny/controlnet_canny"))
        front, body = read_card(killed / "adapter")
        assert front["ctrlkit"]["step"] == 2 and (killed / "adapter" / "samples.png").is_file()
        assert "init_adapter" not in front["ctrlkit"] and "total_steps" not in front["ctrlkit"]
        assert "from the weights of" not in body and "| started from |" not in body
        assert front["ctrlkit"]["final"] == expected["ctrlkit"]["final"]
        # the wall time goes on from the checkpoint's (the training session's), not from 0
        checkpoint = torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)
        (saved,) = [state for key, state in checkpoint["callbacks"].items() if key.startswith("ModelCardCallback")]
        assert 0 < saved["wall_seconds"] <= front["ctrlkit"]["wall_seconds"]
        assert f"resume={killed}" in body


def test_card_without_controllability_says_so(make_train_config):
    cfg = make_train_config("trainer.max_steps=1", "~callbacks.controllability")
    train(cfg)
    front, body = read_card(Path(cfg.paths.output_dir) / "adapter")
    assert front["ctrlkit"]["step"] == 1 and "final" not in front["ctrlkit"]
    assert "The controllability callback was not part of this run: no scores." in body


def test_adapter_logged_as_wandb_artifact_offline(make_train_config, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # wandb's artifact staging folder (~/.local/share/wandb) in the test
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    cfg = make_train_config(
        "logger=wandb", "logger.wandb.mode=offline", "logger.wandb.log_adapter=true", "trainer.max_steps=2"
    )
    train(cfg)
    run = Path(cfg.paths.output_dir)
    (run_dir,) = (run / "wandb").glob("offline-run-*")
    artifacts = [record.artifact for record in read_records(run_dir) if record.WhichOneof("record_type") == "artifact"]
    (artifact,) = [artifact for artifact in artifacts if artifact.type == "model"]
    assert artifact.name == f"adapter-{(run / 'wandb_run_id').read_text().strip()}"
    assert {"latest", "step-2"} <= set(artifact.aliases)
    assert json.loads(artifact.metadata)["step"] == 2
    entries = {entry.path: entry for entry in artifact.manifest.contents}
    exported = {
        path.relative_to(run / "adapter").as_posix() for path in (run / "adapter").rglob("*") if path.is_file()
    }
    assert {"README.md", "samples.png", "diffusion_pytorch_model.safetensors", "config.json"} <= set(entries)
    assert set(entries) == exported
    # the staged copies are the exported files
    for name in ("README.md", "diffusion_pytorch_model.safetensors"):
        staged = Path(entries[name].local_path)
        assert staged.read_bytes() == (run / "adapter" / name).read_bytes()
    assert isinstance(artifact, wandb_internal_pb2.ArtifactRecord)


def test_the_steps_behind_saved_weights_come_from_their_card_or_are_unknown(tmp_path):
    """steps_behind(init_adapter): a shipped name, a run folder (its adapter/), a card that itself continued other
    weights (total_steps), and None for no card, a card that is not ctrlkit's or a path that is not there."""
    assert steps_behind("tiny/controlnet_canny") == 1000
    assert steps_behind("tiny/controlnet_multi") == 3000  # 1000 of its own after 2000: its total_steps
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "README.md").write_text("---\nctrlkit:\n  step: 7\n---\n# card\n")
    assert steps_behind(str(run)) == steps_behind(str(run / "adapter")) == 7
    other = tmp_path / "other"
    other.mkdir()
    assert steps_behind(str(other)) is None  # no card
    (other / "README.md").write_text("---\nlicense: mit\n---\n# someone else's card\n")
    assert steps_behind(str(other)) is None
    for text in ("no front matter at all: [unclosed\n", "---\nctrlkit: [unclosed\n---\n", "---\njust words\n---\n"):
        (other / "README.md").write_text(text)
        with pytest.raises(ValueError, match="front matter"):
            read_card(other)
        assert steps_behind(str(other)) is None
    assert steps_behind(str(tmp_path / "absent")) is None
    assert steps_behind(None) is None
