"""Caption images with an ONNX export (`python -m stage2_decoder.export`): onnxruntime, numpy, Pillow; no torch.

    from stage2_decoder.serving.onnx_captioner import OnnxCaptioner
    cap = OnnxCaptioner.load("onnx/")
    for r in cap.caption(["photo.jpg"], num_captions=3):
        print(r["image"], r["caption"], r["captions"])

Images go through stage 1's own preprocessing (common.preprocess) and the search is
`stage2_decoder.decoding.beam`'s, in numpy, so the captions are those of the PyTorch `Captioner`.
"""
from __future__ import annotations

import hashlib
import math
import os
import stat
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from common.bounds import check
from common.jsonio import JSONFileError, read_json
from common.preprocess import MAX_ASPECT, ImageError, Preprocess, image_contract, load_views
from common.tokenizer import join_tokens
from common.vocab import Vocabulary
from stage2_decoder.api import ON_ERROR, as_image_list, chunk_results, decode_settings, load_chunk
from stage2_decoder.decoding.numpy_decode import beam_search_nbest, greedy_scored

# the export folder's format (stage2_decoder.export writes it)
ONNX_FORMAT = "capcache-onnx"
ONNX_VERSION = 2  # 2: the image contract, the text rule, external data files and sizes in the manifest
MANIFEST = "capcache-onnx.json"
GRAPHS = ("encoder.onnx", "decoder_init.onnx", "decoder_step.onnx")
MANIFEST_MAX_BYTES = 16 * 2**20  # a 100,000-word vocabulary is ~2 MB of JSON
MANIFEST_MAX_DEPTH = 8  # the manifest nests 4 levels
MAX_FILE_BYTES = 64 * 2**30  # one graph or external data file (ResNet-152's encoder is ~240 MB)
# (low, high) of every number the manifest sets: a value outside is a damaged or hostile manifest, refused
# before anything is allocated from it (resize sets the size of every intermediate image)
LIMITS = {
    "preprocess.resize": (1, 2048), "preprocess.crop": (1, 2048),
    "decode.beam_size": (1, 64), "decode.max_len": (1, 512), "decode.min_len": (0, 512),
    "decode.length_penalty": (-10.0, 10.0), "decode.no_repeat_ngram": (0, 512),
}


# each graph's inputs and outputs: (name, element type, rank), as onnx_export writes them
INTERFACE = {
    "encoder.onnx": ((("images", "tensor(uint8)", 4),), (("features", "tensor(float)", 2),)),
    "decoder_init.onnx": ((("features", "tensor(float)", 2),), (("h", "tensor(float)", 3), ("c", "tensor(float)", 3))),
    "decoder_step.onnx": ((("tokens", "tensor(int64)", 1), ("h_in", "tensor(float)", 3), ("c_in", "tensor(float)", 3)),
                          (("logp", "tensor(float)", 2), ("h", "tensor(float)", 3), ("c", "tensor(float)", 3))),
}


def _described(io) -> str:
    return ", ".join(f"{n} {t.removeprefix('tensor(').removesuffix(')')} of rank {r}" for n, t, r in io) or "none"


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
        raise OnnxExportError(f"ONNX export folder not found: {folder}" if not os.path.lexists(folder)
                              else f"{folder} is not a folder")
    path = folder / MANIFEST
    if not os.path.lexists(path):  # (lexists: never an error; exists raises on a folder that cannot be searched)
        raise OnnxExportError(f"{path} is missing: {folder} is not a complete export "
                              f"(run python -m stage2_decoder.export --out {folder})")
    _inside(folder, MANIFEST, path)
    try:
        m = read_json(path, "ONNX manifest", dict, max_bytes=MANIFEST_MAX_BYTES, max_depth=MANIFEST_MAX_DEPTH)
    except (JSONFileError, OSError) as e:
        raise OnnxExportError(str(e) if isinstance(e, JSONFileError) else f"{path} is not readable: {e}") from e
    if m.get("format") != ONNX_FORMAT:
        raise OnnxExportError(f"{path} is not a {ONNX_FORMAT} manifest")
    if m.get("version") != ONNX_VERSION:
        newer = "; it was written by a newer capcache: upgrade" if type(m.get("version")) is int \
            and m["version"] > ONNX_VERSION else "; export the checkpoint again"
        raise OnnxExportError(f"{path} has {ONNX_FORMAT} version {m.get('version')!r}; this capcache reads "
                              f"version {ONNX_VERSION}{newer}")
    for key in ("vocab", "preprocess", "files", "decode", "image", "text"):
        if not isinstance(m.get(key), dict):
            raise OnnxExportError(f"{path} lacks {key!r}")
    _check_numbers(m, path)
    return m


def _check_numbers(m: dict, path: Path) -> None:
    """Every number the manifest sets is of its type and within LIMITS; one error naming the field."""
    for key, (lo, hi) in LIMITS.items():
        section, name = key.split(".")
        if name not in m[section]:
            raise OnnxExportError(f"{path} lacks {key}")
        v = m[section][name]
        ok = type(v) is int if isinstance(lo, int) else type(v) in (int, float) and math.isfinite(v)
        if not ok or not lo <= v <= hi:
            kind = "an integer" if isinstance(lo, int) else "a number"
            raise OnnxExportError(f"{path}: {key} must be {kind} in {lo}..{hi}, got {v!r:.40}")
    pp = m["preprocess"]
    if pp["crop"] > pp["resize"]:
        raise OnnxExportError(f"{path}: preprocess.crop {pp['crop']} exceeds preprocess.resize {pp['resize']}")
    for key in ("mean", "std"):
        v = pp.get(key)
        if not (isinstance(v, list) and len(v) == 3 and all(type(x) in (int, float) and math.isfinite(x) for x in v)
                and (key == "mean" or all(0 < x <= 10 for x in v))):
            raise OnnxExportError(f"{path}: preprocess.{key} must be 3 finite numbers"
                                  f"{' in (0, 10]' if key == 'std' else ''}, got {v!r:.80}")
    if pp.get("interpolation") != "bilinear" \
            or not all(type(pp.get(k)) is bool for k in ("jpeg_draft", "exif_transpose")):
        raise OnnxExportError(f"{path}: preprocess must be bilinear with true/false jpeg_draft and exif_transpose")
    if m["image"].get("max_aspect") != MAX_ASPECT \
            or m["image"].get("transparency_background") != [255, 255, 255]:
        raise OnnxExportError(f"{path} was made under other image rules (max_aspect, transparency_background) than "
                              f"this capcache applies; export the checkpoint again")
    tokenizer = m.get("tokenizer") or "nltk"
    if m["text"].get("tokenizer") != tokenizer or m["text"].get("join") != join_tokens(["", ""], tokenizer):
        raise OnnxExportError(f"{path}: text.tokenizer and text.join do not match the tokenizer {tokenizer!r:.40}")
    if m.get("special_ids") != {"pad": Vocabulary.pad_id, "start": Vocabulary.start_id, "end": Vocabulary.end_id,
                                "unk": Vocabulary.unk_id}:
        raise OnnxExportError(f"{path}: special_ids must be {{pad: 0, start: 1, end: 2, unk: 3}}, "
                              f"got {m.get('special_ids')!r:.80}")


def _inside(folder: Path, name: object, path: Path) -> str:
    """A file the manifest names must be a plain name of a regular file that really lies in `folder`:
    a symlink out of it (or `..`) would make the export read, and vouch for, a file it does not hold."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise OnnxExportError(f"{folder / MANIFEST} names {name!r:.80}, which is not a file name in {folder}")
    real, root = os.path.realpath(path), os.path.realpath(folder)
    if os.path.dirname(real) != root:
        raise OnnxExportError(f"{path} points outside the export folder ({real}): refused")
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        raise OnnxExportError(f"{path} is missing (listed in {folder / MANIFEST})") from None
    except OSError as e:  # a symlink loop, a folder that cannot be searched
        raise OnnxExportError(f"{path} cannot be read: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        raise OnnxExportError(f"{path} is not a regular file")
    return real


def _verified_bytes(folder: Path, name: str, entry: object) -> bytes:
    """A manifest-named file's bytes, read once and checked against the manifest's sha256 and size (the bytes
    checked are the bytes used: nothing can swap the file between the check and the load)."""
    mpath = folder / MANIFEST
    path = folder / name
    real = _inside(folder, name, path)
    want = entry.get("sha256") if isinstance(entry, dict) else None
    size = entry.get("bytes") if isinstance(entry, dict) else None
    if not isinstance(want, str) or len(want) != 64:
        raise OnnxExportError(f"{mpath} lists no sha256 for {name}")
    if type(size) is not int or not 0 < size <= MAX_FILE_BYTES:
        raise OnnxExportError(f"{mpath} lists no size (1..{MAX_FILE_BYTES:,} bytes) for {name}, got {size!r:.40}")
    # O_NOFOLLOW: a symlink swapped in after the check is refused, not followed
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise OnnxExportError(f"{path} cannot be opened: {e.strerror}") from e
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise OnnxExportError(f"{path} is not a regular file")
        data = f.read(size + 1)
    if len(data) != size or hashlib.sha256(data).hexdigest() != want:
        raise OnnxExportError(f"{path} differs from the file exported (sha256 or size mismatch with {mpath}): "
                              f"corrupted or replaced; export again")
    return data


def _session(folder: Path, name: str, files: dict, opts_for):
    """One graph's onnxruntime session, from verified bytes; its external data (if the manifest lists any)
    from verified bytes too, and nothing else from disk."""
    import onnxruntime as ort

    mpath = folder / MANIFEST
    entry = files.get(name)
    graph = _verified_bytes(folder, name, entry)
    external = entry.get("external_data", [])
    if not isinstance(external, list) or not all(isinstance(ext, str) for ext in external):
        raise OnnxExportError(f"{mpath}: files.{name}.external_data must be a list of file names")
    buffers = {}
    for ext in external:
        if ext not in files or ext in GRAPHS:
            raise OnnxExportError(f"{mpath}: {name}'s external data {ext!r:.80} has no entry of its own in files")
        buffers[ext] = np.frombuffer(_verified_bytes(folder, ext, files[ext]), dtype=np.uint8)
    opts = opts_for()
    # a graph loaded from bytes would otherwise read unlisted external data from the working directory: point
    # onnxruntime at a folder that cannot exist (a path below the manifest file)
    opts.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                  os.path.join(os.path.realpath(mpath), "none"))
    if buffers:
        names = list(buffers)
        opts.add_external_initializers_from_files_in_memory(names, [buffers[n] for n in names],
                                                            [len(buffers[n]) for n in names])
    try:
        return ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"]), buffers
    except Exception as e:  # onnxruntime raises its own Fail / InvalidProtobuf / RuntimeException
        msg = str(e).splitlines()[0] if str(e) else ""
        if "xternal" in msg:
            raise OnnxExportError(f"{folder / name} uses external data that {mpath} does not list for it "
                                  f"({msg}): refused") from e
        raise OnnxExportError(f"{folder / name} is not a loadable ONNX model: {type(e).__name__}: {msg}") from e


class OnnxCaptioner:
    """The three exported graphs, the vocabulary and the preprocessing of one export folder."""

    def __init__(self, folder: Path, manifest: dict, sessions: dict, vocab: Vocabulary, pp: Preprocess):
        self.folder, self.manifest, self.vocab, self.preprocess = folder, manifest, vocab, pp
        self.encoder, self.init, self.step_session = (sessions[n] for n in GRAPHS)

    @classmethod
    def load(cls, folder: str | os.PathLike, threads: int = 0) -> "OnnxCaptioner":
        """Check the folder (manifest, versions, bounds, checksums of every file, sizes) and open its graphs.
        Raises OnnxExportError.

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
        # the image rules a deployer implements must be the ones this captioner applies (from `preprocess`)
        want, have = image_contract(pp), m["image"]
        rules = ("resize", "crop", "interpolation", "jpeg_draft_size", "exif_transpose", "transparency_background",
                 "max_aspect")
        differ = [k for k in rules if have.get(k) != want[k]]
        if not isinstance(have.get("input"), dict) or any(have["input"].get(k) != want["input"][k]
                                                          for k in ("name", "shape", "dtype")):
            differ.append("input")
        if differ:
            raise OnnxExportError(f"{mpath}: its image rules ({', '.join(differ)}) are not its preprocessing's: the "
                                  f"manifest contradicts itself; export the checkpoint again")
        if type(threads) is not int or not 0 <= threads <= 4096:
            raise ValueError(f"threads must be a whole number in 0..4096 (0: onnxruntime's default), got {threads!r:.40}")

        def opts_for():
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            opts.log_severity_level = 3  # errors only: its warnings are not the user's business
            return opts

        sessions, external = {}, []
        for name in GRAPHS:
            if name not in m["files"]:
                raise OnnxExportError(f"{mpath} does not list {name}")
            sessions[name], buffers = _session(folder, name, m["files"], opts_for)
            external.append(buffers)
        cls._check_shapes(sessions, vocab, pp, folder)
        cap = cls(folder, m, sessions, vocab, pp)
        cap._external = external  # onnxruntime may keep pointing into the external data it was handed
        return cap

    @staticmethod
    def _check_shapes(sessions: dict, vocab: Vocabulary, pp: Preprocess, folder: Path) -> None:
        for name in GRAPHS:  # names, element types and ranks first: the dimensions below are read by position
            s = sessions[name]
            for kind, want, have in (("inputs", INTERFACE[name][0], s.get_inputs()),
                                     ("outputs", INTERFACE[name][1], s.get_outputs())):
                got = [(a.name, a.type, len(a.shape or ())) for a in have]
                if got != list(want):
                    raise OnnxExportError(f"{folder / name} has {kind} {_described(got)}, not the export's "
                                          f"{_described(want)}: the file is not this export's")
        enc, init, step = (sessions[n] for n in GRAPHS)
        state = [init.get_outputs()[i].shape for i in (0, 1)] + [step.get_inputs()[i].shape for i in (1, 2)] \
            + [step.get_outputs()[i].shape for i in (1, 2)]
        if any((s[0], s[2]) != (state[0][0], state[0][2]) or not isinstance(s[2], int) for s in state):
            raise OnnxExportError(f"{folder / 'decoder_init.onnx'} and {folder / 'decoder_step.onnx'} do not share "
                                  f"one LSTM state shape ({', '.join(str(s) for s in state)}): the files come from "
                                  f"different exports")
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
        return self._run("encoder.onnx", self.encoder, {"images": np.ascontiguousarray(images_u8)})[0]

    def _step(self, tokens: np.ndarray, h: np.ndarray, c: np.ndarray):
        return tuple(self._run("decoder_step.onnx", self.step_session, {"tokens": tokens, "h_in": h, "c_in": c}))

    def _run(self, name: str, session, feeds: dict) -> list:
        """session.run; onnxruntime's own errors (a graph that cannot run: other shapes inside, memory it cannot
        have) as one OnnxExportError naming the file."""
        try:
            return session.run(None, feeds)
        except Exception as e:  # noqa: BLE001 - onnxruntime's pybind errors share no base class of their own
            raise OnnxExportError(f"{self.folder / name} failed to run: {type(e).__name__}: "
                                  f"{' '.join(str(e).split())[:300]}") from None

    def search(self, feats: np.ndarray, beam_size: int = 3, max_len: int = 20, min_len: int = 1,
               length_penalty: float = 0.7, no_repeat_ngram: int = 0) -> list[list[tuple[list[int], float]]]:
        """(B, D) features -> per image the beam's [(ids, score)], best first (decode.beam_search_nbest;
        a beam of one without n-gram blocking decodes greedily, as the PyTorch API does)."""
        h, c = self._run("decoder_init.onnx", self.init, {"features": np.ascontiguousarray(feats, dtype=np.float32)})
        if beam_size == 1 and no_repeat_ngram == 0:
            return greedy_scored(self._step, h, c, self.vocab.start_id, self.vocab.end_id, max_len, min_len,
                                 length_penalty)
        return beam_search_nbest(self._step, h, c, self.vocab.start_id, self.vocab.end_id, beam_size, max_len,
                                 min_len, length_penalty, no_repeat_ngram)

    def caption(self, images: Sequence, num_captions: int = 1, beam_size: int = 3, max_len: int = 20,
                min_len: int = 1, length_penalty: float = 0.7, no_repeat_ngram: int = 0, batch_size: int = 32,
                on_error: str = "raise", sample: bool = False, temperature: float | None = None,
                top_p: float | None = None, seed: int | None = None, device: str | None = None) -> list[dict]:
        """One dict per image, in order: {"image", "caption", "captions": [{"caption", "score"}, ...]}, as
        the PyTorch `Captioner.caption` gives. images: file paths, PIL images, HxWx3 uint8 arrays or encoded
        bytes. on_error="return": an unreadable image gives {"image", "error"}. Settings the ONNX path has no
        use for (device, seed, temperature, top_p) are ignored; sampling is not offered; any other name
        (a typo) is a TypeError, as in `Captioner.caption`."""
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
