"""A decompression bomb: a small valid PNG whose header claims a huge size."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def write_bomb_png(path: Path, width: int = 100_000, height: int = 100_000) -> Path:
    """Write a 4x4 PNG, then rewrite its IHDR to claim ``width`` x ``height`` (CRC fixed, so the header is valid)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path)
    data = bytearray(path.read_bytes())
    # signature (8) + length (4) + b"IHDR" (4), then width and height, 4 bytes each, big-endian
    data[16:24] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF  # over the chunk type and its 13 data bytes
    data[29:33] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))
    return path
