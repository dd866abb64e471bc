/* trainer/config_axolotl.h — a decision for every key of axolotl's config schema.
 *
 * The one table of what qlora does with each key axolotl 0.19.0 knows (its
 * AxolotlInputConfig with mixins, the liger and cut_cross_entropy plugin
 * args, and SFTDataset for one `datasets:` entry; the lists are
 * tests/fixtures/axolotl/{schema,dataset}_keys.txt, written by
 * scripts/axolotl_schema_keys.py). README "Coming from axolotl" is this
 * table; tests/test_axolotl.c checks that every schema key has a row and
 * that the README lists every row.
 *
 * Decisions:
 *   AX_IMPL    implemented: a row of trainer/config.c's KEYS, or a key whose
 *              values trainer/config.c checks itself (chat_template,
 *              special_tokens, eot_tokens, plugins, data_seed, ...); `why`
 *              says what is done where it is not the obvious meaning.
 *   AX_SAFE    accepted because it cannot change the result here; a value
 *              other than null/false/0/empty gives one `[config]` line
 *              "ignoring "key" (why)".
 *   AX_REFUSE  accepted only when null/false/0/empty (how axolotl's own
 *              examples list keys they do not use) or equal to `allowed`;
 *              any other value is refused with `why`.
 *   AX_MULTI   a key of several processes (FSDP, DeepSpeed, DDP, parallelism
 *              degrees): README "Several processes" decides; here the same as
 *              AX_REFUSE.
 */
#ifndef QLORA_TRAINER_CONFIG_AXOLOTL_H
#define QLORA_TRAINER_CONFIG_AXOLOTL_H

typedef enum ax_decision { AX_IMPL, AX_SAFE, AX_REFUSE, AX_MULTI } ax_decision;

typedef struct ax_key {
    const char *name;
    ax_decision decision;
    const char *allowed; /* AX_REFUSE: one accepted value besides "unset" (a bool is compared as a bool), or NULL */
    const char *why;     /* the reason shown in the [config] line or the refusal; NULL for plain AX_IMPL */
} ax_key;

/* The row of a top-level key, or NULL if axolotl has no such key. */
const ax_key *axolotl_key(const char *name);
/* The row of a key of one `datasets:` / `test_datasets:` entry, or NULL. */
const ax_key *axolotl_dataset_key(const char *name);
/* All rows, for the README check and suggestions: *n gets the count. */
const ax_key *axolotl_keys(int *n);
const ax_key *axolotl_dataset_keys(int *n);
/* "implemented", "accepted (cannot change the result)", "refused", "several processes". */
const char *axolotl_decision_name(ax_decision d);

/* The reason every AX_MULTI key is refused with (until README "Several processes" implements it). */
#define AX_MULTI_WHY "a setting of several processes that is not implemented (see README \"Several processes\")"

#endif
