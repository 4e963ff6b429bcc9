"""Tiny image files for tests, with the standard library only."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path


def png_bytes(width: int, height: int, rgba=(128, 128, 128, 255)) -> bytes:
    """An RGBA PNG of one colour."""
    row = b"\x00" + bytes(rgba) * width
    raw = row * height

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def write_png(path, width: int = 64, height: int = 64, rgba=(128, 128, 128, 255)) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(width, height, rgba))
    return path


def png_size(path) -> tuple[int, int]:
    """(width, height) from a PNG header."""
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG")
    return struct.unpack(">II", head[16:24])


def two_colour_disc_png(path, size: int = 64) -> Path:
    """A two-coloured disc (orange left, blue right) on a transparent ground: an object whose texture is not one
    colour, for image-to-3D runs (numpy and Pillow)."""
    import numpy as np
    from PIL import Image

    yy, xx = np.mgrid[:size, :size]
    inside = (xx - size / 2) ** 2 + (yy - size / 2) ** 2 < (0.3 * size) ** 2
    rgba = np.zeros((size, size, 4), np.uint8)
    rgba[inside] = (230, 120, 40, 255)
    rgba[inside & (xx > size / 2)] = (40, 90, 220, 255)
    Image.fromarray(rgba, "RGBA").save(path)
    return Path(path)
