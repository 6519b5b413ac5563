"""Whole evaluations: a sample batch against a reference batch, and reference batches from images.

The flow is the ADM evaluator's: reference activations (needed for precision/recall) and its
statistics (the file's precomputed ``mu``/``sigma``/``mu_s``/``sigma_s`` when present, else
computed), the same for the samples, then IS, FID, sFID, precision and recall.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ..errors import check_choice, check_int
from ..files import check_output_file
from .inception import POOL_DIM, compute_activations, get_extractor
from .npz import NpzBatch, read_image_folder, read_npz, write_npz
from .scores import Statistics, _scipy_linalg, compute_statistics, frechet_distance, inception_score, precision_recall

__all__ = ["evaluate", "make_reference", "load_logits_weight", "activations_of", "PR_NEIGHBOURS"]

PR_NEIGHBOURS = 3  # k of the evaluator's precision/recall
METHODS = ("factor", "sqrtm")  # frechet_distance's methods


def _check_dependencies(device, scipy: bool, pillow: bool) -> None:
    """Everything the evaluation needs, checked before the Inception pass; one ImportError (or
    FileNotFoundError for the weights alone) listing every missing piece with its install command.
    Loads the Inception network (cached per device): its file and checksum are checked here too."""
    import importlib.util

    missing = []
    if scipy:
        try:
            _scipy_linalg()
        except ImportError:
            missing.append("SciPy (the Frechet distance): pip install scipy")
    if pillow and importlib.util.find_spec("PIL") is None:
        missing.append("Pillow (reading an image folder): pip install pillow")
    try:
        get_extractor(device)
    except FileNotFoundError as exc:
        if not missing:
            raise
        missing.append(f"the FID Inception weights: {exc}")
    if missing:
        raise ImportError("missing for this evaluation: " + "; ".join(missing))


def _check_logits_weight(weight) -> None:
    if weight is None:
        return
    w = np.asarray(weight)
    if w.ndim != 2 or w.shape[0] != POOL_DIM or not np.issubdtype(w.dtype, np.floating):
        raise ValueError(f"logits_weight must be a float array of shape ({POOL_DIM}, K) (see load_logits_weight), got {w.dtype} {w.shape}")


def activations_of(batch: NpzBatch, batch_size: int = 64, device=None, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Pool and spatial Inception activations of the images of an opened batch."""
    return compute_activations(batch.iter_images(batch_size), batch_size, device, progress, total=len(batch))


def load_logits_weight(path: str) -> np.ndarray:
    """The Inception logits weight for IS from ``.npy``, ``.npz`` (one array) or ``.pt`` (a tensor).

    Returned as (2048, K) (the TF graph's ``softmax/logits/MatMul`` layout); a (K, 2048) array
    (``nn.Linear`` layout) is transposed. Any other shape raises ValueError.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    if path.endswith(".npy"):
        w = np.load(path, allow_pickle=False)
    elif path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as data:
            if len(data.files) != 1:
                raise ValueError(f"{path}: expected exactly one array (the logits weight), found {data.files}")
            w = data[data.files[0]]
    elif path.endswith((".pt", ".pth")):
        w = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(w, torch.Tensor):
            raise ValueError(f"{path}: expected a saved tensor (the logits weight), got {type(w).__name__}")
        w = w.detach().double().numpy()
    else:
        raise ValueError(f"{path}: expected a .npy, .npz or .pt file holding the (2048, K) logits weight")
    w = np.asarray(w, np.float64)
    if w.ndim == 2 and w.shape[0] != 2048 and w.shape[1] == 2048:
        w = w.T
    if w.ndim != 2 or w.shape[0] != 2048:
        raise ValueError(f"{path}: expected a logits weight of shape (2048, K) or (K, 2048), got {w.shape}")
    return w


def _statistics(batch: NpzBatch, acts: tuple[np.ndarray, np.ndarray] | None) -> tuple[Statistics | None, Statistics | None]:
    """The file's precomputed statistics where present (as the evaluator), else from activations."""
    pool, spatial = batch.pool, batch.spatial
    if acts is not None:
        pool = pool if pool is not None else compute_statistics(acts[0])
        spatial = spatial if spatial is not None else compute_statistics(acts[1])
    return pool, spatial


def evaluate(
    samples: str, ref: str, *, batch_size: int = 64, device=None, progress: bool = True,
    logits_weight: np.ndarray | None = None, method: str = "factor",
) -> dict:  # fmt: skip
    """FID, sFID, precision, recall (and IS given ``logits_weight``) of ``samples`` against ``ref``.

    Both are ADM ``.npz`` batches. ``samples`` must hold images (``arr_0``). ``ref`` may hold only
    statistics; then precision/recall (which need reference images) are None. Returns a dict with
    ``fid, sfid, precision, recall, inception_score`` (None when not computed), ``num_samples``,
    ``num_ref`` and ``notes`` (why any value is None).
    """
    # everything checked before the Inception pass (minutes on a CPU for a few thousand images)
    check_choice("method", method, METHODS)
    check_int("batch_size", batch_size, min=1)
    _check_logits_weight(logits_weight)
    ref_batch, sample_batch = read_npz(ref), read_npz(samples)
    if sample_batch.image_shape is None:
        raise ValueError(f"{samples} has no images (arr_0): the sample batch must hold the generated images")
    if len(sample_batch) < 2:
        raise ValueError(f"{samples} holds {len(sample_batch)} image; at least 2 are needed for statistics")
    _check_dependencies(device, scipy=True, pillow=False)
    ref_acts = activations_of(ref_batch, batch_size, device, progress) if ref_batch.image_shape is not None else None
    ref_pool, ref_spatial = _statistics(ref_batch, ref_acts)
    sample_acts = activations_of(sample_batch, batch_size, device, progress)
    sample_pool, sample_spatial = _statistics(sample_batch, sample_acts)
    out = dict(num_samples=len(sample_batch), num_ref=len(ref_batch), inception_score=None, fid=None, sfid=None, precision=None, recall=None)
    notes = []
    if logits_weight is not None:
        out["inception_score"] = inception_score(sample_acts[0], logits_weight)
    else:
        notes.append("Inception Score: not computed (needs the logits weight; the bundled network has no logits layer)")
    if ref_pool is not None:
        out["fid"] = frechet_distance(*sample_pool, *ref_pool, method=method)
    else:
        notes.append(f"FID: not computed ({ref} has neither images nor mu/sigma)")
    if ref_spatial is not None:
        out["sfid"] = frechet_distance(*sample_spatial, *ref_spatial, method=method)
    else:
        notes.append(f"sFID: not computed ({ref} has neither images nor mu_s/sigma_s)")
    if ref_acts is None:
        notes.append(f"precision/recall: not computed ({ref} has no images, only statistics)")
    elif min(len(ref_batch), len(sample_batch)) <= PR_NEIGHBOURS:
        notes.append(f"precision/recall: not computed (needs more than {PR_NEIGHBOURS} images in each batch)")
    else:
        out["precision"], out["recall"] = precision_recall(ref_acts[0], sample_acts[0], PR_NEIGHBOURS, device=device)
    out["notes"] = notes
    return out


def make_reference(source: str, out: str, *, batch_size: int = 64, device=None, progress: bool = True,
                   overwrite: bool = False) -> str:  # fmt: skip
    """Write an ADM reference batch ``out``: the images of ``source`` plus mu, sigma, mu_s, sigma_s.

    ``source`` is a folder of same-size images (read recursively, sorted by path) or an ``.npz``
    with ``arr_0``. An existing ``out`` is replaced only with ``overwrite``; its folder must exist.
    """
    check_int("batch_size", batch_size, min=1)
    check_output_file(out, overwrite, "reference output")
    if not os.path.exists(source):
        raise FileNotFoundError(f"{source}: no such file or folder")
    _check_dependencies(device, scipy=False, pillow=os.path.isdir(source))
    if os.path.isdir(source):
        images = read_image_folder(source)
    else:
        batch = read_npz(source)
        if batch.image_shape is None:
            raise ValueError(f"{source} has no images (arr_0) to make a reference batch from")
        images = np.concatenate(list(batch.iter_images(max(batch_size, 1024))))
    if images.shape[0] < 2:
        raise ValueError(f"{source} holds {images.shape[0]} image; at least 2 are needed for statistics")
    pool, spatial = compute_activations(images, batch_size, device, progress)
    return write_npz(out, images, compute_statistics(pool), compute_statistics(spatial))
