"""The web service's app: upload parsing and limits, the page, the JSON endpoint, the batched model call.
"""
import asyncio
import concurrent.futures
import contextlib
import gc
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Annotated

import click
from fastapi import File, Form, Request, UploadFile

from common.cli import Terminated, one_line
from stage2_decoder import Captioner
from stage2_decoder.api import find_checkpoint
from stage2_decoder.serving.admission import (CAPTION_PATH, Admission, InternalErrors, body_too_large, busy, peer,
                                              upload_too_slow)
from stage2_decoder.serving.batcher import BatcherConfig, DeadlineExceeded, DynamicBatcher, QueueFull
from stage2_decoder.serving.models import ERROR_RESPONSES, CaptionResponse, CaptionResult, Health, Stats
from stage2_decoder.serving.page import CSP, PAGE
from stage2_decoder.serving.settings import ServeConfig
from stage2_decoder.serving.uploads import RequestError, decode_upload, megabytes, open_upload


log = logging.getLogger("capcache.serve")


class ChunkedEncoder:
    """A backbone whose `encode` runs a large batch in passes of `chunk` images.

    On CPU the decoder gains from large batches and the encoder does not: mobilenet_v2 at 224 px took
    33 ms per image in passes of 1-8 and 50 ms in one pass of 16 on this project's 2-core Xeon (the
    activations outgrow the cache), so a batch of 16 is encoded in 4 passes and decoded in one.
    """

    def __init__(self, backbone, chunk: int):
        self._backbone, self._chunk = backbone, chunk

    def __getattr__(self, name):
        return getattr(self._backbone, name)

    def encode(self, images_u8):
        """(B, 3, H, W) uint8 -> (B, D) features, as `Backbone.encode` computes them."""
        import torch

        if images_u8.shape[0] <= self._chunk:
            return self._backbone.encode(images_u8)
        return torch.cat([self._backbone.encode(c) for c in images_u8.split(self._chunk)])


def checkpoint_name(path) -> str:
    """What /healthz reports: the run folder and file (`coco-resnet152/best.pt`), not the server's full path."""
    p = Path(path).absolute()  # `--checkpoint best.pt` from inside the run folder names the folder too
    return f"{p.parent.name}/{p.name}" if p.parent.name else p.name


GPU_FAILED = "The server's GPU failed; it must be restarted."
MAX_FIELDS = 16  # form fields besides the files (num_captions, beam_size: 2 are used)
MAX_FIELD_BYTES = 64 << 10  # bytes of one such field


def device_lost(device) -> bool:
    """Whether the CUDA context is gone, tried with one tiny operation: after a device-side assert or an illegal
    memory access every CUDA call fails; after other CUDA errors (a bad launch) the next calls work."""
    import torch

    if getattr(device, "type", None) != "cuda":
        return False
    try:
        torch.ones(1, device=device).add_(1)
        torch.cuda.synchronize(device)
        return False
    except Exception:  # noqa: BLE001 - whatever the probe raises, the device does not answer
        return True


class ClientGone(Exception):
    """The client closed its connection before its answer was ready."""

async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (once the body is read, the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def await_answer(request: Request, future: concurrent.futures.Future, timeout: float) -> list:
    """The batcher's answer for `future`; cancels it (dropped unless the model has it) when the client
    leaves (ClientGone) or `timeout` passes (503 while queued, 504 once in the model)."""
    answer = asyncio.wrap_future(future)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({answer, gone}, timeout=max(timeout, 0.0),
                                     return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        future.cancel()
        raise
    finally:
        gone.cancel()
    if answer in done:
        return answer.result()
    running = future.running()
    future.cancel()
    answer.cancel()
    if gone in done:
        raise ClientGone
    if running:
        raise RequestError(504, "The model did not finish this request in time.")
    raise RequestError(503, "The server is busy: the request waited past its deadline in the queue.",
                       {"Retry-After": "5"})


def _field_error(errors, cfg: ServeConfig) -> str:
    """FastAPI's validation errors -> one sentence naming the first field at fault."""
    e = errors[0]
    name = next((str(x) for x in reversed(e.get("loc", ())) if isinstance(x, str) and x != "body"), "form")
    if name == "images":
        if isinstance(e.get("input"), str):  # a text value beside (or instead of) the files
            return "The multipart field 'images' holds text: send only files in it."
        return "No photos: send one or more files in the multipart field 'images'."
    hi = {"num_captions": cfg.max_num_captions, "beam_size": cfg.max_beam_size}.get(name)
    got = e.get("input")
    got = f", got {str(got)[:40]!r}" if isinstance(got, (str, int, float)) else ""
    if hi is None:
        return f"Form field {name!r}: {e.get('msg', 'not valid')}{got}."
    return f"Form field {name!r} must be a whole number between 1 and {hi}{got}."


def create_app(captioner, cfg: ServeConfig):
    """The FastAPI app over a loaded captioner: anything with `.backbone` (`.preprocess`, `.encode`),
    `.caption_features(feats, **decode)` and `.checkpoint_path`."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.exceptions import HTTPException


    import numpy as np
    import torch

    # imported on use: importing this module stays free of torch
    from common.device import usable_cores

    # on the CPU a photo costs the encoder the same alone as in a batch: each request is encoded as it
    # joins a batch, while the batcher waits for company, and only the decoder runs batched; a GPU encoder
    # gains from the batch, so there it runs in the batched call
    early = getattr(getattr(captioner.backbone, "device", None), "type", "cpu") == "cpu"

    def timed(what: str, t0: float, n: int) -> None:
        state.per_image[what] = 0.8 * state.per_image[what] + 0.2 * (time.perf_counter() - t0) / n

    def encode(arrays: list) -> torch.Tensor:
        t0 = time.perf_counter()
        feats = captioner.backbone.encode(torch.from_numpy(np.stack(arrays)))  # (B, D)
        timed("encode", t0, len(arrays))
        return feats

    def run_batch(items: list, key: tuple[int, int]) -> list[dict]:
        num_captions, beam_size = key
        if state.gpu_failed is not None:
            raise RequestError(503, GPU_FAILED)
        out_of_memory = False
        try:
            feats = torch.stack(items) if early else encode(items)
            t0 = time.perf_counter()
            out = captioner.caption_features(feats, num_captions=num_captions,
                                             **asdict(replace(cfg.decode, beam_size=beam_size)))
        except torch.cuda.OutOfMemoryError:
            out_of_memory = True
        except RuntimeError as e:  # CUDA's errors (torch.AcceleratorError from torch 2.8) are RuntimeErrors
            if early or not device_lost(captioner.backbone.device):
                raise
            state.gpu_failed = one_line(e)[:300]
            log.error("the GPU failed (%s): every request now gets 503 and /healthz answers 503", state.gpu_failed)
            raise RequestError(503, GPU_FAILED) from None
        if out_of_memory:
            # out of the except block: the error's frames, which hold what the failed call allocated, are gone,
            # so the memory goes back before the batch is retried one request at a time (or the next one runs)
            feats = None
            gc.collect()
            torch.cuda.empty_cache()
            raise RequestError(503, f"Not enough GPU memory to caption {len(items)} photos at once: send fewer, "
                                    f"or try again shortly.", {"Retry-After": "5"})
        timed("decode", t0, len(items))
        return out

    pp = captioner.backbone.preprocess
    batcher = DynamicBatcher(run_batch, BatcherConfig(cfg.max_batch, cfg.max_wait_ms, cfg.batching, cfg.max_queue),
                             prepare=(lambda arrays: list(encode(arrays))) if early else None,
                             prepare_threads=cfg.encode_threads or usable_cores())
    pool = concurrent.futures.ThreadPoolExecutor(cfg.decode_workers, thread_name_prefix="caption-decode")

    def warm_up() -> None:
        """One black photo through the encoder and the decoder: on a GPU the first call pays cuBLAS and cuDNN's
        set-up (seconds), here, before the port opens, not on a user's request."""
        t0 = time.perf_counter()
        feats = captioner.backbone.encode(torch.zeros((1, 3, pp.crop, pp.crop), dtype=torch.uint8))
        captioner.caption_features(feats, num_captions=1, **asdict(cfg.decode))
        log.info("warmed up in %.1f s", time.perf_counter() - t0)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if not early:
            await asyncio.to_thread(warm_up)
        batcher.start()
        try:
            yield
        finally:
            batcher.stop()  # requests already accepted are answered first
            pool.shutdown(wait=True)

    app = FastAPI(title="capcache", version="1", lifespan=lifespan, redoc_url=None,
                  description="Caption photos with a trained capcache checkpoint. docs/serving.md has the limits.",
                  form_limits={"max_files": cfg.max_files, "max_fields": MAX_FIELDS, "max_part_size": MAX_FIELD_BYTES})
    state = app.state
    state.batcher, state.cfg, state.captioner, state.pool = batcher, cfg, captioner, pool
    state.in_progress, state.per_image = 0, {"encode": 0.05, "decode": 0.05}  # seconds, recent average
    state.gpu_failed = None  # why the GPU stopped working, once it has: /healthz then asks for a restart

    @app.exception_handler(RequestError)
    async def request_error(request, e: RequestError):
        return JSONResponse({"error": str(e)}, status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        return JSONResponse({"error": _field_error(e.errors(), cfg)}, status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        detail = str(e.detail)
        if "capcache.too_large" in request.scope:  # the form parser met the admission's byte limit
            return await request_error(request, body_too_large(cfg, request.scope["capcache.too_large"]))
        if "capcache.too_slow" in request.scope:  # or its deadline
            return await request_error(request, upload_too_slow(cfg, request.scope["capcache.too_slow"]))
        if "Too many files" in detail:
            return JSONResponse({"error": f"More than {cfg.max_files} files in one request."}, status_code=413)
        if "Too many fields" in detail:  # Starlette's form limits, said as this server's
            return JSONResponse({"error": f"More than {MAX_FIELDS} form fields besides the files."}, status_code=413)
        if "Part exceeded maximum size" in detail:
            return JSONResponse({"error": f"A form field (not a file) over {MAX_FIELD_BYTES >> 10} KiB."},
                                status_code=413)
        if e.status_code == 400 and request.url.path == CAPTION_PATH:
            detail = "The multipart form could not be read (a malformed or incomplete body)."
        return JSONResponse({"error": detail}, status_code=e.status_code, headers=e.headers)

    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(PAGE, headers={"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"})

    @app.get("/healthz", response_model=Health, responses={503: {"model": Health, "description": (
        "The GPU failed (a CUDA error that ends the process's CUDA context): restart the server.")}})
    async def healthz():
        health = Health(checkpoint=checkpoint_name(captioner.checkpoint_path))
        if state.gpu_failed is not None:
            return JSONResponse(health.model_copy(update={"status": f"GPU failed: {state.gpu_failed}"}).model_dump(),
                                status_code=503)
        return health

    @app.get("/v1/stats", response_model=Stats)
    async def stats():
        s = batcher.stats
        return Stats(requests=s.requests, model_calls=s.calls, images=s.images, largest_batch=s.largest,
                     refused=s.refused, dropped=s.dropped, retried_batches=s.retried,
                     queued_images=batcher.pending_images, batching=cfg.batching, max_batch=cfg.max_batch,
                     max_wait_ms=cfg.max_wait_ms, max_queue=cfg.max_queue)

    @app.post(CAPTION_PATH, response_model=CaptionResponse, responses=ERROR_RESPONSES,
              summary="Caption one or more photos")
    async def caption(request: Request,
                      images: Annotated[list[UploadFile], File(description="The photos (JPEG, PNG, WebP, ...).")],
                      num_captions: Annotated[int | None, Form(ge=1, le=cfg.max_num_captions, description=(
                          "Distinct captions per photo, best first (default: the server's)."))] = None,
                      beam_size: Annotated[int | None, Form(ge=1, le=cfg.max_beam_size, description=(
                          "Beam width (1 = greedy; default: the server's)."))] = None) -> CaptionResponse:
        request.scope["capcache.body_read"] = True
        _check_fields(await request.form())  # parsed once already: the form FastAPI read the arguments from
        deadline = request.scope.get("capcache.deadline", time.monotonic() + cfg.request_timeout_s)
        loop = asyncio.get_running_loop()
        names = [f.filename or f"images[{i}]" for i, f in enumerate(images)]
        blobs = []
        for name, f in zip(names, images):
            if f.size is not None and f.size > cfg.max_upload_bytes:  # refused before it is read into memory
                raise RequestError(413, f"{name} is {megabytes(f.size)}, over the limit of "
                                        f"{megabytes(cfg.max_upload_bytes)} per file.")
            blobs.append(await f.read())
        await _check_request_pixels(loop, pool, names, blobs, cfg)
        arrays = await asyncio.gather(*[loop.run_in_executor(pool, decode_upload, name, data, pp,
                                                             cfg.max_upload_bytes, cfg.max_pixels)
                                        for name, data in zip(names, blobs)], return_exceptions=True)
        del blobs
        failed = next((a for a in arrays if isinstance(a, BaseException)), None)
        if failed is not None:
            raise failed
        key = (num_captions or cfg.num_captions, beam_size or cfg.decode.beam_size)
        try:
            future = batcher.submit(arrays, key, deadline)
        except QueueFull:
            raise busy(state, "The server is busy", cfg.request_timeout_s) from None
        try:
            results = await await_answer(request, future, deadline - time.monotonic())
        except DeadlineExceeded:
            raise RequestError(503, "The server is busy: the request waited past its deadline in the queue.",
                               {"Retry-After": "5"}) from None
        except ClientGone:
            log.info("client %s went away before its captions were ready; its request was dropped",
                     peer(request.scope))
            return Response(status_code=499)
        return CaptionResponse(results=[CaptionResult(filename=name, caption=r["caption"], captions=r["captions"])
                                        for name, r in zip(names, results)])

    app.add_middleware(Admission, cfg=cfg, state=state)
    app.add_middleware(InternalErrors)  # the last added runs first: around the admission too
    return app


FIELDS = ("images", "num_captions", "beam_size")


def _check_fields(form) -> None:
    """400 for a field the endpoint does not read (a misspelt setting would be ignored) or a setting sent twice
    (only one of its values would be used)."""
    names = [name for name, _ in form.multi_items()]
    unknown = next((n for n in names if n not in FIELDS), None)
    if unknown is not None:
        raise RequestError(400, f"Unknown form field {unknown[:64]!r}: the fields are {', '.join(FIELDS)}.")
    repeated = next((n for n in FIELDS[1:] if names.count(n) > 1), None)
    if repeated is not None:
        raise RequestError(400, f"The field {repeated!r} is given {names.count(repeated)} times: send it once.")


async def _check_request_pixels(loop, pool, names: list[str], blobs: list[bytes], cfg: ServeConfig) -> None:
    """413 when the images' headers add up to more than --max-request-pixels (read in the pool)."""
    def pixels():
        total = 0
        for name, data in zip(names, blobs):
            with open_upload(name, data, cfg.max_upload_bytes, cfg.max_pixels) as im:
                total += im.width * im.height
        return total

    total = await loop.run_in_executor(pool, pixels)
    if total > cfg.max_request_pixels:
        raise RequestError(413, f"The request's images hold {total:,} pixels in all, over the limit of "
                                f"{cfg.max_request_pixels:,} per request.")


def serve(cfg: ServeConfig, dry_run: bool = False) -> int:
    """Load the checkpoint once and serve it with uvicorn until interrupted (`dry_run`: check and return)."""
    # imported on use: importing this module stays free of torch
    from common.device import resolve_device

    path = find_checkpoint(cfg.checkpoint)
    resolve_device(cfg.device)
    if dry_run:
        # imported on use: importing this module stays free of torch
        from stage2_decoder.training.checkpoint import load_checkpoint, model_from_checkpoint

        model_from_checkpoint(load_checkpoint(path))
        click.echo(f"ok: would serve {path} on http://{cfg.host}:{cfg.port}/ (batches of up to {cfg.max_batch} "
                   f"images within {cfg.max_wait_ms:g} ms, {cfg.max_queue} images queued at most, "
                   f"{cfg.request_timeout_s:g} s per request; {cfg.max_files} files of {cfg.max_upload_mb:g} MB, "
                   f"{cfg.max_pixels:,} pixels per image and {cfg.max_request_pixels:,} per request at most)")
        return 0
    import uvicorn

    # imported on use: importing this module stays free of uvicorn
    from stage2_decoder.serving.protocol import header_timeout_protocol

    sock = listen(cfg.host, cfg.port)  # before the checkpoint loads: a port in use is one error line at once
    cap = Captioner.load(path, cfg.device)
    if cfg.encode_chunk and cap.backbone.device.type == "cpu":
        cap.backbone = ChunkedEncoder(cap.backbone, cfg.encode_chunk)
    click.echo(f"serving {cap.checkpoint_path} on http://{cfg.host}:{cfg.port}/", err=True)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    # SIGTERM: uvicorn stops accepting, answers the requests in progress, then raises the signal again
    config = uvicorn.Config(create_app(cap, cfg), host=cfg.host, port=cfg.port, access_log=cfg.access_log,
                            log_level="info" if cfg.access_log else "warning",
                            http=header_timeout_protocol(cfg.header_timeout_s), timeout_keep_alive=cfg.keep_alive_s,
                            limit_concurrency=cfg.max_connections,
                            # every request ends by its deadline, a request head by its own: a backstop
                            timeout_graceful_shutdown=cfg.request_timeout_s + cfg.header_timeout_s + 5)
    server = uvicorn.Server(config)
    try:
        with sock:
            server.run(sockets=[sock])
    except Terminated:  # drained: a requested stop, not a failure
        click.echo("stopped: every accepted request was answered", err=True)
        return 0
    if not server.started:  # the app's start-up failed: uvicorn logged why
        click.echo("error: the server did not start (the lines above say why)", err=True)
        return 3
    return 0


def listen(host: str, port: int):
    """A socket bound to (host, port) for uvicorn: OSError naming the address when it cannot be had (in use,
    not this machine's, a name that does not resolve), where uvicorn would log it and exit 3."""
    import socket

    sock = None
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: restarts reuse the port
        sock.bind(addr)
        sock.listen(2048)  # now: two servers started at once both bind with SO_REUSEADDR; only one can listen
    except OSError as e:
        if sock is not None:
            sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock
