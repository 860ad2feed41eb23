"""``ctrlkit extract``: maps for a folder, unreadable files named, resumable, never writing into the input."""

from __future__ import annotations

import json
import os

import cv2
import numpy as np
import pytest
from PIL import Image

from conditions import CannyExtractor, read_image
from conditions.folder import MANIFEST, ExtractionError, condition_paths, extract_folder, find_images
from lightning_modules.errors import CtrlkitError
from tests.conditions.test_conditions import photographs
from tests.lightning_modules.commands.test_cli import run_ctrlkit


def make_folder(root, count: int = 10):
    """``count`` readable photos crops (jpg/png/webp, nested) plus two corrupt files."""
    photos = list(photographs().values())
    for index in range(count):
        photo = photos[index % len(photos)][index : index + 64, index : index + 80]
        folder = root / f"part{index % 2}" / ("deeper" if index % 3 == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo).save(folder / f"img{index:02d}.{['png', 'jpg', 'webp'][index % 3]}")
    (root / "part0" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (root / "part1" / "empty.png").write_bytes(b"")
    (root / "notes.txt").write_text("not an image")
    return root


def test_extract_writes_maps_manifest_and_names_unreadable_files(tmp_path):
    source = make_folder(tmp_path / "in")
    before = {p: p.stat().st_mtime_ns for p in source.rglob("*")}
    report = extract_folder(CannyExtractor(), source, tmp_path / "out", num_workers=2, chunk_size=3, progress=False)
    assert report.written == 10 and report.skipped == 0
    assert sorted(name for name, _ in report.failed) == ["part0/broken.jpg", "part1/empty.png"]
    entries = [json.loads(line) for line in (tmp_path / "out" / MANIFEST).read_text().splitlines()]
    assert len(entries) == 10 and all(e["extractor"]["name"] == "canny" for e in entries)
    for entry in entries:
        written = cv2.imread(str(tmp_path / "out" / entry["condition"]))[:, :, ::-1]
        np.testing.assert_array_equal(written, CannyExtractor().process(read_image(source / entry["source"])))
    assert {p: p.stat().st_mtime_ns for p in source.rglob("*")} == before  # the input folder is untouched


def test_rerun_after_interruption_redoes_only_unfinished_images(tmp_path):
    source = make_folder(tmp_path / "in")
    output = tmp_path / "out"
    extract_folder(CannyExtractor(), source, output, num_workers=0, progress=False)
    manifest = output / MANIFEST
    lines = manifest.read_text().splitlines()
    # as if killed: the last 4 entries never written, the one before them cut mid-line
    manifest.write_text("\n".join(lines[:5]) + "\n" + lines[5][:20])
    finished = {json.loads(line)["condition"] for line in lines[:5]}
    for entry in finished:
        os.utime(output / entry, (1, 1))  # mark the finished maps: a rewrite would change their time
    report = extract_folder(CannyExtractor(), source, output, num_workers=2, progress=False)
    assert (report.written, report.skipped, len(report.failed)) == (5, 5, 2)
    assert all(os.stat(output / entry).st_mtime == 1 for entry in finished)
    assert len(manifest.read_text().splitlines()) == 10


def test_other_settings_and_output_inside_input_are_refused(tmp_path):
    source = make_folder(tmp_path / "in", count=2)
    extract_folder(CannyExtractor(), source, tmp_path / "out", num_workers=0, progress=False)
    with pytest.raises(ExtractionError, match="holds maps made with other settings"):
        extract_folder(CannyExtractor(50, 100), source, tmp_path / "out", num_workers=0, progress=False)
    with pytest.raises(ExtractionError, match="is inside the input folder"):
        extract_folder(CannyExtractor(), source, source / "maps", num_workers=0, progress=False)
    with pytest.raises(ExtractionError, match="is inside the output folder"):
        extract_folder(CannyExtractor(), source, tmp_path, num_workers=0, progress=False)
    with pytest.raises(ExtractionError, match="input folder not found"):
        extract_folder(CannyExtractor(), tmp_path / "nope", tmp_path / "out2", num_workers=0, progress=False)
    from conditions.multi import MultiConditionExtractor

    stacked = MultiConditionExtractor({"canny": CannyExtractor(channels=1), "soft": CannyExtractor(50, 100, 3)})
    with pytest.raises(ExtractionError, match="makes 6-channel maps, which no image file holds"):
        extract_folder(stacked, source, tmp_path / "out3", num_workers=0, progress=False)


def test_same_stem_with_two_suffixes_keeps_both(tmp_path):
    from pathlib import Path

    paths = condition_paths([Path("a/b.jpg"), Path("a/b.png"), Path("c.webp")])
    assert paths == {
        Path("a/b.jpg"): Path("a/b.jpg.png"),
        Path("a/b.png"): Path("a/b.png.png"),
        Path("c.webp"): Path("c.png"),
    }
    (tmp_path / "x.JPG").write_bytes(b"")
    assert find_images(tmp_path) == [Path("x.JPG")]


def test_cli_extract(tmp_path):
    make_folder(tmp_path / "in", count=4)
    result = run_ctrlkit(
        "extract",
        "condition=canny",
        f"input={tmp_path / 'in'}",
        f"output={tmp_path / 'out'}",
        "num_workers=0",  # the pool is tested in-process above; starting one costs seconds here
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "4 maps written, 0 already done, 2 unreadable" in result.stderr
    assert "unreadable: part0/broken.jpg" in result.stderr and "unreadable: part1/empty.png" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]  # no Hydra folders or logs anywhere else


def test_extract_config_requires_paths(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lightning_modules.commands.config_checks import CONF_DIR
    from lightning_modules.commands.extract import run_extract

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        missing_input = compose(config_name="extract", overrides=["output=x"])
        hed = compose(config_name="extract", overrides=["condition=hed", f"input={tmp_path}", "output=x"])
        mask = compose(config_name="extract", overrides=["condition=shapes_mask", f"input={tmp_path}", "output=x"])
    GlobalHydra.instance().clear()
    with pytest.raises(CtrlkitError, match=r"condition=shapes_mask reads the truth of generated shapes scenes, not"):
        run_extract(mask)
    with pytest.raises(CtrlkitError, match=r"input is required: ctrlkit extract condition=<name> input=<dir>"):
        run_extract(missing_input)
    with pytest.raises(CtrlkitError, match=r"condition.extractor.weights_dir is required with condition=hed"):
        run_extract(hed)
