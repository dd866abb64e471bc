/* data/dataset.h — JSONL examples → tokenized, label-masked, packed training rows.
 *
 * Pipeline (dataset_build does all of it; the steps are public for tests and
 * tools):
 *
 *   dataset_read_jsonl   one record (JSONL line) → one tokenized "document"
 *                        with a per-token train mask, rendered per type
 *                        (axolotl semantics, see below);
 *   dataset_split_docs   held-out documents picked deterministically from the
 *                        seed BEFORE any chunking (a held-out record never
 *                        contributes a token to training);
 *   dataset_fit          documents → examples of at most sequence_len tokens
 *                        (completion: consecutive chunks; alpaca/chat:
 *                        truncation), dropping examples with nothing to learn;
 *   dataset_pack         examples → fixed-length rows with shifted targets,
 *                        position ids and per-row example ids;
 *   dataset_epoch_order  the row permutation of one epoch.
 *
 * Dataset types (axolotl prompt strategies of the same name):
 *   "completion"     field `field` (default "text"): [bos if the tokenizer
 *                    adds one] text eos; every token is trained on. A text
 *                    longer than sequence_len tokens is split into
 *                    consecutive chunks of sequence_len tokens, each its own
 *                    example (the first token of a chunk is not predicted).
 *   "alpaca"         instruction / input (optional) / output, rendered with
 *                    the Alpaca prompt (axolotl `alpaca`, prompters.py
 *                    AlpacaPrompter): [bos] prompt output eos. With
 *                    train_on_inputs = 0 only output + eos are trained on.
 *   "chat_template"  `field_messages` (default "messages"): a list of
 *                    messages, read through axolotl's mapping (message_field_role
 *                    / _content: ShareGPT's from / value; roles human→user,
 *                    gpt→assistant, user, assistant, system, tool as they are, any
 *                    other an error naming it; a record's top-level "system"
 *                    string becomes the first message when there is none;
 *                    drop_system_message drops the first message if it is
 *                    system), rendered by the template `chat_template` selects
 *                    (the model's, one of axolotl's, or a recognised
 *                    chat_template_jinja text: data/chat.h) exactly as
 *                    apply_chat_template renders it; no bos is added (the
 *                    template owns it). Labels follow axolotl's
 *                    ChatTemplateStrategy (prompt_strategies/chat_template.py,
 *                    0.19.0; data/jsonl.c ds_chat_labels): each message is a
 *                    turn located by re-rendering with placeholder contents; a
 *                    turn whose role is in roles_to_train (all turns when
 *                    train_on_inputs) has its content's tokens trained; the
 *                    eot_tokens (default [eos]) and eos tokens at most 3 tokens
 *                    after a turn are trained per train_on_eot / train_on_eos.
 *   "input_output"   `segments`: [{text, label}], template-free: each text is
 *                    tokenized on its own (no bos/eos added; axolotl
 *                    input_output.py) and its tokens are labels iff label.
 *   Texts are tokenized with parse_special = 1 (HF's default: a literal
 *   "<|im_end|>" in a text is the special token). A token is trained on if
 *   any of its bytes lies in a trained span of the rendered text.
 *   alpaca/chat examples longer than sequence_len are truncated (counted).
 *
 * Packing: targets[t] = input_ids[t+1] when position t+1 holds the same
 * example and that token is trained on, else -100. So no target crosses an
 * example boundary and the last position of a row is always -100.
 * sample_packing = 1: examples, in an order shuffled from the seed, go to the
 * first row with room (first-fit, O(log rows) per example via a max-segment
 * tree); an example is never split across rows. sample_packing = 0: one
 * example per row. Two of axolotl's keys change this (bits of the
 * `sample_packing` argument, DATASET_PACK_*): sample_packing_sequentially
 * packs next-fit (axolotl's allocate_sequentially: an example that does not
 * fit the current row closes it and opens the next, so the order is kept);
 * curriculum_sampling keeps the file order (axolotl's SequentialSampler and
 * its unshuffled merge): no shuffle before packing, rows visited in order in
 * every epoch, and the held-out split is the last documents (HF
 * train_test_split with shuffle=False, as axolotl calls it). Unused positions are padding: input pad_id, target -100,
 * position 0, seq_id -1. Attention must not cross seq_ids.
 */
#ifndef QLORA_DATA_DATASET_H
#define QLORA_DATA_DATASET_H

#include <stdint.h>

#include "core/status.h"
#include "data/tokenizer.h"

/* Malformed lines skipped while reading one or more files (skip_bad_lines). */
typedef struct dataset_skip_log {
    int64_t n_lines; /* lines skipped so far */
    char first[512]; /* the error of the first one: "file.jsonl:17: invalid JSON ..." */
    char note[512];  /* "" or a note the caller prints once (eot_tokens: axolotl's default leaves the
                        template's end-of-turn token untrained) */
} dataset_skip_log;

/* A slice of a file's records, from axolotl's `split:` (HF datasets' split syntax on the one split
 * "train" a local JSON lines file has): "train" (all), "train[A:B]", "train[:N]", "train[N:]",
 * "train[:N%]", "train[A%:B%]". A percent bound is round(pct * n / 100) with ties to even (HF's
 * ReadInstruction, rounding "closest"); a negative bound counts from the end. */
typedef struct dataset_slice {
    int has_lo, has_hi;   /* 0: open end */
    double lo, hi;        /* records, or percent when *_pct */
    int lo_pct, hi_pct;
} dataset_slice;

/* Parse a split string into *sl. Error: "expected train, train[A:B], train[:N%] ..., got \"x\"". */
int dataset_parse_split(const char *s, dataset_slice *sl, qerr *e);

/* One entry of `datasets:` / `test_datasets:` in the config (axolotl keys).
 * Filled by the config parser; strings are owned by whoever fills it. */
typedef struct dataset_spec {
    char *path;           /* JSONL file */
    char *type;           /* "completion" | "alpaca" | "chat_template" */
    char *field;          /* completion: text field name, NULL = "text" */
    char *field_messages; /* chat_template: messages field, NULL = "messages" */
    int skip_bad_lines;   /* 0: a malformed line (invalid JSON, not an object, a missing or
                             ill-typed field) is an error naming file and line; 1: it is
                             skipped and counted in *skipped */
    dataset_skip_log *skipped; /* NULL or where skipped lines are counted (caller-owned) */
    /* axolotl's chat_template keys (NULL / 0 = axolotl's defaults) */
    const char *message_field_role;    /* a message's role key; NULL = "role" */
    const char *message_field_content; /* a message's content key; NULL = "content" */
    char *const *roles_to_train;       /* roles (after the role map) whose content is trained on;
                                          NULL = {"assistant"} */
    int n_roles_to_train;
    const char *train_on_eos;          /* which eos tokens after a turn are labels (axolotl's
                                          train_on_eos): "turn" (NULL: after a trained turn), "all",
                                          "last" (the last one found), "none" */
    const char *train_on_eot;          /* the same for eot_tokens; NULL = as train_on_eos */
    char *const *eot_tokens;           /* axolotl's eot_tokens; NULL = its default [eos_token]. Each must
                                          be the template's end-of-turn token or eos */
    int n_eot_tokens;
    int drop_system_message;           /* drop a leading system message */
    const char *chat_template;         /* axolotl's chat_template choice: NULL / "tokenizer_default" (the
                                          model's), "tokenizer_default_fallback_<name>", "jinja", or a
                                          template name (data/chat.h chat_template_named) */
    const char *chat_template_jinja;   /* chat_template: jinja: the template text, or a file holding it;
                                          it must be a template qlora renders (recognised by hash) */
    const char *split;                 /* NULL or "train": every record; else a slice (dataset_slice) */
} dataset_spec;

/* One tokenized document or example. */
typedef struct dataset_example {
    int32_t *ids;      /* (n) token ids */
    uint8_t *mask;     /* (n) 1 = token i is a label (trained on when predicted from i-1) */
    int32_t n;         /* tokens */
    int32_t chunkable; /* 1: split into chunks when too long (completion); 0: truncate */
    int64_t doc;       /* index of the source record within its dataset_examples list of documents */
} dataset_example;

/* A growable list of examples; zero-initialise, free with dataset_examples_free. */
typedef struct dataset_examples {
    dataset_example *v;
    int64_t n, cap;
} dataset_examples;

/* Fixed-length training rows. All arrays are (n_rows, seq_len) int32,
 * row-major, malloc'd; free with packed_set_free. */
typedef struct packed_set {
    int64_t n_rows;
    int seq_len;
    int32_t *input_ids;    /* token ids; pad_id on padding */
    int32_t *targets;      /* token to predict at each position (already shifted), -100 = ignore */
    int32_t *position_ids; /* restart at 0 for each packed example; 0 on padding */
    int32_t *seq_ids;      /* index of the example within its row (0, 1, ...); -1 on padding */
    int64_t n_target_tokens; /* positions with targets != -100 */
    int in_order;            /* 1: rows are visited in order every epoch (curriculum_sampling) */
} packed_set;

/* What happened to one split, for the trainer's `[data]` lines. */
typedef struct dataset_split_stats {
    int64_t n_docs;        /* JSONL records */
    int64_t n_examples;    /* examples packed (after chunking / truncation / dropping) */
    int64_t n_chunked;     /* completion documents split into more than one chunk */
    int64_t n_truncated;   /* alpaca / chat examples cut at sequence_len */
    int64_t n_dropped;     /* examples (or last chunks) with no trained target, not packed */
    int64_t n_tokens;      /* tokens in packed examples (excludes padding) */
    int64_t n_trained;     /* target positions (!= -100) */
    int64_t n_rows;        /* packed rows */
    int64_t n_pad;         /* padding positions */
} dataset_split_stats;

typedef struct dataset_stats {
    dataset_split_stats train, eval;
} dataset_stats;

/* dataset_read_jsonl: read spec->path (one JSON object per line, blank lines
 * allowed) and append one document per record to `docs` (doc = its index in
 * `docs`), tokenized and masked per spec->type as described at the top.
 * train_on_inputs = 1 trains on every token. Documents are NOT truncated.
 * Errors (message names file and, where it applies, line): cannot open,
 * invalid JSON, a line that is not an object, a missing or ill-typed field
 * (`x.jsonl:17: field "text" missing or not a string`), unknown type, a
 * file with no records, chat_template with a template that is not ChatML.
 * With spec->skip_bad_lines the malformed-line errors are skipped and
 * counted instead (a file with no valid record is still an error). */
int dataset_read_jsonl(const tokenizer *tok, const dataset_spec *spec, int train_on_inputs,
                       dataset_examples *docs, qerr *e);


/* dataset_split_docs: choose held-out documents. val_set_size in (0, 1) is a
 * fraction (ceil(val_set_size * n) documents), >= 1 an absolute count (must
 * be an integer), 0 none. The choice is a seeded permutation of document
 * indices (core/rng.h). is_eval: (n_docs) output, 1 = held out.
 * Errors: negative or non-integer count, or no training document left. */
int dataset_split_docs(int64_t n_docs, double val_set_size, uint64_t seed, uint8_t *is_eval, qerr *e);

/* dataset_fit: append to `out` the examples of the documents docs[i] with
 * select == NULL or select[i] != 0: chunkable documents become consecutive
 * chunks of sequence_len tokens, others are truncated to sequence_len.
 * Examples with no trained target (mask[1..n) all 0) are dropped. Updates
 * st->n_docs, n_chunked, n_truncated, n_dropped (st may be NULL). */
int dataset_fit(const dataset_examples *docs, const uint8_t *select, int sequence_len, dataset_examples *out,
                dataset_split_stats *st, qerr *e);

/* Bits of dataset_pack's / dataset_build's `sample_packing` argument (0 and 1
 * keep their plain meaning: one example per row, first-fit packing). */
#define DATASET_PACK 1            /* axolotl sample_packing: several examples per row */
#define DATASET_PACK_SEQUENTIAL 2 /* sample_packing_sequentially: next-fit in order (with DATASET_PACK) */
#define DATASET_PACK_IN_ORDER 4   /* curriculum_sampling: no shuffle, rows in order, held-out = last documents */

/* dataset_pack: pack `ex` (each n <= seq_len) into rows as described at the
 * top. shuffle = 1 permutes the example order from `seed` first. Fills
 * *out (caller frees with packed_set_free) and st->n_examples, n_tokens,
 * n_trained, n_rows, n_pad (st may be NULL). Errors: an example longer than
 * seq_len, out of memory. */
int dataset_pack(const dataset_examples *ex, int seq_len, int sample_packing, int32_t pad_id, int shuffle,
                 uint64_t seed, packed_set *out, dataset_split_stats *st, qerr *e);

/* dataset_build: the whole pipeline for the trainer. Reads every train spec
 * (documents numbered across files in order), then the held-out set: the
 * test specs if n_test > 0 (val_set_size must then be 0), else
 * dataset_split_docs(val_set_size). Fits and packs both (train shuffled from
 * seed; eval in document order). eval_out gets n_rows = 0 when there is no
 * held-out set. sequence_len >= 2. sample_packing: 0/1 or DATASET_PACK_* bits
 * (with DATASET_PACK_IN_ORDER the held-out documents are the last ones and
 * train is not shuffled). On error nothing is left allocated. */
int dataset_build(const tokenizer *tok, const dataset_spec *train, int n_train, const dataset_spec *test,
                  int n_test, double val_set_size, int sequence_len, int sample_packing, int train_on_inputs,
                  uint64_t seed, packed_set *train_out, packed_set *eval_out, dataset_stats *stats, qerr *e);

/* dataset_epoch_order: perm (n_rows) = a permutation of 0..n_rows-1 that
 * depends only on (seed, epoch): the order rows are visited in that epoch. */
void dataset_epoch_order(uint64_t seed, int epoch, int64_t n_rows, int64_t *perm);

/* dataset_rows_order: the order the rows of `ps` are visited in epoch `epoch`
 * (perm has ps->n_rows entries): 0, 1, ... when ps->in_order
 * (curriculum_sampling), else dataset_epoch_order(seed, epoch). */
void dataset_rows_order(const packed_set *ps, uint64_t seed, int epoch, int64_t *perm);

/* dataset_row_describe: a human-readable view of one packed row for "show
 * the label mask" (docs/design.md "Known traps"): each example's text, with the
 * tokens that are NOT trained on wrapped in "[[" and "]]", examples
 * separated by a "--- example k: n tokens, m trained ---" line, and the
 * padding count at the end. Malloc'd NUL-terminated string in *out. */
int dataset_row_describe(const tokenizer *tok, const packed_set *set, int64_t row, char **out, qerr *e);

/* Append *ex to v (v takes ownership of ex->ids / ex->mask), growing v->v by doubling.
 * Error: out of memory (v unchanged, *ex still the caller's). */
int dataset_examples_push(dataset_examples *v, const dataset_example *ex, qerr *e);

/* Append a new example of n tokens: ids (n int32) and mask (n bytes) malloc'd and uninitialised,
 * n set, chunkable and doc 0; the caller fills them. Returns the new slot (valid until the next
 * push), or NULL with *e set when out of memory (v unchanged). */
dataset_example *dataset_examples_push_new(dataset_examples *v, int32_t n, qerr *e);

void dataset_examples_free(dataset_examples *v);
void packed_set_free(packed_set *p);

#endif
