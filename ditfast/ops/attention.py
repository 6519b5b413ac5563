"""Softmax attention on the packed qkv projection, as DiT computes it.

    packed_attention(qkv, num_heads, scale=None)      -> (B, N, H*Dh)
    packed_attention_ref(qkv, num_heads, scale=None)  the official math, in qkv's dtype

``qkv`` is the (B, N, 3*H*Dh) output of the qkv Linear: each row [q | k | v], each head-major.
The result has the heads concatenated, (B, N, H*Dh), ready for the output projection;
``scale`` defaults to Dh**-0.5.

``packed_attention`` is the custom op ``torch.ops.ditfast.attn_packed_fwd`` (returning the output
and the fp32 logsumexp (B, H, N)) with an autograd formula calling
``torch.ops.ditfast.attn_packed_bwd``; both run the Triton kernels of ``ditfast.kernels.attention``,
which read qkv in place and write the packed gradient dqkv (fp32 inputs use TF32 dots exactly when
``torch.backends.cuda.matmul.allow_tf32`` is set, as torch's own matmuls do; the autotuned block
sizes are pruned per GPU to ones that do not spill registers, which ``python -m
ditfast.kernels.aot`` checks for sm_80 and sm_90 without a GPU). They run on CUDA, and on the CPU only
under Triton's interpreter (``TRITON_INTERPRET=1``, for tests); elsewhere the op raises, naming
the reason (``ditfast.attention`` dispatches to the backends that can run). Choosing between
this kernel and flash-attn, xformers or torch's SDPA kernels is ``ditfast.attention``'s job.
"""

from __future__ import annotations

import torch

from .adaln import triton_status

__all__ = ["packed_attention", "packed_attention_ref", "check_packed_qkv", "MAX_HEAD_DIM"]

MAX_HEAD_DIM = 256  # the Triton kernel keeps (block, head dim) tiles of q, k, v and the output in registers


def check_packed_qkv(qkv: torch.Tensor, num_heads: int) -> int:
    """Validate a packed (B, N, 3*H*Dh) qkv; return the head dim Dh (ValueError otherwise)."""
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 3 or not qkv.is_floating_point():
        got = f"{tuple(qkv.shape)} {qkv.dtype}" if isinstance(qkv, torch.Tensor) else type(qkv).__name__
        raise ValueError(f"qkv must be a floating-point (B, N, 3*H*Dh) tensor, got {got}")
    if qkv.shape[-1] == 0 or qkv.shape[-1] % (3 * num_heads):
        raise ValueError(
            f"qkv's last dim must be 3 * num_heads * head_dim = a positive multiple of {3 * num_heads}, "
            f"got {qkv.shape[-1]}"
        )
    return qkv.shape[-1] // (3 * num_heads)


def packed_attention_ref(qkv: torch.Tensor, num_heads: int, scale: float | None = None) -> torch.Tensor:
    """The official math (softmax(q k^T * scale) v per head) in qkv's dtype -> (B, N, H*Dh)."""
    head_dim = check_packed_qkv(qkv, num_heads)
    B, N, _ = qkv.shape
    scale = head_dim**-0.5 if scale is None else scale
    q, k, v = qkv.reshape(B, N, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, Dh)
    attn = ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, N, N)
    return (attn @ v).transpose(1, 2).reshape(B, N, num_heads * head_dim)


# ------------------------------------------------------------------------------------------
# Custom ops
# ------------------------------------------------------------------------------------------


def _kernels(device: torch.device):
    """``ditfast.kernels.attention``, or a RuntimeError saying why it cannot run on ``device``."""
    reason = triton_status(device)  # also imports triton once, fixing the interpreter choice
    if reason is not None:
        raise RuntimeError(f"ditfast's Triton attention kernel cannot run on {device}: {reason}")
    from ditfast.kernels import attention

    return attention


@torch.library.custom_op("ditfast::attn_packed_fwd", mutates_args=())
def _attn_fwd_op(qkv: torch.Tensor, num_heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, N, H*Dh) in qkv's dtype, lse (B, H, N) fp32)."""
    return _kernels(qkv.device).attention_fwd(qkv, num_heads, scale)


@_attn_fwd_op.register_fake
def _(qkv, num_heads, scale):
    B, N, three_d = qkv.shape
    return qkv.new_empty((B, N, three_d // 3)), qkv.new_empty((B, num_heads, N), dtype=torch.float32)


@torch.library.custom_op("ditfast::attn_packed_bwd", mutates_args=())
def _attn_bwd_op(
    dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, num_heads: int, scale: float
) -> torch.Tensor:
    """dqkv (B, N, 3*H*Dh) in qkv's dtype."""
    return _kernels(qkv.device).attention_bwd(dout, qkv, out, lse, num_heads, scale)


@_attn_bwd_op.register_fake
def _(dout, qkv, out, lse, num_heads, scale):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    qkv, num_heads, scale = inputs
    out, lse = output
    ctx.num_heads, ctx.scale = num_heads, scale
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(qkv, out, lse)


def _backward(ctx, dout, _dlse):
    qkv, out, lse = ctx.saved_tensors
    dout = dout.to(out.dtype)  # a caller may hand back an upcast gradient
    return torch.ops.ditfast.attn_packed_bwd(dout, qkv, out, lse, ctx.num_heads, ctx.scale), None, None


_attn_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def packed_attention(qkv: torch.Tensor, num_heads: int, scale: float | None = None) -> torch.Tensor:
    """Softmax attention of packed qkv (B, N, 3*H*Dh) -> (B, N, H*Dh), ditfast's Triton kernel."""
    head_dim = check_packed_qkv(qkv, num_heads)
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"the Triton attention kernel supports head dims up to {MAX_HEAD_DIM}, got {head_dim}")
    scale = head_dim**-0.5 if scale is None else float(scale)
    return torch.ops.ditfast.attn_packed_fwd(qkv, num_heads, scale)[0]
