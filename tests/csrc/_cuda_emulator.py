"""Build csrc/cuda/*.cu for the host with the CUDA emulation of cuda_emulator/emu_runtime.h and
call the launchers on CPU tensors (tests only; see that header for what this does and does not
check). Needs g++ and the CUDA toolkit's headers (cuda_fp16.h); `load()` returns None, with the
reason in `REASON`, where they are missing.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
CUDA_SRC = ROOT / "csrc" / "cuda"
EMU_DIR = Path(__file__).resolve().parent / "cuda_emulator"
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}  # launchers.h DType

_LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^;<>]*>)?)<<<([^;]*?)>>>\(")
_PREAMBLE = """#include "emu_runtime.h"
namespace ditfast {{ namespace cuda {{ namespace {{ alignas(16) unsigned char smem_raw[emu::kSmemBytes]; }} }} }}
static unsigned char* const emu_smem = ditfast::cuda::smem_raw;
#line 1 "{path}"
"""
REASON: str | None = None
_LIB = None


def _cuda_include() -> Path | None:
    for base in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if base and (Path(base) / "include" / "cuda_fp16.h").exists():
            return Path(base) / "include"
    nvcc = shutil.which("nvcc")
    if nvcc and (Path(nvcc).resolve().parents[1] / "include" / "cuda_fp16.h").exists():
        return Path(nvcc).resolve().parents[1] / "include"
    return None


def _build() -> Path:
    sources = sorted(CUDA_SRC.glob("*.cu"))
    inputs = sources + sorted(CUDA_SRC.glob("*.h")) + sorted(CUDA_SRC.glob("*.cuh")) + sorted(EMU_DIR.iterdir())
    digest = hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in inputs)).hexdigest()[:16]
    out_dir = Path(tempfile.gettempdir()) / f"ditfast-cuda-emulator-{digest}"
    lib = out_dir / "emu.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    units = []
    for src in sources:
        text = _LAUNCH.sub(r"::emu::Launch(emu_smem, \2)(\1, ", src.read_text())
        unit = out_dir / f"{src.stem}_host.cpp"
        unit.write_text(_PREAMBLE.format(path=src) + text)
        units.append(str(unit))
    tmp = out_dir / f"emu.{os.getpid()}.so"
    cmd = ["g++", "-std=c++20", "-O1", "-fPIC", "-shared", "-w", "-pthread", f"-I{_cuda_include()}", f"-I{EMU_DIR}",
           f"-I{CUDA_SRC}", *units, str(EMU_DIR / "emu_api.cpp"), "-o", str(tmp)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    os.replace(tmp, lib)  # atomic: parallel sessions never load a half-written library
    return lib


def load():
    """The emulated launchers as a ctypes library, or None (see REASON)."""
    global _LIB, REASON
    if _LIB is not None or REASON is not None:
        return _LIB
    if shutil.which("g++") is None:
        REASON = "g++ is not installed"
    elif _cuda_include() is None:
        REASON = "the CUDA toolkit headers (cuda_fp16.h) are not installed"
    if REASON is not None:
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except subprocess.CalledProcessError as exc:  # a compile error is a test failure, not a skip
        raise RuntimeError(f"building the emulated CUDA kernels failed:\n{exc.stderr[-4000:]}") from exc
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.emu_patch_embed.argtypes = [ctypes.c_int, ptr, i64, i64, i64, i64, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, ctypes.c_int]
    lib.emu_unpatchify.argtypes = [ctypes.c_int, ptr, ptr, i64, i64, i64, i64, ctypes.c_int]
    lib.emu_patchify.argtypes = [ctypes.c_int, ptr, ptr, i64, i64, i64, i64, ctypes.c_int]
    lib.emu_unpatchify_cfg.argtypes = [ctypes.c_int, ptr, ptr, i64, i64, i64, i64, i64, ctypes.c_double, ctypes.c_bool, ctypes.c_int]
    lib.emu_timestep_embedding.argtypes = [ptr, ptr, i64, i64, ctypes.c_float, ctypes.c_int]
    _LIB = lib
    return lib


def _ptr(t: torch.Tensor | None):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _check(op: str, err: int) -> None:
    if err != 0:
        raise RuntimeError(f"emulated {op} launcher returned cudaError_t {err}")


def patch_embed(x, weight, bias, pos, out, sms=132):
    """Run the CUDA patch_embed launcher; out (B*T, D) is written in place (x may be strided)."""
    B, C, H, W = x.shape
    D, _, p, _ = weight.shape
    _check("patch_embed", _LIB.emu_patch_embed(DTYPES[x.dtype], _ptr(x), *x.stride(), _ptr(weight), _ptr(bias), _ptr(pos), _ptr(out), B, C, H, W, p, D, sms))


def unpatchify(tokens, image, p, C, sms=132):
    _check("unpatchify", _LIB.emu_unpatchify(DTYPES[tokens.dtype], _ptr(tokens), _ptr(image), image.shape[0], C, p, image.shape[2] // p, sms))


def patchify(image, tokens, p, sms=132):
    B, C, H, _ = image.shape
    _check("patchify", _LIB.emu_patchify(DTYPES[image.dtype], _ptr(image), _ptr(tokens), B, C, p, H // p, sms))


def unpatchify_cfg(tokens, image, p, C, guided, scale, full_batch, sms=132):
    half = tokens.shape[0] // 2
    _check("unpatchify_cfg", _LIB.emu_unpatchify_cfg(DTYPES[tokens.dtype], _ptr(tokens), _ptr(image), half, C, p, image.shape[2] // p, guided, scale, full_batch, sms))


def timestep_embedding(t, out, max_period=10000.0, sms=132):
    _check("timestep_embedding", _LIB.emu_timestep_embedding(_ptr(t), _ptr(out), out.shape[0], out.shape[1], max_period, sms))
