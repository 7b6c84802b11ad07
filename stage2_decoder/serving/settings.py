"""The web service's settings (`ServeConfig`), each checked at start-up: finite and in range.

docs/serving.md describes every setting and what the service does when one of its bounds is reached.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from stage2_decoder.decoding.config import DecodeConfig  # torch-free
from stage2_decoder.serving.batcher import MAX_WAIT_MS

MB = 1 << 20
FORM_OVERHEAD = 1 * MB  # multipart headers and the small form fields, beyond the files' own bytes


@dataclass
class ServeConfig:
    checkpoint: str | None = None  # None: $CAPCACHE_CHECKPOINT, else the newest runs/*/best.pt
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 16  # B: images in one model call at most
    max_wait_ms: float = 50.0  # T: how long a batch waits for more requests (not when one client is alone)
    batching: bool = True  # False: one request per model call (the benchmark's baseline)
    max_queue: int = 64  # images accepted and not yet answered; beyond it: 503 + Retry-After at once
    request_timeout_s: float = 30.0  # a request not answered by then: 503 (still queued) or 504, and dropped
    max_files: int = 16  # files in one request
    max_upload_mb: float = 10.0  # bytes of one file, in MiB
    max_pixels: int = 40_000_000  # width x height of one image, read from its header before decoding
    max_request_pixels: int = 100_000_000  # the sum over one request's images, from their headers
    decode_workers: int = 2  # threads decoding and preprocessing uploads (off the event loop and the model)
    header_timeout_s: float = 10.0  # a connection that has not sent a whole request head by then is closed
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this
    max_connections: int = 512  # connections and requests in progress; beyond: uvicorn's plain 503
    num_captions: int = 1  # when the request does not say
    max_num_captions: int = 10
    decode: DecodeConfig = field(default_factory=DecodeConfig)  # beam_size: when the request does not say
    max_beam_size: int = 10
    device: str = "auto"
    encode_chunk: int = 4  # images per encoder pass on CPU (0: the whole batch at once)
    encode_threads: int = 0  # CPU encoder passes at once, with batching on (0: one per core this process may use)
    access_log: bool = True  # uvicorn's line per request (--no-progress turns it off)

    def __post_init__(self):
        checks = [("--port", self.port, 0, 65535), ("--max-batch", self.max_batch, 1, 4096),
                  ("--max-wait-ms", self.max_wait_ms, 0, MAX_WAIT_MS), ("--max-queue", self.max_queue, 1, 1_000_000),
                  ("--request-timeout-s", self.request_timeout_s, 0.1, 3600),
                  ("--max-files", self.max_files, 1, 1000), ("--max-upload-mb", self.max_upload_mb, 1e-3, 1024),
                  ("--max-pixels", self.max_pixels, 1, 1_000_000_000),
                  ("--max-request-pixels", self.max_request_pixels, 1, 10_000_000_000),
                  ("--decode-workers", self.decode_workers, 1, 64),
                  ("--header-timeout-s", self.header_timeout_s, 0.1, 3600),
                  ("--keep-alive-s", self.keep_alive_s, 0.1, 3600),
                  ("--max-connections", self.max_connections, 1, 1_000_000),
                  ("--encode-chunk", self.encode_chunk, 0, 4096), ("--encode-threads", self.encode_threads, 0, 256),
                  ("num_captions", self.num_captions, 1, self.max_num_captions),
                  ("--beam-size", self.decode.beam_size, 1, self.max_beam_size)]
        for name, value, lo, hi in checks:
            if not (isinstance(value, (int, float)) and math.isfinite(value) and lo <= value <= hi):
                raise ValueError(f"{name} must be between {lo:g} and {hi:g}, got {value}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * MB)

    @property
    def max_body_bytes(self) -> int:
        """A whole request's body at most: every file at its limit, and the form around them."""
        return self.max_files * self.max_upload_bytes + FORM_OVERHEAD
