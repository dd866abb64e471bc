/* tests/test_offload.c — gradient_checkpointing: offload (autograd/tensor.h ag_checkpoint_offload)
 * on the `cpu-fenced` backend, whose data memory the host cannot read and whose offload copies run
 * at the latest moment a device's copy stream may (autograd/backend_fenced.c): no GPU needed.
 *
 *  - A tiny random Llama (8 layers), two micro-batches of forward + backward accumulated (as the
 *    trainer's gradient accumulation does, the arena reset in between, so the host buffers and slots
 *    are reused): the loss and every LoRA gradient with offload are bit-identical to checkpointing on
 *    (LLAMA_CKPT_FULL) on the same backend (the `cpu` kernels). A copy read before its
 *    wait would see NaN (the fence fills an h2d destination with all-ones until the wait) or the
 *    next block's data (a d2h runs at its wait), so identical numbers show the waits are where they
 *    must be.
 *  - The fenced backend's device-memory high-water mark (every byte it allocated: arena chunks,
 *    slots, scratch, adapters) drops by what the planner (trainer/memplan.c) predicts for the shape:
 *    (L - 2) block inputs of 4·N·D bytes (L inputs become two slots and the last output, and the
 *    block-output buffer goes; both modes recompute a block from its input in place), within one arena chunk (the arena takes device memory a
 *    chunk at a time, so the measured figure moves in chunk steps); and counted in bytes used (the
 *    data arenas' peak plus the slots or the block-output buffer beside them), exactly.
 *  - The host side holds the L - 1 offloaded inputs, the planner's host figure, exactly.
 *  - On `cpu` (host data) the planner predicts offload as checkpointing on.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "autograd/backend.h"
#include "autograd/tensor.h"
#include "core/bf16.h"
#include "core/rng.h"
#include "model/llama.h"
#include "trainer/memplan.h"

enum { L_LAYERS = 8, D = 128, F = 256, V = 101, B = 4, T = 128 };
#define CHUNK ((size_t)1 << 20) /* the arena's minimum chunk */

static float frand(uint64_t *s) {
    *s += 1;
    return 2.0f * rng_uniform(4321, 98, *s) - 1.0f;
}

typedef struct tiny {
    llama_model m;
    bf16 *emb;
} tiny;

static void tiny_build(tiny *t) {
    llama_model *m = &t->m;
    memset(t, 0, sizeof *t);
    m->hp = (llama_hparams){.n_layer = L_LAYERS, .d_model = D, .n_head = 4, .n_kv_head = 2, .head_dim = 32,
                            .d_ff = F, .vocab = V, .context_length = T, .rope_theta = 10000.0f, .rms_eps = 1e-5f,
                            .tied_embeddings = 1};
    qerr e;
    uint64_t s = 5;
    t->emb = malloc((size_t)V * D * sizeof(bf16));
    for (int64_t i = 0; i < (int64_t)V * D; i++) t->emb[i] = f32_to_bf16(0.5f * frand(&s));
    m->tok_embd = t->emb;
    m->lm_head_w = t->emb;
    m->embed = (frozen_weight){.out = V, .in = D, .kind = FROZEN_BF16, .w_bf16 = t->emb};
    m->lm_head = m->embed;
    m->out_norm = malloc(D * sizeof(float));
    for (int i = 0; i < D; i++) m->out_norm[i] = 1.0f;
    m->layers = calloc(L_LAYERS, sizeof *m->layers);
    int64_t outs[7] = {D, 64, 64, D, F, F, D}, ins[7] = {D, D, D, D, D, D, F};
    for (int l = 0; l < L_LAYERS; l++) {
        m->layers[l].attn_norm = malloc(D * sizeof(float));
        m->layers[l].ffn_norm = malloc(D * sizeof(float));
        for (int i = 0; i < D; i++) m->layers[l].attn_norm[i] = m->layers[l].ffn_norm[i] = 1.0f;
        for (int k = 0; k < 7; k++) {
            float *w = malloc((size_t)(outs[k] * ins[k]) * sizeof(float));
            for (int64_t i = 0; i < outs[k] * ins[k]; i++) w[i] = 0.1f * frand(&s);
            assert_int_equal(nf4_quantize(w, outs[k], ins[k], 64, 1, &m->layers[l].nf4[k], &e), 0);
            m->layers[l].lin[k] =
                (frozen_weight){.out = outs[k], .in = ins[k], .kind = FROZEN_NF4, .nf4 = &m->layers[l].nf4[k]};
            free(w);
        }
    }
    assert_int_equal(rope_table_init(&m->rope, T, 32, 10000.0f, &e), 0);
}

static void tiny_free(tiny *t) {
    llama_model *m = &t->m;
    for (int l = 0; l < L_LAYERS; l++) {
        for (int k = 0; k < 7; k++) nf4_free(&m->layers[l].nf4[k]);
        free(m->layers[l].attn_norm);
        free(m->layers[l].ffn_norm);
    }
    free(m->layers);
    free(m->out_norm);
    free(t->emb);
    rope_table_free(&m->rope);
}

typedef struct run_out {
    double loss[2];
    float *grads;     /* host copy, n_params */
    size_t dev_peak;  /* cpu-fenced: data memory high-water mark over the run (bytes) */
    size_t arena_peak; /* the data arenas' bytes in use at their high-water mark (ctx.keep.peak) */
    size_t ascratch;   /* the block-output copy buffer (ag_checkpoint's; offload does without) */
    ag_offload_info info;
} run_out;

/* Two micro-batches of forward + backward on backend be with checkpointing mode ck, gradients
 * accumulated; LoRA r 8 on all linears, dropout 0.1, bf16 GEMMs. */
static void run(const tiny *t, const ag_backend *be, int ck, run_out *o) {
    qerr e;
    int target[7] = {1, 1, 1, 1, 1, 1, 1};
    int fenced = !strcmp(be->name, "cpu-fenced");
    if (fenced) ag_backend_fenced_mem(NULL, NULL, 1);
    lora_set ls;
    assert_int_equal(lora_set_init_backend(&ls, be, &t->m, 8, 16.0f, 0.1f, 0, target, 3, &e), 0);
    /* B != 0, the same values on every backend */
    float *p = malloc((size_t)ls.n_params * sizeof(float));
    uint64_t s = 77;
    const float *p0 = lora_set_params_host(&ls, ls.params, &e);
    for (int64_t i = 0; i < ls.n_params; i++) p[i] = p0[i] + 0.05f * frand(&s);
    lora_set_host_release(&ls, ls.params, p0);
    be->copy_h2d(ls.params, p, (size_t)ls.n_params * sizeof(float));
    be->zero(ls.grads, (size_t)ls.n_params * sizeof(float));
    free(p);

    static int32_t ids[B * T], tg[B * T], pos[B * T], sid[B * T];
    ag_ctx ctx;
    assert_int_equal(ag_ctx_init_backend(&ctx, be, CHUNK, &e), 0);
    ctx.bf16 = 1;
    ctx.training = 1;
    ag_mark mk = ag_arena_mark(&ctx);
    for (int mb = 0; mb < 2; mb++) {
        for (int i = 0; i < B * T; i++) {
            ids[i] = (int32_t)(rng_u64(11, (uint64_t)mb, (uint64_t)i) % V);
            tg[i] = i % 7 == 0 ? -100 : (int32_t)(rng_u64(12, (uint64_t)mb, (uint64_t)i) % V);
            sid[i] = (i % T) < 50 ? 0 : 1; /* two packed examples per row */
            pos[i] = sid[i] ? (i % T) - 50 : i % T;
        }
        llama_batch b = {.B = B, .T = T, .input_ids = ids, .targets = tg, .position_ids = pos, .seq_ids = sid};
        ctx.seed = 1000 + (uint64_t)mb;
        int64_t nt;
        tensor *L = llama_forward_loss(&ctx, &t->m, &ls, &b, 1.0f / 256, ck, &o->loss[mb], &nt);
        ag_backward(&ctx, L);
        ag_arena_reset(&ctx, mk);
    }
    be->sync();
    ag_offload_get_info(&ctx, &o->info);
    o->arena_peak = ctx.keep.peak;
    o->ascratch = ctx.ascratch_size;
    ag_ctx_free(&ctx);
    const float *g = lora_set_params_host(&ls, ls.grads, &e);
    o->grads = malloc((size_t)ls.n_params * sizeof(float));
    memcpy(o->grads, g, (size_t)ls.n_params * sizeof(float));
    lora_set_host_release(&ls, ls.grads, g);
    if (fenced) ag_backend_fenced_mem(NULL, &o->dev_peak, 0);
    double nrm = 0;
    for (int64_t i = 0; i < ls.n_params; i++) nrm += (double)o->grads[i] * o->grads[i];
    assert_true(nrm > 0 && isfinite(nrm));
    lora_set_free(&ls);
}

static int64_t n_params_of(const tiny *t) {
    qerr e;
    int target[7] = {1, 1, 1, 1, 1, 1, 1};
    lora_set ls;
    assert_int_equal(lora_set_init(&ls, &t->m, 8, 16.0f, 0.1f, 0, target, 3, &e), 0);
    int64_t n = ls.n_params;
    lora_set_free(&ls);
    return n;
}

static void test_offload_fenced(void **st) {
    (void)st;
    const ag_backend *fen = ag_backend_find("cpu-fenced");
    assert_non_null(fen);
    tiny t;
    tiny_build(&t);
    int64_t np = n_params_of(&t);
    run_out full, off;
    run(&t, fen, LLAMA_CKPT_FULL, &full);
    run(&t, fen, LLAMA_CKPT_OFFLOAD, &off);

    /* bit-identical: losses and every gradient (cpu-fenced runs the `cpu` kernels, so these are the CPU
     * engine's numbers; tests/test_e2e_checkpointing.c compares the trainer's modes on `cpu`) */
    int64_t diff_off = 0;
    for (int64_t i = 0; i < np; i++) diff_off += memcmp(&off.grads[i], &full.grads[i], 4) != 0;
    print_message("losses: on %.9g %.9g, offload %.9g %.9g; gradients differing: %lld of %lld\n", full.loss[0],
                  full.loss[1], off.loss[0], off.loss[1], (long long)diff_off, (long long)np);
    assert_int_equal(diff_off, 0);
    assert_memory_equal(off.loss, full.loss, sizeof full.loss);

    /* what moved: per micro-batch L - 1 inputs out, L - 2 back (the last block's is still in its slot) */
    const size_t in_bytes = (size_t)4 * B * T * D;
    print_message("offload: %lld copies to host, %lld back, %lld bytes out; host %zu bytes, slots %zu bytes\n",
                  (long long)off.info.n_d2h, (long long)off.info.n_h2d, (long long)off.info.offloaded_bytes,
                  off.info.host_bytes, off.info.slot_bytes);
    assert_int_equal(off.info.n_d2h, 2 * (L_LAYERS - 1));
    assert_int_equal(off.info.n_h2d, 2 * (L_LAYERS - 2));
    assert_int_equal(off.info.slot_bytes, 2 * in_bytes);
    assert_int_equal(full.info.n_d2h, 0);

    /* the planner: device memory drop and host memory */
    memplan_input pi = {.hp = t.m.hp, .B = B, .T = T, .checkpointing = LLAMA_CKPT_FULL, .bf16 = 1, .lora_r = 8,
                        .lora_dropout = 0.1f, .lora_params = np, .n_threads = 1, .device_cuda = 1};
    memplan pf, po;
    memplan_predict(&pi, &pf);
    pi.checkpointing = LLAMA_CKPT_OFFLOAD;
    memplan_predict(&pi, &po);
    double predicted = pf.total - po.total, measured = (double)full.dev_peak - (double)off.dev_peak;
    print_message("cpu-fenced device-memory high-water mark: on %zu, offload %zu bytes: drop %.0f bytes; planner "
                  "%.0f bytes ((L - 2) x %zu); host %zu bytes, planner %.0f\n",
                  full.dev_peak, off.dev_peak, measured, predicted, in_bytes, off.info.host_bytes, po.host_offload);
    /* exactly, in bytes used rather than chunks held: the arenas' peak plus the buffers beside them */
    double exact = ((double)full.arena_peak + (double)full.ascratch) -
                   ((double)off.arena_peak + (double)off.info.slot_bytes);
    print_message("data arenas at their peak + block buffers: on %zu + %zu, offload %zu + %zu: drop %.0f bytes\n",
                  full.arena_peak, full.ascratch, off.arena_peak, off.info.slot_bytes, exact);
    assert_true(predicted == (double)(L_LAYERS - 2) * (double)in_bytes);
    assert_true(exact == predicted);
    assert_true(fabs(measured - predicted) <= (double)CHUNK);
    assert_true(po.host_offload == (double)off.info.host_bytes);
    assert_true(pf.host_offload == 0);

    /* on the CPU (host data) offload is checkpointing on (ag_checkpoint itself; the trainer's run of it is
     * tests/test_e2e_checkpointing.c): the planner predicts the same */
    memplan_input pc = pi;
    pc.device_cuda = 0;
    memplan pco, pcf;
    memplan_predict(&pc, &pco);
    pc.checkpointing = LLAMA_CKPT_FULL;
    memplan_predict(&pc, &pcf);
    assert_true(pco.total == pcf.total && pco.host_offload == 0);

    free(full.grads);
    free(off.grads);
    tiny_free(&t);
}

int main(void) {
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_offload_fenced)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
