/* data/chat.h — what inference needs from the chat template: the prompt of
 * one user turn and the tokens that end the assistant's turn.
 *
 * Templates are recognised, not executed (no Jinja engine), like the
 * trainer's chat_template datasets (data/dataset.h): ChatML
 * ("<|im_start|>role\ncontent<|im_end|>\n", with the template's default
 * system turn) and Llama 3 ("<|start_header_id|>role<|end_header_id|>\n\n
 * content<|eot_id|>", bos first). Other templates are reported as not
 * supported.
 */
#ifndef QLORA_DATA_CHAT_H
#define QLORA_DATA_CHAT_H

#include <stdint.h>

#include "core/status.h"
#include "data/tokenizer.h"

/* Stop tokens for generation: eos, then the end-of-turn token of the
 * template (<|im_end|>, <|eot_id|>, <|end|>, <end_of_turn>, <|endoftext|>)
 * when it is in the vocabulary and differs from eos. Returns how many ids
 * were written to out (<= max). */
int chat_stop_ids(const tokenizer *t, int32_t *out, int max);

/* The prompt text for one user message with the generation prompt appended
 * (add_generation_prompt=True). system: NULL = the template's default system
 * turn (if any). Malloc'd in *out. Errors: no template, unsupported template. */
int chat_render_prompt(const tokenizer *t, const char *system, const char *user, char **out, qerr *e);

#endif
