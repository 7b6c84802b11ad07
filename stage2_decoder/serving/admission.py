"""The web service's ASGI guards: admission in front of the caption endpoint (refusals before the body is
read, the upload's byte limit and deadline, requests in progress counted) and the 500 for an unexpected error.
"""
import asyncio
import json
import logging
import math
import time

from stage2_decoder.serving.settings import ServeConfig
from stage2_decoder.serving.uploads import RequestError, megabytes

log = logging.getLogger("capcache.serve")

CAPTION_PATH = "/v1/caption"


class InternalErrors:
    """Pure ASGI guard: an unexpected error is a 500 answered here. Starlette's outermost handler answers it too,
    but then raises it again, and uvicorn closes the connection: the client's next request on it failed."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watched(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as e:  # noqa: BLE001 - one request's failure, answered; the server goes on
            log.error("internal error on %s: %s: %s", scope.get("path"), type(e).__name__, e)
            if started:  # half an answer sent: only closing the connection ends it
                raise
            await reply(send, RequestError(500, f"Internal error ({type(e).__name__})."))


class Admission:
    """Pure ASGI guard in front of the caption endpoint: refuses at once, before the body is read, what
    cannot be taken (not multipart, a declared body over the limit, a full queue), counts the requests
    in progress, ends an upload still unfinished at the request's deadline (408: a stalled client would
    hold its place for ever), and logs a client that leaves mid-upload in one line."""

    def __init__(self, app, cfg: ServeConfig, state):  # add_middleware(Admission, cfg=..., state=...)
        self.app, self.cfg, self.state = app, cfg, state

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and any(ch < " " or ch == "\x7f" for ch in scope["path"]):
            # no route has one; a router's `$` matches before a final line break: /v1/caption%0a would
            # reach the endpoint past every check below
            return await reply(send, RequestError(404, "Not Found"))
        if scope["type"] != "http" or scope["path"] != CAPTION_PATH or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        headers: dict[str, str] = {}
        for k, v in scope["headers"]:  # the first of a repeated header, as the form parser reads it
            headers.setdefault(k.decode("latin-1").lower(), v.decode("latin-1"))
        declared = headers.get("content-length", "")
        if headers.get("content-type", "").split(";")[0].strip().lower() != "multipart/form-data":
            return await reply(send, RequestError(415, "Send the photos as multipart/form-data, one or more "
                                                        "files in the field 'images'."))
        limit = self.cfg.max_body_bytes
        if declared.isdigit() and int(declared) > limit:
            return await reply(send, body_too_large(self.cfg, int(declared)))
        if self.state.in_progress >= self.cfg.max_queue or self.state.batcher.full(1):
            self.state.batcher.stats.refused += 1
            return await reply(send, busy(self.state, "The server is busy", self.cfg.request_timeout_s))
        self.state.in_progress += 1
        seen, gone = 0, False
        deadline = scope["capcache.deadline"] = time.monotonic() + self.cfg.request_timeout_s

        async def counted():
            nonlocal seen, gone
            if scope.get("capcache.body_read"):  # the endpoint waiting for the client to leave: no limit
                message = await receive()
            else:
                try:
                    message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.0))
                except asyncio.TimeoutError:
                    scope["capcache.too_slow"] = seen
                    raise TooSlow from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # more than declared (or none declared): stop reading here
                    scope["capcache.too_large"] = seen
                    raise TooLarge
            elif message["type"] == "http.disconnect" and not scope.get("capcache.body_read"):
                gone = True
            return message

        try:
            await self.app(scope, counted, send)
        except TooLarge:
            await reply(send, body_too_large(self.cfg, seen))
        except TooSlow:
            await reply(send, upload_too_slow(self.cfg, seen))
        finally:
            self.state.in_progress -= 1
            if gone:
                log.info("client %s went away during its upload", peer(scope))


class TooLarge(Exception):
    pass


class TooSlow(Exception):
    pass


def upload_too_slow(cfg: ServeConfig, n: int) -> RequestError:
    return RequestError(408, f"The upload was not finished within {cfg.request_timeout_s:g} s ({megabytes(n)} "
                             f"received): the request's time is for the upload and the captions together.")


def peer(scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "?"


def body_too_large(cfg: ServeConfig, n: int) -> RequestError:
    return RequestError(413, f"The request body of {megabytes(n)} or more is over the limit of "
                             f"{megabytes(cfg.max_body_bytes)} ({cfg.max_files} files of at most "
                             f"{cfg.max_upload_mb:g} MB).")


async def reply(send, e: RequestError) -> None:
    body = json.dumps({"error": str(e)}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), str(v).encode()) for k, v in e.headers.items()]
    await send({"type": "http.response.start", "status": e.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def busy(state, what: str, request_timeout_s: float = 60) -> RequestError:
    """503 with Retry-After: the seconds the queue in front needs, from the recent time per image. In front:
    the images queued for the model, or, when more, the requests admitted (each at least one image; those
    still uploading or decoding are not queued yet). Never past `request_timeout_s`: by then every request
    now in front has been answered or dropped."""
    pending = state.batcher.pending_images
    ahead = max(pending, state.in_progress)
    wait = max(1, min(60, math.ceil(request_timeout_s), math.ceil((ahead + 1) * sum(state.per_image.values()))))
    return RequestError(503, f"{what}: {pending} images are waiting and {state.in_progress} requests are in "
                             f"progress; try again in {wait} s.",
                        {"Retry-After": str(wait)})
