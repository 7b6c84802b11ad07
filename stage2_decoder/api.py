"""The Python API: caption files, PIL images or arrays with a trained checkpoint.

    from stage2_decoder import Captioner
    cap = Captioner.load()                      # $CAPCACHE_CHECKPOINT, else the newest runs/*/best.pt
    for r in cap.caption(["photo.jpg", pil_image, array], num_captions=3):
        print(r["image"], r["caption"], r["captions"])

The caption CLI, evaluation and the web service all call this class. Importing this module is cheap
(torch loads with the first model), so finding a checkpoint costs nothing. Images of every kind go through
stage 1's preprocessing (common.backbones), so their features match the cached ones.
"""
from __future__ import annotations

import functools
import io
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from common.bounds import check
from stage2_decoder.decoding.config import DecodeConfig, SampleConfig, check_bounds

CHECKPOINT_ENV = "CAPCACHE_CHECKPOINT"
FIRST_CHUNK = 4  # images in the CLI's first batch (time to the first caption of a folder: bench/caption.py)
ON_ERROR = ("raise", "return")


class NoCheckpointError(ValueError):
    """No checkpoint was named and none was found where training writes them."""

def find_checkpoint(path: str | os.PathLike | None = None) -> Path:
    """`path` if given, else $CAPCACHE_CHECKPOINT, else the newest runs/*/best.pt under the cwd (by mtime)."""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise NoCheckpointError(f"checkpoint not found: {p}" if not p.exists() else f"{p} is not a file")
        return p
    env = os.environ.get(CHECKPOINT_ENV)
    if env:
        p = Path(env)
        if not p.is_file():
            raise NoCheckpointError(f"${CHECKPOINT_ENV}={env}: no such checkpoint file")
        return p
    runs = [p for p in Path("runs").glob("*/best.pt") if p.is_file()]
    if runs:
        return max(runs, key=lambda p: p.stat().st_mtime)
    raise NoCheckpointError(f"no checkpoint found (no ${CHECKPOINT_ENV}, no runs/*/best.pt under {Path.cwd()}): "
                            f"run `make demo` (a few minutes, offline) or `make train`, or pass --checkpoint / "
                            f"set {CHECKPOINT_ENV}")


def image_label(image) -> str | None:
    """What a result's "image" says: a path as given; None for a PIL image or an array."""
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    return None


def load_chunk(chunk: Sequence, start: int, load, on_error: str) -> tuple[list, list[int], dict[int, str]]:
    """`load(image, index)` for each input of `chunk` (whose first input is images[start]): returns the loaded
    inputs, their positions in `chunk`, and {position: one-line error} for the unreadable ones; with
    on_error="raise" the first ImageError is raised instead. The PyTorch and the ONNX captioner share it."""
    from common.preprocess import ImageError  # torch-free (common.backbones re-exports it)

    loaded, good, errors = [], [], {}
    for i, im in enumerate(chunk):
        try:
            loaded.append(load(im, start + i))
            good.append(i)
        except ImageError as e:
            if on_error == "raise":
                raise
            errors[i] = " ".join(str(e).split())
    return loaded, good, errors


def default_read_threads() -> int:
    """Threads reading the next batch's files while the model works on this one: the cores less one (the
    model's thread), at most 8."""
    from common.device import usable_cores  # imported on use: importing this module stays free of torch

    return max(1, min(8, usable_cores() - 1))


def read_chunks(images: Sequence, bounds: list[tuple[int, int]], load, on_error: str, threads: int
                ) -> Iterator[tuple[Sequence, list, list[int], dict[int, str]]]:
    """(chunk, *load_chunk(chunk, ...)) for each chunk images[start:end] of `bounds`, in order. With `threads`
    > 0, the files of the next chunk are read in that many threads while the caller works on this one (JPEG
    decoding releases the GIL); PIL images and arrays are prepared on the caller's thread, as they come. The
    results, and which error is raised with on_error="raise", are those of reading one file after another."""
    if threads <= 0 or len(images) < 2:
        for s, e in bounds:
            yield (images[s:e], *load_chunk(images[s:e], s, load, on_error))
        return
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(threads, thread_name_prefix="capcache-read")

    def submit(s: int, e: int) -> dict:
        return {s + i: pool.submit(load, im, s + i) for i, im in enumerate(images[s:e])
                if isinstance(im, (str, os.PathLike))}

    def take(futures: dict):
        return lambda im, index: futures[index].result() if index in futures else load(im, index)

    try:
        ahead = submit(*bounds[0]) if bounds else {}
        for k, (s, e) in enumerate(bounds):
            current, ahead = ahead, submit(*bounds[k + 1]) if k + 1 < len(bounds) else {}
            yield (images[s:e], *load_chunk(images[s:e], s, take(current), on_error))
    finally:  # a raised error or a consumer that stops early: no file is read for nothing, no thread left behind
        pool.shutdown(wait=True, cancel_futures=True)


def chunk_results(chunk: Sequence, decoded: dict[int, dict], errors: dict[int, str]) -> list[dict]:
    """One result dict per input of `chunk`, in order: its decoded captions, or its error."""
    return [{"image": image_label(im), "error": errors[i]} if i in errors else {"image": image_label(im), **decoded[i]}
            for i, im in enumerate(chunk)]


def as_image_list(images) -> list:
    """The inputs as a list: one path (str or PathLike), PIL image or array is a list of one; a str is never
    iterated character by character."""
    import sys

    np = sys.modules.get("numpy")  # an array can only be given where numpy is already loaded
    # bytes of any kind and an open file are one input each (captioned or refused), never iterated
    single = (str, bytes, bytearray, memoryview, io.IOBase, os.PathLike) + ((np.ndarray,) if np is not None else ())
    pil = sys.modules.get("PIL.Image")
    if isinstance(images, single) or (pil is not None and isinstance(images, pil.Image)):
        return [images]
    try:
        return list(images)
    except TypeError:
        raise ValueError(f"images must be a list of file paths, PIL images or arrays, got "
                         f"{type(images).__name__}") from None


def decode_settings(num_captions: int = 1, beam_size: int = 3, max_len: int = 20, min_len: int = 1,
                    length_penalty: float = 0.7, no_repeat_ngram: int = 0, sample: bool = False,
                    temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None
                    ) -> tuple[DecodeConfig, SampleConfig]:
    """Check the decode keyword arguments (ValueError naming the one at fault) and group them."""
    dcfg = DecodeConfig(beam_size, max_len, min_len, length_penalty, no_repeat_ngram)
    scfg = SampleConfig(num_captions, sample, temperature, top_p, seed)
    check_bounds(dcfg)
    check_bounds(scfg)
    return dcfg, scfg


@functools.cache  # one hook per process
def _one_thread_in_forked_children() -> None:
    """A process that loaded a model and then forks (gunicorn --preload, a multiprocessing 'fork' pool):
    GNU OpenMP's thread pool does not survive a fork, and a child running torch on several threads hangs
    in its first pass. Children caption on one torch thread."""
    if hasattr(os, "register_at_fork"):
        import torch

        os.register_at_fork(after_in_child=lambda: torch.set_num_threads(1))


class Captioner:
    """Backbone + decoder + vocabulary, rebuilt from one self-describing checkpoint."""

    def __init__(self, backbone, decoder, vocab, checkpoint_path: str):
        self.backbone = backbone  # common.backbones.Backbone
        self.decoder = decoder  # stage2_decoder.model.CaptionDecoder, eval mode
        self.vocab = vocab  # common.vocab.Vocabulary
        self.checkpoint_path = checkpoint_path

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, device: str = "auto",
             weights: str | None = None) -> "Captioner":
        """Load `path` (None: `find_checkpoint()`); `weights` overrides the backbone weights file it names."""
        # imported on use: importing this module stays free of torch
        from stage2_decoder.training.checkpoint import load_checkpoint

        path = find_checkpoint(path)
        return cls.from_checkpoint(load_checkpoint(path), path, device, weights)

    @classmethod
    def from_checkpoint(cls, ckpt: dict, path: str | os.PathLike, device: str = "auto",
                        weights: str | None = None) -> "Captioner":
        """`load`, from a checkpoint already read from `path` (`load_checkpoint`)."""
        # imported on use: importing this module stays free of PIL, numpy, torch
        from common.backbones import BackboneError, load_backbone
        # imported on use: importing this module stays free of torch
        from common.device import resolve_device
        # imported on use: importing this module stays free of torch
        from stage2_decoder.training.checkpoint import model_from_checkpoint

        dev = resolve_device(device)
        decoder, vocab = model_from_checkpoint(ckpt, dev)
        bb = ckpt["backbone"]
        backbone = load_backbone(bb["name"], weights or bb["weights"], dev, expected_sha256=bb.get("weights_sha256"),
                                 made_with=bb["weights"])
        if backbone.feature_dim != decoder.cfg.feature_dim or bb.get("feature_dim", backbone.feature_dim) != \
                backbone.feature_dim or backbone.preprocess.describe() != bb["preprocess"]:
            raise BackboneError(f"backbone {bb['name']} built here does not match the checkpoint's "
                                f"(feature size or preprocessing differ)")
        _one_thread_in_forked_children()
        return cls(backbone, decoder, vocab, str(path))

    def caption(self, images: Sequence, num_captions: int = 1, beam_size: int = 3, max_len: int = 20,
                min_len: int = 1, length_penalty: float = 0.7, no_repeat_ngram: int = 0, sample: bool = False,
                temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None, batch_size: int = 32,
                on_error: str = "raise") -> list[dict]:
        """One dict per image, in order: {"image", "caption", "captions": [{"caption", "score"}, ...]}.

        images: file paths, PIL images or HxWx3 uint8 arrays, mixed; one path (a str or PathLike) is a list of
        one. num_captions: the N best distinct beam hypotheses (beam widened to N), or N samples with
        sample=True (decoding/config.py says what each setting does; docs/captioning.md what the scores are).
        on_error="raise": an unreadable image raises ImageError naming it; "return": its dict is {"image",
        "error"} and the others are captioned.
        """
        return list(self.caption_iter(images, batch_size, on_error, first_chunk=None, num_captions=num_captions,
                                      beam_size=beam_size,
                                      max_len=max_len, min_len=min_len, length_penalty=length_penalty,
                                      no_repeat_ngram=no_repeat_ngram, sample=sample, temperature=temperature,
                                      top_p=top_p, seed=seed))

    def caption_iter(self, images: Sequence, batch_size: int = 32, on_error: str = "raise", progress: bool = False,
                     first_chunk: int | None = FIRST_CHUNK, read_threads: int | None = None, **decode
                     ) -> Iterator[dict]:
        """`caption` (same keyword arguments), yielding each result as soon as its batch is decoded; the
        first batch holds `first_chunk` images, so a folder's first caption comes quickly (None: every
        batch holds `batch_size`, one model pass each, as `caption` does). The next batch's files are read
        in `read_threads` threads meanwhile (None: `default_read_threads()`; 0: one file after another)."""
        import torch
        from tqdm import tqdm

        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
        check("batch_size", batch_size)
        if first_chunk is not None:
            check("first_chunk", first_chunk)
        settings = decode_settings(**decode)
        images = as_image_list(images)
        bar = tqdm(total=len(images), unit="img", desc="caption", disable=not progress, leave=False)
        starts = [0, *range(min(first_chunk or batch_size, batch_size), len(images), batch_size)]
        bounds = list(zip(starts, [*starts[1:], len(images)]))
        threads = default_read_threads() if read_threads is None else read_threads
        for chunk, tensors, good, errors in read_chunks(images, bounds, self._load, on_error, threads):
            decoded = {}
            if tensors:
                feats = self.backbone.encode(torch.stack(tensors))  # (b, D)
                decoded = dict(zip(good, self._decode(feats, *settings, keys=self._sample_keys(tensors, settings))))
            yield from chunk_results(chunk, decoded, errors)
            bar.update(len(chunk))
        bar.close()

    def caption_features(self, feats: torch.Tensor, **decode) -> list[dict]:
        """(B, D) features (e.g. from the cache; a tensor or an array) -> one {"caption", "captions"} dict per row.
        ValueError for another shape (D: the checkpoint's feature size)."""
        # imported on use: importing the API stays free of torch
        import torch

        settings = decode_settings(**decode)
        if not isinstance(feats, torch.Tensor):
            try:
                feats = torch.as_tensor(feats)
            except (TypeError, ValueError, RuntimeError) as e:
                raise ValueError(f"caption_features: features must be a (B, D) tensor or array, got "
                                 f"{type(feats).__name__}") from e
        d = self.decoder.cfg.feature_dim
        if feats.dim() != 2 or feats.shape[1] != d or not feats.is_floating_point():
            raise ValueError(f"caption_features: features must be (B, {d}) floats (the checkpoint's {d}-d "
                             f"features), got {tuple(feats.shape)} {str(feats.dtype).removeprefix('torch.')}")
        if feats.device.type == "cpu":  # a caller's rows (a damaged cache decodes to empty captions); the encoder's
            bad = (~torch.isfinite(feats).all(dim=1)).nonzero()  # own output on a GPU is not read back for this
            if len(bad):
                raise ValueError(f"caption_features: {len(bad)} row(s) hold nan or inf, the first row {int(bad[0])}")
        return self._decode(feats, *settings)

    def _load(self, image, index: int) -> torch.Tensor:
        """One input -> (3, crop, crop) uint8, through stage 1's preprocessing. Raises ImageError."""
        import numpy as np
        import torch
        from PIL import Image

        # imported on use: importing this module stays free of PIL, numpy
        from common.preprocess import ImageError, load_views
        # imported on use: importing this module stays free of PIL, numpy, torch
        from common.backbones import load_image_u8

        pp = self.backbone.preprocess
        if isinstance(image, (str, os.PathLike)):
            return load_image_u8(image, pp)
        if isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ImageError(f"images[{index}]: expected an HxWx3 uint8 array, got shape {image.shape} "
                                 f"dtype {image.dtype}")
            image = Image.fromarray(image, mode="RGB")
        if isinstance(image, Image.Image):  # any failure (a lazily opened image's broken data) is its ImageError
            return torch.from_numpy(load_views(image, pp, name=f"images[{index}]")[0])
        raise TypeError(f"images[{index}]: expected a file path, a PIL image or an HxWx3 uint8 array, "
                        f"got {type(image).__name__}")

    @staticmethod
    def _sample_keys(tensors: list, settings: tuple[DecodeConfig, SampleConfig]) -> list[int] | None:
        """With sampling, what each image's draws are seeded from besides the seed: its preprocessed pixels,
        so a photo gets the same samples alone or anywhere in a folder (its features may differ in the last
        bits with the batch around it)."""
        # imported on use: importing this module stays free of numpy, torch
        from stage2_decoder.decoding.sampling import content_key

        return [content_key(t) for t in tensors] if settings[1].sample else None

    def _decode(self, feats: torch.Tensor, dcfg: DecodeConfig, scfg: SampleConfig,
                keys: list[int] | None = None) -> list[dict]:
        """(B, D) features -> per row {"caption", "captions"}: decoding.captions.decode_features."""
        # imported on use: importing the API stays free of torch
        from stage2_decoder.decoding.captions import decode_features

        return decode_features(self.decoder, self.vocab, feats, dcfg, scfg, keys)
