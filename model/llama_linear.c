/* model/llama_linear.c — the linear-module name table (see llama_linear.h). */
#include "model/llama_linear.h"

#include <string.h>

const llama_linear_name llama_linears[LLAMA_N_LINEAR] = {
    [LLAMA_Q] = {"q_proj", "self_attn", "attn_q"},
    [LLAMA_K] = {"k_proj", "self_attn", "attn_k"},
    [LLAMA_V] = {"v_proj", "self_attn", "attn_v"},
    [LLAMA_O] = {"o_proj", "self_attn", "attn_output"},
    [LLAMA_GATE] = {"gate_proj", "mlp", "ffn_gate"},
    [LLAMA_UP] = {"up_proj", "mlp", "ffn_up"},
    [LLAMA_DOWN] = {"down_proj", "mlp", "ffn_down"},
};

const llama_linear_name llama_linears_phi3[LLAMA_N_LINEAR] = {
    [LLAMA_Q] = {"qkv_proj", "self_attn", "attn_qkv"},
    [LLAMA_K] = {NULL, NULL, NULL},
    [LLAMA_V] = {NULL, NULL, NULL},
    [LLAMA_O] = {"o_proj", "self_attn", "attn_output"},
    [LLAMA_GATE] = {"gate_up_proj", "mlp", "ffn_up"},
    [LLAMA_UP] = {NULL, NULL, NULL},
    [LLAMA_DOWN] = {"down_proj", "mlp", "ffn_down"},
};

int llama_linear_from_peft_in(const llama_linear_name *t, const char *name, size_t n) {
    for (int k = 0; k < LLAMA_N_LINEAR; k++)
        if (t[k].peft && strlen(t[k].peft) == n && !memcmp(t[k].peft, name, n)) return k;
    return -1;
}

int llama_linear_from_peft(const char *name, size_t n) { return llama_linear_from_peft_in(llama_linears, name, n); }

int llama_linear_slot_of_any(const char *name, size_t n) {
    int k = llama_linear_from_peft_in(llama_linears, name, n);
    return k >= 0 ? k : llama_linear_from_peft_in(llama_linears_phi3, name, n);
}
