"""A user's images, as files or arrays, turned into a model's input — or refused with a reason.

Everything a person hands advguard for classification passes through here (``advguard predict``
reads ``.npy`` files with :func:`read_npy`): the dtype, byte order, shape and range are checked
once, and nothing is read that could execute code (no pickles).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from advguard.data.checks import check_images
from advguard.errors import InputError

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
        x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    check_images(x, channels=channels, size=size)
    return x


IMAGE_FORMATS = ("PNG", "JPEG")
MAX_PIXELS = 4096 * 4096  # larger uploads are refused before they are decoded


def decode_image(data: bytes, *, channels: int, size: tuple[int, int],
                 max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, list[str]]:
    """A PNG or JPEG file's bytes as a float32 ``(channels, H, W)`` image in [0, 1] for a
    model that takes ``channels`` and ``size`` — and the conversions that took.

    Documented conversions (and nothing silent): colour to grey with ITU-R 601 luma (Pillow's
    ``L``), grey to RGB by repeating the channel, an alpha channel composited on black, and any
    other size resized to the model's with bilinear filtering. Each is named in the list.
    """
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise InputError("the upload is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format not in IMAGE_FORMATS:
                raise InputError(f"images must be PNG or JPEG, got {img.format}")
            w, h = img.size
            if w * h > max_pixels:
                raise InputError(f"the image is {w}x{h} pixels; at most {max_pixels} pixels")
            img.load()
            notes = []
            if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
                base = Image.new("RGBA", img.size, (0, 0, 0, 255))
                img = Image.alpha_composite(base, img.convert("RGBA"))
                notes.append("alpha composited on black")
            target = "L" if channels == 1 else "RGB"
            source = img.mode
            if source != target:
                img = img.convert(target)
                notes.append(f"{source} → {target}")
            if (w, h) != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
                notes.append(f"resized {w}x{h} → {size[1]}x{size[0]} (bilinear)")
            array = np.asarray(img, dtype=np.float32) / 255.0
    except UnidentifiedImageError:
        raise InputError("the upload is not a PNG or JPEG image") from None
    except Image.DecompressionBombError:
        raise InputError(f"the image has more than {max_pixels} pixels") from None
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt files
        raise InputError(f"the image is truncated or corrupt: {str(exc).splitlines()[0]}"
                         ) from None
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return np.ascontiguousarray(array), notes


def images_from_pixels(pixels: object, *, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """Nested lists of pixels in [0, 1] — one image ``(H, W)`` (grey) or ``(C, H, W)``, or a
    batch ``(N, C, H, W)`` — as a float32 batch; the shape must be the model's (raw pixels are
    never resized)."""
    try:
        array = np.asarray(pixels, dtype=np.float32)
    except (ValueError, TypeError):
        raise InputError("pixels must be nested lists of numbers of one rectangular shape "
                         "(rows of equal length)") from None
    if array.ndim == 2 and channels == 1:
        array = array[None, None]
    elif array.ndim == 3:
        array = array[None]
    return images_from_array(array, channels=channels, size=size)
