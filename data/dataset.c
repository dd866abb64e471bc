/* data/dataset.c — the held-out split and dataset_build, the trainer's entry point.
 *
 * The split is made on documents (JSONL records), before completion texts are
 * chunked, so a held-out document never leaks a chunk into training (the
 * mistake a split after chunking makes). `val_set_size` follows axolotl /
 * datasets.train_test_split: a fraction in (0, 1) takes ceil(fraction * n)
 * documents, a value >= 1 that many. `test_datasets` replace the split.
 */
#include "data/dataset.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/rng.h"

#define DS_STREAM_SPLIT 0x53504c4954ull /* "SPLIT" */

int dataset_split_docs(int64_t n_docs, double val_set_size, uint64_t seed, uint8_t *is_eval, qerr *e) {
    if (n_docs > 0) memset(is_eval, 0, (size_t)n_docs);
    if (!(val_set_size >= 0.0) || isinf(val_set_size))
        return qerr_set(e, "val_set_size = %g: must be 0, a fraction in (0, 1) or a count >= 1", val_set_size);
    if (val_set_size == 0.0) return 0;
    int64_t n_val;
    if (val_set_size < 1.0) {
        n_val = (int64_t)ceil(val_set_size * (double)n_docs);
    } else {
        if (val_set_size != floor(val_set_size))
            return qerr_set(e, "val_set_size = %g: a value >= 1 is a document count and must be an integer",
                            val_set_size);
        n_val = (int64_t)val_set_size;
    }
    if (n_val >= n_docs)
        return qerr_set(e,
                        "val_set_size = %g holds out %lld of %lld documents; at least one must remain for training",
                        val_set_size, (long long)n_val, (long long)n_docs);
    /* The first n_val entries of a seeded Fisher–Yates permutation. */
    int64_t *perm = malloc((size_t)n_docs * sizeof *perm);
    if (!perm) return qerr_set(e, "out of memory splitting %lld documents", (long long)n_docs);
    for (int64_t i = 0; i < n_docs; i++) perm[i] = i;
    for (int64_t i = n_docs - 1; i > 0; i--) {
        int64_t j = (int64_t)(rng_u64(seed, DS_STREAM_SPLIT, (uint64_t)i) % (uint64_t)(i + 1));
        int64_t t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
    }
    for (int64_t i = 0; i < n_val; i++) is_eval[perm[i]] = 1;
    free(perm);
    return 0;
}

static int ds_read_all_specs(const tokenizer *tok, const dataset_spec *specs, int n, int train_on_inputs,
                             dataset_examples *docs, qerr *e) {
    for (int i = 0; i < n; i++)
        if (dataset_read_jsonl(tok, &specs[i], train_on_inputs, docs, e)) return -1;
    return 0;
}

int dataset_build(const tokenizer *tok, const dataset_spec *train, int n_train, const dataset_spec *test,
                  int n_test, double val_set_size, int sequence_len, int sample_packing, int train_on_inputs,
                  uint64_t seed, packed_set *train_out, packed_set *eval_out, dataset_stats *stats, qerr *e) {
    memset(train_out, 0, sizeof *train_out);
    memset(eval_out, 0, sizeof *eval_out);
    train_out->seq_len = eval_out->seq_len = sequence_len;
    dataset_stats dummy;
    if (!stats) stats = &dummy;
    memset(stats, 0, sizeof *stats);
    if (sequence_len < 2) return qerr_set(e, "sequence_len = %d: must be at least 2", sequence_len);
    if (n_train < 1) return qerr_set(e, "no training datasets given (datasets: is empty)");
    if (n_test > 0 && val_set_size != 0.0)
        return qerr_set(e, "val_set_size = %g and test_datasets are both set: use one held-out set (set "
                           "val_set_size: 0 with test_datasets)", val_set_size);
    int32_t pad = tokenizer_pad_id(tok);
    if (pad < 0) pad = tokenizer_eos_id(tok);
    if (pad < 0) pad = 0;

    dataset_examples docs = {0}, tdocs = {0}, ex_train = {0}, ex_eval = {0};
    uint8_t *is_eval = NULL, *is_train = NULL;
    int rc = -1;
    if (ds_read_all_specs(tok, train, n_train, train_on_inputs, &docs, e)) goto done;
    if (n_test > 0 && ds_read_all_specs(tok, test, n_test, train_on_inputs, &tdocs, e)) goto done;

    is_eval = malloc((size_t)docs.n);
    is_train = malloc((size_t)docs.n);
    if (!is_eval || !is_train) {
        qerr_set(e, "out of memory");
        goto done;
    }
    if (dataset_split_docs(docs.n, n_test > 0 ? 0.0 : val_set_size, seed, is_eval, e)) goto done;
    if (sample_packing & DATASET_PACK_IN_ORDER) {
        /* curriculum_sampling: axolotl merges without shuffling and splits with
         * train_test_split(shuffle=False): the held-out set is the last documents */
        int64_t n_val = 0;
        for (int64_t i = 0; i < docs.n; i++) n_val += is_eval[i];
        for (int64_t i = 0; i < docs.n; i++) is_eval[i] = i >= docs.n - n_val;
    }
    for (int64_t i = 0; i < docs.n; i++) is_train[i] = !is_eval[i];

    if (dataset_fit(&docs, is_train, sequence_len, &ex_train, &stats->train, e)) goto done;
    if (n_test > 0) {
        if (dataset_fit(&tdocs, NULL, sequence_len, &ex_eval, &stats->eval, e)) goto done;
    } else if (val_set_size != 0.0) {
        if (dataset_fit(&docs, is_eval, sequence_len, &ex_eval, &stats->eval, e)) goto done;
    }
    if (ex_train.n == 0) {
        qerr_set(e, "no training examples: all %lld training documents were dropped (nothing to train on after "
                    "masking / fitting to sequence_len %d)", (long long)stats->train.n_docs, sequence_len);
        goto done;
    }
    /* The raw documents are no longer needed: release them before packing. */
    dataset_examples_free(&docs);
    dataset_examples_free(&tdocs);
    if (dataset_pack(&ex_train, sequence_len, sample_packing, pad, !(sample_packing & DATASET_PACK_IN_ORDER), seed,
                     train_out, &stats->train, e))
        goto done;
    if (ex_eval.n > 0 &&
        dataset_pack(&ex_eval, sequence_len, sample_packing | DATASET_PACK_IN_ORDER, pad, 0, seed, eval_out,
                     &stats->eval, e))
        goto done;
    rc = 0;
done:
    if (rc) {
        packed_set_free(train_out);
        packed_set_free(eval_out);
        train_out->seq_len = eval_out->seq_len = sequence_len;
    }
    dataset_examples_free(&docs);
    dataset_examples_free(&tdocs);
    dataset_examples_free(&ex_train);
    dataset_examples_free(&ex_eval);
    free(is_eval);
    free(is_train);
    return rc;
}
