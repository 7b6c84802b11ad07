"""Export a checkpoint as ONNX graphs (encoder; decoder init + one step) checked against PyTorch.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from common.atomic import atomic_path, atomic_write
from common.lock import hold_folder
from common.preprocess import image_contract
from common.tokenizer import join_tokens
from stage2_decoder.api import Captioner, find_checkpoint
from stage2_decoder.decoding.config import DecodeConfig
from stage2_decoder.serving.onnx_captioner import GRAPHS, MANIFEST, ONNX_FORMAT, ONNX_VERSION, sha256_file


OPSET = 17


@dataclass
class ExportConfig:
    checkpoint: str | None = None  # None: stage2_decoder.api.find_checkpoint (the caption CLI's lookup)
    out: str = "onnx"
    weights: str | None = None  # backbone weights file, if it moved since extraction

    def out_folder(self) -> Path:
        """--out as a folder it can be: not empty text (that would be the current folder), not a file."""
        if not str(self.out).strip():
            raise ValueError("--out is empty: name the folder for the ONNX files")
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise NotADirectoryError(f"--out {out} exists and is not a folder")
        return out


def text_rule(tokenizer: str) -> dict:
    """How the step graph's word ids become the caption text (`Vocabulary.caption`), as plain values."""

    return {"tokenizer": tokenizer, "join": join_tokens(["", ""], tokenizer),
            "rule": "start from the first generated id; stop at <end> (not included); skip <pad> and <start>; "
                    "map each id to vocab.words[id]; join the words with `join` (\"\" for the chars tokenizer, "
                    "one space otherwise); the step graph never chooses <pad>, <start> or <unk>"}


def export_modules(cap):
    """The three exported computations as nn.Modules (built here: torch is imported lazily)."""
    import torch
    from torch import nn

    class Encoder(nn.Module):
        def __init__(self, backbone):
            super().__init__()
            self.model = backbone.model.to(memory_format=torch.contiguous_format)
            pp = backbone.preprocess
            self.register_buffer("mean", torch.tensor(pp.mean).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(pp.std).view(1, 3, 1, 1))

        def forward(self, images):  # (B, 3, crop, crop) uint8 -> (B, D), as Backbone.encode on the CPU
            return self.model((images.float() / 255 - self.mean) / self.std).float()

    class Init(nn.Module):
        def __init__(self, decoder):
            super().__init__()
            self.decoder = decoder

        def forward(self, features):  # (B, D) -> h, c (L, B, H)
            return self.decoder.init_state(features)

    class Step(nn.Module):
        def __init__(self, decoder):
            super().__init__()
            self.decoder = decoder

        def forward(self, tokens, h, c):  # (B,), (L, B, H) x 2 -> logp (B, V), h, c
            logp, (h, c) = self.decoder.step(tokens, (h, c))
            return logp, h, c

    return Encoder(cap.backbone), Init(cap.decoder), Step(cap.decoder)


def check_outputs(name: str, path: Path, module, args: tuple, inputs: list[str]) -> None:
    """Run the written graph with onnxruntime on the example inputs: it must compute what the module does."""
    import numpy as np
    import onnxruntime as ort
    import torch

    with torch.inference_mode():
        want = module(*args)
    want = [t.numpy() for t in (want if isinstance(want, tuple) else (want,))]
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {k: a.numpy() for k, a in zip(inputs, args)})
    for w, g in zip(want, got):
        finite = np.isfinite(w)  # the step's masked words are -inf on both sides
        if g.shape != w.shape or not np.array_equal(finite, np.isfinite(g)) or \
                not np.allclose(g[finite], w[finite], rtol=1e-3, atol=1e-4 * max(1.0, float(np.abs(w[finite]).max()))):
            raise ValueError(f"the exported {name} does not compute what the PyTorch model does "
                             f"(onnxruntime {ort.__version__}): export not kept")


def _weights_sha256(backbone: dict) -> str | None:
    """The backbone weights file's sha256: a --weights file's (recorded at extraction), else that of the
    torchvision file the default weights load from; None for random ("none") weights."""
    if backbone.get("weights_sha256"):
        return backbone["weights_sha256"]
    if backbone.get("weights") in (None, "none"):
        return None
    import torchvision

    # imported on use: importing this module stays free of torch
    from common.backbones import get_spec, hub_checkpoint_dir

    url = torchvision.models.get_weight(get_spec(backbone["name"]).weights).url
    path = hub_checkpoint_dir() / url.rsplit("/", 1)[-1]
    if not path.is_file():
        raise FileNotFoundError(f"the {backbone['name']} weights file {path} is missing: it was read to build the "
                                f"encoder, so it should be there")
    return sha256_file(path)


def _self_contained(name: str, path: Path) -> None:
    """The graph holds all its tensors (no external data file): the manifest vouches for one file per graph."""
    import onnx

    def tensors(graph):  # initializers and constant attributes, subgraphs included
        yield from graph.initializer
        for node in graph.node:
            for a in node.attribute:
                yield from ([a.t] if a.HasField("t") else []) + list(a.tensors)
                for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    yield from tensors(g)

    model = onnx.load(str(path), load_external_data=False)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in tensors(model.graph)):
        raise ValueError(f"the exported {name} keeps tensors in external data files (a graph over 2 GB): "
                         f"not supported by this export")


def export(cfg: ExportConfig) -> Path:
    """Write the ONNX folder for `cfg.checkpoint`; returns the manifest's path."""
    # imported on use: importing this module stays free of torch
    from stage2_decoder.training.checkpoint import load_checkpoint

    out = cfg.out_folder()
    ckpt_path = find_checkpoint(cfg.checkpoint)  # None: $CAPCACHE_CHECKPOINT, else the newest runs/*/best.pt
    ckpt = load_checkpoint(ckpt_path)
    cap = Captioner.load(ckpt_path, "cpu", cfg.weights)
    out.mkdir(parents=True, exist_ok=True)
    # two exports into one folder would interleave their graphs under one manifest
    with hold_folder(out, "ONNX folder"):
        _remove_stale_stages(out)
        # every graph is made and checked in a folder of its own inside `out`: a failed export leaves an earlier one
        stage = Path(tempfile.mkdtemp(prefix=f"{STAGE_PREFIX}{os.getpid()}-", dir=out))
        try:
            manifest = _export_into(stage, cfg, ckpt_path, ckpt, cap)
            (out / MANIFEST).unlink(missing_ok=True)  # the folder is incomplete until the new manifest lands
            for name in GRAPHS:
                os.replace(stage / name, out / name)
            return atomic_write(out / MANIFEST, json.dumps(manifest, indent=1, ensure_ascii=False) + "\n",
                                what="ONNX manifest")
        finally:
            shutil.rmtree(stage, ignore_errors=True)


STAGE_PREFIX = ".export-"  # + the exporting process's pid + a random part: its staging folder inside --out


def _remove_stale_stages(out: Path) -> None:
    """Staging folders of exports that were killed (their process is gone): a graph set each, never cleaned."""
    for d in out.glob(f"{STAGE_PREFIX}*"):
        pid = d.name[len(STAGE_PREFIX):].split("-")[0]
        if not pid.isdigit() or d.is_symlink() or not d.is_dir():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except OSError:  # another user's live process
            pass


def _export_into(out: Path, cfg: ExportConfig, ckpt_path: Path, ckpt: dict, cap: Captioner) -> dict:
    """The three graphs written and checked into `out`; returns their manifest."""
    import onnx
    import torch

    encoder, init, step = export_modules(cap)
    pp, dcfg = cap.backbone.preprocess, cap.decoder.cfg
    b = 2  # example batch; every batch axis is dynamic
    gen = torch.Generator().manual_seed(0)  # example inputs, also used to check each graph against torch
    images = torch.randint(0, 256, (b, 3, pp.crop, pp.crop), dtype=torch.uint8, generator=gen)
    features = torch.rand(b, dcfg.feature_dim, generator=gen)
    h = torch.rand(dcfg.num_layers, b, dcfg.hidden_size, generator=gen) - 0.5
    tokens = torch.tensor([cap.vocab.start_id, cap.vocab.end_id + 2][:b])
    specs = {
        "encoder.onnx": (encoder, (images,), ["images"], ["features"],
                         {"images": {0: "batch"}, "features": {0: "batch"}}),
        "decoder_init.onnx": (init, (features,), ["features"], ["h", "c"],
                              {"features": {0: "batch"}, "h": {1: "batch"}, "c": {1: "batch"}}),
        "decoder_step.onnx": (step, (tokens, h, h.clone()), ["tokens", "h_in", "c_in"], ["logp", "h", "c"],
                              {"tokens": {0: "batch"}, "h_in": {1: "batch"}, "c_in": {1: "batch"},
                               "logp": {0: "batch"}, "h": {1: "batch"}, "c": {1: "batch"}}),
    }
    digests = {}
    for name, (module, args, inputs, outputs, axes) in specs.items():
        module.eval()
        with atomic_path(out / name, what="ONNX graph") as tmp, torch.no_grad(), warnings.catch_warnings():
            # the TorchScript exporter: the dynamo one needs onnxscript, and this one is offline and exact.
            # Its deprecation notice and its LSTM batch-size hint (the zero initial state follows the
            # input's batch: tests run other batch sizes) are not the user's concern
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(tmp), input_names=inputs, output_names=outputs,
                              dynamic_axes=axes, opset_version=OPSET, dynamo=False, do_constant_folding=True)
            try:
                onnx.checker.check_model(str(tmp), full_check=True)
            except onnx.checker.ValidationError as e:
                raise ValueError(f"the exported {name} fails onnx.checker: {e}") from e
            _self_contained(name, tmp)
            check_outputs(name, tmp, module, args, inputs)
        digests[name] = {"sha256": sha256_file(out / name), "bytes": (out / name).stat().st_size,
                         "external_data": []}

    manifest = {
        "format": ONNX_FORMAT, "version": ONNX_VERSION,
        "checkpoint": ckpt_path.name,
        "vocab": {"words": list(cap.vocab.itos), "threshold": cap.vocab.threshold},
        "tokenizer": ckpt["vocab"].get("tokenizer"),
        "preprocess": json.loads(pp.describe()),
        "image": image_contract(pp),
        "text": text_rule(cap.vocab.tokenizer),
        "decode": asdict(DecodeConfig()),
        "backbone": {**{k: v for k, v in ckpt["backbone"].items() if isinstance(v, (str, int, float, type(None)))},
                     "weights_sha256": _weights_sha256(ckpt["backbone"])},
        "decoder": asdict(dcfg),
        "special_ids": {"pad": cap.vocab.pad_id, "start": cap.vocab.start_id, "end": cap.vocab.end_id,
                        "unk": cap.vocab.unk_id},
        "files": {name: digests[name] for name in GRAPHS},
        "opset": OPSET,
    }
    return manifest
