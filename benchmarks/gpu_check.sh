#!/usr/bin/env bash
# The one-call GPU check: everything a GPU machine should prove, in one device call of at most
# 5 minutes (so a second call still fits in the 15 minutes a task gets). Run from the repository
# root:
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine; results in $OUT (default gpu_out/)
#   bash benchmarks/gpu_check.sh --dry-run  # every stage on the CPU, tiny shapes (CI runs this)
#
# Stages, in order of value; each writes its log and CSV into $OUT as soon as it finishes, so a
# timeout keeps what was measured; a failed stage does not stop the next; the script ends with a
# summary (and exits 1 if any stage failed):
#   build      the CUDA build of ditfast._C (MAX_JOBS = the machine's cores) + `ditfast info`
#   check      `ditfast check`: every fast op against its float64 reference (check.json)
#   sampling   DiT-XL/2 256px, CFG 4.0, DDPM: images/s of ditfast graph mode vs the official
#              fp32/TF32 loop and eager bf16, at 32 and 128 images
#   fused-ops  the fused adaLN ops at B=32, N=256, D=1152: GB/s vs a device copy, vs eager
#   attention  attention backends, DiT-XL/2 at N=256 and 1024, head dim 72, fwd and fwd+bwd
#   tmsa       DiffiT's TMSA: fused Triton kernel vs SDPA with a float mask vs the reference, forward
#              error vs the reference, then fwd and fwd+bwd times (256px global, 8x8 windows)
#   diffit     DiffiT-XL/2 256px, CFG 4.4 (power-cosine), DDPM, batch 32: images/s of ditfast graph
#              mode (fused TMSA) vs the release's fp32/TF32 loop and eager bf16
#   training   one training-step rate, DiT-XL/2 batch 32: official fp32/TF32 vs ditfast
#   structure  DiT-XL/2 forward, per-block structure vs the old cross-block one (same kernels)
#   compile    torch.compile peers (sampling "compile bf16", fused ops max-autotune), last: slowest
# Stage time limits are cut to what is left of the overall budget (BUDGET_S, default 290 s).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
BUDGET_S="${BUDGET_S:-290}"
END=$((SECONDS + BUDGET_S))
SUFFIX=$([ "$DRY" = 1 ] && echo cpu_dry || echo gpu)
declare -a SUMMARY=()
FAILED=0

stage() {  # stage NAME LIMIT_S COMMAND...: run with a time limit (cut to the budget left), log to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  local left=$((END - SECONDS))
  if [ "$left" -lt 10 ]; then SUMMARY+=("skip  $name (budget spent)"); return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (limit ${limit} s) ===" | tee "$OUT/$name.log"
  local start=$SECONDS rc
  timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 0 ]; then SUMMARY+=("ok    $name ($((SECONDS - start)) s)")
  elif [ "$rc" -eq 124 ]; then SUMMARY+=("TIME  $name (stopped at ${limit} s; rows measured so far are kept)"); FAILED=1
  else SUMMARY+=("FAIL  $name (exit $rc after $((SECONDS - start)) s, see $name.log)"); FAILED=1; fi
}

(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || echo "no nvidia-smi") > "$OUT/device.txt"
git rev-parse --short HEAD > "$OUT/git_sha.txt" 2>/dev/null || true

if [ "$DRY" = 1 ]; then
  stage build 60 python -c "import ditfast._C, ditfast.info; ditfast.info.main([])"
  stage check 120 python -m ditfast.check --device cpu --json "$OUT/check.json"
  stage sampling 120 python benchmarks/bench_sampling.py --batches 2 --samplers ddpm --cfg-scale 4.0 \
    --providers "official fp32+tf32" "ditfast eager" --out "$OUT/sampling_$SUFFIX.csv"
  stage fused-ops 120 python benchmarks/bench_fused_ops.py --quick --no-compile --dtype float32 --out "$OUT/fused_ops_$SUFFIX.csv"
  stage attention 120 python benchmarks/bench_attention.py --quick --backends sdpa sdpa-math --out "$OUT/attention_$SUFFIX.csv"
  stage tmsa 60 python benchmarks/bench_tmsa.py --providers sdpa eager --out "$OUT/tmsa_$SUFFIX.csv"
  stage diffit 60 python benchmarks/bench_sampling.py --model DiffiT-XL/2 --batches 2 --samplers ddpm --cfg-scale 4.4 \
    --providers "official fp32+tf32" "ditfast eager" --out "$OUT/sampling_diffit_$SUFFIX.csv"
  stage training 120 python benchmarks/bench_training.py --batch 2 --providers "official fp32+tf32" ditfast \
    --out "$OUT/training_$SUFFIX.csv"
  stage structure 60 python benchmarks/bench_block_structure.py --out "$OUT/block_structure_$SUFFIX.csv"
else
  stage build 150 env FORCE_CUDA=1 MAX_JOBS="$(nproc)" pip install --no-build-isolation --no-deps -e . -q
  python -m ditfast.cli info > "$OUT/info.txt" 2>&1 || true
  stage check 60 python -m ditfast.check --json "$OUT/check.json"
  stage sampling 60 python benchmarks/bench_sampling.py --batches 32 128 --samplers ddpm --cfg-scale 4.0 \
    --providers "official fp32+tf32" "eager bf16" "ditfast" --out "$OUT/sampling_$SUFFIX.csv"
  stage fused-ops 30 python benchmarks/bench_fused_ops.py --quick --no-compile --out "$OUT/fused_ops_$SUFFIX.csv"
  stage attention 40 python benchmarks/bench_attention.py --quick --out "$OUT/attention_$SUFFIX.csv"
  stage tmsa 40 python benchmarks/bench_tmsa.py --quick --out "$OUT/tmsa_$SUFFIX.csv"
  stage diffit 40 python benchmarks/bench_sampling.py --model DiffiT-XL/2 --batches 32 --samplers ddpm --cfg-scale 4.4 \
    --providers "official fp32+tf32" "eager bf16" "ditfast" --out "$OUT/sampling_diffit_$SUFFIX.csv"
  stage training 40 python benchmarks/bench_training.py --batch 32 --providers "official fp32+tf32" ditfast \
    --out "$OUT/training_$SUFFIX.csv"
  stage structure 30 python benchmarks/bench_block_structure.py --out "$OUT/block_structure_$SUFFIX.csv"
  stage compile 120 python benchmarks/bench_sampling.py --batches 32 --samplers ddpm --cfg-scale 4.0 \
    --providers "compile bf16" --out "$OUT/sampling_$SUFFIX.csv"
fi

{
  echo "=== gpu_check summary ($([ "$DRY" = 1 ] && echo "dry run on the CPU: tiny shapes, no GPU figures" || cat "$OUT/device.txt")) ==="
  printf '%s\n' "${SUMMARY[@]}"
  echo "results in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
} | tee "$OUT/summary.txt"
exit "$FAILED"
