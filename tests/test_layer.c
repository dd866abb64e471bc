/* tests/test_layer.c — the frozen base held per layer (model/llama.h, "the
 * layer blob") and the LoRA arrays' per-layer index.
 *
 * - The layout's numbers for SmolLM2-135M and Llama-2-7B shapes: the blob is
 *   exactly the payload nf4_nbytes counts (no padding for these shapes), so
 *   the memory accounting and its printout do not move.
 * - A layer's linears quantized into its blob hold the bytes a standalone
 *   nf4_quantize produces (the NF4 reference tests cover those bytes).
 * - Shards: cut a layer at random 64-element boundaries (inside linears,
 *   across them, on and off 256-block group boundaries), carry each shard's
 *   byte ranges (llama_layer_range_bytes) away, scribble over the original,
 *   write the shards into a fresh blob: the blob is rebuilt byte for byte
 *   and dequantizing every linear from it equals the original bit for bit.
 *   Dropping one shard's nested absmax breaks it (the check can fail).
 * - lora_set.layer_offset against the per-module offsets.
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

#include "core/bf16.h"
#include "model/llama.h"
#include "quant/nf4.h"

static uint64_t rng_state = 0x243f6a8885a308d3ull;
static uint64_t rng_next(void) { /* splitmix64 */
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static float rng_normal(void) {
    double u1 = (double)((rng_next() >> 11) + 1) * (1.0 / 9007199254740993.0);
    double u2 = (double)(rng_next() >> 11) * (1.0 / 9007199254740992.0);
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

static llama_hparams hparams(int n_layer, int d_model, int n_head, int n_kv_head, int head_dim, int d_ff) {
    return (llama_hparams){.n_layer = n_layer, .d_model = d_model, .n_head = n_head, .n_kv_head = n_kv_head,
                           .head_dim = head_dim, .d_ff = d_ff, .vocab = 256, .context_length = 64,
                           .rope_theta = 10000.0f, .rms_eps = 1e-5f};
}

/* nf4_nbytes of a (rows, cols) NF4-64 tensor, from the geometry alone. */
static size_t payload(int64_t rows, int64_t cols, int dq) {
    nf4_tensor t = {.rows = rows, .cols = cols, .n = rows * cols, .nblocks = (rows * cols + 63) / 64,
                    .blocksize = 64, .double_quant = dq};
    return nf4_nbytes(&t);
}

static void test_layout_real_shapes(void **state) {
    (void)state;
    qerr e = {{0}};
    const llama_hparams shapes[2] = {hparams(30, 576, 9, 3, 64, 1536),      /* SmolLM2-135M */
                                     hparams(32, 4096, 32, 32, 128, 11008)}; /* Llama-2-7B */
    for (int s = 0; s < 2; s++)
        for (int kind = 0; kind < 3; kind++) { /* NF4 + double quant, NF4, bf16 */
            llama_layer_layout lo;
            const int dq = kind == 0;
            assert_int_equal(llama_layer_layout_init(&lo, &shapes[s], kind == 2 ? FROZEN_BF16 : FROZEN_NF4, 64, dq, &e), 0);
            size_t want = 0;
            int64_t n = 0;
            for (int k = 0; k < LLAMA_N_LINEAR; k++) {
                int64_t r, c;
                llama_tensor_shape(&shapes[s], LLAMA_T_LINEAR, k, &r, &c);
                assert_int_equal(lo.rows[k], r);
                assert_int_equal(lo.cols[k], c);
                assert_int_equal(lo.elem[k], n);
                n += r * c;
                want += kind == 2 ? (size_t)(r * c) * 2 : payload(r, c, dq);
            }
            assert_int_equal(lo.elem[LLAMA_N_LINEAR], n);
            /* no padding for these shapes: quantized_bytes is what it was */
            assert_int_equal(lo.nbytes, want);
        }
    /* the SmolLM2-135M NF4 + double-quant layer, section by section */
    llama_layer_layout lo;
    assert_int_equal(llama_layer_layout_init(&lo, &shapes[0], FROZEN_NF4, 64, 1, &e), 0);
    assert_int_equal(lo.elem[LLAMA_N_LINEAR], 3538944);
    assert_int_equal(lo.off[LLAMA_BLOB_DATA], 0), assert_int_equal(lo.len[LLAMA_BLOB_DATA], 1769472);
    assert_int_equal(lo.off[LLAMA_BLOB_SCALES], 1769472), assert_int_equal(lo.len[LLAMA_BLOB_SCALES], 55296);
    /* groups: q, o 21; k, v 7; gate, up, down 54 */
    assert_int_equal(lo.group[LLAMA_N_LINEAR], 218);
    assert_int_equal(lo.off[LLAMA_BLOB_NESTED], 1824768), assert_int_equal(lo.len[LLAMA_BLOB_NESTED], 872);
    assert_int_equal(lo.off[LLAMA_BLOB_OFFSETS], 1825640), assert_int_equal(lo.len[LLAMA_BLOB_OFFSETS], 28);
    assert_int_equal(lo.nbytes, 1825668);
    assert_int_equal(30 * lo.nbytes, 54770040); /* the model's quantized_bytes before and after */

    /* errors */
    assert_int_equal(llama_layer_layout_init(&lo, &shapes[0], FROZEN_F32, 64, 0, &e), -1);
    assert_int_equal(llama_layer_layout_init(&lo, &shapes[0], FROZEN_NF4, 48, 0, &e), -1);
    assert_non_null(strstr(e.msg, "blocksize"));
}

/* An odd layer: partial last blocks (padding) in k and v, every linear
 * spanning 1 or 2 nested groups. */
#define OD 136
#define OH 4
#define OKV 2
#define OHD 34
#define OF 200

/* Fill L's linears from seeded weights (per linear its own scale, one
 * all-zero block, and huge values in one linear) and return the f32 weights. */
static float **fill_layer(llama_layer *L) {
    qerr e = {{0}};
    float **w = calloc(LLAMA_N_LINEAR, sizeof *w);
    for (int k = 0; k < LLAMA_N_LINEAR; k++) {
        const int64_t n = L->layout.rows[k] * L->layout.cols[k];
        if (n == 0) continue; /* a slot a fused linear took over (Phi-3) */
        w[k] = malloc((size_t)n * sizeof(float));
        const float scale = 0.01f * (float)(k + 1) * (k == LLAMA_UP ? 1e4f : 1.0f);
        for (int64_t i = 0; i < n; i++) w[k][i] = rng_normal() * scale;
        for (int64_t i = 128; i < 192 && i < n; i++) w[k][i] = 0.0f;
        if (L->layout.kind == FROZEN_NF4) {
            assert_int_equal(nf4_quantize_into(w[k], &L->nf4[k], &e), 0);
        } else {
            for (int64_t i = 0; i < n; i++) L->w_bf16[k][i] = f32_to_bf16(w[k][i]);
        }
    }
    llama_layer_seal(L);
    return w;
}

/* Every linear of L dequantized (f32 and bf16 rows), for comparison. */
static void dequant_layer(const llama_layer *L, float **f, uint16_t **b) {
    for (int k = 0; k < LLAMA_N_LINEAR; k++) {
        const frozen_weight *w = &L->lin[k];
        if (w->out == 0) { /* absent (Phi-3's k, v, up) */
            f[k] = NULL;
            b[k] = NULL;
            continue;
        }
        f[k] = malloc((size_t)(w->out * w->in) * sizeof(float));
        b[k] = malloc((size_t)(w->out * w->in) * sizeof(uint16_t));
        frozen_rows_f32(w, 0, w->out, f[k]);
        frozen_rows_bf16(w, 0, w->out, b[k]);
    }
}

static int dequant_equal(float **f0, uint16_t **b0, float **f1, uint16_t **b1, const llama_layer *L) {
    for (int k = 0; k < LLAMA_N_LINEAR; k++) {
        const size_t n = (size_t)(L->lin[k].out * L->lin[k].in);
        if (n == 0) continue;
        if (memcmp(f0[k], f1[k], n * sizeof(float)) || memcmp(b0[k], b1[k], n * sizeof(uint16_t))) return 0;
    }
    return 1;
}

static void free_arrays(void **a) {
    for (int k = 0; k < LLAMA_N_LINEAR; k++) free(a[k]);
    free(a);
}

/* The cuts of one partition of [0, n) into W shards at multiples of 64. */
static void random_cuts(int64_t n, int W, int on_groups, const llama_layer_layout *lo, int64_t *c) {
    c[0] = 0;
    c[W] = n;
    for (int i = 1; i < W; i++) {
        int64_t x = (int64_t)(rng_next() % (uint64_t)(n / 64 + 1)) * 64;
        if (on_groups) { /* snap to the start of the group (of its linear) holding x */
            int k = 0;
            while (k + 1 < LLAMA_N_LINEAR && x >= lo->elem[k + 1]) k++;
            x = lo->elem[k] + (x - lo->elem[k]) / (64 * 256) * (64 * 256);
        }
        c[i] = x;
    }
    for (int i = 1; i < W; i++) /* insertion sort; equal cuts make empty shards */
        for (int j = i; j > 1 && c[j - 1] > c[j]; j--) {
            int64_t t = c[j];
            c[j] = c[j - 1];
            c[j - 1] = t;
        }
}

/* Is layer element x the first element of a nested group of its linear? */
static int on_group_boundary(const llama_layer_layout *lo, int64_t x) {
    for (int k = 0; k <= LLAMA_N_LINEAR; k++)
        if (x == lo->elem[k]) return 1;
    int k = 0;
    while (k + 1 < LLAMA_N_LINEAR && x >= lo->elem[k + 1]) k++;
    return (x - lo->elem[k]) % (64 * 256) == 0;
}

static int inside_linear(const llama_layer_layout *lo, int64_t x) {
    for (int k = 0; k <= LLAMA_N_LINEAR; k++)
        if (x == lo->elem[k]) return 0;
    return 1;
}

static void check_shards(llama_layer *L, int W, int on_groups) {
    qerr e = {{0}};
    const llama_layer_layout *lo = &L->layout;
    const int64_t n = lo->elem[LLAMA_N_LINEAR];
    int64_t cuts[17];
    random_cuts(n, W, on_groups, lo, cuts);

    /* reference: the original blob and what it dequantizes to */
    uint8_t *orig = malloc(lo->nbytes);
    memcpy(orig, L->blob, lo->nbytes);
    float *f0[LLAMA_N_LINEAR], *f1[LLAMA_N_LINEAR];
    uint16_t *b0[LLAMA_N_LINEAR], *b1[LLAMA_N_LINEAR];
    dequant_layer(L, f0, b0);

    /* each shard's ranges, carried away into the shard's own buffer */
    llama_byte_range r[16][LLAMA_BLOB_N_SECTIONS];
    uint8_t *shard[16];
    for (int i = 0; i < W; i++) {
        assert_int_equal(llama_layer_range_bytes(lo, cuts[i], cuts[i + 1], r[i], &e), 0);
        size_t tot = 0;
        for (int s = 0; s < LLAMA_BLOB_N_SECTIONS; s++) tot += r[i][s].len;
        shard[i] = malloc(tot ? tot : 1);
        size_t p = 0;
        for (int s = 0; s < LLAMA_BLOB_N_SECTIONS; s++) {
            assert_true(r[i][s].off + r[i][s].len <= lo->off[s] + lo->len[s]);
            assert_true(r[i][s].off >= lo->off[s]);
            memcpy(shard[i] + p, L->blob + r[i][s].off, r[i][s].len);
            p += r[i][s].len;
        }
    }
    /* DATA and SCALES tile their sections; NESTED and OFFSETS overlap by
     * exactly one entry where a cut splits a group / a linear */
    for (int s = 0; s < LLAMA_BLOB_N_SECTIONS; s++) {
        if (!lo->len[s]) continue;
        size_t end = lo->off[s];
        int64_t prev_cut = -1;
        for (int i = 0; i < W; i++) {
            if (!r[i][s].len) continue;
            size_t overlap = end - r[i][s].off;
            if (prev_cut < 0 || s == LLAMA_BLOB_DATA || s == LLAMA_BLOB_SCALES) {
                assert_int_equal(overlap, 0);
            } else if (s == LLAMA_BLOB_NESTED) {
                assert_int_equal(overlap, on_group_boundary(lo, cuts[i]) ? 0 : 4);
            } else {
                assert_int_equal(overlap, inside_linear(lo, cuts[i]) ? 4 : 0);
            }
            end = r[i][s].off + r[i][s].len;
            prev_cut = cuts[i];
        }
        assert_int_equal(end, lo->off[s] + lo->len[s]);
    }

    /* the original is gone; the shards are written into a fresh zeroed blob */
    memset(L->blob, 0xee, lo->nbytes);
    uint8_t *fresh = aligned_alloc(LLAMA_BLOB_ALIGN, (lo->nbytes + 63) / 64 * 64);
    memset(fresh, 0, lo->nbytes);
    for (int i = 0; i < W; i++) {
        size_t p = 0;
        for (int s = 0; s < LLAMA_BLOB_N_SECTIONS; s++) {
            memcpy(fresh + r[i][s].off, shard[i] + p, r[i][s].len);
            p += r[i][s].len;
        }
    }
    assert_memory_equal(fresh, orig, lo->nbytes);

    /* a layer struct bound to the rebuilt blob: offsets come from the blob */
    llama_layer G = *L;
    if (lo->double_quant)
        for (int k = 0; k < LLAMA_N_LINEAR; k++) G.nf4[k].offset = -1.0f;
    llama_layer_bind(&G, fresh);
    for (int k = 0; k < LLAMA_N_LINEAR; k++) {
        if (lo->rows[k] == 0) continue; /* absent: nothing bound */
        if (lo->kind == FROZEN_NF4) {
            assert_true(G.lin[k].nf4 == &G.nf4[k]);
            assert_memory_equal(&G.nf4[k].offset, &L->nf4[k].offset, sizeof(float));
        } else {
            assert_true(G.lin[k].w_bf16 == G.w_bf16[k]);
        }
    }
    dequant_layer(&G, f1, b1);
    assert_true(dequant_equal(f0, b0, f1, b1, &G));
    for (int k = 0; k < LLAMA_N_LINEAR; k++) free(f1[k]), free(b1[k]);

    /* without one shard's nested absmax the layer is not rebuilt */
    if (lo->double_quant) {
        const int i = W / 2;
        if (r[i][LLAMA_BLOB_NESTED].len) {
            memset(fresh + r[i][LLAMA_BLOB_NESTED].off, 0, r[i][LLAMA_BLOB_NESTED].len);
            dequant_layer(&G, f1, b1);
            assert_false(dequant_equal(f0, b0, f1, b1, &G));
            for (int k = 0; k < LLAMA_N_LINEAR; k++) free(f1[k]), free(b1[k]);
        }
    }

    memcpy(L->blob, orig, lo->nbytes);
    for (int k = 0; k < LLAMA_N_LINEAR; k++) free(f0[k]), free(b0[k]);
    for (int i = 0; i < W; i++) free(shard[i]);
    free(fresh);
    free(orig);
}

static void test_shards_rebuild_layer(void **state) {
    (void)state;
    qerr e = {{0}};
    const llama_hparams hp = hparams(1, OD, OH, OKV, OHD, OF);
    for (int kind = 0; kind < 3; kind++) { /* NF4 + double quant, NF4, bf16 */
        const int dq = kind == 0;
        llama_layer_layout lo;
        assert_int_equal(llama_layer_layout_init(&lo, &hp, kind == 2 ? FROZEN_BF16 : FROZEN_NF4, 64, dq, &e), 0);
        llama_layer L;
        memset(&L, 0, sizeof L);
        assert_int_equal(llama_layer_alloc(&L, &lo, &e), 0);
        assert_true(((uintptr_t)L.blob % LLAMA_BLOB_ALIGN) == 0);
        float **w = fill_layer(&L);

        /* the layout: padded element space, aligned sections */
        for (int k = 0; k < LLAMA_N_LINEAR; k++) {
            const int64_t nk = lo.rows[k] * lo.cols[k];
            assert_int_equal(lo.elem[k + 1] - lo.elem[k], (nk + 63) / 64 * 64);
            assert_int_equal(lo.elem[k] % 64, 0);
        }
        /* k and v (68 x 136 = 144.5 blocks) end in a partial block: padded */
        assert_true(lo.elem[LLAMA_K + 1] - lo.elem[LLAMA_K] > lo.rows[LLAMA_K] * lo.cols[LLAMA_K]);
        for (int s = LLAMA_BLOB_DATA; s <= LLAMA_BLOB_NESTED; s++)
            if (lo.len[s]) assert_int_equal(lo.off[s] % LLAMA_BLOB_ALIGN, 0);

        /* the views hold what a standalone nf4_quantize produces */
        for (int k = 0; k < LLAMA_N_LINEAR; k++) {
            const int64_t r = lo.rows[k], c = lo.cols[k];
            if (kind == 2) {
                for (int64_t i = 0; i < r * c; i++) assert_int_equal(L.w_bf16[k][i], f32_to_bf16(w[k][i]));
                continue;
            }
            nf4_tensor t;
            assert_int_equal(nf4_quantize(w[k], r, c, 64, dq, &t, &e), 0);
            const nf4_tensor *v = &L.nf4[k];
            assert_true(v->is_view);
            assert_true(v->packed >= L.blob && v->packed + (t.n + 1) / 2 <= L.blob + lo.nbytes);
            assert_memory_equal(v->packed, t.packed, (size_t)(t.n + 1) / 2);
            if (dq) {
                const int64_t ng = (t.nblocks + 255) / 256;
                assert_memory_equal(v->absmax_q, t.absmax_q, (size_t)t.nblocks);
                assert_memory_equal(v->nested_absmax, t.nested_absmax, (size_t)ng * 4);
                assert_memory_equal(&v->offset, &t.offset, 4);
                assert_memory_equal(L.blob + lo.off[LLAMA_BLOB_OFFSETS] + 4 * k, &t.offset, 4);
                assert_int_equal(lo.group[k + 1] - lo.group[k], ng);
            } else {
                assert_memory_equal(v->absmax, t.absmax, (size_t)t.nblocks * 4);
            }
            nf4_free(&t);
        }
        if (dq) assert_true(lo.group[1] - lo.group[0] == 2); /* q: 289 blocks = 2 groups */

        static const int worlds[] = {1, 2, 3, 5, 8, 16};
        for (size_t wi = 0; wi < sizeof worlds / sizeof worlds[0]; wi++)
            for (int rep = 0; rep < 4; rep++) check_shards(&L, worlds[wi], rep == 3);

        /* a linear's own range [i, j): per-section sizes */
        llama_byte_range r[LLAMA_BLOB_N_SECTIONS];
        const int k = LLAMA_GATE;
        assert_int_equal(llama_layer_range_bytes(&lo, lo.elem[k] + 64, lo.elem[k + 1], r, &e), 0);
        const int64_t cnt = lo.elem[k + 1] - lo.elem[k] - 64;
        assert_int_equal(r[LLAMA_BLOB_DATA].len, kind == 2 ? cnt * 2 : cnt / 2);
        if (kind != 2) assert_int_equal(r[LLAMA_BLOB_SCALES].len, cnt / 64 * (dq ? 1 : 4));
        if (dq) {
            assert_int_equal(r[LLAMA_BLOB_NESTED].off, lo.off[LLAMA_BLOB_NESTED] + 4 * lo.group[k]);
            assert_int_equal(r[LLAMA_BLOB_NESTED].len, 4 * (lo.group[k + 1] - lo.group[k]));
            assert_int_equal(r[LLAMA_BLOB_OFFSETS].off, lo.off[LLAMA_BLOB_OFFSETS] + 4 * k);
            assert_int_equal(r[LLAMA_BLOB_OFFSETS].len, 4);
        } else {
            assert_int_equal(r[LLAMA_BLOB_NESTED].len, 0);
            assert_int_equal(r[LLAMA_BLOB_OFFSETS].len, 0);
        }
        /* errors: off a block boundary, reversed, past the end */
        assert_int_equal(llama_layer_range_bytes(&lo, 32, 128, r, &e), -1);
        assert_non_null(strstr(e.msg, "block boundaries"));
        assert_int_equal(llama_layer_range_bytes(&lo, 128, 64, r, &e), -1);
        assert_int_equal(llama_layer_range_bytes(&lo, 0, lo.elem[LLAMA_N_LINEAR] + 64, r, &e), -1);
        assert_int_equal(llama_layer_range_bytes(&lo, 64, 64, r, &e), 0);
        for (int s = 0; s < LLAMA_BLOB_N_SECTIONS; s++) assert_int_equal(r[s].len, 0);

        free_arrays((void **)w);
        /* llama_free of a one-layer model releases the blob (views are not freed) */
        llama_model m;
        memset(&m, 0, sizeof m);
        m.hp = hp;
        m.layers = calloc(1, sizeof *m.layers);
        m.layers[0] = L;
        llama_free(&m);
    }
}

/* Phi-3's layer: fused qkv_proj in slot q and gate_up_proj in slot gate, slots k, v and up absent (no elements,
 * no nested groups, no storage, no adapter); the blob still splits anywhere and rebuilds bit for bit. */
static void test_phi3_layer(void **state) {
    (void)state;
    qerr e = {{0}};
    llama_hparams hp = hparams(1, OD, OH, OKV, OHD, OF);
    hp.arch = LLAMA_ARCH_PHI3;
    for (int kind = 0; kind < 3; kind++) {
        const int dq = kind == 0;
        llama_layer_layout lo;
        assert_int_equal(llama_layer_layout_init(&lo, &hp, kind == 2 ? FROZEN_BF16 : FROZEN_NF4, 64, dq, &e), 0);
        assert_int_equal(lo.rows[LLAMA_Q], (OH + 2 * OKV) * OHD);
        assert_int_equal(lo.rows[LLAMA_GATE], 2 * OF);
        int64_t n = 0;
        for (int k = 0; k < LLAMA_N_LINEAR; k++) {
            const int absent = k == LLAMA_K || k == LLAMA_V || k == LLAMA_UP;
            assert_int_equal(llama_linear_present(&hp, k), !absent);
            if (absent) assert_int_equal(lo.elem[k + 1], lo.elem[k]), assert_int_equal(lo.group[k + 1], lo.group[k]);
            n += (lo.rows[k] * lo.cols[k] + 63) / 64 * 64;
        }
        assert_int_equal(lo.elem[LLAMA_N_LINEAR], n);
        llama_layer L;
        memset(&L, 0, sizeof L);
        assert_int_equal(llama_layer_alloc(&L, &lo, &e), 0);
        assert_int_equal(L.lin[LLAMA_K].out, 0);
        float **w = fill_layer(&L);
        static const int worlds[] = {1, 2, 3, 7, 16};
        for (size_t wi = 0; wi < sizeof worlds / sizeof worlds[0]; wi++)
            for (int rep = 0; rep < 3; rep++) check_shards(&L, worlds[wi], rep == 2);
        /* LoRA: one pair per present slot, none on the absent ones even when asked for */
        llama_model m;
        memset(&m, 0, sizeof m);
        m.hp = hp;
        m.layers = calloc(1, sizeof *m.layers);
        m.layers[0] = L;
        lora_set ls;
        const int all[LLAMA_N_LINEAR] = {1, 1, 1, 1, 1, 1, 1};
        assert_int_equal(lora_set_init(&ls, &m, 4, 8.0f, 0.0f, 0, all, 1, &e), 0);
        for (int k = 0; k < LLAMA_N_LINEAR; k++) assert_int_equal(lora_set_get(&ls, 0, k) != NULL, llama_linear_present(&hp, k));
        assert_int_equal(ls.n_params, 4 * ((OD + (OH + 2 * OKV) * OHD) + (OH * OHD + OD) + (OD + 2 * OF) + (OF + OD)));
        lora_set_free(&ls);
        free_arrays((void **)w);
        llama_free(&m);
    }
}

/* lora_set: layer l's parameters are [layer_offset[l], layer_offset[l+1]),
 * the per-module offsets inside it in module order, A then B. */
static void test_lora_layer_offsets(void **state) {
    (void)state;
    qerr e = {{0}};
    const llama_hparams hp = hparams(3, OD, OH, OKV, OHD, OF);
    llama_model m;
    memset(&m, 0, sizeof m);
    m.hp = hp;
    m.layers = calloc((size_t)hp.n_layer, sizeof *m.layers);
    for (int l = 0; l < hp.n_layer; l++)
        for (int k = 0; k < LLAMA_N_LINEAR; k++) {
            int64_t r, c;
            llama_tensor_shape(&hp, LLAMA_T_LINEAR, k, &r, &c);
            m.layers[l].lin[k] = (frozen_weight){.out = r, .in = c, .kind = FROZEN_F32};
        }
    static const int targets[3][LLAMA_N_LINEAR] = {{1, 1, 1, 1, 1, 1, 1}, {1, 0, 1, 0, 0, 0, 0}, {0, 0, 0, 0, 0, 0, 1}};
    for (int ti = 0; ti < 3; ti++) {
        lora_set ls;
        const int r = 4 + ti;
        assert_int_equal(lora_set_init(&ls, &m, r, 8.0f, 0.0f, 0, targets[ti], 7, &e), 0);
        assert_non_null(ls.layer_offset);
        assert_int_equal(ls.layer_offset[0], 0);
        assert_int_equal(ls.layer_offset[hp.n_layer], ls.n_params);
        for (int l = 0; l < hp.n_layer; l++) {
            int64_t at = ls.layer_offset[l];
            for (int k = 0; k < LLAMA_N_LINEAR; k++) {
                const int idx = l * LLAMA_N_LINEAR + k;
                if (!targets[ti][k]) {
                    assert_int_equal(ls.offset[idx], -1);
                    continue;
                }
                const frozen_weight *w = &m.layers[l].lin[k];
                assert_int_equal(ls.offset[idx], at);
                assert_ptr_equal(ls.A[idx].data, ls.params + at);
                assert_ptr_equal(ls.A[idx].grad, ls.grads + at);
                at += (int64_t)r * w->in;
                assert_ptr_equal(ls.B[idx].data, ls.params + at);
                at += w->out * (int64_t)r;
            }
            assert_int_equal(at, ls.layer_offset[l + 1]);
            assert_true(ls.layer_offset[l + 1] > ls.layer_offset[l]);
        }
        lora_set_free(&ls);
        assert_null(ls.layer_offset);
    }
    free(m.layers);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_layout_real_shapes),
        cmocka_unit_test(test_shards_rebuild_layer),
        cmocka_unit_test(test_phi3_layer),
        cmocka_unit_test(test_lora_layer_offsets),
    };
    return cmocka_run_group_tests_name("layer", tests, NULL, NULL);
}
