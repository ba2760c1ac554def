"""The service's endpoints, as routers over one :class:`Service` (``app.state.service``):
``/v1/health``, ``/v1/predict``, the admin's ``/v1/clients`` and ``/v1/clients/{id}/clear``;
``/metrics`` and the page at ``/``."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from fastapi.security import APIKeyHeader

from advguard.data import DatasetInfo
from advguard.serve import state
from advguard.serve.guard import Client, Guard
from advguard.serve.http import CLIENT
from advguard.serve.inputs import read_images
from advguard.serve.metrics import Metrics
from advguard.serve.policy import Admission, Store
from advguard.serve.reveal import public_status, summary, withheld
from advguard.serve.runtime import Batcher, RateLimiter
from advguard.serve.schemas import ClientState, Health, PixelsRequest, PredictResponse, StoreState

if TYPE_CHECKING:
    from advguard.serve.app import Settings

log = logging.getLogger("advguard.serve")


@dataclass
class Service:
    """What every request of one worker shares: the guard, its client store, the inference
    batcher, the decoding thread and the admission thread, the metrics, and the clients it
    saw denied (only their requests read the store before inference; a denial made by another
    worker or replica is found by the admission itself). Admissions run on one thread of
    their own: they take turns on the store's write lock anyway, and six threads contending
    for it (and the GIL) admitted half as many requests a second as one (522 vs 1,022 on the
    MNIST guard's watch, in-process)."""

    settings: Settings
    guard: Guard
    info: DatasetInfo
    store: Store
    metrics: Metrics
    batcher: Batcher
    heavy: ThreadPoolExecutor
    admitting: ThreadPoolExecutor
    images_allowed: RateLimiter
    denied: set[str] = field(default_factory=set)


# dependencies are coroutines: FastAPI runs a plain function in a worker thread, a thread
# hand-off (and a contended interpreter lock) per request for a dict lookup
async def service(request: Request) -> Service:
    svc: Service = request.app.state.service
    return svc


HEADER = APIKeyHeader(name="X-API-Key", auto_error=False,
                      description="the client's API key (keys.json)")


async def client(request: Request, _key: Annotated[str | None, Depends(HEADER)]) -> Client:
    who: Client | None = request.scope.get(CLIENT)  # looked up once, by RateLimit
    if who is None:
        raise HTTPException(401, "a valid API key is needed in the X-API-Key header")
    return who


async def admin(who: Annotated[Client, Depends(client)]) -> Client:
    if not who.admin:
        raise HTTPException(403, f"client {who.id!r} is not an admin")
    return who


def denial(who: Client, status: Any) -> str:
    until = ("until an admin clears it" if status.denied_until == float("inf") else
             "until " + time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(status.denied_until)))
    return (f"client {who.id!r} is denied {until}: {status.reason}; the answers to this "
            "request are withheld")


Svc = Annotated[Service, Depends(service)]
PREDICT_BODY = {"requestBody": {"content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {"files": {
        "type": "array", "items": {"type": "string", "format": "binary"}}}}},
    "application/json": {"schema": PixelsRequest.model_json_schema()}}, "required": True}}
PREDICT_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "no valid API key"}, 403: {"description": "the client is denied"},
    408: {"description": "the body stopped arriving"},
    413: {"description": "body, batch or pixels too large"},
    415: {"description": "not PNG/JPEG or JSON"},
    422: {"description": "not images this model can take"}, 429: {"description": "rate limit"},
    503: {"description": "the client state is unusable"}}


def api_router() -> APIRouter:
    api = APIRouter(prefix="/v1")

    @api.get("/health", response_model=Health, tags=["service"],
             responses={503: {"model": Health, "description": "the client state is unusable"}})
    async def health(svc: Svc) -> JSONResponse:
        """The model, the detector, and whether the client state can be read and written
        (503 while it cannot: predictions are refused then)."""
        c, info = svc.guard.config, svc.info
        st = await asyncio.to_thread(svc.store.health)
        body = Health(status="ok" if st.ok else "degraded", dataset=c.dataset,
                      input_shape=[info.channels, *info.size], classes=info.num_classes,
                      threshold=c.threshold, detector=c.detector, layers=c.layers or [],
                      settings=c.settings or {},
                      outputs=svc.settings.reveal.outputs.value,
                      query_watch=svc.store.watch is not None, store=StoreState(**asdict(st)))
        return JSONResponse(body.model_dump(), status_code=200 if st.ok else 503)

    @api.post("/predict", response_model=PredictResponse, response_model_by_alias=True,
              response_model_exclude_unset=True,  # what --outputs withholds is not sent
              openapi_extra=PREDICT_BODY, tags=["guard"], responses=PREDICT_RESPONSES)
    async def predict(request: Request, who: Annotated[Client, Depends(client)],
                      svc: Svc) -> Any:
        """Classify one or a batch of images: PNG/JPEG uploads (multipart field ``files``;
        other sizes and channel counts are converted and the conversion is reported) or a JSON
        body ``{"images": [...]}`` of pixels in [0, 1] of the model's shape."""
        return await _predict(request, who, svc)

    @api.get("/clients", response_model=list[ClientState], tags=["admin"])
    async def clients(_who: Annotated[Client, Depends(admin)], svc: Svc) -> Any:
        """Every client's window, totals and denial (admin key)."""
        return [s.to_json() for s in await asyncio.to_thread(svc.store.clients)]

    @api.post("/clients/{client_id}/clear", response_model=ClientState, tags=["admin"])
    async def clear(client_id: str, who: Annotated[Client, Depends(admin)], svc: Svc) -> Any:
        """Lift a client's denial and empty its window (admin key)."""
        status = await asyncio.to_thread(svc.store.clear, client_id)
        log.info(json.dumps({"event": "clear", "client": client_id, "admin": who.id}))
        return status.to_json()

    return api


async def _predict(request: Request, who: Client, svc: Svc) -> Any:
    t0, now = time.perf_counter(), time.time()
    lim, reveal, info = svc.settings.limits, svc.settings.reveal, svc.info
    if who.id in svc.denied:  # the early refusal, before any work; admit() decides for good
        status = await asyncio.to_thread(svc.store.get, who.id, now)  # cleared meanwhile?
        if status.denied(now):
            svc.metrics.refused.inc()
            raise HTTPException(403, denial(who, status))
        svc.denied.discard(who.id)
    batch = await read_images(request, info, max_batch=lim.max_batch, max_pixels=lim.max_pixels,
                              max_request_pixels=lim.max_request_pixels, heavy=svc.heavy)
    x, names, notes = batch.x, batch.names, batch.notes
    if not svc.images_allowed.allow(who.id, time.monotonic(), cost=len(x)):
        raise HTTPException(429, f"client {who.id!r} sends more than "
                                 f"{lim.image_rate:g} images per second")
    judged = await svc.batcher.submit(x)
    v = judged.verdicts
    # counted and decided in one atomic step: parallel requests cannot outrun a denial.
    # Evidence is what the kNN score flags; an input only unlike the training images is
    # answered flagged, and counted only with --count-unlike (honest cameras send odd images)
    evidence = ~v.trusted if svc.settings.policy.count_unlike else v.scores < v.threshold
    fresh = [summary(v, i, info.num_classes, reveal, tuple(info.classes))
             for i in range(len(x))]

    answers = [state.kept(r, c) for r, c in zip(fresh, v.predicted, strict=True)]

    def admit() -> Admission:  # off the event loop
        return svc.store.admit(who.id, evidence.tolist(), v.scores.tolist(), judged.queries,
                               now, answers)

    admission = await asyncio.get_running_loop().run_in_executor(svc.admitting, admit)
    status = admission.status
    if status.denied(now):
        svc.denied.add(who.id)
    verdicts = ["trusted" if t else "flagged" for t in v.trusted.tolist()]
    for verdict in verdicts:
        svc.metrics.verdicts.labels(verdict).inc()
    svc.metrics.repeats.inc(int(admission.repeats.sum()))
    log.info(json.dumps({"event": "predict", "client": who.id, "images": len(x),
                         "classes": v.predicted.tolist(),
                         "scores": [round(float(s), 4) for s in v.scores],
                         "verdicts": verdicts, "repeats": int(admission.repeats.sum()),
                         "answered_not_fresh": sum(a is not None for a in admission.answers),
                         "answered": admission.answered, "denied": status.denied(now),
                         "latency_ms": round(1000 * (time.perf_counter() - t0), 2)}))
    if not admission.answered:  # denied by this request, or by a parallel one
        svc.metrics.refused.inc()
        if admission.denied_now:
            svc.metrics.denials.inc()
        raise HTTPException(403, denial(who, status))
    # a near-copy (or a resend) is answered as its earlier query was: nothing new, and
    # vouched for no more than its own answer would be
    given = [fresh[i] if a is None else withheld(state.shown(state.settled(a, answers[i])),
                                                 reveal)
             for i, a in enumerate(admission.answers or [None] * len(x))]
    results = [{**g, "name": names[i], "converted": notes[i]} for i, g in enumerate(given)]
    return {"client": who.id, "results": results, "status": public_status(status, reveal)}


def site_router() -> APIRouter:
    site = APIRouter()
    page = resources.files("advguard.serve").joinpath("page.html").read_text(encoding="utf-8")

    @site.get("/metrics", response_class=PlainTextResponse, tags=["service"])
    async def prometheus(svc: Svc) -> PlainTextResponse:
        """Requests, verdicts, denials and latency in the Prometheus text format."""
        return PlainTextResponse(svc.metrics.render(), media_type=svc.metrics.content_type)

    @site.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    return site
