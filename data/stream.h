/* data/stream.h — axolotl's `pretraining_dataset`: completion text streamed
 * from a JSON lines file, tokenized into windows and packed buffer by buffer,
 * never holding the whole file (axolotl 0.19.0: utils/data/sft.py
 * _prepare_streaming_dataset, utils/data/streaming.py wrap_streaming_dataset /
 * encode_packed_streaming, prompt_strategies/pretrain.py).
 *
 * Windows (PretrainTokenizationStrategy._tokenize): a record's text is
 * tokenized as HF's tokenizer(text, truncation=True, max_length=L-1,
 * add_special_tokens=True, return_overflowing_tokens=True, stride=S) gives
 * it, S = min(256, (L-1)//2), L = sequence_len: the text's tokens (control
 * tokens parsed) are cut into windows of W = L-1-n_special tokens starting
 * every W-S tokens (the tokenizers library's truncation with stride: the
 * last window is the first to reach the end; an empty text is one empty
 * window), each gets the tokenizer's own special tokens (bos when
 * add_bos_token, eos when add_eos_token) and then axolotl's eos. Windows
 * shorter than 2 tokens are dropped (filter_sequences_by_length).
 *
 * Packing (encode_packed_streaming, with sample_packing): the records are read
 * in buffers of streaming_multipack_buffer_size; a buffer's windows, in a
 * random order (axolotl: RandomSampler; here a permutation from (seed, epoch,
 * buffer)), go first-fit into rows of L tokens holding at most bin_size
 * windows (MultipackBatchSampler's pack_group, sample_packing_bin_size);
 * rows come out in the order they were opened. Position ids restart and
 * attention stays inside each window (pretrain_multipack_attn: true); the
 * labels are the row's input ids, so with HF's shifted loss every filled
 * position but the last predicts the next token of the row — across a window
 * boundary too (the eos of one window predicts the first token of the next),
 * as axolotl trains it. One difference: axolotl's rows hold
 * micro_batch_size x L tokens (one bin per micro-batch), these L (the same at
 * micro_batch_size 1).
 *
 * At the end of the file the stream starts over (the next epoch: new
 * permutations), as HF's Trainer re-iterates an IterableDataset until
 * max_steps. Everything is a function of the file, the tokenizer, the
 * settings and the seed: the rows a run consumed are reproduced by reading
 * again (resume replays rows_consumed rows, checked by the running
 * fingerprint of every row handed out).
 */
#ifndef QLORA_DATA_STREAM_H
#define QLORA_DATA_STREAM_H

#include <stdint.h>

#include "core/status.h"
#include "data/dataset.h"
#include "data/tokenizer.h"

/* One pretraining_dataset entry, resolved (trainer/config.c). */
typedef struct pretrain_spec {
    const char *path;        /* a JSON lines file */
    const char *text_column; /* NULL = "text" */
    int64_t skip;            /* records skipped at the start of every pass (axolotl's `skip`) */
} pretrain_spec;

/* pretrain_windows: append to `out` the windows of one text (above), each a
 * dataset_example with every mask byte 1 and chunkable 0; windows shorter
 * than 2 tokens are not appended. seq_len >= 2. Errors: seq_len too small for
 * the tokenizer's special tokens and the stride, out of memory. */
int pretrain_windows(const tokenizer *tok, const char *text, size_t len, int seq_len, dataset_examples *out,
                     qerr *e);

/* pretrain_pack: pack the windows w->v[order[0..n)] first-fit into rows of
 * seq_len (at most bin_size windows each) as above; fills *out (caller frees
 * with packed_set_free). Errors: a window longer than seq_len, out of memory. */
int pretrain_pack(const dataset_examples *w, const int64_t *order, int seq_len, int bin_size, int32_t pad_id,
                  packed_set *out, qerr *e);

typedef struct pretrain_stream pretrain_stream;

/* pretrain_stream_open: open the stream over spec's file. buffer_records >= 1,
 * bin_size >= 1, seq_len >= 2. Errors: the file cannot be opened. */
int pretrain_stream_open(const tokenizer *tok, const pretrain_spec *spec, int seq_len, int buffer_records,
                         int bin_size, uint64_t seed, pretrain_stream **out, qerr *e);

/* pretrain_stream_next: the next n rows of the stream into *out (allocated
 * here on first use for n rows of seq_len; n must not change between calls);
 * out->n_target_tokens is set. Errors: a malformed line ("file:line: ..."),
 * a file that gives no row at all, I/O errors, out of memory. */
int pretrain_stream_next(pretrain_stream *s, int64_t n, packed_set *out, qerr *e);

/* Rows handed out so far, the pass (epoch, from 0) the next row comes from,
 * and the XXH64 of every row handed out (ids, targets, positions, seq ids). */
int64_t pretrain_stream_rows(const pretrain_stream *s);
int pretrain_stream_epoch(const pretrain_stream *s);
uint64_t pretrain_stream_fingerprint(const pretrain_stream *s);

void pretrain_stream_close(pretrain_stream *s);

#endif
