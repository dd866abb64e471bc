#!/usr/bin/env bash
# run_fuzz.sh — run the libFuzzer targets (built by `make fuzz-build` into build-fuzz/) for a bounded time.
#
# usage: scripts/run_fuzz.sh SECONDS TARGET...      (what `make fuzz` calls, from the repo root)
#
# Each target runs for SECONDS on one core, starting from its seeds (fuzz/seeds/<target>/, plus
# tests/fixtures/*.gguf for gguf) and the corpus kept from earlier runs in build-fuzz/corpus/<target>/.
# A crash, leak, timeout or sanitizer report stops that target and leaves the input in
# build-fuzz/crashes/<target>-*; reproduce it with `build-fuzz/fuzz_<target> FILE`.
# One line per target with executions and corpus size; exit status 0 only if no target failed.
# env: FUZZ_JOBS=N  targets run N at a time (default 2)
set -uo pipefail

if [ "$#" -lt 2 ]; then
    printf 'usage: %s SECONDS TARGET...\n' "$0" >&2
    exit 2
fi
secs="$1"
shift
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
jobs="${FUZZ_JOBS:-2}"
mkdir -p build-fuzz/crashes build-fuzz/logs

run_one() {
    local t="$1" corpus="build-fuzz/corpus/$1" seeds=()
    mkdir -p "$corpus"
    [ -d "fuzz/seeds/$t" ] && seeds+=("fuzz/seeds/$t")
    if [ "$t" = gguf ]; then
        mkdir -p build-fuzz/seeds-gguf
        cp -f tests/fixtures/*.gguf build-fuzz/seeds-gguf/ 2>/dev/null
        seeds+=(build-fuzz/seeds-gguf)
    fi
    local max_len=65536
    [ "$t" = config ] && max_len=8192
    [ "$t" = jsonl ] && max_len=8192
    "build-fuzz/fuzz_$t" -max_total_time="$secs" -timeout=30 -rss_limit_mb=3072 -max_len="$max_len" \
        -print_final_stats=1 -artifact_prefix="build-fuzz/crashes/$t-" "$corpus" "${seeds[@]}" \
        >"build-fuzz/logs/$t.log" 2>&1
}

pids=() names=()
for t in "$@"; do
    if [ ! -x "build-fuzz/fuzz_$t" ]; then
        printf '[fuzz] build-fuzz/fuzz_%s missing: run make fuzz-build\n' "$t" >&2
        exit 2
    fi
    printf '[fuzz] %s: %ss\n' "$t" "$secs"
    run_one "$t" &
    pids+=("$!") names+=("$t")
    if [ "${#pids[@]}" -ge "$jobs" ]; then
        wait "${pids[0]}"; echo "$?" >"build-fuzz/logs/${names[0]}.rc"
        pids=("${pids[@]:1}") names=("${names[@]:1}")
    fi
done
for i in "${!pids[@]}"; do
    wait "${pids[$i]}"; echo "$?" >"build-fuzz/logs/${names[$i]}.rc"
done

failed=()
for t in "$@"; do
    rc=$(cat "build-fuzz/logs/$t.rc")
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "build-fuzz/logs/$t.log" | grep -o '[0-9]*$' | tail -n 1)
    corpus=$(find "build-fuzz/corpus/$t" -type f | wc -l)
    if [ "$rc" -eq 0 ]; then
        printf '[fuzz] ✓ %-12s %10s executions in %ss, corpus %s files\n' "$t" "${execs:-?}" "$secs" "$corpus"
    else
        failed+=("$t")
        printf '[fuzz] ✗ %-12s exit %s after %s executions; log build-fuzz/logs/%s.log:\n' "$t" "$rc" "${execs:-?}" "$t"
        grep -E 'ERROR|SUMMARY|runtime error|Test unit written|==[0-9]+==' "build-fuzz/logs/$t.log" | head -n 20
    fi
done
if [ "${#failed[@]}" -gt 0 ]; then
    printf '[fuzz] FAILED: %s\n' "${failed[*]}"
    exit 1
fi
printf '[fuzz] all %d targets ran without a finding\n' "$#"
