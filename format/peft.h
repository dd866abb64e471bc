/* format/peft.h — Hugging Face PEFT LoRA adapter files.
 *
 * An adapter directory holds adapter_config.json and adapter_model.safetensors
 * (peft/utils/constants.py). The config is `asdict(LoraConfig)` written with
 * json.dumps(indent=2, sort_keys=True) (peft/config.py save_pretrained); the
 * tensors are named base_model.model.model.layers.{N}.{parent}.{module}
 * .lora_{A|B}.weight (for Llama: {self_attn|mlp}.{q_proj|...}, the caller's
 * table, model/llama_linear.h), A [r, in] and B [out, r], usually F32
 * (peft/tuners/lora/layer.py, docs/formats.md §2). With
 * scaling s = lora_alpha / r (or / sqrt(r) with use_rslora), the adapter adds
 * s * B @ A to the frozen [out, in] weight. B rows of q_proj/k_proj must be in
 * HF (rotate_half) order — the caller's job, not this module's.
 */
#ifndef QLORA_FORMAT_PEFT_H
#define QLORA_FORMAT_PEFT_H

#include <stddef.h>
#include <stdint.h>

#include "core/status.h"

typedef struct peft_lora_config {
    int r;                               /* rank, > 0 */
    float lora_alpha;                    /* > 0; written as an int when whole (as PEFT configs hold it) */
    float lora_dropout;                  /* [0, 1) */
    int use_rslora;                      /* 0: scaling alpha/r, 1: alpha/sqrt(r) */
    const char **target_modules;         /* e.g. {"q_proj", "v_proj"}; written in this order */
    int n_target_modules;                /* >= 1 */
    const char *base_model_name_or_path; /* NULL -> null */
    const char **modules_to_save;        /* e.g. {"embed_tokens", "lm_head"}, written in this order; */
    int n_modules_to_save;               /* 0 -> null (their tensors: peft_saved_module_name) */
} peft_lora_config;

/* Write adapter_config.json byte-for-byte as PEFT's save_pretrained would
 * (2-space indent, sorted keys, ASCII-only with \uXXXX escapes, Python float
 * repr, no trailing newline), with PEFT's defaults for everything we do not
 * use: peft_type "LORA", task_type "CAUSAL_LM", bias "none", inference_mode
 * true, init_lora_weights true, fan_in_fan_out/use_dora/lora_bias false,
 * revision/modules_to_save/layers_to_transform/layers_pattern/
 * megatron_config/exclude_modules/layer_replication/auto_mapping null,
 * rank_pattern/alpha_pattern/loftq_config {}, megatron_core "megatron.core".
 * Written to path.tmp then renamed. */
int peft_write_adapter_config(const char *path, const peft_lora_config *c, qerr *e);

/* What a trainer needs of a PEFT LoRA adapter_config.json (peft/tuners/lora/config.py). */
typedef struct peft_adapter_config {
    int r;                               /* rank, >= 1 */
    float lora_alpha;                    /* PEFT's default 8 when absent */
    float lora_dropout;                  /* 0 when absent */
    int use_rslora;                      /* scaling alpha/sqrt(r) instead of alpha/r */
    char base_model_name_or_path[1024];  /* "" when absent or null */
    int save_embed, save_lm_head;        /* modules_to_save lists "embed_tokens" / "lm_head" */
} peft_adapter_config;

/* Read `path` (an adapter_config.json) into *out. Refused, each with one line
 * naming the file and the key: not a JSON object; peft_type other than "LORA";
 * r not a positive integer; any option that changes the adapter's maths in a
 * way a plain LoRA A/B pair cannot represent — use_dora, rank_pattern,
 * alpha_pattern, modules_to_save, fan_in_fan_out, lora_bias,
 * layer_replication set, or bias other than "none". Returns 0 or -1. */
int peft_read_adapter_config(const char *path, peft_adapter_config *out, qerr *e);
/* (modules_to_save: a list of "embed_tokens" and/or "lm_head", the Llama modules qlora trains as
 * full copies, is accepted into save_embed / save_lm_head; any other entry is refused by name.) */

/* The safetensors key PEFT 0.21's get_peft_model_state_dict gives a modules_to_save copy of a
 * Llama-family CausalLM (the wrapper's "modules_to_save.default." removed):
 * "base_model.model.model.embed_tokens.weight" (lm_head 0) or "base_model.model.lm_head.weight"
 * (lm_head 1). */
const char *peft_saved_module_name(int lm_head);

/* Only base_model_name_or_path of the adapter_config.json at `path` into buf
 * (n bytes), without judging the rest: 0, or -1 when the file cannot be read
 * or the key is absent, null or empty (no message). */
int peft_adapter_base_model(const char *path, char *buf, size_t n);

/* PEFT tensor name for layer `layer` (>= 0) of module `module` under HF
 * parent module `parent` (for Llama: model/llama_linear.h gives both), ab 'A'
 * or 'B' (either case): "base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight".
 * Returns 0, or -1 for an empty or dotted parent / module, a bad ab, a
 * negative layer or a buffer too small (buf then holds ""). */
int peft_tensor_name(char *buf, size_t n, int layer, const char *parent, const char *module, char ab);

/* The parts of a PEFT LoRA tensor name, as peft_tensor_name builds it. */
typedef struct peft_name_parts {
    int layer;          /* 0 .. 100000 */
    const char *parent; /* points into the name; parent_len bytes, no dot */
    size_t parent_len;
    const char *module; /* points into the name; module_len bytes, no dot */
    size_t module_len;
    char ab;            /* 'A' or 'B' */
} peft_name_parts;

/* Split `name` ("base_model.model.model.layers.<N>.<parent>.<module>.lora_<A|B>.weight")
 * into *out; the inverse of peft_tensor_name. Returns 0, or -1 when the name
 * does not have that form (the caller checks parent and module). */
int peft_tensor_name_parse(const char *name, peft_name_parts *out);

#define PEFT_NAME_MAX 128

/* One tensor of a LoRA adapter whose tensors lie in one flat fp32 arena. A
 * table of these (one entry per lora_A / lora_B, in arena order) is what the
 * adapter writer below takes and what a trainer checkpoint records
 * (trainer/checkpoint.h: ckpt_tensor is this type). */
typedef struct peft_tensor {
    char name[PEFT_NAME_MAX]; /* PEFT name (peft_tensor_name) */
    int64_t offset;           /* first element in the arena */
    int64_t rows, cols;       /* row-major shape: lora_A [r, in], lora_B [out, r] */
} peft_tensor;

/* Write a PEFT adapter directory (which must exist): first
 * dir/adapter_model.safetensors with the n tensors of `tensors`, in table
 * order, each F32 [rows, cols] read from arena + offset (arena: fp32, at least
 * max(offset + rows*cols) elements; written with the default
 * {"format":"pt"} metadata, through safetensors_write's tmp + rename), then
 * dir/adapter_config.json (peft_write_adapter_config with c). Returns 0, or
 * -1 with the message of the file that failed (the config is not written when
 * the tensors fail). */
int peft_write_adapter(const char *dir, const peft_tensor *tensors, int n, const float *arena,
                       const peft_lora_config *c, qerr *e);

#endif
