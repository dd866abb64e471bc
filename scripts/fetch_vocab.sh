#!/usr/bin/env bash
# fetch_vocab.sh — fetch real tokenizer vocabularies and chat templates for the tokenizer and template tests.
#
# llama.cpp keeps, for its own tokenizer tests, GGUF files that hold only the tokenizer metadata of real
# models (vocab-only: no tensors) and the real Jinja chat templates of many models. The sdist of the PyPI
# package llama-cpp-python (pinned below) vendors llama.cpp with both. There is no hub access, so: download
# that sdist with pip (pinned version, no dependencies), verify its sha256, take out only the files below,
# verify each one's sha256, and move them into DEST (default models/vocab/, which git ignores).
#
#   ggml-vocab-llama-spm.gguf   Llama 2 (SentencePiece BPE, byte fallback, 32000 tokens)
#   ggml-vocab-phi-3.gguf       Phi-3 mini (SentencePiece BPE, 32064 tokens, its chat template)
#   ggml-vocab-qwen2.gguf       Qwen2 (byte-level BPE, pre "qwen2", 151936 tokens, its chat template)
#   ggml-vocab-llama-bpe.gguf   Llama 3 (byte-level BPE, pre "llama-bpe", 128256 tokens)
#   *.jinja                     chat templates: Llama 3.1 8B Instruct, Qwen2.5 7B Instruct,
#                               Phi-3.5 mini instruct, Mistral Nemo Instruct 2407 (Mistral v3 layout)
#
# usage: scripts/fetch_vocab.sh [DEST]
# env:   QLORA_VOCAB_SDIST=/path/to/llama_cpp_python-0.3.36.tar.gz   use a local copy (still verified)
# Size: the sdist is 76.6 MB (about 80 s here, most of it pip preparing the sdist's metadata); the
# extracted files are 15 MB, each installed atomically (scripts/lib_fetch.sh). Idempotent: files
# already present with the right sha256 are kept.
set -euo pipefail

PKG_SPEC="llama-cpp-python==0.3.36"
SDIST="llama_cpp_python-0.3.36.tar.gz"
SDIST_SHA256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
PREFIX="llama_cpp_python-0.3.36/vendor/llama.cpp/models"
FILES=(
    "ggml-vocab-llama-spm.gguf 16c3724582d59aa8bf84711894e833f916ee46a31d80e21312759c48bf8d0e69"
    "ggml-vocab-phi-3.gguf 967d7190d11c4842eab697079d98d56c2116e10eb617be355a2733bfc132e326"
    "ggml-vocab-qwen2.gguf 44c2f46b715f585c6ab513970e8a006bfa5badd6108560054921cf598d154d8c"
    "ggml-vocab-llama-bpe.gguf 97272e430d53bc7688f52d5e0ad8ea8f163ede9f1bbd1694feaa504797d5d96e"
    "templates/meta-llama-Llama-3.1-8B-Instruct.jinja e10ca381b1ccc5cf9db52e371f3b6651576caee0a630b452e2816b2d404d4b65"
    "templates/Qwen-Qwen2.5-7B-Instruct.jinja cd8e9439f0570856fd70470bf8889ebd8b5d1107207f67a5efb46e342330527f"
    "templates/microsoft-Phi-3.5-mini-instruct.jinja 78d976a442bcde2f0be15aafbb8e3050e1104f86732266f68403251b89982a90"
    "templates/mistralai-Mistral-Nemo-Instruct-2407.jinja e4676cb56dffea7782fd3e2b577cfaf1e123537e6ef49b3ec7caa6c095c62272"
)

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FETCH_TAG=vocab
. "$ROOT/scripts/lib_fetch.sh"
DEST="${1:-$ROOT/models/vocab}"

missing=0
for ent in "${FILES[@]}"; do
    read -r name sha <<<"$ent"
    fetch_verify "$DEST/$(basename "$name")" "$sha" >/dev/null || missing=1
done
if [ "$missing" = 0 ]; then
    fetch_log "$DEST: all ${#FILES[@]} files present, sha256 ok"
    exit 0
fi

fetch_scratch
if [ -n "${QLORA_VOCAB_SDIST:-}" ]; then
    [ -f "$QLORA_VOCAB_SDIST" ] || fetch_die "QLORA_VOCAB_SDIST=$QLORA_VOCAB_SDIST is not a file"
    cp "$QLORA_VOCAB_SDIST" "$FETCH_TMPDIR/$SDIST"
else
    fetch_log "downloading the $PKG_SPEC sdist from PyPI (76.6 MB) ..."
    fetch_pip_download sdist "QLORA_VOCAB_SDIST=/path/to/$SDIST $0" "$PKG_SPEC"
fi
fetch_verify "$FETCH_TMPDIR/$SDIST" "$SDIST_SHA256" || fetch_die "$SDIST does not match the pinned sha256; refusing it"

members=()
for ent in "${FILES[@]}"; do
    read -r name sha <<<"$ent"
    members+=("$PREFIX/$name")
done
tar -xzf "$FETCH_TMPDIR/$SDIST" -C "$FETCH_TMPDIR" "${members[@]}" ||
    fetch_die "could not extract the files from $SDIST"
for ent in "${FILES[@]}"; do
    read -r name sha <<<"$ent"
    fetch_install_copy "$FETCH_TMPDIR/$PREFIX/$name" "$DEST/$(basename "$name")" "$sha"
done
fetch_log "installed ${#FILES[@]} files in $DEST (sha256 ok)"
