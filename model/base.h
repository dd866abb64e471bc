/* model/base.h — the frozen base model, wherever it comes from.
 *
 * `base_model` in a config (and the --base option of qlora-export /
 * qlora-generate) is either
 *   - a GGUF file (llama.cpp's format; format/gguf.h), or
 *   - a Hugging Face model directory: config.json (Llama family), one
 *     model.safetensors or shards listed in model.safetensors.index.json
 *     (bf16/f16/f32, or bitsandbytes NF4 as transformers saves it),
 *     tokenizer.json + tokenizer_config.json (model/hf.c).
 * This module hides the difference: hyper-parameters, the tokenizer, the
 * quantized llama_model, and fp32 copies of single tensors in HF layout and
 * HF (rotate_half) row order, for exports.
 */
#ifndef QLORA_MODEL_BASE_H
#define QLORA_MODEL_BASE_H

#include <stdint.h>

#include "core/status.h"
#include "data/tokenizer.h"
#include "format/gguf.h"
#include "model/llama.h"

typedef enum base_kind { BASE_GGUF = 0, BASE_HF = 1 } base_kind;

typedef struct base_model base_model; /* opaque */

/* Open a GGUF file or an HF directory (mmap; nothing is dequantized yet).
 * Errors name the path and what is missing or unsupported. */
int base_model_open(const char *path, base_model **out, qerr *e);
void base_model_close(base_model *b);

base_kind base_model_kind(const base_model *b);
const char *base_model_path(const base_model *b);
/* The GGUF file (BASE_GGUF) or NULL. */
const gguf_file *base_model_gguf(const base_model *b);
/* GGUF tokenizer metadata (tokenizer.ggml.*, tokenizer.chat_template): the
 * GGUF itself, or for an HF directory its tokenizer.json translated in memory;
 * valid until base_model_close. tokenizer_load_gguf accepts either. */
const gguf_file *base_model_tokenizer_gguf(const base_model *b);
/* 1 if the HF checkpoint holds the linears pre-quantized (bitsandbytes nf4). */
int base_model_prequantized(const base_model *b);

/* Hyper-parameters (filled at open). */
const llama_hparams *base_model_hparams(const base_model *b);

/* The tokenizer: from tokenizer.ggml.* (GGUF) or tokenizer.json +
 * tokenizer_config.json (HF). Caller frees with tokenizer_free. */
int base_model_tokenizer(const base_model *b, tokenizer **out, qerr *e);

/* Load the frozen model for training / inference, as llama_load_gguf does
 * (linears NF4 with load_in_4bit, else bf16; one tensor dequantized at a time). */
int base_model_load(const base_model *b, int load_in_4bit, int double_quant, int max_pos, llama_model *m, qerr *e);
/* The same with the frozen linears sharded over c's ranks (FULL_SHARD,
 * model/llama_fsdp.h): llama_load_gguf_sharded / hf_model_load_sharded.
 * c NULL: base_model_load. */
int base_model_load_sharded(const base_model *b, int load_in_4bit, int double_quant, int max_pos, struct comm *c,
                            llama_model *m, qerr *e);

/* One tensor as fp32 in HF layout and row order (GGUF Q/K rows un-permuted),
 * dst sized from the hyper-parameters (see llama_role). layer/module are
 * ignored where they do not apply. */
int base_model_tensor_f32(const base_model *b, llama_role role, int layer, int module, float *dst, qerr *e);

#endif
