/* data/tokenizer_json.h — Hugging Face tokenizer.json, both directions.
 *
 * tokenizer.json is the `tokenizers` library's serialization
 * (tokenizers/src/tokenizer/serialization.rs): added_tokens, normalizer,
 * pre_tokenizer, post_processor, decoder and model ({"type": "BPE", vocab,
 * merges, ...}). Byte-level BPE (GPT-2, SmolLM, Llama 3, Qwen2 with its NFC
 * normalizer) and SentencePiece-style BPE with byte_fallback (Llama 2,
 * Mistral, Phi-3) in both layouts: the legacy normalizer
 * Sequence[Prepend(U+2581), Replace(" ", U+2581)] without pre-tokenizer, and
 * no normalizer with Metaspace(U+2581, prepend_scheme, split false). Any other
 * model type, normalizer, pre-tokenizer, BPE option (dropout, subword
 * prefixes, ignore_merges with byte_fallback) or the added-token flag
 * single_word is refused with one line naming it; lstrip / rstrip are honoured
 * (tokenizer.qlora.lstrip / rstrip: int32 arrays of token ids).
 *
 * The pre-tokenizers map to llama.cpp's `tokenizer.ggml.pre` names, which is
 * what data/tokenizer.c implements:
 *   Sequence[Digits(individual_digits), ByteLevel(use_regex)]  <-> "smollm"
 *   ByteLevel(use_regex)                                      <-> "gpt2"
 *   Sequence[Split(Llama 3 regex, Isolated), ByteLevel(no regex)] <-> "llama-bpe"
 *     (with model.ignore_merges = true)
 *   Sequence[Split(Qwen2 regex, Isolated), ByteLevel(no regex)] <-> "qwen2"
 *     (normalizer NFC)
 *   SentencePiece BPE (byte_fallback) <-> tokenizer.ggml.model "llama", pre "default"
 * (convert_hf_to_gguf.py identifies them by hashing encodings; here the
 * structure is compared directly.)
 */
#ifndef QLORA_DATA_TOKENIZER_JSON_H
#define QLORA_DATA_TOKENIZER_JSON_H

#include "core/status.h"
#include "data/tokenizer.h"
#include "format/gguf.h"

/* Write tokenizer.json for the tokenizer stored in a GGUF (tokenizer.ggml.*):
 * vocab in id order, merges in rank order, control (type 3) tokens as special
 * added tokens and user-defined (type 4) ones as non-special added tokens, the
 * pre-tokenizer of tokenizer.ggml.pre as above, a ByteLevel decoder, and a
 * TemplateProcessing post-processor that prepends bos when
 * tokenizer.ggml.add_bos_token is set. For "llama" (SentencePiece) Llama 2's
 * layout: byte_fallback, fuse_unk, the legacy normalizer, its decoder, and the
 * merges derived from the scores when the file has none. Errors: model not
 * "gpt2"/"llama", unknown pre. */
int tokenizer_json_write_from_gguf(const gguf_file *f, const char *path, qerr *e);

/* Load a tokenizer from an HF directory's tokenizer.json (vocab, merges,
 * added tokens, pre-tokenizer) and tokenizer_config.json (bos/eos/pad/unk
 * tokens, add_bos_token / add_eos_token, chat_template). Both paths are
 * files; config_path may be NULL. Implemented by translating them to GGUF
 * tokenizer metadata in memory (a memfd) and calling tokenizer_load_gguf, so
 * both sources share one tokenizer implementation. */
int tokenizer_load_hf(const char *json_path, const char *config_path, tokenizer **out, qerr *e);

/* The translation step alone: the tokenizer as GGUF metadata (tokenizer.ggml.*,
 * tokenizer.chat_template) in an in-memory GGUF without tensors, for code
 * that reads tokenizer metadata from a gguf_file (the tokenizer, checkpoint
 * fingerprints). Close with gguf_close. */
int tokenizer_hf_to_gguf(const char *json_path, const char *config_path, gguf_file **out, qerr *e);

#endif
