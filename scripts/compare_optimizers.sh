#!/usr/bin/env bash
# compare_optimizers.sh — AdamW vs Sophia on the default task (SmolLM2-135M, man pages) at a
# reduced budget: held-out loss curves at equal steps and at equal optimizer-step time, and the
# cost of Sophia's Hessian (GNB) steps.
#
# usage: scripts/compare_optimizers.sh            (from anywhere; needs `make` and `make setup`)
# env:   OUT=outputs/compare  STEPS=40  SEQ=128  EVAL_TOKENS=4096  EVAL_STEPS=10
#        SOPHIA_RHOS="0.04"   one Sophia run per rho (0.04 = the official default); the equal-time
#                             run uses the first
#        EXTRA="key=value ..."  more overrides for every run (e.g. num_threads=2)
#        SKIP_EXISTING=1      keep runs that already finished in $OUT (their adapter exists), e.g.
#                             after starting some of them by hand in parallel with the same command
#
# Runs (sequentially, each in a fresh $OUT/<name>):
#   adamw          the default config with optimizer=adamw
#   sophia_rho<R>  optimizer=sophia, sophia_rho=R (official defaults otherwise: k 10, betas 0.965/0.99)
#   sophia_eqtime  Sophia with max_steps cut so its optimizer-step seconds match AdamW's: STEPS /
#                  (1 + Hessian overhead), the overhead measured inside the first Sophia run (both
#                  timings come from the same process, so machine load affects them alike)
# Then bin/qlora-plot writes $OUT/loss_curves.png (held-out loss vs step),
# $OUT/loss_curves_time.png (vs seconds of optimizer steps) and $OUT/train_loss.png, and
# $OUT/summary.txt (the table, the commands and `uptime` before and after every run).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

OUT=${OUT:-outputs/compare}
STEPS=${STEPS:-40}
SEQ=${SEQ:-128}
EVAL_TOKENS=${EVAL_TOKENS:-4096}
EVAL_STEPS=${EVAL_STEPS:-10}
SOPHIA_RHOS=${SOPHIA_RHOS:-0.04}
CFG=configs/smollm2-135m-manpages.yaml
# save_steps large: only the final checkpoint is written (the same for every run)
COMMON=(max_steps="$STEPS" sequence_len="$SEQ" eval_max_tokens="$EVAL_TOKENS" eval_steps="$EVAL_STEPS"
        save_steps=100000 logging_steps=1)
read -r -a EXTRA_ARGS <<< "${EXTRA:-}"

for b in bin/qlora-train bin/qlora-plot; do
    [ -x "$b" ] || { echo "[compare] $b missing: run make" >&2; exit 2; }
done
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
{
    echo "# AdamW vs Sophia — $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) cores, $(uname -m)"
    echo "# config $CFG with: ${COMMON[*]} ${EXTRA_ARGS[*]}"
} >> "$SUMMARY"   # appended: every invocation adds a dated section

# last value of a numeric field in a metrics.jsonl (train lines)
last_field() { grep -o "\"$2\": [0-9.e+-]*" "$1/metrics.jsonl" | tail -1 | awk '{print $2}'; }
sum_field() { grep -o "\"$2\": [0-9.e+-]*" "$1/metrics.jsonl" | awk '{s += $2} END {printf "%.3f", s}'; }

run() {
    local name=$1; shift
    local cmd=(bin/qlora-train "$CFG" "${COMMON[@]}" "${EXTRA_ARGS[@]}" output_dir="$OUT/$name" "$@")
    if [ "${SKIP_EXISTING:-0}" = 1 ] && [ -f "$OUT/$name/adapter_model.safetensors" ]; then
        echo "[compare] $name: kept (finished earlier): ${cmd[*]}"
        { echo; echo "## $name (finished earlier)"; echo "\$ ${cmd[*]}"; grep -E '^\[(done|sophia)\]' "$OUT/$name.log" || true; } >> "$SUMMARY"
        return
    fi
    rm -rf "${OUT:?}/$name"
    echo "[compare] $name: ${cmd[*]}"
    { echo; echo "## $name"; echo "\$ ${cmd[*]}"; echo "uptime before: $(uptime)"; } >> "$SUMMARY"
    local t0; t0=$(date +%s)
    "${cmd[@]}" 2> "$OUT/$name.log"
    { echo "uptime after:  $(uptime)"; echo "wall $(( $(date +%s) - t0 ))s"; grep -E '^\[(done|sophia)\]' "$OUT/$name.log" || true; } >> "$SUMMARY"
    tail -2 "$OUT/$name.log"
}

run adamw optimizer=adamw
labels=("adamw=$OUT/adamw")
first=""
for rho in $SOPHIA_RHOS; do
    run "sophia_rho$rho" optimizer=sophia sophia_rho="$rho"
    labels+=("sophia rho $rho=$OUT/sophia_rho$rho")
    [ -n "$first" ] || first="$OUT/sophia_rho$rho"
done

# equal optimizer-step time, from the Hessian overhead measured inside the first Sophia run
ts=$(last_field "$first" train_seconds)
th=$(sum_field "$first" sophia_hessian_seconds)
eq_steps=$(awk -v s="$STEPS" -v t="$ts" -v h="$th" 'BEGIN { printf "%d", s * (t - h) / t }')
rho0=${SOPHIA_RHOS%% *}
echo "[compare] Hessian overhead: ${th}s of ${ts}s optimizer-step time -> $eq_steps Sophia steps match $STEPS AdamW steps"
{ echo; echo "Hessian overhead in $first: ${th}s of ${ts}s of optimizer steps; equal-time Sophia run: $eq_steps steps"; } >> "$SUMMARY"
run sophia_eqtime optimizer=sophia sophia_rho="$rho0" max_steps="$eq_steps"
ran_steps=$(grep -o '"step": [0-9]*, "loss"' "$OUT/sophia_eqtime/metrics.jsonl" | tail -1 | awk '{print $2+0}')
labels+=("sophia equal time ($ran_steps steps)=$OUT/sophia_eqtime")

bin/qlora-plot "$OUT/loss_curves.png" "${labels[@]}" > "$OUT/table.txt"
bin/qlora-plot "$OUT/loss_curves_time.png" --x time "${labels[@]}" > /dev/null
bin/qlora-plot "$OUT/train_loss.png" --y train "${labels[@]}" > /dev/null
{ echo; cat "$OUT/table.txt"; } >> "$SUMMARY"
cat "$OUT/table.txt"
echo "[compare] wrote $OUT/loss_curves.png, $OUT/loss_curves_time.png, $OUT/train_loss.png, $SUMMARY"
