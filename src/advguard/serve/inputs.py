"""A predict request's body as a checked float32 batch of the model's input — or a 4xx naming
what is wrong with it.

Two kinds of body:

* ``multipart/form-data`` with PNG/JPEG files (:func:`advguard.data.images.convert_image` does
  the conversions and reports them). Every file's header is read before any file is decoded,
  so a request's *decoded* pixels are bounded (``max_request_pixels``), not only its bytes.
* ``application/json`` ``{"images": [...]}`` of pixels in [0, 1]. Integers of any length,
  strings, booleans and nulls are refused with 422 (Python's ``json`` would raise on 4,300
  digits, NumPy would overflow on 20, or read ``"0.5"`` and ``true`` as numbers), and a body
  with more numbers than the largest batch can hold is refused before it is parsed. The body
  is read by orjson (a third of the time of Python's ``json``, whose float parsing was most of
  a request's time on the event loop); what orjson refuses — malformed JSON, ``NaN``, nesting
  past 1,024 — and any body with a run of more than 20 digits (orjson reads a long integer
  as a float) is read by Python's ``json``, whose errors and checks say what is wrong.

Small work (one digit) is done at once on the event loop; large work (a body over
``LIGHT_BYTES``, uploads of over ``LIGHT_PIXELS``) goes to one thread of its own, so big
requests queue behind each other instead of in front of the small ones.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import torch
from fastapi import HTTPException, Request
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from advguard.data import DatasetInfo
from advguard.data.images import convert_image, images_from_array, images_from_pixels, open_image
from advguard.errors import InputError, TooLargeError
from advguard.serve.http import BodyTimeout, BodyTooLarge
from advguard.serve.schemas import PixelsRequest

LIGHT_BYTES = 64 * 2 ** 10  # JSON bodies up to this size are parsed on the event loop
LIGHT_PIXELS = 2 ** 18  # uploads of up to this many pixels in all are decoded there
BYTES_PER_PIXEL = 32  # JSON budget per pixel: "0.30000001192092896, " and indentation
_INTEGER_DIGITS = 20
_BOOLEAN = re.compile(rb"\btrue\b|\bfalse\b")
# a run of more digits than an integer pixel may have, found by mapping digits to "1" and
# everything else to "0" (6 us for one MNIST digit's body; a regular expression took 80)
_DIGITS = bytes(49 if 48 <= i <= 57 else 48 for i in range(256))
_LONG_RUN = b"1" * (_INTEGER_DIGITS + 1)


@dataclass(frozen=True)
class Batch:
    x: torch.Tensor  # (N, C, H, W) float32 in [0, 1]
    names: list[str | None]  # upload file names (None for JSON pixels)
    notes: list[list[str]]  # conversions per image


def json_limit(info: DatasetInfo, max_batch: int, max_body_bytes: int) -> int:
    """The largest JSON body that ``max_batch`` images of this model can need."""
    pixels = info.channels * info.size[0] * info.size[1]
    return min(max_body_bytes, max_batch * pixels * BYTES_PER_PIXEL + LIGHT_BYTES)


async def read_images(request: Request, info: DatasetInfo, *, max_batch: int,
                      max_pixels: int, max_request_pixels: int, heavy: Executor) -> Batch:
    """The request's images as a checked batch, their names and conversions."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        return await _uploads(request, info, max_batch, max_pixels, max_request_pixels, heavy)
    if kind in ("application/json", ""):
        raw = await request.body()
        if len(raw) <= LIGHT_BYTES:
            x = parse_pixels(raw, info, max_batch)
        else:
            x = await asyncio.get_running_loop().run_in_executor(
                heavy, parse_pixels, raw, info, max_batch)
        return Batch(x, [None] * len(x), [[] for _ in range(len(x))])
    raise HTTPException(415, f"send multipart/form-data (PNG/JPEG files) or application/json "
                             f"pixels, not {kind}")


async def _uploads(request: Request, info: DatasetInfo, max_batch: int, max_pixels: int,
                   max_request_pixels: int, heavy: Executor) -> Batch:
    try:
        form = await request.form(max_files=max_batch + 1, max_fields=8)
    except (BodyTooLarge, BodyTimeout, ClientDisconnect):
        raise
    except StarletteHTTPException as exc:  # too many files or fields
        code = 413 if "Too many files" in str(exc.detail) else exc.status_code
        raise HTTPException(code, f"{exc.detail} (at most {max_batch} images)") from None
    except Exception as exc:  # noqa: BLE001 - malformed multipart bodies
        raise InputError(f"unreadable multipart body: {exc}") from None
    uploads = [f for key in ("files", "file", "image") for f in form.getlist(key)
               if not isinstance(f, str)]
    unknown = set(form.keys()) - {"files", "file", "image"}
    if unknown:
        raise InputError(f"unknown form fields: {', '.join(sorted(unknown))} (send images "
                         "as 'files')")
    if not uploads:
        raise InputError("no image in the upload: send PNG/JPEG files as the field 'files'")
    check_batch(len(uploads), max_batch)
    files = [(upload.filename, await upload.read()) for upload in uploads]
    opened: list[tuple[str | None, Any]] = []
    try:
        for name, data in files:  # headers only: what decoding all of them would cost
            with _named(name):
                opened.append((name, open_image(data, max_pixels=max_pixels)))
        total = sum(img.size[0] * img.size[1] for _, img in opened)
        if total > max_request_pixels:
            raise TooLargeError(f"the {len(files)} images hold {total} pixels; at most "
                                f"{max_request_pixels} per request (resize them before "
                                "sending)")
    except BaseException:
        _close(opened)
        raise
    if total <= LIGHT_PIXELS:
        decoded = _convert_all(opened, info)
    else:
        decoded = await asyncio.get_running_loop().run_in_executor(
            heavy, _convert_all, opened, info)
    x = images_from_array(np.stack([a for a, _ in decoded]), channels=info.channels,
                          size=info.size)
    return Batch(x, [name for name, _ in files], [notes for _, notes in decoded])


def _convert_all(opened: list[tuple[str | None, Any]], info: DatasetInfo
                 ) -> list[tuple[np.ndarray, list[str]]]:
    """Decode the opened uploads, and close them (in the thread that decodes them)."""
    try:
        out = []
        for name, img in opened:
            with _named(name):
                out.append(convert_image(img, channels=info.channels, size=info.size))
        return out
    finally:
        _close(opened)


def _close(opened: list[tuple[str | None, Any]]) -> None:
    for _, img in opened:
        img.close()


@contextmanager
def _named(name: str | None) -> Iterator[None]:
    """Prefix an upload's errors with its file name (keeping the error's class)."""
    try:
        yield
    except InputError as exc:
        raise type(exc)(f"{name or 'upload'}: {exc}") from None


def parse_pixels(raw: bytes, info: DatasetInfo, max_batch: int) -> torch.Tensor:
    """A JSON body ``{"images": [...]}`` as a checked batch (see the module's docstring)."""
    c, (h, w) = info.channels, info.size
    if raw.count(b",") >= max_batch * (c * h * w + c * h + c + 1):
        raise TooLargeError(f"the JSON body holds more numbers than {max_batch} images of "
                            f"{c}x{h}x{w} pixels")
    body = None
    if _LONG_RUN not in raw.translate(_DIGITS):
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:  # read again, to say what is wrong as below
            body = None
    try:
        if body is None:
            body = json.loads(raw, parse_int=_integer)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InputError("the JSON body is nested too deeply") from None
    try:
        pixels = PixelsRequest.model_validate(body)
    except ValidationError as exc:
        raise InputError(first_error(exc.errors())) from None
    x = images_from_pixels(pixels.images, channels=c, size=(h, w))
    # NumPy reads true/false as 1/0 beside numbers; the body holds no string but its one key
    # (a string pixel was refused above), so these words can only be JSON booleans.
    if _BOOLEAN.search(raw):
        raise InputError("pixels must be numbers in [0, 1], not true/false")
    check_batch(len(x), max_batch)
    return x


def _integer(text: str) -> float:
    digits = len(text.lstrip("-"))
    if digits > _INTEGER_DIGITS:
        raise InputError(f"pixels must lie in [0, 1], got an integer of {digits} digits")
    return float(text)


def first_error(errors: Any) -> str:
    """pydantic's first error as one line: ``field.path: message``."""
    if not errors:
        return "invalid request"
    where = ".".join(str(p) for p in errors[0].get("loc", ())) or "body"
    return f"{where}: {errors[0]['msg']}"


def check_batch(n: int, max_batch: int) -> None:
    if n > max_batch:
        raise TooLargeError(f"{n} images in one request; at most {max_batch}")
