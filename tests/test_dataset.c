/* tests/test_dataset.c — data/dataset: formats, masks, packing, split, errors.
 *
 * Uses the real SmolLM2 tokenizer (models/SmolLM2-135M-Instruct.Q4_1.gguf,
 * `make model`) and small JSONL files written into a mkdtemp directory.
 * Expected strings are the ones SmolLM2's chat template and axolotl's Alpaca
 * prompter produce (docs/formats.md §6; axolotl prompters.py).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <sys/stat.h>

#include <cmocka.h>

#include "data/dataset.h"

#define MODEL_PATH "models/SmolLM2-135M-Instruct.Q4_1.gguf"
#define SMOL_SYSTEM "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"

typedef struct fixture {
    tokenizer *tok;
    char dir[64];
} fixture;

/* A missing model does not abort the group: every test that needs the
 * tokenizer fails on its own with the hint (so the runner counts failures). */
static int setup(void **state) {
    fixture *fx = calloc(1, sizeof *fx);
    if (!fx) return -1;
    snprintf(fx->dir, sizeof fx->dir, "/tmp/qlora_ds_XXXXXX");
    if (!mkdtemp(fx->dir)) {
        free(fx);
        return -1;
    }
    *state = fx;
    if (access(MODEL_PATH, R_OK) != 0) return 0;
    gguf_file *f = NULL;
    qerr e = {{0}};
    if (gguf_open(MODEL_PATH, &f, &e) || tokenizer_load_gguf(f, &fx->tok, &e)) {
        fprintf(stderr, "%s\n", e.msg);
        fx->tok = NULL;
    }
    gguf_close(f);
    return 0;
}

static int teardown(void **state) {
    fixture *fx = *state;
    if (!fx) return 0;
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", fx->dir);
    int rc = system(cmd);
    tokenizer_free(fx->tok);
    free(fx);
    return rc == 0 ? 0 : -1;
}

static fixture *need_model(void **state) {
    fixture *fx = *state;
    if (!fx->tok) fail_msg("%s is missing or unreadable: run `make model` first", MODEL_PATH);
    return fx;
}

/* Writes `content` to dir/name; returns a static path buffer (copy it if needed). */
static char *write_jsonl(const fixture *fx, const char *name, const char *content) {
    static char path[4][256];
    static int k;
    char *p = path[k++ % 4];
    snprintf(p, 256, "%s/%s", fx->dir, name);
    FILE *fp = fopen(p, "wb");
    assert_non_null(fp);
    fputs(content, fp);
    fclose(fp);
    return p;
}

static char *decode(const tokenizer *tok, const int32_t *ids, size_t n) {
    char *s;
    size_t len;
    qerr e = {{0}};
    if (tokenizer_decode(tok, ids, n, &s, &len, &e)) fail_msg("%s", e.msg);
    return s;
}

static int32_t count_tokens(const tokenizer *tok, const char *text) {
    tokenizer_ids v = {0};
    qerr e = {{0}};
    if (tokenizer_encode(tok, text, strlen(text), 1, &v, &e)) fail_msg("%s", e.msg);
    int32_t n = (int32_t)v.n;
    tokenizer_ids_free(&v);
    return n;
}

/* Decoded text of the tokens whose mask is 1. */
static char *decode_trained(const tokenizer *tok, const dataset_example *x) {
    int32_t *ids = malloc((size_t)x->n * sizeof *ids);
    size_t k = 0;
    for (int32_t i = 0; i < x->n; i++)
        if (x->mask[i]) ids[k++] = x->ids[i];
    char *s = decode(tok, ids, k);
    free(ids);
    return s;
}

static void read_ok(const fixture *fx, dataset_spec *spec, int train_on_inputs, dataset_examples *docs) {
    qerr e = {{0}};
    if (dataset_read_jsonl(fx->tok, spec, train_on_inputs, docs, &e)) fail_msg("%s", e.msg);
}

/* ---- completion ---------------------------------------------------------- */

static void test_completion_chunking(void **state) {
    fixture *fx = need_model(state);
    char text[4096] = "";
    for (int i = 0; i < 40; i++) strcat(text, "The quick brown fox jumps over the lazy dog. ");
    char line[4200];
    snprintf(line, sizeof line, "{\"text\": \"%s\"}\n\n{\"text\": \"short one\"}\n", text);
    dataset_spec spec = {write_jsonl(fx, "c.jsonl", line), "completion", NULL, NULL, 0, NULL, .split = NULL};
    dataset_examples docs = {0};
    read_ok(fx, &spec, 0, &docs);
    assert_int_equal(docs.n, 2);
    int32_t nt = count_tokens(fx->tok, text) + 1; /* + eos, no bos for SmolLM2 */
    assert_int_equal(docs.v[0].n, nt);
    assert_int_equal(docs.v[0].ids[nt - 1], tokenizer_eos_id(fx->tok));
    for (int32_t i = 0; i < nt; i++) assert_int_equal(docs.v[0].mask[i], 1);
    char *back = decode(fx->tok, docs.v[0].ids, (size_t)nt - 1);
    assert_string_equal(back, text);
    free(back);

    const int L = 64;
    dataset_examples ex = {0};
    dataset_split_stats st = {0};
    qerr e = {{0}};
    assert_int_equal(dataset_fit(&docs, NULL, L, &ex, &st, &e), 0);
    int32_t n_chunks = (nt + L - 1) / L;
    /* a final chunk of one token has no target and is dropped */
    int32_t expect = (nt % L == 1) ? n_chunks - 1 : n_chunks;
    assert_int_equal(ex.n, expect + 1);
    assert_int_equal(st.n_chunked, 1);
    assert_int_equal(st.n_docs, 2);
    /* consecutive chunks reassemble the document */
    int32_t pos = 0;
    for (int64_t k = 0; k < expect; k++) {
        assert_int_equal(ex.v[k].doc, 0);
        assert_true(ex.v[k].n == L || k == expect - 1);
        assert_memory_equal(ex.v[k].ids, docs.v[0].ids + pos, (size_t)ex.v[k].n * sizeof(int32_t));
        pos += ex.v[k].n;
    }
    assert_int_equal(ex.v[expect].doc, 1);

    packed_set ps;
    assert_int_equal(dataset_pack(&ex, L, 0, tokenizer_pad_id(fx->tok), 0, 1, &ps, NULL, &e), 0);
    assert_int_equal(ps.n_rows, ex.n);
    /* row 0 is a full chunk: every position but the last predicts the next token */
    for (int t = 0; t < L - 1; t++) assert_int_equal(ps.targets[t], ps.input_ids[t + 1]);
    assert_int_equal(ps.targets[L - 1], -100);
    packed_set_free(&ps);
    dataset_examples_free(&ex);
    dataset_examples_free(&docs);
}

/* ---- alpaca -------------------------------------------------------------- */

static void check_alpaca(fixture *fx, int train_on_inputs) {
    const char *jsonl =
        "{\"instruction\": \"Name a primary color.\", \"input\": \"\", \"output\": \"Red is a primary color.\"}\n"
        "{\"instruction\": \"Add the numbers.\", \"input\": \"2 and 3\", \"output\": \"The sum is 5.\"}\n";
    const char *prompt0 =
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nName a primary color.\n\n### Response:\n";
    const char *prompt1 =
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nAdd the numbers.\n\n"
        "### Input:\n2 and 3\n\n### Response:\n";
    const char *outs[2] = {"Red is a primary color.", "The sum is 5."};
    const char *prompts[2] = {prompt0, prompt1};
    dataset_spec spec = {write_jsonl(fx, "a.jsonl", jsonl), "alpaca", NULL, NULL, 0, NULL, .split = NULL};
    dataset_examples docs = {0};
    read_ok(fx, &spec, train_on_inputs, &docs);
    assert_int_equal(docs.n, 2);
    for (int k = 0; k < 2; k++) {
        const dataset_example *x = &docs.v[k];
        char full[1024];
        snprintf(full, sizeof full, "%s%s", prompts[k], outs[k]);
        char *back = decode(fx->tok, x->ids, (size_t)x->n - 1);
        assert_string_equal(back, full);
        free(back);
        assert_int_equal(x->ids[x->n - 1], tokenizer_eos_id(fx->tok));
        int32_t P = count_tokens(fx->tok, prompts[k]);
        assert_int_equal(x->n, count_tokens(fx->tok, full) + 1);
        for (int32_t i = 0; i < x->n; i++) assert_int_equal(x->mask[i], train_on_inputs || i >= P);

        /* packed (one example per row): exactly which targets are -100 */
        dataset_examples one = {(dataset_example *)x, 1, 1};
        packed_set ps;
        qerr e = {{0}};
        const int L = 128;
        assert_true(x->n <= L);
        assert_int_equal(dataset_pack(&one, L, 0, tokenizer_pad_id(fx->tok), 0, 0, &ps, NULL, &e), 0);
        for (int t = 0; t < L; t++) {
            int32_t want = -100;
            if (t + 1 < x->n && (train_on_inputs || t + 1 >= P)) want = x->ids[t + 1];
            assert_int_equal(ps.targets[t], want);
            assert_int_equal(ps.input_ids[t], t < x->n ? x->ids[t] : tokenizer_pad_id(fx->tok));
            assert_int_equal(ps.seq_ids[t], t < x->n ? 0 : -1);
        }
        assert_int_equal(ps.n_target_tokens, train_on_inputs ? x->n - 1 : x->n - P);
        packed_set_free(&ps);
    }
    dataset_examples_free(&docs);
}

static void test_alpaca_masked(void **state) { check_alpaca(need_model(state), 0); }
static void test_alpaca_train_on_inputs(void **state) { check_alpaca(need_model(state), 1); }

/* ---- chat_template ------------------------------------------------------- */

static void test_chat_template(void **state) {
    fixture *fx = need_model(state);
    const char *jsonl =
        "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi!\"}, {\"role\": \"assistant\", \"content\": \"Hello! "
        "How can I help?\"}, {\"role\": \"user\", \"content\": \"What is 2+2?\"}, {\"role\": \"assistant\", "
        "\"content\": \"2+2 = 4.\"}]}\n"
        "{\"messages\": [{\"role\": \"system\", \"content\": \"Be terse.\"}, {\"role\": \"user\", \"content\": "
        "\"Ping\"}, {\"role\": \"assistant\", \"content\": \"\\n  Pong\"}]}\n";
    dataset_spec spec = {write_jsonl(fx, "chat.jsonl", jsonl), "chat_template", NULL, NULL, 0, NULL, .split = NULL};
    dataset_examples docs = {0};
    read_ok(fx, &spec, 0, &docs);
    assert_int_equal(docs.n, 2);

    /* rendering: SmolLM2's template, default system turn inserted */
    char *s0 = decode(fx->tok, docs.v[0].ids, (size_t)docs.v[0].n);
    assert_string_equal(s0, SMOL_SYSTEM
                        "<|im_start|>user\nHi!<|im_end|>\n"
                        "<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"
                        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                        "<|im_start|>assistant\n2+2 = 4.<|im_end|>\n");
    free(s0);
    char *s1 = decode(fx->tok, docs.v[1].ids, (size_t)docs.v[1].n);
    assert_string_equal(s1, "<|im_start|>system\nBe terse.<|im_end|>\n"
                            "<|im_start|>user\nPing<|im_end|>\n"
                            "<|im_start|>assistant\n\n  Pong<|im_end|>\n");
    free(s1);
    /* ids equal tokenizing the rendered string in one go (parse_special) */
    tokenizer_ids v = {0};
    qerr e = {{0}};
    const char *r1 = "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nPing<|im_end|>\n"
                     "<|im_start|>assistant\n\n  Pong<|im_end|>\n";
    assert_int_equal(tokenizer_encode(fx->tok, r1, strlen(r1), 1, &v, &e), 0);
    assert_int_equal(v.n, docs.v[1].n);
    assert_memory_equal(v.ids, docs.v[1].ids, v.n * sizeof(int32_t));
    tokenizer_ids_free(&v);

    /* masking: only assistant content + <|im_end|> */
    char *t0 = decode_trained(fx->tok, &docs.v[0]);
    assert_string_equal(t0, "Hello! How can I help?<|im_end|>2+2 = 4.<|im_end|>");
    free(t0);
    int32_t im_end = tokenizer_find_token(fx->tok, "<|im_end|>"), im_start = tokenizer_find_token(fx->tok, "<|im_start|>");
    int n_end_trained = 0;
    for (int32_t i = 0; i < docs.v[0].n; i++) {
        if (docs.v[0].ids[i] == im_start) assert_int_equal(docs.v[0].mask[i], 0);
        if (docs.v[0].ids[i] == im_end) n_end_trained += docs.v[0].mask[i];
    }
    assert_int_equal(n_end_trained, 2); /* the two assistant turns' ends, not the system/user ones */
    /* the content starts with "\n  ": the header's "\n" and the content's
     * whitespace share a token, which is trained (it holds content bytes) */
    char *t1 = decode_trained(fx->tok, &docs.v[1]);
    assert_non_null(strstr(t1, "Pong<|im_end|>"));
    assert_null(strstr(t1, "assistant"));
    free(t1);

    /* train_on_inputs: every message's content and end-of-turn token, as axolotl (not the template's
     * headers, nor the default system turn the template adds) */
    dataset_examples all = {0};
    read_ok(fx, &spec, 1, &all);
    char *ta = decode_trained(fx->tok, &all.v[0]);
    assert_string_equal(ta, "Hi!<|im_end|>Hello! How can I help?<|im_end|>What is 2+2?<|im_end|>2+2 = 4.<|im_end|>");
    free(ta);
    dataset_examples_free(&all);

    /* the label-mask view */
    dataset_examples ex = {0};
    assert_int_equal(dataset_fit(&docs, NULL, 256, &ex, NULL, &e), 0);
    packed_set ps;
    assert_int_equal(dataset_pack(&ex, 256, 1, tokenizer_pad_id(fx->tok), 0, 0, &ps, NULL, &e), 0);
    assert_int_equal(ps.n_rows, 1);
    char *view;
    assert_int_equal(dataset_row_describe(fx->tok, &ps, 0, &view, &e), 0);
    assert_non_null(strstr(view, "--- example 0:"));
    assert_non_null(strstr(view, "--- example 1:"));
    assert_non_null(strstr(view, "[[<|im_start|>system\n"));
    assert_non_null(strstr(view, "assistant\n]]Hello! How can I help?<|im_end|>[[\n<|im_start|>user"));
    free(view);
    packed_set_free(&ps);
    dataset_examples_free(&ex);

    /* truncation of a chat example is counted */
    dataset_split_stats st = {0};
    assert_int_equal(dataset_fit(&docs, NULL, 40, &ex, &st, &e), 0);
    assert_int_equal(st.n_truncated, 1);
    assert_int_equal(st.n_dropped, 0);
    assert_int_equal(ex.n, 2);
    assert_int_equal(ex.v[0].n, 40);
    dataset_examples_free(&ex);
    /* cut before any assistant token: nothing to learn, dropped */
    memset(&st, 0, sizeof st);
    assert_int_equal(dataset_fit(&docs, NULL, 12, &ex, &st, &e), 0);
    assert_int_equal(st.n_truncated, 2);
    assert_int_equal(st.n_dropped, 2);
    assert_int_equal(ex.n, 0);
    dataset_examples_free(&ex);
    dataset_examples_free(&docs);
}

/* ---- packing invariants --------------------------------------------------- */

static void check_packing_invariants(const packed_set *ps, int32_t pad) {
    int L = ps->seq_len;
    int64_t n_tgt = 0;
    for (int64_t r = 0; r < ps->n_rows; r++) {
        const int32_t *in = ps->input_ids + r * L, *tg = ps->targets + r * L;
        const int32_t *po = ps->position_ids + r * L, *sq = ps->seq_ids + r * L;
        assert_int_equal(tg[L - 1], -100);
        assert_true(sq[0] == 0);
        for (int t = 0; t < L; t++) {
            if (sq[t] < 0) {
                assert_int_equal(in[t], pad);
                assert_int_equal(tg[t], -100);
                assert_int_equal(po[t], 0);
                continue;
            }
            if (t == 0 || sq[t] != sq[t - 1]) {
                assert_int_equal(po[t], 0); /* positions restart per example */
                if (t > 0) assert_true(sq[t - 1] < 0 || sq[t] == sq[t - 1] + 1);
            } else {
                assert_int_equal(po[t], po[t - 1] + 1);
            }
            if (tg[t] != -100) {
                n_tgt++;
                assert_true(t + 1 < L);
                assert_int_equal(sq[t + 1], sq[t]); /* never crosses an example */
                assert_int_equal(tg[t], in[t + 1]);
            }
        }
    }
    assert_int_equal(n_tgt, ps->n_target_tokens);
}

static void test_packing_invariants(void **state) {
    (void)state;
    /* synthetic examples: example k = (k + 100) repeated len_k times */
    enum { N = 300, L = 64 };
    dataset_examples ex = {0};
    ex.v = calloc(N, sizeof *ex.v);
    ex.n = ex.cap = N;
    int64_t total = 0;
    for (int k = 0; k < N; k++) {
        int32_t n = 1 + (int32_t)((k * 37u + 11u) % L);
        ex.v[k].n = n;
        ex.v[k].ids = malloc((size_t)n * sizeof(int32_t));
        ex.v[k].mask = malloc((size_t)n);
        for (int32_t i = 0; i < n; i++) {
            ex.v[k].ids[i] = k + 100;
            ex.v[k].mask[i] = (uint8_t)(i % 3 != 0);
        }
        total += n;
    }
    for (int packing = 0; packing <= 1; packing++) {
        packed_set ps;
        dataset_split_stats st = {0};
        qerr e = {{0}};
        assert_int_equal(dataset_pack(&ex, L, packing, 7, 1, 42, &ps, &st, &e), 0);
        check_packing_invariants(&ps, 7);
        assert_int_equal(st.n_tokens, total);
        assert_int_equal(st.n_pad, ps.n_rows * L - total);
        /* every example appears exactly once, whole, in one row */
        int seen[N] = {0};
        for (int64_t r = 0; r < ps.n_rows; r++) {
            for (int t = 0; t < L;) {
                if (ps.seq_ids[r * L + t] < 0) {
                    t++;
                    continue;
                }
                int32_t id = ps.input_ids[r * L + t];
                int k = id - 100, u = t;
                while (u < L && ps.seq_ids[r * L + u] == ps.seq_ids[r * L + t]) {
                    assert_int_equal(ps.input_ids[r * L + u], id);
                    u++;
                }
                assert_true(k >= 0 && k < N);
                assert_int_equal(u - t, ex.v[k].n);
                seen[k]++;
                t = u;
            }
        }
        for (int k = 0; k < N; k++) assert_int_equal(seen[k], 1);
        if (packing) {
            int64_t lower = (total + L - 1) / L;
            assert_true(ps.n_rows <= lower + lower / 10); /* first-fit packs within 10% of the bound */
            printf("[dataset] %d examples, %lld tokens -> %lld rows of %d (%.1f%% padding)\n", N, (long long)total,
                   (long long)ps.n_rows, L, 100.0 * (double)st.n_pad / (double)(ps.n_rows * L));
        } else {
            assert_int_equal(ps.n_rows, N);
        }
        packed_set_free(&ps);
    }
    /* an over-long example is an error */
    ex.v[0].n = L + 1;
    int32_t *big = realloc(ex.v[0].ids, (L + 1) * sizeof(int32_t));
    ex.v[0].ids = big;
    packed_set ps;
    qerr e = {{0}};
    assert_int_equal(dataset_pack(&ex, L, 1, 7, 1, 42, &ps, NULL, &e), -1);
    ex.v[0].n = 1;
    dataset_examples_free(&ex);
}

/* ---- determinism, split, build ------------------------------------------- */

static char *make_docs_jsonl(int n_docs) {
    static const char *words[] = {"alpha", "river", "stone", "cloud", "pixel", "garden", "signal", "vector"};
    size_t cap = (size_t)n_docs * 2048;
    char *s = malloc(cap);
    size_t k = 0;
    for (int d = 0; d < n_docs; d++) {
        k += (size_t)snprintf(s + k, cap - k, "{\"text\": \"Document %d.", d);
        int len = 5 + (d * 13) % 60;
        for (int w = 0; w < len; w++) k += (size_t)snprintf(s + k, cap - k, " %s", words[(d + w * w) % 8]);
        k += (size_t)snprintf(s + k, cap - k, "\"}\n");
    }
    return s;
}

/* Rows of `ps` as lists of example indices (example k holds id k + 100), into rows[r][j] (-1 ends). */
static void rows_of(const packed_set *ps, int rows[][16], int max_rows) {
    assert_true(ps->n_rows <= max_rows);
    int L = ps->seq_len;
    for (int64_t r = 0; r < ps->n_rows; r++) {
        int j = 0;
        for (int t = 0; t < L; t++)
            if (ps->seq_ids[r * L + t] >= 0 && (t == 0 || ps->seq_ids[r * L + t] != ps->seq_ids[r * L + t - 1]))
                rows[r][j++] = ps->input_ids[r * L + t] - 100;
        rows[r][j] = -1;
    }
}

/* axolotl's sample_packing_sequentially (allocate_sequentially in utils/samplers/multipack.py, 0.19.0)
 * with curriculum_sampling (SequentialSampler): next-fit in file order, and rows visited in order every
 * epoch. The expected rows below are axolotl's algorithm worked by hand on lengths 5 3 4 2 6 1 7 1 1 8
 * with capacity 8, and, for the same lengths, first-fit in order (pack_group without shuffle). */
static void test_packing_sequential(void **state) {
    (void)state;
    static const int len[] = {5, 3, 4, 2, 6, 1, 7, 1, 1, 8};
    enum { N = 10, L = 8 };
    dataset_examples ex = {0};
    ex.v = calloc(N, sizeof *ex.v);
    ex.n = ex.cap = N;
    for (int k = 0; k < N; k++) {
        ex.v[k].n = len[k];
        ex.v[k].ids = malloc((size_t)len[k] * sizeof(int32_t));
        ex.v[k].mask = malloc((size_t)len[k]);
        for (int i = 0; i < len[k]; i++) {
            ex.v[k].ids[i] = k + 100;
            ex.v[k].mask[i] = 1;
        }
    }
    static const int next_fit[][6] = {{0, 1, -1}, {2, 3, -1}, {4, 5, -1}, {6, 7, -1}, {8, -1}, {9, -1}};
    static const int first_fit[][6] = {{0, 1, -1}, {2, 3, 5, 7, -1}, {4, 8, -1}, {6, -1}, {9, -1}};
    int rows[N][16];
    qerr e = {{0}};
    packed_set ps;
    const int seq_mode = DATASET_PACK | DATASET_PACK_SEQUENTIAL | DATASET_PACK_IN_ORDER;
    assert_int_equal(dataset_pack(&ex, L, seq_mode, 7, 0, 42, &ps, NULL, &e), 0);
    check_packing_invariants(&ps, 7);
    assert_int_equal(ps.n_rows, 6);
    assert_int_equal(ps.in_order, 1);
    rows_of(&ps, rows, N);
    for (int r = 0; r < 6; r++)
        for (int j = 0; j == 0 || next_fit[r][j - 1] >= 0; j++) assert_int_equal(rows[r][j], next_fit[r][j]);
    int64_t perm[N];
    for (int ep = 0; ep < 3; ep++) {
        dataset_rows_order(&ps, 42, ep, perm);
        for (int64_t r = 0; r < ps.n_rows; r++) assert_int_equal(perm[r], r);
    }
    packed_set_free(&ps);
    /* curriculum_sampling without sequential packing: first-fit in file order */
    assert_int_equal(dataset_pack(&ex, L, DATASET_PACK | DATASET_PACK_IN_ORDER, 7, 0, 42, &ps, NULL, &e), 0);
    assert_int_equal(ps.n_rows, 5);
    rows_of(&ps, rows, N);
    for (int r = 0; r < 5; r++)
        for (int j = 0; j == 0 || first_fit[r][j - 1] >= 0; j++) assert_int_equal(rows[r][j], first_fit[r][j]);
    packed_set_free(&ps);
    /* sequential packing of the shuffled order: each row holds consecutive entries of the permutation */
    assert_int_equal(dataset_pack(&ex, L, DATASET_PACK | DATASET_PACK_SEQUENTIAL, 7, 1, 42, &ps, NULL, &e), 0);
    check_packing_invariants(&ps, 7);
    assert_int_equal(ps.in_order, 0);
    rows_of(&ps, rows, N);
    int seen = 0, prev_free = -1;
    for (int64_t r = 0; r < ps.n_rows; r++) {
        int used = 0;
        for (int j = 0; rows[r][j] >= 0; j++) used += len[rows[r][j]], seen++;
        /* next-fit: the first example of a row did not fit the previous row's free space */
        if (r > 0) assert_true(len[rows[r][0]] > prev_free);
        prev_free = L - used;
    }
    assert_int_equal(seen, N);
    dataset_rows_order(&ps, 42, 0, perm);
    int moved = 0;
    for (int64_t r = 0; r < ps.n_rows; r++) moved += perm[r] != r;
    assert_true(moved > 0); /* without curriculum_sampling rows are shuffled per epoch */
    packed_set_free(&ps);
    dataset_examples_free(&ex);
}

/* curriculum_sampling through dataset_build: the held-out documents are the last ones (axolotl's
 * train_test_split(shuffle=False) of the unshuffled data) and train rows keep the file order. */
static void test_curriculum_build(void **state) {
    fixture *fx = need_model(state);
    char *jsonl = make_docs_jsonl(40);
    dataset_spec spec = {write_jsonl(fx, "c.jsonl", jsonl), "completion", NULL, NULL, 0, NULL, .split = NULL};
    free(jsonl);
    packed_set tr, ev;
    dataset_stats st;
    qerr e = {{0}};
    assert_int_equal(dataset_build(fx->tok, &spec, 1, NULL, 0, 0.1, 32,
                                   DATASET_PACK | DATASET_PACK_SEQUENTIAL | DATASET_PACK_IN_ORDER, 0, 1234, &tr, &ev,
                                   &st, &e),
                     0);
    assert_int_equal(st.eval.n_docs, 4);
    assert_int_equal(tr.in_order, 1);
    char *first = decode(fx->tok, tr.input_ids, 32);
    assert_non_null(strstr(first, "Document 0."));
    char *evt = decode(fx->tok, ev.input_ids, (size_t)ev.n_rows * 32);
    for (int d = 36; d < 40; d++) {
        char want[32];
        snprintf(want, sizeof want, "Document %d.", d);
        assert_non_null(strstr(evt, want));
    }
    assert_null(strstr(evt, "Document 35."));
    /* document order is kept across rows: "Document d." appears in train rows in increasing d */
    char *all = decode(fx->tok, tr.input_ids, (size_t)tr.n_rows * 32);
    const char *at = all;
    for (int d = 0; d < 36; d++) {
        char want[32];
        snprintf(want, sizeof want, "Document %d.", d);
        const char *f = strstr(at, want);
        assert_non_null(f);
        at = f;
    }
    free(first);
    free(evt);
    free(all);
    packed_set_free(&tr);
    packed_set_free(&ev);
}

static void test_determinism(void **state) {
    fixture *fx = need_model(state);
    char *jsonl = make_docs_jsonl(40);
    dataset_spec spec = {write_jsonl(fx, "d.jsonl", jsonl), "completion", NULL, NULL, 0, NULL, .split = NULL};
    free(jsonl);
    packed_set a, b, c, ea, eb, ec;
    dataset_stats sa, sb, sc;
    qerr e = {{0}};
    assert_int_equal(dataset_build(fx->tok, &spec, 1, NULL, 0, 0.1, 32, 1, 0, 1234, &a, &ea, &sa, &e), 0);
    assert_int_equal(dataset_build(fx->tok, &spec, 1, NULL, 0, 0.1, 32, 1, 0, 1234, &b, &eb, &sb, &e), 0);
    assert_int_equal(dataset_build(fx->tok, &spec, 1, NULL, 0, 0.1, 32, 1, 0, 999, &c, &ec, &sc, &e), 0);
    assert_int_equal(a.n_rows, b.n_rows);
    size_t cells = (size_t)a.n_rows * 32;
    assert_memory_equal(a.input_ids, b.input_ids, cells * 4);
    assert_memory_equal(a.targets, b.targets, cells * 4);
    assert_memory_equal(a.position_ids, b.position_ids, cells * 4);
    assert_memory_equal(a.seq_ids, b.seq_ids, cells * 4);
    assert_true(c.n_rows != a.n_rows || memcmp(a.input_ids, c.input_ids, cells * 4) != 0);
    check_packing_invariants(&a, tokenizer_pad_id(fx->tok));
    check_packing_invariants(&c, tokenizer_pad_id(fx->tok));
    assert_int_equal(sa.train.n_docs, 36);
    assert_int_equal(sa.eval.n_docs, 4);
    assert_int_equal(sa.train.n_rows, a.n_rows);
    assert_int_equal(sa.train.n_trained, a.n_target_tokens);
    assert_true(sa.train.n_chunked > 0);
    printf("[dataset] train: %lld docs -> %lld examples (%lld chunked), %lld tokens, %lld trained, %lld rows; "
           "eval: %lld docs, %lld rows\n",
           (long long)sa.train.n_docs, (long long)sa.train.n_examples, (long long)sa.train.n_chunked,
           (long long)sa.train.n_tokens, (long long)sa.train.n_trained, (long long)sa.train.n_rows,
           (long long)sa.eval.n_docs, (long long)sa.eval.n_rows);
    packed_set_free(&a);
    packed_set_free(&b);
    packed_set_free(&c);
    packed_set_free(&ea);
    packed_set_free(&eb);
    packed_set_free(&ec);

    /* epoch order: a permutation, fixed per (seed, epoch), changing with epoch */
    int64_t p0[50], p0b[50], p1[50];
    dataset_epoch_order(7, 0, 50, p0);
    dataset_epoch_order(7, 0, 50, p0b);
    dataset_epoch_order(7, 1, 50, p1);
    assert_memory_equal(p0, p0b, sizeof p0);
    assert_memory_not_equal(p0, p1, sizeof p0);
    int seen[50] = {0};
    for (int i = 0; i < 50; i++) seen[p1[i]]++;
    for (int i = 0; i < 50; i++) assert_int_equal(seen[i], 1);
}

static void test_split_no_leak(void **state) {
    fixture *fx = need_model(state);
    char *jsonl = make_docs_jsonl(20);
    dataset_spec spec = {write_jsonl(fx, "s.jsonl", jsonl), "completion", NULL, NULL, 0, NULL, .split = NULL};
    free(jsonl);
    dataset_examples docs = {0}, tr = {0}, ev = {0};
    read_ok(fx, &spec, 0, &docs);
    assert_int_equal(docs.n, 20);
    uint8_t is_eval[20], is_train[20];
    qerr e = {{0}};
    assert_int_equal(dataset_split_docs(20, 0.25, 5, is_eval, &e), 0);
    int n_eval = 0;
    for (int i = 0; i < 20; i++) {
        n_eval += is_eval[i];
        is_train[i] = !is_eval[i];
    }
    assert_int_equal(n_eval, 5);
    /* seq_len 16 chunks most documents: chunks keep their document */
    assert_int_equal(dataset_fit(&docs, is_train, 16, &tr, NULL, &e), 0);
    assert_int_equal(dataset_fit(&docs, is_eval, 16, &ev, NULL, &e), 0);
    assert_true(tr.n > 15 && ev.n >= 5);
    for (int64_t k = 0; k < tr.n; k++) assert_int_equal(is_eval[tr.v[k].doc], 0);
    for (int64_t k = 0; k < ev.n; k++) assert_int_equal(is_eval[ev.v[k].doc], 1);
    /* the split depends on the seed, deterministically */
    uint8_t again[20], other[20];
    assert_int_equal(dataset_split_docs(20, 0.25, 5, again, &e), 0);
    assert_memory_equal(again, is_eval, 20);
    assert_int_equal(dataset_split_docs(20, 0.25, 6, other, &e), 0);
    assert_memory_not_equal(other, is_eval, 20);
    /* absolute counts and bad values */
    assert_int_equal(dataset_split_docs(20, 3, 5, other, &e), 0);
    n_eval = 0;
    for (int i = 0; i < 20; i++) n_eval += other[i];
    assert_int_equal(n_eval, 3);
    assert_int_equal(dataset_split_docs(20, 2.5, 5, other, &e), -1);
    assert_int_equal(dataset_split_docs(20, 20, 5, other, &e), -1);
    assert_non_null(strstr(e.msg, "at least one"));
    assert_int_equal(dataset_split_docs(20, -0.1, 5, other, &e), -1);
    dataset_examples_free(&tr);
    dataset_examples_free(&ev);
    dataset_examples_free(&docs);

    /* test_datasets: the held-out set is that file; val_set_size must be 0 */
    dataset_spec test = {write_jsonl(fx, "t.jsonl", "{\"text\": \"held out one\"}\n{\"text\": \"held out two\"}\n"),
                         "completion", NULL, NULL, 0, NULL, .split = NULL};
    packed_set a, b;
    dataset_stats st;
    assert_int_equal(dataset_build(fx->tok, &spec, 1, &test, 1, 0.1, 32, 1, 0, 1, &a, &b, &st, &e), -1);
    assert_non_null(strstr(e.msg, "val_set_size"));
    assert_int_equal(dataset_build(fx->tok, &spec, 1, &test, 1, 0.0, 32, 1, 0, 1, &a, &b, &st, &e), 0);
    assert_int_equal(st.train.n_docs, 20);
    assert_int_equal(st.eval.n_docs, 2);
    assert_int_equal(b.n_rows, 1); /* two short documents packed in one row */
    check_packing_invariants(&b, tokenizer_pad_id(fx->tok));
    packed_set_free(&a);
    packed_set_free(&b);
    /* no held-out set at all */
    assert_int_equal(dataset_build(fx->tok, &spec, 1, NULL, 0, 0.0, 32, 0, 0, 1, &a, &b, &st, &e), 0);
    assert_int_equal(b.n_rows, 0);
    assert_int_equal(a.n_rows, st.train.n_examples); /* no packing: one example per row */
    packed_set_free(&a);
    packed_set_free(&b);
}

/* ---- errors --------------------------------------------------------------- */

static void expect_read_error(fixture *fx, const char *name, const char *type, const char *content,
                              const char *want1, const char *want2) {
    char *path = write_jsonl(fx, name, content);
    dataset_spec spec = {path, (char *)type, NULL, NULL, 0, NULL, .split = NULL};
    dataset_examples docs = {0};
    qerr e = {{0}};
    assert_int_equal(dataset_read_jsonl(fx->tok, &spec, 0, &docs, &e), -1);
    assert_int_equal(docs.n, 0);
    if (!strstr(e.msg, path)) fail_msg("error does not name the file: %s", e.msg);
    if (want1 && !strstr(e.msg, want1)) fail_msg("expected \"%s\" in: %s", want1, e.msg);
    if (want2 && !strstr(e.msg, want2)) fail_msg("expected \"%s\" in: %s", want2, e.msg);
    dataset_examples_free(&docs);
}

static void test_errors(void **state) {
    fixture *fx = need_model(state);
    expect_read_error(fx, "bad.jsonl", "completion", "{\"text\": \"ok\"}\n\n{\"text\": \"unterminated}\n",
                      "bad.jsonl:3:", "invalid JSON");
    expect_read_error(fx, "missing.jsonl", "completion", "{\"text\": \"ok\"}\n{\"body\": \"no text\"}\n",
                      "missing.jsonl:2: field \"text\" missing or not a string", NULL);
    expect_read_error(fx, "notstr.jsonl", "completion", "{\"text\": 42}\n", ":1: field \"text\"", NULL);
    expect_read_error(fx, "arr.jsonl", "completion", "[1, 2]\n", ":1: expected a JSON object", "array");
    expect_read_error(fx, "two.jsonl", "completion", "{\"text\": \"a\"} {\"text\": \"b\"}\n", ":1:", "after");
    expect_read_error(fx, "type.jsonl", "sharegpt_v9", "{\"text\": \"a\"}\n", "unknown dataset type",
                      "sharegpt_v9");
    expect_read_error(fx, "empty.jsonl", "completion", "\n  \n\n", "no records", NULL);
    expect_read_error(fx, "alp.jsonl", "alpaca", "{\"instruction\": \"x\", \"output\": \"y\"}\n{\"instruction\": \"x\"}\n",
                      "alp.jsonl:2: field \"output\"", NULL);
    expect_read_error(fx, "chat.jsonl", "chat_template",
                      "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"content\": \"x\"}]}\n",
                      "chat.jsonl:1: messages[1]: field \"role\"", NULL);
    expect_read_error(fx, "chat2.jsonl", "chat_template", "{\"conversations\": []}\n",
                      "chat2.jsonl:1: field \"messages\" missing or not an array", NULL);
    /* a missing file */
    dataset_spec spec = {"/nonexistent/x.jsonl", "completion", NULL, NULL, 0, NULL, .split = NULL};
    dataset_examples docs = {0};
    qerr e = {{0}};
    assert_int_equal(dataset_read_jsonl(fx->tok, &spec, 0, &docs, &e), -1);
    assert_non_null(strstr(e.msg, "/nonexistent/x.jsonl: cannot open"));
    /* dataset_build passes errors through and leaves nothing allocated */
    dataset_spec bad = {write_jsonl(fx, "bad2.jsonl", "{\"text\": \"ok\"}\nnot json\n"), "completion", NULL, NULL, 0, NULL, .split = NULL};
    packed_set a, b;
    assert_int_equal(dataset_build(fx->tok, &bad, 1, NULL, 0, 0.0, 32, 1, 0, 1, &a, &b, NULL, &e), -1);
    assert_non_null(strstr(e.msg, "bad2.jsonl:2:"));
    assert_null(a.input_ids);
    assert_null(b.input_ids);
    /* skip_bad_lines: the same file reads, the bad line is counted and named */
    dataset_skip_log skipped = {0};
    bad.skip_bad_lines = 1;
    bad.skipped = &skipped;
    assert_int_equal(dataset_read_jsonl(fx->tok, &bad, 0, &docs, &e), 0);
    assert_int_equal(docs.n, 1);
    assert_int_equal(skipped.n_lines, 1);
    assert_non_null(strstr(skipped.first, "bad2.jsonl:2: invalid JSON"));
    dataset_examples_free(&docs);
    /* custom field names */
    dataset_spec custom = {write_jsonl(fx, "f.jsonl", "{\"body\": \"custom field\"}\n"), "completion", "body", NULL, 0, NULL, .split = NULL};
    assert_int_equal(dataset_read_jsonl(fx->tok, &custom, 0, &docs, &e), 0);
    assert_int_equal(docs.n, 1);
    dataset_examples_free(&docs);
}

/* Hostile input at the data boundary (issue 17 items 4 and 5): only regular
 * files are read (a FIFO with no writer, a device, a directory are refused at
 * once instead of blocking or reading without end); a NUL byte, a \u0000
 * escape (cJSON would cut the text there) and invalid UTF-8 are refused with
 * the line and column, never trained on in part. */
static void test_hostile_files_and_text(void **state) {
    fixture *fx = need_model(state);
    dataset_examples docs = {0};
    qerr e = {{0}};
    char fifo[300];
    snprintf(fifo, sizeof fifo, "%s/fifo.jsonl", fx->dir);
    assert_int_equal(mkfifo(fifo, 0600), 0);
    char *paths[] = {fifo, (char *)"/dev/zero", (char *)"/dev/urandom", fx->dir};
    const char *kinds[] = {"a FIFO", "a character device", "a character device", "a directory"};
    for (int i = 0; i < 4; i++) {
        dataset_spec spec = {paths[i], "completion", NULL, NULL, 0, NULL, .split = NULL};
        assert_int_equal(dataset_read_jsonl(fx->tok, &spec, 0, &docs, &e), -1);
        assert_non_null(strstr(e.msg, paths[i]));
        if (!strstr(e.msg, kinds[i])) fail_msg("%s: expected \"%s\" in: %s", paths[i], kinds[i], e.msg);
        assert_int_equal(docs.n, 0);
    }
    /* a raw NUL byte inside the line (written byte by byte: fputs would stop at it) */
    char p[300];
    snprintf(p, sizeof p, "%s/nul.jsonl", fx->dir);
    FILE *fp = fopen(p, "wb");
    assert_non_null(fp);
    static const char raw[] = "{\"text\": \"ok\"}\n{\"text\": \"abc\0def\"}\n";
    assert_int_equal(fwrite(raw, 1, sizeof raw - 1, fp), sizeof raw - 1);
    fclose(fp);
    dataset_spec nul = {p, "completion", NULL, NULL, 0, NULL, .split = NULL};
    assert_int_equal(dataset_read_jsonl(fx->tok, &nul, 0, &docs, &e), -1);
    assert_non_null(strstr(e.msg, "nul.jsonl:2: a NUL byte at column 14"));
    expect_read_error(fx, "esc.jsonl", "completion", "{\"text\": \"abc\\u0000def\"}\n", "esc.jsonl:1:",
                      "\\u0000 at column 14");
    /* an escaped backslash before u0000 is text, not a NUL */
    dataset_spec ok = {write_jsonl(fx, "bs.jsonl", "{\"text\": \"C:\\\\u0000 is a path\"}\n"), "completion", NULL,
                       NULL, 0, NULL, .split = NULL};
    if (dataset_read_jsonl(fx->tok, &ok, 0, &docs, &e)) fail_msg("%s", e.msg);
    assert_int_equal(docs.n, 1);
    dataset_examples_free(&docs);
    expect_read_error(fx, "utf8.jsonl", "completion", "{\"text\": \"caf\xc3\xa9 ok\"}\n{\"text\": \"bad \xff byte\"}\n",
                      "utf8.jsonl:2: invalid UTF-8 at column 15", NULL);
    expect_read_error(fx, "over.jsonl", "completion", "{\"text\": \"overlong \xc0\xaf\"}\n", "over.jsonl:1: invalid UTF-8",
                      NULL);
    expect_read_error(fx, "surr.jsonl", "completion", "{\"text\": \"surrogate \xed\xa0\x80\"}\n",
                      "surr.jsonl:1: invalid UTF-8", NULL);
    expect_read_error(fx, "cut.jsonl", "completion", "{\"text\": \"cut \xe2\x82\"}\n", "cut.jsonl:1: invalid UTF-8",
                      NULL);
    /* valid 4-byte UTF-8 passes */
    dataset_spec emoji = {write_jsonl(fx, "emoji.jsonl", "{\"text\": \"ok \xf0\x9f\x98\x80\"}\n"), "completion", NULL,
                          NULL, 0, NULL, .split = NULL};
    if (dataset_read_jsonl(fx->tok, &emoji, 0, &docs, &e)) fail_msg("%s", e.msg);
    dataset_examples_free(&docs);
}

/* ---- axolotl's chat_template keys, input_output, split ---------------------- */

static void same_docs(const dataset_examples *a, const dataset_examples *b) {
    assert_int_equal(a->n, b->n);
    for (int64_t i = 0; i < a->n; i++) {
        assert_int_equal(a->v[i].n, b->v[i].n);
        assert_memory_equal(a->v[i].ids, b->v[i].ids, (size_t)a->v[i].n * sizeof(int32_t));
        assert_memory_equal(a->v[i].mask, b->v[i].mask, (size_t)a->v[i].n);
    }
}

/* ShareGPT data (from/value, human/gpt) through message_property_mappings and axolotl's default role
 * map gives the ids and labels of the same conversation written with role/content. */
static void test_sharegpt_mapping(void **state) {
    fixture *fx = need_model(state);
    const char *openai =
        "{\"messages\": [{\"role\": \"system\", \"content\": \"Be brief.\"}, {\"role\": \"user\", \"content\": \"Hi\"}, "
        "{\"role\": \"assistant\", \"content\": \"Hello.\"}, {\"role\": \"user\", \"content\": \"2+2?\"}, "
        "{\"role\": \"assistant\", \"content\": \"4\"}]}\n";
    const char *sharegpt =
        "{\"conversations\": [{\"from\": \"system\", \"value\": \"Be brief.\"}, {\"from\": \"human\", \"value\": \"Hi\"}, "
        "{\"from\": \"gpt\", \"value\": \"Hello.\"}, {\"from\": \"human\", \"value\": \"2+2?\"}, "
        "{\"from\": \"gpt\", \"value\": \"4\"}]}\n";
    dataset_spec a = {.path = write_jsonl(fx, "oa.jsonl", openai), .type = "chat_template"};
    dataset_spec b = {.path = write_jsonl(fx, "sg.jsonl", sharegpt), .type = "chat_template",
                      .field_messages = "conversations", .message_field_role = "from",
                      .message_field_content = "value"};
    dataset_examples da = {0}, db = {0};
    read_ok(fx, &a, 0, &da);
    read_ok(fx, &b, 0, &db);
    same_docs(&da, &db);
    char *t = decode_trained(fx->tok, &db.v[0]);
    assert_string_equal(t, "Hello.<|im_end|>4<|im_end|>");
    free(t);
    char *r = decode(fx->tok, db.v[0].ids, (size_t)db.v[0].n);
    assert_non_null(strstr(r, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>"));
    free(r);
    dataset_examples_free(&db);

    /* drop_system_message with the model's own template: the message goes, the template's default system
     * turn takes its place (SmolLM2's template renders one when the conversation has none) */
    b.drop_system_message = 1;
    read_ok(fx, &b, 0, &db);
    r = decode(fx->tok, db.v[0].ids, (size_t)db.v[0].n);
    assert_null(strstr(r, "Be brief."));
    assert_non_null(strstr(r, SMOL_SYSTEM));
    free(r);
    dataset_examples_free(&db);
    b.drop_system_message = 0;

    /* roles_to_train, train_on_eos: axolotl's per-turn labels, with the model's template and with
     * axolotl's ChatML (chat_template: chatml); tests/test_reference_axolotl_chat.c checks them against
     * axolotl's own code */
    char *const roles[2] = {"human", "gpt"};
    b.roles_to_train = roles;
    b.n_roles_to_train = 2;
    b.train_on_eos = "last";
    read_ok(fx, &b, 0, &db);
    t = decode_trained(fx->tok, &db.v[0]);
    assert_string_equal(t, "HiHello.2+2?4<|im_end|>");
    free(t);
    dataset_examples_free(&db);
    b.chat_template = "chatml";
    read_ok(fx, &b, 0, &db);
    t = decode_trained(fx->tok, &db.v[0]);
    assert_string_equal(t, "HiHello.2+2?4<|im_end|>");
    free(t);
    dataset_examples_free(&db);
    b.roles_to_train = NULL;
    b.train_on_eos = "none";
    read_ok(fx, &b, 0, &db);
    t = decode_trained(fx->tok, &db.v[0]);
    assert_string_equal(t, "Hello.4");
    free(t);
    dataset_examples_free(&db);
    b.train_on_eos = "all";
    b.drop_system_message = 1;
    read_ok(fx, &b, 0, &db);
    t = decode_trained(fx->tok, &db.v[0]);
    assert_string_equal(t, "<|im_end|>Hello.<|im_end|><|im_end|>4<|im_end|>");
    free(t);
    r = decode(fx->tok, db.v[0].ids, (size_t)db.v[0].n);
    assert_null(strstr(r, "Be brief."));
    assert_null(strstr(r, SMOL_SYSTEM)); /* axolotl's ChatML has no default system turn */
    free(r);
    dataset_examples_free(&db);
    /* chat_template: chatml renders without the model template's default system turn */
    a.chat_template = "chatml";
    const char *nosys = "{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}\n";
    a.path = write_jsonl(fx, "ns.jsonl", nosys);
    dataset_examples dc = {0};
    read_ok(fx, &a, 0, &dc);
    r = decode(fx->tok, dc.v[0].ids, (size_t)dc.v[0].n);
    assert_string_equal(r, "<|im_start|>user\nHi<|im_end|>\n");
    free(r);
    dataset_examples_free(&dc);

    /* a role outside the map is named, not rendered verbatim */
    dataset_spec bad = {.path = write_jsonl(fx, "bad.jsonl", "{\"conversations\": [{\"from\": \"bot\", \"value\": \"x\"}]}\n"),
                        .type = "chat_template", .field_messages = "conversations", .message_field_role = "from",
                        .message_field_content = "value"};
    qerr e = {{0}};
    assert_int_equal(dataset_read_jsonl(fx->tok, &bad, 1, &dc, &e), -1);
    assert_non_null(strstr(e.msg, "role \"bot\" is not in axolotl's role map"));
    dataset_examples_free(&dc);
    dataset_examples_free(&da);
}

/* axolotl's chat_template choices and eot_tokens: named templates, jinja texts recognised by hash (an
 * unknown one refused), eot_tokens other than the template's end-of-turn token or eos refused, the note
 * when axolotl's default [eos_token] leaves the template's end-of-turn token untrained, and the Mistral
 * system turn whose labels depend on the model's name refused. */
static void test_chat_template_choices(void **state) {
    fixture *fx = need_model(state);
    const char *conv =
        "{\"messages\": [{\"role\": \"system\", \"content\": \"Be brief.\"}, {\"role\": \"user\", \"content\": \"Hi\"}, "
        "{\"role\": \"assistant\", \"content\": \"Hello.\"}]}\n";
    dataset_spec sp = {.path = write_jsonl(fx, "cc.jsonl", conv), .type = "chat_template"};
    dataset_examples d = {0};
    qerr e = {{0}};
    /* jinja: the model's own text is recognised; a text qlora does not render is refused, not approximated */
    sp.chat_template = "jinja";
    sp.chat_template_jinja = tokenizer_chat_template(fx->tok);
    read_ok(fx, &sp, 0, &d);
    dataset_examples_free(&d);
    sp.chat_template_jinja = "{% for m in messages %}{{ m.content }}{% endfor %}";
    assert_int_equal(dataset_read_jsonl(fx->tok, &sp, 0, &d, &e), -1);
    assert_non_null(strstr(e.msg, "chat_template_jinja"));
    assert_non_null(strstr(e.msg, "not approximated"));
    sp.chat_template_jinja = NULL;
    assert_int_equal(dataset_read_jsonl(fx->tok, &sp, 0, &d, &e), -1);
    assert_non_null(strstr(e.msg, "needs chat_template_jinja"));
    /* a name refused with its reason */
    sp.chat_template = "llama3_2_vision";
    assert_int_equal(dataset_read_jsonl(fx->tok, &sp, 0, &d, &e), -1);
    assert_non_null(strstr(e.msg, "date"));
    /* eot_tokens: the template's end-of-turn token (or eos) only */
    sp.chat_template = "llama3";
    char *const wrong[1] = {"<|im_start|>"}, *const right[1] = {"<|eot_id|>"};
    sp.eot_tokens = wrong;
    sp.n_eot_tokens = 1;
    assert_int_equal(dataset_read_jsonl(fx->tok, &sp, 0, &d, &e), -1);
    assert_non_null(strstr(e.msg, "eot_tokens: refused: only [\"<|eot_id|>\"]"));
    sp.eot_tokens = right; /* not in SmolLM2's vocabulary */
    assert_int_equal(dataset_read_jsonl(fx->tok, &sp, 0, &d, &e), -1);
    assert_non_null(strstr(e.msg, "not one token of the vocabulary"));
    sp.eot_tokens = NULL;
    sp.n_eot_tokens = 0;
    /* phi_35 ends turns with <|end|>, SmolLM2's eos is <|im_end|>: as in axolotl nothing ends a turn, and the
     * note says so */
    dataset_skip_log log = {0};
    sp.skipped = &log;
    sp.chat_template = "phi_35";
    read_ok(fx, &sp, 0, &d);
    assert_non_null(strstr(log.note, "eot_tokens is not set"));
    char *t = decode_trained(fx->tok, &d.v[0]);
    assert_string_equal(t, "Hello.<"); /* ".<" is one token of this vocabulary (no <|end|>): it overlaps the content */
    free(t);
    dataset_examples_free(&d);
    sp.skipped = NULL;
    /* mistral_v1 renders the system message inside the first user turn; training it is refused */
    sp.chat_template = "mistral_v1";
    char *const sys[1] = {"system"};
    sp.roles_to_train = sys;
    sp.n_roles_to_train = 1;
    assert_int_equal(dataset_read_jsonl(fx->tok, &sp, 0, &d, &e), -1);
    assert_non_null(strstr(e.msg, "inside a user turn"));
    sp.roles_to_train = NULL;
    sp.n_roles_to_train = 0;
    read_ok(fx, &sp, 0, &d);
    char *r = decode(fx->tok, d.v[0].ids, (size_t)d.v[0].n);
    assert_non_null(strstr(r, " [INST] Be brief.\n\nHi [/INST] Hello."));
    free(r);
    dataset_examples_free(&d);
}

/* input_output: segments tokenized one by one (axolotl input_output.py), labels per segment. */
static void test_input_output(void **state) {
    fixture *fx = need_model(state);
    const char *io = "{\"segments\": [{\"label\": true, \"text\": \"Hello\\n\"}, {\"label\": false, \"text\": \"good bye \"}, "
                     "{\"label\": true, \"text\": \"fare well<|im_end|>\"}]}\n";
    dataset_spec sp = {.path = write_jsonl(fx, "io.jsonl", io), .type = "input_output"};
    dataset_examples d = {0};
    read_ok(fx, &sp, 0, &d);
    assert_int_equal(d.n, 1);
    int32_t n1 = count_tokens(fx->tok, "Hello\n"), n2 = count_tokens(fx->tok, "good bye "),
            n3 = count_tokens(fx->tok, "fare well<|im_end|>");
    assert_int_equal(d.v[0].n, n1 + n2 + n3);
    for (int32_t i = 0; i < d.v[0].n; i++) assert_int_equal(d.v[0].mask[i], i < n1 || i >= n1 + n2);
    char *t = decode_trained(fx->tok, &d.v[0]);
    assert_string_equal(t, "Hello\nfare well<|im_end|>");
    free(t);
    dataset_examples_free(&d);
    read_ok(fx, &sp, 1, &d); /* train_on_inputs: every segment */
    for (int32_t i = 0; i < d.v[0].n; i++) assert_int_equal(d.v[0].mask[i], 1);
    dataset_examples_free(&d);
    qerr e = {{0}};
    dataset_spec bad = {.path = write_jsonl(fx, "iob.jsonl", "{\"segments\": [{\"text\": \"x\"}]}\n"), .type = "input_output"};
    assert_int_equal(dataset_read_jsonl(fx->tok, &bad, 0, &d, &e), -1);
    assert_non_null(strstr(e.msg, "segments[0]: field \"label\" missing"));
}

/* split: HF's slice syntax over the file's records (percent bounds rounded to nearest, ties to even). */
static void test_split_slice(void **state) {
    fixture *fx = need_model(state);
    char text[2048] = "";
    for (int i = 0; i < 10; i++) {
        char l[64];
        snprintf(l, sizeof l, "{\"text\": \"record %d\"}\n", i);
        strcat(text, l);
    }
    char *p = write_jsonl(fx, "ten.jsonl", text);
    static const struct { const char *split; int first, n; } cases[] = {
        {"train", 0, 10}, {"train[:20%]", 0, 2}, {"train[2:5]", 2, 3}, {"train[-3:]", 7, 3},
        {"train[:25%]", 0, 2} /* 2.5 -> 2 (ties to even) */, {"train[50%:]", 5, 5}};
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        dataset_spec sp = {.path = p, .type = "completion", .split = cases[c].split};
        dataset_examples d = {0};
        read_ok(fx, &sp, 0, &d);
        assert_int_equal(d.n, cases[c].n);
        char want[32];
        snprintf(want, sizeof want, "record %d", cases[c].first);
        char *r = decode(fx->tok, d.v[0].ids, (size_t)d.v[0].n);
        assert_non_null(strstr(r, want));
        free(r);
        assert_int_equal(d.v[d.n - 1].doc, d.n - 1);
        dataset_examples_free(&d);
    }
    dataset_slice sl;
    qerr e = {{0}};
    assert_int_equal(dataset_parse_split("validation", &sl, &e), -1);
    assert_int_equal(dataset_parse_split("train[:5", &sl, &e), -1);
    dataset_spec sp = {.path = p, .type = "completion", .split = "train[5:5]"};
    dataset_examples d = {0};
    assert_int_equal(dataset_read_jsonl(fx->tok, &sp, 0, &d, &e), -1);
    assert_non_null(strstr(e.msg, "selects no record of the 10"));
    assert_int_equal(d.n, 0); /* the file's records are taken back */
    dataset_examples_free(&d);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_completion_chunking),
        cmocka_unit_test(test_alpaca_masked),
        cmocka_unit_test(test_alpaca_train_on_inputs),
        cmocka_unit_test(test_chat_template),
        cmocka_unit_test(test_sharegpt_mapping),
        cmocka_unit_test(test_chat_template_choices),
        cmocka_unit_test(test_input_output),
        cmocka_unit_test(test_split_slice),
        cmocka_unit_test(test_packing_invariants),
        cmocka_unit_test(test_packing_sequential),
        cmocka_unit_test(test_curriculum_build),
        cmocka_unit_test(test_determinism),
        cmocka_unit_test(test_split_no_leak),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_hostile_files_and_text),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
