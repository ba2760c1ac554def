"""The guard as an HTTP service (FastAPI): every prediction comes with its kNN score and a
verdict, and a client that keeps sending adversarial inputs is denied (SPEC B6).

``create_app(Settings(guard_dir=…))`` builds the application; ``advguard serve`` runs it on
uvicorn. Inference runs in one worker thread fed by a queue: requests that arrive while a batch
is running are classified together in the next one, so concurrency raises throughput instead of
queueing behind a lock, and the event loop never blocks.
"""


import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from fastapi.security import APIKeyHeader
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from advguard.data.images import MAX_PIXELS, decode_image, images_from_array, images_from_pixels
from advguard.errors import AdvguardError, InputError
from advguard.serve.guard import KEYS, Client, Guard, read_keys, summary
from advguard.serve.metrics import Metrics
from advguard.serve.policy import Policy, Store
from advguard.serve.runtime import Batcher, BodyLimit, BodyTooLarge, RateLimiter
from advguard.serve.schemas import ClientState, Health, PixelsRequest, PredictResponse
from advguard.serve.stores import open_store

log = logging.getLogger("advguard.serve")
ENV = "ADVGUARD_SERVE"  # the settings of `advguard serve`, as JSON, for uvicorn's workers


@dataclass(frozen=True)
class Settings:
    guard_dir: str
    keys: str | None = None  # default: GUARD_DIR/keys.json
    state: str | None = None  # default: sqlite:///GUARD_DIR/clients.db
    policy: Policy = Policy()
    max_body_bytes: int = 8 * 2 ** 20
    max_batch: int = 64  # images per request
    max_pixels: int = MAX_PIXELS  # per uploaded image, before decoding
    rate: float = 50.0  # requests per second per key (token bucket, per worker process)
    burst: int = 100

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> "Settings":
        obj = json.loads(os.environ[ENV])
        return cls(**{**obj, "policy": Policy(**obj["policy"])})


# --- the application ------------------------------------------------------------------------

def create_app(settings: Settings) -> FastAPI:
    if not log.handlers:  # one JSON line per request on stderr, beside uvicorn's own log
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    guard = Guard.load(settings.guard_dir)
    keys = read_keys(settings.keys or Path(settings.guard_dir) / KEYS)
    store: Store = open_store(settings.state, Path(settings.guard_dir) / "clients.db",
                              settings.policy)
    metrics = Metrics()
    limiter = RateLimiter(settings.rate, settings.burst)
    batcher = Batcher(guard.verdicts, max_images=max(256, settings.max_batch))
    info = guard.info

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        await batcher.stop()
        store.close()

    app = FastAPI(title="advguard guard", version=guard.config.advguard, lifespan=lifespan,
                  description="Classifies images, scores each prediction with the kNN "
                              "deep-feature detector, and denies clients that keep sending "
                              "adversarial inputs.")
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)

    @app.middleware("http")
    async def count(request: Request, call_next: Any) -> Any:
        t0 = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        endpoint = getattr(route, "path", "unmatched")
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
        return response

    header = APIKeyHeader(name="X-API-Key", auto_error=False,
                          description="the client's API key (keys.json)")

    def client(key: Annotated[str | None, Depends(header)]) -> Client:
        if key is None or key not in keys:
            raise HTTPException(401, "a valid API key is needed in the X-API-Key header")
        return keys[key]

    def admin(who: Annotated[Client, Depends(client)]) -> Client:
        if not who.admin:
            raise HTTPException(403, f"client {who.id!r} is not an admin")
        return who

    @app.exception_handler(AdvguardError)
    async def bad_input(_request: Request, exc: AdvguardError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _first_error(exc.errors()), "errors": exc.errors()},
                            status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}"},
                            status_code=500)

    api = APIRouter(prefix="/v1")

    @api.get("/health", response_model=Health, tags=["service"])
    async def health() -> Health:
        c = guard.config
        return Health(status="ok", dataset=c.dataset, input_shape=[info.channels, *info.size],
                      classes=info.num_classes, threshold=c.threshold, k=c.k,
                      weighting=c.weighting, preprocessing=c.preprocessing)

    predict_body = {"requestBody": {"content": {
        "multipart/form-data": {"schema": {"type": "object", "properties": {"files": {
            "type": "array", "items": {"type": "string", "format": "binary"}}}}},
        "application/json": {"schema": PixelsRequest.model_json_schema()}}, "required": True}}

    @api.post("/predict", response_model=PredictResponse, response_model_by_alias=True,
              openapi_extra=predict_body, tags=["guard"],
              responses={401: {"description": "no valid API key"},
                         403: {"description": "the client is denied"},
                         413: {"description": "body or batch too large"},
                         422: {"description": "not images this model can take"},
                         429: {"description": "rate limit"}})
    async def predict(request: Request, who: Annotated[Client, Depends(client)]) -> Any:
        """Classify one or a batch of images: PNG/JPEG uploads (multipart field ``files``;
        other sizes and channel counts are converted and the conversion is reported) or a JSON
        body ``{"images": [...]}`` of pixels in [0, 1] of the model's shape."""
        t0 = time.perf_counter()
        now = time.time()
        if not limiter.allow(who.id, time.monotonic()):
            raise HTTPException(429, f"client {who.id!r} exceeds {settings.rate:g} requests/s")
        status = await asyncio.to_thread(store.get, who.id, now)
        if status.denied(now):
            metrics.refused.inc()
            until = ("until an admin clears it" if status.denied_until == float("inf")
                     else f"until {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(status.denied_until))}")  # noqa: E501
            raise HTTPException(403, f"client {who.id!r} is denied {until}: {status.reason}")
        x, names, notes = await _read_images(request, info, settings)
        v = await batcher.submit(x)
        status = await asyncio.to_thread(store.record, who.id, (~v.trusted).tolist(),
                                         v.scores.tolist(), now)
        results = [{**summary(v, i, info.num_classes), "name": names[i], "converted": notes[i]}
                   for i in range(len(x))]
        for r in results:
            metrics.verdicts.labels(r["verdict"]).inc()
        if status.denied(now):  # it was not before this request (checked above)
            metrics.denials.inc()
        latency = time.perf_counter() - t0
        log.info(json.dumps({"event": "predict", "client": who.id, "images": len(x),
                             "classes": [r["class"] for r in results],
                             "scores": [round(r["score"], 4) for r in results],
                             "verdicts": [r["verdict"] for r in results],
                             "denied": status.denied(now),
                             "latency_ms": round(1000 * latency, 2)}))
        return {"client": who.id, "results": results, "status": status.to_json()}

    @api.get("/clients", response_model=list[ClientState], tags=["admin"])
    async def clients(_who: Annotated[Client, Depends(admin)]) -> Any:
        """Every client's window, totals and denial (admin key)."""
        return [s.to_json() for s in await asyncio.to_thread(store.clients)]

    @api.post("/clients/{client_id}/clear", response_model=ClientState, tags=["admin"])
    async def clear(client_id: str, who: Annotated[Client, Depends(admin)]) -> Any:
        """Lift a client's denial and empty its window (admin key)."""
        status = await asyncio.to_thread(store.clear, client_id)
        log.info(json.dumps({"event": "clear", "client": client_id, "admin": who.id}))
        return status.to_json()

    app.include_router(api)

    @app.get("/metrics", response_class=PlainTextResponse, tags=["service"])
    async def prometheus() -> PlainTextResponse:
        """Requests, verdicts, denials and latency in the Prometheus text format."""
        return PlainTextResponse(metrics.render(), media_type=metrics.content_type)

    page = resources.files("advguard.serve").joinpath("page.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    return app


async def _read_images(request: Request, info: Any, settings: Settings
                       ) -> tuple[torch.Tensor, list[str | None], list[list[str]]]:
    """The request's images as a checked float32 batch, their names and conversions."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        try:
            form = await request.form(max_files=settings.max_batch + 1, max_fields=8)
        except BodyTooLarge:
            raise
        except StarletteHTTPException as exc:  # too many files or fields
            code = 413 if "Too many files" in str(exc.detail) else exc.status_code
            raise HTTPException(code, f"{exc.detail} (at most {settings.max_batch} images)"
                                ) from None
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
        _check_batch(len(uploads), settings)
        arrays, names, notes = [], [], []
        for upload in uploads:
            data = await upload.read()
            try:
                array, note = await asyncio.to_thread(
                    decode_image, data, channels=info.channels, size=info.size,
                    max_pixels=settings.max_pixels)
            except InputError as exc:
                raise InputError(f"{upload.filename or 'upload'}: {exc}") from None
            arrays.append(array)
            names.append(upload.filename)
            notes.append(note)
        x = images_from_array(np.stack(arrays), channels=info.channels, size=info.size)
        return x, names, notes
    if kind in ("application/json", ""):
        x = await asyncio.to_thread(_pixels, await request.body(), info)  # off the event loop
        _check_batch(len(x), settings)
        return x, [None] * len(x), [[] for _ in range(len(x))]
    raise HTTPException(415, f"send multipart/form-data (PNG/JPEG files) or application/json "
                             f"pixels, not {kind}")


def _pixels(raw: bytes, info: Any) -> torch.Tensor:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InputError("the JSON body is nested too deeply") from None
    try:
        pixels = PixelsRequest.model_validate(body)
    except ValidationError as exc:
        raise InputError(_first_error(exc.errors())) from None
    return images_from_pixels(pixels.images, channels=info.channels, size=info.size)


def _first_error(errors: Any) -> str:
    """pydantic's first error as one line: ``field.path: message``."""
    if not errors:
        return "invalid request"
    where = ".".join(str(p) for p in errors[0].get("loc", ())) or "body"
    return f"{where}: {errors[0]['msg']}"


def _check_batch(n: int, settings: Settings) -> None:
    if n > settings.max_batch:
        raise HTTPException(413, f"{n} images in one request; at most {settings.max_batch}")


def app_from_env() -> FastAPI:
    """uvicorn's factory for ``advguard serve`` (settings from ``$ADVGUARD_SERVE``)."""
    return create_app(Settings.from_env())


__all__ = ["Batcher", "RateLimiter", "Settings", "app_from_env", "create_app"]
