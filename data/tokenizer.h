/* data/tokenizer.h — BPE tokenizers built from GGUF metadata: GPT-2 style
 * byte-level BPE (`tokenizer.ggml.model` "gpt2") and SentencePiece BPE with
 * byte fallback ("llama": Llama 2, Mistral, Phi-3).
 *
 * The vocabulary, merges (or scores), token types and special ids come from
 * the GGUF keys `tokenizer.ggml.*` (llama.cpp's names,
 * gguf-py/gguf/constants.py). The behaviour reproduces Hugging Face
 * `tokenizers` (the oracle; tests/test_reference_vocabs.c on the real
 * Llama 2, Phi-3, Qwen2 and Llama 3 vocabularies):
 *
 *   1. added tokens are split out of the text first (leftmost, then longest):
 *      user-defined tokens (type 4) always, control tokens (type 3; and for
 *      SentencePiece the unknown token) only when `parse_special` is set (HF:
 *      `encode_special_tokens=False`);
 *   2. byte-level BPE: normalization and pre-tokenization by `tokenizer.ggml.pre`:
 *        "smollm", "starcoder", "refact": every \p{N} character on its own
 *            (HF Digits(individual_digits=True)), then the GPT-2 regex on each
 *            stretch between them (HF ByteLevel(add_prefix_space=False));
 *        "gpt2", "default": the GPT-2 regex
 *            's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
 *        "llama-bpe", "llama3", "llama-v3": the Llama 3 regex, and a word
 *            that is itself in the vocabulary is taken whole (ignore_merges);
 *        "qwen2": NFC (utf8proc) of each segment, then Qwen2's regex (the
 *            Llama 3 one with \p{N} one by one), as Qwen2's tokenizer.json;
 *      the regexes run in PCRE2 (UTF + UCP), never on hand-written tables;
 *      each pre-token's bytes are spelled with GPT-2's bytes_to_unicode
 *      alphabet and merged by BPE, lowest merge rank first (ties: leftmost),
 *      as HF's `Word::merge_all`;
 *   3. SentencePiece BPE: no pre-tokenizer; each segment between added tokens
 *      is one word whose spaces become U+2581 and which gets a U+2581 prefix
 *      (`tokenizer.ggml.add_space_prefix`, default true) — on every segment,
 *      as llama.cpp, sentencepiece and HF's legacy Prepend normalizer do, or
 *      per `tokenizer.qlora.prepend_scheme` ("always"/"first": HF Metaspace,
 *      only where the segment does not already start with a space, and for
 *      "first" only at offset 0 of the text), set by tokenizer_json for a
 *      Metaspace tokenizer.json; symbols are code points, one missing from
 *      the vocabulary falls back to its bytes as <0xNN> tokens; merges are
 *      `tokenizer.ggml.merges` when present, else derived from the scores as
 *      transformers derives them (see tokenizer.c tok_derive_merges).
 *
 * A `tokenizer` is immutable after loading: encode/decode may be called from
 * several threads at once.
 */
#ifndef QLORA_DATA_TOKENIZER_H
#define QLORA_DATA_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "core/status.h"
#include "format/gguf.h"

typedef struct tokenizer tokenizer; /* opaque */

/* Token types (`tokenizer.ggml.token_type`, llama.cpp's llama_token_type). */
typedef enum tokenizer_token_type {
    TOKENIZER_TOKEN_UNDEFINED = 0,
    TOKENIZER_TOKEN_NORMAL = 1,
    TOKENIZER_TOKEN_UNKNOWN = 2,
    TOKENIZER_TOKEN_CONTROL = 3,
    TOKENIZER_TOKEN_USER_DEFINED = 4,
    TOKENIZER_TOKEN_UNUSED = 5,
    TOKENIZER_TOKEN_BYTE = 6,
} tokenizer_token_type;

/* A growable list of token ids (and optionally each token's byte offset into
 * the encoded text). Zero-initialise before first use; free with
 * tokenizer_ids_free. */
typedef struct tokenizer_ids {
    int32_t *ids;     /* (n) token ids */
    int64_t *offsets; /* (n) byte offset of each token's first byte in the
                         text, filled only by tokenizer_encode_offsets */
    size_t n, cap;
} tokenizer_ids;

/* tokenizer_load_gguf: build a tokenizer from an open GGUF file. Everything
 * needed is copied, so `f` may be closed afterwards.
 * Errors (-1, message names the key): `tokenizer.ggml.model` missing or not
 * "gpt2"/"llama" (e.g. "bert", "t5" are refused by name), unknown
 * `tokenizer.ggml.pre` (or any but "default" with "llama"), missing/ill-typed
 * tokens, merges, scores or token types, a special token id outside the
 * vocabulary. */
int tokenizer_load_gguf(const gguf_file *f, tokenizer **out, qerr *e);
void tokenizer_free(tokenizer *t);

/* tokenizer_encode: append the token ids of text[0..len) to `out` (no BOS or
 * EOS is added: see tokenizer_add_bos/eos). `parse_special` = 1 maps exact
 * occurrences of control tokens (e.g. "<|im_start|>") to their ids; 0
 * tokenizes them as plain text. Invalid UTF-8 is accepted: bytes that are
 * not valid UTF-8 become pre-tokens of their own and are byte-encoded.
 * A byte whose byte-alphabet symbol is not in the vocabulary is dropped, as
 * HF's BPE does without an unk token (SmolLM2 lacks e.g. 0x04, 0xF5..0xFF),
 * so decode(encode(x)) == x holds only for text without such bytes.
 * If `out` already tracks offsets (filled by tokenizer_encode_offsets),
 * they are extended with base 0.
 * Speed: ~5 M tokens/s on one core (man-page text); a pre-token is merged
 * with a heap, O(n log n), so pathological runs (1 MB of one character)
 * stay well under a second.
 * Errors: out of memory, a PCRE2 matching failure. */
int tokenizer_encode(const tokenizer *t, const char *text, size_t len, int parse_special,
                     tokenizer_ids *out, qerr *e);

/* tokenizer_encode_offsets: as tokenizer_encode, and also fills
 * out->offsets with each token's first byte offset into `text` (plus
 * `base`, so several pieces of a longer text can be encoded into one list).
 * Offsets increase strictly; token i spans [offsets[i], offsets[i+1]) (the
 * last one ends at base + len), where a span also holds any dropped bytes
 * that follow the token's own. */
int tokenizer_encode_offsets(const tokenizer *t, const char *text, size_t len, int parse_special,
                             int64_t base, tokenizer_ids *out, qerr *e);

void tokenizer_ids_free(tokenizer_ids *v);
/* Append one id (offset -1 when the list tracks offsets). */
int tokenizer_ids_push(tokenizer_ids *v, int32_t id, qerr *e);

/* tokenizer_decode: UTF-8 bytes of ids[0..n) into a NUL-terminated malloc'd
 * buffer (*text, length *len). Normal tokens are mapped back through the
 * byte alphabet; control and user-defined tokens appear as their text.
 * Errors: an id outside [0, n_vocab). */
int tokenizer_decode(const tokenizer *t, const int32_t *ids, size_t n, char **text, size_t *len, qerr *e);

/* Vocabulary size (number of tokens, including special ones). */
int32_t tokenizer_n_vocab(const tokenizer *t);
/* Special ids from the GGUF (`tokenizer.ggml.{bos,eos,padding,unknown}_token_id`);
 * -1 if absent. pad falls back to eos when the file has none. */
int32_t tokenizer_bos_id(const tokenizer *t);
int32_t tokenizer_eos_id(const tokenizer *t);
int32_t tokenizer_pad_id(const tokenizer *t);
int32_t tokenizer_unk_id(const tokenizer *t);
/* `tokenizer.ggml.add_bos_token` / `add_eos_token` (default 0 when absent,
 * as for HF GPT2TokenizerFast). */
int tokenizer_add_bos(const tokenizer *t);
int tokenizer_add_eos(const tokenizer *t);
/* Id of the token whose vocabulary entry is exactly `text` (as stored, i.e.
 * in the byte alphabet for normal tokens: " the" is "Ġthe"), or -1. */
int32_t tokenizer_find_token(const tokenizer *t, const char *text);
/* Stored text of token `id` (NUL-terminated, in the byte alphabet for normal
 * tokens), or NULL if out of range. */
const char *tokenizer_token_text(const tokenizer *t, int32_t id);
/* Type of token `id` (a tokenizer_token_type value), or -1 if out of range. */
int tokenizer_token_type_of(const tokenizer *t, int32_t id);
/* `tokenizer.chat_template` (NUL-terminated) or NULL if the file has none. */
const char *tokenizer_chat_template(const tokenizer *t);
/* `tokenizer.ggml.pre` as read (e.g. "smollm"). */
const char *tokenizer_pre_name(const tokenizer *t);
/* White space an added token absorbs (HF AddedToken, from tokenizer.json via
 * `tokenizer.qlora.lstrip` / `rstrip`): bit 1 = on its left, bit 2 = on its
 * right; 0 for other tokens. */
int tokenizer_token_strip(const tokenizer *t, int32_t id);
/* 1 for SentencePiece BPE (`tokenizer.ggml.model` "llama"), 0 for byte-level BPE. */
int tokenizer_is_spm(const tokenizer *t);
/* SentencePiece BPE that puts U+2581 in front of a segment (add_space_prefix). */
int tokenizer_add_space_prefix(const tokenizer *t);
/* The merges a SentencePiece vocabulary without `tokenizer.ggml.merges` was
 * given (derived from its scores, rank order: left[i] + right[i] is merge i);
 * returns their number, 0 (NULL arrays) when the file stored merges or the
 * vocabulary is byte-level. The arrays belong to t. */
int64_t tokenizer_derived_merges(const tokenizer *t, const int32_t **left, const int32_t **right);

#endif
