"""FID, sFID, precision/recall and Inception Score with the ADM evaluator's semantics.

Reference: the evaluator of Dhariwal & Nichol's guided-diffusion (``evaluations/evaluator.py``),
which produced DiT's published numbers. What is the same and what is deliberately different:

* Statistics: ``mu = mean(acts, 0)``, ``sigma = np.cov(acts, rowvar=False)`` (float64). Same.
* Frechet distance: ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2))``. The evaluator takes
  ``scipy.linalg.sqrtm(S1 @ S2, disp=False)``, retries with ``1e-6 * I`` added to both covariances
  when that is not finite, raises when the diagonal of the result has an imaginary part above
  1e-3 and otherwise keeps the real part. SciPy 1.18 removed ``disp``, and the Schur-based root of
  the non-symmetric product loses accuracy when the covariances are singular (fewer images than
  feature dimensions; measured on a rank-19, 256-d case: 2e-5 absolute error in the trace against
  1e-7 below) and costs a full Schur decomposition. So the default here, ``method="factor"``, uses only symmetric
  factorisations: with ``S1 = F F^T`` (pivoted Cholesky, LAPACK ``dpstrf``, F of numerical rank r),
  ``S1 S2`` has the non-zero eigenvalues of the r x r positive semi-definite matrix ``F^T S2 F``,
  and ``tr(sqrtm(S1 S2))`` is the sum of their square roots. The result is real, singular
  covariances are exact (and cheap: O(D^2 r)), and there is nothing to retry. Covariances that
  are not positive semi-definite (what the evaluator's imaginary-part check catches) raise
  ValueError. ``method="sqrtm"`` runs the evaluator's procedure literally, with
  ``scipy.linalg.sqrtm`` called without ``disp`` (valid on every SciPy version).
* Precision/recall (k=3): a point's radius is the distance to its k-th nearest neighbour in its
  own set, counting itself as the 0-th; precision = fraction of samples within (<=) some reference
  ball, recall = fraction of references within some sample ball. Same. The evaluator computes the
  squared distances in float16 when they are finite; here they are float32 (fp32 matmuls, no TF32),
  which can differ from the evaluator only for points within float16 rounding of a ball's edge.
* Inception Score: softmax of ``pool @ W`` (the evaluator uses the graph's ``softmax/logits``
  weight without its bias), splits of 5,000, ``exp(mean KL(p(y|x) || p(y)))``, mean over splits.
  The bundled network has no logits layer, so W must be given.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np
import torch

from .inception import ieee_fp32

__all__ = [
    "Statistics", "compute_statistics", "frechet_distance", "trace_sqrt_product", "manifold_radii",
    "precision_recall", "inception_score",
]  # fmt: skip


class Statistics(NamedTuple):
    """Mean (D,) and covariance (D, D) of a set of features, float64."""

    mu: np.ndarray
    sigma: np.ndarray


def compute_statistics(activations: np.ndarray) -> Statistics:
    """ADM's statistics of (N, D) activations: mean and ``np.cov(rowvar=False)`` (N - 1 normalised)."""
    acts = np.asarray(activations)
    if acts.ndim != 2 or acts.shape[0] < 2:
        raise ValueError(f"expected activations of shape (N, D) with N >= 2, got {acts.shape}")
    return Statistics(np.mean(acts, axis=0, dtype=np.float64), np.cov(acts, rowvar=False))


def _check_stats(mu1, sigma1, mu2, sigma2) -> tuple[np.ndarray, ...]:
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(
            f"expected means of shape (D,) and covariances (D, D) with one D, got mu1 {mu1.shape}, "
            f"sigma1 {sigma1.shape}, mu2 {mu2.shape}, sigma2 {sigma2.shape}"
        )
    for name, a in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(a).all():
            raise ValueError(f"{name} has non-finite values")
    for name, s in (("sigma1", sigma1), ("sigma2", sigma2)):
        if np.abs(s - s.T).max() > 1e-6 * max(float(np.abs(np.diagonal(s)).max()), 1e-300):
            raise ValueError(f"{name} is not symmetric: expected a covariance matrix")
    return mu1, sigma1, mu2, sigma2


def _scipy_linalg():
    try:
        import scipy.linalg
        import scipy.linalg.lapack  # noqa: F401
    except ImportError as exc:
        raise ImportError("the Frechet distance needs SciPy: pip install scipy (or ditfast[eval])") from exc
    return scipy.linalg


def _psd_factor(s: np.ndarray, name: str) -> np.ndarray:
    """F (D, r) with ``s = F F^T``, r the numerical rank: pivoted Cholesky (LAPACK ``dpstrf``).

    Costs O(D^2 r), so low-rank covariances (fewer images than dimensions) are cheap. A matrix that
    ``F F^T`` does not reproduce is not positive semi-definite: ValueError (this is where the
    evaluator's imaginary-part check, ``|sqrt(lambda)| > 1e-3``, i.e. ``lambda < -1e-6``, lands).
    """
    lapack = _scipy_linalg().lapack
    d = s.shape[0]
    scale = float(np.abs(np.diagonal(s)).max()) if d else 0.0
    if scale == 0.0:
        f = np.zeros((d, 0))
    else:
        c, piv, rank, info = lapack.dpstrf(s, lower=1)  # info 1 = rank-deficient, which is fine
        if info < 0:
            raise ValueError(f"{name}: LAPACK dpstrf rejected argument {-info}")
        f = np.zeros((d, rank))
        f[piv - 1] = np.tril(c[:, :rank])
    residual = float(np.abs(s - f @ f.T).max()) if d else 0.0
    if residual > 1e-6 + 100 * d * np.finfo(np.float64).eps * scale:
        raise ValueError(f"{name} is not positive semi-definite (|S - F F^T| = {residual:.3e}): expected a covariance matrix")
    return f


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``tr(sqrtm(sigma1 @ sigma2))`` for symmetric PSD matrices, via symmetric factorisations only.

    With ``sigma1 = F F^T`` (pivoted Cholesky, F of rank r), ``sigma1 sigma2`` has the non-zero
    eigenvalues of the r x r PSD matrix ``F^T sigma2 F``; the trace of the principal square root
    is the sum of their square roots (the factor of lower rank is used). Exact for singular
    covariances; not-PSD inputs raise ValueError.
    """
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    f1, f2 = _psd_factor(sigma1, "sigma1"), _psd_factor(sigma2, "sigma2")
    f, other = (f1, sigma2) if f1.shape[1] <= f2.shape[1] else (f2, sigma1)
    if f.shape[1] == 0:
        return 0.0
    m = f.T @ other @ f
    lam = np.linalg.eigvalsh((m + m.T) / 2)
    # eigenvalues at round-off level are zeros (their square roots would add ~sqrt(eps) noise each)
    tol = m.shape[0] * np.finfo(np.float64).eps * float(np.abs(lam).max())
    return float(np.sqrt(lam[lam > tol]).sum())


def _trace_sqrtm_scipy(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    """The evaluator's procedure, with scipy.linalg.sqrtm called without ``disp``."""
    linalg = _scipy_linalg()
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"FID: singular covariance product; adding {eps} to the diagonal of both covariances", RuntimeWarning, stacklevel=3)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: sqrtm of the covariance product has an imaginary component {np.max(np.abs(covmean.imag)):.3e}")
        covmean = covmean.real
    return float(np.trace(covmean))


def frechet_distance(mu1, sigma1, mu2, sigma2, *, method: str = "factor", eps: float = 1e-6) -> float:
    """Frechet distance between Gaussians N(mu1, sigma1) and N(mu2, sigma2) (FID / sFID).

    ``method="factor"`` (default): exact trace of the matrix square root from a pivoted Cholesky
    factor and a symmetric eigensolver (see the module doc). ``method="sqrtm"``: the ADM evaluator's scipy
    procedure (retry with ``eps * I``, imaginary-part check). Bad shapes, non-finite or
    non-symmetric / non-PSD covariances raise ValueError.
    """
    mu1, sigma1, mu2, sigma2 = _check_stats(mu1, sigma1, mu2, sigma2)
    if method == "factor":
        tr_covmean = trace_sqrt_product(sigma1, sigma2)
    elif method == "sqrtm":
        tr_covmean = _trace_sqrtm_scipy(sigma1, sigma2, eps)
    else:
        raise ValueError(f"method must be 'factor' or 'sqrtm', got {method!r}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


# ---------------------------------------------------------------------------------------------
# precision / recall


def _features(x, device: torch.device, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x, dtype=np.float32) if not isinstance(x, torch.Tensor) else x)
    if t.dim() != 2 or not t.is_floating_point() or not torch.isfinite(t).all():
        raise ValueError(f"expected {name} as finite float features of shape (N, D), got {t.dtype} {tuple(t.shape)}")
    return t.to(device=device, dtype=torch.float32)


def _sq_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances (len(u), len(v)) as the evaluator computes them."""
    d = (u * u).sum(1)[:, None] - 2 * (u @ v.T) + (v * v).sum(1)[None, :]
    return d.clamp_min_(0.0)


def _rows_per_block(n_cols: int, budget: int = 1 << 26) -> int:
    return max(1, budget // max(n_cols, 1))


@torch.inference_mode()
def manifold_radii(features, k: int = 3, device: torch.device | str | None = None) -> torch.Tensor:
    """Squared distance of each point to its k-th nearest neighbour in the set (itself = 0-th)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    f = _features(features, device, "features")
    if f.shape[0] <= k:
        raise ValueError(f"need more than k={k} points to estimate the manifold, got {f.shape[0]}")
    out = torch.empty(f.shape[0], dtype=torch.float32, device=device)
    step = _rows_per_block(f.shape[0])
    with ieee_fp32(device):
        for s in range(0, f.shape[0], step):
            d = _sq_distances(f[s : s + step], f)
            out[s : s + step] = torch.topk(d, k + 1, dim=1, largest=False).values[:, k]
    return out


@torch.inference_mode()
def precision_recall(ref_features, sample_features, k: int = 3, device: torch.device | str | None = None) -> tuple[float, float]:
    """ADM's improved precision and recall (Kynkaanniemi et al. 2019) with k nearest neighbours.

    precision: fraction of samples inside (<=) the k-NN ball of some reference point;
    recall: fraction of reference points inside the k-NN ball of some sample.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ref = _features(ref_features, device, "ref_features")
    samples = _features(sample_features, device, "sample_features")
    if ref.shape[1] != samples.shape[1]:
        raise ValueError(f"feature dimensions differ: ref {tuple(ref.shape)}, samples {tuple(samples.shape)}")
    r_ref = manifold_radii(ref, k, device)
    r_sam = manifold_radii(samples, k, device)
    sample_in = torch.zeros(samples.shape[0], dtype=torch.bool, device=device)
    ref_in = torch.zeros(ref.shape[0], dtype=torch.bool, device=device)
    step = _rows_per_block(samples.shape[0])
    with ieee_fp32(device):
        for s in range(0, ref.shape[0], step):
            d = _sq_distances(ref[s : s + step], samples)  # (refs, samples)
            sample_in |= (d <= r_ref[s : s + step, None]).any(0)
            ref_in[s : s + step] = (d <= r_sam[None, :]).any(1)
    return sample_in.double().mean().item(), ref_in.double().mean().item()


# ---------------------------------------------------------------------------------------------
# Inception Score


def inception_score(pool_features, weight, split_size: int = 5000) -> float:
    """IS from pool features (N, 2048) and a logits weight (2048, K), ADM style (no bias).

    The bundled FID Inception network has no 1008-way logits layer, so ``weight`` is required:
    the TF graph's ``softmax/logits/MatMul`` weight (2048, 1008) reproduces the published IS.
    """
    if weight is None:
        raise ValueError(
            "the Inception Score needs a logits weight: the bundled FID Inception network has no "
            "classification layer; pass the (2048, 1008) weight of the TF graph's softmax/logits"
        )
    acts = np.asarray(pool_features, np.float64)
    w = np.asarray(weight, np.float64)
    if acts.ndim != 2 or w.ndim != 2 or w.shape[0] != acts.shape[1]:
        raise ValueError(f"expected pool features (N, D) and a logits weight (D, K), got {acts.shape} and {w.shape}")
    if split_size < 1 or acts.shape[0] < 1:
        raise ValueError(f"need at least one image and split_size >= 1, got N={acts.shape[0]}, split_size={split_size}")
    logits = acts @ w
    logits -= logits.max(1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(1, keepdims=True)
    scores = []
    for start in range(0, len(probs), split_size):
        part = probs[start : start + split_size]
        with np.errstate(divide="ignore", invalid="ignore"):  # 0 * log(0) is taken as 0
            kl = np.where(part > 0, part * (np.log(part) - np.log(part.mean(0, keepdims=True))), 0.0)
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores))
