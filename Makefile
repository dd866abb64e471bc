# qlora — one Makefile. `make` builds bin/qlora-train, `make test` builds and runs the tests,
# `make setup` installs system packages, fetches the default model and prepares the default data.
#
# Optional parts are detected and announced; the CPU engine always builds.

CC      ?= gcc
OPT     ?= -O3 -march=native
CFLAGS  += -std=c11 -D_GNU_SOURCE $(OPT) -g -fopenmp -Wall -Wextra -Wshadow -Wno-unused-parameter -I. -MMD -MP
ifeq ($(WERROR),1)
CFLAGS  += -Werror
endif
LDLIBS  += -ldnnl -lyaml -lcjson -lpcre2-8 -lpng -lz -lm -fopenmp

MODULES := core quant model autograd optim data trainer
LIB_SRC := $(filter-out trainer/main.c trainer/%_main.c,$(foreach m,$(MODULES),$(wildcard $(m)/*.c)))
LIB_OBJ := $(LIB_SRC:%.c=build/%.o)
TEST_SRC := $(wildcard tests/test_*.c)
TEST_BIN := $(TEST_SRC:tests/%.c=build/tests/%)
TEST_HELPER_SRC := $(filter-out $(TEST_SRC),$(wildcard tests/*.c))
TEST_HELPER_OBJ := $(TEST_HELPER_SRC:%.c=build/%.o)

DEFAULT_MODEL := models/SmolLM2-135M-Instruct.Q4_1.gguf
DEFAULT_DATA  := datasets/manpages/train.jsonl datasets/manpages/heldout.jsonl

# Tools around the trainer (trainer/<name>_main.c -> bin/qlora-<name>).
TOOL_BINS := bin/qlora-export bin/qlora-generate

.PHONY: all test test-unit setup model dataset clean features bench
all: features bin/qlora-train bin/qlora-bench $(TOOL_BINS)

features:
	@printf '[build] CPU engine (oneDNN, OpenMP) ✓\n'
	@if command -v nvcc >/dev/null 2>&1; then printf '[build] CUDA backend: nvcc found, backend not written yet ✗\n'; else printf '[build] CUDA backend: nvcc not found ✗\n'; fi

build/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c $< -o $@

build/libqlora.a: $(LIB_OBJ)
	@mkdir -p $(dir $@)
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
model: $(DEFAULT_MODEL)
dataset: $(DEFAULT_DATA)

setup:
	scripts/setup.sh

# Unit tests run first (fast); the end-to-end test on the real model runs last.
test: all $(TEST_BIN) $(DEFAULT_MODEL) $(DEFAULT_DATA)
	@scripts/run_tests.sh $(TEST_BIN)

clean:
	rm -rf build bin

-include $(LIB_OBJ:.o=.d) $(TEST_HELPER_OBJ:.o=.d) build/trainer/main.d build/trainer/bench_main.d $(TOOL_BINS:bin/qlora-%=build/trainer/%_main.d)
