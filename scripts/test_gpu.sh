#!/usr/bin/env bash
# test_gpu.sh — `make test-gpu`: build with the CUDA backend, run every GPU check, print a summary.
#
# 1. builds the binaries, the op tests and build/gpu_ops with CUDA=1 (fat binary, WERROR=1);
# 2. without a CUDA device: says so and exits 1 (no GPU check can pass without one);
# 3. op parity: tests/test_backend_ops.c, every table entry on `cuda` against the CPU reference
#    (bit-exact where the file says so, bounded NMSE otherwise), and the host test of the
#    per-element device functions (tests/test_cuda_elem.cu);
# 4. rates on this card (bench/gpu_ops.c): bf16 GEMM TFLOP/s and fraction of peak, NF4
#    dequantization, attention, the CUDA runtime's device memory against the planner's estimate,
#    and an estimate (from those pieces) of Llama-3-8B QLoRA tokens/s and MFU;
# 5. step parity (tiny Llama, 5 steps vs the CPU engine) and a measured training step need the
#    trainer on the device (README "GPU": not done yet); they are listed as NOT RUN, and the
#    command exits 1 until they exist.
# Exit 0 only when every row passes. Runs in well under 10 minutes on one H100.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 2)}

printf '[test-gpu] building with CUDA=1 (-j%s)\n' "$JOBS"
if ! make -j"$JOBS" CUDA=1 WERROR=1 all build/tests/test_backend_ops build/tests/test_cuda_elem build/gpu_ops >/tmp/qlora-test-gpu-build.log 2>&1; then
    tail -20 /tmp/qlora-test-gpu-build.log
    printf '[test-gpu] FAILED: the CUDA build failed (log: /tmp/qlora-test-gpu-build.log)\n'
    exit 1
fi

out=$(timeout 300 build/gpu_ops 2>&1)
rc=$?
if [ "$rc" -ne 0 ] && grep -q '^device none' <<<"$out"; then
    printf '[test-gpu] FAILED: no CUDA device on this machine: the GPU checks cannot run here (they need one)\n'
    exit 1
fi
val() { awk -v k="$1" '$1 == k { $1 = ""; sub(/^ /, ""); print; exit }' <<<"$out"; }

rows=() fail=0
row() { rows+=("$(printf '%-44s %-9s %s' "$1" "$2" "$3")"); [ "$2" = PASS ] || [ "$2" = INFO ] || fail=1; }

# op parity
ops=$(timeout 600 build/tests/test_backend_ops 2>&1)
np=$(grep -c '^\[       OK \] cuda/' <<<"$ops")
nf=$(grep -c '^\[  FAILED  \] cuda/' <<<"$ops")
ns=$(grep -c '^\[  SKIPPED \] cuda/' <<<"$ops")
if [ "$nf" -eq 0 ] && [ "$ns" -eq 0 ] && [ "$np" -gt 0 ]; then row "op parity (test_backend_ops, cuda/*)" PASS "$np cases"
else row "op parity (test_backend_ops, cuda/*)" FAIL "$np passed, $nf failed, $ns skipped"; grep -B2 -A6 'FAILED\|ERROR' <<<"$ops" | head -60; fi
if build/tests/test_cuda_elem >/dev/null 2>&1; then row "per-element functions on the host" PASS "test_cuda_elem"
else row "per-element functions on the host" FAIL "test_cuda_elem"; fi

if [ "$rc" -ne 0 ]; then
    row "op rates (bench/gpu_ops)" FAIL "exit $rc"
    printf '%s\n' "$out" | tail -20
else
    row "device" INFO "$(val device), $(val device_memory_total_mib) MiB"
    row "bf16 GEMM, 8B block linears at 2048 tokens" INFO "$(val gemm_tflops) TFLOP/s = $(val gemm_frac_peak) of $(val peak_bf16_tflops) peak"
    row "NF4 -> bf16 dequant (14336 x 4096)" INFO "$(val nf4_dequant_ms) ms, $(val nf4_dequant_gbs) GB/s"
    row "attention fwd + bwd (T 2048, 32/8 heads, hd 128)" INFO "$(val attention_fwd_ms) + $(val attention_bwd_ms) ms"
    pred=$(bin/qlora-bench --device cuda --plan-only --shape llama3-8b --seq 2048 --batch 1 --lora-r 16 --checkpointing on | awk '/^  runtime/ {print $2}')
    row "memory: CUDA runtime, measured vs predicted" INFO "$(val runtime_used_mib) MiB vs $pred MiB"
    mfu=$(val estimate_mfu)
    row "8B QLoRA step ESTIMATE from measured ops" INFO "$(val estimate_tok_s) tok/s, MFU ${mfu:-n/a} (target >= 0.6)"
fi
row "step parity (tiny Llama, 5 steps vs CPU)" "NOT RUN" "the trainer's model/state are not on the device yet (README GPU)"
row "measured 8B step: tok/s, MFU, memory" "NOT RUN" "same reason"

printf '\n[test-gpu] summary\n'
printf '  %s\n' "${rows[@]}"
if [ "$fail" -ne 0 ]; then printf '[test-gpu] FAILED (rows not PASS above)\n'; exit 1; fi
printf '[test-gpu] passed\n'
