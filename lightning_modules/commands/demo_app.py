"""The page of ``ctrlkit demo`` (Gradio): a source image and each extractor's map, up to ``max_units`` units
(adapter, condition, scale, start/end), GLIGEN boxes drawn on a canvas with their phrases, and a generate button
that shows the image, the grid and the files to download (the PNG and the composition YAML that ``ctrlkit
generate composition=<file>`` reruns). What each control does is in ``demo.py``; this file only lays it out.
"""

from __future__ import annotations

import json

import gradio as gr
import numpy as np

from lightning_modules.commands.demo import (
    DRAWN_BOXES,
    SOURCE_IS_MAP,
    Demo,
    UnitChoice,
    boxes_from_sketch,
    extractor_previews,
    map_conditions,
    parse_phrases,
    trained_condition,
)
from lightning_modules.errors import USER_ERRORS

# fields per unit, in the order the generate button passes them
UNIT_FIELDS = ("adapter", "condition", "scale", "start", "end")
# a unit's adapter choice that leaves the unit out
NO_ADAPTER = "none"


def build_app(demo: Demo) -> gr.Blocks:
    """The Blocks app; elements tests drive carry ``elem_id``s (source, unit<i>-adapter / -condition, sketch,
    boxes, phrases, generate, result, downloads, status). A unit whose adapter is "none" is left out."""
    adapters = demo.adapters()
    conditions = [*map_conditions(), SOURCE_IS_MAP, DRAWN_BOXES]
    with gr.Blocks(title="ctrlkit demo") as app:
        gr.Markdown(
            f"# ctrlkit demo\nBase model `{demo.cfg.model._target_}`, {demo.size[0]}x{demo.size[1]} px. Load a "
            "source image, pick an adapter per unit, draw boxes for a GLIGEN unit, generate."
        )
        with gr.Row():
            source = gr.Image(label="source image", type="filepath", elem_id="source", height=256)
            previews = gr.Gallery(label="extractor maps", elem_id="previews", columns=4, height=256)
        with gr.Row():
            prompt = gr.Textbox(label="prompt", value=str(demo.cfg.prompts[0]), elem_id="prompt", scale=3)
            negative = gr.Textbox(label="negative prompt", value=str(demo.cfg.negative_prompt), scale=2)
        with gr.Row():
            seed = gr.Number(label="seed", value=int(demo.cfg.seed), precision=0)
            steps = gr.Slider(1, 100, value=int(demo.cfg.num_inference_steps), step=1, label="steps")
            guidance = gr.Slider(1.0, 15.0, value=float(demo.cfg.guidance_scale), step=0.5, label="guidance scale")
        unit_inputs = []
        for index in range(int(demo.cfg.max_units)):
            with gr.Accordion(f"unit {index + 1}", open=index == 0):
                with gr.Row():
                    adapter = gr.Dropdown(
                        [NO_ADAPTER, *adapters],
                        value=NO_ADAPTER,
                        label="adapter",
                        elem_id=f"unit{index}-adapter",
                        scale=3,
                    )
                    condition = gr.Dropdown(conditions, label="condition", elem_id=f"unit{index}-condition")
                with gr.Row():
                    scale = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="scale")
                    start = gr.Slider(0.0, 1.0, value=0.0, step=0.05, label="start (fraction of steps)")
                    end = gr.Slider(0.0, 1.0, value=1.0, step=0.05, label="end")
            # choosing an adapter picks the condition it was trained on
            adapter.change(lambda name: trained_condition(name) if name != NO_ADAPTER else None, adapter, condition)
            unit_inputs += [adapter, condition, scale, start, end]
        with gr.Accordion("GLIGEN boxes: one stroke per object, one phrase each (separated by ';')", open=False):
            with gr.Row():
                sketch = gr.ImageEditor(
                    value=np.full((256, 256, 3), 255, np.uint8),  # a white canvas, the brush ready
                    label="draw boxes (the brush, one stroke per object)",
                    elem_id="sketch",
                    sources=(),
                    transforms=(),
                    canvas_size=(256, 256),
                    fixed_canvas=True,
                    height=300,
                )
                with gr.Column():
                    boxes = gr.Textbox(
                        label="boxes [x0, y0, x1, y1] in 0..1 (filled from the drawing)", elem_id="boxes"
                    )
                    phrases = gr.Textbox(label="phrases", placeholder="a red circle; a blue square", elem_id="phrases")
        generate = gr.Button("generate", variant="primary", elem_id="generate")
        with gr.Row():
            result = gr.Image(label="result", elem_id="result", type="filepath", height=256)
            grid = gr.Image(label="conditions | result", type="filepath", height=256)
        downloads = gr.File(label="image and composition.yaml", file_count="multiple", elem_id="downloads")
        status = gr.Markdown(elem_id="status")

        def preview(path):
            try:
                return extractor_previews(path, map_conditions(), demo.size) if path else []
            except USER_ERRORS as error:  # an unreadable image: say which, keep the page as it was
                raise gr.Error(str(error)) from error

        source.change(preview, source, previews)
        sketch.change(lambda value: json.dumps(boxes_from_sketch((value or {}).get("layers") or [])), sketch, boxes)

        # gr.Progress as a default is how Gradio asks for a progress bar (tqdm bars of the sampler are tracked)
        def run(prompt_text, negative_text, seed_value, steps_value, guidance_value, source_path, boxes_text,
                phrases_text, *unit_values, progress=gr.Progress(track_tqdm=True)):  # noqa: B008  # fmt: skip
            width = len(UNIT_FIELDS)
            rows = [dict(zip(UNIT_FIELDS, unit_values[i : i + width])) for i in range(0, len(unit_values), width)]
            units = [UnitChoice(**row) for row in rows if row["adapter"] and row["adapter"] != NO_ADAPTER]
            try:
                drawn = json.loads(boxes_text) if boxes_text and boxes_text.strip() else []
                paths = demo.generate(
                    prompt_text, negative_text, seed_value, units, source_path, drawn, parse_phrases(phrases_text),
                    num_inference_steps=steps_value, guidance_scale=guidance_value,
                )  # fmt: skip
            except json.JSONDecodeError as error:
                raise gr.Error(f"boxes: not a JSON list of [x0, y0, x1, y1] ({error})") from error
            except USER_ERRORS as error:
                raise gr.Error(str(error)) from error
            files = [str(paths["image"]), str(paths["composition"])]
            done = (
                f"{len(units)} unit(s); rerun with `ctrlkit generate composition={paths['composition']} "
                f"num_inference_steps={int(steps_value)} guidance_scale={float(guidance_value)}`"
            )
            return str(paths["image"]), str(paths["grid"]), files, done

        generate.click(
            run,
            [prompt, negative, seed, steps, guidance, source, boxes, phrases, *unit_inputs],
            [result, grid, downloads, status],
        )
    return app
