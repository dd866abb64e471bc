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

int llama_linear_from_peft(const char *name, size_t n) {
    for (int k = 0; k < LLAMA_N_LINEAR; k++)
        if (strlen(llama_linears[k].peft) == n && !memcmp(llama_linears[k].peft, name, n)) return k;
    return -1;
}
