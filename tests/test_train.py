"""The trainer: fused vs eager step, exact resume, DDP equivalence, data sources, bad input."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import torch.multiprocessing as mp

from ditfast import ops
from ditfast.diffusion import create_diffusion
from ditfast.train import TrainConfig, build_model, main as train_main, open_data, train
from conftest import TOLERANCES, assert_close, randomize_, free_port, join_process_group_env

TINY = dict(data="digits", image_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=1, global_batch=8,
            lr=1e-3, ema_decay=0.9, log_every=1, progress=False)  # fmt: skip


def cfg_for(tmp_path, **kw) -> TrainConfig:
    return TrainConfig(**{**TINY, "out": str(tmp_path / "run"), **kw})


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.skipif(ops.triton_status("cpu") is not None, reason=f"Triton kernels unavailable: {ops.triton_status('cpu')}")
def test_fused_step_equals_eager_step(tmp_path):
    cfg = cfg_for(tmp_path)
    data = open_data(cfg)
    x, y = data.get(torch.arange(8), None)
    t = torch.randint(0, 1000, (8,))
    noise = torch.randn_like(x)
    diffusion = create_diffusion("")
    results = {}
    for backend in ("eager", "triton"):
        model = randomize_(build_model(dataclasses.replace(cfg, backend=backend), data, torch.device("cpu")))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0)
        loss = diffusion.training_losses(model, x, t, model_kwargs=dict(y=y, force_drop_ids=torch.zeros(8, dtype=torch.long)), noise=noise)["loss"].mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        opt.step()
        results[backend] = (loss.item(), grads, {n: p.detach().clone() for n, p in model.named_parameters()})
    (le, ge, we), (lt, gt, wt) = results["eager"], results["triton"]
    assert abs(le - lt) <= 1e-5 * abs(le)
    rtol, atol = TOLERANCES[("bwd", torch.float32)]
    for name in ge:
        assert_close(gt[name], ge[name], rtol=rtol, atol=atol * max(1.0, ge[name].abs().max().item()), what=f"grad {name}")
    # Adam's first step is lr * sign(grad) wherever |grad| >> eps; where the exact gradient is 0
    # (the key bias: softmax ignores it) rounding noise picks the sign, so compare elsewhere only.
    for name, g in ge.items():
        clear = g.abs() > 1e-3 * g.abs().max()
        assert_close(wt[name][clear], we[name][clear], rtol=1e-5, atol=1e-6, what=f"weight {name} after the step")


def test_resume_continues_exactly(tmp_path):
    straight = train(cfg_for(tmp_path / "a", steps=4))
    train(cfg_for(tmp_path / "b", steps=2))
    resumed = train(cfg_for(tmp_path / "b", steps=4, resume="auto"))
    assert straight["loss"] == resumed["loss"]
    a, b = _state(tmp_path / "a/run/checkpoints/0000004.pt"), _state(tmp_path / "b/run/checkpoints/0000004.pt")
    assert a["step"] == b["step"] == 4
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k} differs after resume"
    assert set(a) == {"model", "ema", "opt", "args", "step", "rng"}


def test_resume_refuses_another_config(tmp_path):
    train(cfg_for(tmp_path, steps=1))
    with pytest.raises(ValueError, match=r"another config \(hidden_size: checkpoint 64 vs now 128"):
        train(cfg_for(tmp_path, steps=2, hidden_size=128, num_heads=2, resume="auto"))



def _ddp_worker(rank: int, world: int, port: int, cfg: TrainConfig) -> None:
    join_process_group_env(rank, world, port)
    train(cfg)
    torch.distributed.destroy_process_group()


def test_two_process_ddp_equals_one_process(tmp_path):
    single = cfg_for(tmp_path / "one", steps=3)
    train(single)
    multi = cfg_for(tmp_path / "two", steps=3)
    mp.spawn(_ddp_worker, args=(2, free_port(), multi), nprocs=2, join=True)
    a, b = _state(tmp_path / "one/run/checkpoints/0000003.pt"), _state(tmp_path / "two/run/checkpoints/0000003.pt")
    for k in a["model"]:
        ref = a["model"][k]
        assert_close(b["model"][k], ref, rtol=1e-4, atol=1e-6 * max(1.0, ref.abs().max().item()), what=f"DDP weight {k}")


def _write_folder(root, classes, per_class=3, size=12):
    from PIL import Image

    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for i in range(per_class):
            pixels = torch.randint(0, 256, (size, size + 3, 3), dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(root / c / f"{i}.png")


def test_image_folder_and_latent_shards_end_to_end(tmp_path):
    pytest.importorskip("PIL", reason="Pillow is needed to write test images")
    from ditfast.extract import extract_latents

    _write_folder(tmp_path / "imgs", ["cat", "dog"])
    n = extract_latents(str(tmp_path / "imgs"), None, 8, str(tmp_path / "lat"), batch_size=4, progress=False)
    assert n == 6 and sorted(os.listdir(tmp_path / "lat")) == ["meta.json", "shard_00000.safetensors", "shard_00001.safetensors"]
    data = open_data(cfg_for(tmp_path, data=str(tmp_path / "lat")))
    assert (data.size, data.shape, data.num_classes, data.flip_ok) == (6, (3, 8, 8), 2, True)
    flip = torch.tensor([True, False])
    x, _ = data.get(torch.tensor([0, 0]), flip)
    assert torch.equal(x[0], x[1].flip(-1).half().float()) or torch.allclose(x[0], x[1].flip(-1), atol=1e-2)
    out = train(cfg_for(tmp_path, data=str(tmp_path / "lat"), steps=2, global_batch=4))
    assert out["model"].in_channels == 3 and torch.isfinite(torch.tensor(out["loss"]))
    out = train(cfg_for(tmp_path / "px", data=str(tmp_path / "imgs"), steps=1, global_batch=4))
    assert out["model"].x_embedder.img_size == (8, 8)


def test_bad_data_is_refused_before_training(tmp_path, capsys):
    assert train_main(["--data", str(tmp_path / "missing"), "--steps", "1", "--no-progress", "--out", str(tmp_path / "r")]) == 2
    assert "data folder not found" in capsys.readouterr().err
    os.makedirs(tmp_path / "empty" / "a")
    with pytest.raises(ValueError, match="class folders without images .*: a"):
        open_data(cfg_for(tmp_path, data=str(tmp_path / "empty")))
    pytest.importorskip("PIL", reason="Pillow is needed to write test images")
    _write_folder(tmp_path / "broken", ["a"], per_class=1)
    (tmp_path / "broken" / "a" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"1 unreadable image\(s\): .*bad.png"):
        open_data(cfg_for(tmp_path, data=str(tmp_path / "broken")))
    with pytest.raises(ValueError, match="resume checkpoint not found"):
        train(cfg_for(tmp_path, steps=1, resume=str(tmp_path / "nope.pt")))


def test_training_steps_read_nothing_back_from_the_device_for_labels(tmp_path, monkeypatch):
    """The model's label check (a device-to-host read of min/max) is off while training; the trainer
    checks each batch's labels on the CPU instead, before the copy."""
    import ditfast.models
    import ditfast.train as train_mod
    from ditfast.data import _in_memory

    seen = []
    real = ditfast.models.DiT._check_inputs

    def spy(self, x, t, y):
        seen.append(self.check_label_range)
        return real(self, x, t, y)

    monkeypatch.setattr(ditfast.models.DiT, "_check_inputs", spy)
    train(cfg_for(tmp_path, steps=2))
    assert seen and not any(seen), f"the model checked label ranges on {sum(seen)} of {len(seen)} forwards"

    x, y = torch.randn(16, 1, 8, 8), torch.arange(16) % 10
    y[13] = 10  # one label outside [0, 10)
    monkeypatch.setattr(train_mod, "open_data", lambda cfg: _in_memory("bad", x, y, 10, flip_ok=False))
    with pytest.raises(ValueError, match=r"bad: sample 13 has label 10, expected one in \[0, 9\]"):
        train(cfg_for(tmp_path / "b", steps=2, global_batch=16))


def test_keep_last_prunes_only_this_runs_older_checkpoints(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    (ckpts / "notes.pt").write_text("mine")  # not a checkpoint name training writes: never deleted
    train(cfg_for(tmp_path, steps=5, ckpt_every=1, ckpt_minutes=0, keep_last=2))
    assert sorted(os.listdir(ckpts)) == ["0000004.pt", "0000005.pt", "notes.pt"]
    assert _state(ckpts / "0000005.pt")["step"] == 5
    train(cfg_for(tmp_path / "all", steps=3, ckpt_every=1, ckpt_minutes=0, keep_last=0))
    assert sorted(os.listdir(tmp_path / "all" / "run" / "checkpoints")) == ["0000001.pt", "0000002.pt", "0000003.pt"]
