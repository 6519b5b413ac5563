"""The ahead-of-time compile check of the Triton kernels (ditfast.kernels.aot).

The check itself compiles for sm_80/sm_90 without a GPU; it must run in a process where Triton's
interpreter is off (tests/conftest.py turns it on here), so the tests that enumerate or compile
run ``python -m ditfast.kernels.aot`` / ``python -c`` in a subprocess. The occupancy arithmetic,
the log parsing and the pass/fail rule are tested in-process.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
from triton.backends.compiler import GPUTarget  # noqa: E402

from ditfast.kernels import aot  # noqa: E402

kernels = pytest.importorskip("ditfast.kernels.attention")


def _nvidia_backend_available() -> str | None:
    try:
        from triton.compiler import make_backend

        make_backend(GPUTarget("cuda", 90, 32))
        from triton import knobs

        if not os.path.exists(knobs.nvidia.cuobjdump.path):
            return "triton's bundled cuobjdump is missing"
    except Exception as exc:  # noqa: BLE001
        return f"triton cannot target CUDA here: {exc}"
    return None


NO_BACKEND = _nvidia_backend_available()
needs_backend = pytest.mark.skipif(NO_BACKEND is not None, reason=str(NO_BACKEND))


def _run(args: list[str], tmp_path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python <args>`` with Triton's interpreter off and a private AOT cache."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["DITFAST_AOT_CACHE"] = str(tmp_path / "cache")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout)


# ------------------------------------------------------------------------------------------
# In-process: arithmetic, parsing, the failure rule
# ------------------------------------------------------------------------------------------


def test_blocks_per_sm():
    sm80, sm90 = aot.ARCHS[80], aot.ARCHS[90]
    assert aot.blocks_per_sm(sm90, 255, 0, 8) == (1, "regs")  # 256 regs * 32 lanes * 8 warps = 65536
    assert aot.blocks_per_sm(sm90, 128, 0, 4) == (4, "regs")
    assert aot.blocks_per_sm(sm90, 129, 0, 4) == (3, "regs")  # 129 * 32 rounds up to 4352 per warp
    assert aot.blocks_per_sm(sm80, 32, 100 * 1024, 4) == (1, "smem")  # 164 KB per SM
    assert aot.blocks_per_sm(sm90, 32, 100 * 1024, 4) == (2, "smem")  # 228 KB per SM, 1 KB reserved per block
    assert aot.blocks_per_sm(sm90, 16, 0, 16) == (4, "threads")  # 2048 threads per SM
    assert aot.blocks_per_sm(sm90, 16, 0, 1) == (32, "blocks")
    assert sm80.smem_per_block == 166912 and sm90.smem_per_block == 232448


def test_parsers():
    log = (
        "ptxas info    : Compiling entry function '_attn_bwd_kernel' for 'sm_90a'\n"
        "ptxas info    : Function properties for _attn_bwd_kernel\n"
        "    56 bytes stack frame, 52 bytes spill stores, 48 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers, 56 bytes cumulative stack size\n"
    )
    assert aot.parse_ptxas_log(log) == (56, 52, 48)
    with pytest.raises(RuntimeError, match="no spill line"):
        aot.parse_ptxas_log("")
    usage = " Function _attn_bwd_kernel:\n  REG:168 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:616 TEXTURE:0\n"
    assert aot.parse_resource_usage(usage) == (168, 0)
    assert aot.tensor_cores("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16") == "wgmma"
    assert aot.tensor_cores("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32") == "mma"
    assert aot.tensor_cores("fma.rn.f32 %f1, %f2, %f3, %f4;") == "none"


def _job(kernel="_attn_bwd_kernel", arch=90, choosable=True, warps=8):
    return aot.Job("ditfast.kernels.attention", kernel, arch, (("QKV", "*bf16"), ("DH", "constexpr")),
                   ((1, "DH", 72),), (), warps, 3, choosable)  # fmt: skip


def test_failures_name_each_choosable_config_that_must_not_ship():
    ok = {"regs": 128, "stack": 0, "spill_stores": 0, "spill_loads": 0, "shared": 65536, "tensor_cores": "wgmma"}
    jobs = {
        _job(warps=4): ok,
        _job(warps=8): {**ok, "regs": 255, "stack": 56, "spill_stores": 52, "spill_loads": 52},
        _job(arch=80, warps=8): {**ok, "shared": 170000},
        _job(kernel="_attn_fwd_kernel"): {"error": "CompilationError: at 12:4: boom\nmore"},
        _job(warps=2, choosable=False): {**ok, "spill_stores": 8},  # pruned: reported, never failing
    }
    table = aot.rows(jobs, {job: ["attention B=2 N=256"] for job in jobs})
    assert len(table) == 5 and all(r["example"] == "attention B=2 N=256" for r in table)
    bad = aot.failures(table)
    assert len(bad) == 3
    assert any("_attn_bwd_kernel sm_90 bf16 [DH=72] num_warps=8" in m and "spills" in m and "52+52 B" in m for m in bad)
    assert any("sm_80" in m and "shared memory over the per-block limit" in m and "170000/166912" in m for m in bad)
    assert any("_attn_fwd_kernel" in m and "compile error: CompilationError: at 12:4: boom" in m for m in bad)
    assert "1 spill" in aot.summary(table)  # the choosable sm_90 spill (the pruned one counted apart)


def test_csv_is_written_atomically_with_a_header_comment(tmp_path):
    ok = {"regs": 40, "stack": 0, "spill_stores": 0, "spill_loads": 0, "shared": 0, "tensor_cores": "none"}
    table = aot.rows({_job(): ok}, {_job(): ["x"]})
    path = tmp_path / "kernels_static.csv"
    aot.write_csv(str(path), table)
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# Compile-time facts") and "Not speed" in lines[0]
    rows = list(csv.DictReader(lines[1:]))
    assert rows[0]["kernel"] == "_attn_bwd_kernel" and rows[0]["regs_per_thread"] == "40" and rows[0]["blocks_per_sm"] == "6"
    assert os.listdir(tmp_path) == ["kernels_static.csv"]  # no temporary left behind


# ------------------------------------------------------------------------------------------
# The autotune pruning: per arch, at least one config for every shape
# ------------------------------------------------------------------------------------------

TUNED = {"fwd": ("_fwd_tuned", {}), "dkdv": ("_dkdv_tuned", {"DKDV": True}), "dq": ("_dq_tuned", {"DKDV": False})}


@pytest.mark.parametrize("arch", sorted(aot.ARCHS))
def test_pruning_keeps_a_config_for_every_shape(arch):
    capability = aot.ARCHS[arch].capability
    for N in aot.FULL_TOKENS + [17, 64]:
        for dh in (64, 72, 16, 40, 96, 128, 256):
            for layout in kernels.HEAD_LAYOUTS:
                d0, d1 = kernels.head_blocks(dh, layout)
                for dtype in (torch.bfloat16, torch.float16, torch.float32):
                    for precision in ("ieee", "tf32") if dtype == torch.float32 else ("ieee",):
                        named = {"QKV": torch.empty(1, N, 3 * dh, dtype=dtype, device="meta"), "N": N}
                        for role, (name, extra) in TUNED.items():
                            configs = getattr(kernels, name).configs
                            meta = dict(DH=dh, BLOCK_D0=d0, BLOCK_D1=d1, PRECISION=precision, **extra)
                            keep = kernels.prune_configs(configs, named, arch=capability, **meta)
                            assert keep and all(c in configs for c in keep), (role, arch, N, dh, layout, dtype, precision)


# ------------------------------------------------------------------------------------------
# Subprocess: enumeration from the real launchers, and compiling
# ------------------------------------------------------------------------------------------


@needs_backend
def test_enumeration_drives_the_real_launchers(tmp_path):
    code = (
        "import json, collections\n"
        "from ditfast.kernels import aot\n"
        "jobs = aot.enumerate_jobs(False, (80, 90), all_configs=True)\n"
        "print(json.dumps([dict(kernel=j.kernel, arch=j.arch, dtype=j.dtype, choosable=j.choosable,\n"
        "    cx={n: v for _, n, v in j.constexprs}, warps=j.num_warps, stages=j.num_stages) for j in jobs]))\n"
    )
    proc = _run(["-c", code], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = json.loads(proc.stdout.strip().splitlines()[-1])
    kernels_seen = {j["kernel"] for j in jobs}
    assert {"_attn_fwd_kernel", "_attn_bwd_kernel", "_attn_bwd_preprocess_kernel", "_adaln_fwd_kernel", "_adaln_bwd_kernel"} <= kernels_seen
    # DiffiT's TMSA kernels, with the time projection and the bias, global and windowed
    assert {"_tmsa_fwd_kernel", "_tmsa_bwd_kernel", "_tmsa_dbias_kernel", "_tmsa_bias_reduce_kernel"} <= kernels_seen
    tmsa = [j for j in jobs if j["kernel"] in ("_tmsa_fwd_kernel", "_tmsa_bwd_kernel")]
    assert {(j["cx"]["HAS_QKV_T"], j["cx"]["HAS_BIAS"], j["cx"]["WINDOWED"]) for j in tmsa} == {(True, True, False), (True, True, True)}
    assert all(any(j["choosable"] for j in tmsa if j["arch"] == arch and j["kernel"] == k)
               for arch in (80, 90) for k in ("_tmsa_fwd_kernel", "_tmsa_bwd_kernel"))  # fmt: skip
    attn = [j for j in jobs if j["kernel"] in ("_attn_fwd_kernel", "_attn_bwd_kernel")]
    # fp32 is compiled with and without TF32 (the launcher follows torch's switch); 16-bit only "ieee"
    assert {j["cx"]["PRECISION"] for j in attn if j["dtype"] == "fp32"} == {"ieee", "tf32"}
    assert {j["cx"]["PRECISION"] for j in attn if j["dtype"] != "fp32"} == {"ieee"}
    # both head layouts of Dh 72, and Dh 64
    assert {(j["cx"]["BLOCK_D0"], j["cx"]["BLOCK_D1"]) for j in attn} == {(64, 0), (64, 16), (128, 0)}
    def role(j):
        return "fwd" if j["kernel"] == "_attn_fwd_kernel" else "dkdv" if j["cx"]["DKDV"] else "dq"

    def variant(j):
        return role(j), j["dtype"], j["cx"]["PRECISION"], j["cx"]["BLOCK_D0"], j["cx"]["BLOCK_D1"]

    for arch in (80, 90):
        sel = [j for j in attn if j["arch"] == arch]
        for v in {variant(j) for j in sel}:
            assert any(j["choosable"] for j in sel if variant(j) == v), f"pruning left no config for {v} on sm_{arch}"
        # the spilling dk/dv configs at head dim 128 (72 padded) are pruned, per arch
        padded = [j for j in sel if variant(j) == ("dkdv", "bf16", "ieee", 128, 0)]
        assert any(j["choosable"] for j in padded) and any(not j["choosable"] for j in padded)


@needs_backend
def test_aot_cli_compiles_for_sm80_and_sm90(tmp_path):
    out = tmp_path / "kernels_static.csv"
    args = ["-m", "ditfast.kernels.aot", "--kernel", "_attn_bwd_preprocess_kernel", "--out", str(out), "--quiet"]
    proc = _run(args, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = out.read_text().splitlines()
    assert lines[0].startswith("# Compile-time facts")
    rows = list(csv.DictReader(lines[1:]))
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    for r in rows:
        assert r["kernel"] == "_attn_bwd_preprocess_kernel" and r["status"] == "ok", r
        assert 0 < int(r["regs_per_thread"]) <= 255 and r["spill_store_bytes"] == "0" and int(r["blocks_per_sm"]) >= 1
    assert "sm_80 choosable" in proc.stdout and "sm_90 choosable" in proc.stdout
    again = _run(args, tmp_path)  # the cache: nothing is compiled a second time
    assert again.returncode == 0 and "compiling" not in again.stdout, again.stdout[-2000:]
