/* data/stream.c — axolotl's pretraining_dataset: lazy JSONL reading,
 * windows, buffer-wise first-fit packing (data/stream.h). */
#include "data/stream.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/hash.h"
#include "core/rng.h"

#define STREAM_PERM 0x5354524541ull /* "STREA": the permutation of one buffer */
#define STREAM_IGNORE (-100)
#define STREAM_MAX_LINE (64u << 20) /* a longer JSON line is refused */

/* ------------------------------------------------------------------------ */
/* windows                                                                    */

static int push_window(dataset_examples *out, const int32_t *pre, int npre, const int32_t *body, int nb,
                       const int32_t *post, int npost, qerr *e) {
    int n = npre + nb + npost;
    if (n < 2) return 0; /* filter_sequences_by_length: min_sequence_len 2 */
    dataset_example *x = dataset_examples_push_new(out, n, e);
    if (!x) return -1;
    memcpy(x->ids, pre, (size_t)npre * sizeof *pre);
    if (nb) memcpy(x->ids + npre, body, (size_t)nb * sizeof *body);
    memcpy(x->ids + npre + nb, post, (size_t)npost * sizeof *post);
    memset(x->mask, 1, (size_t)n);
    x->doc = out->n - 1;
    return 0;
}

int pretrain_windows(const tokenizer *tok, const char *text, size_t len, int seq_len, dataset_examples *out,
                     qerr *e) {
    int32_t pre[1], post[2];
    int npre = 0, npost = 0;
    int32_t bos = tokenizer_bos_id(tok), eos = tokenizer_eos_id(tok);
    if (eos < 0) return qerr_set(e, "pretraining_dataset: the tokenizer has no eos token (axolotl appends it)");
    if (tokenizer_add_bos(tok) && bos >= 0) pre[npre++] = bos;
    if (tokenizer_add_eos(tok)) post[npost++] = eos; /* the tokenizer's post-processor */
    post[npost++] = eos;                              /* axolotl's: seq + [eos_token_id] */
    int max_length = seq_len - 1;                     /* truncation max_length = sequence_len - 1 */
    int stride = 256 < (max_length - 1) / 2 ? 256 : (max_length - 1) / 2;
    int W = max_length - (npost - 1) - npre; /* tokens of text per window */
    if (stride < 0) stride = 0;
    if (W <= stride)
        return qerr_set(e, "pretraining_dataset: sequence_len %d leaves %d text tokens per window, not more than "
                           "the stride %d (HF's tokenizer refuses it too)", seq_len, W, stride);
    tokenizer_ids ids = {0};
    if (tokenizer_encode(tok, text, len, 1, &ids, e)) return -1;
    int rc = 0;
    int64_t n = (int64_t)ids.n, step = W - stride;
    for (int64_t s = 0;; s += step) {
        int64_t stop = s + W < n ? s + W : n;
        if ((rc = push_window(out, pre, npre, ids.ids + s, (int)(stop - s), post, npost, e))) break;
        if (stop == n) break;
    }
    tokenizer_ids_free(&ids);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* packing                                                                    */

static int alloc_rows(packed_set *p, int64_t n_rows, int seq_len, qerr *e) {
    size_t cells = (size_t)n_rows * (size_t)seq_len;
    p->n_rows = n_rows;
    p->seq_len = seq_len;
    p->input_ids = malloc(cells * sizeof(int32_t) + 1);
    p->targets = malloc(cells * sizeof(int32_t) + 1);
    p->position_ids = malloc(cells * sizeof(int32_t) + 1);
    p->seq_ids = malloc(cells * sizeof(int32_t) + 1);
    if (!p->input_ids || !p->targets || !p->position_ids || !p->seq_ids) {
        packed_set_free(p);
        return qerr_set(e, "out of memory (%lld rows of %d tokens)", (long long)n_rows, seq_len);
    }
    return 0;
}

int pretrain_pack(const dataset_examples *w, const int64_t *order, int seq_len, int bin_size, int32_t pad_id,
                  packed_set *out, qerr *e) {
    memset(out, 0, sizeof *out);
    out->seq_len = seq_len;
    int64_t n = w->n;
    for (int64_t i = 0; i < n; i++)
        if (w->v[i].n > seq_len)
            return qerr_set(e, "pretrain_pack: window %lld has %d tokens (sequence_len %d)", (long long)i, w->v[i].n,
                            seq_len);
    if (n == 0) return 0;
    /* first-fit over the rows in the order they were opened (pack_group) */
    int64_t *row_of = malloc((size_t)n * sizeof *row_of);
    int32_t *off_of = malloc((size_t)n * sizeof *off_of);
    int32_t *used = malloc((size_t)n * sizeof *used), *count = malloc((size_t)n * sizeof *count);
    int rc = -1;
    if (!row_of || !off_of || !used || !count) {
        qerr_set(e, "out of memory packing %lld windows", (long long)n);
        goto done;
    }
    int64_t n_rows = 0;
    for (int64_t k = 0; k < n; k++) {
        int32_t need = w->v[order[k]].n;
        int64_t r = 0;
        while (r < n_rows && !(seq_len - used[r] >= need && count[r] < bin_size)) r++;
        if (r == n_rows) {
            used[r] = 0;
            count[r] = 0;
            n_rows++;
        }
        row_of[k] = r;
        off_of[k] = used[r];
        used[r] += need;
        count[r]++;
    }
    if (alloc_rows(out, n_rows, seq_len, e)) goto done;
    size_t cells = (size_t)n_rows * (size_t)seq_len;
    for (size_t c = 0; c < cells; c++) {
        out->input_ids[c] = pad_id;
        out->targets[c] = STREAM_IGNORE;
        out->position_ids[c] = 0;
        out->seq_ids[c] = -1;
    }
    for (int64_t r = 0; r < n_rows; r++) count[r] = 0;
    for (int64_t k = 0; k < n; k++) { /* placement order: seq ids count left to right */
        const dataset_example *x = &w->v[order[k]];
        size_t base = (size_t)row_of[k] * (size_t)seq_len + (size_t)off_of[k];
        int32_t sid = count[row_of[k]]++;
        memcpy(out->input_ids + base, x->ids, (size_t)x->n * sizeof(int32_t));
        for (int32_t p = 0; p < x->n; p++) {
            out->position_ids[base + p] = p;
            out->seq_ids[base + p] = sid;
        }
    }
    /* labels = input_ids, shifted by HF's loss: each filled position but a row's last predicts the next */
    int64_t n_tgt = 0;
    for (int64_t r = 0; r < n_rows; r++) {
        size_t b = (size_t)r * (size_t)seq_len;
        for (int32_t t = 0; t + 1 < used[r]; t++) {
            out->targets[b + t] = out->input_ids[b + t + 1];
            n_tgt++;
        }
    }
    out->n_target_tokens = n_tgt;
    rc = 0;
done:
    free(row_of);
    free(off_of);
    free(used);
    free(count);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* the stream                                                                 */

struct pretrain_stream {
    const tokenizer *tok;
    char *path, *text_column;
    int64_t skip;
    int seq_len, buffer_records, bin_size;
    uint64_t seed;
    int32_t pad;
    FILE *f;
    char *line;
    size_t line_cap;
    int64_t line_no;        /* lines read in this pass */
    int epoch;              /* the pass the current buffer came from */
    int64_t buffer_index;   /* buffers read in this pass */
    int64_t rows_this_pass; /* rows the pass has given so far */
    packed_set cur;         /* the current buffer's rows */
    int64_t cur_pos;        /* its next row */
    int64_t rows_out;
    xxh64_state fp;
};

int pretrain_stream_open(const tokenizer *tok, const pretrain_spec *spec, int seq_len, int buffer_records,
                         int bin_size, uint64_t seed, pretrain_stream **out, qerr *e) {
    *out = NULL;
    if (seq_len < 2 || buffer_records < 1 || bin_size < 1)
        return qerr_set(e, "pretrain_stream_open: sequence_len %d, buffer %d, bin_size %d out of range", seq_len,
                        buffer_records, bin_size);
    pretrain_stream *s = calloc(1, sizeof *s);
    if (!s) return qerr_set(e, "out of memory");
    s->tok = tok;
    s->path = strdup(spec->path);
    s->text_column = strdup(spec->text_column ? spec->text_column : "text");
    s->skip = spec->skip > 0 ? spec->skip : 0;
    s->seq_len = seq_len;
    s->buffer_records = buffer_records;
    s->bin_size = bin_size;
    s->seed = seed;
    s->pad = tokenizer_pad_id(tok) >= 0 ? tokenizer_pad_id(tok) : tokenizer_eos_id(tok) >= 0 ? tokenizer_eos_id(tok) : 0;
    xxh64_init(&s->fp, 0);
    if (!s->path || !s->text_column) {
        pretrain_stream_close(s);
        return qerr_set(e, "out of memory");
    }
    if (!(s->f = fopen(s->path, "rb"))) {
        qerr_set(e, "pretraining_dataset: cannot open %s: %s", spec->path, strerror(errno));
        pretrain_stream_close(s);
        return -1;
    }
    *out = s;
    return 0;
}

void pretrain_stream_close(pretrain_stream *s) {
    if (!s) return;
    if (s->f) fclose(s->f);
    free(s->line);
    free(s->path);
    free(s->text_column);
    packed_set_free(&s->cur);
    free(s);
}

int64_t pretrain_stream_rows(const pretrain_stream *s) { return s->rows_out; }
int pretrain_stream_epoch(const pretrain_stream *s) { return s->epoch; }
uint64_t pretrain_stream_fingerprint(const pretrain_stream *s) { return xxh64_digest(&s->fp); }

/* The next record's text into the windows; 1 at the end of the file, 0 after a record, -1 on error. */
static int read_record(pretrain_stream *s, dataset_examples *w, qerr *e) {
    for (;;) {
        errno = 0;
        ssize_t n = getline(&s->line, &s->line_cap, s->f);
        if (n < 0) {
            if (ferror(s->f)) return qerr_set(e, "pretraining_dataset: %s: read error: %s", s->path, strerror(errno));
            return 1;
        }
        s->line_no++;
        if ((size_t)n > STREAM_MAX_LINE)
            return qerr_set(e, "%s:%lld: a line of %zd bytes (more than %u MiB)", s->path, (long long)s->line_no, n,
                            STREAM_MAX_LINE >> 20);
        size_t k = 0;
        while (k < (size_t)n && (s->line[k] == ' ' || s->line[k] == '\t' || s->line[k] == '\r' || s->line[k] == '\n'))
            k++;
        if (k == (size_t)n) continue; /* a blank line is no record */
        cJSON *o = cJSON_ParseWithLength(s->line, (size_t)n);
        if (!o || !cJSON_IsObject(o)) {
            cJSON_Delete(o);
            return qerr_set(e, "%s:%lld: %s", s->path, (long long)s->line_no,
                            o ? "expected a JSON object" : "invalid JSON");
        }
        const cJSON *t = cJSON_GetObjectItemCaseSensitive(o, s->text_column);
        if (!cJSON_IsString(t)) {
            cJSON_Delete(o);
            return qerr_set(e, "%s:%lld: \"%s\" is missing or not a string (pretraining_dataset text_column)", s->path,
                            (long long)s->line_no, s->text_column);
        }
        int rc = pretrain_windows(s->tok, t->valuestring, strlen(t->valuestring), s->seq_len, w, e);
        cJSON_Delete(o);
        return rc ? qerr_prefix(e, "%s:%lld", s->path, (long long)s->line_no) : 0;
    }
}

/* Read the next buffer of records and pack it into s->cur; 1 when the pass has ended with no record. */
static int refill(pretrain_stream *s, qerr *e) {
    packed_set_free(&s->cur);
    s->cur_pos = 0;
    dataset_examples w = {0};
    int64_t records = 0;
    int rc = 0;
    if (s->line_no == 0 && s->buffer_index == 0) /* axolotl's skip: the first records of every pass */
        for (int64_t k = 0; k < s->skip && rc == 0; k++) {
            dataset_examples dropped = {0};
            rc = read_record(s, &dropped, e);
            dataset_examples_free(&dropped);
        }
    if (rc < 0) return -1;
    if (rc == 1) return 1;
    while (records < s->buffer_records && (rc = read_record(s, &w, e)) == 0) records++;
    if (rc < 0) {
        dataset_examples_free(&w);
        return -1;
    }
    if (records == 0) {
        dataset_examples_free(&w);
        return 1;
    }
    int64_t *order = malloc((size_t)(w.n > 0 ? w.n : 1) * sizeof *order);
    if (!order) {
        dataset_examples_free(&w);
        return qerr_set(e, "out of memory");
    }
    /* RandomSampler over the buffer's windows: a Fisher-Yates permutation from (seed, epoch, buffer) */
    uint64_t stream = STREAM_PERM ^ ((uint64_t)(uint32_t)s->epoch << 40) ^ (uint64_t)s->buffer_index << 8;
    for (int64_t i = 0; i < w.n; i++) order[i] = i;
    for (int64_t i = w.n - 1; i > 0; i--) {
        int64_t j = (int64_t)(rng_u64(s->seed, stream, (uint64_t)i) % (uint64_t)(i + 1));
        int64_t t = order[i];
        order[i] = order[j];
        order[j] = t;
    }
    s->buffer_index++;
    rc = pretrain_pack(&w, order, s->seq_len, s->bin_size, s->pad, &s->cur, e);
    free(order);
    dataset_examples_free(&w);
    return rc;
}

int pretrain_stream_next(pretrain_stream *s, int64_t n, packed_set *out, qerr *e) {
    const int L = s->seq_len;
    if (!out->input_ids) {
        memset(out, 0, sizeof *out);
        if (alloc_rows(out, n, L, e)) return -1;
    } else if (out->n_rows != n || out->seq_len != L) {
        return qerr_set(e, "pretrain_stream_next: %lld rows of %d asked into a set of %lld rows of %d", (long long)n,
                        L, (long long)out->n_rows, out->seq_len);
    }
    out->n_target_tokens = 0;
    for (int64_t i = 0; i < n; i++) {
        while (s->cur_pos >= s->cur.n_rows) {
            int rc = refill(s, e);
            if (rc < 0) return -1;
            if (rc == 1) { /* the end of the file: the next pass */
                if (s->rows_this_pass == 0)
                    return qerr_set(e, "pretraining_dataset: %s gives no training row (no record with a non-empty "
                                       "\"%s\" after skip %lld)", s->path, s->text_column, (long long)s->skip);
                if (fseek(s->f, 0, SEEK_SET))
                    return qerr_set(e, "pretraining_dataset: %s: cannot rewind: %s", s->path, strerror(errno));
                clearerr(s->f);
                s->epoch++;
                s->line_no = 0;
                s->buffer_index = 0;
                s->rows_this_pass = 0;
            }
        }
        size_t src = (size_t)s->cur_pos * (size_t)L, dst = (size_t)i * (size_t)L;
        memcpy(out->input_ids + dst, s->cur.input_ids + src, (size_t)L * sizeof(int32_t));
        memcpy(out->targets + dst, s->cur.targets + src, (size_t)L * sizeof(int32_t));
        memcpy(out->position_ids + dst, s->cur.position_ids + src, (size_t)L * sizeof(int32_t));
        memcpy(out->seq_ids + dst, s->cur.seq_ids + src, (size_t)L * sizeof(int32_t));
        for (int t = 0; t < L; t++) out->n_target_tokens += out->targets[dst + t] != STREAM_IGNORE;
        xxh64_update(&s->fp, out->input_ids + dst, (size_t)L * sizeof(int32_t));
        xxh64_update(&s->fp, out->targets + dst, (size_t)L * sizeof(int32_t));
        xxh64_update(&s->fp, out->position_ids + dst, (size_t)L * sizeof(int32_t));
        xxh64_update(&s->fp, out->seq_ids + dst, (size_t)L * sizeof(int32_t));
        s->cur_pos++;
        s->rows_this_pass++;
        s->rows_out++;
    }
    return 0;
}
