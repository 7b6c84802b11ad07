"""The captioning web service: one page, one JSON endpoint, concurrent requests batched.

    python -m stage2_decoder.serve [--checkpoint FILE] [--host 127.0.0.1] [--port 8000] [--max-batch N]
        [--max-wait-ms T] [--max-files N] [--max-upload-mb X] [--max-pixels N] [--device D] [--dry-run]

The model is loaded once (`Captioner.load`: the caption CLI's checkpoint lookup). `GET /` is the page,
`POST /v1/caption` takes multipart files in the field `images` (form fields `num_captions`,
`beam_size`), `GET /healthz` names the checkpoint. Uploads are decoded from memory; a bad file, a
request over a limit or a bad form value gets a 4xx `{"error": "..."}` naming it, and the server goes
on. Requests are gathered by `stage2_decoder.batcher` into one model call run off the event loop.
"""
from __future__ import annotations

import contextlib
import io
import sys
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import click

from common.cli import decode_options
from stage2_decoder.decode_config import DecodeConfig  # torch-free
from starlette.requests import Request  # module level: FastAPI resolves the endpoint's annotation here

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
    max_files: int = 16  # files in one request
    max_upload_mb: float = 10.0  # bytes of one file, in MiB
    max_pixels: int = 40_000_000  # width x height of one image, read from its header before decoding
    num_captions: int = 1  # when the request does not say
    max_num_captions: int = 10
    decode: DecodeConfig = field(default_factory=DecodeConfig)  # beam_size: when the request does not say
    max_beam_size: int = 10
    device: str = "auto"
    encode_chunk: int = 4  # images per encoder pass on CPU (0: the whole batch at once)
    access_log: bool = True  # uvicorn's line per request (--no-progress turns it off)

    def __post_init__(self):
        checks = [("--port", self.port, 0, 65535), ("--max-batch", self.max_batch, 1, None),
                  ("--max-files", self.max_files, 1, None), ("--max-pixels", self.max_pixels, 1, None),
                  ("--max-wait-ms", self.max_wait_ms, 0, None), ("--encode-chunk", self.encode_chunk, 0, None), ("--max-upload-mb", self.max_upload_mb, 1e-6, None),
                  ("num_captions", self.num_captions, 1, self.max_num_captions),
                  ("--beam-size", self.decode.beam_size, 1, self.max_beam_size)]
        for name, value, lo, hi in checks:
            if value < lo or (hi is not None and value > hi):
                allowed = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
                raise ValueError(f"{name} must be {allowed}, got {value}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * MB)


class RequestError(Exception):
    """A bad request: answered with `status` and {"error": message}."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _limited_stream(request, limit: int):
    """The request body as it arrives, refused (413) as soon as it passes `limit` bytes."""
    async def stream():
        seen = 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > limit:
                raise RequestError(413, f"request body over {limit} bytes (at most {limit // MB} MiB in all)")
            yield chunk
    return stream()


async def _read_form(request, cfg: ServeConfig):
    """The multipart form, kept in memory; files past `max_files` or a body past the limits are refused."""
    from starlette.formparsers import MultiPartException, MultiPartParser

    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise RequestError(415, "send the photos as multipart/form-data, one or more files in the field 'images'")
    limit = cfg.max_files * cfg.max_upload_bytes + FORM_OVERHEAD
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body of {declared} bytes is over the limit of {limit} bytes "
                                f"({cfg.max_files} files of at most {cfg.max_upload_mb:g} MiB)")
    parser = MultiPartParser(request.headers, _limited_stream(request, limit), max_files=cfg.max_files,
                             max_fields=16, max_part_size=64 << 10)
    parser.spool_max_size = cfg.max_upload_bytes + 1  # a file stays in memory (never a named file on disk)
    try:
        return await parser.parse()
    except MultiPartException as e:
        too_many = "Too many files" in str(e)
        message = f"more than {cfg.max_files} files in one request" if too_many else f"bad multipart form: {e}"
        raise RequestError(413 if too_many else 400, message)


def _int_field(form, name: str, default: int, hi: int) -> int:
    raw = form.get(name)
    if raw is None or raw == "":
        return default
    if not isinstance(raw, str):
        raise RequestError(400, f"form field {name!r} must be a number, not a file")
    try:
        value = int(raw)
    except ValueError:
        raise RequestError(400, f"form field {name!r} must be a whole number, got {raw[:40]!r}") from None
    if not 1 <= value <= hi:
        raise RequestError(400, f"form field {name!r} must be between 1 and {hi}, got {value}")
    return value


def open_upload(name: str, data: bytes, cfg: ServeConfig, preprocess=None):
    """Upload bytes -> a PIL image opened from memory, its size checked from the header (not yet decoded).

    With the backbone's `preprocess`, a JPEG is set to decode at the reduced scale stage 1 uses for
    files (`common.backbones.load_image_views`), so an upload gets the caption its file gets.
    """
    from PIL import Image, UnidentifiedImageError

    if len(data) > cfg.max_upload_bytes:
        raise RequestError(413, f"{name}: {len(data)} bytes is over the limit of {cfg.max_upload_bytes} bytes "
                                f"({cfg.max_upload_mb:g} MiB)")
    if not data:
        raise RequestError(422, f"{name}: the file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit below decides
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise RequestError(413, f"{name}: {e}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise RequestError(415, f"{name}: not an image this server can read ({type(e).__name__})") from None
    if im.width * im.height > cfg.max_pixels:
        im.close()
        raise RequestError(413, f"{name}: {im.width}x{im.height} pixels is over the limit of {cfg.max_pixels} pixels")
    if preprocess is not None and preprocess.jpeg_draft and im.format == "JPEG":
        im.draft("RGB", (preprocess.resize, preprocess.resize))
    return im


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
    p = Path(path)
    return f"{p.parent.name}/{p.name}" if p.parent.name else p.name


def create_app(captioner, cfg: ServeConfig):
    """The FastAPI app over a loaded captioner (anything with `.caption(...)` and `.checkpoint_path`)."""
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.exceptions import HTTPException

    from stage2_decoder.batcher import BatcherConfig, DynamicBatcher
    from stage2_decoder.page import CSP, PAGE

    def run_batch(images: list, key: tuple[int, int]) -> list[dict]:
        num_captions, beam_size = key
        decode = asdict(replace(cfg.decode, beam_size=beam_size))
        try:
            return captioner.caption(images, num_captions=num_captions, batch_size=len(images), on_error="return",
                                     **decode)
        finally:
            for im in images:
                im.close()

    preprocess = getattr(getattr(captioner, "backbone", None), "preprocess", None)
    batcher = DynamicBatcher(run_batch, BatcherConfig(cfg.max_batch, cfg.max_wait_ms, cfg.batching))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        try:
            yield
        finally:
            batcher.stop()

    app = FastAPI(title="capcache", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batcher, app.state.cfg, app.state.captioner = batcher, cfg, captioner

    @app.exception_handler(RequestError)
    async def bad_request(request, e: RequestError):
        return JSONResponse({"error": str(e)}, status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code)

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):
        return JSONResponse({"error": f"internal error: {type(e).__name__}"}, status_code=500)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE, headers={"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"})

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "checkpoint": checkpoint_name(captioner.checkpoint_path)}

    @app.get("/v1/stats")
    async def stats():
        s = batcher.stats
        return {"requests": s.requests, "model_calls": s.calls, "images": s.images, "largest_batch": s.largest,
                "batching": cfg.batching, "max_batch": cfg.max_batch, "max_wait_ms": cfg.max_wait_ms}

    @app.post("/v1/caption")
    async def caption(request: Request):
        form = await _read_form(request, cfg)
        try:
            num_captions = _int_field(form, "num_captions", cfg.num_captions, cfg.max_num_captions)
            beam_size = _int_field(form, "beam_size", cfg.decode.beam_size, cfg.max_beam_size)
            files = [f for f in form.getlist("images") if not isinstance(f, str)]
            if not files:
                raise RequestError(400, "no photos: send one or more files in the multipart field 'images'")
            names, images = [], []
            try:
                for i, f in enumerate(files):
                    names.append(f.filename or f"images[{i}]")
                    images.append(open_upload(names[-1], await f.read(cfg.max_upload_bytes + 1), cfg, preprocess))
            except BaseException:
                for im in images:
                    im.close()
                raise
        finally:
            await form.close()
        results = await batcher(images, (num_captions, beam_size))
        for name, r in zip(names, results):
            if "error" in r:
                reason = str(r["error"]).split(": ", 1)[-1] if ": " in str(r["error"]) else r["error"]
                raise RequestError(422, f"{name}: not a readable image ({reason})")
        return {"results": [{"filename": name, "caption": r["caption"], "captions": r["captions"]}
                            for name, r in zip(names, results)]}

    return app


def serve(cfg: ServeConfig, dry_run: bool = False) -> int:
    """Load the checkpoint once and serve it with uvicorn until interrupted (`dry_run`: check and return)."""
    from common.device import resolve_device
    from stage2_decoder.api import find_checkpoint

    path = find_checkpoint(cfg.checkpoint)
    resolve_device(cfg.device)
    if dry_run:
        from stage2_decoder.checkpoint import load_checkpoint, model_from_checkpoint

        model_from_checkpoint(load_checkpoint(path))
        click.echo(f"ok: would serve {path} on http://{cfg.host}:{cfg.port}/ (batches of up to {cfg.max_batch} "
                   f"images within {cfg.max_wait_ms:g} ms; {cfg.max_files} files of {cfg.max_upload_mb:g} MiB "
                   f"and {cfg.max_pixels} pixels per request at most)")
        return 0
    import uvicorn

    from stage2_decoder import Captioner

    cap = Captioner.load(path, cfg.device)
    if cfg.encode_chunk and cap.backbone.device.type == "cpu":
        cap.backbone = ChunkedEncoder(cap.backbone, cfg.encode_chunk)
    click.echo(f"serving {cap.checkpoint_path} on http://{cfg.host}:{cfg.port}/", err=True)
    uvicorn.run(create_app(cap, cfg), host=cfg.host, port=cfg.port, access_log=cfg.access_log,
                log_level="info" if cfg.access_log else "warning")
    return 0


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--checkpoint", default=None, type=click.Path(),
              help="A best.pt from training (default: $CAPCACHE_CHECKPOINT, else the newest runs/*/best.pt).")
@click.option("--host", default=ServeConfig.host, show_default=True)
@click.option("--port", type=int, default=ServeConfig.port, show_default=True)
@click.option("--max-batch", type=int, default=ServeConfig.max_batch, show_default=True,
              help="Images in one model call at most.")
@click.option("--max-wait-ms", type=float, default=ServeConfig.max_wait_ms, show_default=True,
              help="How long a batch waits for more requests.")
@click.option("--batching/--no-batching", default=True, show_default=True,
              help="--no-batching: one request per model call.")
@click.option("--max-files", type=int, default=ServeConfig.max_files, show_default=True, help="Files per request.")
@click.option("--max-upload-mb", type=float, default=ServeConfig.max_upload_mb, show_default=True,
              help="Bytes of one file, in MiB.")
@click.option("--max-pixels", type=int, default=ServeConfig.max_pixels, show_default=True,
              help="Width x height of one image.")
@click.option("--num-captions", type=int, default=ServeConfig.num_captions, show_default=True,
              help="Captions per photo when a request does not say.")
@decode_options
@click.option("--device", default="auto", show_default=True)
@click.option("--encode-chunk", type=int, default=ServeConfig.encode_chunk, show_default=True,
              help="Images per encoder pass on CPU (0: the whole batch at once).")
@click.option("--dry-run", is_flag=True, help="Check the settings and the checkpoint, then exit.")
@click.option("--no-progress", is_flag=True, help="No line per request.")
def main(checkpoint, host, port, max_batch, max_wait_ms, batching, max_files, max_upload_mb, max_pixels,
         num_captions, decode, device, encode_chunk, dry_run, no_progress):
    """Serve captions over HTTP: a page at /, JSON at /v1/caption."""
    from common.cli import run_guarded

    def work():
        cfg = ServeConfig(checkpoint=checkpoint, host=host, port=port, max_batch=max_batch, max_wait_ms=max_wait_ms,
                          batching=batching, max_files=max_files, max_upload_mb=max_upload_mb, max_pixels=max_pixels,
                          num_captions=num_captions, decode=decode, device=device, encode_chunk=encode_chunk,
                          access_log=not no_progress)
        return serve(cfg, dry_run)

    sys.exit(run_guarded(work))


if __name__ == "__main__":
    main()
