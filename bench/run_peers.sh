#!/usr/bin/env bash
# bench/run_peers.sh — `make bench`: build a venv with the peers (bench/requirements.txt, pinned),
# then run bench/compare.py: qlora-bench and its peers side by side, with the ratios.
# env: QLORA_BENCH_VENV=DIR  use/create the venv there (default build/venv-bench)
#      QLORA_BENCH_ARGS      extra arguments for compare.py (e.g. "--steps 2 --skip-7b")
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${QLORA_BENCH_VENV:-build/venv-bench}"
if ! "$VENV/bin/python" -c 'import torch, transformers, peft, bitsandbytes' 2>/dev/null; then
    printf '[bench] creating venv %s from bench/requirements.txt\n' "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check -r bench/requirements.txt
fi
printf '[bench] machine: %s cores, %s; load %s\n' "$(nproc)" "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')" "$(cut -d' ' -f1-3 /proc/loadavg)"
# shellcheck disable=SC2086
exec "$VENV/bin/python" bench/compare.py ${QLORA_BENCH_ARGS:-}
