/* tests/e2e_run.h — set-up shared by the end-to-end tests that run
 * bin/qlora-train as a subprocess on the real model (test_e2e_resume,
 * test_e2e_sophia): a scratch directory with a few held-out man pages as
 * training data and a small config, a run into an output_dir, and
 * metrics.jsonl reduced to what must be reproducible.
 */
#ifndef QLORA_TESTS_E2E_RUN_H
#define QLORA_TESTS_E2E_RUN_H

#include <stddef.h>

#define E2E_MODEL "models/SmolLM2-135M-Instruct.Q4_1.gguf"
#define E2E_HELDOUT "datasets/manpages/heldout.jsonl"

/* Makes dir = "/tmp/<prefix>XXXXXX" (mkdtemp; dn bytes) holding
 *  - train.jsonl: the first 4 documents of E2E_HELDOUT, each cut to 699 bytes
 *    of text and, with drop_last_word, before the last space of that;
 *  - config.yaml (its path into cfg, cn bytes): the model, LoRA r 4 on
 *    q_proj/v_proj, that data (completion), 1 held-out row, sequence_len 64,
 *    micro_batch_size 2, no accumulation; then `keys` (YAML lines, each ending
 *    in a newline); then num_threads from QLORA_TEST_THREADS (default 1).
 * Returns 0, or -1 (with a hint on stderr when the model or data is missing). */
int e2e_setup(char *dir, size_t dn, char *cfg, size_t cn, const char *prefix, int drop_last_word, const char *keys);

/* Runs `qlora-train cfg output_dir=<out_dir> extra_args...` (extra_args NULL or
 * NULL-terminated; env_extra as subproc_run) to completion, at most 900 s.
 * Returns the exit code; *err (malloc'd) gets its stderr. */
int e2e_run_trainer(const char *cfg, const char *out_dir, const char *const *extra_args,
                    const char *const *env_extra, char **err);

/* <dir>/metrics.jsonl, each record reprinted by cJSON (unformatted), one a
 * line: with keep (NULL-terminated) only those keys, in that order; with drop
 * (NULL-terminated) without those keys. malloc'd; fails the test when the file
 * is missing or a line is not JSON. */
char *e2e_metrics_canonical(const char *dir, const char *const *keep, const char *const *drop);

/* Fails the test unless files a and b hold the same bytes. */
void e2e_assert_same_file(const char *a, const char *b);

#endif
