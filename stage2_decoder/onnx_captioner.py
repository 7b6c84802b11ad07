"""Caption images with an ONNX export (`python -m stage2_decoder.export`): onnxruntime, numpy, Pillow; no torch.

    from stage2_decoder.onnx_captioner import OnnxCaptioner
    cap = OnnxCaptioner.load("onnx/")
    for r in cap.caption(["photo.jpg"], num_captions=3):
        print(r["image"], r["caption"], r["captions"])

Images go through stage 1's own preprocessing (common.preprocess) and the search is
`stage2_decoder.decode`'s, in numpy, so the captions are those of the PyTorch `Captioner`.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from common.bounds import check
from common.preprocess import ImageError, Preprocess, load_views
from common.vocab import Vocabulary
from stage2_decoder.api import ON_ERROR, as_image_list, chunk_results, decode_settings, load_chunk
from stage2_decoder.numpy_decode import beam_search_nbest, greedy_scored

# the export folder's format (stage2_decoder.export writes it)
ONNX_FORMAT = "capcache-onnx"
ONNX_VERSION = 1
MANIFEST = "capcache-onnx.json"
GRAPHS = ("encoder.onnx", "decoder_init.onnx", "decoder_step.onnx")


class OnnxExportError(ValueError):
    """An export folder that cannot be used; the message names the file at fault."""


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_manifest(folder: Path) -> dict:
    if not folder.is_dir():
        raise OnnxExportError(f"ONNX export folder not found: {folder}" if not folder.exists()
                              else f"{folder} is not a folder")
    path = folder / MANIFEST
    if not path.is_file():
        raise OnnxExportError(f"{path} is missing: {folder} is not a complete export "
                              f"(run python -m stage2_decoder.export --out {folder})")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise OnnxExportError(f"{path} is not readable JSON: {e}") from e
    if not isinstance(m, dict) or m.get("format") != ONNX_FORMAT:
        raise OnnxExportError(f"{path} is not a {ONNX_FORMAT} manifest")
    if m.get("version") != ONNX_VERSION:
        newer = "; it was written by a newer capcache: upgrade" if isinstance(m.get("version"), int) \
            and m["version"] > ONNX_VERSION else "; export the checkpoint again"
        raise OnnxExportError(f"{path} has {ONNX_FORMAT} version {m.get('version')!r}; this capcache reads "
                              f"version {ONNX_VERSION}{newer}")
    for key in ("vocab", "preprocess", "files", "decode"):
        if not isinstance(m.get(key), dict):
            raise OnnxExportError(f"{path} lacks {key!r}")
    return m


class OnnxCaptioner:
    """The three exported graphs, the vocabulary and the preprocessing of one export folder."""

    def __init__(self, folder: Path, manifest: dict, sessions: dict, vocab: Vocabulary, pp: Preprocess):
        self.folder, self.manifest, self.vocab, self.preprocess = folder, manifest, vocab, pp
        self.encoder, self.init, self.step_session = (sessions[n] for n in GRAPHS)

    @classmethod
    def load(cls, folder: str | os.PathLike, threads: int = 0) -> "OnnxCaptioner":
        """Check the folder (manifest, versions, checksums, sizes) and open its graphs. Raises OnnxExportError.

        threads: onnxruntime's intra-op threads (0 = its default, one per core)."""
        import onnxruntime as ort

        folder = Path(folder)
        m = _read_manifest(folder)
        mpath = folder / MANIFEST
        try:
            vocab = Vocabulary(m["vocab"]["words"], m["vocab"].get("threshold"), m.get("tokenizer") or "nltk")
            pp = Preprocess(**{k: tuple(v) if isinstance(v, list) else v for k, v in m["preprocess"].items()})
        except (KeyError, TypeError, ValueError) as e:
            raise OnnxExportError(f"{mpath}: unusable vocabulary or preprocessing: {e}") from e
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # errors only: its warnings are not the user's business
        sessions = {}
        for name in GRAPHS:
            path = folder / name
            want = (m["files"].get(name) or {}).get("sha256")
            if not path.is_file():
                raise OnnxExportError(f"{path} is missing (listed in {mpath})")
            if not want:
                raise OnnxExportError(f"{mpath} lists no sha256 for {name}")
            if sha256_file(path) != want:
                raise OnnxExportError(f"{path} differs from the file exported (sha256 mismatch with {mpath}): "
                                      f"corrupted or replaced; export again")
            try:
                sessions[name] = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            except Exception as e:  # onnxruntime raises its own Fail / InvalidProtobuf / RuntimeException
                raise OnnxExportError(f"{path} is not a loadable ONNX model: {type(e).__name__}: "
                                      f"{str(e).splitlines()[0] if str(e) else ''}") from e
        cls._check_shapes(sessions, vocab, pp, folder)
        return cls(folder, m, sessions, vocab, pp)

    @staticmethod
    def _check_shapes(sessions: dict, vocab: Vocabulary, pp: Preprocess, folder: Path) -> None:
        enc, init, step = (sessions[n] for n in GRAPHS)
        v = step.get_outputs()[0].shape[-1]
        if v != len(vocab):
            raise OnnxExportError(f"{folder / MANIFEST} has {len(vocab)} words but {folder / 'decoder_step.onnx'} "
                                  f"scores {v}: the files come from different exports")
        d_enc, d_init = enc.get_outputs()[0].shape[-1], init.get_inputs()[0].shape[-1]
        if d_enc != d_init:
            raise OnnxExportError(f"{folder / 'encoder.onnx'} gives {d_enc} features but "
                                  f"{folder / 'decoder_init.onnx'} takes {d_init}: the files come from different exports")
        if list(enc.get_inputs()[0].shape[1:]) != [3, pp.crop, pp.crop]:
            raise OnnxExportError(f"{folder / 'encoder.onnx'} takes {enc.get_inputs()[0].shape[1:]} images, "
                                  f"not the manifest's 3 x {pp.crop} x {pp.crop}")

    def features(self, images_u8: np.ndarray) -> np.ndarray:
        """(B, 3, crop, crop) uint8 -> (B, D) float32."""
        return self.encoder.run(None, {"images": np.ascontiguousarray(images_u8)})[0]

    def _step(self, tokens: np.ndarray, h: np.ndarray, c: np.ndarray):
        return tuple(self.step_session.run(None, {"tokens": tokens, "h_in": h, "c_in": c}))

    def search(self, feats: np.ndarray, beam_size: int = 3, max_len: int = 20, min_len: int = 1,
               length_penalty: float = 0.7, no_repeat_ngram: int = 0) -> list[list[tuple[list[int], float]]]:
        """(B, D) features -> per image the beam's [(ids, score)], best first (decode.beam_search_nbest;
        a beam of one without n-gram blocking decodes greedily, as the PyTorch API does)."""
        h, c = self.init.run(None, {"features": np.ascontiguousarray(feats, dtype=np.float32)})
        if beam_size == 1 and no_repeat_ngram == 0:
            return greedy_scored(self._step, h, c, self.vocab.start_id, self.vocab.end_id, max_len, min_len,
                                 length_penalty)
        return beam_search_nbest(self._step, h, c, self.vocab.start_id, self.vocab.end_id, beam_size, max_len,
                                 min_len, length_penalty, no_repeat_ngram)

    def caption(self, images: Sequence, num_captions: int = 1, beam_size: int = 3, max_len: int = 20,
                min_len: int = 1, length_penalty: float = 0.7, no_repeat_ngram: int = 0, batch_size: int = 32,
                on_error: str = "raise", sample: bool = False, **ignored) -> list[dict]:
        """One dict per image, in order: {"image", "caption", "captions": [{"caption", "score"}, ...]}, as
        the PyTorch `Captioner.caption` gives. images: file paths, PIL images, HxWx3 uint8 arrays or encoded
        bytes. on_error="return": an unreadable image gives {"image", "error"}. Settings the ONNX path has no
        use for (device, seed, temperature, top_p) are ignored; sampling is not offered."""
        if sample:
            raise ValueError("the ONNX captioner searches (beam); sampling needs the PyTorch checkpoint")
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
        decode_settings(num_captions, beam_size, max_len, min_len, length_penalty, no_repeat_ngram)  # the API's limits
        check("batch_size", batch_size)
        images = as_image_list(images)
        results: list[dict] = []
        for s in range(0, len(images), batch_size):
            chunk = images[s:s + batch_size]
            arrays, good, errors = load_chunk(chunk, s, self._load, on_error)
            decoded = {}
            if arrays:
                # the beam holds at least N hypotheses, as in the PyTorch API
                hyps = self.search(self.features(np.stack(arrays)), max(beam_size, num_captions), max_len,
                                   min_len, length_penalty, no_repeat_ngram)
                decoded = dict(zip(good, (self._format(row, num_captions) for row in hyps)))
            results += chunk_results(chunk, decoded, errors)
        return results

    def _format(self, row: list[tuple[list[int], float]], num_captions: int) -> dict:
        captions, seen = [], set()
        for ids, score in row:
            text = self.vocab.caption(ids)
            if text not in seen:  # beam alternatives are distinct captions
                seen.add(text)
                captions.append({"caption": text, "score": float(score)})
        captions = captions[:num_captions]
        return {"caption": captions[0]["caption"], "captions": captions}

    def _load(self, image, index: int) -> np.ndarray:
        """One input -> (3, crop, crop) uint8 through stage 1's preprocessing. Raises ImageError."""
        from PIL import Image

        if isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ImageError(f"images[{index}]: expected an HxWx3 uint8 array, got shape {image.shape} "
                                 f"dtype {image.dtype}")
            image = Image.fromarray(image, mode="RGB")
        if isinstance(image, (str, os.PathLike, bytes, bytearray, Image.Image)):
            name = None if isinstance(image, (str, os.PathLike)) else f"images[{index}]"
            return load_views(image, self.preprocess, 1, name=name)[0]
        raise TypeError(f"images[{index}]: expected a file path, a PIL image, encoded bytes or an HxWx3 uint8 "
                        f"array, got {type(image).__name__}")
