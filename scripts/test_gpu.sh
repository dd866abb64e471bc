#!/usr/bin/env bash
# test_gpu.sh — `make test-gpu`: build with the CUDA backend, run every GPU check, print a summary.
#
# 1. builds the binaries, the op tests and build/gpu_ops with CUDA=1 (fat binary, WERROR=1);
# 2. without a CUDA device: says so and exits 1 (no GPU check can pass without one);
# 3. op parity: tests/test_backend_ops.c, every table entry on `cuda` against the CPU reference
#    (bit-exact where the file says so, bounded NMSE otherwise), and the host test of the
#    per-element device functions (tests/test_cuda_elem.cu) and the flash kernels' host emulation
#    (tests/test_cuda_flash_emu.cu);
# 4. rates on this card (bench/gpu_ops.c): bf16 GEMM TFLOP/s and fraction of peak, NF4
#    dequantization, attention, the CUDA runtime's device memory against the planner's estimate,
#    and an estimate (from those pieces) of Llama-3-8B QLoRA tokens/s and MFU;
# 5. step parity: SmolLM2-135M (the default model), 5 AdamW steps at seq 64 with `device: cpu` and
#    `device: cuda` (both attention kernels: the tensor-core flash kernels and QLORA_CUDA_ATTN=simple),
#    same data and seed (and the trainer's [memory] lines: the device plan and the host side): per-step training loss within a relative 2e-3 and the
#    final adapters within NMSE 1e-4 (bf16 GEMM operands are rounded identically by both engines;
#    only fp32 summation orders differ — oneDNN vs cuBLASLt, the attention and softmax sums — which
#    moves a loss by ~1e-5 relative per step; AdamW's first steps are ~lr·sign(g), so a gradient
#    that differs in its last bits moves parameters by far less than lr: NMSE ≲ 1e-6);
#    then gradient_checkpointing true vs offload on the device (SmolLM2, 5 steps): every logged
#    number but the timings, and the adapter's bytes, identical (offloading copies bits);
#    then tokens/s of each attention kernel (SmolLM2 shape, seq 2048), and Gemma 3 270M cpu vs cuda
#    at sequence_len 640 (its sliding window of 512 in the kernels), losses within 2e-3 relative;
# 6. a measured step of Llama-3-8B QLoRA at seq 2048 (random NF4 base of that shape, qlora-bench
#    --device cuda): tokens/s, MFU against the card's peak by 6·N FLOPs, device memory measured
#    against the planner's prediction; the same with --checkpointing offload (goal: <= 8 GiB);
# 7. several GPUs through NCCL (comm/comm_nccl.c), with 2 or more GPUs (else the rows say
#    "SKIPPED: needs 2 GPUs" and do not fail the run): tests/test_comm_nccl.c — every collective on
#    device and host buffers against sums computed on the host, over mpirun (the id over MPI) and
#    over torchrun's environment (the id over the TCP rendezvous), and a hung rank ending the job
#    through the timeout and ncclCommAbort; then SmolLM2, 5 steps: world 2 on two GPUs (--nproc 2,
#    and torchrun — the real one when installed, else its environment set here) against world 1 ×
#    gradient_accumulation_steps 2 on one GPU: every logged loss, lr, grad_norm and eval loss, and
#    the adapter's bytes, identical (each micro-batch's gradient is computed alone and added; two
#    fp32 terms have one sum whatever the order NCCL adds them in).
# Exit 0 only when every row passes or is skipped for want of a second GPU. Runs in well under 10
# minutes on one H100.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 2)}

printf '[test-gpu] building with CUDA=1 (-j%s)\n' "$JOBS"
if ! make -j"$JOBS" CUDA=1 WERROR=1 all build/tests/test_backend_ops build/tests/test_cuda_elem build/tests/test_cuda_flash_emu build/tests/test_comm_nccl build/gpu_ops >/tmp/qlora-test-gpu-build.log 2>&1; then
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
row() { rows+=("$(printf '%-44s %-9s %s' "$1" "$2" "$3")"); [ "$2" = PASS ] || [ "$2" = INFO ] || [ "$2" = SKIP ] || fail=1; }

# op parity
ops=$(timeout 600 build/tests/test_backend_ops 2>&1)
np=$(grep -c '^\[       OK \] cuda/' <<<"$ops")
nf=$(grep -c '^\[  FAILED  \] cuda/' <<<"$ops")
ns=$(grep -c '^\[  SKIPPED \] cuda/' <<<"$ops")
if [ "$nf" -eq 0 ] && [ "$ns" -eq 0 ] && [ "$np" -gt 0 ]; then row "op parity (test_backend_ops, cuda/*)" PASS "$np cases"
else row "op parity (test_backend_ops, cuda/*)" FAIL "$np passed, $nf failed, $ns skipped"; grep -B2 -A6 'FAILED\|ERROR' <<<"$ops" | head -60; fi
if build/tests/test_cuda_elem >/dev/null 2>&1; then row "per-element functions on the host" PASS "test_cuda_elem"
else row "per-element functions on the host" FAIL "test_cuda_elem"; fi
if build/tests/test_cuda_flash_emu >/dev/null 2>&1; then row "flash kernels emulated on the host" PASS "test_cuda_flash_emu"
else row "flash kernels emulated on the host" FAIL "test_cuda_flash_emu"; fi

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
# step parity
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
if [ -f "$model" ] && [ -f datasets/manpages/train.jsonl ]; then
    tmp=$(mktemp -d)
    ok=1
    for dev in cpu cuda cuda-simple; do
        QLORA_CUDA_ATTN=$([ "$dev" = cuda-simple ] && echo simple || echo flash) \
        timeout 600 bin/qlora-train configs/smollm2-135m-manpages.yaml device=${dev%-simple} sequence_len=64 max_steps=5 \
            eval_max_tokens=256 output_dir="$tmp/$dev" >"$tmp/$dev.log" 2>&1 || { ok=0; tail -5 "$tmp/$dev.log"; }
    done
    # the trainer's [memory] lines on the device: the device plan, then the host side
    if grep -q '^\[memory\] device (cuda' "$tmp/cuda.log" && grep -q '^\[memory\] host: predicted' "$tmp/cuda.log"; then
        row "trainer [memory]: device plan + host side" PASS "$(grep -h '^\[memory\] device: ' "$tmp/cuda.log" | head -1 | cut -c1-70)"
    else row "trainer [memory]: device plan + host side" FAIL "no device/host [memory] lines in $tmp/cuda.log"; fi
    for kern in cuda cuda-simple; do
    [ "$ok" = 1 ] || break
        parity=$(python3 - "$tmp/cpu" "$tmp/$kern" <<'PY'
import json, struct, sys
def losses(d):
    return [json.loads(l)["loss"] for l in open(d + "/metrics.jsonl") if '"loss"' in l]
def tensors(d):
    b = open(d + "/adapter_model.safetensors", "rb").read()
    n = struct.unpack("<Q", b[:8])[0]; h = json.loads(b[8:8 + n]); out = {}
    for k, v in h.items():
        if k == "__metadata__": continue
        s, e = v["data_offsets"]; out[k] = struct.unpack("<%df" % ((e - s) // 4), b[8 + n + s:8 + n + e])
    return out
a, b = losses(sys.argv[1]), losses(sys.argv[2])
rel = max(abs(x - y) / abs(x) for x, y in zip(a, b)) if a and len(a) == len(b) else float("inf")
ta, tb = tensors(sys.argv[1]), tensors(sys.argv[2])
num = den = 0.0
for k in ta:
    for x, y in zip(ta[k], tb.get(k, ())): num += (x - y) ** 2; den += x * x
nmse = num / den if den and ta.keys() == tb.keys() else float("inf")
print("PASS" if rel <= 2e-3 and nmse <= 1e-4 else "FAIL", "losses max rel diff %.2e (%d steps), adapter NMSE %.2e" % (rel, len(a), nmse))
PY
)
        row "step parity (SmolLM2, 5 steps, cpu vs $kern)" "${parity%% *}" "${parity#* }"
    done
    [ "$ok" = 1 ] || row "step parity (SmolLM2, 5 steps, cpu vs cuda)" FAIL "a run failed (logs in $tmp)"
else
    row "step parity (SmolLM2, 5 steps, cpu vs cuda)" FAIL "default model/data missing: make model dataset"
fi

# gradient_checkpointing: offload on the device: the same run with true and offload (same GPU, same
# kernels; offloading copies bits), so every logged number but the timings and the adapter's bytes match
if [ -f "$model" ] && [ -f datasets/manpages/train.jsonl ]; then
    t3=$(mktemp -d)
    ok=1
    for ck in true offload; do
        timeout 600 bin/qlora-train configs/smollm2-135m-manpages.yaml device=cuda sequence_len=64 max_steps=5 \
            eval_max_tokens=256 gradient_checkpointing=$ck output_dir="$t3/$ck" >"$t3/$ck.log" 2>&1 ||
            { ok=0; tail -5 "$t3/$ck.log"; }
    done
    if [ "$ok" = 1 ]; then
        same=$(python3 - "$t3/true" "$t3/offload" <<'PY'
import json, sys
drop = ("tokens_per_sec", "train_seconds", "step_seconds", "time")
def lines(d):
    return [{k: v for k, v in json.loads(l).items() if k not in drop} for l in open(d + "/metrics.jsonl") if l.strip()]
a, b = lines(sys.argv[1]), lines(sys.argv[2])
same_ad = open(sys.argv[1] + "/adapter_model.safetensors", "rb").read() == open(sys.argv[2] + "/adapter_model.safetensors", "rb").read()
print(("PASS %d metrics lines, adapter bytes identical" % len(a)) if a and a == b and same_ad
      else "FAIL " + ("metrics differ; " if a != b else "") + ("adapter bytes differ" if not same_ad else ""))
PY
)
        row "offload parity (SmolLM2, 5 steps, true vs offload)" "${same%% *}" "${same#* }"
        grep -h '^\[config\] gradient_checkpointing: offload' "$t3/offload.log" | head -1 | sed 's/^/  /'
    else
        row "offload parity (SmolLM2, 5 steps, true vs offload)" FAIL "a run failed (logs in $t3)"
    fi
fi

# the two attention kernels (QLORA_CUDA_ATTN): tokens/s of a SmolLM2-shape step at seq 2048, where
# attention is a large part of the step (the op parity of both is in test_backend_ops above)
for kern in flash simple; do
    bench=$(QLORA_CUDA_ATTN=$kern timeout 300 bin/qlora-bench --device cuda --shape smollm2-135m --seq 2048 --batch 1 \
            --lora-r 16 --checkpointing on --steps 3 --warmup 1 2>/tmp/qlora-test-gpu-attn-$kern.err | tail -1)
    if grep -q tokens_per_s <<<"$bench"; then
        row "attention $kern: SmolLM2 shape, seq 2048 step" INFO "$(python3 -c 'import json,sys; print("%.0f tok/s" % json.loads(sys.argv[1])["tokens_per_s"])' "$bench")"
    else
        row "attention $kern: SmolLM2 shape, seq 2048 step" FAIL "qlora-bench failed: $(tail -2 /tmp/qlora-test-gpu-attn-$kern.err)"
    fi
done

# Gemma 3 270M on the device: sliding-window layers (window 512) at sequence_len 640, cpu vs cuda, 3 steps
g3=models/gemma-3-270m-q4_k_m.gguf
if [ -f "$g3" ] && [ -f datasets/manpages/train.jsonl ]; then
    t4=$(mktemp -d)
    ok=1
    for dev in cpu cuda; do
        timeout 600 bin/qlora-train configs/smollm2-135m-manpages.yaml base_model="$g3" device=$dev sequence_len=640 \
            max_steps=3 eval_max_tokens=256 output_dir="$t4/$dev" >"$t4/$dev.log" 2>&1 || { ok=0; tail -5 "$t4/$dev.log"; }
    done
    if [ "$ok" = 1 ]; then
        g=$(python3 - "$t4/cpu" "$t4/cuda" <<'PY'
import json, sys
def losses(d):
    return [json.loads(l)["loss"] for l in open(d + "/metrics.jsonl") if '"loss"' in l]
a, b = losses(sys.argv[1]), losses(sys.argv[2])
rel = max(abs(x - y) / abs(x) for x, y in zip(a, b)) if a and len(a) == len(b) else float("inf")
print("PASS" if rel <= 2e-3 else "FAIL", "losses max rel diff %.2e (%d steps)" % (rel, len(a)))
PY
)
        row "Gemma 3 270M, seq 640 (window 512), cpu vs cuda" "${g%% *}" "${g#* }"
    else
        row "Gemma 3 270M, seq 640 (window 512), cpu vs cuda" FAIL "a run failed (logs in $t4)"
    fi
else
    row "Gemma 3 270M, seq 640 (window 512), cpu vs cuda" SKIP "SKIPPED: $g3 missing (make gemma3-model)"
fi

# a measured 8B step
bench=$(timeout 900 bin/qlora-bench --device cuda --shape llama3-8b --seq 2048 --batch 1 --lora-r 16 \
        --checkpointing on --steps 3 --warmup 1 2>/tmp/qlora-test-gpu-bench.err | tail -1)
if grep -q tokens_per_s <<<"$bench"; then
    read -r tps used pred <<<"$(python3 -c 'import json,sys; j=json.loads(sys.argv[1]); print(j["tokens_per_s"], j["device_used_mb"], j["predicted_peak_mb"])' "$bench")"
    pk=$(val peak_bf16_tflops)
    mfu=$(python3 -c "import sys; p=float(sys.argv[2] or 0); print('%.3f' % (6*8.03e9*float(sys.argv[1])/(p*1e12)) if p else 'n/a')" "$tps" "$pk")
    row "8B QLoRA step (seq 2048, r 16, ckpt on)" INFO "$tps tok/s, MFU $mfu by 6N (targets: 2400 tok/s on a 4090 / MFU 0.6)"
    row "memory: 8B step, measured vs predicted" INFO "$used MiB in use vs $pred MiB predicted"
else
    row "8B QLoRA step (seq 2048, r 16, ckpt on)" FAIL "qlora-bench failed: $(tail -2 /tmp/qlora-test-gpu-bench.err)"
fi
# the same step with the block inputs offloaded (goal: <= 8 GiB of device memory)
bench=$(timeout 900 bin/qlora-bench --device cuda --shape llama3-8b --seq 2048 --batch 1 --lora-r 16 \
        --checkpointing offload --steps 3 --warmup 1 2>/tmp/qlora-test-gpu-bench-off.err | tail -1)
if grep -q tokens_per_s <<<"$bench"; then
    read -r tps used pred <<<"$(python3 -c 'import json,sys; j=json.loads(sys.argv[1]); print(j["tokens_per_s"], j["device_used_mb"], j["predicted_peak_mb"])' "$bench")"
    row "8B QLoRA step (seq 2048, r 16, ckpt offload)" INFO "$tps tok/s"
    row "memory: 8B offload step, measured vs predicted" INFO "$used MiB in use vs $pred MiB predicted (goal <= 8192)"
else
    row "8B QLoRA step (seq 2048, r 16, ckpt offload)" FAIL "qlora-bench failed: $(tail -2 /tmp/qlora-test-gpu-bench-off.err)"
fi

# several GPUs: NCCL
if [ -n "${CUDA_VISIBLE_DEVICES+x}" ]; then
    ngpu=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .)
else
    ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
fi
if [ "$ngpu" -lt 2 ]; then
    row "NCCL collectives (mpirun, torchrun, hang)" SKIP "SKIPPED: needs 2 GPUs ($ngpu here)"
    row "2 GPUs vs 1 GPU x accumulation 2" SKIP "SKIPPED: needs 2 GPUs ($ngpu here)"
else
    nccl=$(timeout 900 build/tests/test_comm_nccl 2>&1)
    nrc=$?
    nok=$(grep -c '^\[       OK \] test_' <<<"$nccl")
    nsk=$(grep -c '^\[  SKIPPED \] test_' <<<"$nccl")
    if [ "$nrc" -eq 0 ] && [ "$nok" -eq 4 ]; then row "NCCL collectives (mpirun, torchrun, hang)" PASS "$nok cases"
    else
        row "NCCL collectives (mpirun, torchrun, hang)" FAIL "exit $nrc, $nok of 4 passed, $nsk skipped"
        grep -B2 -A8 'FAILED\|ERROR\|SKIPPED:' <<<"$nccl" | head -60
    fi
    if [ -f "$model" ] && [ -f datasets/manpages/train.jsonl ]; then
        t2=$(mktemp -d)
        common=(configs/smollm2-135m-manpages.yaml device=cuda sequence_len=64 max_steps=5 micro_batch_size=2
                eval_steps=5 eval_max_tokens=256 save_steps=5)
        ok=1
        timeout 600 bin/qlora-train "${common[@]}" gradient_accumulation_steps=2 output_dir="$t2/w1" \
            >"$t2/w1.log" 2>&1 || { ok=0; tail -5 "$t2/w1.log"; }
        timeout 600 bin/qlora-train --nproc 2 "${common[@]}" gradient_accumulation_steps=1 output_dir="$t2/w2" \
            >"$t2/w2.log" 2>&1 || { ok=0; tail -5 "$t2/w2.log"; }
        port=$(( 29500 + RANDOM % 2000 ))
        if command -v torchrun >/dev/null 2>&1; then
            how="torchrun"
            timeout 600 torchrun --nproc_per_node 2 --master_addr 127.0.0.1 --master_port "$port" --no_python \
                bin/qlora-train "${common[@]}" gradient_accumulation_steps=1 output_dir="$t2/w2t" \
                >"$t2/w2t.log" 2>&1 || { ok=0; tail -5 "$t2/w2t.log"; }
        else
            how="torchrun's environment"
            pids=()
            for r in 0 1; do
                RANK=$r LOCAL_RANK=$r WORLD_SIZE=2 LOCAL_WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
                    timeout 600 bin/qlora-train "${common[@]}" gradient_accumulation_steps=1 output_dir="$t2/w2t" \
                    >"$t2/w2t.$r.log" 2>&1 &
                pids+=($!)
            done
            for r in 0 1; do wait "${pids[$r]}" || { ok=0; tail -5 "$t2/w2t.$r.log"; }; done
        fi
        if [ "$ok" = 1 ]; then
            same=$(python3 - "$t2/w1" "$t2/w2" "$t2/w2t" <<'PY'
import json, sys
keep = ("step", "loss", "lr", "grad_norm", "epoch", "eval_loss", "eval_tokens")
def lines(d):
    return [{k: j[k] for k in keep if k in j} for j in (json.loads(l) for l in open(d + "/metrics.jsonl") if l.strip())]
def adapter(d):
    return open(d + "/adapter_model.safetensors", "rb").read()
a = lines(sys.argv[1]); bad = []
for d in sys.argv[2:]:
    if lines(d) != a: bad.append(d + ": metrics differ")
    if adapter(d) != adapter(sys.argv[1]): bad.append(d + ": adapter bytes differ")
n_eval = sum("eval_loss" in l for l in a)
print(("PASS %d metrics lines (%d with eval), adapter bytes identical" % (len(a), n_eval)) if not bad and a and n_eval
      else "FAIL " + ("; ".join(bad) or "no metrics or no evaluation"))
PY
)
            row "2 GPUs vs 1 GPU x accumulation 2" "${same%% *}" "${same#* } (--nproc 2 and $how)"
            grep -h '^\[nccl\]' "$t2/w2.log" | sed 's/^/  /'
        else
            row "2 GPUs vs 1 GPU x accumulation 2" FAIL "a run failed (logs in $t2)"
        fi
    else
        row "2 GPUs vs 1 GPU x accumulation 2" FAIL "default model/data missing: make model dataset"
    fi
fi

printf '\n[test-gpu] summary\n'
printf '  %s\n' "${rows[@]}"
if [ "$fail" -ne 0 ]; then printf '[test-gpu] FAILED (rows not PASS, INFO or SKIP above)\n'; exit 1; fi
printf '[test-gpu] passed\n'
