/* trainer/export.h — a trained adapter into the formats serving runtimes load
 * (behind `qlora-export`, trainer/export_main.c).
 *
 *   GGUF LoRA (llama.cpp / Ollama): convert_lora_to_gguf.py's layout
 *     (docs/formats.md §3): general.type "adapter",
 *     adapter.type "lora", adapter.lora.alpha, general.architecture of the
 *     base; blk.N.<name>.weight.lora_a ne {in, r} (= PEFT A [r, in]) and
 *     .lora_b ne {r, out} (= PEFT B [out, r]), F32, with the rows of B for
 *     attn_q / attn_k permuted into GGUF order (qlora keeps HF order). llama.cpp
 *     scales by alpha / r, so rsLoRA (alpha / √r) is written as alpha·√r.
 *   Merged model: an HF directory (LlamaForCausalLM) whose linears are
 *     W + scaling·B·A, computed in fp32 and rounded once to bf16. W is by
 *     default the base exactly as it was trained against (the NF4 weights
 *     dequantized, or the bf16 ones) — so the merged model computes what was
 *     trained; EXPORT_MERGE_SOURCE uses the original checkpoint's weights
 *     instead (the usual "reload the base in bf16 and merge_and_unload"). The
 *     directory holds model.safetensors (or shards + index), config.json,
 *     generation_config.json (eos + end-of-turn ids) and the tokenizer files.
 */
#ifndef QLORA_TRAINER_EXPORT_H
#define QLORA_TRAINER_EXPORT_H

#include <stddef.h>
#include <stdint.h>

#include "core/status.h"
#include "data/tokenizer.h"
#include "model/adapter.h"
#include "model/base.h"
#include "model/llama.h"

/* vLLM's default --max-lora-rank; exports warn above it. */
#define EXPORT_VLLM_MAX_LORA_RANK 16

/* Write the GGUF LoRA adapter to path (atomically). Modules the adapter does
 * not have (info->present == 0) are skipped. */
int export_gguf_lora(const base_model *b, const lora_set *ls, const adapter_info *info, const char *path, qerr *e);

/* Write the merged model into dir (created if needed). m: the loaded base to
 * merge into (EXPORT_MERGE default), or NULL to merge into the source
 * checkpoint's own weights. ls / info may be NULL (export the base alone).
 * max_shard_bytes: split model.safetensors into shards of at most this many
 * bytes (0 = 2 GiB); each shard is built in memory, so this bounds the extra
 * memory of the export. */
int export_merged(const base_model *b, const llama_model *m, const tokenizer *tok, const lora_set *ls,
                  const adapter_info *info, const char *dir, size_t max_shard_bytes, qerr *e);

/* The tokenizer files of the base for an HF directory: copied when the base
 * is an HF directory; built from the GGUF metadata otherwise
 * (tokenizer.json, tokenizer_config.json with the chat template and special
 * tokens, special_tokens_map.json). */
int export_tokenizer_files(const base_model *b, const tokenizer *tok, const char *dir, qerr *e);

/* export_run_chat_template: the chat template a run trained with, as axolotl sets
 * tokenizer.chat_template before saving the tokenizer (loaders/tokenizer.py,
 * utils/chat_templates/base.py get_chat_template): choice is the top-level chat_template,
 * jinja its chat_template_jinja (a text, or a file that is read). *out = NULL when it is the
 * model's own (tokenizer_default, or tokenizer_default_fallback_<name> with a model template);
 * else a malloc'd text: axolotl's template <name> byte for byte, or the jinja text. Errors: a
 * name or text qlora does not render (the run refused it too), an unreadable file. */
int export_run_chat_template(const char *choice, const char *jinja, const tokenizer *tok, char **out, qerr *e);

/* export_write_chat_template: make `text` the chat template of the HF directory `dir` the way
 * transformers 5 saves a tokenizer (save_jinja_files, axolotl's default
 * tokenizer_save_jinja_files: true): chat_template.jinja holds the text, tokenizer_config.json has
 * no chat_template key. dir must hold tokenizer_config.json (export_tokenizer_files). */
int export_write_chat_template(const char *dir, const char *text, qerr *e);

/* HF -> GGUF row order for one (n_head*head_dim, cols) matrix: dst row
 * h·hd + 2i + j = src row h·hd + j·hd/2 + i (the converter's permute; the
 * inverse of llama_unpermute_rows). */
void export_permute_rows_to_gguf(const float *src, float *dst, int n_head, int head_dim, int64_t cols);

#endif
