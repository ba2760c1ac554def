"""Uploaded image files as a model's input: every conversion right and reported, every other
file refused with its real reason (advguard.data.images, used by the guard service)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from advguard.data import load_dataset
from advguard.data.images import decode_image
from advguard.errors import InputError, TooLargeError, UnsupportedFormatError


@pytest.fixture(scope="module")
def digit() -> np.ndarray:
    """A real MNIST digit, (28, 28) floats in [0, 1]."""
    return load_dataset("mnist", "test", limit=1).x[0, 0].numpy()


def png16(samples: np.ndarray) -> bytes:
    """A 16-bit PNG (grey, or RGB for (H, W, 3)) written chunk by chunk: Pillow cannot save
    16-bit colour, and the test must not trust the decoder it tests to write its input."""
    h, w = samples.shape[:2]
    channels = 1 if samples.ndim == 2 else samples.shape[2]
    rows = samples.reshape(h, w * channels).astype(">u2")
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 3: 2}[channels], 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def png8(samples: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(samples, "L" if samples.ndim == 2 else "RGB").save(out, "PNG")
    return out.getvalue()


def test_a_16_bit_grey_png_is_scaled_not_clipped(digit):
    grey = 0.25 + 0.5 * digit  # a mid-grey digit: clipping 16-bit samples to 255 makes it white
    x, notes = decode_image(png16(np.round(grey * 65535).astype(np.uint16)), channels=1,
                            size=(28, 28))
    x8, _ = decode_image(png8(np.round(grey * 255).astype(np.uint8)), channels=1, size=(28, 28))
    assert abs(x.mean() - x8.mean()) < 2e-3 and abs(x.mean() - grey.mean()) < 1e-4
    assert np.abs(x[0] - grey).max() < 1e-4  # full 16-bit precision
    assert notes == ["16-bit samples scaled by 1/65535"]
    # to a colour model, and resized: still scaled, every step reported
    x, notes = decode_image(png16(np.round(grey * 65535).astype(np.uint16)), channels=3,
                            size=(32, 32))
    assert x.shape == (3, 32, 32) and abs(x.mean() - grey.mean()) < 5e-3
    assert notes == ["16-bit samples scaled by 1/65535", "resized 28x28 → 32x32 (bilinear)",
                     "I;16 → RGB"]


def test_a_16_bit_rgb_png_keeps_its_brightness(digit):
    rgb = np.stack([0.25 + 0.5 * digit, 0.5 * digit, 0.2 + 0.0 * digit], axis=2)
    x, notes = decode_image(png16(np.round(rgb * 65535).astype(np.uint16)), channels=3,
                            size=(28, 28))
    x8, _ = decode_image(png8(np.round(rgb * 255).astype(np.uint8)), channels=3, size=(28, 28))
    assert abs(x.mean() - x8.mean()) < 2e-3
    assert np.abs(x - rgb.transpose(2, 0, 1)).max() < 1 / 255 + 1e-6
    assert notes == ["16 → 8 bits per channel"]
    x, notes = decode_image(png16(np.round(rgb * 65535).astype(np.uint16)), channels=1,
                            size=(28, 28))
    assert notes == ["16 → 8 bits per channel", "RGB → L"]


@pytest.mark.parametrize("orientation, turn, what", [
    (3, lambda a: a[::-1, ::-1], "rotated 180°"),
    (6, lambda a: np.rot90(a, -1), "rotated 90° clockwise"),
    (8, lambda a: np.rot90(a, 1), "rotated 90° counter-clockwise"),
    (2, lambda a: a[:, ::-1], "mirrored"),
])
def test_the_exif_orientation_is_applied_and_reported(orientation, turn, what):
    """A camera's sideways photo: its pixels as stored, and the EXIF tag saying how to turn
    them. Decoded, it equals the turned pixels (a PNG's eXIf chunk, lossless)."""
    rng = np.random.default_rng(orientation)
    stored = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    Image.fromarray(stored, "L").save(out, "PNG", exif=exif.tobytes())
    x, notes = decode_image(out.getvalue(), channels=1, size=(28, 28))
    assert np.array_equal(np.round(x[0] * 255).astype(np.uint8), turn(stored))
    assert notes == [f"EXIF orientation {orientation} applied ({what})"]


def test_a_jpeg_with_orientation_6_comes_upright():
    wide = np.zeros((20, 40), dtype=np.uint8)
    wide[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    Image.fromarray(wide, "L").save(out, "JPEG", exif=exif.tobytes(), quality=95)
    x, notes = decode_image(out.getvalue(), channels=1, size=(40, 20))
    assert x.shape == (1, 40, 20) and notes[0] == "EXIF orientation 6 applied (rotated 90° " \
        "clockwise)"
    assert x[0, :18].mean() > 0.9 and x[0, 22:].mean() < 0.1  # the white half is on top now


FILES = [  # (id, file bytes, error class, part of the message)
    ("gif", "GIF", UnsupportedFormatError, "GIF images are not accepted"),
    ("tiff", "TIFF", UnsupportedFormatError, "TIFF images are not accepted"),
    ("webp", "WEBP", UnsupportedFormatError, "WebP images are not accepted"),
    ("bmp", "BMP", UnsupportedFormatError, "BMP images are not accepted"),
    ("apng", "APNG", InputError, "animated PNG of 3 frames"),
    ("too-large", "HUGE", TooLargeError, "5000x5000 = 25000000 pixels"),
    ("not-an-image", "TEXT", InputError, "not a PNG or JPEG image"),
]


def _file(kind: str) -> bytes:
    out = io.BytesIO()
    if kind == "APNG":
        frames = [Image.new("L", (28, 28), v) for v in (0, 128, 255)]
        frames[0].save(out, "PNG", save_all=True, append_images=frames[1:])
    elif kind == "HUGE":
        Image.new("L", (5000, 5000)).save(out, "PNG")
    elif kind == "TEXT":
        return b"just some text, no image"
    else:
        Image.new("L", (28, 28), 128).save(out, kind)
    return out.getvalue()


@pytest.mark.parametrize("kind, error, needle", [f[1:] for f in FILES], ids=[f[0] for f in FILES])
def test_other_files_are_refused_with_their_real_reason(kind, error, needle):
    with pytest.raises(error) as caught:
        decode_image(_file(kind), channels=1, size=(28, 28))
    assert needle in str(caught.value) and "truncated or corrupt" not in str(caught.value)
    assert type(caught.value) is error
