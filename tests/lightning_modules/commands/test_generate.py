"""``ctrlkit generate``: composition from the command line, outputs, parity with diffusers, clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import StableDiffusionControlNetPipeline
from omegaconf import open_dict
from PIL import Image

from adapters import ControlNetAdapter, make_scheduler
from adapters.controlnet_formats import save_controlnet_single_file
from conditions.shapes import render_scene
from lightning_modules.backbone import load_tiny_backbone
from lightning_modules.commands.generate import run_generate
from lightning_modules.errors import CtrlkitError
from tests.adapters.test_adapters import randomize_zero_convs
from tests.conftest import compose_config
from tests.helpers.cli import run_cli, the_error_line

PROMPTS = ["a red circle on a blue background", "a green square on a white background"]


def compose_generate(output_dir, *overrides):
    cfg = compose_config("generate", output_dir, list(overrides))
    with open_dict(cfg):
        cfg.output_dir = str(output_dir)
    return cfg


@pytest.fixture(scope="module")
def saved_controlnet(tmp_path_factory):
    """A ControlNet for the shipped tiny model with non-zero zero-convs, as a diffusers folder and a single file."""
    folder = tmp_path_factory.mktemp("controlnet")
    adapter = ControlNetAdapter.from_unet(load_tiny_backbone().unet, vae_scale_factor=4)
    randomize_zero_convs(adapter)
    adapter.save_pretrained(folder / "adapter")
    save_controlnet_single_file(adapter.controlnet, folder / "control_tiny.safetensors")
    scene = render_scene(np.random.default_rng(3), 64)
    Image.fromarray(scene.image).save(folder / "scene.png")
    edges = (np.random.default_rng(0).random((64, 64)) > 0.9).astype(np.uint8) * 255
    Image.fromarray(np.stack([edges] * 3, axis=-1)).save(folder / "edges.png")
    return folder


def test_generate_equals_diffusers_controlnet_pipeline(tmp_path, saved_controlnet):
    unit = (
        f"{{adapter: {saved_controlnet / 'adapter'}, condition_image: {saved_controlnet / 'edges.png'}, scale: 0.8}}"
    )
    cfg = compose_generate(
        tmp_path, f"prompts=[{PROMPTS[0]},{PROMPTS[1]}]", f"units=[{unit}]", "num_inference_steps=8"
    )
    paths = run_generate(cfg)
    ours = np.stack([np.asarray(Image.open(path)) for path in paths]).astype(np.float32) / 255

    backbone = load_tiny_backbone()
    adapter = ControlNetAdapter.from_pretrained(saved_controlnet / "adapter")
    pipeline = StableDiffusionControlNetPipeline(**backbone.to_pipeline().components, controlnet=adapter.controlnet)
    pipeline.scheduler = make_scheduler("unipc", backbone.noise_scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    edges = torch.from_numpy(np.asarray(Image.open(saved_controlnet / "edges.png"))).permute(2, 0, 1)[None] / 255.0
    theirs = pipeline(
        PROMPTS,
        image=edges.expand(2, -1, -1, -1),
        height=64,
        width=64,
        num_inference_steps=8,
        guidance_scale=7.5,
        controlnet_conditioning_scale=0.8,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    # both through 8-bit PNG rounding: at most one level apart where a float sits on a rounding boundary
    assert np.abs(ours - np.round(theirs * 255) / 255).max() <= 1 / 255 + 1e-6
    assert (tmp_path / "grid.png").is_file()
    used = yaml.safe_load((tmp_path / "composition.yaml").read_text())
    assert used["prompts"] == PROMPTS and used["units"][0]["scale"] == 0.8


def test_composition_file_and_extractor_on_a_source_image(tmp_path, saved_controlnet):
    composition = tmp_path / "composition.yaml"
    composition.write_text(
        yaml.safe_dump(
            {
                "units": [
                    {
                        "adapter": str(saved_controlnet / "control_tiny.safetensors"),
                        "source_image": str(saved_controlnet / "scene.png"),
                        "extractor": "canny",
                        "end": 0.5,
                        "mode": "control",
                    }
                ]
            }
        )
    )
    cfg = compose_generate(tmp_path / "out", f"composition={composition}", "num_inference_steps=4")
    paths = run_generate(cfg)
    assert [np.asarray(Image.open(path)).shape for path in paths] == [(64, 64, 3)]
    grid = np.asarray(Image.open(tmp_path / "out" / "grid.png"))
    assert grid.shape == (64, 128, 3)  # canny map | result
    assert set(np.unique(grid[:, :64])) <= {0, 255} and grid[:, :64].max() == 255  # edges of the scene


def test_a_composition_files_relative_paths_and_an_extractor_with_local_weights(
    tmp_path, saved_controlnet, dpt_dir, monkeypatch
):
    """Paths relative to the file's folder work from another directory; ``extractor: {name: depth, model: ...}``
    gives the depth extractor its local weights, and its map is the unit's condition."""
    import shutil

    from conditions import read_image
    from lightning_modules.commands.generate import build_extractor

    beside = tmp_path / "composition"
    (beside / "images").mkdir(parents=True)
    shutil.copy(saved_controlnet / "scene.png", beside / "images" / "scene.png")
    depth = {"name": "depth", "model": str(dpt_dir)}
    unit = {"adapter": str(saved_controlnet / "adapter"), "source_image": "images/scene.png", "extractor": depth}
    (beside / "composition.yaml").write_text(yaml.safe_dump({"units": [unit]}))
    monkeypatch.chdir(tmp_path)  # images/scene.png is not here, but beside the file
    cfg = compose_generate(tmp_path / "out", "composition=composition/composition.yaml", "num_inference_steps=2")
    run_generate(cfg)
    grid = np.asarray(Image.open(tmp_path / "out" / "grid.png"))
    expected = build_extractor(depth, (64, 64)).process(read_image(str(beside / "images" / "scene.png")))
    assert np.array_equal(grid[:, :64], expected)  # the depth model's map is the condition drawn in the grid
    (used,) = yaml.safe_load((tmp_path / "out" / "composition.yaml").read_text())["units"]
    assert used["source_image"] == str(beside / "images" / "scene.png") and used["extractor"] == depth
    canny = build_extractor({"name": "canny", "low_threshold": 50}, (64, 64))
    assert (canny.low_threshold, canny.high_threshold) == (50, 200)


def test_a_written_composition_reruns_with_its_prompts_and_seed_unless_the_command_line_sets_them(
    tmp_path, saved_controlnet
):
    unit = f"{{adapter: {saved_controlnet / 'adapter'}, condition_image: {saved_controlnet / 'edges.png'}}}"
    first = compose_generate(tmp_path / "first", f"prompts=[{PROMPTS[1]}]", "seed=5", f"units=[{unit}]")
    with open_dict(first):
        first.num_inference_steps = 4
    (image,) = run_generate(first)
    written = tmp_path / "first" / "composition.yaml"
    rerun = compose_generate(tmp_path / "rerun", f"composition={written}")
    with open_dict(rerun):
        rerun.num_inference_steps = 4
    (again,) = run_generate(rerun)
    assert (rerun.prompts, rerun.seed) == ([PROMPTS[1]], 5)
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(image)))
    # the command line wins over the file
    other = compose_generate(tmp_path / "other", f"composition={written}", "seed=6", f"prompts=[{PROMPTS[0]}]")
    with open_dict(other):
        other.num_inference_steps = 4
    run_generate(other)
    assert (list(other.prompts), other.seed) == ([PROMPTS[0]], 6)
    assert yaml.safe_load((tmp_path / "other" / "composition.yaml").read_text())["seed"] == 6


@pytest.mark.parametrize(
    ("unit", "message"),
    [
        ("{adapter: /nowhere/adapter}", r"unit 0: adapter /nowhere/adapter not found"),
        ("{adapter: ADAPTER}", r"give condition_image=<map>, or source_image=<photo> and extractor=<name>"),
        ("{adapter: ADAPTER, strength: 2}", r"unit 0: unknown field\(s\) \['strength'\]"),
        (
            "{adapter: ADAPTER, source_image: EDGES, extractor: sobel}",
            r"unit 0: unknown extractor 'sobel'; choose one of",
        ),
        (
            "{adapter: ADAPTER, source_image: EDGES, extractor: depth}",
            r"unit 0: extractor depth needs model \(local files\); write extractor: \{name: depth, model: <path>\}",
        ),
        (
            "{adapter: ADAPTER, source_image: EDGES, extractor: {name: canny, low: 5}}",
            r"unit 0: unknown key 'extractor canny.low'; extractor canny takes: .*low_threshold",
        ),
        (
            "{adapter: ADAPTER, source_image: EDGES, extractor: {model: x}}",
            r"unit 0: extractor=\{'model': 'x'\}; allowed: a conf/condition name, or \{name: <it>",
        ),
    ],
)
def test_bad_units_are_named(tmp_path, saved_controlnet, unit, message):
    unit = unit.replace("ADAPTER", str(saved_controlnet / "adapter")).replace(
        "EDGES", str(saved_controlnet / "edges.png")
    )
    cfg = compose_generate(tmp_path, f"units=[{unit}]", "num_inference_steps=1")
    with pytest.raises((CtrlkitError, ValueError), match=message):
        run_generate(cfg)


def test_cli_prints_the_paths_and_a_one_line_error(tmp_path, saved_controlnet, capsys):
    unit = f"{{adapter: {saved_controlnet / 'adapter'}, condition_image: {saved_controlnet / 'edges.png'}}}"
    command = [sys.executable, "-m", "lightning_modules.commands.cli", "generate", f"units=[{unit}]"]
    command.append("num_inference_steps=2")
    done = subprocess.run([*command, f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"wrote {tmp_path / 'run' / 'image_000.png'}" in done.stdout
    # the error in this process (the real command's one-line errors: tests/lightning_modules/commands/test_cli.py)
    refused = run_cli(capsys, ["generate", "units=[{adapter: /nowhere}]", f"hydra.run.dir={tmp_path / 'bad'}"])
    line = the_error_line("generate", *refused)
    assert line.startswith("ctrlkit generate: error: unit 0: adapter /nowhere not found")


@pytest.fixture(scope="module")
def t2i_and_gligen(tmp_path_factory):
    """A T2I-Adapter and a GLIGEN adapter for the shipped tiny model, with weights that make them matter."""
    from adapters.gligen import GligenAdapter
    from adapters.t2i_adapter import T2IAdapterAdapter

    folder = tmp_path_factory.mktemp("adapters")
    generator = torch.Generator().manual_seed(5)
    t2i = T2IAdapterAdapter.from_unet(load_tiny_backbone().unet, vae_scale_factor=4)
    with torch.no_grad():
        for parameter in t2i.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    t2i.save_pretrained(folder / "t2i")
    gligen = GligenAdapter.from_unet(load_tiny_backbone().unet, export_unet=False)
    with torch.no_grad():
        for fuser in gligen.fusers:  # open the gates, as training would
            fuser.alpha_attn.fill_(1.0)
            fuser.alpha_dense.fill_(1.0)
    gligen.save_pretrained(folder / "gligen")
    return folder


def test_controlnet_t2i_and_gligen_compose_and_each_unit_matters(tmp_path, saved_controlnet, t2i_and_gligen):
    edges = saved_controlnet / "edges.png"
    units = {
        "controlnet": f"{{adapter: {saved_controlnet / 'adapter'}, condition_image: {edges}}}",
        "t2i": f"{{adapter: {t2i_and_gligen / 't2i'}, condition_image: {edges}, scale: 0.8}}",
        "gligen": f"{{adapter: {t2i_and_gligen / 'gligen'}, boxes: [[0.1, 0.1, 0.6, 0.6]], phrases: [red circle]}}",
    }

    def generate(names: list[str], tag: str) -> np.ndarray:
        cfg = compose_generate(tmp_path / tag, f"units=[{','.join(units[n] for n in names)}]", "num_inference_steps=4")
        return np.asarray(Image.open(run_generate(cfg)[0])).astype(int)

    everything = generate(["controlnet", "t2i", "gligen"], "all")
    grid = np.asarray(Image.open(tmp_path / "all" / "grid.png"))
    assert grid.shape == (64, 4 * 64, 3)  # canny | canny | boxes | result
    for left_out in units:
        rest = [name for name in units if name != left_out]
        assert np.abs(generate(rest, f"without_{left_out}") - everything).max() > 0, left_out


def test_unit_from_spec_defaults_and_one_line_errors(tiny_backbone):
    from adapters.gligen import GligenAdapter
    from lightning_modules.commands.unit_checks import unit_from_spec

    gligen = GligenAdapter.from_unet(tiny_backbone.unet)
    unit = unit_from_spec({}, gligen, {}, (64, 64), "boxes")
    # GLIGEN's scheduled sampling is its default window, null grounding on guidance's unconditional half its mode
    assert (unit.scale, unit.start, unit.end, unit.mode) == (1.0, 0.0, gligen.scheduled_sampling_beta, "control")
    assert unit_from_spec({"end": 0.5}, gligen, {}, (64, 64), "boxes").end == 0.5
    with pytest.raises(CtrlkitError, match=r"unit 'boxes': a grounding unit \(GLIGEN\) takes no scale=0.5"):
        unit_from_spec({"scale": 0.5}, gligen, {}, (64, 64), "boxes")
    with pytest.raises(CtrlkitError, match=r"unit 'boxes': need 0 <= start < end <= 1"):
        unit_from_spec({"start": 0.6, "end": 0.5}, gligen, {}, (64, 64), "boxes")


def test_parts_of_a_multi_condition_unit_are_checked_in_one_line(tmp_path):
    """``parts`` names map files for a multi-condition adapter's parts: bad values, unknown parts and an adapter
    without parts are one-line errors naming the unit."""
    from hydra.core.global_hydra import GlobalHydra

    edges = Path(__file__).resolve().parents[3] / "examples" / "images" / "multi_canny.png"
    cases = [
        (
            "tiny/controlnet_multi",
            f"{{edges: {edges}}}",
            r"unknown part\(s\) \['edges'\]; this multi condition has: canny",
        ),
        ("tiny/controlnet_multi", "{canny: absent.png}", r"parts=\{'canny': 'absent.png'\}; allowed: \{<part name>"),
        ("tiny/controlnet_canny", f"{{canny: {edges}}}", r"parts= is for a multi-condition adapter"),
    ]
    plain = f"units=[{{adapter: tiny/controlnet_multi, condition_image: {edges}}}]"
    cfg = compose_config("generate", tmp_path / "plain", [plain, "prompts=[a]"])
    with pytest.raises(
        CtrlkitError, match=r"a multi-condition adapter takes parts=\{<part>: <map image>, ...\}, any of: canny"
    ):
        run_generate(cfg)
    GlobalHydra.instance().clear()
    for index, (adapter, parts, message) in enumerate(cases):
        cfg = compose_config(
            "generate", tmp_path / str(index), [f"units=[{{adapter: {adapter}, parts: {parts}}}]", "prompts=[a]"]
        )
        with pytest.raises(CtrlkitError, match=message):
            run_generate(cfg)
        GlobalHydra.instance().clear()
