/* trainer/unfreeze.h — axolotl's unfrozen_parameters under an adapter.
 *
 * What axolotl 0.19.0 does (src/axolotl/train.py setup_model_and_tokenizer, utils/freeze.py): after
 * ModelLoader.load() has wrapped the model in PEFT (so every parameter name starts with
 * "base_model.model.", the LoRA weights are "...q_proj.lora_A.default.weight" and the frozen base
 * linears "...q_proj.base_layer.weight"), freeze_layers_except sets requires_grad = False on EVERY
 * parameter, then True on those whose name a pattern matches. A pattern is a Python regex in which
 * each "." not followed by "+" is made literal, matched with re.match (anchored at the start, not
 * at the end); a trailing "[a:b]" range keeps only those rows trainable (a gradient hook). Nothing
 * resets requires_grad afterwards: the trainer optimizes exactly the matched set. Patterns written
 * for the unwrapped names ("^model.language_model.*", "^lm_head.*": axolotl's Gemma 3 examples) so
 * match nothing, and axolotl freezes every parameter, the LoRA weights too ("All parameters are
 * frozen. Model will not be trained.").
 *
 * qlora evaluates the patterns the same way (PCRE2, anchored) over the PEFT names of the model it
 * loaded (unfreeze_peft_names: HF's text-only class names, e.g. Gemma3ForCausalLM's "model.layers.N")
 * and decides (unfreeze_decide): the matched set is exactly what qlora trains (every LoRA weight and
 * modules_to_save copy) -> accepted, nothing changes; nothing matches -> accepted, qlora trains the
 * LoRA adapters the adapter keys ask for where axolotl would train nothing (one [config] line says
 * so); anything else (a base weight unfrozen, some adapters frozen, a range) -> refused, naming the
 * parameters.
 */
#ifndef QLORA_TRAINER_UNFREEZE_H
#define QLORA_TRAINER_UNFREEZE_H

#include <stddef.h>

#include "core/status.h"
#include "model/llama.h"

/* unfreeze_pattern_check: one unfrozen_parameters entry compiles (axolotl's rewrite, PCRE2). Errors:
 * the compiler's message and offset. */
int unfreeze_pattern_check(const char *pattern, qerr *e);

/* unfreeze_peft_names: the parameter names PEFT's named_parameters() gives for this model with LoRA
 * on the target[] linears and modules_to_save copies save[] (tied weights listed once, as PyTorch
 * does). *trainable[i] = 1 for the parameters qlora trains. Malloc'd: free each names[i], names,
 * trainable. Errors: out of memory. */
int unfreeze_peft_names(const llama_hparams *hp, const int target[LLAMA_N_LINEAR], const int save[LORA_N_SAVE],
                        char ***names, unsigned char **trainable, int *n, qerr *e);

/* unfreeze_match: match[i] = 1 when a pattern matches names[i] (axolotl's LayerNamePattern: "." not
 * followed by "+" made literal, anchored at the start). Errors: a pattern that does not compile, a
 * row range ("name$[a:b]": not implemented). */
int unfreeze_match(char *const *patterns, int n_patterns, char *const *names, int n, unsigned char *match, qerr *e);

/* unfreeze_decide: the decision above for patterns[0..n_patterns). 0: accepted, with the [config] line
 * (without the prefix) in note; -1: refused (e names the matched or left-out parameters and why). */
int unfreeze_decide(char *const *patterns, int n_patterns, const llama_hparams *hp, const int target[LLAMA_N_LINEAR],
                    const int save[LORA_N_SAVE], char *note, size_t note_len, qerr *e);

#endif
