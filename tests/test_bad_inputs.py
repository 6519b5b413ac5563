"""Bad inputs at the public Python API: every one refused before any work, with an error that names
the argument; and the fixes of the silent-garbage cases compute the right result.

The table rows are (id, callable, kwargs, error type, substring the message must contain); the
substring names the argument (or, where the message is about a value, the value's rule).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import struct

import pytest
import torch

from conftest import randomize_
from ditfast import DiT
from ditfast.attention import attention
from ditfast.checkpoint import load_model
from ditfast.diffusion import create_diffusion, space_timesteps
from ditfast.errors import CheckpointError, DeviceError, check_choice, check_float, check_int, resolve_device
from ditfast.flops import gflops
from ditfast.models import DiT_models, heads_for_hidden
from ditfast.ops import adaln_layernorm, gated_residual_adaln
from ditfast.samplers import make_plan
from ditfast.sampling import sample
from ditfast.seeding import SEED_MAX, generator

TINY = dict(input_size=8, patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=10)
HAS_CUDA = torch.cuda.is_available()


def _tiny(**kw) -> DiT:
    torch.manual_seed(0)
    return randomize_(DiT(**{**TINY, **kw})).eval()


_MODELS: dict = {}


def tiny(**kw) -> DiT:
    """A cached tiny DiT per config (the rows only read it)."""
    key = tuple(sorted(kw.items()))
    if key not in _MODELS:
        _MODELS[key] = _tiny(**kw)
    return _MODELS[key]


# --------------------------------------------------------------------------------- callables


def build(**kw):
    return DiT(**{**TINY, **kw})


def build_named(**kw):
    return DiT_models["DiT-S/8"](**{"input_size": 8, "num_classes": 10, **kw})


def forward(model_kw=None, **kw):
    """tiny().forward with x (2, 4, 8, 8) fp32, t (2,), y (2,) unless overridden."""
    args = {"x": torch.randn(2, 4, 8, 8), "t": torch.tensor([1, 500]), "y": torch.tensor([0, 3]), **kw}
    with torch.no_grad():
        return tiny(**(model_kw or {}))(args["x"], args["t"], args["y"])


def forward_with_cfg(model_kw=None, cfg_scale=4.0, **kw):
    m = tiny(**(model_kw or {}))
    C = m.in_channels
    args = {"x": torch.randn(2, C, 8, 8), "t": torch.tensor([1, 1]), "y": torch.tensor([3, m.num_classes]), **kw}
    with torch.no_grad():
        return m.forward_with_cfg(args.pop("x"), args.pop("t"), args.pop("y"), cfg_scale, **args)


def ddim_loop(**kw):
    d = create_diffusion("10")
    return d.ddim_sample_loop(tiny(), (1, 4, 8, 8), model_kwargs=dict(y=torch.tensor([1])), **kw)


def ddim_loop_progressive(**kw):
    d = create_diffusion("10")
    return d.ddim_sample_loop_progressive(tiny(), (1, 4, 8, 8), model_kwargs=dict(y=torch.tensor([1])), **kw)


def ddim_step(**kw):
    d = create_diffusion("10")
    return d.ddim_sample(tiny(), torch.randn(1, 4, 8, 8), torch.tensor([5]), model_kwargs=dict(y=torch.tensor([1])), **kw)


def adaln(**kw):
    args = {"x": torch.randn(2, 3, 8), "shift": torch.randn(2, 8), "scale": torch.randn(2, 8), **kw}
    return adaln_layernorm(args.pop("x"), args.pop("shift"), args.pop("scale"), **args)


def gated_adaln(**kw):
    x = torch.randn(2, 3, 8)
    return gated_residual_adaln(x, torch.randn_like(x), torch.randn(2, 8), torch.randn(2, 8), torch.randn(2, 8), **kw)


def attend(**kw):
    args = {"qkv": torch.randn(1, 4, 3 * 2 * 8), "num_heads": 2, **kw}
    return attention(args.pop("qkv"), args.pop("num_heads"), **args)


def sample_tiny(**kw):
    return sample(tiny(), **{"num_samples": 1, "sampler": "ddim", "steps": 2, "batch_size": 1, "cfg_scale": 1.0, **kw})


def load_sd(**kw):
    return load_model(tiny().state_dict(), **kw)


def _train_ckpt(args: dict, sd=None) -> dict:
    sd = tiny().state_dict() if sd is None else sd
    return {"model": sd, "ema": sd, "args": args, "step": 3}


def load_train_ckpt(args, **kw):
    return load_model(_train_ckpt(args), **kw)


nan, inf = float("nan"), float("inf")
TINY_ARGS = dict(model="DiT-S/2", hidden_size=32, depth=1, num_heads=2, patch_size=2, mlp_ratio=4.0,
                 block="adaLN-Zero", learn_sigma=True, class_dropout_prob=0.1)  # fmt: skip

ROWS = [
    # DiT(...): type, range and consistency of every constructor argument
    ("dit-input-size-0", build, dict(input_size=0), ValueError, "input_size"),
    ("dit-input-size-float", build, dict(input_size=8.0), TypeError, "input_size"),
    ("dit-patch-0", build, dict(patch_size=0), ValueError, "patch_size"),
    ("dit-patch-not-divisor", build, dict(patch_size=3), ValueError, "patch_size"),
    ("dit-patch-bool", build, dict(patch_size=True), TypeError, "patch_size"),
    ("dit-in-channels-0", build, dict(in_channels=0), ValueError, "in_channels"),
    ("dit-hidden-0", build, dict(hidden_size=0), ValueError, "hidden_size"),
    ("dit-hidden-not-mult-4", build, dict(hidden_size=30, num_heads=1), ValueError, "hidden_size"),
    ("dit-depth-neg", build, dict(depth=-1), ValueError, "depth"),
    ("dit-depth-float", build, dict(depth=1.5), TypeError, "depth"),
    ("dit-heads-0", build, dict(num_heads=0), ValueError, "num_heads"),
    ("dit-heads-neg", build, dict(num_heads=-2), ValueError, "num_heads"),
    ("dit-heads-not-divisor", build, dict(num_heads=3), ValueError, "num_heads"),
    ("dit-mlp-ratio-0", build, dict(mlp_ratio=0), ValueError, "mlp_ratio"),
    ("dit-mlp-ratio-nan", build, dict(mlp_ratio=nan), ValueError, "mlp_ratio"),
    ("dit-mlp-ratio-str", build, dict(mlp_ratio="4"), TypeError, "mlp_ratio"),
    ("dit-dropout-1.5", build, dict(class_dropout_prob=1.5), ValueError, "class_dropout_prob"),
    ("dit-dropout-neg", build, dict(class_dropout_prob=-0.1), ValueError, "class_dropout_prob"),
    ("dit-num-classes-0", build, dict(num_classes=0), ValueError, "num_classes"),
    ("dit-learn-sigma-str", build, dict(learn_sigma="yes"), TypeError, "learn_sigma"),
    ("dit-block", build, dict(block="unet"), ValueError, "block"),
    ("dit-backend", build, dict(backend="cuda"), ValueError, "backend"),
    ("dit-attn-backend", build, dict(attn_backend="nope"), ValueError, "attn_backend"),
    ("registry-input-size-0", build_named, dict(input_size=0), ValueError, "input_size"),
    ("registry-num-classes-0", build_named, dict(num_classes=0), ValueError, "num_classes"),
    ("registry-dropout", build_named, dict(class_dropout_prob=2), ValueError, "class_dropout_prob"),
    # forward(x, t, y)
    ("fwd-x-3d", forward, dict(x=torch.randn(2, 4, 8)), ValueError, "x must be a 4-D"),
    ("fwd-x-int", forward, dict(x=torch.zeros(2, 4, 8, 8, dtype=torch.long)), ValueError, "x must be a floating"),
    ("fwd-x-fp16", forward, dict(x=torch.randn(2, 4, 8, 8).half()), ValueError, "x has dtype torch.float16"),
    ("fwd-x-bf16", forward, dict(x=torch.randn(2, 4, 8, 8).bfloat16()), ValueError, "x has dtype torch.bfloat16"),
    ("fwd-x-fp64", forward, dict(x=torch.randn(2, 4, 8, 8).double()), ValueError, "x has dtype torch.float64"),
    ("fwd-x-channels", forward, dict(x=torch.randn(2, 3, 8, 8)), ValueError, "x must have shape (B, 4, 8, 8)"),
    ("fwd-x-spatial", forward, dict(x=torch.randn(2, 4, 16, 16)), ValueError, "x must have shape (B, 4, 8, 8)"),
    ("fwd-x-list", forward, dict(x=[[1.0]]), ValueError, "x must be a 4-D"),
    ("fwd-t-2d", forward, dict(t=torch.zeros(2, 1)), ValueError, "t must be a 1-D"),
    ("fwd-t-batch", forward, dict(t=torch.zeros(3)), ValueError, "t must be a 1-D"),
    ("fwd-t-bool", forward, dict(t=torch.tensor([True, False])), ValueError, "t must hold real"),
    ("fwd-t-neg", forward, dict(t=torch.tensor([-5, 1])), ValueError, "t must lie in [0, 1000)"),
    ("fwd-t-huge", forward, dict(t=torch.tensor([1e9, 1.0])), ValueError, "t must lie in [0, 1000)"),
    ("fwd-t-1000", forward, dict(t=torch.tensor([1000, 1])), ValueError, "t must lie in [0, 1000)"),
    ("fwd-t-nan", forward, dict(t=torch.tensor([nan, 1.0])), ValueError, "t must hold finite"),
    ("fwd-t-inf", forward, dict(t=torch.tensor([inf, 1.0])), ValueError, "t must hold finite"),
    ("fwd-y-float", forward, dict(y=torch.tensor([0.0, 1.0])), ValueError, "y must hold integer"),
    ("fwd-y-bool", forward, dict(y=torch.tensor([True, False])), ValueError, "y must hold integer"),
    ("fwd-y-high", forward, dict(y=torch.tensor([0, 11])), ValueError, "y: labels must lie in [0, 10]"),
    ("fwd-y-neg", forward, dict(y=torch.tensor([-1, 0])), ValueError, "y: labels must lie in [0, 10]"),
    ("fwd-y-list", forward, dict(y=[0, 1]), ValueError, "y must be a 1-D"),
    # forward_with_cfg: the official rule must not guide the variance channels
    ("cfg-odd-batch", forward_with_cfg, dict(x=torch.randn(3, 4, 8, 8)), ValueError, "even batch"),
    ("cfg-variance-1ch", forward_with_cfg, dict(model_kw=dict(in_channels=1)), ValueError, "guide_all_channels"),
    ("cfg-variance-2ch", forward_with_cfg, dict(model_kw=dict(in_channels=2)), ValueError, "variance"),
    ("cfg-no-null-class", forward_with_cfg, dict(model_kw=dict(class_dropout_prob=0.0)), ValueError, "null class"),
    ("cfg-scale-str", forward_with_cfg, dict(cfg_scale="4"), TypeError, "cfg_scale"),
    ("cfg-scale-nan", forward_with_cfg, dict(cfg_scale=nan), ValueError, "cfg_scale"),
    ("cfg-guide-int", forward_with_cfg, dict(guide_all_channels=1), TypeError, "guide_all_channels"),
    ("cfg-full-batch-int", forward_with_cfg, dict(full_batch=0), TypeError, "full_batch"),
    # create_diffusion / space_timesteps
    ("diff-respacing-abc", create_diffusion, dict(timestep_respacing="abc"), ValueError, "timestep_respacing"),
    ("diff-respacing-ddimx", create_diffusion, dict(timestep_respacing="ddimx"), ValueError, "timestep_respacing"),
    ("diff-respacing-ddim0", create_diffusion, dict(timestep_respacing="ddim0"), ValueError, "timestep_respacing"),
    ("diff-respacing-bool", create_diffusion, dict(timestep_respacing=True), TypeError, "timestep_respacing"),
    ("diff-respacing-float", create_diffusion, dict(timestep_respacing=2.5), TypeError, "timestep_respacing"),
    ("diff-respacing-int-0", create_diffusion, dict(timestep_respacing=0), ValueError, "timestep_respacing"),
    ("diff-respacing-neg-list", create_diffusion, dict(timestep_respacing=[10, -1]), ValueError, "timestep_respacing[1]"),
    ("diff-respacing-dict", create_diffusion, dict(timestep_respacing={"a": 1}), TypeError, "timestep_respacing"),
    ("diff-respacing-too-many", create_diffusion, dict(timestep_respacing="2000"), ValueError, "2000"),
    ("diff-steps-0", create_diffusion, dict(timestep_respacing="", diffusion_steps=0), ValueError, "diffusion_steps"),
    ("diff-steps-float", create_diffusion, dict(timestep_respacing="", diffusion_steps=10.0), TypeError, "diffusion_steps"),
    ("diff-schedule", create_diffusion, dict(timestep_respacing="", noise_schedule="cosine"), ValueError, "noise_schedule"),
    ("diff-learn-sigma", create_diffusion, dict(timestep_respacing="", learn_sigma="no"), TypeError, "learn_sigma"),
    ("diff-use-kl", create_diffusion, dict(timestep_respacing="", use_kl=1), TypeError, "use_kl"),
    ("diff-sigma-small", create_diffusion, dict(timestep_respacing="", sigma_small="yes"), TypeError, "sigma_small"),
    ("diff-predict-xstart", create_diffusion, dict(timestep_respacing="", predict_xstart=None), TypeError, "predict_xstart"),
    ("diff-rescale", create_diffusion, dict(timestep_respacing="", rescale_learned_sigmas=2), TypeError,
     "rescale_learned_sigmas"),
    ("diff-ddim-no-stride", create_diffusion, dict(timestep_respacing="ddim999"), ValueError, "999"),
    ("space-timesteps-0", space_timesteps, dict(num_timesteps=0, section_counts="10"), ValueError, "num_timesteps"),
    # eta, in every place it enters: past 1 the DDIM update is NaN
    ("ddim-loop-eta-3", ddim_loop, dict(eta=3.0), ValueError, "eta"),
    ("ddim-loop-eta-neg", ddim_loop, dict(eta=-0.1), ValueError, "eta"),
    ("ddim-loop-eta-nan", ddim_loop, dict(eta=nan), ValueError, "eta"),
    ("ddim-loop-eta-str", ddim_loop, dict(eta="1"), TypeError, "eta"),
    ("ddim-progressive-eta", ddim_loop_progressive, dict(eta=1.5), ValueError, "eta"),
    ("ddim-step-eta", ddim_step, dict(eta=2.0), ValueError, "eta"),
    ("plan-sampler", make_plan, dict(sampler="euler", steps=10), ValueError, "sampler"),
    ("plan-steps", make_plan, dict(sampler="ddim", steps=1), ValueError, "steps"),
    ("plan-eta-3", make_plan, dict(sampler="ddim", steps=10, eta=3.0), ValueError, "eta"),
    ("plan-eta-ddpm", make_plan, dict(sampler="ddpm", steps=10, eta=0.5), ValueError, "eta"),
    ("sample-eta-3", sample_tiny, dict(eta=3.0), ValueError, "eta"),
    ("sample-eta-ddpm", sample_tiny, dict(sampler="ddpm", eta=0.5), ValueError, "eta"),
    # gflops(name, image_size)
    ("gflops-neg", gflops, dict(model_or_name="DiT-XL/2", image_size=-256), ValueError, "image_size"),
    ("gflops-0", gflops, dict(model_or_name="DiT-XL/2", image_size=0), ValueError, "image_size"),
    ("gflops-float", gflops, dict(model_or_name="DiT-XL/2", image_size=256.0), TypeError, "image_size"),
    ("gflops-bool", gflops, dict(model_or_name="DiT-XL/2", image_size=True), TypeError, "image_size"),
    ("gflops-not-divisible", gflops, dict(model_or_name="DiT-XL/2", image_size=100), ValueError, "image_size"),
    ("gflops-block", gflops, dict(model_or_name="DiT-XL/2", block="unet"), ValueError, "block"),
    ("gflops-name", gflops, dict(model_or_name="DiT-Q/2"), ValueError, "unknown model"),
    # ops
    ("adaln-eps-neg", adaln, dict(eps=-1.0), ValueError, "eps"),
    ("adaln-eps-0", adaln, dict(eps=0.0), ValueError, "eps"),
    ("adaln-eps-nan", adaln, dict(eps=nan), ValueError, "eps"),
    ("adaln-eps-inf", adaln, dict(eps=inf), ValueError, "eps"),
    ("adaln-eps-str", adaln, dict(eps="1e-6"), TypeError, "eps"),
    ("adaln-x-2d", adaln, dict(x=torch.randn(2, 8)), ValueError, "x must be"),
    ("adaln-x-int", adaln, dict(x=torch.zeros(2, 3, 8, dtype=torch.long)), ValueError, "x must be"),
    ("adaln-shift-shape", adaln, dict(shift=torch.randn(2, 4)), ValueError, "shift"),
    ("adaln-scale-float", adaln, dict(scale=1.0), ValueError, "scale"),
    ("gated-adaln-eps", gated_adaln, dict(eps=-1.0), ValueError, "eps"),
    ("attn-qkv-2d", attend, dict(qkv=torch.randn(4, 48)), ValueError, "qkv"),
    ("attn-qkv-int", attend, dict(qkv=torch.zeros(1, 4, 48, dtype=torch.long)), ValueError, "qkv"),
    ("attn-qkv-width", attend, dict(qkv=torch.randn(1, 4, 50)), ValueError, "qkv"),
    ("attn-heads-0", attend, dict(num_heads=0), ValueError, "num_heads"),
    ("attn-heads-float", attend, dict(num_heads=2.0), ValueError, "num_heads"),
    ("attn-heads-not-divisor", attend, dict(num_heads=5), ValueError, "num_heads"),
    ("attn-scale-neg", attend, dict(scale=-1.0), ValueError, "scale"),
    ("attn-scale-nan", attend, dict(scale=nan), ValueError, "scale"),
    ("attn-backend", attend, dict(backend="nope"), ValueError, "backend"),
    # sample(): seed, labels, counts, scales, device
    ("sample-seed-2**63", sample_tiny, dict(seed=2**63), ValueError, "seed"),
    ("sample-seed-2**70", sample_tiny, dict(seed=2**70), ValueError, "seed"),
    ("sample-seed-neg", sample_tiny, dict(seed=-1), ValueError, "seed"),
    ("sample-seed-bool", sample_tiny, dict(seed=True), TypeError, "seed"),
    ("sample-seed-float", sample_tiny, dict(seed=1.0), TypeError, "seed"),
    ("sample-labels-1.7", sample_tiny, dict(labels=[1.7]), TypeError, "labels[0]"),
    ("sample-labels-high", sample_tiny, dict(labels=[10]), ValueError, "labels must lie in [0, 9]"),
    ("sample-labels-neg", sample_tiny, dict(labels=[-1]), ValueError, "labels must be >= 0"),
    ("sample-labels-scalar", sample_tiny, dict(labels=5), TypeError, "labels"),
    ("sample-labels-str", sample_tiny, dict(labels="3"), TypeError, "labels"),
    ("sample-labels-empty", sample_tiny, dict(labels=[]), ValueError, "labels"),
    ("sample-num-samples-0", sample_tiny, dict(num_samples=0), ValueError, "num samples"),
    ("sample-num-samples-float", sample_tiny, dict(num_samples=2.5), TypeError, "num_samples"),
    ("sample-batch-0", sample_tiny, dict(batch_size=0), ValueError, "batch size"),
    ("sample-steps-1", sample_tiny, dict(steps=1), ValueError, "steps"),
    ("sample-steps-float", sample_tiny, dict(steps=2.5), TypeError, "steps"),
    ("sample-cfg-0.5", sample_tiny, dict(cfg_scale=0.5), ValueError, "cfg scale"),
    ("sample-cfg-nan", sample_tiny, dict(cfg_scale=nan), ValueError, "cfg_scale"),
    ("sample-cfg-str", sample_tiny, dict(cfg_scale="4"), TypeError, "cfg_scale"),
    ("sample-sampler", sample_tiny, dict(sampler="euler"), ValueError, "sampler"),
    ("sample-precision", sample_tiny, dict(precision="fp8"), ValueError, "precision"),
    ("sample-mode", sample_tiny, dict(mode="fast"), ValueError, "mode"),
    ("sample-guide-str", sample_tiny, dict(guide_all_channels="yes"), TypeError, "guide_all_channels"),
    ("sample-clip-int", sample_tiny, dict(clip_denoised=1), TypeError, "clip_denoised"),
    ("sample-device-bogus", sample_tiny, dict(device="bogus"), DeviceError, "device 'bogus'"),
    ("sample-device-float", sample_tiny, dict(device=3.0), TypeError, "device"),
    ("sample-progress-str", sample_tiny, dict(progress="no"), TypeError, "progress"),
    ("sample-vae-missing", sample_tiny, dict(vae="no/such/vae"), ValueError, "VAE"),
    ("sample-model-config-given", sample_tiny, dict(input_size=8), ValueError, "model_config"),
    ("sample-model-config-unknown", sample, dict(model="DiT-S/8", depth=2), ValueError, "unknown model_config"),
    ("sample-model-int", sample, dict(model=123), TypeError, "model"),
    ("sample-model-missing", sample, dict(model="no/such/file.pt"), ValueError, "model"),
    # load_model: arguments checked before the file is read; records compared with the tensors
    ("load-model-name", load_sd, dict(model="DiT-Q/2"), ValueError, "unknown model"),
    ("load-model-type", load_sd, dict(model=3), ValueError, "model"),
    ("load-source-type", load_model, dict(source=123), TypeError, "source"),
    ("load-device-bogus", load_sd, dict(device="bogus"), DeviceError, "device"),
    ("load-config-with-dit", load_sd, dict(model=_tiny(), num_heads=2), ValueError, "config overrides"),
    ("load-heads-contradict", load_train_ckpt, dict(args=TINY_ARGS, num_heads=1), ValueError, "num_heads"),
    ("load-override-heads-0", load_sd, dict(num_heads=0), ValueError, "num_heads"),
    ("load-override-dropout", load_sd, dict(class_dropout_prob=1.5), ValueError, "class_dropout_prob"),
    ("load-record-hidden", load_train_ckpt, dict(args={**TINY_ARGS, "hidden_size": 64}), CheckpointError, "hidden_size"),
    ("load-record-depth", load_train_ckpt, dict(args={**TINY_ARGS, "depth": 3}), CheckpointError, "depth"),
    ("load-record-patch", load_train_ckpt, dict(args={**TINY_ARGS, "patch_size": 4}), CheckpointError, "patch_size"),
    ("load-record-mlp", load_train_ckpt, dict(args={**TINY_ARGS, "mlp_ratio": 2.0}), CheckpointError, "mlp_ratio"),
    ("load-record-heads", load_train_ckpt, dict(args={**TINY_ARGS, "num_heads": 3}), CheckpointError, "num_heads"),
    ("load-int-tensors", load_model, dict(source={k: v.long() for k, v in _tiny().state_dict().items()}),
     ValueError, "floating point"),
    # resolve_device and the checkers themselves
    ("device-bogus", resolve_device, dict(device="bogus"), DeviceError, "'cpu', 'cuda', 'cuda:N'"),
    ("device-neg-index", resolve_device, dict(device=-1), DeviceError, "device"),
    ("device-bool", resolve_device, dict(device=True), TypeError, "device"),
    ("device-float", resolve_device, dict(device=0.5), TypeError, "device"),
    ("device-mps", resolve_device, dict(device="mps"), DeviceError, "'mps'"),
    ("device-what", resolve_device, dict(device="bogus", what="--device"), DeviceError, "--device 'bogus'"),
    ("check-int-bool", check_int, dict(name="n", value=True), TypeError, "n must be an integer"),
    ("check-int-range", check_int, dict(name="n", value=5, min=0, max=3), ValueError, "n must be an integer in [0, 3], got 5"),
    ("check-float-inf", check_float, dict(name="f", value=inf), ValueError, "f must be a finite number"),
    ("check-choice", check_choice, dict(name="c", value="z", choices=("a", "b")), ValueError, "c must be one of 'a', 'b'"),
]  # fmt: skip

if not HAS_CUDA:  # on a CPU-only machine CUDA is absent, and every entry point says so
    ROWS += [
        ("device-cuda-absent", resolve_device, dict(device="cuda"), DeviceError, "torch.cuda.is_available() is False"),
        ("device-cuda-index", resolve_device, dict(device=0), DeviceError, "CUDA requested"),
        ("sample-cpu-model-cuda", sample_tiny, dict(device="cuda"), DeviceError, "CUDA requested"),
        ("device-cuda-5", resolve_device, dict(device="cuda:5"), DeviceError, "CUDA requested"),
        ("load-device-cuda", load_sd, dict(device="cuda"), DeviceError, "CUDA requested"),
    ]  # fmt: skip


@pytest.mark.parametrize("fn, kwargs, error, needle", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_is_refused_naming_the_argument(fn, kwargs, error, needle):
    with pytest.raises(error) as info:
        fn(**kwargs)
    message = str(info.value)
    assert needle in message, f"{type(info.value).__name__}: {message!r} does not mention {needle!r}"
    assert "weights_only=False" not in message


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA: a CPU model sampled with device='cuda'")
def test_cpu_model_on_cuda_names_the_model_device():
    with pytest.raises(ValueError, match="the given model is on cpu"):
        sample_tiny(device="cuda")


def test_refusals_happen_before_any_work(monkeypatch):
    """The sampler is refused before the model runs: eta=3 never reaches a forward."""
    calls = []
    monkeypatch.setattr(DiT, "forward", lambda self, *a, **k: calls.append(1))
    with pytest.raises(ValueError, match="eta"):
        ddim_loop(eta=3.0)
    with pytest.raises(ValueError, match="eta"):
        ddim_loop_progressive(eta=3.0)  # at the call, not at the first step
    assert calls == []


# --------------------------------------------------------------------------------- corrupt files


def _pt_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save(tiny().state_dict(), buf)
    return buf.getvalue()


def _safetensors_bytes(tensors=None, metadata=None) -> bytes:
    from safetensors.torch import save

    tensors = {k: v.contiguous() for k, v in tiny().state_dict().items()} if tensors is None else tensors
    return save(tensors, metadata=metadata)


class _Payload:
    """An object a pickle would construct: the safe loader must refuse it."""


def _pickled_payload() -> bytes:
    buf = io.BytesIO()
    torch.save({"pos_embed": torch.zeros(1), "obj": _Payload()}, buf)
    return buf.getvalue()


FILES = [
    ("text.pt", lambda: b"this is not a checkpoint\n", "not a readable PyTorch checkpoint"),
    ("empty.pt", lambda: b"", "empty"),
    ("truncated.pt", lambda: _pt_bytes()[: len(_pt_bytes()) // 2], "truncated"),
    ("header-only.pt", lambda: _pt_bytes()[:40], "not a readable PyTorch checkpoint"),
    ("payload.pt", _pickled_payload, "pickled Python objects"),
    ("list.pt", lambda: (lambda b: (torch.save([torch.zeros(2)], b), b.getvalue())[1])(io.BytesIO()), "neither a state_dict"),
    ("text.safetensors", lambda: b"hello, world", "not a valid .safetensors"),
    ("empty.safetensors", lambda: b"", "empty"),
    ("truncated.safetensors", lambda: _safetensors_bytes()[:-16], "not a valid .safetensors"),
    ("bad-header.safetensors", lambda: struct.pack("<Q", 5) + b"{abc}", "not a valid .safetensors"),
    ("int.safetensors", lambda: _safetensors_bytes({k: v.long() for k, v in tiny().state_dict().items()}),
     "floating point"),
    ("bad-json.safetensors", lambda: _safetensors_bytes(metadata={"ditfast_config": "{not json"}), "not valid JSON"),
    ("list-json.safetensors", lambda: _safetensors_bytes(metadata={"ditfast_config": "[1, 2]"}), "JSON object"),
    ("wrong-record.safetensors", lambda: _safetensors_bytes(metadata={"ditfast_config": json.dumps({**TINY, "depth": 4})}),
     "contradicts its tensors"),
]  # fmt: skip


@pytest.mark.parametrize("name, make, needle", FILES, ids=[f[0] for f in FILES])
def test_corrupt_or_foreign_checkpoint_is_a_checkpoint_error_naming_the_file(tmp_path, name, make, needle):
    path = tmp_path / name
    path.write_bytes(make())
    with pytest.raises(CheckpointError) as info:
        load_model(path)
    message = str(info.value)
    assert str(path) in message and needle in message, message
    assert "weights_only=False" not in message and "Traceback" not in message
    assert info.value.__cause__ is None  # torch's own text (which suggests weights_only=False) is not chained


def test_unreadable_checkpoint(tmp_path):
    import os

    path = tmp_path / "locked.pt"
    path.write_bytes(_pt_bytes())
    os.chmod(path, 0)
    try:
        if os.access(path, os.R_OK):  # root reads anything
            pytest.skip("running as root: permissions do not apply")
        with pytest.raises(CheckpointError, match="cannot be read"):
            load_model(path)
    finally:
        os.chmod(path, 0o600)


# --------------------------------------------------------------------------------- silent garbage, fixed


def test_training_checkpoint_loads_with_its_recorded_head_count(tmp_path):
    """A run trained with --hidden-size 64 --num-heads 2 (a width the registry rule maps to 1 head)
    loads with 2 heads and reproduces the trained model's outputs."""
    from ditfast.train import TrainConfig

    cfg = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=64, depth=2, num_heads=2, num_classes=10)
    trained = _tiny(**cfg)
    assert heads_for_hidden(64) == 1  # what guessing from the tensors alone gives
    args = dataclasses.asdict(TrainConfig(model="DiT-S/2", hidden_size=64, depth=2, num_heads=2, patch_size=2))
    path = tmp_path / "0000003.pt"
    torch.save(_train_ckpt(args, trained.state_dict()), path)
    loaded = load_model(path)
    assert loaded.num_heads == 2
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 400, 999]), torch.tensor([1, 5, 10])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), trained(x, t, y))
        guessed = load_model(trained.state_dict())  # no record: the registry rule's 1 head
        assert guessed.num_heads == 1 and not torch.allclose(guessed(x, t, y), trained(x, t, y), atol=1e-4)
    # the registry's own heads when the run did not override them: DiT-S has 6
    s_args = {**args, "hidden_size": None, "num_heads": None, "depth": None}
    with torch.device("meta"):
        s2 = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=384, depth=12, num_heads=6, num_classes=10)
    assert load_model(_train_ckpt(s_args, s2.state_dict())).num_heads == 6


def test_training_checkpoint_records_class_dropout_for_the_label_table():
    """With class_dropout_prob 0 recorded, the label table has num_classes rows (no null class)."""
    model = _tiny(class_dropout_prob=0.0)
    loaded = load_model(_train_ckpt({**TINY_ARGS, "class_dropout_prob": 0.0}, model.state_dict()))
    assert loaded.num_classes == 10 and loaded.class_dropout_prob == 0.0


@pytest.mark.parametrize("steps", [2, 10])
def test_eta_one_gives_finite_samples(steps):
    """eta = 1 is the largest valid eta; at 2 steps its eps weight rounds below 0 in float32 (was NaN)."""
    plan = make_plan("ddim", steps, eta=1.0)
    assert torch.isfinite(plan.coefs).all() and (plan.coefs[:, 3] >= 0).all()
    d = create_diffusion(str(steps))
    torch.manual_seed(0)
    out = d.ddim_sample_loop(tiny(), (2, 4, 8, 8), model_kwargs=dict(y=torch.tensor([1, 2])), eta=1.0,
                             clip_denoised=False)  # fmt: skip
    assert torch.isfinite(out).all()
    got = sample_tiny(steps=steps, eta=1.0, num_samples=2, batch_size=2)
    assert torch.isfinite(got.latents).all()


def test_seeds_at_the_top_of_the_range_are_their_own():
    """2**63 - 1 is accepted and gives other samples than 0; 2**63 (which folded onto 0) is refused."""
    a, b = sample_tiny(seed=0).latents, sample_tiny(seed=SEED_MAX).latents
    assert not torch.equal(a, b)
    with pytest.raises(ValueError, match="seed"):
        generator(2**63)


def test_cfg_guides_every_eps_channel_and_passes_variance_through():
    """A 1-channel learned-sigma model with guide_all_channels: channel 0 guided, channel 1 (the
    variance) the conditional row's own output."""
    m = tiny(in_channels=1)
    x, t, y = torch.randn(1, 1, 8, 8), torch.tensor([300, 300]), torch.tensor([4, 10])
    with torch.no_grad():
        out = m.forward_with_cfg(torch.cat([x, x]), t, y, 3.0, guide_all_channels=True)
        raw = m(torch.cat([x, x]), t, y)
    cond, uncond = raw[:1], raw[1:]
    torch.testing.assert_close(out[:1, :1], uncond[:, :1] + 3.0 * (cond[:, :1] - uncond[:, :1]))
    torch.testing.assert_close(out[:1, 1:], cond[:, 1:])
    assert m.cfg_channels(True) == 1
    assert tiny(in_channels=3).cfg_channels(False) == 3  # 3 eps channels: the official rule is fine


def test_respacing_as_an_int_is_the_same_as_its_string():
    assert create_diffusion(25).timestep_map == create_diffusion("25").timestep_map


def test_valid_figures_unchanged():
    assert math.isclose(gflops("DiT-XL/2", image_size=256), 118.64, abs_tol=0.02)
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(None).type in ("cpu", "cuda")
    if HAS_CUDA:
        assert resolve_device("cuda").index == torch.cuda.current_device()
