#!/usr/bin/env bash
# The GPU validation runbook (issue "GPU validation"), in stages that each fit a 10-minute call of
# the device tool. Run from the repository root; logs and result CSVs go to $OUT (default
# ./gpu_out), to be copied into benchmarks/results/ and committed.
#
#   bash benchmarks/gpu_session.sh build        # CUDA build of ditfast._C + `ditfast info`
#   bash benchmarks/gpu_session.sh test-core    # model/backends/sampling/csrc tests on CUDA first
#   bash benchmarks/gpu_session.sh test         # the whole suite on CUDA
#   bash benchmarks/gpu_session.sh kernels      # fused ops, patch ops, attention benchmarks
#   bash benchmarks/gpu_session.sh sampling     # end-to-end sampling benchmark (DiT-XL/2)
#   bash benchmarks/gpu_session.sh training     # training-step benchmark (DiT-XL/2)
#   bash benchmarks/gpu_session.sh fid          # the Gflops-vs-FID study, trained on the GPU
#   bash benchmarks/gpu_session.sh report       # REPORT.md + plots from $OUT/results
#
# Stages after `build` assume a warm machine (the editable build is kept between calls).
set -euo pipefail
OUT="${OUT:-$PWD/gpu_out}"
RES="$OUT/results"
mkdir -p "$RES"
stage="${1:?usage: gpu_session.sh build|test-core|test|kernels|sampling|training|fid|report}"
log() { tee -a "$OUT/$stage.log"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1 || true

case "$stage" in
  build)
    FORCE_CUDA=1 MAX_JOBS=16 pip install --no-build-isolation --no-deps -e . -q 2>&1 | log
    python -m ditfast.cli info 2>&1 | log ;;
  test-core)
    DITFAST_EXPECT_EXT=1 timeout 580 python -m pytest -q -x -rs tests/test_backends.py tests/test_model.py \
      tests/test_sampling.py tests/csrc tests/kernels 2>&1 | log ;;
  test)
    DITFAST_EXPECT_EXT=1 timeout 580 python -m pytest -q -rs tests 2>&1 | log ;;
  kernels)
    timeout 190 python benchmarks/bench_fused_ops.py --out "$RES/fused_ops_gpu.csv" 2>&1 | log
    timeout 190 python benchmarks/bench_patch_ops.py --out "$RES/patch_ops_gpu.csv" 2>&1 | log
    timeout 190 python benchmarks/bench_attention.py --out "$RES/attention_gpu.csv" 2>&1 | log ;;
  sampling)
    timeout 580 python benchmarks/bench_sampling.py --out "$RES/sampling_gpu.csv" 2>&1 | log ;;
  training)
    timeout 580 python benchmarks/bench_training.py --out "$RES/training_gpu.csv" 2>&1 | log ;;
  fid)
    timeout 580 python benchmarks/bench_gflops_fid.py --work "$OUT/gflops_fid" --num-samples 2000 \
      --out "$RES/gflops_fid_gpu.csv" --no-progress 2>&1 | log ;;
  report)
    python benchmarks/report.py --results "$RES" --out "$OUT/REPORT.md" --plots "$OUT/plots" 2>&1 | log ;;
  *)
    echo "unknown stage $stage" >&2; exit 2 ;;
esac
