"""The file rules: ditfast deletes only files it created, never overwrites an output without being
told, marks completion after the last artefact, and keeps a run folder to one run."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from ditfast.cli import main as cli_main
from ditfast.files import TMP_SUFFIX, atomic_write, remove_orphans
from ditfast.train import TrainConfig, train

TINY = dict(data="digits", image_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=1, global_batch=8,
            lr=1e-3, ema_decay=0.9, log_every=1, progress=False)  # fmt: skip
TINY_ARGS = ["--image-size", "8", "--patch-size", "2", "--hidden-size", "64", "--depth", "2", "--num-heads", "1",
             "--global-batch", "8", "--lr", "1e-3", "--ema-decay", "0.9", "--log-every", "1", "--no-progress"]  # fmt: skip
SAMPLE_ARGS = ["--model", "DiT-S/8", "--input-size", "8", "--in-channels", "3", "--num-classes", "10", "--num-samples", "3",
               "--sampler", "ddim", "--steps", "2", "--cfg-scale", "1", "--batch-size", "2", "--shard-size", "2",
               "--device", "cpu", "--no-progress"]  # fmt: skip


def cfg(tmp_path, **kw) -> TrainConfig:
    return TrainConfig(**{**TINY, "out": str(tmp_path / "run"), **kw})


def names(folder) -> list[str]:
    return sorted(os.listdir(folder))


def touch(path, text="mine") -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return str(path)


# ------------------------------------------------------------------------------------------
# Temporary files: ditfast's own names only
# ------------------------------------------------------------------------------------------


# The writer pid in an orphan's name: above Linux's largest pid (2**22), so certainly gone. (A small
# pid such as 77 names a live process on some machines, and its file is rightly left alone.)
DEAD_PID = 2**22 + 1


def test_orphan_cleanup_touches_only_ditfasts_own_temporary_names(tmp_path):
    # a temp file of a live writer (the parent process) is being written, not orphaned
    live = f"0000004.pt.{os.getppid()}{TMP_SUFFIX}"
    keep = ["notes.tmp.txt", "0000001.pt", "model.pt.tmp1", "0000001.pt.tmpx", "x.ditfast-tmp.txt", "data.tmp", live]
    orphans = [f"0000002.pt.{DEAD_PID}{TMP_SUFFIX}", "0000003.pt.tmp999", "whatever.ditfast-tmp"]
    for name in keep + orphans:
        touch(tmp_path / name)
    removed = remove_orphans(str(tmp_path), legacy=r"\d{7}\.pt")
    assert sorted(removed) == sorted(orphans)
    assert names(tmp_path) == sorted(keep)


def test_atomic_write_leaves_nothing_behind_on_failure(tmp_path):
    def fail(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(str(tmp_path / "out.bin"), fail)
    assert names(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="does not exist"):
        atomic_write(str(tmp_path / "missing" / "out.bin"), fail)


def test_sample_out_keeps_the_users_tmp_files_and_removes_its_orphans(tmp_path, capsys):
    out = tmp_path / "s"
    user = [touch(out / "notes.tmp.txt"), touch(out / "images" / "draft.tmp.png"), touch(out / "shards" / "x.tmp")]
    orphans = [touch(out / "shards" / f"shard_00000000_00000002.npz.{DEAD_PID}{TMP_SUFFIX}"),
               touch(out / "shards" / "shard_00000002_00000003.npz.tmp999"),  # an older version's name
               touch(out / "images" / "000001.png.tmp5")]  # fmt: skip
    assert cli_main(["sample", *SAMPLE_ARGS, "--out", str(out)]) == 0, capsys.readouterr().err
    assert all(os.path.isfile(p) for p in user), "a user's file was deleted"
    assert not any(os.path.exists(p) for p in orphans), "an orphaned temporary file survived"
    assert os.path.isfile(out / "samples.npz") and os.path.isfile(out / "grid.png")
    assert not [n for root, _, files in os.walk(out) for n in files if n.endswith(TMP_SUFFIX)]


def test_training_cleans_its_orphaned_checkpoint_temporaries_at_start(tmp_path):
    run = tmp_path / "run"
    orphans = [touch(run / "checkpoints" / "0000007.pt.tmp4242"), touch(run / "checkpoints" / f"0000007.pt.{DEAD_PID}{TMP_SUFFIX}")]
    user = touch(run / "checkpoints" / "notes.tmp.txt")
    train(cfg(tmp_path, steps=1, ckpt_every=0))
    assert not any(os.path.exists(p) for p in orphans) and os.path.isfile(user)
    assert names(run / "checkpoints") == ["0000001.pt", "notes.tmp.txt"]


# ------------------------------------------------------------------------------------------
# Training: one run per folder, recorded; recipe changes refused; the log without repeats
# ------------------------------------------------------------------------------------------


def test_fresh_training_into_a_folder_with_checkpoints_is_refused_without_overwrite(tmp_path, capsys):
    argv = ["train", *TINY_ARGS, "--out", str(tmp_path / "run")]
    assert cli_main([*argv, "--steps", "2"]) == 0
    before = open(tmp_path / "run" / "checkpoints" / "0000002.pt", "rb").read()
    capsys.readouterr()
    assert cli_main([*argv, "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "holds the checkpoints of a run" in err and "--overwrite" in err and "--resume auto" in err
    assert open(tmp_path / "run" / "checkpoints" / "0000002.pt", "rb").read() == before, "the run's checkpoint was touched"
    assert cli_main([*argv, "--steps", "1", "--overwrite"]) == 0
    # the old run's checkpoints are gone, so a later --resume auto cannot pick them up
    assert names(tmp_path / "run" / "checkpoints") == ["0000001.pt"]
    record = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert record["args"]["steps"] == 1 and record["start_step"] == 0 and record["args"]["lr"] == 1e-3


def test_resume_with_another_recipe_is_refused_unless_allowed(tmp_path):
    train(cfg(tmp_path, steps=1))
    for change in (dict(lr=2e-3), dict(ema_decay=0.99), dict(weight_decay=0.1)):
        key = next(iter(change))
        with pytest.raises(ValueError, match=rf"another recipe \({key}: checkpoint .* vs now .*allow-recipe-change"):
            train(cfg(tmp_path, steps=2, resume="auto", **change))
    with pytest.raises(ValueError, match="is at step 1 and steps is 1: nothing to train"):
        train(cfg(tmp_path, steps=1, resume="auto"))
    out = train(cfg(tmp_path, steps=2, resume="auto", lr=2e-3, allow_recipe_change=True))
    assert out["step"] == 2 and names(tmp_path / "run" / "checkpoints") == ["0000001.pt", "0000002.pt"]
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["start_step"] == 1


def test_resume_auto_ignores_checkpoints_that_are_not_this_runs(tmp_path):
    train(cfg(tmp_path / "other", steps=1, lr=5e-3))
    train(cfg(tmp_path, steps=2))
    # another run's checkpoint copied in under a name that sorts after 0000002.pt
    shutil.copy(tmp_path / "other" / "run" / "checkpoints" / "0000001.pt", tmp_path / "run" / "checkpoints" / "other.pt")
    out = train(cfg(tmp_path, steps=3, resume="auto"))  # resumes from 0000002.pt: no lr conflict
    assert out["step"] == 3 and os.path.isfile(tmp_path / "run" / "checkpoints" / "other.pt")


def test_log_does_not_repeat_the_windows_redone_after_a_resume(tmp_path):
    run = tmp_path / "run"
    train(cfg(tmp_path, steps=4, ckpt_every=2))
    os.remove(run / "checkpoints" / "0000004.pt")  # killed after logging steps 3-4, before saving step 4
    train(cfg(tmp_path, steps=4, ckpt_every=2, resume="auto"))
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_default_training_saves_checkpoints_periodically(tmp_path):
    assert TrainConfig().ckpt_every > 0 and TrainConfig().ckpt_minutes > 0
    train(cfg(tmp_path, steps=3, ckpt_every=0, ckpt_minutes=1e-9))  # the time rule alone: due after every step
    assert names(tmp_path / "run" / "checkpoints") == ["0000001.pt", "0000002.pt", "0000003.pt"]


def test_export_is_not_overwritten_without_overwrite(tmp_path):
    export = touch(tmp_path / "m.safetensors", "a user's file")
    with pytest.raises(FileExistsError, match="export .* exists"):
        train(cfg(tmp_path, steps=1, export=export))
    assert open(export).read() == "a user's file" and not (tmp_path / "run").exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(cfg(tmp_path, steps=1, export=str(tmp_path / "no" / "m.safetensors")))
    out = train(cfg(tmp_path, steps=1, export=str(tmp_path / "run" / "ema.safetensors")))  # in the run folder: made by the run
    assert out["step"] == 1 and (tmp_path / "run" / "ema.safetensors").is_file()


# ------------------------------------------------------------------------------------------
# Sampling: completion after the last artefact
# ------------------------------------------------------------------------------------------


def test_a_kill_between_the_grid_and_samples_npz_is_redone_on_rerun(tmp_path, monkeypatch, capsys):
    import ditfast.sampling as sampling

    out = tmp_path / "s"
    real = sampling.save_png

    def killed_at_the_grid(path, image):
        if os.path.basename(path) == "grid.png":
            raise KeyboardInterrupt("killed while writing grid.png")
        real(path, image)

    monkeypatch.setattr(sampling, "save_png", killed_at_the_grid)
    with pytest.raises(KeyboardInterrupt):
        cli_main(["sample", *SAMPLE_ARGS, "--out", str(out)])
    assert not (out / "samples.npz").exists(), "the run is marked complete without its grid"
    monkeypatch.setattr(sampling, "save_png", real)
    capsys.readouterr()
    assert cli_main(["sample", *SAMPLE_ARGS, "--out", str(out)]) == 0
    assert "nothing to do" not in capsys.readouterr().out
    assert (out / "grid.png").is_file() and (out / "samples.npz").is_file()


# ------------------------------------------------------------------------------------------
# Single-file outputs: demo --out, eval --make-ref
# ------------------------------------------------------------------------------------------


def test_demo_refuses_to_overwrite_and_to_create_a_missing_folder(tmp_path, capsys):
    grid = touch(tmp_path / "grid.png", "a user's picture")
    assert cli_main(["demo", "--out", grid]) == 2
    assert "exists" in capsys.readouterr().err and open(grid).read() == "a user's picture"
    assert cli_main(["demo", "--out", str(tmp_path / "no" / "such" / "grid.png")]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "no").exists()


def test_make_ref_refuses_to_overwrite_and_to_create_a_missing_folder(tmp_path, capsys, monkeypatch):
    import importlib

    from ditfast.metrics import write_npz

    evaluate_mod = importlib.import_module("ditfast.metrics.evaluate")  # the package exports a function of that name

    def no_inception(*args, **kwargs):
        raise AssertionError("the Inception pass ran before the output was checked")

    monkeypatch.setattr(evaluate_mod, "compute_activations", no_inception)
    write_npz(str(tmp_path / "imgs.npz"), np.zeros((3, 8, 8, 3), np.uint8))
    ref = touch(tmp_path / "ref.npz", "a user's reference")
    assert cli_main(["eval", "--make-ref", ref, str(tmp_path / "imgs.npz"), "--device", "cpu", "--no-progress"]) == 2
    assert "exists" in capsys.readouterr().err and open(ref).read() == "a user's reference"
    missing = tmp_path / "no" / "ref.npz"
    assert cli_main(["eval", "--make-ref", str(missing), str(tmp_path / "imgs.npz"), "--device", "cpu", "--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "no").exists()


# ------------------------------------------------------------------------------------------
# extract-latents: no stale shards
# ------------------------------------------------------------------------------------------


def _image_folder(root, per_class: int) -> str:
    Image = pytest.importorskip("PIL.Image", reason="Pillow is needed to write test images")
    gen = torch.Generator().manual_seed(0)
    for c in ("a", "b"):
        os.makedirs(root / c, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(torch.randint(0, 256, (8, 8, 3), generator=gen, dtype=torch.uint8).numpy()).save(root / c / f"{i}.png")
    return str(root)


def test_extract_latents_refuses_a_used_folder_and_overwrite_leaves_no_stale_shards(tmp_path, capsys):
    from ditfast.data import latent_shard_samples

    many, few, out = _image_folder(tmp_path / "many", 3), _image_folder(tmp_path / "few", 1), tmp_path / "lat"
    argv = ["extract-latents", "--vae", "none", "--image-size", "8", "--batch-size", "2", "--out", str(out), "--no-progress"]
    assert cli_main([*argv, "--data", many]) == 0
    assert names(out) == ["meta.json", "shard_00000.safetensors", "shard_00001.safetensors", "shard_00002.safetensors"]
    user = touch(out / "README.txt", "notes")
    capsys.readouterr()
    assert cli_main([*argv, "--data", few]) == 2
    assert "not empty" in capsys.readouterr().err and latent_shard_samples(str(out)).size == 6
    assert cli_main([*argv, "--data", few, "--overwrite"]) == 0
    assert names(out) == ["README.txt", "meta.json", "shard_00000.safetensors"] and open(user).read() == "notes"
    assert latent_shard_samples(str(out)).size == 2
