/* trainer/preprocess.c — data statistics and the label-mask view (see preprocess.h). */
#include "trainer/preprocess.h"

#include <stdlib.h>
#include <string.h>

#include "data/dataset.h"
#include "data/stream.h"
#include "data/tokenizer.h"
#include "model/base.h"

/* One token as axolotl's debug view prints it: text(label) with the label
 * as HF's `labels` holds it (the token id, or -100 when not trained on). */
static int print_token(const tokenizer *tok, int32_t id, int32_t label, int color, FILE *out, qerr *e) {
    char *text;
    size_t len;
    if (tokenizer_decode(tok, &id, 1, &text, &len, e)) return -1;
    if (color) fputs(label == -100 ? "\033[31m" : "\033[32m", out);
    for (size_t i = 0; i < len; i++) {
        unsigned char ch = (unsigned char)text[i];
        if (ch == '\n') fputs("\\n", out);
        else if (ch == '\t') fputs("\\t", out);
        else if (ch == '\r') fputs("\\r", out);
        else if (ch < 0x20) fprintf(out, "\\x%02x", ch);
        else fputc(ch, out);
    }
    fprintf(out, "(%d, %d)", id, label);
    if (color) fputs("\033[0m", out);
    fputc(' ', out);
    free(text);
    return 0;
}

static int show_tokens(const tokenizer *tok, const packed_set *ps, int64_t row, int color, FILE *out, qerr *e) {
    int L = ps->seq_len;
    const int32_t *ids = ps->input_ids + (size_t)row * L, *tg = ps->targets + (size_t)row * L,
                  *sq = ps->seq_ids + (size_t)row * L;
    int n_pad = 0;
    for (int a = 0; a < L;) {
        if (sq[a] < 0) {
            n_pad++;
            a++;
            continue;
        }
        int z = a, trained = 0;
        while (z < L && sq[z] == sq[a]) z++;
        for (int t = a; t < z; t++) trained += tg[t] != -100;
        fprintf(out, "--- example %d: %d tokens, %d trained ---\n", sq[a], z - a, trained);
        for (int t = a; t < z; t++) {
            int32_t label = t > a && tg[t - 1] != -100 ? ids[t] : -100;
            if (print_token(tok, ids[t], label, color, out, e)) return -1;
        }
        fputc('\n', out);
        a = z;
    }
    fprintf(out, "--- padding: %d positions ---\n", n_pad);
    return 0;
}

static const char *tok_text(const void *ctx, int id) { return tokenizer_token_text((const tokenizer *)ctx, id); }

int preprocess_show(const train_config *c, int n_rows, int eval, preprocess_view view, int color, FILE *out,
                    qerr *e) {
    const char *cfgname = c->config_path ? c->config_path : "config";
    base_model *b = NULL;
    if (base_model_open(c->base_model, &b, e)) return qerr_prefix(e, "%s: base_model", cfgname);
    tokenizer *tok = NULL;
    int rc = -1;
    packed_set train_set, eval_set;
    memset(&train_set, 0, sizeof train_set);
    memset(&eval_set, 0, sizeof eval_set);
    dataset_spec *specs = calloc((size_t)c->n_datasets + 1, sizeof *specs);
    dataset_spec *tspecs = calloc((size_t)c->n_test_datasets + 1, sizeof *tspecs);
    int64_t *perm = NULL;
    int ns = 0, nts = 0;
    if (!specs || !tspecs) {
        qerr_set(e, "out of memory");
        goto done;
    }
    if (base_model_tokenizer(b, &tok, e)) goto done;
    free(specs);
    free(tspecs);
    specs = tspecs = NULL;
    if (train_config_dataset_specs(c, 0, &specs, &ns, e) || train_config_dataset_specs(c, 1, &tspecs, &nts, e))
        goto done;
    if (train_config_check_special_tokens(c, tokenizer_bos_id(tok), tokenizer_eos_id(tok), tokenizer_unk_id(tok), tok_text, tok, e))
        goto done;
    dataset_skip_log notes = {0};
    for (int i = 0; i < ns; i++) specs[i].skipped = &notes;
    dataset_stats st;
    if (c->pretraining_path) {
        /* pretraining_dataset: the first rows of the stream (data/stream.h), as qlora-train takes them;
         * the held-out set is test_datasets */
        dataset_stats tst;
        memset(&st, 0, sizeof st);
        memset(&tst, 0, sizeof tst);
        if (nts > 0 && dataset_build(tok, tspecs, nts, NULL, 0, 0.0, c->sequence_len,
                                     train_config_pack_mode(c) | DATASET_PACK_IN_ORDER, c->train_on_inputs,
                                     train_config_data_seed(c), &eval_set, &train_set, &tst, e)) {
            qerr_prefix(e, "%s: test_datasets", cfgname);
            goto done;
        }
        st.eval = tst.train;
        packed_set_free(&train_set);
        pretrain_stream *ps_ = NULL;
        pretrain_spec sp = {c->pretraining_path, c->pretraining_text_column, c->pretraining_skip};
        int want = n_rows > 0 ? n_rows : 1;
        if (pretrain_stream_open(tok, &sp, c->sequence_len, c->streaming_multipack_buffer_size, 200,
                                 train_config_data_seed(c), &ps_, e) ||
            pretrain_stream_next(ps_, want, &train_set, e)) {
            pretrain_stream_close(ps_);
            qerr_prefix(e, "%s", cfgname);
            goto done;
        }
        pretrain_stream_close(ps_);
        fprintf(out, "[data] train: streamed from %s (pretraining_dataset): the first %d rows; every filled position "
                     "but a row's last is trained, a window's first token too (the window before predicts it, as in "
                     "axolotl)\n", c->pretraining_path, want);
    } else if (dataset_build(tok, specs, ns, tspecs, nts, c->val_set_size, c->sequence_len,
                             train_config_pack_mode(c), c->train_on_inputs, train_config_data_seed(c), &train_set,
                             &eval_set, &st, e)) {
        qerr_prefix(e, "%s: datasets", cfgname);
        goto done;
    }
    if (notes.note[0]) fprintf(out, "[data] datasets: %s\n", notes.note);
    const dataset_split_stats *ss[2] = {&st.train, &st.eval};
    static const char *const nm[2] = {"train", "held-out"};
    for (int s = c->pretraining_path ? 1 : 0; s < 2; s++)
        fprintf(out,
                "[data] %s: %lld records -> %lld examples (%lld chunked, %lld truncated, %lld dropped: nothing to "
                "learn) -> %lld rows of %d tokens; %lld tokens, %lld trained on (%.1f%%), %lld padding\n",
                nm[s], (long long)ss[s]->n_docs, (long long)ss[s]->n_examples, (long long)ss[s]->n_chunked,
                (long long)ss[s]->n_truncated, (long long)ss[s]->n_dropped, (long long)ss[s]->n_rows,
                c->sequence_len, (long long)ss[s]->n_tokens, (long long)ss[s]->n_trained,
                ss[s]->n_tokens ? 100.0 * (double)ss[s]->n_trained / (double)ss[s]->n_tokens : 0.0,
                (long long)ss[s]->n_pad);
    const packed_set *ps = eval ? &eval_set : &train_set;
    if (n_rows > ps->n_rows) n_rows = (int)ps->n_rows;
    if (n_rows > 0) {
        perm = malloc((size_t)ps->n_rows * sizeof *perm);
        if (!perm) {
            qerr_set(e, "out of memory");
            goto done;
        }
        if (eval)
            for (int64_t i = 0; i < ps->n_rows; i++) perm[i] = i;
        else
            dataset_rows_order(ps, train_config_data_seed(c), 0, perm);
        fprintf(out, "[data] first %d %s rows in %s order; %s\n", n_rows, nm[eval],
                eval ? "evaluation" : "epoch-1 training",
                view == PREPROCESS_TOKENS ? "each token as text(id, label), label -100 = not trained on"
                                          : "tokens NOT trained on are inside [[ ]]");
    }
    for (int i = 0; i < n_rows; i++) {
        fprintf(out, "=== row %lld (%d of %d) ===\n", (long long)perm[i], i + 1, n_rows);
        if (view == PREPROCESS_TOKENS) {
            if (show_tokens(tok, ps, perm[i], color, out, e)) goto done;
        } else {
            char *s;
            if (dataset_row_describe(tok, ps, perm[i], &s, e)) goto done;
            fputs(s, out);
            free(s);
        }
    }
    rc = 0;
done:
    free(perm);
    train_config_dataset_specs_free(specs, ns);
    train_config_dataset_specs_free(tspecs, nts);
    packed_set_free(&train_set);
    packed_set_free(&eval_set);
    tokenizer_free(tok);
    base_model_close(b);
    return rc;
}
