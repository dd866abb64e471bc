/* trainer/preprocess.h — "what exactly is the model trained on?"
 *
 * Tokenizes, masks and packs the datasets of a config exactly as qlora-train
 * does (dataset_build with the config's seed), prints the data statistics,
 * and shows the first rows in the order the first epoch visits them, with the
 * label mask made visible (docs/design.md "Known traps": chat-template / EOS
 * mismatches). Like axolotl's `preprocess --debug`. Only the tokenizer of the
 * base model is loaded, not its weights.
 */
#ifndef QLORA_TRAINER_PREPROCESS_H
#define QLORA_TRAINER_PREPROCESS_H

#include <stdio.h>

#include "core/status.h"
#include "trainer/config.h"

typedef enum preprocess_view {
    PREPROCESS_TEXT = 0,   /* decoded text; tokens NOT trained on inside [[ ]] (dataset_row_describe) */
    PREPROCESS_TOKENS = 1, /* one token per entry: text(id, label) with label -100 when masked */
} preprocess_view;

/* Print statistics and the first n_rows rows of the training set (eval = 1:
 * of the held-out set) to out. color = 1 adds ANSI colours (masked red,
 * trained green) to the tokens view. */
int preprocess_show(const train_config *c, int n_rows, int eval, preprocess_view view, int color, FILE *out,
                    qerr *e);

#endif
