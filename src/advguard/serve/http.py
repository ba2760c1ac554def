"""What stands between the network and the guard's endpoints, outermost first:

1. :class:`TimedHTTPProtocol` (uvicorn's HTTP/1.1 protocol on httptools, the C parser, with
   a deadline for the request line and headers): a connection that sends nothing, or sends its
   headers byte by byte, is closed after ``header_timeout`` seconds, and one whose request
   line and headers pass ``MAX_HEADER_BYTES`` unfinished gets 431 and is closed (httptools
   holds whatever it is sent; h11 stopped at the same 16 KiB); uvicorn's own keep-alive
   timeout closes idle connections between requests. (On the pure-Python h11 protocol the
   event loop spent a quarter more time a request: 1.4 vs 1.1 ms of CPU, MNIST guard under
   the load benchmark.)
2. :class:`Observe`: every answer counted in ``/metrics`` by endpoint and status (413s and
   429s refused before routing, and 500s, included); a client that leaves mid-request is one
   log line (status 499), an unexpected error one log line with its traceback and a 500.
3. :class:`RateLimit`: a request that carries a valid API key spends a token of its client's
   bucket *before* its body is read, so refused requests (413, 415, 422) count too.
4. :class:`BodyLimit`: a body over its limit gets 413 before it is read whole (JSON bodies
   have a smaller limit, sized to the model's largest batch); a body that has not arrived
   within ``timeout_s`` gets 408 — a ``Content-Length`` larger than the body, or a body sent
   a byte at a time, does not hold the request forever.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from advguard.serve.guard import KeyRing
from advguard.serve.metrics import Metrics
from advguard.serve.runtime import RateLimiter

log = logging.getLogger("advguard.serve")

MAX_HEADER_BYTES = 16 * 1024  # a request's line and headers, unfinished (h11's default)
CLIENT = "advguard.client"  # the scope entry holding the request's Client (None: no valid key)


async def refuse(send: Any, status: int, detail: str, close: bool = False) -> None:
    """A JSON ``{"detail": …}`` answer sent straight from ASGI middleware."""
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    if close:  # the rest of the body is not read: the connection cannot carry another request
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class TimedHTTPProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, plus a deadline and a size limit for each request's line
    and headers."""

    def __init__(self, *args: Any, header_timeout: float = 10.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = header_timeout
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_bytes = 0  # bytes of the request line and headers so far

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    @property
    def _awaiting_headers(self) -> bool:
        """No request under way: what arrives is a request's line and headers."""
        return self.cycle is None or self.cycle.response_complete

    def data_received(self, data: bytes) -> None:
        waiting = self._awaiting_headers
        super().data_received(data)
        if not self._awaiting_headers:
            self._disarm()  # the headers are in; the body has its own deadline (BodyLimit)
            self._header_bytes = 0
            return
        if waiting and not self.transport.is_closing():
            self._header_bytes += len(data)
            if self._header_bytes > MAX_HEADER_BYTES:
                self._too_large()
                return
        if self._header_timer is None and not self.transport.is_closing():
            self._arm()  # the first bytes of the next request on a kept-alive connection

    def _too_large(self) -> None:
        self._disarm()
        log.info(json.dumps({"event": "headers-too-large", "client": _peer(self.client),
                             "detail": f"request line and headers past {MAX_HEADER_BYTES} "
                                       "bytes unfinished"}))
        self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                             b"content-type: text/plain\r\ncontent-length: 0\r\n"
                             b"connection: close\r\n\r\n")
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _too_slow(self) -> None:
        self._header_timer = None
        if self._awaiting_headers:
            log.info(json.dumps({"event": "timeout", "client": _peer(self.client),
                                 "detail": f"no complete request headers within "
                                           f"{self.header_timeout:g} s"}))
            self.transport.close()


def _peer(address: tuple[str, int] | None) -> str | None:
    return None if address is None else f"{address[0]}:{address[1]}"


class Observe:
    """Counts every answer by endpoint and status, and keeps errors to one log line each."""

    def __init__(self, app: Any, metrics: Metrics, paths: Callable[[], set[str]]) -> None:
        self.app, self.metrics, self.paths = app, metrics, paths

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status: int | None = None

        async def tracking(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, tracking)
        except ClientDisconnect:
            status = status or 499  # nginx's "client closed request"
            log.info(json.dumps({"event": "disconnect", "client": _peer(scope.get("client")),
                                 "path": scope.get("path")}))
        except Exception as exc:
            log.exception(json.dumps({"event": "error", "path": scope.get("path"),
                                      "error": type(exc).__name__}))
            if status is None:
                status = 500
                await refuse(send, 500, f"internal error: {type(exc).__name__}")
        finally:
            route = getattr(scope.get("route"), "path", None)  # None: refused before routing
            path = scope.get("path", "")
            endpoint = route or (path if path in self.paths() else "unmatched")
            self.metrics.requests.labels(endpoint, str(status or 500)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)


class RateLimit:
    """A token bucket per client key, spent before the body is read; the request's client (or
    None) goes into the scope for the endpoints."""

    def __init__(self, app: Any, keys: KeyRing, limiter: RateLimiter) -> None:
        self.app, self.keys, self.limiter = app, keys, limiter

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        key = next((v for k, v in scope.get("headers") or [] if k == b"x-api-key"), None)
        who = None if key is None else self.keys.lookup(key.decode("latin-1"))
        scope[CLIENT] = who
        if who is not None and not self.limiter.allow(who.id, time.monotonic()):
            await refuse(send, 429, f"client {who.id!r} exceeds {self.limiter.rate:g} "
                                    "requests/s", close=True)
            return
        await self.app(scope, receive, send)


class BodyTooLarge(Exception):
    pass


class BodyTimeout(Exception):
    pass


class BodyLimit:
    """413 for a body over ``max_bytes`` (``json_bytes`` for JSON), before it is read whole;
    408 for a body that has not arrived whole within ``timeout_s``."""

    def __init__(self, app: Any, max_bytes: int, json_bytes: int, timeout_s: float) -> None:
        self.app, self.max_bytes, self.json_bytes = app, max_bytes, json_bytes
        self.timeout_s = timeout_s

    def limit(self, headers: dict[bytes, bytes]) -> tuple[int, str]:
        kind = headers.get(b"content-type", b"").split(b";")[0]
        if kind.strip().lower() in (b"application/json", b""):
            return self.json_bytes, (f"a JSON body of pixels is at most {self.json_bytes} "
                                     "bytes here (send larger batches as PNG files)")
        return self.max_bytes, f"a request body is at most {self.max_bytes} bytes"

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        limit, why = self.limit(headers)
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await refuse(send, 413, f"request body of {int(length)} bytes: {why}", close=True)
            return
        seen, more, started = 0, True, False
        deadline = time.monotonic() + self.timeout_s

        async def limited() -> Any:
            nonlocal seen, more
            if not more:  # the body is in: later receives wait for a disconnect, untimed
                return await receive()
            try:
                message = await asyncio.wait_for(receive(),
                                                 timeout=max(deadline - time.monotonic(), 0.0))
            except TimeoutError:
                raise BodyTimeout from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                more = bool(message.get("more_body", False))
                if seen > limit:
                    raise BodyTooLarge
            return message

        async def tracking(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, tracking)
        except BodyTooLarge:
            if not started:
                await refuse(send, 413, f"request body over {limit} bytes: {why}", close=True)
        except BodyTimeout:
            if not started:
                declared = "" if length is None else f" of the {int(length)} declared"
                await refuse(send, 408, f"the request body did not arrive within "
                                        f"{self.timeout_s:g} s ({seen} bytes{declared} came)",
                             close=True)
