"""A user's images, as files or arrays, turned into a model's input — or refused with a reason.

Everything a person hands advguard for classification passes through here (``advguard predict``
reads ``.npy`` files with :func:`read_npy`): the dtype, byte order, shape and range are checked
once, and nothing is read that could execute code (no pickles).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch

from advguard.data.checks import check_pixels
from advguard.errors import InputError, TooLargeError, UnsupportedFormatError

NPY_MAGIC = b"\x93NUMPY"
MAX_IMAGES = 100_000  # an array claiming more images than this is refused before it is read


def read_npy(path: str | Path) -> np.ndarray:
    """The array stored in a ``.npy`` file (no pickled objects); an :class:`InputError` says
    what the file is instead (missing, empty, a ``.npz`` archive, text, truncated, objects)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"image file not found: {path}")
    if not path.is_file():
        raise InputError(f"{path} is not a file")
    with path.open("rb") as f:
        head = f.read(len(NPY_MAGIC))
    if not head:
        raise InputError(f"{path} is empty (0 bytes): save the images with numpy.save")
    if head.startswith(b"PK"):
        raise InputError(f"{path} is a .npz archive: save one array with numpy.save (.npy)")
    if head != NPY_MAGIC:
        raise InputError(f"{path} is not a .npy file (no NumPy header): save the images with "
                         "numpy.save")
    try:
        array = np.load(path, allow_pickle=False, mmap_mode="r")
    except ValueError as exc:
        if "pickle" in str(exc) or "Python objects" in str(exc):
            raise InputError(f"{path} holds Python objects (pickled data), which advguard does "
                             "not load: save a float array") from None
        raise InputError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None
    except (EOFError, OSError) as exc:
        raise InputError(f"{path} is truncated or unreadable: {exc}") from None
    if array.ndim >= 1 and array.shape[0] > MAX_IMAGES:
        raise InputError(f"{path} holds {array.shape[0]} images; at most {MAX_IMAGES} per call")
    return np.array(array)  # a writable copy in memory


def images_from_array(array: np.ndarray, *, channels: int | None = None,
                      size: tuple[int, int] | None = None) -> torch.Tensor:
    """A float array ``(N, C, H, W)`` in [0, 1] (any float width, either byte order) as a
    float32 tensor, checked against the model's ``channels`` and ``size``."""
    if not isinstance(array, np.ndarray):
        raise InputError(f"images must be a NumPy array, got {type(array).__name__}")
    if array.dtype.fields is not None:
        raise InputError(f"images must be a plain float array, got a structured array "
                         f"{array.dtype}")
    if array.dtype.kind != "f":
        hint = (" (convert uint8 images with x / 255)" if array.dtype.kind in "ui"
                else "")
        raise InputError(f"images must be floating point in [0, 1], got dtype {array.dtype}"
                         f"{hint}")
    with np.errstate(over="ignore", invalid="ignore"):  # out of float32's range: inf, refused
        array = np.ascontiguousarray(array, dtype=np.float32)
    check_pixels(array, channels=channels, size=size)  # before the tensor: no torch call
    return torch.from_numpy(array)


IMAGE_FORMATS = ("PNG", "JPEG")
MAX_PIXELS = 4096 * 4096  # larger uploads are refused before they are decoded

# Formats recognised by their first bytes only to name them in the refusal: their decoders
# never run (Pillow opens uploads with the PNG and JPEG plugins alone).
_OTHER_FORMATS = ((b"GIF87a", "GIF"), (b"GIF89a", "GIF"), (b"II*\x00", "TIFF"),
                  (b"MM\x00*", "TIFF"), (b"BM", "BMP"), (b"\x00\x00\x01\x00", "ICO"),
                  (b"8BPS", "PSD"), (b"%PDF", "PDF"), (b"\xff\x0a", "JPEG XL"),
                  (b"\x00\x00\x00\x0cJXL ", "JPEG XL"), (b"qoif", "QOI"))
_EXIF_ORIENTATION = 0x0112
_ORIENTATIONS = {2: "mirrored", 3: "rotated 180°", 4: "flipped upside down",
                 5: "transposed", 6: "rotated 90° clockwise", 7: "transversed",
                 8: "rotated 90° counter-clockwise"}


def _other_format(data: bytes) -> str | None:
    """The name of a well-known image format that is not PNG or JPEG, from its magic bytes."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if data[4:8] == b"ftyp":
        brand = data[8:12]
        return "AVIF" if brand.startswith(b"avi") else "HEIF"
    head = data[:64].lstrip().lower()
    if head.startswith((b"<svg", b"<?xml")):
        return "SVG"
    return next((name for magic, name in _OTHER_FORMATS if data.startswith(magic)), None)


def open_image(data: bytes, *, max_pixels: int = MAX_PIXELS) -> Any:
    """A PNG or JPEG file's bytes opened lazily (header read, pixels not decoded yet) as a
    Pillow image — or refused: empty (:class:`InputError`), another format
    (:class:`UnsupportedFormatError`), over ``max_pixels`` (:class:`TooLargeError`), animated
    (an APNG's frames, :class:`InputError`). ``width * height`` is what decoding will cost."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise InputError("the upload is empty (0 bytes)")
    other = _other_format(data)
    if other is not None:
        raise UnsupportedFormatError(f"{other} images are not accepted: send PNG or JPEG")
    try:
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except UnidentifiedImageError:
        raise InputError("the upload is not a PNG or JPEG image") from None
    except Image.DecompressionBombError:
        raise TooLargeError(f"the image has more than {max_pixels} pixels") from None
    except _BROKEN as exc:  # a broken header
        raise _corrupt(exc) from None
    w, h = img.size
    if w * h > max_pixels:
        img.close()
        raise TooLargeError(f"the image is {w}x{h} = {w * h} pixels; at most {max_pixels} "
                            "pixels (resize it before sending)")
    frames = int(getattr(img, "n_frames", 1))
    if frames > 1:
        img.close()
        raise InputError(f"the image is an animated {img.format} of {frames} frames: send one "
                         "still image")
    return img


def decode_image(data: bytes, *, channels: int, size: tuple[int, int],
                 max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, list[str]]:
    """A PNG or JPEG file's bytes as a float32 ``(channels, H, W)`` image in [0, 1] for a
    model that takes ``channels`` and ``size`` — and the conversions that took
    (:func:`open_image`, then :func:`convert_image`)."""
    with open_image(data, max_pixels=max_pixels) as img:
        return convert_image(img, channels=channels, size=size)


def convert_image(img: Any, *, channels: int, size: tuple[int, int]
                  ) -> tuple[np.ndarray, list[str]]:
    """An image from :func:`open_image`, decoded as a float32 ``(channels, H, W)`` image in
    [0, 1] for a model that takes ``channels`` and ``size`` — and the conversions that took.

    Documented conversions (and nothing silent): the EXIF orientation applied, 16-bit samples
    scaled by 1/65535 (grey) or read as 8 bits (colour, Pillow's reading of 16-bit RGB PNGs),
    colour to grey with ITU-R 601 luma (Pillow's ``L``), grey to RGB by repeating the channel,
    an alpha channel composited on black, and any other size resized to the model's with
    bilinear filtering. Each is named in the list.
    """
    from PIL import ImageOps

    notes: list[str] = []
    try:
        rawmode = str(img.tile[0][3]) if img.tile else ""
        img.load()
        orientation = img.getexif().get(_EXIF_ORIENTATION)
        if orientation in _ORIENTATIONS:
            img = ImageOps.exif_transpose(img)
            notes.append(f"EXIF orientation {orientation} applied "
                         f"({_ORIENTATIONS[orientation]})")
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            array = _sixteen_bit(img, channels, size, notes)
        else:
            if ";16" in rawmode:
                notes.append("16 → 8 bits per channel")
            array = _eight_bit(img, channels, size, notes)
    except _BROKEN as exc:  # truncated or corrupt pixel data
        raise _corrupt(exc) from None
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return np.ascontiguousarray(array), notes


_BROKEN = (OSError, ValueError, SyntaxError, EOFError)  # what Pillow raises for broken files


def _corrupt(exc: BaseException) -> InputError:
    return InputError(f"the image is truncated or corrupt: {str(exc).splitlines()[0]}")


def _eight_bit(img: Any, channels: int, size: tuple[int, int], notes: list[str]
               ) -> np.ndarray:
    from PIL import Image

    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        base = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(base, img.convert("RGBA"))
        notes.append("alpha composited on black")
    target = "L" if channels == 1 else "RGB"
    source = img.mode
    if source != target:
        if source not in ("1", "L", "P", "RGB", "RGBA"):  # CMYK, YCbCr, …: by way of RGB
            img = img.convert("RGB")
        if img.mode != target:
            img = img.convert(target)
        notes.append(f"{source} → {target}")
    img = _resize(img, size, notes)
    return np.asarray(img, dtype=np.float32) / 255.0


def _sixteen_bit(img: Any, channels: int, size: tuple[int, int], notes: list[str]
                 ) -> np.ndarray:
    """A 16-bit grey image at full precision: samples / 65535, resized in floating point."""
    from PIL import Image

    raw = np.asarray(img)
    if raw.size and not 0 <= int(raw.min()) <= int(raw.max()) <= 65535:
        raise UnsupportedFormatError("32-bit integer images are not accepted: send 8- or "
                                     "16-bit PNG")
    grey = raw.astype(np.float32) / 65535.0
    transparent = img.info.get("transparency")
    if isinstance(transparent, int):
        grey[raw == transparent] = 0.0
        notes.append("alpha composited on black")
    notes.append("16-bit samples scaled by 1/65535")
    grey = np.asarray(_resize(Image.fromarray(grey, mode="F"), size, notes), dtype=np.float32)
    if channels == 1:
        return np.clip(grey, 0.0, 1.0)
    notes.append(f"{img.mode} → RGB")
    return np.repeat(np.clip(grey, 0.0, 1.0)[..., None], channels, axis=2)


def _resize(img: Any, size: tuple[int, int], notes: list[str]) -> Any:
    from PIL import Image

    w, h = img.size
    if (w, h) == (size[1], size[0]):
        return img
    notes.append(f"resized {w}x{h} → {size[1]}x{size[0]} (bilinear)")
    return img.resize((size[1], size[0]), Image.Resampling.BILINEAR)


def images_from_pixels(pixels: object, *, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """Nested lists of pixels in [0, 1] — one image ``(H, W)`` (grey) or ``(C, H, W)``, or a
    batch ``(N, C, H, W)`` — as a float32 batch; the shape must be the model's (raw pixels are
    never resized). Only numbers are pixels: strings, booleans and nulls are refused (NumPy
    would read ``"0.5"`` and ``True`` as numbers)."""
    try:
        array = np.asarray(pixels)
    except (ValueError, TypeError):
        raise InputError("pixels must be nested lists of numbers of one rectangular shape "
                         "(rows of equal length)") from None
    except OverflowError:
        raise InputError("pixels must lie in [0, 1]: a pixel is an integer too large for a "
                         "number") from None
    if array.dtype == np.bool_:
        raise InputError("pixels must be numbers in [0, 1], not true/false")
    if array.dtype.kind not in "fiu":
        what = {"U": "strings", "S": "strings",
                "O": "null or integers too large for a number"}.get(array.dtype.kind,
                                                                    str(array.dtype))
        raise InputError(f"pixels must be nested lists of numbers of one rectangular shape "
                         f"(rows of equal length), got {what}")
    if array.dtype.kind in "iu":
        array = array.astype(np.float64)
    if array.ndim == 2 and channels == 1:
        array = array[None, None]
    elif array.ndim == 3:
        array = array[None]
    return images_from_array(array, channels=channels, size=size)
