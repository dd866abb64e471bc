#!/usr/bin/env bash
# prepare_manpages.sh — build the default dataset: the Linux programmer's manual (Debian package
# manpages-dev, sections 2 and 3) as JSONL, one {"text": "..."} document per page.
#
#   datasets/manpages/train.jsonl     every page not held out
#   datasets/manpages/heldout.jsonl   pages with  int(md5(page name)[:8], 16) % 20 == 0   (~5 %)
#                                     page name = file name without .gz, e.g. "printf.3"
#
# The rule is fixed: it does not depend on file-system order, randomness, or which other pages
# exist. Symlink aliases and `.so` redirect pages are skipped so no text appears twice; long pages
# are kept whole (the trainer chunks). Rendering and the details are in scripts/prepare_manpages.py.
#
# Deterministic: sorted input, LC_ALL=C.UTF-8, MANWIDTH=80, no user man/groff settings; running it
# twice gives byte-identical files (for a given manpages-dev / groff / man-db version).
#
# usage: scripts/prepare_manpages.sh [OUT_DIR]      default OUT_DIR: datasets/manpages
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-$ROOT/datasets/manpages}"

die() { printf '[data] error: %s\n' "$*" >&2; exit 1; }
for tool in python3 man groff dpkg; do
    command -v "$tool" >/dev/null 2>&1 ||
        die "$tool not found (Debian: apt-get install manpages-dev man-db groff-base python3, or run scripts/setup.sh)"
done
dpkg -s manpages-dev >/dev/null 2>&1 || die "manpages-dev is not installed (apt-get install manpages-dev, or run scripts/setup.sh)"

# A fixed, known environment for man-db and groff. MAN_DISABLE_SECCOMP: man-db's sandbox fails in
# some containers; we only read package files.
unset MANOPT MANPAGER PAGER MANROFFOPT MANROFFSEQ MANSECT MANPATH MAN_KEEP_FORMATTING \
      GROFF_NO_SGR GROFF_SGR GROFF_TYPESETTER GROFF_TMAC_PATH GROFF_FONT_PATH LANGUAGE LANG
export LC_ALL=C.UTF-8 MANWIDTH=80 MAN_DISABLE_SECCOMP=1 PYTHONHASHSEED=0 PYTHONDONTWRITEBYTECODE=1

start=$(date +%s)
python3 "$ROOT/scripts/prepare_manpages.py" "$OUT_DIR"
printf '[data] done in %ss\n' "$(( $(date +%s) - start ))"
