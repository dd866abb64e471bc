/* data/chat.h — chat templates: the model's Jinja chat template, rendered
 * exactly as transformers' apply_chat_template renders it, for
 * `chat_template` datasets, qlora-generate and merged exports.
 *
 * Templates are recognised, not interpreted: the template's source (leading
 * and trailing white space stripped) is hashed (XXH64) and looked up in a
 * table of known templates, each rendered by C code written from its Jinja
 * source. A template that is not in the table is refused with its hash and
 * first characters — never approximated (a ChatML-looking template that
 * differs in one character may render differently). Known templates:
 *
 *   SmolLM2      ChatML, default system turn "You are a helpful AI assistant
 *                named SmolLM, trained by Hugging Face"
 *   Qwen2        ChatML, default system turn "You are a helpful assistant"
 *                (the template in Qwen2's GGUF)
 *   Qwen2.5      ChatML, default system turn "You are Qwen, created by
 *                Alibaba Cloud. You are a helpful assistant."; a later system
 *                message is a turn of its own (Qwen2.5-7B-Instruct, no tools)
 *   Llama 3.1    <|begin_of_text|>, a system header with "Cutting Knowledge
 *                Date: December 2023\nToday Date: 26 Jul 2024\n\n" and the
 *                system message (trimmed), turns
 *                <|start_header_id|>role<|end_header_id|>\n\n content|trim
 *                <|eot_id|> (Llama-3.1-8B-Instruct, no tools)
 *   Llama 2      <s>[INST] <<SYS>>\n system \n<</SYS>>\n\n user [/INST]
 *                assistant </s> (Llama-2-chat; strip() on contents; roles
 *                must alternate user/assistant)
 *   Mistral v3   <s>[INST]user[/INST]assistant</s>; the system message goes
 *                before the last user turn, and only when the conversation
 *                ends with that user turn (Mistral-Nemo-Instruct-2407; roles
 *                must alternate)
 *   Phi-3        <s><|user|>\n user <|end|>\n<|assistant|>\n assistant
 *                <|end|>\n (Phi-3-mini's GGUF; system messages are dropped)
 *   Phi-3.5      <|system|>\n..<|end|>\n <|user|>\n..<|end|>\n
 *                <|assistant|>\n..<|end|>\n, then <|assistant|>\n or eos
 *                (Phi-3.5-mini-instruct)
 *
 * axolotl's own templates (chat_template: <name>, the .jinja files of
 * axolotl 0.19.0's src/axolotl/utils/chat_templates/templates), recognised
 * by the same hashes: chatml (ChatML without a default system turn), qwen_25
 * (the Qwen2.5 text itself), llama3 (bos once, no system header, content|trim,
 * any role), mistral_v1 (" [INST] ", system before the first user turn,
 * " " content eos), mistral_v2v3 ("[INST] ", system before the last user
 * turn, " " content|trim eos), mistral_v3_tekken (renders as Mistral v3),
 * phi_3 (Phi-3 with <|system|> turns), phi_35 (Phi-3.5 without the final
 * eos), gemma3 (Gemma 3's: bos, <start_of_turn>user / model turns with
 * content|trim and <end_of_turn>\n, a system message folded into the first
 * user turn, roles alternating). llama3_2_vision is refused (its header
 * carries the day's date); gemma (Gemma 1 / 2, families qlora does not run).
 *
 * Roles: system, user and assistant; any other role ("tool", ...) is refused
 * by name, as are conversations a template itself rejects (raise_exception).
 * Trained spans (train_on_inputs: false): each assistant message's content
 * through the template's end-of-turn token (<|im_end|>, <|eot_id|>, </s>,
 * <|end|>, <end_of_turn>), not the text after it.
 * Reference: tests/test_reference_chat_templates.c compares strings and ids
 * with apply_chat_template over the real Jinja files.
 */
#ifndef QLORA_DATA_CHAT_H
#define QLORA_DATA_CHAT_H

#include <stddef.h>
#include <stdint.h>

#include "core/status.h"
#include "core/strbuf.h"
#include "data/tokenizer.h"

typedef struct chat_template chat_template; /* one entry of the table of known templates (static) */

typedef struct chat_message {
    const char *role, *content; /* NUL-terminated UTF-8 */
} chat_message;

/* Byte spans [v[2i], v[2i+1]) of a rendered text that are trained on.
 * Zero-initialise; free(v). */
typedef struct chat_spans {
    size_t *v;
    size_t n, cap; /* n spans (2n numbers) */
} chat_spans;

/* chat_template_find: the known template whose source is `source`.
 * Errors: NULL source, a template not in the table (the message names its
 * XXH64 and first characters, and the known ones). */
int chat_template_find(const char *source, const chat_template **out, qerr *e);
/* The template of the tokenizer (`tokenizer.chat_template`). */
int chat_template_of(const tokenizer *t, const chat_template **out, qerr *e);
/* Its name, e.g. "Llama 3.1". */
const char *chat_template_name(const chat_template *ct);
/* XXH64 of a template source after stripping leading/trailing white space. */
uint64_t chat_template_hash(const char *source);

/* chat_template_named: axolotl's template of that name (chat_template: <name>).
 * Errors: a name refused with its reason (llama3_2_vision: the day's date;
 * alpaca), any other name (the message lists the accepted ones). */
int chat_template_named(const char *name, const chat_template **out, qerr *e);
/* axolotl's name for the template's text ("qwen_25", "llama3", ...), or NULL. */
const char *chat_template_axolotl_name(const chat_template *ct);
/* The Jinja text of axolotl 0.19.0's template of that name, byte for byte as axolotl reads
 * templates/<name>.jinja (data/chat_axolotl_jinja.inc), for writing into an exported tokenizer as
 * axolotl saves it; NULL when the template is not one of axolotl's named ones. */
const char *chat_template_axolotl_source(const chat_template *ct);
/* 1 for the Mistral templates, which render the system message inside a user
 * turn: axolotl's ChatTemplateStrategy.find_turn skips a leading system turn
 * there when the model's name contains "mistral", so its labels depend on the
 * name (data/jsonl.c refuses what that would change). */
int chat_template_system_in_user_turn(const chat_template *ct);

/* The text of the token that ends a turn in this template: <|im_end|>,
 * <|eot_id|>, <|end|>, or the tokenizer's eos (Llama 2, Mistral); NULL when
 * that is eos and the tokenizer has none (<end_of_turn> for gemma3). */
const char *chat_template_eot(const chat_template *ct, const tokenizer *t);

/* chat_render: append the rendering of msgs[0..n) to `out` exactly as
 * apply_chat_template(msgs, tokenize=False, add_generation_prompt) renders
 * the template, with bos_token / eos_token the texts of the tokenizer's bos
 * and eos. When `spans` is not NULL, the trained spans (offsets into `out`)
 * are appended. Errors (nothing appended to spans; `out` may hold a partial
 * rendering): a role the template does not render, a conversation the
 * template rejects, bos/eos missing when the template uses them, out of
 * memory. */
int chat_render(const chat_template *ct, const tokenizer *t, const chat_message *msgs, int n,
                int add_generation_prompt, strbuf *out, chat_spans *spans, qerr *e);

/* Stop tokens for generation: eos, then the end-of-turn token of the
 * template (<|im_end|>, <|eot_id|>, <|end|>, <end_of_turn>, <|endoftext|>)
 * when it is in the vocabulary and differs from eos. Returns how many ids
 * were written to out (<= max). */
int chat_stop_ids(const tokenizer *t, int32_t *out, int max);

/* The prompt text for one user message with the generation prompt appended
 * (add_generation_prompt=True), rendered by chat_render with the messages
 * [system (if not NULL), user]. Malloc'd in *out. Errors: no template, a
 * template not known, those of chat_render. */
int chat_render_prompt(const tokenizer *t, const char *system, const char *user, char **out, qerr *e);

#endif
