"""EDM (ditfast.edm): preconditioning, loss, sigma grid, Heun steps, the engine, and sampling and
training the image-space DiffiT through the API and the CLI."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from conftest import assert_close, assert_replayable, max_rel_error, randomize_
from ditfast.diffit_unet import DiffiTUNet, DiffiTUNet_models
from ditfast.edm import (
    EDMEngine, EDMPrecond, P_MEAN, P_STD, SIGMA_DATA, edm_loss, heun_step, loss_weight, make_edm_plan,
    precond_coefs, sample_sigma, sigma_grid,
)  # fmt: skip


def tiny_unet(seed: int = 0, **kw) -> DiffiTUNet:
    torch.manual_seed(seed)
    model = randomize_(DiffiTUNet_models["DiffiT-Digits8"](**{"channels": 16, **kw}), seed=seed).eval()
    with torch.no_grad():
        model.conv_out.weight.mul_(8.0)
    return model


# ------------------------------------------------------------------------------------------
# Preconditioning and loss
# ------------------------------------------------------------------------------------------


def test_precond_coefficients_against_independent_statements():
    sigma = torch.tensor([0.002, 0.1, 0.5, 1.0, 7.3, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = precond_coefs(sigma)
    d = SIGMA_DATA
    # at sigma = sigma_data: c_skip 1/2, c_out sigma_data / sqrt 2, c_in 1 / (sigma_data sqrt 2)
    s = precond_coefs(torch.tensor([d], dtype=torch.float64))
    assert_close(torch.cat(s[:3]), torch.tensor([0.5, d / math.sqrt(2), 1 / (d * math.sqrt(2))], dtype=torch.float64))
    # unit-variance network input for data of std sigma_data: c_in^2 (sigma_data^2 + sigma^2) = 1
    assert_close(c_in**2 * (d**2 + sigma**2), torch.ones_like(sigma))
    # c_skip minimises the effective target's variance: c_skip = c_out^2 / sigma^2 ...
    assert_close(c_skip, c_out**2 / sigma**2)
    # ... and the effective target (y - c_skip (y + sigma n)) / c_out has unit variance:
    # ((1 - c_skip)^2 sigma_data^2 + c_skip^2 sigma^2) / c_out^2 = 1
    assert_close(((1 - c_skip) ** 2 * d**2 + c_skip**2 * sigma**2) / c_out**2, torch.ones_like(sigma))
    # EDM's loss weight is 1 / c_out^2
    assert_close(loss_weight(sigma), 1 / c_out**2)
    assert_close(c_noise, torch.tensor([math.log(v) / 4 for v in sigma.tolist()], dtype=torch.float64))


class _Recorder(torch.nn.Module):
    """A stand-in network that records its inputs and returns a fixed function of them."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(1.0, dtype=torch.float64))
        self.calls = []

    def forward(self, x, c_noise, y=None, force_drop_ids=None):
        self.calls.append((x.clone(), c_noise.clone()))
        return self.w * torch.sin(x) + c_noise.view(-1, 1, 1, 1)


def test_precond_wrapper_feeds_c_in_x_and_c_noise():
    net = _Recorder()
    D = EDMPrecond(net)
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    sigma = torch.tensor([0.01, 1.0, 50.0], dtype=torch.float64)
    out = D(x, sigma)
    for b in range(3):
        s, d = sigma[b].item(), SIGMA_DATA
        c_in, c_skip, c_out = 1 / math.sqrt(s * s + d * d), d * d / (s * s + d * d), s * d / math.sqrt(s * s + d * d)
        assert_close(net.calls[0][0][b], c_in * x[b])
        assert abs(net.calls[0][1][b].item() - math.log(s) / 4) < 1e-12
        expected = c_skip * x[b] + c_out * (torch.sin(c_in * x[b]) + math.log(s) / 4)
        assert_close(out[b], expected)


def test_sample_sigma_is_log_normal():
    n = torch.tensor([-1.0, 0.0, 2.0])
    assert_close(sample_sigma(n), torch.tensor([math.exp(P_MEAN - P_STD), math.exp(P_MEAN), math.exp(P_MEAN + 2 * P_STD)]))


def test_training_loss_on_a_fixed_input():
    """edm_loss of a seeded model on fixed x, sigma, noise vs the same loss computed independently
    from the raw network and scalar coefficients; and the closed form when F = 0."""
    model = tiny_unet(seed=3)
    g = torch.Generator().manual_seed(7)
    x = torch.rand(3, 1, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(3, 1, 8, 8, generator=g)
    sigma = torch.tensor([0.05, 0.8, 12.0])
    y = torch.tensor([1, 4, 9])
    got = edm_loss(EDMPrecond(model), x, sigma, noise, y)
    assert got.shape == (3,)
    d = SIGMA_DATA
    for b in range(3):
        s = sigma[b].item()
        noisy = x[b : b + 1] + s * noise[b : b + 1]
        F_out = model(noisy / math.sqrt(s * s + d * d), torch.tensor([math.log(s) / 4]), y[b : b + 1])
        D = d * d / (s * s + d * d) * noisy + s * d / math.sqrt(s * s + d * d) * F_out
        want = (s * s + d * d) / (s * d) ** 2 * ((D - x[b : b + 1]) ** 2).mean()
        assert abs(got[b].item() - want.item()) <= 1e-5 * abs(want.item()), (b, got[b].item(), want.item())
    zero = DiffiTUNet_models["DiffiT-Digits8"](channels=16)  # conv_out zero-initialised: F = 0
    got0 = edm_loss(EDMPrecond(zero), x, sigma, noise, y)
    for b in range(3):
        s = sigma[b].item()
        c_skip = d * d / (s * s + d * d)
        want = (s * s + d * d) / (s * d) ** 2 * ((c_skip * (x[b] + s * noise[b]) - x[b]) ** 2).mean()
        assert abs(got0[b].item() - want.item()) <= 1e-5 * want.item()
    with pytest.raises(ValueError, match="edm_loss"):
        edm_loss(EDMPrecond(model), x, sigma[:2], noise, y)


# ------------------------------------------------------------------------------------------
# Sigma grid and steps
# ------------------------------------------------------------------------------------------


def test_sigma_grid_rho_7():
    grid = sigma_grid(18)
    assert grid.shape == (19,) and grid.dtype == torch.float64
    assert grid[0].item() == pytest.approx(80.0, rel=1e-12) and grid[17].item() == pytest.approx(0.002, rel=1e-12)
    assert grid[18].item() == 0.0 and bool((grid[:-1].diff() < 0).all())
    # sigma^(1/7) is evenly spaced from 80^(1/7) to 0.002^(1/7)
    roots = grid[:-1] ** (1 / 7)
    assert_close(roots.diff(), torch.full((17,), (0.002 ** (1 / 7) - 80 ** (1 / 7)) / 17, dtype=torch.float64))
    # three steps, by hand: the middle one is ((80^(1/7) + 0.002^(1/7)) / 2)^7
    mid = ((80 ** (1 / 7) + 0.002 ** (1 / 7)) / 2) ** 7
    assert_close(sigma_grid(3), torch.tensor([80.0, mid, 0.002, 0.0], dtype=torch.float64))
    assert sigma_grid(1).tolist() == [80.0, 0.0]
    with pytest.raises(ValueError, match="steps"):
        sigma_grid(0)


def _gauss_denoiser(x, s):
    """The exact denoiser of data ~ N(0, 1): D(x; s) = x / (1 + s^2)."""
    return x / (1 + s * s)


def test_one_heun_step_by_hand():
    """x = 1 from sigma 2 to 1 with D = x / (1 + s^2): d = (1 - 1/5) / 2 = 0.4, Euler x' = 0.6,
    d' = (0.6 - 0.3) / 1 = 0.3, Heun x = 1 - (0.4 + 0.3) / 2 = 0.65."""
    x = torch.tensor([1.0], dtype=torch.float64)
    out, denoised = heun_step(_gauss_denoiser, x, 2.0, 1.0)
    assert out.item() == pytest.approx(0.65, abs=1e-15)
    assert denoised.item() == pytest.approx(0.2, abs=1e-15)


def test_heun_is_second_order():
    """Against the exact ODE solution for N(0, 1) data, x(s) = x0 sqrt((1 + s^2) / (1 + s0^2)): the
    one-step error shrinks about 8x when the step halves (local error O(h^3)); Euler's about 4x."""
    x0, s0 = torch.tensor([1.0], dtype=torch.float64), 3.0
    errs = {"heun": [], "euler": []}
    for h in (0.2, 0.1, 0.05):
        exact = math.sqrt((1 + (s0 - h) ** 2) / (1 + s0**2))
        heun, _ = heun_step(_gauss_denoiser, x0, s0, s0 - h)
        d = (x0 - _gauss_denoiser(x0, s0)) / s0
        euler = x0 - h * d
        errs["heun"].append(abs(heun.item() - exact))
        errs["euler"].append(abs(euler.item() - exact))
    for a, b in zip(errs["heun"], errs["heun"][1:]):
        assert 7.0 < a / b < 9.0, errs
    for a, b in zip(errs["euler"], errs["euler"][1:]):
        assert 3.5 < a / b < 4.5, errs


def test_last_step_is_first_order():
    """To sigma = 0 the step is Euler's, which returns the denoised estimate, with one evaluation."""
    calls = []

    def D(x, s):
        calls.append(s)
        return _gauss_denoiser(x, s)

    x = torch.tensor([0.7, -1.3], dtype=torch.float64)
    out, _ = heun_step(D, x, 0.002, 0.0)
    assert calls == [0.002]
    assert_close(out, _gauss_denoiser(x, 0.002))
    calls.clear()
    heun_step(D, x, 2.0, 1.0)
    assert calls == [2.0, 1.0]


def test_stochastic_churn():
    """gamma = min(S_churn / N, sqrt 2 - 1) inside [S_min, S_max], else 0; the step first moves to
    sigma_hat = (1 + gamma) sigma by adding sqrt(sigma_hat^2 - sigma^2) * S_noise * eps."""
    plan = make_edm_plan(10, s_churn=2.0, s_min=0.05, s_max=10.0, s_noise=1.007)
    cur = plan.sigmas[:-1]
    inside = (cur >= 0.05) & (cur <= 10.0)
    assert 0 < int(inside.sum()) < 10
    assert_close(plan.gammas, torch.where(inside, torch.full_like(cur, 2.0 / 10), torch.zeros_like(cur)))
    assert make_edm_plan(4, s_churn=40.0).gammas.tolist() == [math.sqrt(2) - 1] * 4  # capped
    assert not make_edm_plan(4).stochastic and plan.stochastic and plan.model_evaluations == 19
    seen = []

    def D(x, s):
        seen.append((x.clone(), s))
        return _gauss_denoiser(x, s)

    x = torch.tensor([0.5, -2.0], dtype=torch.float64)
    eps = torch.tensor([1.5, 0.25], dtype=torch.float64)
    heun_step(D, x, 4.0, 3.0, gamma=0.2, noise=eps, s_noise=1.007)
    s_hat = 4.0 * 1.2
    assert seen[0][1] == pytest.approx(s_hat)
    assert_close(seen[0][0], x + math.sqrt(s_hat**2 - 16.0) * 1.007 * eps)
    with pytest.raises(ValueError, match="s_churn"):
        make_edm_plan(4, s_churn=-1.0)


# ------------------------------------------------------------------------------------------
# The engine
# ------------------------------------------------------------------------------------------


def test_engine_counts_evaluations_and_matches_a_plain_loop():
    """N steps = 2N - 1 model evaluations; the batch (with a padding row) equals a plain
    heun_step loop over the same denoiser, sample by sample."""
    model = tiny_unet()
    plan = make_edm_plan(3)
    engine = EDMEngine(model, plan, batch_size=3)
    z = torch.randn(2, 1, 8, 8)
    labels = torch.tensor([3, 7])
    calls = []
    handle = model.register_forward_hook(lambda m, i, o: calls.append(1))
    got = engine.run(z, labels)
    handle.remove()
    assert len(calls) == plan.model_evaluations == 5
    D = EDMPrecond(model)
    for b in range(2):
        x = z[b : b + 1] * 80.0
        for k in range(3):
            x, _ = heun_step(lambda v, s: D(v, torch.full((1,), s), labels[b : b + 1]), x, plan.sigmas[k].item(), plan.sigmas[k + 1].item())
        assert_close(got[b : b + 1], x, rtol=1e-4, atol=1e-4)


def test_engine_guidance_and_errors():
    model = tiny_unet()
    z, labels = torch.randn(2, 1, 8, 8), torch.tensor([3, 7])
    plan = make_edm_plan(2)
    cond = EDMEngine(model, plan, batch_size=2, cfg_scale=1.0).run(z, labels)
    guided = EDMEngine(model, plan, batch_size=2, cfg_scale=3.0).run(z, labels)
    assert not torch.allclose(cond, guided)
    uncond = DiffiTUNet(input_size=8, in_channels=1, channels=16, depths=(1, 1), window=4, num_heads=2)
    with pytest.raises(ValueError, match="classifier-free guidance"):
        EDMEngine(uncond, plan, batch_size=2, cfg_scale=2.0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA device"):
            EDMEngine(model, plan, batch_size=2, mode="graph")
    with pytest.raises(ValueError, match="per-step noise"):
        EDMEngine(model, make_edm_plan(2, s_churn=1.0), batch_size=2).run(z, labels)
    with pytest.raises(ValueError, match="labels must lie"):
        EDMEngine(model, plan, batch_size=2).run(z, torch.tensor([3, 10]))


@pytest.mark.parametrize("s_churn,cfg,precision", [(0.0, 1.0, "fp32"), (2.0, 1.5, "fp32"), (0.0, 3.0, "bf16")])
def test_the_steps_are_capturable_and_the_same_at_every_step(s_churn, cfg, precision):
    """Graph mode captures ``EDMEngine._step(last=False)`` (the Heun step, replayed N - 1 times) and
    ``_step(last=True)`` (once): each must run the same ops with the same arguments at every step
    (sigma_hat, sigma_next, the churn and the embedding row come from device tensors indexed by the
    step counter), nothing a graph cannot hold, and leave its results in the engine's buffers."""
    import functools

    model = tiny_unet().train()  # training mode on the caller's model: label dropout must still be off
    plan = make_edm_plan(4, s_churn=s_churn, s_min=0.05, s_max=10.0)
    assert plan.stochastic == (s_churn > 0) and (not plan.stochastic or 0 < int((plan.gammas > 0).sum()) < 4)
    engine = EDMEngine(model, plan, batch_size=3, cfg_scale=cfg, precision=precision)
    buffers = {n: getattr(engine, n) for n in ("x", "k", "e", "y", "noise") if getattr(engine, n) is not None}
    engine.x.normal_().mul_(80.0)
    engine.y[:3] = torch.tensor([1, 2, 3])
    if engine.noise is not None:
        engine.noise.normal_()
    heun, last = functools.partial(engine._step, False), functools.partial(engine._step, True)
    assert_replayable([heun] * (plan.steps - 1) + [last], buffers)
    assert int(engine.k) == plan.steps and torch.isfinite(engine.x).all()


def test_engine_step_functions_equal_the_heun_steps_with_the_plans_values():
    """The buffer-driven steps (device-side sigmas, the precomputed embedding table, churn from the
    noise buffer) give what heun_step gives with the plan's float sigmas and a denoiser that embeds
    its timestep itself, step by step (fp64, stochastic: every path of the step is used)."""
    model = tiny_unet(seed=3).double()
    plan = make_edm_plan(4, s_churn=2.0, s_min=0.05, s_max=10.0)
    engine = EDMEngine(model, plan, batch_size=2, cfg_scale=2.0, precision="fp64")
    z, labels, noise = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.tensor([4, 9]), torch.randn(4, 2, 1, 8, 8, dtype=torch.float64)
    got = engine.run(z, labels, noise)
    D = EDMPrecond(model)
    y = torch.tensor([4, 9, 10, 10])

    def guided(v, s):
        cond, null = D(torch.cat([v, v]), torch.full((4,), s, dtype=torch.float64), y).chunk(2)
        return null + 2.0 * (cond - null)

    x = z * 80.0
    for k in range(4):
        x, _ = heun_step(guided, x, plan.sigmas[k].item(), plan.sigmas[k + 1].item(), plan.gammas[k].item(), noise[k], plan.s_noise)
    assert_close(got, x, rtol=1e-9, atol=1e-9)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CUDA graphs)")
@pytest.mark.parametrize("s_churn", [0.0, 2.0])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_graph_mode_equals_eager_mode(s_churn, precision):
    model = tiny_unet().cuda()
    plan = make_edm_plan(5, s_churn=s_churn, s_min=0.05, s_max=10.0)
    z, labels = torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3])
    noise = torch.randn(5, 3, 1, 8, 8) if plan.stochastic else None
    kw = dict(batch_size=4, cfg_scale=1.5, precision=precision)
    eager = EDMEngine(model, plan, mode="eager", **kw).run(z.cuda(), labels.cuda(), None if noise is None else noise.cuda())
    graph_engine = EDMEngine(model, plan, mode="graph", **kw)
    first = graph_engine.run(z.cuda(), labels.cuda(), None if noise is None else noise.cuda())
    again = graph_engine.run(z.flip(0).cuda(), labels.flip(0).cuda(), None if noise is None else noise.flip(1).cuda())
    bound = 1e-6 if precision == "fp32" else 1e-2  # the same kernels; cuBLAS may pick another algorithm under capture
    assert max_rel_error(first, eager) <= bound, f"graph vs eager: {max_rel_error(first, eager):.2e}"
    assert max_rel_error(again, eager.flip(0)) <= bound, "a second batch through the same graphs"


# ------------------------------------------------------------------------------------------
# Through the API and the CLI
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("s_churn", [0.0, 2.0])
def test_samples_do_not_depend_on_the_batch_size(s_churn):
    """Sample i depends only on (seed, i): batch 5, batch 2 and a run of the first two agree (fp64),
    deterministic and stochastic; and sample i is the engine run on index_noise(seed, [i])."""
    import ditfast
    from ditfast.sampling import index_noise

    model = tiny_unet(seed=1)
    kw = dict(sampler="edm-heun", steps=3, cfg_scale=1.5, seed=11, precision="fp64", s_churn=s_churn, labels=[2, 5, 7])
    runs = {(b, n): ditfast.sample(model, batch_size=b, num_samples=n, **kw) for b, n in ((5, 5), (2, 5), (2, 2))}
    ref = runs[5, 5].latents
    assert ref.dtype == torch.float64 and ref.shape == (5, 1, 8, 8) and runs[5, 5].images.shape == (5, 8, 8, 1)
    assert_close(runs[2, 5].latents, ref, rtol=1e-9, atol=1e-9)
    assert_close(runs[2, 2].latents, ref[:2], rtol=1e-9, atol=1e-9)
    assert runs[5, 5].labels.tolist() == [2, 5, 7, 2, 5]
    plan = make_edm_plan(3, s_churn=s_churn)
    engine = EDMEngine(model.double(), plan, batch_size=1, cfg_scale=1.5, precision="fp64")
    z, noise = index_noise(11, [3], (1, 8, 8), plan.steps if plan.stochastic else 0)
    assert_close(engine.run(z, torch.tensor([2]), noise), ref[3:4], rtol=1e-9, atol=1e-9)
    assert not torch.allclose(ref[0], ref[3])  # other noise, other sample


def test_sample_rejects_mismatched_samplers():
    import ditfast

    with pytest.raises(ValueError, match="edm-heun"):
        ditfast.sample(tiny_unet(), sampler="ddim", steps=3, num_samples=1, cfg_scale=1.0)
    with pytest.raises(ValueError, match="s_churn"):
        ditfast.sample("DiffiT-Digits8", sampler="ddim", steps=3, num_samples=1, cfg_scale=1.0, s_churn=1.0)
    with pytest.raises(ValueError, match="s_noise"):
        ditfast.sample("DiffiT-Digits8", sampler="edm-heun", steps=3, num_samples=1, cfg_scale=1.0, s_noise=-1.0)


def test_cli_train_and_sample(tmp_path):
    """ditfast train on the digits (pixel space, EDM loss) for a few steps, then ditfast sample
    --sampler edm-heun from its checkpoint and from its exported EMA weights."""
    from ditfast import load_model
    from ditfast.cli import main

    run, export = tmp_path / "run", tmp_path / "ema.safetensors"
    assert main(["train", "--model", "DiffiT-Digits8", "--image-size", "8", "--hidden-size", "16", "--steps", "3",
                 "--global-batch", "6", "--log-every", "1", "--out", str(run), "--export", str(export), "--no-progress"]) == 0  # fmt: skip
    log = [json.loads(line) for line in open(run / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3] and all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in log)
    ckpt = run / "checkpoints" / "0000003.pt"
    model = load_model(str(ckpt))
    assert isinstance(model, DiffiTUNet) and model.channels == 16 and model.num_classes == 10 and model.input_size == 8
    assert load_model(str(export)).config == model.config
    out = tmp_path / "samples"
    assert main(["sample", "--ckpt", str(ckpt), "--sampler", "edm-heun", "--steps", "2", "--num-samples", "3",
                 "--batch-size", "2", "--cfg-scale", "2", "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    with np.load(out / "samples.npz") as f:
        assert f["arr_0"].shape == (3, 8, 8, 1) and f["arr_0"].dtype == np.uint8 and f["arr_1"].shape == (3,)
    assert os.path.isfile(out / "grid.png")
    assert main(["train", "--model", "DiffiT-Digits8", "--image-size", "8", "--depth", "2", "--steps", "1",
                 "--out", str(tmp_path / "bad"), "--no-progress"]) == 2  # fmt: skip


def test_engine_samples_in_eval_mode_and_leaves_the_model_alone():
    """A model handed over in training mode (label dropout on) samples as in eval mode; its flags
    are unchanged afterwards."""
    model = tiny_unet()
    z, labels = torch.randn(2, 1, 8, 8), torch.tensor([3, 7])
    plan = make_edm_plan(2)
    ref = EDMEngine(model.eval(), plan, batch_size=2).run(z, labels)
    model.train()
    model.y_embedder.dropout_prob = 1.0  # in training mode every label would be dropped
    got = EDMEngine(model, plan, batch_size=2).run(z, labels)
    assert torch.equal(got, ref)
    assert model.training and model.check_label_range


def test_unconditional_model_samples_without_labels():
    import ditfast

    torch.manual_seed(0)
    model = randomize_(DiffiTUNet(input_size=8, in_channels=3, channels=16, depths=(1, 1), window=4, num_heads=2)).eval()
    gen = ditfast.sample(model, sampler="edm-heun", steps=2, num_samples=3, cfg_scale=1.0, batch_size=2)
    assert gen.images.shape == (3, 8, 8, 3) and gen.labels.tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="classifier-free guidance"):
        ditfast.sample(model, sampler="edm-heun", steps=2, num_samples=1, cfg_scale=2.0)
