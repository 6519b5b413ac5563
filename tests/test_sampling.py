"""The sampling engine: sampler math against the diffusion object and an independent DPM-Solver++,
per-index reproducibility, the CLI end to end, multi-process sampling and restarts, bad input."""

from __future__ import annotations

import dataclasses
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import ditfast
from ditfast.cli import main as cli_main
from ditfast.data import pixels_to_uint8
from ditfast.diffusion import create_diffusion
from ditfast.imageio import read_png
from ditfast.models import DiT
from ditfast.engine import SamplingEngine
from ditfast.sample_cli import main as sample_main
from ditfast.sampling import SampleConfig, index_labels, index_noise, run
from ditfast.samplers import dpm_solver_timesteps, make_plan, update
from conftest import assert_close, assert_replayable, max_rel_error, randomize_, free_port, join_process_group_env

NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CUDA graphs / GPU compile)")
TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)


def tiny_dit(seed: int = 0, **kw) -> DiT:
    """A small DiT with every weight random; its variance outputs v scaled into about [-1, 1] as a
    trained model's are (beyond that the learned variance extrapolates past beta_t)."""
    torch.manual_seed(seed)
    model = randomize_(DiT(**{**TINY, **kw}), seed=seed).eval()
    if model.learn_sigma:
        rows = torch.arange(model.final_layer.linear.out_features) % model.out_channels >= model.in_channels
        with torch.no_grad():
            model.final_layer.linear.weight[rows] *= 0.25
            model.final_layer.linear.bias[rows] *= 0.25
    return model


# ------------------------------------------------------------------------------------------
# Sampler math
# ------------------------------------------------------------------------------------------


def ref_linear_alphas_cumprod() -> np.ndarray:
    """The 1000-step linear schedule, written out here: betas 1e-4 .. 0.02."""
    betas = np.array([1e-4 + i * (0.02 - 1e-4) / 999 for i in range(1000)], dtype=np.float64)
    return np.cumprod(1.0 - betas)


def ref_dpm_solver_pp_2m(eps_fn, z: torch.Tensor, steps: int) -> torch.Tensor:
    """DPM-Solver++(2M) of Lu et al. (2022), Algorithm 2, in float64: data prediction, multistep,
    time-uniform grid on the integer steps, first-order first and final steps, the final one to
    sigma = 0 (it returns the data prediction)."""
    acp = ref_linear_alphas_cumprod()
    ts = [int(math.floor(v)) for v in np.linspace(999, 0, steps + 1)[:steps]]
    alpha = lambda t: math.sqrt(acp[t])  # noqa: E731
    sigma = lambda t: math.sqrt(1 - acp[t])  # noqa: E731
    lam = lambda t: math.log(alpha(t) / sigma(t))  # noqa: E731
    x, x0_prev, h_prev = z.double(), None, None
    for i, s in enumerate(ts):
        x0 = (x - sigma(s) * eps_fn(x, s).double()) / alpha(s)
        if i == steps - 1:
            return x0
        t = ts[i + 1]
        h = lam(t) - lam(s)
        if x0_prev is None:
            D = x0
        else:
            r = h_prev / h
            D = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
        x = sigma(t) / sigma(s) * x - alpha(t) * (math.exp(-h) - 1) * D
        x0_prev, h_prev = x0, h
    raise AssertionError("unreachable")


def test_dpm_solver_grid_is_uniform_in_t_and_distinct():
    for n in range(1, 1001):
        ts = dpm_solver_timesteps(n)
        assert ts[0] == 999 and len(set(ts.tolist())) == n and (np.diff(ts) < 0).all(), n
    assert dpm_solver_timesteps(5).tolist() == [999, 799, 599, 399, 199]


@pytest.mark.parametrize("steps", [1, 2, 7])
def test_dpm_solver_pp_update_matches_independent_formula(steps):
    """A smooth stand-in eps model, fed through the plan + update() loop the engine runs."""
    gen = torch.Generator().manual_seed(steps)
    z = torch.randn(3, 4, 5, 5, generator=gen)
    w = torch.randn(4, 4, generator=gen) * 0.3

    def eps_fn(x, t):  # eps-prediction with a variance channel block that must be ignored
        return torch.tanh(torch.einsum("oc,nchw->nohw", w.to(x.dtype), x)) + 0.1 * math.cos(t / 150)

    plan = make_plan("dpm-solver++", steps, learned_sigma=True)
    x, x0_prev = z.clone(), torch.zeros_like(z)
    for k in range(steps):
        out = torch.cat([eps_fn(x, int(plan.timesteps[k])), torch.full_like(x, float("nan"))], dim=1)
        x, x0_prev = update(plan, x, out, plan.coefs[k], None, x0_prev)
    expected = ref_dpm_solver_pp_2m(eps_fn, z, steps)
    assert_close(x, expected.float(), rtol=2e-5, atol=2e-5, what=f"DPM-Solver++(2M), {steps} steps")


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.7)])
def test_one_step_is_bitwise_the_diffusion_step(sampler, eta):
    """The engine's update and the diffusion's p_sample/ddim_sample on the same x, model output and
    noise, at every step of a 6-step plan."""
    plan = make_plan(sampler, 6, learned_sigma=True, eta=eta)
    diffusion = create_diffusion("6")
    gen = torch.Generator().manual_seed(1)
    for k in range(plan.steps):
        x = torch.randn(2, 4, 3, 3, generator=gen)
        out = torch.cat([torch.randn(2, 4, 3, 3, generator=gen), torch.rand(2, 4, 3, 3, generator=gen) * 2 - 1], 1)
        j = plan.steps - 1 - k  # respaced index
        t = torch.full((2,), j, dtype=torch.long)
        torch.manual_seed(100 + k)
        step = diffusion.p_sample if sampler == "ddpm" else diffusion.ddim_sample
        kwargs = {} if sampler == "ddpm" else {"eta": eta}
        expected = step(lambda x_, t_: out, x, t, clip_denoised=False, **kwargs)["sample"]
        torch.manual_seed(100 + k)
        noise = torch.randn_like(x)  # the draw the diffusion made after the model call
        got, _ = update(plan, x, out, plan.coefs[k], noise)
        assert torch.equal(got, expected), f"{sampler} step {k}: max diff {(got - expected).abs().max():.3e}"
        assert int(plan.timesteps[k]) == diffusion.timestep_map[j]


def test_fixed_variance_ddpm_step_matches_the_diffusion():
    """learn_sigma=False models: the diffusion's FIXED_LARGE variance (exp of a scalar here, of a
    dense tensor there: equal to the last bit or nearly)."""
    plan = make_plan("ddpm", 4, learned_sigma=False)
    diffusion = create_diffusion("4", learn_sigma=False)
    for k in range(4):
        x, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
        torch.manual_seed(k)
        t = torch.full((2,), 3 - k, dtype=torch.long)
        expected = diffusion.p_sample(lambda x_, t_: eps, x, t, clip_denoised=True)["sample"]
        torch.manual_seed(k)
        noise = torch.randn_like(x)
        got, _ = update(dataclasses.replace(plan, clip_denoised=True), x, eps, plan.coefs[k], noise)
        assert_close(got, expected, rtol=1e-6, atol=1e-6, what=f"fixed-variance step {k}")


@pytest.mark.parametrize("sampler,eta,cfg,guide_all", [("ddpm", 0.0, 1.5, False), ("ddim", 0.0, 4.0, True),
                                                       ("ddim", 0.5, 1.0, False)])  # fmt: skip
def test_engine_equals_the_official_loop_with_the_same_noise(sampler, eta, cfg, guide_all):
    """Whole loops on a tiny random DiT: the engine vs create_diffusion(...).p_sample_loop /
    ddim_sample_loop run the official way (state of the doubled batch, forward_with_cfg). The
    official loop draws one randn of the doubled batch per step from the global generator; the
    engine is fed the first half of the same draws."""
    model = tiny_dit()
    B, S = 3, 5
    z = torch.randn(B, 4, 8, 8)
    labels = torch.tensor([1, 7, 3])
    diffusion = create_diffusion(str(S))
    if cfg > 1:
        z_in, y = torch.cat([z, z]), torch.cat([labels, torch.full_like(labels, 10)])
        fn, kwargs = model.forward_with_cfg, dict(y=y, cfg_scale=cfg, guide_all_channels=guide_all)
    else:
        z_in, fn, kwargs = z, model.forward, dict(y=labels)
    torch.manual_seed(5)
    draws = torch.stack([torch.randn_like(z_in) for _ in range(S)])
    torch.manual_seed(5)
    loop = diffusion.p_sample_loop if sampler == "ddpm" else diffusion.ddim_sample_loop
    extra = {} if sampler == "ddpm" else {"eta": eta}
    with torch.no_grad():
        expected = loop(fn, z_in.shape, z_in, clip_denoised=False, model_kwargs=kwargs, **extra)[:B]
    plan = make_plan(sampler, S, eta=eta)
    engine = SamplingEngine(model, plan, batch_size=4, cfg_scale=cfg, guide_all_channels=guide_all)  # one padding row
    got = engine.run(z, labels, draws[:, :B] if plan.stochastic else None)
    # Not bitwise: the engine embeds the step's timestep once (a 1-row GEMM) where the official
    # loop embeds it per sample, a last-bit difference that eps -> x0 (x157 at t=999) amplifies;
    # a random model's trajectory also grows to O(100), so compare at the trajectory's scale.
    assert max_rel_error(got, expected) < 1e-5, f"{sampler} eta={eta} cfg={cfg}: {max_rel_error(got, expected):.2e}"


def test_engine_dpm_solver_on_a_dit_matches_the_reference():
    model = tiny_dit(1)
    z, labels = torch.randn(2, 4, 8, 8), torch.tensor([4, 9])

    def guided_eps(x, t):
        with torch.no_grad():
            xx = torch.cat([x, x]).float()
            out = model.forward_with_cfg(xx, torch.full((4,), t), torch.tensor([4, 9, 10, 10]), 2.0)
        return out[:2, :4]

    expected = ref_dpm_solver_pp_2m(guided_eps, z, 6)
    got = SamplingEngine(model, make_plan("dpm-solver++", 6), batch_size=2, cfg_scale=2.0).run(z, labels)
    assert_close(got, expected.float(), rtol=1e-4, atol=1e-4, what="engine DPM-Solver++ on a DiT")


def test_timestep_embeddings_are_computed_once_before_the_loop():
    model = tiny_dit()
    rows = []
    model.t_embedder.mlp[0].register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    engine = SamplingEngine(model, make_plan("ddim", 4), batch_size=3, cfg_scale=2.0)
    engine.run(torch.randn(3, 4, 8, 8), torch.tensor([1, 2, 3]))
    assert rows == [4]  # one row per step, at construction; none per sample or per step
    assert model.t_embedder is not engine.model.t_embedder and engine.model.blocks is model.blocks
    with torch.no_grad():  # the table row the engine looks up is the model's own embedding
        expected = model.t_embedder(torch.tensor([int(engine.plan.timesteps[2])]))
        engine.k.fill_(2)
        got = engine.model.t_embedder(torch.zeros(6))
    assert got.shape == (6, 32)
    assert_close(got[5:], expected, what="embedding of step 2")


def test_the_callers_model_is_left_as_it_was():
    model = tiny_dit().train()  # label dropout on while training: the engine must not drop labels
    model.y_embedder.dropout_prob = 1.0  # (every label, were it dropped)
    z, labels = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    a = SamplingEngine(model, make_plan("ddim", 3), batch_size=2, cfg_scale=1.5).run(z, labels)
    assert model.training and all(m.training for m in model.modules())
    b = SamplingEngine(model.eval(), make_plan("ddim", 3), batch_size=2, cfg_scale=1.5).run(z, labels)
    assert torch.equal(a, b)


def test_low_precision_casts_a_copy_of_the_weights_once():
    model = tiny_dit()
    engine = SamplingEngine(model, make_plan("ddim", 3), batch_size=2, cfg_scale=1.5, precision="bf16")
    assert all(p.dtype == torch.bfloat16 for p in engine.model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    z, labels = torch.randn(2, 4, 8, 8), torch.tensor([0, 5])
    ref = SamplingEngine(model, make_plan("ddim", 3), batch_size=2, cfg_scale=1.5).run(z, labels)
    low = engine.run(z, labels)
    assert low.dtype == torch.float32
    assert (low - ref).abs().max() < 0.1 * ref.abs().max()


# ------------------------------------------------------------------------------------------
# Reproducibility independent of batching
# ------------------------------------------------------------------------------------------


def test_noise_and_labels_depend_only_on_seed_and_index():
    z_all, n_all = index_noise(3, range(6), (4, 2, 2), steps=4)
    z_sub, n_sub = index_noise(3, [4, 1], (4, 2, 2), steps=4)
    assert torch.equal(z_sub, z_all[[4, 1]]) and torch.equal(n_sub, n_all[:, [4, 1]])
    assert torch.equal(index_noise(3, [4], (4, 2, 2))[0], z_all[[4]])  # initial noise does not depend on steps
    assert not torch.equal(index_noise(4, [4], (4, 2, 2))[0], z_all[[4]])
    flat = torch.cat([z_all.flatten(1), n_all.transpose(0, 1).flatten(1)], dim=1)  # (6 samples, all their draws)
    assert (torch.corrcoef(flat).abs() - torch.eye(6)).max() < 0.3  # six independent streams
    assert abs(flat.mean()) < 0.1 and abs(flat.std() - 1) < 0.1
    assert torch.equal(index_labels(3, [5, 2], 10), index_labels(3, range(6), 10)[[5, 2]])
    assert set(index_labels(3, range(200), 10).tolist()) == set(range(10))
    assert index_labels(0, range(5), 10, labels=(7, 8)).tolist() == [7, 8, 7, 8, 7]


@pytest.mark.parametrize("sampler", ["ddpm", "dpm-solver++"])
def test_samples_do_not_depend_on_the_batch_size(sampler, monkeypatch):
    """By construction, not by tolerance: every sample gets bit-identical inputs (initial noise,
    per-step noise, label) whatever the batch size; the samples then agree to float64 rounding.
    (In float32 they need not: BLAS blocks a GEMM differently for other row counts, differences of
    1e-6 that a solver can amplify to 1e-4, and which change with the thread count.)"""
    fed = []  # (z, labels, noise) of every engine.run call
    real_run = SamplingEngine.run

    def recording_run(self, z, labels, noise=None):
        fed.append((z.clone(), labels.clone(), None if noise is None else noise.clone()))
        return real_run(self, z, labels, noise)

    monkeypatch.setattr(SamplingEngine, "run", recording_run)
    model = tiny_dit(2)
    kw = dict(num_samples=5, sampler=sampler, steps=4, cfg_scale=1.5, seed=11, precision="fp64")
    inputs = {}
    outputs = {}
    for batch_size, num in ((5, 5), (2, 5), (2, 2)):  # (2, 2): the first two samples of the same run
        fed.clear()
        outputs[batch_size, num] = ditfast.sample(model, batch_size=batch_size, **{**kw, "num_samples": num})
        assert [len(z) for z, _, _ in fed] == [min(batch_size, num - s) for s in range(0, num, batch_size)]
        z, labels, noise = (torch.cat(parts, dim=d) if parts[0] is not None else None
                            for parts, d in zip(zip(*fed), (0, 0, 1)))  # fmt: skip
        inputs[batch_size, num] = (z, labels, noise)
    one, two, head = outputs[5, 5], outputs[2, 5], outputs[2, 2]
    z5, labels5, noise5 = inputs[5, 5]
    for key in ((2, 5), (2, 2)):
        z, labels, noise = inputs[key]
        n = len(z)
        assert torch.equal(z, z5[:n]) and torch.equal(labels, labels5[:n]), f"batch {key}: other draws"
        assert (noise is None) == (sampler != "ddpm") and (noise is None or torch.equal(noise, noise5[:, :n]))
    assert z5.std() > 0.5 and len(set(labels5.tolist())) > 1  # real draws, not zeros
    assert one.latents.dtype == torch.float64 and one.latents.abs().max() > 0.5 and one.images is None
    assert torch.equal(one.labels, two.labels)
    assert_close(two.latents, one.latents, what=f"{sampler}: batch 2 vs batch 5 (float64)")
    assert_close(head.latents, one.latents[:2], what="prefix of the run (float64)")
    # float32 agrees with the float64 reference to float32 accuracy (the engine's state is float32)
    fp32 = ditfast.sample(model, batch_size=2, **{**kw, "precision": "fp32"})
    assert fp32.latents.dtype == torch.float32
    assert max_rel_error(fp32.latents, one.latents) < 1e-3


class FakeVAE:
    """The surface of a diffusers AutoencoderKL that ditfast.vae.decode uses (no diffusers here)."""

    dtype = torch.float32

    def decode(self, z):
        return SimpleNamespace(sample=torch.tanh(z[:, :3]).repeat_interleave(8, 2).repeat_interleave(8, 3))


def test_sample_decodes_with_a_vae():
    model = tiny_dit(6)
    out = ditfast.sample(model, num_samples=3, sampler="ddim", steps=3, cfg_scale=1.5, vae=FakeVAE(), batch_size=2)
    assert out.images.dtype == torch.uint8 and out.images.shape == (3, 64, 64, 3)
    expected = pixels_to_uint8(FakeVAE().decode(out.latents / 0.18215).sample)
    assert torch.equal(out.images, expected)


# ------------------------------------------------------------------------------------------
# CLI, shards, multi-process, restarts
# ------------------------------------------------------------------------------------------


def save_tiny_checkpoint(path, **kw) -> str:
    torch.save(tiny_dit(3, **{"hidden_size": 64, "num_heads": 1, **kw}).state_dict(), path)  # heads as load_model infers
    return str(path)


def test_cli_end_to_end_random_pixel_model(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--model", "DiT-S/8", "--input-size", "8", "--in-channels", "3", "--num-classes", "10", "--labels", "1,2",
            "--num-samples", "3", "--steps", "2", "--cfg-scale", "1.5", "--batch-size", "2", "--shard-size", "2",
            "--out", str(out), "--no-progress"]  # fmt: skip
    assert cli_main(["sample", *argv]) == 0
    text = capsys.readouterr().out
    per_image = ditfast.gflops(ditfast.DiT_models["DiT-S/8"](input_size=8, in_channels=3, num_classes=10)) * 2 * 2
    assert f"= {ditfast.flops.fmt_sig(per_image)} Gflops/image" in text and "2 model forwards per image on the CFG-doubled batch" in text
    with np.load(out / "samples.npz") as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (3, 8, 8, 3)
    assert labels.tolist() == [1, 2, 1]
    assert images.std() > 0  # not a constant image
    for i in range(3):
        assert np.array_equal(read_png(str(out / "images" / f"{i:06d}.png")).numpy(), images[i])
    assert read_png(str(out / "grid.png")).shape[2] == 3
    # the same command again: complete, nothing to do
    assert sample_main(argv) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_cli_latents_out_from_checkpoint(tmp_path):
    ckpt = save_tiny_checkpoint(tmp_path / "tiny.pt")
    out = tmp_path / "run"
    argv = ["--ckpt", ckpt, "--num-samples", "3", "--sampler", "dpm-solver++", "--steps", "2", "--cfg-scale", "1",
            "--batch-size", "4", "--out", str(out), "--no-progress"]  # fmt: skip
    assert sample_main(argv) == 0
    with np.load(out / "samples.npz") as f:
        latents = f["arr_0"]
    assert latents.dtype == np.float32 and latents.shape == (3, 4, 8, 8) and np.isfinite(latents).all()
    assert not (out / "images").exists() or not os.listdir(out / "images")



def _rank_worker(rank: int, world: int, port: int, cfg: SampleConfig) -> None:
    join_process_group_env(rank, world, port)
    result = run(cfg)
    assert result["complete"]
    with open(os.path.join(cfg.out, f"made_by_rank{rank}"), "w") as f:
        f.write(str(result["made"]))


def _cfg(tmp_path, name, ckpt, **kw) -> SampleConfig:
    base = dict(ckpt=ckpt, num_samples=6, sampler="ddpm", steps=3, cfg_scale=1.5, batch_size=2, shard_size=2, seed=5,
                out=str(tmp_path / name), progress=False, device="cpu")  # fmt: skip
    return SampleConfig(**{**base, **kw})


def _load(cfg: SampleConfig):
    with np.load(os.path.join(cfg.out, "samples.npz")) as f:
        return f["arr_0"], f["arr_1"]


def test_two_process_gloo_run_equals_one_process(tmp_path):
    ckpt = save_tiny_checkpoint(tmp_path / "tiny.pt")
    single = _cfg(tmp_path, "one", ckpt)
    assert run(single)["complete"]
    multi = _cfg(tmp_path, "two", ckpt)
    mp.spawn(_rank_worker, args=(2, free_port(), multi), nprocs=2, join=True)
    (a, la), (b, lb) = _load(single), _load(multi)
    assert a.shape == (6, 4, 8, 8) and np.array_equal(la, lb)
    assert_close(torch.from_numpy(b), torch.from_numpy(a), rtol=1e-6, atol=1e-6, what="2 ranks vs 1")
    assert len(os.listdir(os.path.join(multi.out, "shards"))) == 3
    made = [int(open(os.path.join(multi.out, f"made_by_rank{r}")).read()) for r in range(2)]
    assert made == [4, 2]  # shards dealt round-robin: each sample made once, by one rank


def test_killed_run_restarts_without_duplicates_or_losses(tmp_path):
    ckpt = save_tiny_checkpoint(tmp_path / "tiny.pt")
    whole = _cfg(tmp_path, "whole", ckpt, num_samples=7, sampler="dpm-solver++")
    assert run(whole)["complete"]
    cut = _cfg(tmp_path, "cut", ckpt, num_samples=7, sampler="dpm-solver++", max_shards=1)
    first = run(cut)
    assert not first["complete"] and first["made"] == 2
    shards = os.path.join(cut.out, "shards")
    assert sorted(os.listdir(shards)) == ["shard_00000000_00000002.npz"]
    kept = os.path.getmtime(os.path.join(shards, "shard_00000000_00000002.npz"))
    with open(os.path.join(shards, "shard_00000002_00000004.npz.tmp999"), "wb") as f:
        f.write(b"half a shard from a killed process")
    second = run(cut)  # max_shards=1 again: one more shard
    assert not second["complete"] and second["made"] == 2
    third = run(_cfg(tmp_path, "cut", ckpt, num_samples=7, sampler="dpm-solver++", batch_size=3))  # any batch size
    assert third["complete"] and third["made"] == 3
    assert os.path.getmtime(os.path.join(shards, "shard_00000000_00000002.npz")) == kept
    assert not [n for n in os.listdir(shards) if ".tmp" in n]
    (a, la), (b, lb) = _load(whole), _load(cut)
    assert b.shape[0] == 7 and np.array_equal(la, lb)
    assert_close(torch.from_numpy(b), torch.from_numpy(a), rtol=1e-5, atol=1e-5, what="restarted vs whole run")


def test_restart_with_other_settings_is_refused(tmp_path):
    ckpt = save_tiny_checkpoint(tmp_path / "tiny.pt")
    run(_cfg(tmp_path, "r", ckpt, max_shards=1))
    with pytest.raises(ValueError, match="other settings.*seed"):
        run(_cfg(tmp_path, "r", ckpt, seed=6))


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override,message", [
    (dict(ckpt="missing.pt"), "checkpoint not found"),
    (dict(vae="no-such-vae"), "VAE folder not found"),
    (dict(cfg_scale=0.5), "cfg scale must be >= 1"),
    (dict(steps=0), r"steps must lie in \[2, 1000\]"),
    (dict(steps=1001, sampler="dpm-solver++"), r"steps must lie in \[1, 1000\]"),
    (dict(labels=(3, 10)), r"labels must lie in \[0, 9\]"),
    (dict(labels=(-1,)), "labels must be >= 0"),
    (dict(batch_size=0), "batch size must be positive"),
    (dict(num_samples=-2), "num samples must be positive"),
    (dict(eta=0.5), "eta .* only used by ddim"),
    (dict(mode="graph"), "CUDA"),
    (dict(sampler="euler"), "sampler must be one of"),
])  # fmt: skip
def test_bad_input_is_refused_before_any_work(tmp_path, override, message):
    cfg = SampleConfig(**{**dict(model="DiT-S/8", input_size=8, num_classes=10, steps=3, out=str(tmp_path / "o"),
                                 progress=False, device="cpu"), **override})  # fmt: skip
    with pytest.raises(ValueError, match=message):
        run(cfg)
    assert not (tmp_path / "o").exists()


def test_cli_reports_bad_input(tmp_path, capsys):
    assert sample_main(["--cfg-scale", "0.9", "--out", str(tmp_path / "o")]) == 2
    assert "argument --cfg-scale: expected a number in [1, inf)" in capsys.readouterr().err


def test_sample_refuses_unknown_models():
    with pytest.raises(ValueError, match="neither"):
        ditfast.sample("DiT-Q/2", num_samples=1)


# ------------------------------------------------------------------------------------------
# The graph body on the CPU: what a CUDA graph needs of the step, checked without a GPU
# ------------------------------------------------------------------------------------------

def test_run_checks_labels_once_per_batch_instead_of_every_step():
    model = tiny_dit()
    engine = SamplingEngine(model, make_plan("ddim", 2), batch_size=2, cfg_scale=1.5)
    assert model.check_label_range and not engine.model.check_label_range
    for bad in ([3, 10], [-1, 2]):  # 10 is the null class: not a label to sample
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 9\]"):
            engine.run(torch.randn(2, 4, 8, 8), torch.tensor(bad))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm-solver++"])
@pytest.mark.parametrize("cfg,precision", [(1.0, "fp32"), (1.5, "fp32"), (4.0, "bf16")])
@pytest.mark.parametrize("arch", ["DiT", "DiffiT"])
def test_the_step_is_capturable_and_the_same_at_every_step(sampler, cfg, precision, arch):
    """What graph mode captures is ``SamplingEngine._step`` over the static buffers; a replay
    repeats its ops exactly. So on every step it must run the same ops on the same shapes with the
    same non-tensor arguments (per-step values come from device tensors indexed by ``k``), never
    read device values on the host, draw random numbers or build tensors from Python values, and
    leave its results in the same buffers. (Copies between devices cannot show on a CPU; the GPU
    test below runs the real capture.)"""
    if arch == "DiT":
        model = tiny_dit(6)
    else:  # TMSA's bias table and the power-cosine guidance (its per-sample scale) in the step too
        torch.manual_seed(6)
        model = randomize_(ditfast.DiffiT(**{**TINY, "depth": 2}), seed=6)
    model.train()  # training mode on the caller's model: label dropout must still be off
    plan = make_plan(sampler, 4)
    engine = SamplingEngine(model, plan, batch_size=3, cfg_scale=cfg, precision=precision)
    buffers = {n: getattr(engine, n) for n in ("x", "x0_prev", "noise", "y", "k") if getattr(engine, n) is not None}
    engine.x.normal_()
    if engine.noise is not None:
        engine.noise.normal_()
    assert_replayable([engine._step] * plan.steps, buffers)
    assert int(engine.k) == plan.steps and torch.isfinite(engine.x).all()


# ------------------------------------------------------------------------------------------
# GPU: graph capture and torch.compile share the step with the eager path
# ------------------------------------------------------------------------------------------


@pytest.mark.gpu
@NEEDS_CUDA
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm-solver++"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_graph_mode_equals_eager_mode(sampler, precision):
    model = tiny_dit(4).cuda()
    plan = make_plan(sampler, 5)
    z, labels = torch.randn(3, 4, 8, 8), torch.tensor([1, 2, 3])
    noise = torch.randn(5, 3, 4, 8, 8) if plan.stochastic else None
    kw = dict(batch_size=4, cfg_scale=1.5, precision=precision)
    eager = SamplingEngine(model, plan, mode="eager", **kw).run(z, labels, noise)
    graph_engine = SamplingEngine(model, plan, mode="graph", **kw)
    first = graph_engine.run(z, labels, noise)
    again = graph_engine.run(z.flip(0), labels.flip(0), noise.flip(1) if noise is not None else None)  # replayed graph
    # the same kernels in the same order: equal up to cuBLAS picking another algorithm under capture
    bound = 1e-6 if precision == "fp32" else 1e-2
    assert max_rel_error(first, eager) <= bound, f"graph vs eager: {max_rel_error(first, eager):.2e}"
    assert max_rel_error(again, eager.flip(0)) <= bound, "a second batch through the same graph"


@pytest.mark.gpu
@NEEDS_CUDA
def test_compile_mode_matches_eager_mode():
    model = tiny_dit(5).cuda()
    plan = make_plan("ddpm", 4)
    z, labels, noise = torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.randn(4, 2, 4, 8, 8)
    eager = SamplingEngine(model, plan, batch_size=2, cfg_scale=1.5).run(z, labels, noise)
    compiled = SamplingEngine(model, plan, batch_size=2, cfg_scale=1.5, mode="compile").run(z, labels, noise)
    assert max_rel_error(compiled, eager) < 1e-5, f"compile vs eager: {max_rel_error(compiled, eager):.2e}"
