/* trainer/memplan.c — predicted peak memory of a training run (see memplan.h). */
#include "trainer/memplan.h"

#include <string.h>

void memplan_predict(const memplan_input *in, memplan *out) {
    memset(out, 0, sizeof *out);
    const llama_hparams *hp = &in->hp;
    double D = hp->d_model, F = hp->d_ff, V = hp->vocab, L = hp->n_layer;
    double N = (double)in->B * in->T, T = in->T;
    double qd = (double)hp->n_head * hp->head_dim, kd = (double)hp->n_kv_head * hp->head_dim;
    out->base = (double)in->frozen_bytes + V * D * 2.0 * (hp->tied_embeddings ? 1 : 2) + (2 * L + 1) * D * 4;
    out->adapters = 8.0 * (double)in->lora_params;
    out->optimizer = 8.0 * (double)in->lora_params;
    double act_layer = 4.0 * N * (6.0 * D + 3.0 * F + 2.0 * (qd + 2 * kd)) + 4.0 * in->B * hp->n_head * T * T;
    out->activations = in->checkpointing ? 4.0 * N * D * L + 2.0 * act_layer : act_layer * L;
    out->activations += 4.0 * 256 * V * 2 + 4.0 * N * D * 3;
    out->scratch = 2.0 * F * D;
    out->runtime = 40.0 * 1048576.0 + (double)in->extra_bytes;
    out->total = out->base + out->adapters + out->optimizer + out->activations + out->scratch + out->runtime;
    out->arena_chunk = 256.0 * 1048576.0;
    out->checkpointing = in->checkpointing;
}

void memplan_print(FILE *f, const memplan *p) {
    const double M = 1048576.0;
    fprintf(f,
            "[memory] predicted peak %.0f MiB = base %.0f + adapters %.1f + optimizer %.1f + activations %.0f%s + "
            "scratch %.0f + runtime %.0f\n",
            p->total / M, p->base / M, p->adapters / M, p->optimizer / M, p->activations / M,
            p->checkpointing ? " (checkpointing)" : "", p->scratch / M, p->runtime / M);
}

size_t memplan_arena_chunk(const memplan *p) { return (size_t)p->arena_chunk; }
