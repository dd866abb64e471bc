/* model/hf.h — Hugging Face model directories as a base model.
 *
 * A directory holding config.json (LlamaForCausalLM / model_type "llama" or
 * "mistral" without sliding window), the weights in model.safetensors or in
 * shards listed by model.safetensors.index.json, and tokenizer.json +
 * tokenizer_config.json. Weights may be bf16/f16/f32, or bitsandbytes 4-bit
 * (nf4) as transformers saves a model loaded with load_in_4bit
 * (docs/formats.md §1): those are kept as they are, never
 * re-quantized. Files are memory-mapped and each tensor is converted on its
 * own, so loading peaks near the quantized size plus one tensor.
 */
#ifndef QLORA_MODEL_HF_H
#define QLORA_MODEL_HF_H

#include "core/status.h"
#include "data/tokenizer.h"
#include "format/gguf.h"
#include "model/llama.h"

typedef struct hf_model hf_model; /* opaque */

/* Open `dir`: parse config.json (hyper-parameters; rope_theta / rope_scaling
 * or transformers 5's rope_parameters), the safetensors index, and map every
 * shard. Errors name the file and key. */
int hf_model_open(const char *dir, hf_model **out, qerr *e);
void hf_model_close(hf_model *h);

const llama_hparams *hf_model_hparams(const hf_model *h);
/* 1 if the linears are stored as bitsandbytes nf4. */
int hf_model_prequantized(const hf_model *h);

/* Tokenizer from tokenizer.json + tokenizer_config.json (data/tokenizer_json.c),
 * translated at open; _gguf: that translation as GGUF tokenizer metadata. */
int hf_model_tokenizer(const hf_model *h, tokenizer **out, qerr *e);
const gguf_file *hf_model_tokenizer_gguf(const hf_model *h);

/* The frozen model (see llama_load_gguf); nf4 checkpoints are adopted as
 * they are when load_in_4bit (their blocksize / double quant win over the
 * arguments), and dequantized to bf16 otherwise. */
int hf_model_load(const hf_model *h, int load_in_4bit, int double_quant, int max_pos, llama_model *m, qerr *e);
/* hf_model_load_sharded: hf_model_load, and with c (FULL_SHARD) the frozen
 * linears sharded over c's ranks as llama_load_gguf_sharded does (each rank
 * converts and quantizes only its rows). A bitsandbytes 4-bit checkpoint
 * (adopted whole) is refused with c. c NULL: hf_model_load. */
int hf_model_load_sharded(const hf_model *h, int load_in_4bit, int double_quant, int max_pos, struct comm *c,
                          llama_model *m, qerr *e);

/* One tensor as fp32 (HF layout), see base_model_tensor_f32; role is a llama_role. */
int hf_model_tensor_f32(const hf_model *h, int role, int layer, int module, float *dst, qerr *e);

#endif
