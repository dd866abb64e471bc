#!/usr/bin/env bash
# run_tests.sh — run the unit test binaries (cmocka; each exits non-zero on failure) and summarise.
#
# usage: scripts/run_tests.sh BINARY...        (what `make test` calls, from the repo root)
#
# Every binary runs, even after a failure; binaries whose name contains "e2e" (the end-to-end test on
# the real model) run last. One ✓/✗ line per binary with its wall time, then a summary. Exit status
# is 0 only if every binary passed, and non-zero if no binary was given (an empty test run is not a
# pass). The environment (OMP_NUM_THREADS etc.) is passed through untouched.
# env: QLORA_TEST_TIMEOUT=SECONDS  optional per-binary time limit (coreutils `timeout`).
set -uo pipefail

if [ "$#" -eq 0 ]; then
    printf '[test] error: no test binaries given (no tests/test_*.c?)\n' >&2
    exit 2
fi

# Resolve the arguments before changing to the repo root, so relative paths work from anywhere.
bins_unit=() bins_e2e=()
for b in "$@"; do
    case "$b" in /*) abs="$b" ;; *) abs="$PWD/$b" ;; esac
    case "$(basename "$b")" in
        *e2e*) bins_e2e+=("$abs") ;;
        *)     bins_unit+=("$abs") ;;
    esac
done
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

passed=() failed=()
t_all=$(now)
for bin in "${bins_unit[@]}" "${bins_e2e[@]}"; do
    name="$(basename "$bin")"
    printf '[test] ── %s\n' "$name"
    t0=$(now)
    if [ ! -x "$bin" ]; then
        rc=127
        printf '[test] %s: not found or not executable: %s\n' "$name" "$bin" >&2
    elif [ -n "${QLORA_TEST_TIMEOUT:-}" ]; then
        timeout --signal=TERM --kill-after=10 "$QLORA_TEST_TIMEOUT" "$bin"
        rc=$?
    else
        "$bin"
        rc=$?
    fi
    dt=$(elapsed "$t0" "$(now)")
    if [ "$rc" -eq 0 ]; then
        passed+=("$name")
        printf '[test] ✓ %-40s %8ss\n' "$name" "$dt"
    else
        why="exit $rc"
        if [ -n "${QLORA_TEST_TIMEOUT:-}" ] && [ "$rc" -eq 124 ]; then
            why="timed out after ${QLORA_TEST_TIMEOUT}s"
        elif [ "$rc" -gt 128 ] && [ "$rc" -lt 160 ]; then
            why="killed by signal $((rc - 128)) ($(kill -l $((rc - 128)) 2>/dev/null || echo '?'))"
        fi
        failed+=("$name")
        printf '[test] ✗ %-40s %8ss  (%s)\n' "$name" "$dt" "$why"
    fi
done

total=$(( ${#passed[@]} + ${#failed[@]} ))
printf '[test] ════ %d/%d test binaries passed in %ss\n' "${#passed[@]}" "$total" "$(elapsed "$t_all" "$(now)")"
if [ "${#failed[@]}" -gt 0 ]; then
    printf '[test] FAILED: %s\n' "${failed[*]}"
    exit 1
fi
exit 0
