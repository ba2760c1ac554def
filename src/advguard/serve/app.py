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
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from fastapi.security import APIKeyHeader

from advguard.errors import AdvguardError, StateError, TooLargeError, UnsupportedFormatError
from advguard.serve import state
from advguard.serve.guard import KEYS, Client, Guard, KeyRing, read_keys
from advguard.serve.http import CLIENT, BodyLimit, Observe, RateLimit
from advguard.serve.inputs import first_error, json_limit, read_images
from advguard.serve.limits import Limits
from advguard.serve.metrics import Metrics
from advguard.serve.policy import Admission, Policy, Store
from advguard.serve.queries import encode
from advguard.serve.reveal import Reveal, public_status, summary
from advguard.serve.runtime import Batcher, RateLimiter
from advguard.serve.schemas import ClientState, Health, PixelsRequest, PredictResponse, StoreState
from advguard.serve.stores import open_store

log = logging.getLogger("advguard.serve")
ENV = "ADVGUARD_SERVE"  # the settings of `advguard serve`, as JSON, for uvicorn's workers


@dataclass(frozen=True)
class Settings:
    guard_dir: str
    keys: str | None = None  # default: GUARD_DIR/keys.json
    state: str | None = None  # default: sqlite:///GUARD_DIR/clients.db
    policy: Policy = Policy()
    reveal: Reveal = Reveal()
    query_watch: bool = True  # stateful detection of query-based attacks (if calibrated)
    limits: Limits = Limits()
    trust_builder: bool = False  # load a model built by a package.module:factory

    def to_env(self) -> str:
        return json.dumps({**asdict(self), "reveal": self.reveal.to_json()})

    @classmethod
    def from_env(cls) -> "Settings":
        obj = json.loads(os.environ[ENV])
        return cls(**{**obj, "policy": Policy(**obj["policy"]),
                      "reveal": Reveal(**obj["reveal"]), "limits": Limits(**obj["limits"])})


# --- the application ------------------------------------------------------------------------

def create_app(settings: Settings) -> FastAPI:
    if not log.handlers:  # one JSON line per request on stderr, beside uvicorn's own log
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    guard = Guard.load(settings.guard_dir, trust_builder=settings.trust_builder)
    keys = KeyRing(read_keys(settings.keys or Path(settings.guard_dir) / KEYS))
    watch = guard.config.watch() if settings.query_watch else None
    if settings.query_watch and watch is None:
        log.warning(json.dumps({"event": "no-query-watch", "detail": (
            f"{settings.guard_dir} was fitted without a query watch, or with one for an "
            "earlier encoding of the queries: query-based attacks are not detected; fit the "
            "guard again to calibrate one")}))
    store: Store = open_store(settings.state, Path(settings.guard_dir) / "clients.db",
                              settings.policy, watch)
    metrics = Metrics()
    lim = settings.limits
    batcher = Batcher(guard.verdicts, max_images=max(256, lim.max_batch))
    heavy = ThreadPoolExecutor(max_workers=1, thread_name_prefix="advguard-decode")
    # clients this process saw denied: only their requests read the store before inference
    # (a denial made by another worker or replica is found by the admission itself)
    denied: set[str] = set()
    info = guard.info

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        await batcher.stop()
        heavy.shutdown(wait=False, cancel_futures=True)
        store.close()

    app = FastAPI(title="advguard guard", version=guard.config.advguard, lifespan=lifespan,
                  description="Classifies images, scores each prediction with the kNN "
                              "deep-feature detector, and denies clients that keep sending "
                              "adversarial inputs.")
    # added innermost first: Observe → RateLimit → BodyLimit → the endpoints (see serve.http)
    app.add_middleware(BodyLimit, max_bytes=lim.max_body_bytes,
                       json_bytes=json_limit(info, lim.max_batch, lim.max_body_bytes),
                       timeout_s=lim.body_timeout_s)
    app.add_middleware(RateLimit, keys=keys, limiter=RateLimiter(lim.rate, lim.burst))
    images_allowed = RateLimiter(lim.image_rate, lim.image_burst)
    app.add_middleware(Observe, metrics=metrics,  # paths of answers refused before routing
                       paths=lambda: {"/", *app.openapi()["paths"]})

    header = APIKeyHeader(name="X-API-Key", auto_error=False,
                          description="the client's API key (keys.json)")

    def client(request: Request, _key: Annotated[str | None, Depends(header)]) -> Client:
        who: Client | None = request.scope.get(CLIENT)  # looked up once, by RateLimit
        if who is None:
            raise HTTPException(401, "a valid API key is needed in the X-API-Key header")
        return who

    def admin(who: Annotated[Client, Depends(client)]) -> Client:
        if not who.admin:
            raise HTTPException(403, f"client {who.id!r} is not an admin")
        return who

    @app.exception_handler(AdvguardError)
    async def bad_input(_request: Request, exc: AdvguardError) -> JSONResponse:
        status = (503 if isinstance(exc, StateError) else 413 if isinstance(exc, TooLargeError)
                  else 415 if isinstance(exc, UnsupportedFormatError) else 422)
        return JSONResponse({"detail": str(exc)}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": first_error(exc.errors()), "errors": exc.errors()},
                            status_code=422)

    def denial(who: Client, status: Any) -> str:
        until = ("until an admin clears it" if status.denied_until == float("inf") else
                 "until " + time.strftime("%Y-%m-%d %H:%M:%S",
                                          time.localtime(status.denied_until)))
        return (f"client {who.id!r} is denied {until}: {status.reason}; the answers to this "
                "request are withheld")

    api = APIRouter(prefix="/v1")

    @api.get("/health", response_model=Health, tags=["service"],
             responses={503: {"model": Health, "description": "the client state is unusable"}})
    async def health() -> JSONResponse:
        """The model, the detector, and whether the client state can be read and written
        (503 while it cannot: predictions are refused then)."""
        c = guard.config
        state = await asyncio.to_thread(store.health)
        body = Health(status="ok" if state.ok else "degraded", dataset=c.dataset,
                      input_shape=[info.channels, *info.size], classes=info.num_classes,
                      threshold=c.threshold, detector=c.detector, layers=c.layers or [],
                      k=c.k, weighting=c.weighting,
                      preprocessing=c.preprocessing, outputs=settings.reveal.outputs.value,
                      query_watch=store.watch is not None, store=StoreState(**asdict(state)))
        return JSONResponse(body.model_dump(), status_code=200 if state.ok else 503)

    predict_body = {"requestBody": {"content": {
        "multipart/form-data": {"schema": {"type": "object", "properties": {"files": {
            "type": "array", "items": {"type": "string", "format": "binary"}}}}},
        "application/json": {"schema": PixelsRequest.model_json_schema()}}, "required": True}}

    @api.post("/predict", response_model=PredictResponse, response_model_by_alias=True,
              response_model_exclude_unset=True,  # what --outputs withholds is not sent
              openapi_extra=predict_body, tags=["guard"],
              responses={401: {"description": "no valid API key"},
                         403: {"description": "the client is denied"},
                         408: {"description": "the body stopped arriving"},
                         413: {"description": "body, batch or pixels too large"},
                         415: {"description": "not PNG/JPEG or JSON"},
                         422: {"description": "not images this model can take"},
                         429: {"description": "rate limit"},
                         503: {"description": "the client state is unusable"}})
    async def predict(request: Request, who: Annotated[Client, Depends(client)]) -> Any:
        """Classify one or a batch of images: PNG/JPEG uploads (multipart field ``files``;
        other sizes and channel counts are converted and the conversion is reported) or a JSON
        body ``{"images": [...]}`` of pixels in [0, 1] of the model's shape."""
        t0 = time.perf_counter()
        now = time.time()
        if who.id in denied:  # the early refusal, before any work; admit() decides for good
            status = await asyncio.to_thread(store.get, who.id, now)  # cleared meanwhile?
            if status.denied(now):
                metrics.refused.inc()
                raise HTTPException(403, denial(who, status))
            denied.discard(who.id)
        batch = await read_images(request, info, max_batch=lim.max_batch,
                                  max_pixels=lim.max_pixels,
                                  max_request_pixels=lim.max_request_pixels, heavy=heavy)
        x, names, notes = batch.x, batch.names, batch.notes
        if not images_allowed.allow(who.id, time.monotonic(), cost=len(x)):
            raise HTTPException(429, f"client {who.id!r} sends more than "
                                     f"{lim.image_rate:g} images per second")
        v = await batcher.submit(x)
        # counted and decided in one atomic step: parallel requests cannot outrun a denial.
        # Evidence is what the kNN score flags; an input only unlike the training images is
        # answered flagged, and counted only with --count-unlike (honest cameras send odd images)
        evidence = ~v.trusted if settings.policy.count_unlike else v.scores < v.threshold
        fresh = [summary(v, i, info.num_classes, settings.reveal, tuple(info.classes))
                 for i in range(len(x))]

        def admit() -> Admission:  # off the event loop, the query encoding included
            codes = encode(x) if store.watch is not None else None
            answers = [state.kept(r, c) for r, c in zip(fresh, v.predicted, strict=True)]
            return store.admit(who.id, evidence.tolist(), v.scores.tolist(), codes, now,
                               answers)

        admission = await asyncio.to_thread(admit)
        status = admission.status
        if status.denied(now):
            denied.add(who.id)
        verdicts = ["trusted" if t else "flagged" for t in v.trusted.tolist()]
        for verdict in verdicts:
            metrics.verdicts.labels(verdict).inc()
        metrics.repeats.inc(int(admission.repeats.sum()))
        latency = time.perf_counter() - t0
        log.info(json.dumps({"event": "predict", "client": who.id, "images": len(x),
                             "classes": v.predicted.tolist(),
                             "scores": [round(float(s), 4) for s in v.scores],
                             "verdicts": verdicts, "repeats": int(admission.repeats.sum()),
                             "answered_as_before": sum(a is not None
                                                       for a in admission.answers),
                             "answered": admission.answered, "denied": status.denied(now),
                             "latency_ms": round(1000 * latency, 2)}))
        if not admission.answered:  # denied by this request, or by a parallel one
            metrics.refused.inc()
            if admission.denied_now:
                metrics.denials.inc()
            raise HTTPException(403, denial(who, status))
        # a near-copy (or a resend) is answered as its earlier query was: nothing new
        given = [fresh[i] if a is None else state.shown(a)
                 for i, a in enumerate(admission.answers or [None] * len(x))]
        results = [{**g, "name": names[i], "converted": notes[i]} for i, g in enumerate(given)]
        return {"client": who.id, "results": results,
                "status": public_status(status, settings.reveal)}

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


def app_from_env() -> FastAPI:
    """uvicorn's factory for ``advguard serve`` (settings from ``$ADVGUARD_SERVE``)."""
    return create_app(Settings.from_env())


__all__ = ["Settings", "app_from_env", "create_app"]
