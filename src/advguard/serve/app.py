"""The guard as an HTTP service (FastAPI): every prediction comes with its kNN score and a
verdict, and a client that keeps sending adversarial inputs is denied (SPEC B6).

``create_app(Settings(guard_dir=…))`` builds the application; ``advguard serve`` runs it on
uvicorn. Inference runs in one worker thread fed by a queue: requests that arrive while a batch
is running are classified together in the next one, so concurrency raises throughput instead of
queueing behind a lock, and the event loop never blocks.
"""


import json
import logging
import os
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from threadpoolctl import threadpool_limits

from advguard.errors import AdvguardError, StateError, TooLargeError, UnsupportedFormatError
from advguard.serve.guard import KEYS, Guard, KeyRing, read_keys
from advguard.serve.http import BodyLimit, Observe, RateLimit
from advguard.serve.inputs import first_error, json_limit
from advguard.serve.limits import Limits
from advguard.serve.matching import prepare
from advguard.serve.metrics import Metrics
from advguard.serve.policy import Policy
from advguard.serve.queries import encode
from advguard.serve.reveal import Reveal
from advguard.serve.routes import Service, api_router, site_router
from advguard.serve.runtime import Batcher, Judged, RateLimiter
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
    threads: int | None = None  # torch threads in each worker (None: torch's own default)

    def to_env(self) -> str:
        return json.dumps({**asdict(self), "reveal": self.reveal.to_json()})

    @classmethod
    def from_env(cls) -> "Settings":
        obj = json.loads(os.environ[ENV])
        return cls(**{**obj, "policy": Policy(**obj["policy"]),
                      "reveal": Reveal(**obj["reveal"]), "limits": Limits(**obj["limits"])})


def worker_threads(workers: int, threads: int | None = None) -> int | None:
    """Torch threads for each of ``workers`` processes: ``threads`` where given; else, for
    several workers, the CPU cores this process may use shared among them (each worker would
    otherwise take every core), and for one, None (torch's own default)."""
    if threads is not None or workers <= 1:
        return threads
    cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
             else os.cpu_count() or 1)
    return max(1, cores // workers)


# --- the application ------------------------------------------------------------------------

def create_app(settings: Settings) -> FastAPI:
    """The application: the guard, the client store and the query watch loaded once, the
    middleware (Observe → RateLimit → BodyLimit) and the routes (:mod:`advguard.serve.routes`),
    all sharing one :class:`~advguard.serve.routes.Service`."""
    if not log.handlers:  # one JSON line per request on stderr, beside uvicorn's own log
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    # the watch's NumPy products are small (a query's moved windows: 312 × 28 by 28 × 312 on
    # MNIST): threaded BLAS spun on the cores the request threads need — on a busy 2-core
    # machine a query's moves took 4.6 ms that way, 0.1 ms on the calling thread alone
    threadpool_limits(1, user_api="blas")
    guard = Guard.load(settings.guard_dir, trust_builder=settings.trust_builder)
    keys = KeyRing(read_keys(settings.keys or Path(settings.guard_dir) / KEYS))
    watch = guard.config.watch() if settings.query_watch else None
    if settings.query_watch and watch is None:
        log.warning(json.dumps({"event": "no-query-watch", "detail": (
            f"{settings.guard_dir} was fitted without a query watch, or with one for an "
            "earlier encoding of the queries: query-based attacks are not detected; fit the "
            "guard again to calibrate one")}))
    lim = settings.limits

    def judge(x: torch.Tensor) -> Judged:  # one batch on the inference thread
        if watch is None:
            return Judged(guard.verdicts(x))
        return Judged(guard.verdicts(x), prepare(encode(x), watch.shift, watch.windows(x),
                                                 watch.crop))

    service = Service(
        settings=settings, guard=guard, info=guard.info,
        store=open_store(settings.state, Path(settings.guard_dir) / "clients.db",
                         settings.policy, watch),
        metrics=Metrics(), batcher=Batcher(judge, max_images=max(256, lim.max_batch)),
        heavy=ThreadPoolExecutor(max_workers=1, thread_name_prefix="advguard-decode"),
        admitting=ThreadPoolExecutor(max_workers=1, thread_name_prefix="advguard-admission"),
        images_allowed=RateLimiter(lim.image_rate, lim.image_burst))

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        service.batcher.start()
        yield
        await service.batcher.stop()
        service.heavy.shutdown(wait=False, cancel_futures=True)
        service.admitting.shutdown(wait=True)  # admissions under way are finished
        service.store.close()

    app = FastAPI(title="advguard guard", version=guard.config.advguard, lifespan=lifespan,
                  description="Classifies images, scores each prediction with the kNN "
                              "deep-feature detector, and denies clients that keep sending "
                              "adversarial inputs.")
    app.state.service = service
    # added innermost first: Observe → RateLimit → BodyLimit → the endpoints (see serve.http)
    app.add_middleware(BodyLimit, max_bytes=lim.max_body_bytes,
                       json_bytes=json_limit(guard.info, lim.max_batch, lim.max_body_bytes),
                       timeout_s=lim.body_timeout_s)
    app.add_middleware(RateLimit, keys=keys, limiter=RateLimiter(lim.rate, lim.burst))
    app.add_middleware(Observe, metrics=service.metrics,  # paths refused before routing
                       paths=lambda: {"/", *app.openapi()["paths"]})

    @app.exception_handler(AdvguardError)
    async def bad_input(_request: Request, exc: AdvguardError) -> JSONResponse:
        status = (503 if isinstance(exc, StateError) else 413 if isinstance(exc, TooLargeError)
                  else 415 if isinstance(exc, UnsupportedFormatError) else 422)
        return JSONResponse({"detail": str(exc)}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": first_error(exc.errors()), "errors": exc.errors()},
                            status_code=422)

    app.include_router(api_router())
    app.include_router(site_router())
    return app


def app_from_env() -> FastAPI:
    """uvicorn's factory for ``advguard serve`` (settings from ``$ADVGUARD_SERVE``)."""
    return create_app(Settings.from_env())


__all__ = ["Settings", "app_from_env", "create_app", "worker_threads"]
