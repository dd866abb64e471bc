/* tests/tiny_model.h — a tiny random Llama as a GGUF file, for tests that run
 * the trainer without the real model: 2 layers, d_model 64, 4 query / 2 kv
 * heads of 16, d_ff 128, context 256, random F32 weights from a seed, and a
 * byte-level BPE vocabulary (3 ChatML specials, the 256 bytes, 3 merges) with
 * the tokenizer keys of SmolLM2 (pre-tokenizer "smollm"). Loaded as NF4 like
 * any GGUF base; every text tokenizes. */
#ifndef QLORA_TESTS_TINY_MODEL_H
#define QLORA_TESTS_TINY_MODEL_H

#include <stdint.h>

/* Write the model to path. Returns 0, or -1 with the reason on stderr. */
int tiny_model_write(const char *path, uint64_t seed);
/* The same with n_layer blocks (1 to 16; 2 is tiny_model_write's file, byte for byte): tests whose
 * code path differs per block (offloaded checkpointing). */
int tiny_model_write_layers(const char *path, uint64_t seed, int n_layer);

#endif
