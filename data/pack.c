/* data/pack.c — documents → examples (chunk / truncate) → packed rows.
 *
 * Packing follows the layout of axolotl's sample packing (multipack): several
 * examples share a row, position ids restart per example and attention is
 * confined to each example (here through seq_ids). Placement is first-fit in
 * a seeded shuffled order: a max-segment tree over the rows' free space finds
 * the leftmost row with room in O(log rows), so packing a million examples
 * stays fast. Row order is reshuffled every epoch by dataset_epoch_order.
 * axolotl's sample_packing_sequentially packs next-fit instead, and its
 * curriculum_sampling keeps the order (no shuffle, rows in order): see
 * data/dataset.h.
 * Random choices come from core/rng.h (counter-based), so they depend only on
 * the seed.
 */
#include "data/dataset.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/rng.h"
#include "core/strbuf.h"

#define PACK_STREAM_SHUFFLE 0x5348554646ull /* "SHUFF" */
#define PACK_STREAM_EPOCH 0x45504f4348000000ull /* "EPOCH" + epoch */
#define PACK_IGNORE (-100)

void dataset_examples_free(dataset_examples *v) {
    if (!v) return;
    for (int64_t i = 0; i < v->n; i++) {
        free(v->v[i].ids);
        free(v->v[i].mask);
    }
    free(v->v);
    memset(v, 0, sizeof *v);
}

int dataset_examples_push(dataset_examples *v, const dataset_example *ex, qerr *e) {
    if (v->n == v->cap) {
        int64_t cap = v->cap ? 2 * v->cap : 256;
        dataset_example *nv = realloc(v->v, (size_t)cap * sizeof *nv);
        if (!nv) return qerr_set(e, "out of memory (%lld examples)", (long long)cap);
        v->v = nv;
        v->cap = cap;
    }
    v->v[v->n++] = *ex;
    return 0;
}

dataset_example *dataset_examples_push_new(dataset_examples *v, int32_t n, qerr *e) {
    dataset_example ex = {0};
    ex.ids = malloc((size_t)n * sizeof *ex.ids);
    ex.mask = malloc((size_t)n);
    if (!ex.ids || !ex.mask || dataset_examples_push(v, &ex, e)) {
        if (!ex.ids || !ex.mask) qerr_set(e, "out of memory (example of %d tokens)", n);
        free(ex.ids);
        free(ex.mask);
        return NULL;
    }
    v->v[v->n - 1].n = n;
    return &v->v[v->n - 1];
}

void packed_set_free(packed_set *p) {
    if (!p) return;
    free(p->input_ids);
    free(p->targets);
    free(p->position_ids);
    free(p->seq_ids);
    memset(p, 0, sizeof *p);
}

/* Fisher–Yates with draws rng_u64(seed, stream, i); the modulo bias is
 * below 2^-40 for any realistic n. */
static void pack_permute(uint64_t seed, uint64_t stream, int64_t n, int64_t *perm) {
    for (int64_t i = 0; i < n; i++) perm[i] = i;
    for (int64_t i = n - 1; i > 0; i--) {
        int64_t j = (int64_t)(rng_u64(seed, stream, (uint64_t)i) % (uint64_t)(i + 1));
        int64_t t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
    }
}

void dataset_epoch_order(uint64_t seed, int epoch, int64_t n_rows, int64_t *perm) {
    pack_permute(seed, PACK_STREAM_EPOCH + (uint64_t)(uint32_t)epoch, n_rows, perm);
}

void dataset_rows_order(const packed_set *ps, uint64_t seed, int epoch, int64_t *perm) {
    if (ps->in_order)
        for (int64_t i = 0; i < ps->n_rows; i++) perm[i] = i;
    else
        dataset_epoch_order(seed, epoch, ps->n_rows, perm);
}

/* ------------------------------------------------------------------------ */
/* fitting                                                                   */

static int pack_has_target(const uint8_t *mask, int32_t n) {
    for (int32_t j = 1; j < n; j++)
        if (mask[j]) return 1;
    return 0;
}

static int pack_push_slice(dataset_examples *out, const dataset_example *d, int32_t start, int32_t n, qerr *e) {
    dataset_example *ex = dataset_examples_push_new(out, n, e);
    if (!ex) return -1;
    memcpy(ex->ids, d->ids + start, (size_t)n * sizeof *ex->ids);
    memcpy(ex->mask, d->mask + start, (size_t)n);
    ex->chunkable = d->chunkable;
    ex->doc = d->doc;
    return 0;
}

int dataset_fit(const dataset_examples *docs, const uint8_t *select, int sequence_len, dataset_examples *out,
                dataset_split_stats *st, qerr *e) {
    if (sequence_len < 2) return qerr_set(e, "sequence_len = %d: must be at least 2", sequence_len);
    dataset_split_stats dummy = {0};
    if (!st) st = &dummy;
    for (int64_t i = 0; i < docs->n; i++) {
        if (select && !select[i]) continue;
        const dataset_example *d = &docs->v[i];
        st->n_docs++;
        if (d->n > sequence_len && d->chunkable) {
            st->n_chunked++;
            for (int32_t s = 0; s < d->n; s += sequence_len) {
                int32_t n = d->n - s < sequence_len ? d->n - s : sequence_len;
                if (!pack_has_target(d->mask + s, n)) {
                    st->n_dropped++;
                    continue;
                }
                if (pack_push_slice(out, d, s, n, e)) return -1;
            }
            continue;
        }
        int32_t n = d->n;
        if (n > sequence_len) {
            st->n_truncated++;
            n = sequence_len;
        }
        if (!pack_has_target(d->mask, n)) {
            st->n_dropped++;
            continue;
        }
        if (pack_push_slice(out, d, 0, n, e)) return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* packing                                                                   */

int dataset_pack(const dataset_examples *ex, int seq_len, int sample_packing, int32_t pad_id, int shuffle,
                 uint64_t seed, packed_set *out, dataset_split_stats *st, qerr *e) {
    memset(out, 0, sizeof *out);
    out->seq_len = seq_len;
    out->in_order = (sample_packing & DATASET_PACK_IN_ORDER) != 0;
    if (seq_len < 2) return qerr_set(e, "sequence_len = %d: must be at least 2", seq_len);
    int64_t n = ex->n;
    for (int64_t i = 0; i < n; i++)
        if (ex->v[i].n < 1 || ex->v[i].n > seq_len)
            return qerr_set(e, "dataset_pack: example %lld has %d tokens (sequence_len %d)", (long long)i,
                            ex->v[i].n, seq_len);
    if (n == 0) return 0;

    int rc = -1;
    int64_t *order = malloc((size_t)n * sizeof *order);
    int64_t *row_of = malloc((size_t)n * sizeof *row_of);
    int32_t *off_of = malloc((size_t)n * sizeof *off_of);
    int32_t *tree = NULL, *row_cnt = NULL;
    if (!order || !row_of || !off_of) {
        qerr_set(e, "out of memory packing %lld examples", (long long)n);
        goto done;
    }
    if (shuffle)
        pack_permute(seed, PACK_STREAM_SHUFFLE, n, order);
    else
        for (int64_t i = 0; i < n; i++) order[i] = i;

    int64_t n_rows = 0;
    if ((sample_packing & DATASET_PACK) && (sample_packing & DATASET_PACK_SEQUENTIAL)) {
        /* Next-fit in order (axolotl's allocate_sequentially): an example that
         * does not fit the current row's free space opens the next row. */
        int32_t used = seq_len;
        for (int64_t k = 0; k < n; k++) {
            int32_t need = ex->v[order[k]].n;
            if (used + need > seq_len) {
                n_rows++;
                used = 0;
            }
            row_of[order[k]] = n_rows - 1;
            off_of[order[k]] = used;
            used += need;
        }
    } else if (sample_packing & DATASET_PACK) {
        /* Max-segment tree over the free space of rows 0..P-1 (n rows always
         * suffice); descend to the leftmost leaf with enough room. */
        int64_t P = 1;
        while (P < n) P <<= 1;
        tree = malloc((size_t)(2 * P) * sizeof *tree);
        if (!tree) {
            qerr_set(e, "out of memory packing %lld examples", (long long)n);
            goto done;
        }
        for (int64_t i = 0; i < P; i++) tree[P + i] = seq_len;
        for (int64_t i = P - 1; i >= 1; i--) tree[i] = tree[2 * i] > tree[2 * i + 1] ? tree[2 * i] : tree[2 * i + 1];
        for (int64_t k = 0; k < n; k++) {
            int32_t need = ex->v[order[k]].n;
            int64_t node = 1;
            while (node < P) node = tree[2 * node] >= need ? 2 * node : 2 * node + 1;
            int64_t row = node - P;
            row_of[order[k]] = row;
            off_of[order[k]] = seq_len - tree[node];
            tree[node] -= need;
            for (node >>= 1; node >= 1; node >>= 1)
                tree[node] = tree[2 * node] > tree[2 * node + 1] ? tree[2 * node] : tree[2 * node + 1];
            if (row + 1 > n_rows) n_rows = row + 1;
        }
    } else {
        for (int64_t k = 0; k < n; k++) {
            row_of[order[k]] = k;
            off_of[order[k]] = 0;
        }
        n_rows = n;
    }

    size_t cells = (size_t)n_rows * (size_t)seq_len;
    out->n_rows = n_rows;
    out->input_ids = malloc(cells * sizeof(int32_t));
    out->targets = malloc(cells * sizeof(int32_t));
    out->position_ids = malloc(cells * sizeof(int32_t));
    out->seq_ids = malloc(cells * sizeof(int32_t));
    row_cnt = calloc((size_t)n_rows, sizeof *row_cnt);
    if (!out->input_ids || !out->targets || !out->position_ids || !out->seq_ids || !row_cnt) {
        qerr_set(e, "out of memory allocating %lld packed rows of %d tokens", (long long)n_rows, seq_len);
        goto done;
    }
    for (size_t c = 0; c < cells; c++) {
        out->input_ids[c] = pad_id;
        out->targets[c] = PACK_IGNORE;
        out->position_ids[c] = 0;
        out->seq_ids[c] = -1;
    }
    int64_t n_tok = 0, n_tgt = 0;
    /* Visit examples in placement order so seq_ids count left to right. */
    for (int64_t k = 0; k < n; k++) {
        const dataset_example *x = &ex->v[order[k]];
        int64_t row = row_of[order[k]];
        size_t base = (size_t)row * (size_t)seq_len + (size_t)off_of[order[k]];
        int32_t sid = row_cnt[row]++;
        for (int32_t p = 0; p < x->n; p++) {
            out->input_ids[base + p] = x->ids[p];
            out->position_ids[base + p] = p;
            out->seq_ids[base + p] = sid;
            if (p + 1 < x->n && x->mask[p + 1]) {
                out->targets[base + p] = x->ids[p + 1];
                n_tgt++;
            }
        }
        n_tok += x->n;
    }
    out->n_target_tokens = n_tgt;
    if (st) {
        st->n_examples += n;
        st->n_tokens += n_tok;
        st->n_trained += n_tgt;
        st->n_rows += n_rows;
        st->n_pad += (int64_t)cells - n_tok;
    }
    rc = 0;
done:
    if (rc) {
        packed_set_free(out);
        out->seq_len = seq_len;
    }
    free(order);
    free(row_of);
    free(off_of);
    free(tree);
    free(row_cnt);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* label-mask view                                                           */

static int pack_decode_run(const tokenizer *tok, const int32_t *ids, int32_t n, int masked, strbuf *b, qerr *e) {
    char *txt;
    size_t len;
    if (tokenizer_decode(tok, ids, (size_t)n, &txt, &len, e)) return -1;
    if (masked) strbuf_puts(b, "[[");
    strbuf_put(b, txt, len);
    if (masked) strbuf_puts(b, "]]");
    free(txt);
    return 0;
}

/* Token t of the example starting at a is masked unless position t-1 predicts it. */
static int pack_is_masked(const int32_t *tg, int a, int t) { return !(t > a && tg[t - 1] != -100); }

int dataset_row_describe(const tokenizer *tok, const packed_set *set, int64_t row, char **out, qerr *e) {
    *out = NULL;
    if (row < 0 || row >= set->n_rows)
        return qerr_set(e, "dataset_row_describe: row %lld outside [0, %lld)", (long long)row, (long long)set->n_rows);
    int L = set->seq_len;
    const int32_t *ids = set->input_ids + (size_t)row * L, *tg = set->targets + (size_t)row * L;
    const int32_t *sq = set->seq_ids + (size_t)row * L;
    strbuf b = {0};
    int n_pad = 0;
    for (int a = 0; a < L;) {
        if (sq[a] < 0) {
            n_pad++;
            a++;
            continue;
        }
        int z = a;
        while (z < L && sq[z] == sq[a]) z++;
        int trained = 0;
        for (int t = a; t < z; t++) trained += tg[t] != -100;
        strbuf_printf(&b, "--- example %d: %d tokens, %d trained ---\n", sq[a], z - a, trained);
        /* token t is trained on iff the position before it predicts it */
        for (int t = a; t < z;) {
            int m = pack_is_masked(tg, a, t);
            int u = t;
            while (u < z && pack_is_masked(tg, a, u) == m) u++;
            if (pack_decode_run(tok, ids + t, u - t, m, &b, e)) goto fail;
            t = u;
        }
        strbuf_puts(&b, "\n");
        a = z;
    }
    strbuf_printf(&b, "--- padding: %d positions ---\n", n_pad);
    if (b.oom) {
        qerr_set(e, "out of memory");
        goto fail;
    }
    *out = b.p;
    return 0;
fail:
    free(b.p);
    return -1;
}
