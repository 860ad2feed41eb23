"""`ctrlkit evaluate` end to end on an adapter trained for a few steps: outputs, base beside adapter, W&B table."""

import csv
import json
from pathlib import Path

import pytest
import yaml
from hydra.core.global_hydra import GlobalHydra

from lightning_modules.commands.evaluate import evaluation_units, locate_adapter, run_evaluate
from lightning_modules.commands.train import train
from lightning_modules.errors import CtrlkitError
from tests.conftest import compose_config, compose_train_config
from tests.helpers.cli import the_error_line
from tests.helpers.wandb_records import read_history


def compose_evaluate_config(output_dir: Path, overrides: list[str]):
    return compose_config("evaluate", output_dir, overrides)


def without_quality_models(tmp_path: Path) -> list[str]:
    """Overrides pointing FID/KID and CLIP score at absent files: reported "unavailable", nothing loaded."""
    return [f"quality.inception_weights={tmp_path / 'absent.pth'}", f"quality.clip_model={tmp_path / 'absent'}"]


@pytest.fixture
def trained_run(make_train_config) -> Path:
    cfg = make_train_config("trainer.max_steps=2")
    train(cfg)
    return Path(cfg.paths.output_dir)


def test_evaluate_a_trained_adapter(trained_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "evaluation"
    cfg = compose_evaluate_config(
        out,
        [
            f"adapter_path={trained_run}",
            "num_samples=3",
            "num_seeds=2",
            "batch_size=2",
            "sampling.num_inference_steps=2",
            "grid_rows=1",
            f"quality.inception_weights={tmp_path / 'absent' / 'inception.pth'}",
            f"quality.clip_model={tmp_path / 'absent' / 'clip'}",
            "logger=wandb",
            "logger.wandb.mode=offline",
        ],
    )
    summary = run_evaluate(cfg)
    GlobalHydra.instance().clear()
    printed = capsys.readouterr().out
    assert summary["condition"] == "canny" and summary["primary_metric"] == "canny_f1"
    for model in ("base", "adapter"):
        scores = summary[model]
        assert 0.0 <= scores["canny_f1"] <= 1.0 and 0.0 <= scores["mask_iou"] <= 1.0
        assert scores["fid"] == f"unavailable: {tmp_path / 'absent' / 'inception.pth'} not found"
        assert scores["clip_score"].startswith("unavailable:")
    assert json.loads((out / "metrics.json").read_text()) == summary
    rows = list(csv.DictReader((out / "per_sample.csv").open()))
    assert len(rows) == 2 * 2 * 3 + 2 * 3  # models x seeds x items, and the two references once per item
    assert {(row["model"], row["item"], row["seed"]) for row in rows} == {
        (model, str(item), str(seed)) for model in ("base", "adapter") for item in range(3) for seed in range(2)
    } | {(model, str(item), "0") for model in ("truth", "truth_vae") for item in range(3)}
    # the items' own images are the ceiling: their edges are the condition itself and their mask is the scene's
    assert summary["truth"]["canny_f1"] == 1.0 and summary["truth"]["mask_iou"] == 1.0
    # the VAE round trip loses some of it, and is scored as a model is
    assert 0.0 < summary["truth_vae"]["canny_f1"] < 1.0 and set(summary["truth_vae"]) >= {"canny_f1", "mask_iou"}
    # two seeds give two different images of the same item
    base = [row for row in rows if row["model"] == "base" and row["item"] == "0"]
    assert base[0]["canny_ssim"] != base[1]["canny_ssim"]
    assert (out / "grid.png").is_file() and [row["rank"] for row in summary["grid"]["rows"]] == ["best", "worst"]
    assert "canny_f1" in printed and "mask_iou" in printed and "base" in printed and "adapter" in printed
    assert "truth_vae" in printed
    # one object per scene (the default data): no breakdown by object count
    assert {row["num_objects"] for row in rows} == {"1"} and "by_num_objects" not in summary
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    history = read_history(run_dir)
    assert history["evaluate/samples/_type"] == ["table-file"] and history["evaluate/samples/nrows"] == [18]
    table = json.loads((run_dir / "files" / history["evaluate/samples/path"][0]).read_text())
    assert table["columns"][:4] == ["model", "condition", "prompt", "sample"] and "canny_f1" in table["columns"]
    assert history["evaluate/adapter/canny_f1"] == [summary["adapter"]["canny_f1"]]
    assert history["evaluate/truth_vae/canny_f1"] == [summary["truth_vae"]["canny_f1"]]


def test_adapter_path_errors(tmp_path, cli):
    with pytest.raises(CtrlkitError, match="is not a folder"):
        locate_adapter(str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CtrlkitError, match="is empty"):
        locate_adapter(str(tmp_path / "empty"))
    line = the_error_line("evaluate", *cli(["evaluate", f"adapter_path={tmp_path / 'absent'}"]))
    assert line.startswith(f"ctrlkit evaluate: error: adapter_path {tmp_path / 'absent'} is not a folder")


def test_evaluate_a_composition_of_controlnet_and_gligen(tmp_path, owlvit_dir, capsys):
    """A composition file as `ctrlkit generate` writes it: each unit's condition comes from the evaluation items,
    scores are named per unit, grounding boxes are re-found by a local detector."""
    runs = {}
    gligen = ["adapter=gligen", "condition=boxes", "adapter.build.max_objects=4"]
    for name, overrides in {"controlnet": [], "gligen": gligen}.items():
        cfg = compose_train_config(tmp_path / name, ["trainer.max_steps=2", *overrides])
        train(cfg)
        runs[name] = tmp_path / name
    GlobalHydra.instance().clear()
    composition = tmp_path / "composition.yaml"
    composition.write_text(
        yaml.safe_dump(
            {
                "prompts": ["a red circle"],
                "units": [
                    {
                        "adapter": str(runs["controlnet"]),
                        "source_image": "photo.png",
                        "extractor": "canny",
                        "scale": 0.8,
                    },
                    {
                        "adapter": str(runs["gligen"] / "adapter"),
                        "boxes": [[0, 0, 1, 1]],
                        "phrases": ["x"],
                        "end": 0.5,
                        # the condition's own config pads to 30 slots; evaluate pads to the adapter's 4
                        "extractor": "boxes",
                    },
                ],
            }
        )
    )
    out = tmp_path / "evaluation"
    cfg = compose_evaluate_config(
        out,
        [
            f"composition={composition}",
            "num_samples=2",
            "num_seeds=1",
            "batch_size=2",
            "sampling.num_inference_steps=2",
            f"box_detector={owlvit_dir}",
            *without_quality_models(tmp_path),
        ],
    )
    summary = run_evaluate(cfg)
    GlobalHydra.instance().clear()
    printed = capsys.readouterr().out
    assert [unit["condition"] for unit in summary["units"]] == ["canny", "boxes"]
    assert summary["units"][0]["scale"] == 0.8 and summary["units"][1]["end"] == 0.5
    assert summary["primary_metric"] == "mask_iou"  # several units on shapes: the scene's score ranks the grid
    for model in ("base", "adapter"):
        scores = summary[model]
        for key in ("unit0/canny_f1", "mask_iou", "box_iou", "unit1/detected_box_iou", "detected_box_ap50"):
            assert 0.0 <= scores[key] <= 1.0, (model, key)
        assert "canny_f1" not in scores  # a composition's scores are named by unit
    rows = list(csv.DictReader((out / "per_sample.csv").open()))
    assert len(rows) == 2 * 2 + 2 * 2 and {"unit0/canny_ssim", "unit1/detected_box_recall50"} <= set(rows[0])
    # the references are scored per unit as the models are; the scenes' own images have the scenes' masks
    assert summary["truth"]["mask_iou"] == 1.0 and "unit1/detected_box_iou" in summary["truth_vae"]
    # the composition changes the images: the same noise gives different samples with and without it
    base = {row["item"]: row["unit0/canny_ssim"] for row in rows if row["model"] == "base"}
    adapted = {row["item"]: row["unit0/canny_ssim"] for row in rows if row["model"] == "adapter"}
    assert base != adapted
    assert summary["grid"]["columns"] == "condition | condition | base | adapter | reference"
    assert "unit1:" in printed and "unit0/canny_f1" in printed


def test_composition_units_need_a_known_condition(tmp_path):
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "config.json").write_text("{}")
    for units, message in [
        ("[]", "nothing to evaluate"),
        (f"[{{adapter: {tmp_path / 'weights'}}}]", "has no run config.yaml beside it; say its condition"),
        (f"[{{adapter: {tmp_path / 'weights'}, extractor: nope}}]", "unknown extractor 'nope'"),
        (f"[{{adapter: {tmp_path / 'weights'}, colour: red}}]", r"unknown field\(s\) \['colour'\]"),
    ]:
        cfg = compose_evaluate_config(tmp_path / "out", [f"units={units}"])
        with pytest.raises(CtrlkitError, match=message):
            evaluation_units(cfg)
    GlobalHydra.instance().clear()


def test_a_single_unit_is_ranked_by_its_conditions_own_score():
    from omegaconf import OmegaConf

    from conditions.boxes import ShapesBoxesExtractor
    from conditions.canny import CannyExtractor
    from lightning_modules.commands.evaluate import EvalUnit, _primary
    from lightning_modules.data.shapes import ShapesDataset

    shapes = ShapesDataset(ShapesBoxesExtractor(4), 2, 64, seed=0)
    boxes = OmegaConf.create({"name": "boxes", "metric": "box_iou"})
    # boxes on shapes: box IoU, as training's controllability callback, not the scene's mask IoU
    assert _primary([EvalUnit(Path("g"), boxes, {}, ShapesBoxesExtractor(4), shapes)]) == "box_iou"
    canny = OmegaConf.create({"name": "canny"})
    assert _primary([EvalUnit(Path("c"), canny, {}, CannyExtractor(), shapes)]) == "canny_f1"
    unnamed = OmegaConf.create({"name": "boxes"})  # no metric and no re-extraction score: the scene's
    assert _primary([EvalUnit(Path("g"), unnamed, {}, ShapesBoxesExtractor(4), shapes)]) == "mask_iou"


def test_a_multi_condition_adapter_is_evaluated_on_the_subset_asked(tmp_path):
    """condition_subset=[canny]: only the canny part is given and scored (as a dedicated canny adapter is), the
    grid ranked by canny F1; a run without parts says so in one line."""
    quick = ["num_samples=2", "num_seeds=1", "sampling.num_inference_steps=2", "grid_rows=1"]
    absent = without_quality_models(tmp_path)
    cfg = compose_evaluate_config(
        tmp_path / "canny", ["adapter_path=tiny/controlnet_multi", "condition_subset=[canny]", *quick, *absent]
    )
    summary = run_evaluate(cfg)
    GlobalHydra.instance().clear()
    assert summary["primary_metric"] == "canny_f1" and summary["condition_subset"] == ["canny"]
    assert "canny_f1" in summary["adapter"] and "depth_rmse" not in summary["adapter"]
    units, _ = evaluation_units(
        compose_evaluate_config(tmp_path / "all", ["adapter_path=tiny/controlnet_multi", *quick])
    )
    GlobalHydra.instance().clear()
    assert units[0].condition.extractor.use is None  # all parts when no subset is asked
    with pytest.raises(CtrlkitError, match=r"condition_subset=\['canny'\]: the canny condition has no parts"):
        evaluation_units(
            compose_evaluate_config(tmp_path / "x", ["adapter_path=tiny/controlnet_canny", "condition_subset=[canny]"])
        )
    GlobalHydra.instance().clear()


def test_the_base_models_samples_are_kept_for_the_next_evaluation(tmp_path, monkeypatch, caplog):
    """base_cache_dir: a second evaluation of the same set (another adapter, another subset) reads the base model's
    samples instead of sampling them, and scores them the same; a changed sampler or a damaged entry samples."""
    from lightning_modules.commands import evaluate

    base_calls = []
    sample = evaluate.generate

    def counting(backbone, units, *args):
        base_calls.append(units is None)
        return sample(backbone, units, *args)

    monkeypatch.setattr(evaluate, "generate", counting)
    folder = tmp_path / "base_samples"
    quick = ["num_samples=2", "num_seeds=2", "batch_size=2", "sampling.num_inference_steps=2", "grid_rows=1"]
    settings = [f"base_cache_dir={folder}", "score_references=false", *quick, *without_quality_models(tmp_path)]

    def base_sampled(name: str, *overrides: str) -> tuple[int, dict]:
        base_calls.clear()
        summary = run_evaluate(compose_evaluate_config(tmp_path / name, [*settings, *overrides]))
        GlobalHydra.instance().clear()
        return sum(base_calls), summary["base"]

    sampled, first = base_sampled("first", "adapter_path=tiny/controlnet_canny")
    assert sampled == 2 and len(list(folder.glob("*.safetensors"))) == 2  # one entry per (seed, batch)
    with caplog.at_level("INFO", logger=evaluate.__name__.replace("evaluate", "base_image_cache")):
        sampled, again = base_sampled("other-adapter", "adapter_path=tiny/t2i_adapter_canny")
    assert sampled == 0 and again == first
    assert f"base model: 2 of 2 batches of samples read from {folder}" in caplog.text
    sampled, _ = base_sampled("more-steps", "adapter_path=tiny/controlnet_canny", "sampling.num_inference_steps=3")
    assert sampled == 2 and len(list(folder.glob("*.safetensors"))) == 4  # another sampler: other entries
    damaged = sorted(folder.glob("*.safetensors"), key=lambda path: path.stat().st_mtime)[0]
    damaged.write_bytes(b"not a safetensors file")
    sampled, after = base_sampled("damaged", "adapter_path=tiny/controlnet_canny")
    assert sampled == 1 and after == first  # the damaged entry sampled again, and written back whole


def test_a_grounding_unit_is_evaluated_on_the_scenes_it_was_trained_on(tmp_path):
    """units=[{adapter: <GLIGEN>}] alone: 1-3-object scenes as in its training, not the default condition's one."""
    from lightning_modules.commands.evaluate import configure

    for overrides in (
        ["units=[{adapter: tiny/gligen_masked_boxes, end: 1.0}]"],
        ["adapter_path=tiny/gligen_masked_boxes"],
    ):
        cfg = compose_evaluate_config(tmp_path / "out", overrides)
        units = configure(cfg)
        GlobalHydra.instance().clear()
        assert list(cfg.data.num_objects) == [1, 3] and units[0].condition.name == "boxes"


def test_score_references_takes_a_flag(tmp_path):
    from lightning_modules.commands.value_checks import check_settings

    cfg = compose_evaluate_config(tmp_path / "out", ["score_references=maybe"])
    GlobalHydra.instance().clear()
    with pytest.raises(CtrlkitError, match=r"score_references='maybe'; allowed: "):
        check_settings("evaluate", cfg)
    # off: only base and adapter are sampled, scored and written
    quick = ["num_samples=2", "num_seeds=1", "sampling.num_inference_steps=2", "grid_rows=1"]
    absent = without_quality_models(tmp_path)
    cfg = compose_evaluate_config(
        tmp_path / "out", ["adapter_path=tiny/controlnet_canny", "score_references=false", *quick, *absent]
    )
    summary = run_evaluate(cfg)
    GlobalHydra.instance().clear()
    assert "truth" not in summary and "truth_vae" not in summary and "canny_f1" in summary["adapter"]
    rows = list(csv.DictReader((tmp_path / "out" / "per_sample.csv").open()))
    assert {row["model"] for row in rows} == {"base", "adapter"}


def test_scores_are_broken_down_by_object_count_on_scenes_of_several(tmp_path, capsys, monkeypatch):
    """A grounding adapter on 1-3-object scenes: metrics.json, the report and W&B give each score by object count,
    the means of the per-sample rows of that count; one object's own image finds its box exactly."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_evaluate_config(
        tmp_path / "out",
        [
            "adapter_path=tiny/gligen_masked_boxes",
            "num_samples=8",
            "num_seeds=1",
            "batch_size=8",
            "sampling.num_inference_steps=2",
            "grid_rows=1",
            *without_quality_models(tmp_path),
            "logger=wandb",
            "logger.wandb.mode=offline",
        ],
    )
    summary = run_evaluate(cfg)
    GlobalHydra.instance().clear()
    printed = capsys.readouterr().out
    rows = list(csv.DictReader((tmp_path / "out" / "per_sample.csv").open()))
    (run_dir,) = (tmp_path / "out" / "wandb").glob("offline-run-*")
    history = read_history(run_dir)
    assert history["evaluate/adapter/box_iou/2_objects"] == [summary["by_num_objects"]["2"]["adapter"]["box_iou"]]
    assert history["evaluate/truth/box_iou/1_objects"] == [1.0]
    counts = {row["item"]: row["num_objects"] for row in rows if row["model"] == "adapter"}
    by_count = summary["by_num_objects"]
    # the first 8 items of the fixed validation split: five scenes of one object, three of two
    assert sorted(by_count) == sorted(set(counts.values())) == ["1", "2"]
    assert sum(entry["num_items"] for entry in by_count.values()) == 8
    for count, entry in by_count.items():
        for model in ("base", "adapter", "truth", "truth_vae"):
            chosen = [float(row["box_iou"]) for row in rows if row["model"] == model and row["num_objects"] == count]
            assert entry[model]["box_iou"] == pytest.approx(sum(chosen) / len(chosen)), (count, model)
        assert f"box_iou, {count} object" in printed
    assert by_count["1"]["num_items"] == 5 and by_count["1"]["truth"]["box_iou"] == 1.0


def test_command_line_overrides_meet_the_runs_config(tmp_path):
    """from_run takes model, adapter and condition from the run's config.yaml; the command line's keys go on top
    (a run moved to another machine: model.path), and a group option other than the run's stops in one line
    instead of being dropped."""
    import shutil

    from omegaconf import OmegaConf

    from lightning_modules.commands.evaluate import configure
    from lightning_modules.shipped_adapters import resolve_adapter

    shipped = Path(resolve_adapter("tiny/controlnet_canny"))
    cfg = compose_evaluate_config(
        tmp_path / "out", ["adapter_path=tiny/controlnet_canny", "condition.extractor.low_threshold=50"]
    )
    units = configure(cfg)
    GlobalHydra.instance().clear()
    assert OmegaConf.load(shipped / "train_config.yaml").condition.extractor.low_threshold == 100
    assert units[0].condition.extractor.low_threshold == 50 and cfg.condition.extractor.low_threshold == 50
    # a run of a model from local files, evaluated where those files live elsewhere
    run = tmp_path / "run"
    shutil.copytree(shipped, run / "adapter")
    trained = OmegaConf.load(shipped / "train_config.yaml")
    trained.model = {"_target_": "lightning_modules.backbone.load_pretrained_backbone", "path": "/gone/sd15"}
    OmegaConf.save(trained, run / "config.yaml")
    cfg = compose_evaluate_config(tmp_path / "out", [f"adapter_path={run}", "model=sd15", "model.path=/here/sd15"])
    configure(cfg)
    GlobalHydra.instance().clear()
    assert cfg.model.path == "/here/sd15"
    for overrides, named in (
        (["condition=depth"], "condition=depth: this run was trained with condition 'canny'"),
        (["model=sd15", "model.path=/x"], "model=sd15: this run was trained with model '.*load_tiny_backbone'"),
    ):
        cfg = compose_evaluate_config(tmp_path / "out", ["adapter_path=tiny/controlnet_canny", *overrides])
        GlobalHydra.instance().clear()
        with pytest.raises(CtrlkitError, match=rf"{named} .*add from_run=false to use it"):
            evaluation_units(cfg)
    # the run's own option is no conflict; from_run=false takes this command's condition
    cfg = compose_evaluate_config(tmp_path / "out", ["adapter_path=tiny/controlnet_canny", "condition=canny"])
    assert evaluation_units(cfg)[0][0].condition.name == "canny"
    cfg = compose_evaluate_config(
        tmp_path / "out", ["adapter_path=tiny/controlnet_canny", "condition=depth", "from_run=false"]
    )
    GlobalHydra.instance().clear()
    assert evaluation_units(cfg)[0][0].condition.name == "depth"
