/* model/adapter.h — read a PEFT LoRA adapter directory back into a lora_set.
 *
 * The inverse of the trainer's writer (format/peft.h): adapter_config.json
 * (peft_type "LORA", r, lora_alpha, use_rslora, target_modules) and
 * adapter_model.safetensors (base_model.model.model.layers.N.{self_attn|mlp}.
 * MODULE.lora_{A|B}.weight, A [r, in], B [out, r], F32/BF16/F16; B rows of
 * q/k in HF order). Adapters written by PEFT itself load too; what qlora
 * cannot represent is refused with a clear message instead of being
 * silently dropped: DoRA, rank_pattern / alpha_pattern, bias other than
 * "none", fan_in_fan_out, embedding or lm_head LoRA adapters. modules_to_save
 * [embed_tokens and/or lm_head] load as the lora_set's full copies
 * (base_model.model.model.embed_tokens.weight / base_model.model.lm_head.weight).
 * Layers without tensors (layers_to_transform) get A = B = 0 and are marked
 * absent, so exports skip them.
 */
#ifndef QLORA_MODEL_ADAPTER_H
#define QLORA_MODEL_ADAPTER_H

#include <stddef.h>

#include "core/status.h"
#include "model/llama.h"

typedef struct adapter_info {
    int r;
    float lora_alpha;
    int use_rslora;
    float lora_dropout;
    char base_model_name_or_path[1024]; /* "" if null */
    int n_present;                      /* (layer, module) pairs with tensors */
    unsigned char *present;             /* (n_layer * LLAMA_N_LINEAR): 1 if the adapter has that module */
} adapter_info;

/* Load `dir` onto a model of hyper-parameters hp: fills *ls (as lora_set_init
 * would, dropout from the config, then A and B copied from the file) and
 * *info (free with adapter_info_free). Errors name the file and tensor. */
int adapter_load_peft(const char *dir, const llama_hparams *hp, lora_set *ls, adapter_info *info, qerr *e);
void adapter_info_free(adapter_info *info);

/* base_model_name_or_path of dir/adapter_config.json into buf: 0, or -1 if
 * absent / null / unreadable (no message). */
int adapter_peek_base(const char *dir, char *buf, size_t n);

#endif
