"""detected_boxes: grounding records from tiny random OWL-ViT / OWLv2 detectors saved as transformers folders and
loaded through the real loading path; the ``ctrlkit extract`` JSON output."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conditions import DetectedBoxes, DetectedBoxesExtractor, GroundingRecord, WeightsNotFoundError, read_grounding
from conditions.folder import GROUNDING_INDEX, MANIFEST, extract_folder
from tests.conditions.test_conditions import photographs
from tests.lightning_modules.commands.test_extract import make_folder

PHRASES = ["a cat", "a coffee cup", "an astronaut"]


@pytest.fixture(params=["owlvit", "owlv2"])
def detector_dir(request):
    return request.getfixturevalue(f"{request.param}_dir")


def test_records_on_a_photograph(detector_dir):
    photo = photographs()["coffee"]  # 384x576: not square, so OWLv2's padded frame matters
    extractor = DetectedBoxesExtractor(detector_dir, PHRASES, threshold=0.0, max_boxes=5)
    record = extractor(photo)
    assert isinstance(record, DetectedBoxes) and isinstance(record, GroundingRecord)
    assert record.boxes.shape == (len(record.phrases), 4) and record.boxes.dtype == np.float32
    assert 1 <= len(record.phrases) <= 5 and set(record.phrases) <= set(PHRASES)
    x0, y0, x1, y1 = record.boxes.T
    assert ((0 <= x0) & (x0 < x1) & (x1 <= 1) & (0 <= y0) & (y0 < y1) & (y1 <= 1)).all()
    assert ((0 <= record.scores) & (record.scores <= 1)).all() and (np.diff(record.scores) <= 0).all()
    # deterministic, also through a second load of the folder
    again = DetectedBoxesExtractor(detector_dir, PHRASES, threshold=0.0, max_boxes=5)(photo)
    np.testing.assert_array_equal(again.boxes, record.boxes)
    assert again.phrases == record.phrases and np.array_equal(again.scores, record.scores)
    strict = DetectedBoxesExtractor(detector_dir, PHRASES, threshold=float(record.scores[0]) + 1e-6)(photo)
    assert strict.phrases == [] and strict.boxes.shape == (0, 4)
    # without suppression, a threshold only filters: the records above it, in the same order
    every = DetectedBoxesExtractor(detector_dir, PHRASES, threshold=0.0, nms_iou=1.0, max_boxes=100)(photo)
    middle = float(np.median(every.scores))
    above = DetectedBoxesExtractor(detector_dir, PHRASES, threshold=middle, nms_iou=1.0, max_boxes=100)(photo)
    assert 0 < len(above.phrases) < len(every.phrases) and len(set(every.phrases)) > 1
    np.testing.assert_array_equal(above.boxes, every.boxes[every.scores >= middle])
    assert len(every.phrases) > len(extractor(photo).phrases)  # suppression and max_boxes removed some
    assert json.loads(json.dumps(record.to_json()))["phrases"] == record.phrases


def test_batch_of_different_sizes_equals_single_images(detector_dir):
    photos = [photographs()["coffee"][:200, :300], photographs()["astronaut"][:256, :128]]
    extractor = DetectedBoxesExtractor(detector_dir, PHRASES, threshold=0.0, nms_iou=0.5)
    batch = extractor(torch.stack([torch.from_numpy(p[:128, :128]).permute(2, 0, 1) for p in photos]))
    assert len(batch) == 2 and all(isinstance(r, DetectedBoxes) for r in batch)
    for record, photo in zip(extractor.process_batch(photos), photos):
        single = extractor(photo)
        assert record.phrases == single.phrases
        np.testing.assert_allclose(record.boxes, single.boxes, atol=1e-5)


def test_boxes_equal_transformers_post_processing(detector_dir):
    """Without suppression or a cap, the records are transformers' own post-processed boxes (OWLv2: scaled by the
    padded square's side, as its docs say), divided by the image size and clipped."""
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    photo = photographs()["coffee"]
    height, width = photo.shape[:2]
    extractor = DetectedBoxesExtractor(detector_dir, PHRASES, threshold=0.0, nms_iou=1.0, max_boxes=10_000)
    record = extractor(photo)
    processor = AutoProcessor.from_pretrained(detector_dir)
    model = AutoModelForZeroShotObjectDetection.from_pretrained(detector_dir).eval()
    with torch.no_grad():
        outputs = model(**processor(text=[PHRASES], images=[photo], return_tensors="pt"))
    side = max(height, width)
    frame = (side, side) if "owlv2" in str(detector_dir) else (height, width)
    (expected,) = processor.post_process_grounded_object_detection(outputs, threshold=-1.0, target_sizes=[frame])
    boxes = (expected["boxes"] / torch.tensor([width, height, width, height])).clamp(0, 1).numpy()
    kept = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    phrases = [PHRASES[i] for i in expected["labels"][kept].tolist()]
    order = np.lexsort(boxes[kept].T)
    ours = np.lexsort(record.boxes.T)
    assert len(record.phrases) == int(kept.sum()) > 0
    np.testing.assert_allclose(record.boxes[ours], boxes[kept][order], atol=1e-6)
    assert [record.phrases[i] for i in ours] == [phrases[i] for i in order]
    np.testing.assert_allclose(record.scores[ours], expected["scores"][kept].numpy()[order], atol=1e-6)


def test_missing_folder_and_bad_settings_are_named(tmp_path, owlvit_dir):
    with pytest.raises(WeightsNotFoundError, match=r"model folder not found: /no/such/owl; put a transformers OWL"):
        DetectedBoxesExtractor("/no/such/owl", PHRASES)
    (tmp_path / "config.json").write_text((owlvit_dir / "config.json").read_text())
    with pytest.raises(WeightsNotFoundError, match=rf"model folder {tmp_path} has no preprocessor_config.json or"):
        DetectedBoxesExtractor(tmp_path, PHRASES)
    with pytest.raises(ValueError, match="at least one non-empty phrase"):
        DetectedBoxesExtractor(owlvit_dir, [])
    with pytest.raises(ValueError, match="threshold and nms_iou must lie in"):
        DetectedBoxesExtractor(owlvit_dir, PHRASES, threshold=2)


def test_extract_writes_grounding_records(tmp_path, owlvit_dir):
    source = make_folder(tmp_path / "in", count=4)
    extractor = DetectedBoxesExtractor(owlvit_dir, PHRASES, threshold=0.0, max_boxes=3)
    output = tmp_path / "out"
    report = extract_folder(extractor, source, output, num_workers=0, progress=False)
    assert (report.written, len(report.failed)) == (4, 2)
    entries = [json.loads(line) for line in (output / MANIFEST).read_text().splitlines()]
    assert all(e["condition"].endswith(".json") and e["extractor"]["phrases"] == PHRASES for e in entries)
    records = read_grounding(output / GROUNDING_INDEX)  # the JSON-lines layout annotation files use
    assert sorted(records) == sorted(e["source"] for e in entries)
    from conditions import read_image

    for entry in entries:
        written = json.loads((output / entry["condition"]).read_text())
        expected = extractor(read_image(source / entry["source"]))
        assert written["file_name"] == entry["source"] and written["phrases"] == expected.phrases
        np.testing.assert_allclose(records[entry["source"]].boxes, expected.boxes, atol=1e-6)
    rerun = extract_folder(extractor, source, output, num_workers=0, progress=False)
    assert (rerun.written, rerun.skipped) == (0, 4)


def test_extract_config_composes_and_requires_phrases(tmp_path, owlvit_dir):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lightning_modules.commands.config_checks import CONF_DIR
    from lightning_modules.commands.extract import run_extract
    from lightning_modules.errors import CtrlkitError

    source = make_folder(tmp_path / "in", count=2)
    common = ["condition=detected_boxes", f"input={source}", f"output={tmp_path / 'out'}", "num_workers=0"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        no_phrases = compose(config_name="extract", overrides=[*common, f"condition.extractor.model={owlvit_dir}"])
        full = compose(
            config_name="extract",
            overrides=[
                *common,
                f"condition.extractor.model={owlvit_dir}",
                "condition.extractor.phrases=[a cat,a dog]",
                "progress=false",
            ],
        )
    GlobalHydra.instance().clear()
    with pytest.raises(CtrlkitError, match=r"condition.extractor.phrases is required with condition=detected_boxes"):
        run_extract(no_phrases)
    report = run_extract(full)
    assert report.written == 2 and len(read_grounding(tmp_path / "out" / GROUNDING_INDEX)) == 2


def test_detect_asks_for_given_phrases_instead_of_the_configured_ones(owlvit_dir):
    photo = photographs()["coffee"]
    asked = DetectedBoxesExtractor(owlvit_dir, ["a cup"], threshold=0.0).detect([photo], phrases=PHRASES)[0]
    configured = DetectedBoxesExtractor(owlvit_dir, PHRASES, threshold=0.0).detect([photo])[0]
    np.testing.assert_array_equal(asked.boxes, configured.boxes)
    assert asked.phrases == configured.phrases and set(asked.phrases) <= set(PHRASES)
