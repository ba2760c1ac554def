"""What the service admits, each default declared once (``advguard serve``'s options are built
from these fields): sizes of requests and images, rates per key, timeouts, connections."""

from __future__ import annotations

from dataclasses import dataclass

from advguard.data.images import MAX_PIXELS
from advguard.options import check_at_least, check_positive, option


@dataclass(frozen=True)
class Limits:
    max_batch: int = option(64, "images per request")
    rate: float = option(50.0, "requests per second per key and worker (refused requests "
                               "count)")
    burst: int = option(100, "requests a key may send at once")
    image_rate: float = option(200.0, "images per second per key and worker (every image of a "
                                      "batch counts)")
    image_burst: int = option(1000, "images a key may send at once (at least --max-batch)")
    header_timeout_s: float = option(10.0, "seconds a connection has to send its request "
                                           "headers", aliases=("--header-timeout",))
    body_timeout_s: float = option(30.0, "seconds a request body has to arrive",
                                   aliases=("--body-timeout",))
    max_body_bytes: int = option(8 * 2 ** 20, "bytes of a request body (JSON bodies: at most "
                                              "what max_batch images need)", cli=False)
    max_pixels: int = option(MAX_PIXELS, "pixels of an uploaded image, before decoding",
                             cli=False)
    max_request_pixels: int = option(4 * MAX_PIXELS, "pixels of all uploads of a request, "
                                                     "before decoding", cli=False)
    keep_alive_s: float = option(5.0, "seconds before an idle kept-alive connection is closed",
                                 cli=False)
    max_connections: int = option(512, "open connections and requests per worker; more get "
                                       "503", cli=False)

    def __post_init__(self) -> None:
        check_at_least(self, 1, "max_body_bytes", "max_batch", "max_pixels",
                       "max_request_pixels", "burst", "max_connections")
        check_at_least(self, self.max_batch, "image_burst")
        for name in ("rate", "image_rate", "header_timeout_s", "body_timeout_s",
                     "keep_alive_s"):
            check_positive(name, getattr(self, name))
