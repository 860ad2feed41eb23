"""Boxes drawn on grids (``conditions.boxes.draw_boxes``: the training grid, ``evaluate`` and ``generate``)."""

from __future__ import annotations

import torch

from conditions.boxes import BOX_COLOUR, draw_boxes


def test_draw_boxes_outlines_present_slots_in_box_colour():
    images = torch.full((2, 3, 16, 32), 64 / 255)  # a uint8 level: drawing rounds images to uint8
    boxes = torch.tensor([[[0.25, 0.25, 0.75, 0.75], [0.0, 0.0, 1.0, 1.0]]]).expand(2, -1, -1)
    masks = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # image 0: the first box only; image 1: none
    drawn = draw_boxes(images, boxes, masks)
    assert drawn.shape == images.shape and drawn.dtype == torch.float32
    colour = torch.tensor(BOX_COLOUR, dtype=torch.float32)[:, None] / 255
    # outline: pixels 8..23 across, 4..11 down
    for row, column in [(4, 8), (4, 23), (11, 8), (11, 23), (4, 15), (7, 8)]:
        assert torch.equal(drawn[0, :, row, column : column + 1], colour), (row, column)
    assert torch.equal(drawn[0, :, 7, 9:23], images[0, :, 7, 9:23])  # inside untouched
    assert torch.equal(drawn[0, :, 3, :], images[0, :, 3, :]) and torch.equal(drawn[0, :, 0, :], images[0, :, 0, :])
    assert torch.equal(drawn[1], images[1])  # masked slots are not drawn
