/* model/llama_linear.h — the seven linear modules of a Llama decoder layer and
 * their names in each file format: the one table of them (docs/design.md,
 * "One source of truth"). Kept apart from model/llama.h so that code which
 * only names modules (the config parser, the fuzz targets) does not pull in
 * the network.
 *
 * Order contract. The modules are numbered LLAMA_Q .. LLAMA_DOWN (0 .. 6) in
 * the order of the table below, which is HF transformers' order of a layer's
 * linears (modeling_llama.py: q, k, v, o, gate, up, down). Everywhere a
 * per-module quantity is indexed, index k (or bit k of a mask) means module
 * LLAMA_Q + k:
 *   - bit k of trainer/config.h train_config_target_mask();
 *   - llama_block.lin[k] / nf4[k] / w_bf16[k] and lora_set.target[k] (model/llama.h);
 *   - entry layer * LLAMA_N_LINEAR + k of lora_set.offset/A/B/ad and of
 *     adapter_info.present (model/adapter.h);
 *   - the arena order of the LoRA parameters (layer-major, then k, A before B),
 *     which is the tensor order of a checkpoint's /lora/tensor_names.
 * Files never depend on the numbers (adapters and GGUF tensors are found by
 * name), but a checkpoint's arena does: reordering the table breaks resume of
 * existing checkpoints.
 */
#ifndef QLORA_MODEL_LLAMA_LINEAR_H
#define QLORA_MODEL_LLAMA_LINEAR_H

#include <stddef.h>

enum {
    LLAMA_Q = 0, LLAMA_K, LLAMA_V, LLAMA_O, LLAMA_GATE, LLAMA_UP, LLAMA_DOWN, LLAMA_N_LINEAR
};

typedef struct llama_linear_name {
    const char *peft;   /* HF / PEFT module name: "q_proj" (target_modules, adapter tensor names) */
    const char *parent; /* HF parent module: "self_attn" or "mlp" (model.layers.N.<parent>.<peft>) */
    const char *gguf;   /* GGUF tensor name: "attn_q" (blk.N.<gguf>.weight; llama.cpp llama-arch.cpp) */
} llama_linear_name;

/* Indexed by LLAMA_Q .. LLAMA_DOWN:
 *   q_proj self_attn attn_q | k_proj self_attn attn_k | v_proj self_attn attn_v |
 *   o_proj self_attn attn_output | gate_proj mlp ffn_gate | up_proj mlp ffn_up |
 *   down_proj mlp ffn_down */
extern const llama_linear_name llama_linears[LLAMA_N_LINEAR];

/* Phi-3 (HF Phi3ForCausalLM, GGUF arch "phi3") fuses linears: the slots keep
 * their numbers (and so the order contract above), but slot LLAMA_Q holds the
 * fused qkv_proj (rows q, then k, then v; GGUF attn_qkv) and slot LLAMA_GATE
 * the fused gate_up_proj (rows gate, then up; GGUF ffn_up, which llama.cpp's
 * ggml_swiglu splits the same way); slots LLAMA_K, LLAMA_V and LLAMA_UP are
 * absent (all three names NULL, no weight, no adapter). The tables of the
 * other architectures are llama_linears. */
extern const llama_linear_name llama_linears_phi3[LLAMA_N_LINEAR];

/* The module whose PEFT name is the n bytes at `name` (not necessarily
 * NUL-terminated), or -1 when none is. */
int llama_linear_from_peft(const char *name, size_t n);

/* The same in the table t (llama_linears or llama_linears_phi3); absent slots never match. */
int llama_linear_from_peft_in(const llama_linear_name *t, const char *name, size_t n);

/* The slot a PEFT name occupies in either table (q_proj: LLAMA_Q, qkv_proj: LLAMA_Q,
 * gate_up_proj: LLAMA_GATE, ...), or -1: what a config may name before the model is known. */
int llama_linear_slot_of_any(const char *name, size_t n);

#endif
