"""The CUDA kernels of csrc/cuda/*.cu, run on the CPU through the host emulation of
cuda_emulator/emu_runtime.h (real grid/block/shared-memory logic, one host thread per CUDA
thread, barriers), against the PyTorch references. This is how the kernels' index math, tails,
16-byte vector paths and grid choices are tested on a machine without a GPU; on a GPU,
test_patch_ops.py runs the real thing. Outputs are NaN-filled buffers the launchers write into,
shared memory is NaN-poisoned before every block.
"""

from __future__ import annotations

import pytest
import torch

import _cuda_emulator as emu
from ditfast import ops
from conftest import assert_close, max_rel_error

if emu.load() is None:
    pytest.skip(f"cannot build the emulated CUDA kernels: {emu.REASON}", allow_module_level=True)

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SMS = [132, 1]  # an H100's SM count (small grids: small token tiles, channel splits) and 1 (big tiles)


def nan_buffer(shape, dtype, misaligned=False):
    """A NaN-filled output; misaligned=True shifts it by one element off 16-byte alignment."""
    n = int(torch.tensor(shape).prod())
    flat = torch.full((n + 1,), float("nan"), dtype=dtype)
    return (flat[1:] if misaligned else flat[:n]).view(shape)


def misaligned_copy(t):
    return nan_buffer(tuple(t.shape), t.dtype, misaligned=True).copy_(t)


def check(out, ref64, dtype, eager=None, what=""):
    assert_close(out, ref64, dtype=dtype, what=what)
    if eager is not None and dtype in (torch.bfloat16, torch.float16):
        err, err_eager = max_rel_error(out, ref64), max_rel_error(eager, ref64)
        assert err <= 2 * err_eager + 1e-6, f"{what}: error {err:.3e} vs eager {err_eager:.3e}"


# (B, C, side, p, D): DiT's C=4/p=2; K=12 (not a multiple of 8: scalar weight loads) with D=20
# (not a multiple of 8: scalar stores); p=4; K=512 (shared-memory tile shrinks); a 257-token batch.
PATCH_CASES = [(3, 4, 8, 2, 72), (2, 3, 8, 2, 20), (1, 1, 16, 4, 24), (2, 8, 16, 8, 64), (1, 4, 32, 2, 1152)]


@pytest.mark.parametrize("sms", SMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", PATCH_CASES, ids=lambda c: "B{}C{}H{}p{}D{}".format(*c))
def test_patch_embed_kernel(case, dtype, sms):
    B, C, side, p, D = case
    T = (side // p) ** 2
    x = torch.randn(B, C, side, side).to(dtype)
    w = (torch.randn(D, C, p, p) * (C * p * p) ** -0.5).to(dtype)
    b, pos = torch.randn(D).to(dtype), torch.randn(1, T, D).to(dtype)
    out = nan_buffer((B, T, D), dtype)
    emu.patch_embed(x, w, b, pos, out, sms=sms)
    ref64 = ops.patch_embed_ref(x.double(), w.double(), b.double(), pos.double())
    check(out, ref64, dtype, ops.patch_embed_ref(x, w, b, pos), what=f"patch_embed {case}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patch_embed_kernel_strided_misaligned_and_optional_terms(dtype):
    B, C, side, p, D = 3, 4, 8, 2, 64
    x = torch.randn(B, side, side, C).to(dtype).permute(0, 3, 1, 2)  # channels-last strides
    w, b = torch.randn(D, C, p, p).to(dtype) * 0.25, torch.randn(D).to(dtype)
    pos = torch.randn(1, 16, D).to(dtype)
    ref = ops.patch_embed_ref(x.double(), w.double(), b.double(), pos.double())
    # misaligned weight / pos / out: the kernel must take its scalar paths
    for mis in ("weight", "pos", "out"):
        out = nan_buffer((B, 16, D), dtype, misaligned=mis == "out")
        emu.patch_embed(x, misaligned_copy(w) if mis == "weight" else w, b, misaligned_copy(pos) if mis == "pos" else pos, out)
        check(out, ref, dtype, what=f"misaligned {mis}")
    out = nan_buffer((B, 16, D), dtype)
    emu.patch_embed(x, w, None, None, out)
    check(out, ops.patch_embed_ref(x.double(), w.double()), dtype, what="no bias, no pos")


def test_patch_embed_kernel_rejects_oversized_patches():
    x, w = torch.randn(1, 64, 32, 32), torch.randn(8, 64, 8, 8)  # K = 4096 values per patch
    with pytest.raises(RuntimeError, match="cudaError_t 1"):  # cudaErrorInvalidValue
        emu.patch_embed(x, w, None, None, nan_buffer((1, 16, 8), torch.float32))


# (B, C, G, p): C=8 (learned sigma), odd C=3 (tokens not 16-byte multiples in 16-bit types), C=1,
# p=8, G=33 with p=8 (a 264-wide image: grid rows split in tiles of 32 tokens and 1), p=3.
LAYOUT_CASES = [(3, 8, 4, 2), (2, 3, 5, 2), (1, 1, 4, 4), (2, 8, 4, 8), (1, 2, 33, 8), (2, 3, 3, 3)]


@pytest.mark.parametrize("sms", SMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", LAYOUT_CASES, ids=lambda c: "B{}C{}G{}p{}".format(*c))
def test_unpatchify_and_patchify_kernels(case, dtype, sms):
    B, C, G, p = case
    tokens = torch.randn(B, G * G, p * p * C).to(dtype)
    image = nan_buffer((B, C, G * p, G * p), dtype)
    emu.unpatchify(tokens, image, p, C, sms=sms)
    assert torch.equal(image, ops.unpatchify_ref(tokens, p, C))
    back = nan_buffer(tuple(tokens.shape), dtype)
    emu.patchify(image, back, p, sms=sms)
    assert torch.equal(back, tokens)


@pytest.mark.parametrize("misaligned", ["tokens", "image"])
def test_layout_kernels_misaligned(misaligned):
    B, C, G, p = 2, 8, 4, 2
    tokens = torch.randn(B, G * G, p * p * C, dtype=torch.bfloat16)
    src = misaligned_copy(tokens) if misaligned == "tokens" else tokens
    image = nan_buffer((B, C, G * p, G * p), torch.bfloat16, misaligned=misaligned == "image")
    emu.unpatchify(src, image, p, C)
    assert torch.equal(image, ops.unpatchify_ref(tokens, p, C))
    back = nan_buffer(tuple(tokens.shape), torch.bfloat16, misaligned=misaligned == "tokens")
    emu.patchify(image, back, p)
    assert torch.equal(back, tokens)


@pytest.mark.parametrize("sms", SMS)
@pytest.mark.parametrize("full_batch", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case,guided", [((3, 8, 4, 2), 3), ((2, 8, 4, 2), 4), ((1, 6, 5, 2), 3), ((2, 2, 4, 8), 1), ((1, 2, 33, 8), 1)],
                         ids=["official", "all4", "C6", "p8", "ragged"])  # fmt: skip
def test_unpatchify_cfg_kernel(case, guided, dtype, full_batch, sms):
    half, C, G, p = case
    tokens = torch.randn(2 * half, G * G, p * p * C).to(dtype)
    out = nan_buffer(((2 if full_batch else 1) * half, C, G * p, G * p), dtype)
    emu.unpatchify_cfg(tokens, out, p, C, guided, 4.0, full_batch, sms=sms)
    ref64 = ops.unpatchify_cfg_ref(tokens.double(), p, C, 4.0, guided, full_batch)
    check(out, ref64, dtype, ops.unpatchify_cfg_ref(tokens, p, C, 4.0, guided, full_batch), what=f"unpatchify_cfg {case}")
    image = ops.unpatchify_ref(tokens, p, C)
    assert torch.equal(out[:half, guided:], image[:half, guided:])
    if full_batch:
        assert torch.equal(out[half:, guided:], image[half:, guided:])


@pytest.mark.parametrize("dim", [256, 255])
def test_timestep_embedding_kernel(dim):
    t = torch.cat([torch.tensor([0.0, 999.0]), torch.rand(298) * 1000])
    out = nan_buffer((300, dim), torch.float32)
    emu.timestep_embedding(t, out)
    assert_close(out, ops.timestep_embedding_ref(t.double(), dim), rtol=0, atol=2e-4, what="timestep_embedding")
