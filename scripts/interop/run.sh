#!/usr/bin/env bash
# scripts/interop/run.sh — `make test-interop`: qlora's adapters, exports and HF loading checked by the
# libraries that consume them (scripts/interop/check_interop.py says what and with which tolerances).
#
# Creates build/venv-interop from scripts/interop/requirements.txt (pinned) once; a stamp with the
# requirements' hash makes later runs skip the install. Then runs the checks into build/interop/.
#
# env: QLORA_INTEROP_PYTHON=/path/to/python  use an existing environment instead of the venv
#      QLORA_INTEROP_LLAMA_CPP=1             also install llama-cpp-python (builds llama.cpp from source,
#                                            about 12 CPU-minutes) and run the llama.cpp check
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
MODEL="${QLORA_INTEROP_MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
VENV="${QLORA_INTEROP_VENV:-$ROOT/build/venv-interop}"
REQ="scripts/interop/requirements.txt"
REQ_LCPP="scripts/interop/requirements-llama-cpp.txt"
LCPP="${QLORA_INTEROP_LLAMA_CPP:-0}"

log() { printf '[interop] %s\n' "$*"; }
die() { printf '[interop] error: %s\n' "$*" >&2; exit 1; }

[ -f "$MODEL" ] || die "$MODEL missing: run \`make model\`"
[ -x bin/qlora-generate ] && [ -x bin/qlora-export ] && [ -x bin/qlora-train ] || die "binaries missing: run \`make\`"

if [ -n "${QLORA_INTEROP_PYTHON:-}" ]; then
    PY="$QLORA_INTEROP_PYTHON"
else
    PY="$VENV/bin/python"
    stamp="$VENV/.installed-$(cat "$REQ" | sha256sum | cut -c1-16)"
    if [ ! -f "$stamp" ]; then
        rm -rf "$VENV"
        python3 -m venv "$VENV" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
        t0=$(date +%s)
        log "installing $(grep -c '^[a-z]' "$REQ") pinned packages into $VENV ..."
        "$VENV/bin/pip" install -q --disable-pip-version-check -r "$REQ"
        log "installed in $(( $(date +%s) - t0 ))s ($(du -sh "$VENV" | cut -f1))"
        touch "$stamp"
    fi
fi
"$PY" scripts/interop/check_interop.py --bin bin --model "$MODEL" --work build/interop
if [ "$LCPP" = 1 ]; then
    if ! "$PY" -c 'import llama_cpp' 2>/dev/null; then
        t0=$(date +%s)
        log "building llama-cpp-python (llama.cpp from source) ..."
        CMAKE_ARGS="${CMAKE_ARGS:--DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAVA_BUILD=OFF}" \
            "$PY" -m pip install -q --disable-pip-version-check -r "$REQ_LCPP"
        log "llama-cpp-python built in $(( $(date +%s) - t0 ))s"
    fi
    "$PY" scripts/interop/check_llama_cpp.py --model "$MODEL" --work build/interop
else
    log "llama.cpp check skipped (QLORA_INTEROP_LLAMA_CPP=1 builds llama-cpp-python and runs it); the GGUF LoRA"
    log "files were validated structurally with the gguf package above"
fi
