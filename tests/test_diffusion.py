"""Tests for ditfast.diffusion against references written independently here.

Every expected value is computed in this file from the closed-form formulas (float64), never
with the module's own helpers. The samplers are compared with a loop written here that draws
its random numbers in the documented order.
"""

import math

import numpy as np
import pytest
import torch

from ditfast.diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    SpacedDiffusion,
    create_diffusion,
    get_named_beta_schedule,
    space_timesteps,
)
from ditfast.diffusion.gaussian_diffusion import discretized_gaussian_log_likelihood

SHAPE = (3, 2, 4, 4)  # (N, C, H, W)


# ----------------------------------------------------------------------------- references


def ref_linear_betas(T):
    s = 1000.0 / T
    lo, hi = s * 1e-4, s * 0.02
    return [lo + i * (hi - lo) / (T - 1) for i in range(T)]


def ref_alphas_cumprod(T):
    out, p = [], 1.0
    for b in ref_linear_betas(T):
        p *= 1.0 - b
        out.append(p)
    return out


def ref_process(kept_acp):
    """Per-step float64 quantities of a (possibly respaced) process given its alphas_cumprod."""
    ab = torch.tensor(kept_acp, dtype=torch.float64)
    abp = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    beta = 1 - ab / abp
    post_var = beta * (1 - abp) / (1 - ab)
    post_logvar = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
    large_var = torch.cat([post_var[1:2], beta[1:]])
    return dict(
        ab=ab, abp=abp, beta=beta, post_var=post_var, post_logvar=post_logvar,
        coef1=beta * abp.sqrt() / (1 - ab), coef2=(1 - abp) * (1 - beta).sqrt() / (1 - ab),
        large_var=large_var,
    )


def col(v, t):
    """v[t] shaped (N, 1, 1, 1) for broadcasting."""
    return v[t].view(-1, 1, 1, 1)


def ref_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def ref_decoder_loglik(x, mean, log_scale):
    inv = torch.exp(-log_scale)
    hi = ref_cdf(inv * (x - mean + 1 / 255))
    lo = ref_cdf(inv * (x - mean - 1 / 255))
    mid = torch.log(torch.clamp(hi - lo, min=1e-12))
    left = torch.log(torch.clamp(hi, min=1e-12))
    right = torch.log(torch.clamp(1 - lo, min=1e-12))
    return torch.where(x < -0.999, left, torch.where(x > 0.999, right, mid))


def ref_reverse(P, x, t, out, mean_type, var_type, clip):
    """Mean / log-variance / x0 of p(x_{t-1} | x_t) from a raw model output (float64)."""
    C = x.shape[1]
    if var_type == "learned_range":
        out, v = out[:, :C], out[:, C:]
        frac = (v + 1) / 2
        logvar = frac * torch.log(col(P["beta"], t)) + (1 - frac) * col(P["post_logvar"], t)
    elif var_type == "fixed_large":
        logvar = torch.log(col(P["large_var"], t)).expand_as(x)
    else:
        logvar = col(P["post_logvar"], t).expand_as(x)
    if mean_type == "eps":
        x0 = x / col(P["ab"], t).sqrt() - (1 / col(P["ab"], t) - 1).sqrt() * out
    else:
        x0 = out
    if clip:
        x0 = x0.clamp(-1, 1)
    mean = col(P["coef1"], t) * x0 + col(P["coef2"], t) * x
    return mean, logvar, x0


class FakeModel:
    """A fixed random map with 2C (or C) output channels; records the timesteps it receives.

    With ``dither`` it also draws one randn of its own per call (like dropout would), so the
    order of the sampler's random draws relative to the model call matters.
    """

    def __init__(self, out_channels, dither=False, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(out_channels, SHAPE[1], generator=g, dtype=torch.float64) * 0.6
        self.b = torch.randn(out_channels, generator=g, dtype=torch.float64) * 0.1
        self.dither = dither
        self.seen = []

    def __call__(self, x, t, scale=1.0):
        self.seen.append(t.clone())
        h = torch.einsum("oc,nchw->nohw", self.W.to(x.dtype), x)
        h = h + self.b.to(x.dtype).view(1, -1, 1, 1) + (t.to(x.dtype) / 1000.0).view(-1, 1, 1, 1)
        out = torch.tanh(scale * h)
        if self.dither:
            out = out + 0.01 * torch.randn(out.shape).to(x.dtype)
        return out


def close(actual, expected, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- schedules


def test_linear_schedule_values():
    b = get_named_beta_schedule("linear", 1000)
    assert b.dtype == np.float64 and b.shape == (1000,)
    assert b[0] == pytest.approx(1e-4, rel=1e-12) and b[-1] == pytest.approx(0.02, rel=1e-12)
    np.testing.assert_allclose(b, ref_linear_betas(1000), rtol=1e-12)
    b250 = get_named_beta_schedule("linear", 250)
    assert b250[0] == pytest.approx(4e-4, rel=1e-12) and b250[-1] == pytest.approx(0.08, rel=1e-12)

    d = create_diffusion("", learn_sigma=False)
    acp = ref_alphas_cumprod(1000)
    for t in (0, 1, 2, 500, 999):
        abp = acp[t - 1] if t else 1.0
        beta = ref_linear_betas(1000)[t]
        assert d.alphas_cumprod[t] == pytest.approx(acp[t], rel=1e-12)
        assert d.alphas_cumprod_prev[t] == pytest.approx(abp, rel=1e-12)
        pv = beta * (1 - abp) / (1 - acp[t])
        assert d.posterior_variance[t] == pytest.approx(pv, rel=1e-10, abs=1e-300)
        assert d.posterior_mean_coef1[t] == pytest.approx(beta * abp**0.5 / (1 - acp[t]), rel=1e-10)
        assert d.posterior_mean_coef2[t] == pytest.approx(
            (1 - abp) * (1 - beta) ** 0.5 / (1 - acp[t]), rel=1e-10
        )
        if t:
            assert d.posterior_log_variance_clipped[t] == pytest.approx(math.log(pv), rel=1e-10)
    assert d.posterior_variance[0] == 0.0
    assert d.posterior_log_variance_clipped[0] == d.posterior_log_variance_clipped[1]


def test_cosine_schedule():
    T = 100
    b = get_named_beta_schedule("squaredcos_cap_v2", T)
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    expected = [min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)]
    np.testing.assert_allclose(b, expected, rtol=1e-12)
    assert b[-1] == 0.999
    with pytest.raises(NotImplementedError):
        get_named_beta_schedule("nope", 10)


# ----------------------------------------------------------------------------- respacing


def ref_sections(T, counts):
    """Official striding: near-equal sections, fractional stride accumulated by addition."""
    n = len(counts)
    sizes = [T // n + (1 if i < T % n else 0) for i in range(n)]
    out, start = [], 0
    for size, count in zip(sizes, counts):
        step = (size - 1) / (count - 1) if count > 1 else 1
        pos = 0.0
        for _ in range(count):
            out.append(start + round(pos))
            pos += step
        start += size
    return set(out)


def test_space_timesteps():
    s250 = space_timesteps(1000, "250")
    assert isinstance(s250, set) and len(s250) == 250 and {0, 999} <= s250
    assert s250 == {round(k * 999 / 249) for k in range(250)} == ref_sections(1000, [250])
    # For 21 steps repeated addition rounds index 10 to 499, k * stride would give 500.
    s21 = space_timesteps(1000, "21")
    assert s21 == ref_sections(1000, [21]) and 499 in s21 and 500 not in s21
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert space_timesteps(1000, "10,20") == ref_sections(1000, [10, 20])
    assert space_timesteps(1000, [10, 20]) == space_timesteps(1000, "10,20")
    assert len(space_timesteps(1000, "10,20")) == 30
    # uneven split: sizes 4, 3, 3
    assert space_timesteps(10, "2,2,2") == {0, 3, 4, 6, 7, 9}
    assert space_timesteps(10, "1") == {0}


@pytest.mark.parametrize("spec", ["ddim600", "1001", "10,600", "ddim1"])
def test_space_timesteps_errors(spec):
    with pytest.raises(ValueError):
        space_timesteps(1000, spec)


def test_spaced_betas_and_map():
    d = create_diffusion("250")
    acp = ref_alphas_cumprod(1000)
    kept = sorted(space_timesteps(1000, "250"))
    assert d.timestep_map == kept and d.num_timesteps == 250 and d.original_num_steps == 1000
    expected = [1 - acp[kept[0]]] + [1 - acp[b] / acp[a] for a, b in zip(kept, kept[1:])]
    np.testing.assert_allclose(d.betas, expected, rtol=1e-10)
    np.testing.assert_allclose(d.alphas_cumprod, [acp[k] for k in kept], rtol=1e-10)
    with pytest.raises(ValueError):
        SpacedDiffusion(
            use_timesteps={0, 1000}, betas=get_named_beta_schedule("linear", 1000),
            model_mean_type=ModelMeanType.EPSILON, model_var_type=ModelVarType.FIXED_LARGE,
            loss_type=LossType.MSE,
        )


# ----------------------------------------------------------------------------- p(x_{t-1}|x_t)


@pytest.mark.parametrize(
    "var_type,mean_type,kwargs",
    [
        ("learned_range", "eps", {}),
        ("learned_range", "x0", dict(predict_xstart=True)),
        ("fixed_large", "eps", dict(learn_sigma=False)),
        ("fixed_small", "eps", dict(learn_sigma=False, sigma_small=True)),
    ],
)
def test_p_mean_variance(var_type, mean_type, kwargs):
    d = create_diffusion("10", **kwargs)
    kept = sorted(space_timesteps(1000, "10"))
    acp = ref_alphas_cumprod(1000)
    P = ref_process([acp[k] for k in kept])
    model = FakeModel(2 * SHAPE[1] if var_type == "learned_range" else SHAPE[1])
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 4, 9])
    for clip in (True, False):
        out = d.p_mean_variance(model, x, t, clip_denoised=clip, model_kwargs=dict(scale=1.5))
        raw = model(x.double(), torch.tensor(kept)[t], scale=1.5)
        mean, logvar, x0 = ref_reverse(P, x.double(), t, raw, mean_type, var_type, clip)
        close(out["log_variance"], logvar)
        # FIXED_SMALL: the variance is the unclipped posterior variance (0 at t = 0), only
        # its log is clipped.
        var = col(P["post_var"], t).expand_as(x) if var_type == "fixed_small" else logvar.exp()
        close(out["variance"], var, rtol=1e-5, atol=1e-9)
        close(out["pred_xstart"], x0, rtol=1e-5, atol=1e-5)
        close(out["mean"], mean, rtol=1e-5, atol=1e-5)
        assert out["mean"].shape == out["variance"].shape == x.shape and out["extra"] is None


def test_tuple_output_and_bad_inputs():
    d = create_diffusion("10")
    x = torch.randn(SHAPE)
    t = torch.tensor([1, 2, 3])
    out = d.p_mean_variance(lambda x, t: (torch.zeros(3, 4, 4, 4), "extra"), x, t)
    assert out["extra"] == "extra"
    with pytest.raises(ValueError, match="shape"):
        d.p_mean_variance(lambda x, t: torch.zeros(SHAPE), x, t)  # C channels, 2C expected
    with pytest.raises(ValueError):
        d.p_mean_variance(FakeModel(4), x, torch.tensor([1, 2, 10]))  # out of range
    with pytest.raises(ValueError):
        d.p_mean_variance(FakeModel(4), x, torch.tensor([1, 2]))  # wrong batch
    with pytest.raises(ValueError):
        d.training_losses(lambda x, t: torch.zeros(SHAPE), x, t)
    with pytest.raises(ValueError):
        d.ddim_reverse_sample(FakeModel(4), x, t, eta=0.5)


def test_model_sees_original_timesteps():
    d = create_diffusion("10")
    kept = sorted(space_timesteps(1000, "10"))
    model = FakeModel(4)
    x = torch.rand(SHAPE) * 2 - 1
    t = torch.tensor([0, 5, 9])
    original = torch.tensor([kept[0], kept[5], kept[9]])

    d.p_mean_variance(model, x, t)
    d.training_losses(model, x, t)
    assert all(torch.equal(s, original) for s in model.seen) and len(model.seen) == 2

    # an already wrapped model is not wrapped (mapped) again
    wrapped = d._wrap_model(model)
    assert d._wrap_model(wrapped) is wrapped
    model.seen.clear()
    d.p_mean_variance(wrapped, x, t)
    assert torch.equal(model.seen[0], original)

    seen = []

    def cond_fn(x, t, **kw):
        seen.append(t.clone())
        return torch.ones_like(x)

    out = d.p_mean_variance(model, x, t)
    d.condition_mean(cond_fn, out, x, t)
    d.condition_score(cond_fn, out, x, t)
    assert len(seen) == 2 and all(torch.equal(s, original) for s in seen)


def test_condition_mean_and_score():
    d = create_diffusion("10")
    kept = sorted(space_timesteps(1000, "10"))
    P = ref_process([ref_alphas_cumprod(1000)[k] for k in kept])
    x = torch.randn(SHAPE)
    t = torch.tensor([1, 5, 9])
    out = d.p_mean_variance(FakeModel(4), x, t, clip_denoised=False)
    grad = torch.full(SHAPE, 0.3)
    new_mean = d.condition_mean(lambda x, t: grad, out, x, t)
    close(new_mean, out["mean"].double() + out["variance"].double() * 0.3)
    cs = d.condition_score(lambda x, t: grad, out, x, t)
    xd = x.double()
    ab = col(P["ab"], t)
    eps = (xd / ab.sqrt() - out["pred_xstart"].double()) / (1 / ab - 1).sqrt()
    eps = eps - (1 - ab).sqrt() * 0.3
    x0 = xd / ab.sqrt() - (1 / ab - 1).sqrt() * eps
    close(cs["pred_xstart"], x0, rtol=1e-4, atol=1e-4)
    close(cs["mean"], col(P["coef1"], t) * x0 + col(P["coef2"], t) * xd, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- likelihood


def test_discretized_log_likelihood_edges():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.99, 1.0, 1.0]).double()
    mean = torch.tensor([-0.9, -0.5, 0.1, 0.9, 0.95, -1.0]).double()
    log_scale = torch.tensor([-3.0, -4.0, -2.0, -3.0, -3.0, -6.0]).double()
    got = discretized_gaussian_log_likelihood(x.float(), means=mean.float(), log_scales=log_scale.float())
    expected = ref_decoder_loglik(x, mean, log_scale)
    close(got, expected, rtol=1e-4, atol=1e-5)
    assert got[-1].item() == pytest.approx(math.log(1e-12), rel=1e-5)  # clamped


def ref_vb_bits(P, x0, xt, t, mean, logvar):
    """KL(q || p) in bits, or the decoder NLL in bits where t == 0; shape (N,)."""
    true_mean = col(P["coef1"], t) * x0 + col(P["coef2"], t) * xt
    true_logvar = col(P["post_logvar"], t)
    kl = 0.5 * (-1 + logvar - true_logvar + torch.exp(true_logvar - logvar)
                + (true_mean - mean) ** 2 * torch.exp(-logvar))
    nll = -ref_decoder_loglik(x0, mean, 0.5 * logvar)
    kl = kl.mean(dim=(1, 2, 3)) / math.log(2)
    nll = nll.mean(dim=(1, 2, 3)) / math.log(2)
    return torch.where(t == 0, nll, kl)


def test_training_losses_learned_range():
    d = create_diffusion("250", rescale_learned_sigmas=True)
    assert d.loss_type == LossType.RESCALED_MSE
    kept = sorted(space_timesteps(1000, "250"))
    P = ref_process([ref_alphas_cumprod(1000)[k] for k in kept])
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(SHAPE, generator=g) * 2 - 1
    x0[0, 0, 0, :2] = torch.tensor([-1.0, 1.0])  # the edge bins of the decoder
    noise = torch.randn(SHAPE, generator=g)
    t = torch.tensor([0, 1, 249])
    raw = (torch.rand(3, 4, 4, 4, generator=g) * 2 - 1).requires_grad_()
    model = lambda x, ts: raw * 1.0

    terms = d.training_losses(model, x0, t, noise=noise)

    x0d, nd = x0.double(), noise.double()
    xt = col(P["ab"], t).sqrt() * x0d + (1 - col(P["ab"], t)).sqrt() * nd
    rawd = raw.detach().double().requires_grad_()
    mse = ((nd - rawd[:, :2]) ** 2).mean(dim=(1, 2, 3))
    frozen = torch.cat([rawd[:, :2].detach(), rawd[:, 2:]], dim=1)
    mean, logvar, _ = ref_reverse(P, xt, t, frozen, "eps", "learned_range", clip=False)
    vb = ref_vb_bits(P, x0d, xt, t, mean, logvar) * (250 / 1000.0)
    close(terms["mse"], mse)
    close(terms["vb"], vb, rtol=1e-4, atol=1e-5)
    close(terms["loss"], mse + vb, rtol=1e-4, atol=1e-5)

    # gradients: the vb term only reaches the variance half, the mse only the eps half
    (g_vb,) = torch.autograd.grad(terms["vb"].sum(), raw, retain_graph=True)
    assert torch.all(g_vb[:, :2] == 0) and g_vb[:, 2:].abs().sum() > 0
    (ref_g_vb,) = torch.autograd.grad(vb.sum(), rawd)
    close(g_vb, ref_g_vb, rtol=1e-3, atol=1e-5)
    (g_mse,) = torch.autograd.grad(terms["mse"].sum(), raw)
    assert torch.all(g_mse[:, 2:] == 0) and g_mse[:, :2].abs().sum() > 0

    plain = create_diffusion("250").training_losses(model, x0, t, noise=noise)
    close(plain["vb"], terms["vb"] * 4, rtol=1e-6, atol=1e-6)


def test_training_losses_kl():
    d = create_diffusion("", use_kl=True, learn_sigma=False, diffusion_steps=50)
    assert d.loss_type == LossType.RESCALED_KL
    P = ref_process(ref_alphas_cumprod(50))
    g = torch.Generator().manual_seed(4)
    x0 = torch.rand(SHAPE, generator=g) * 2 - 1
    noise = torch.randn(SHAPE, generator=g)
    t = torch.tensor([0, 7, 49])
    model = FakeModel(2)
    terms = d.training_losses(model, x0, t, noise=noise)
    xt = col(P["ab"], t).sqrt() * x0.double() + (1 - col(P["ab"], t)).sqrt() * noise.double()
    raw = model(xt.float(), t).double()
    mean, logvar, _ = ref_reverse(P, xt, t, raw, "eps", "fixed_large", clip=False)
    close(terms["loss"], ref_vb_bits(P, x0.double(), xt, t, mean, logvar) * 50, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- samplers


def ref_sample_loop(spec, kind, model, shape, var_type, mean_type, clip=True, eta=0.0,
                    noise=None):
    """Independent sampler: float64 maths, float32 randoms drawn in the documented order
    (x_T, then per step: model call, one randn of x's shape)."""
    kept = sorted(space_timesteps(1000, spec))
    P = ref_process([ref_alphas_cumprod(1000)[k] for k in kept])
    x = (torch.randn(shape) if noise is None else noise).double()
    for i in reversed(range(len(kept))):
        t = torch.full((shape[0],), i)
        raw = model(x.float(), torch.full((shape[0],), kept[i])).double()
        mean, logvar, x0 = ref_reverse(P, x, t, raw, mean_type, var_type, clip)
        z = torch.randn(shape).double()
        last = 0.0 if i == 0 else 1.0
        if kind == "ddpm":
            x = mean + last * torch.exp(0.5 * logvar) * z
        else:
            ab, abp = P["ab"][i], P["abp"][i]
            eps = (x / ab.sqrt() - x0) / (1 / ab - 1).sqrt()
            sigma = eta * ((1 - abp) / (1 - ab)).sqrt() * (1 - ab / abp).sqrt()
            x = x0 * abp.sqrt() + (1 - abp - sigma**2).sqrt() * eps + last * sigma * z
    return x


@pytest.mark.parametrize(
    "kind,spec,eta,kwargs,var_type,mean_type",
    [
        ("ddpm", "10", 0.0, {}, "learned_range", "eps"),
        ("ddpm", "10", 0.0, dict(predict_xstart=True), "learned_range", "x0"),
        ("ddpm", "10", 0.0, dict(learn_sigma=False), "fixed_large", "eps"),
        ("ddim", "ddim10", 0.0, {}, "learned_range", "eps"),
        ("ddim", "ddim10", 0.5, {}, "learned_range", "eps"),
    ],
)
def test_sample_loops_match_reference(kind, spec, eta, kwargs, var_type, mean_type):
    d = create_diffusion(spec, **kwargs)
    model = FakeModel(4 if var_type == "learned_range" else 2, dither=True)

    def run():
        if kind == "ddpm":
            return d.p_sample_loop(model, SHAPE, device="cpu")
        return d.ddim_sample_loop(model, SHAPE, device="cpu", eta=eta)

    torch.manual_seed(123)
    got = run()
    after = torch.randn(4)
    torch.manual_seed(123)
    expected = ref_sample_loop(spec, kind, model, SHAPE, var_type, mean_type, eta=eta)
    assert torch.equal(after, torch.randn(4))  # same number of draws, last step included
    assert got.dtype == torch.float32 and got.is_contiguous()
    close(got, expected, rtol=1e-5, atol=1e-5)

    # given noise: no initial draw
    start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9))
    torch.manual_seed(5)
    if kind == "ddpm":
        got = d.p_sample_loop(model, SHAPE, noise=start.clone(), device="cpu")
    else:
        got = d.ddim_sample_loop(model, SHAPE, noise=start.clone(), device="cpu", eta=eta)
    torch.manual_seed(5)
    expected = ref_sample_loop(spec, kind, model, SHAPE, var_type, mean_type, eta=eta,
                               noise=start)
    close(got, expected, rtol=1e-5, atol=1e-5)


def test_progressive_progress_and_device_default(capsys):
    d = create_diffusion("10")
    model = FakeModel(4)
    torch.manual_seed(0)
    plain = d.p_sample_loop(model, SHAPE, device="cpu")
    torch.manual_seed(0)
    with_bar = d.p_sample_loop(model, SHAPE, device="cpu", progress=True)
    assert torch.equal(plain, with_bar)
    assert "10/10" in capsys.readouterr().err

    torch.manual_seed(0)
    steps = list(d.ddim_sample_loop_progressive(model, SHAPE, device="cpu", progress=True))
    assert len(steps) == 10 and set(steps[-1]) == {"sample", "pred_xstart"}

    class Net(torch.nn.Module):  # device comes from parameters, also via a bound method
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward_with_cfg(self, x, t):
            return model(x, t) + self.w

    torch.manual_seed(0)
    assert torch.equal(d.p_sample_loop(Net().forward_with_cfg, SHAPE), plain)
    with pytest.raises(ValueError, match="device"):
        d.p_sample_loop(model, SHAPE)


def test_ddim_reverse_sample():
    d = create_diffusion("ddim10")
    kept = sorted(space_timesteps(1000, "ddim10"))
    acp = [ref_alphas_cumprod(1000)[k] for k in kept]
    P = ref_process(acp)
    model = FakeModel(4)
    x = torch.randn(SHAPE)
    t = torch.tensor([0, 3, 9])
    out = d.ddim_reverse_sample(model, x, t, clip_denoised=False)
    raw = model(x.double(), torch.tensor(kept)[t])
    _, _, x0 = ref_reverse(P, x.double(), t, raw, "eps", "learned_range", clip=False)
    ab = col(P["ab"], t)
    abn = torch.tensor(acp[1:] + [0.0], dtype=torch.float64)[t].view(-1, 1, 1, 1)
    eps = (x.double() / ab.sqrt() - x0) / (1 / ab - 1).sqrt()
    close(out["sample"], x0 * abn.sqrt() + (1 - abn).sqrt() * eps, rtol=1e-4, atol=1e-4)


def test_gaussian_diffusion_validation():
    with pytest.raises(ValueError):
        GaussianDiffusion(betas=[0.1, 0.0], model_mean_type=ModelMeanType.EPSILON,
                          model_var_type=ModelVarType.FIXED_LARGE, loss_type=LossType.MSE)
    with pytest.raises(NotImplementedError):
        GaussianDiffusion(betas=[0.1, 0.2], model_mean_type=ModelMeanType.PREVIOUS_X,
                          model_var_type=ModelVarType.FIXED_LARGE, loss_type=LossType.MSE)
    d = create_diffusion("10")
    with pytest.raises(ValueError):
        d.q_sample(torch.zeros(SHAPE), torch.tensor([0, 1, 2]), noise=torch.zeros(3, 2, 4))
