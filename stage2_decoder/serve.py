"""The captioning web service: one page, one typed JSON endpoint, concurrent requests batched.

    python -m stage2_decoder.serve [--checkpoint FILE] [--host 127.0.0.1] [--port 8000] [--max-batch N]
        [--max-wait-ms T] [--max-queue N] [--request-timeout-s S] [--max-files N] [--max-upload-mb X]
        [--max-pixels N] [--decode-workers N] [--device D] [--dry-run] ...   (docs/serving.md: all settings)

The model is loaded once (`Captioner.load`: the caption CLI's checkpoint lookup). `GET /` is the page,
`POST /v1/caption` takes multipart files in the field `images` (form fields `num_captions`,
`beam_size`), `GET /healthz` names the checkpoint, `/openapi.json` and `/docs` describe the API. A
request is admitted only while the queue has room (else 503 + Retry-After at once); its files are
decoded and preprocessed in a small thread pool; its images join a batch of `stage2_decoder.serving.batcher`,
run in one model call off the event loop; a client that leaves or a request past its deadline is
dropped before the model sees it. Every refusal is a 4xx/5xx `{"error": "..."}` in one sentence.
"""
import sys

import click

from common.cli import decode_options, run_guarded
from stage2_decoder.serving.app import serve
from stage2_decoder.serving.settings import ServeConfig  # noqa: F401 - re-exported: the service's config


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--checkpoint", default=None, type=click.Path(),
              help="A best.pt from training (default: $CAPCACHE_CHECKPOINT, else the newest runs/*/best.pt).")
@click.option("--host", default=ServeConfig.host, show_default=True)
@click.option("--port", type=int, default=ServeConfig.port, show_default=True)
@click.option("--max-batch", type=int, default=ServeConfig.max_batch, show_default=True,
              help="Images in one model call at most.")
@click.option("--max-wait-ms", type=float, default=ServeConfig.max_wait_ms, show_default=True,
              help="How long a batch waits for more requests (0-10000).")
@click.option("--batching/--no-batching", default=True, show_default=True,
              help="--no-batching: one request per model call.")
@click.option("--max-queue", type=int, default=ServeConfig.max_queue, show_default=True,
              help="Images accepted and not yet answered; beyond: 503 with Retry-After.")
@click.option("--request-timeout-s", type=float, default=ServeConfig.request_timeout_s, show_default=True,
              help="A request not answered by then gets 503/504 and is dropped.")
@click.option("--max-files", type=int, default=ServeConfig.max_files, show_default=True, help="Files per request.")
@click.option("--max-upload-mb", type=float, default=ServeConfig.max_upload_mb, show_default=True,
              help="Bytes of one file, in MiB.")
@click.option("--max-pixels", type=int, default=ServeConfig.max_pixels, show_default=True,
              help="Width x height of one image.")
@click.option("--max-request-pixels", type=int, default=ServeConfig.max_request_pixels, show_default=True,
              help="Width x height summed over one request's images.")
@click.option("--decode-workers", type=int, default=ServeConfig.decode_workers, show_default=True,
              help="Threads decoding uploads.")
@click.option("--header-timeout-s", type=float, default=ServeConfig.header_timeout_s, show_default=True,
              help="Close a connection whose request head is not in by then.")
@click.option("--keep-alive-s", type=float, default=ServeConfig.keep_alive_s, show_default=True,
              help="Close an idle keep-alive connection after this.")
@click.option("--max-connections", type=int, default=ServeConfig.max_connections, show_default=True,
              help="Connections and requests in progress; beyond: a plain 503.")
@click.option("--num-captions", type=int, default=ServeConfig.num_captions, show_default=True,
              help="Captions per photo when a request does not say.")
@decode_options
@click.option("--device", default="auto", show_default=True)
@click.option("--encode-chunk", type=int, default=ServeConfig.encode_chunk, show_default=True,
              help="Images per encoder pass on CPU (0: the whole batch at once).")
@click.option("--encode-threads", type=int, default=ServeConfig.encode_threads, show_default=True,
              help="CPU encoder passes at once with batching on (0: one per core).")
@click.option("--dry-run", is_flag=True, help="Check the settings and the checkpoint, then exit.")
@click.option("--no-progress", is_flag=True, help="No line per request.")
def main(checkpoint, host, port, max_batch, max_wait_ms, batching, max_queue, request_timeout_s, max_files,
         max_upload_mb, max_pixels, max_request_pixels, decode_workers, header_timeout_s, keep_alive_s,
         max_connections, num_captions, decode, device, encode_chunk, encode_threads, dry_run, no_progress):
    """Serve captions over HTTP: a page at /, JSON at /v1/caption, the API at /docs."""

    try:
        cfg = ServeConfig(checkpoint=checkpoint, host=host, port=port, max_batch=max_batch, max_wait_ms=max_wait_ms,
                          batching=batching, max_queue=max_queue, request_timeout_s=request_timeout_s,
                          max_files=max_files, max_upload_mb=max_upload_mb, max_pixels=max_pixels,
                          max_request_pixels=max_request_pixels, decode_workers=decode_workers,
                          header_timeout_s=header_timeout_s, keep_alive_s=keep_alive_s,
                          max_connections=max_connections, num_captions=num_captions, decode=decode, device=device,
                          encode_chunk=encode_chunk, encode_threads=encode_threads, access_log=not no_progress)
    except ValueError as e:  # a setting out of range is a usage error
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    sys.exit(run_guarded(lambda: serve(cfg, dry_run)))


if __name__ == "__main__":
    main()
