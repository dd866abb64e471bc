/* tests/tiny_model.h — a tiny random Llama as a GGUF file, for tests that run
 * the trainer without the real model: 2 layers, d_model 64, 4 query / 2 kv
 * heads of 16, d_ff 128, context 256, random F32 weights from a seed, and a
 * byte-level BPE vocabulary (3 ChatML specials, the 256 bytes, 3 merges) with
 * the tokenizer keys of SmolLM2 (pre-tokenizer "smollm"). Loaded as NF4 like
 * any GGUF base; every text tokenizes. */
#ifndef QLORA_TESTS_TINY_MODEL_H
#define QLORA_TESTS_TINY_MODEL_H

#include <stddef.h>
#include <stdint.h>

struct gguf_writer;

/* GPT-2's byte alphabet (bytes_to_unicode): byte b's stand-in code point as UTF-8 into out (3 bytes). */
void tiny_byte_sym(int b, char out[3]);

/* The tiny byte-level BPE vocabulary into w: tokenizer.ggml.model "gpt2", tokenizer.ggml.pre = pre, 262
 * tokens (special0..2 as control tokens, the 256 bytes, "he" "ll" "hell") with their types, and the 3 merges
 * "h e", "l l", "he ll". No bos/eos keys (the caller's). */
void tiny_vocab_add(struct gguf_writer *w, const char *pre, const char *special0, const char *special1,
                    const char *special2);

/* Write the model to path. Returns 0, or -1 with the reason on stderr. */
int tiny_model_write(const char *path, uint64_t seed);

/* A completion corpus for the multi-process end-to-end tests: `docs` JSON lines {"text": ...}, document d
 * made of 4 + d % span words, word w being the ((d·mul + 3w) mod nwords)-th of a fixed list of 16 short
 * words ("hello", "shell", ..., "read"; nwords <= 16), then ".". Returns 0, or -1 with the reason on stderr. */
int tiny_corpus_write(const char *path, int docs, int nwords, int mul, int span);

/* The "tiny world" those tests train on: dir/tiny.gguf (tiny_model_write(seed)), dir/train.jsonl
 * (tiny_corpus_write) and dir/config.yaml = the common head (that base, adapter qlora, LoRA r 4, alpha 8,
 * dropout 0.1 on all linears, the corpus as type completion) followed by config_tail (whole YAML lines).
 * The config's path goes to cfg (cfg_n bytes). Returns 0, or -1 with the reason on stderr. */
int tiny_world_write(const char *dir, uint64_t seed, int docs, int nwords, int mul, int span, const char *config_tail,
                     char *cfg, size_t cfg_n);

#endif
