/* fuzz/fuzz_jsonl.c — libFuzzer target for JSONL datasets (data/jsonl.c):
 * records rendered per type, tokenized with the real SmolLM2 tokenizer (the
 * default model, loaded once; QLORA_FUZZ_MODEL overrides the path), then fit
 * and packed (data/pack.c). Byte 0 picks the type, skip_bad_lines,
 * train_on_inputs and packing; byte 1 the sequence length; the rest is the
 * file. */
#include <stdio.h>
#include <string.h>

#include "data/dataset.h"
#include "fuzz/fuzz_common.h"
#include "format/gguf.h"

static gguf_file *g_gf;
static tokenizer *g_tok;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    const char *path = getenv("QLORA_FUZZ_MODEL");
    if (!path || !*path) path = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
    qerr e;
    if (gguf_open(path, &g_gf, &e) || tokenizer_load_gguf(g_gf, &g_tok, &e)) {
        fprintf(stderr, "fuzz_jsonl: cannot load the tokenizer: %s (run `make model` or set QLORA_FUZZ_MODEL)\n",
                e.msg);
        exit(1);
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 2) return 0;
    static char *const types[] = {"completion", "alpaca", "chat_template", "completion"};
    uint8_t sel = data[0];
    int seq_len = 2 + data[1] % 96;
    dataset_skip_log skipped = {0};
    dataset_spec spec = {.path = (char *)fuzz_file(data + 2, size - 2), .type = types[sel & 3],
                         .field = (sel & 3) == 3 ? "content" : "text", .field_messages = "messages",
                         .skip_bad_lines = (sel >> 2) & 1, .skipped = &skipped};
    dataset_examples docs = {0}, ex = {0};
    qerr e;
    if (dataset_read_jsonl(g_tok, &spec, (sel >> 3) & 1, &docs, &e) == 0) {
        if (dataset_fit(&docs, NULL, seq_len, &ex, NULL, &e) == 0 && ex.n > 0) {
            packed_set ps;
            if (dataset_pack(&ex, seq_len, (sel >> 4) & 1, 0, 1, sel, &ps, NULL, &e) == 0) {
                int64_t *perm = malloc((size_t)ps.n_rows * sizeof *perm);
                if (perm) dataset_epoch_order(7, 1, ps.n_rows, perm);
                free(perm);
                packed_set_free(&ps);
            }
        }
    }
    dataset_examples_free(&docs);
    dataset_examples_free(&ex);
    return 0;
}
