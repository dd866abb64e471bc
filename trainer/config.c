/* trainer/config.c — YAML config loading, overrides, validation and writing.
 *
 * Parsing uses libyaml's document API (yaml_parser_load): the whole file becomes
 * a node tree whose marks give line numbers for messages. Every implemented key
 * is a row of `KEYS` (kind, struct offset, range, accepted values), so loading,
 * validating and writing walk the same table. Key names and meanings follow
 * axolotl (src/axolotl/utils/schemas/ config.py, peft.py, training.py,
 * datasets.py); see config.h for the policy on keys
 * axolotl has and we do not.
 */
#include "trainer/config.h"
#include "trainer/config_axolotl.h"
#include "model/llama.h"
#include "trainer/unfreeze.h"

#include <yaml.h>

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "core/file.h"
#include "data/dataset.h"
#include "model/llama_linear.h"


/* ------------------------------------------------------------------------ */
/* Key tables                                                                 */

typedef enum key_kind {
    K_STR,      /* char *, non-empty */
    K_BOOL,     /* int 0/1 */
    K_BF16,     /* int 0/1, also "auto" = 1 */
    K_INT,      /* int with range */
    K_FLOAT,    /* float with range */
    K_DOUBLE,   /* double with range */
    K_ENUM,     /* char *, one of `values` (after `aliases`) */
    K_MODULES,  /* char ** + int count: PEFT names of model/llama_linear.h */
    K_DATASETS, /* dataset_cfg * + int count */
} key_kind;

enum {
    F_LO_OPEN = 1u,       /* v > lo instead of v >= lo */
    F_HI_OPEN = 2u,       /* v < hi instead of v <= hi */
    F_ALSO_MINUS1 = 4u,   /* -1 is also accepted (max_steps) */
    F_WHOLE_IF_GE1 = 8u,  /* values >= 1 must be whole numbers (val_set_size) */
    F_OPTIONAL = 16u,     /* null is the key's documented "none" (trainer/config.h); every other key
                             refuses an empty value */
};

typedef struct value_alias {
    const char *from, *to;
    const char *note; /* warning text, or NULL for a silent alias */
} value_alias;

typedef struct value_later {
    const char *value;
    const char *status; /* "not implemented yet" | "not supported yet" */
} value_later;

typedef struct key_spec {
    const char *name;
    key_kind kind;
    size_t off;   /* offsetof(train_config, field) */
    size_t off_n; /* count field for lists */
    double lo, hi;
    unsigned flags;
    const char *expect;                /* "a positive integer" */
    const char *const *values;         /* K_ENUM: canonical values, NULL-terminated */
    const value_alias *aliases;        /* K_ENUM: {NULL} terminated */
    const value_later *later;          /* K_ENUM: known values we do not do yet */
    const char *alias_of;              /* another spelling of this key */
} key_spec;

static const char *const V_QUANT[] = {"nf4", NULL};
static const value_later L_QUANT[] = {{"fp4", "not supported yet"}, {NULL, NULL}};
static const char *const V_ADAPTER[] = {"qlora", "lora", NULL};
static const char *const V_SCHED[] = {"cosine", "linear", "constant", NULL};
static const value_alias A_SCHED[] = {{"constant_with_warmup", "constant", NULL}, {NULL, NULL, NULL}};
static const value_later L_SCHED[] = {
    {"cosine_with_restarts", "not supported yet"}, {"polynomial", "not supported yet"},
    {"inverse_sqrt", "not supported yet"}, {"reduce_lr_on_plateau", "not supported yet"},
    {"cosine_with_min_lr", "not supported yet"}, {"warmup_stable_decay", "not supported yet"},
    {"one_cycle", "not supported yet"}, {"rex", "not supported yet"}, {NULL, NULL}};
static const char *const V_OPTIM[] = {"adamw", "sophia", "adamw_8bit", NULL};
static const char *const V_DEVICE[] = {"auto", "cpu", "cuda", NULL};
static const value_alias A_OPTIM[] = {
    {"adamw_torch", "adamw", NULL},
    {"adamw_torch_fused", "adamw", NULL},
    {"paged_adamw_32bit", "adamw",
     "optimizer: \"paged_adamw_32bit\" runs as \"adamw\" (paging is a CUDA memory feature; the update is the same)"},
    {"sophiag", "sophia", NULL},
    {"adamw_bnb_8bit", "adamw_8bit", NULL},
    {"paged_adamw_8bit", "adamw_8bit",
     "optimizer: \"paged_adamw_8bit\" runs as \"adamw_8bit\" (bitsandbytes' 8-bit AdamW; paging is a CUDA memory "
     "feature, the update is the same)"},
    {NULL, NULL, NULL}};
static const value_later L_OPTIM[] = {
    {"adamw_torch_8bit", "torchao's 8-bit AdamW, not implemented here; optimizer: adamw_8bit is bitsandbytes' (blockwise 8-bit states)"},
    {"adamw_torch_4bit", "torchao's 4-bit AdamW, not implemented here; optimizer: adamw_8bit is bitsandbytes' (blockwise 8-bit states)"},
    {"adafactor", "not supported yet"}, {"sgd", "not supported yet"}, {"adagrad", "not supported yet"},
    {"lion_8bit", "not supported yet"}, {"lion_32bit", "not supported yet"},
    {"paged_lion_8bit", "not supported yet"}, {"paged_lion_32bit", "not supported yet"},
    {"ademamix", "not supported yet"}, {"ademamix_8bit", "not supported yet"},
    {"galore_adamw", "not supported yet"}, {"adopt_adamw", "not supported yet"},
    {"muon", "not supported yet"}, {"schedule_free_adamw", "not supported yet"},
    {"optimi_adamw", "not supported yet"}, {"ao_adamw_8bit", "not supported yet"},
    {NULL, NULL}};
static const char *const V_DSTYPE[] = {"completion", "alpaca", "chat_template", "input_output", NULL};
/* chat_template (axolotl's ChatTemplate names): the model's own template (tokenizer_default), or one of
 * axolotl's templates qlora renders exactly (data/chat.h chat_template_named, checked against axolotl's
 * Jinja by tests/test_reference_axolotl_chat.c), or jinja with chat_template_jinja a text qlora
 * recognises; the other names are refused by name with the reason. */
static const char *const V_CHAT[] = {"tokenizer_default", "chatml", "qwen_25", "llama3", "mistral_v1", "mistral_v2v3",
                                     "mistral_v3_tekken", "phi_3", "phi_35", "gemma3", "jinja",
                                     "tokenizer_default_fallback_chatml", "tokenizer_default_fallback_llama3", NULL};
#define CHAT_FAMILY "the template of a model family qlora does not run (it runs Llama, Mistral, Qwen2, Phi-3 and Gemma 3 architectures)"
#define CHAT_FORMAT "a template qlora does not render (no Jinja engine: templates are rendered by C code checked against axolotl's)"
static const value_later L_CHAT[] = {
    {"alpaca", "not rendered here; use type: alpaca for instruction / input / output records"},
    {"llama3_2_vision", "its system header carries the day's date (strftime_now), so the same data renders differently "
                        "from day to day; use llama3, or tokenizer_default with Llama 3.1 (its fixed \"26 Jul 2024\")"},
    {"tokenizer_default_fallback_alpaca", "the alpaca template is not rendered here; use type: alpaca"},
    {"tokenizer_default_fallback_mistral", "axolotl has no template named \"mistral\" (its fallback fails there "
                                           "too); use tokenizer_default_fallback_chatml or one of mistral_v1, "
                                           "mistral_v2v3, mistral_v3_tekken"},
    {"mistral_v7_tekken", CHAT_FORMAT}, {"gemma", "the template of Gemma 1 and Gemma 2, model families qlora does not run (it runs Gemma 3: chat_template: gemma3 renders the same turns and folds a system message into the first user turn)"}, {"cohere", CHAT_FAMILY}, {"llama4", CHAT_FAMILY},
    {"deepseek_v2", CHAT_FAMILY}, {"deepseek_v3", CHAT_FAMILY}, {"jamba", CHAT_FAMILY}, {"qwen3", CHAT_FAMILY},
    {"falcon_h1", CHAT_FAMILY}, {"exaone", CHAT_FAMILY}, {"metharme", CHAT_FORMAT}, {"pixtral", CHAT_FAMILY},
    {"llava", CHAT_FAMILY}, {"qwen2_vl", CHAT_FAMILY}, {"gemma3n", CHAT_FAMILY},
    {"command_a", CHAT_FAMILY}, {"command_a_tool_use", CHAT_FAMILY}, {"command_a_rag", CHAT_FAMILY},
    {"aya", CHAT_FAMILY}, {NULL, NULL}};
/* lora_modules_to_save: the Llama modules PEFT's modules_to_save can copy that qlora trains (the
 * embedding and the LM head; README "lora_modules_to_save"). */
static const char *const V_MODULES_TO_SAVE[] = {"embed_tokens", "lm_head", NULL};
static const char *const V_EOS[] = {"turn", "all", "last", "none", NULL};

/* The values lora_target_modules accepts: the PEFT names of model/llama_linear.h (Llama's seven, then
 * Phi-3's fused qkv_proj and gate_up_proj), NULL-terminated (the shape the enum helpers below take). Which
 * of them the base model has is checked once it is loaded (trainer/run.c). */
static const char *const *module_values(void) {
    static const char *v[LLAMA_N_LINEAR + 3];
    int n = 0;
    for (int k = 0; k < LLAMA_N_LINEAR; k++) v[n++] = llama_linears[k].peft;
    for (int k = 0; k < LLAMA_N_LINEAR; k++)
        if (llama_linears_phi3[k].peft && llama_linear_from_peft(llama_linears_phi3[k].peft,
                                                                 strlen(llama_linears_phi3[k].peft)) < 0)
            v[n++] = llama_linears_phi3[k].peft;
    v[n] = NULL;
    return v;
}

#define OFF(f) offsetof(train_config, f)
#define INTMAX_D ((double)INT_MAX)

/* The implemented keys, in the order train_config_write_yaml writes them. */
static const key_spec KEYS[] = {
    {.name = "base_model", .kind = K_STR, .off = OFF(base_model), .expect = "a path to a .gguf file or a Hugging Face model directory"},
    {.name = "load_in_4bit", .kind = K_BOOL, .off = OFF(load_in_4bit)},
    {.name = "load_in_8bit", .kind = K_BOOL, .off = OFF(load_in_8bit)},
    {.name = "bnb_4bit_use_double_quant", .kind = K_BOOL, .off = OFF(bnb_4bit_use_double_quant)},
    {.name = "bnb_4bit_quant_type", .kind = K_ENUM, .off = OFF(bnb_4bit_quant_type), .values = V_QUANT, .later = L_QUANT},
    {.name = "adapter", .kind = K_ENUM, .off = OFF(adapter), .values = V_ADAPTER},
    {.name = "lora_r", .kind = K_INT, .off = OFF(lora_r), .lo = 1, .hi = INTMAX_D, .expect = "a positive integer"},
    {.name = "lora_alpha", .kind = K_FLOAT, .off = OFF(lora_alpha), .lo = 0, .hi = HUGE_VAL, .flags = F_LO_OPEN,
     .expect = "a positive number"},
    {.name = "lora_dropout", .kind = K_FLOAT, .off = OFF(lora_dropout), .lo = 0, .hi = 1, .flags = F_HI_OPEN,
     .expect = "a number in [0, 1)"},
    {.name = "peft_use_rslora", .kind = K_BOOL, .off = OFF(use_rslora)},
    {.name = "use_rslora", .kind = K_BOOL, .off = OFF(use_rslora), .alias_of = "peft_use_rslora"},
    {.name = "lora_target_modules", .kind = K_MODULES, .off = OFF(lora_target_modules),
     .off_n = OFF(n_lora_target_modules), .flags = F_OPTIONAL},
    {.name = "lora_target_linear", .kind = K_BOOL, .off = OFF(lora_target_linear)},
    {.name = "lora_modules_to_save", .kind = K_MODULES, .off = OFF(lora_modules_to_save),
     .off_n = OFF(n_lora_modules_to_save), .values = V_MODULES_TO_SAVE, .flags = F_OPTIONAL},
    {.name = "datasets", .kind = K_DATASETS, .off = OFF(datasets), .off_n = OFF(n_datasets)},
    {.name = "test_datasets", .kind = K_DATASETS, .off = OFF(test_datasets), .off_n = OFF(n_test_datasets),
     .flags = F_OPTIONAL},
    {.name = "val_set_size", .kind = K_DOUBLE, .off = OFF(val_set_size), .lo = 0, .hi = 2147483647.0,
     .flags = F_WHOLE_IF_GE1, .expect = "a fraction in [0, 1) or a whole number of examples >= 1"},
    {.name = "sequence_len", .kind = K_INT, .off = OFF(sequence_len), .lo = 2, .hi = INTMAX_D,
     .expect = "an integer >= 2"},
    {.name = "sample_packing", .kind = K_BOOL, .off = OFF(sample_packing)},
    {.name = "sample_packing_sequentially", .kind = K_BOOL, .off = OFF(sample_packing_sequentially)},
    {.name = "curriculum_sampling", .kind = K_BOOL, .off = OFF(curriculum_sampling)},
    {.name = "streaming", .kind = K_BOOL, .off = OFF(streaming)},
    {.name = "streaming_multipack_buffer_size", .kind = K_INT, .off = OFF(streaming_multipack_buffer_size), .lo = 1,
     .hi = INTMAX_D, .expect = "a positive integer (records packed together)"},
    {.name = "pretrain_multipack_attn", .kind = K_BOOL, .off = OFF(pretrain_multipack_attn)},
    {.name = "micro_batch_size", .kind = K_INT, .off = OFF(micro_batch_size), .lo = 1, .hi = INTMAX_D,
     .expect = "a positive integer"},
    {.name = "gradient_accumulation_steps", .kind = K_INT, .off = OFF(gradient_accumulation_steps), .lo = 1,
     .hi = INTMAX_D, .expect = "a positive integer"},
    {.name = "num_epochs", .kind = K_INT, .off = OFF(num_epochs), .lo = 1, .hi = INTMAX_D,
     .expect = "a positive integer"},
    {.name = "max_steps", .kind = K_INT, .off = OFF(max_steps), .lo = 1, .hi = INTMAX_D, .flags = F_ALSO_MINUS1,
     .expect = "a positive integer, or -1 for num_epochs"},
    {.name = "learning_rate", .kind = K_FLOAT, .off = OFF(learning_rate), .lo = 0, .hi = HUGE_VAL,
     .flags = F_LO_OPEN, .expect = "a positive number"},
    {.name = "lr_scheduler", .kind = K_ENUM, .off = OFF(lr_scheduler), .values = V_SCHED, .aliases = A_SCHED,
     .later = L_SCHED},
    {.name = "warmup_steps", .kind = K_INT, .off = OFF(warmup_steps), .lo = 0, .hi = INTMAX_D,
     .expect = "an integer >= 0"},
    {.name = "warmup_ratio", .kind = K_FLOAT, .off = OFF(warmup_ratio), .lo = 0, .hi = 1, .flags = F_HI_OPEN,
     .expect = "a number in [0, 1)"},
    {.name = "weight_decay", .kind = K_FLOAT, .off = OFF(weight_decay), .lo = 0, .hi = HUGE_VAL,
     .expect = "a number >= 0"},
    {.name = "max_grad_norm", .kind = K_FLOAT, .off = OFF(max_grad_norm), .lo = 0, .hi = HUGE_VAL,
     .expect = "a number >= 0 (0 = no clipping)"},
    {.name = "optimizer", .kind = K_ENUM, .off = OFF(optimizer), .values = V_OPTIM, .aliases = A_OPTIM,
     .later = L_OPTIM},
    {.name = "adam_beta1", .kind = K_FLOAT, .off = OFF(adam_beta1), .lo = 0, .hi = 1, .flags = F_HI_OPEN,
     .expect = "a number in [0, 1)"},
    {.name = "adam_beta2", .kind = K_FLOAT, .off = OFF(adam_beta2), .lo = 0, .hi = 1, .flags = F_HI_OPEN,
     .expect = "a number in [0, 1)"},
    {.name = "adam_epsilon", .kind = K_FLOAT, .off = OFF(adam_epsilon), .lo = 0, .hi = HUGE_VAL,
     .flags = F_LO_OPEN, .expect = "a positive number"},
    {.name = "sophia_beta1", .kind = K_FLOAT, .off = OFF(sophia_beta1), .lo = 0, .hi = 1, .flags = F_HI_OPEN,
     .expect = "a number in [0, 1)"},
    {.name = "sophia_beta2", .kind = K_FLOAT, .off = OFF(sophia_beta2), .lo = 0, .hi = 1, .flags = F_HI_OPEN,
     .expect = "a number in [0, 1)"},
    {.name = "sophia_rho", .kind = K_FLOAT, .off = OFF(sophia_rho), .lo = 0, .hi = HUGE_VAL, .flags = F_LO_OPEN,
     .expect = "a positive number"},
    {.name = "sophia_k", .kind = K_INT, .off = OFF(sophia_k), .lo = 1, .hi = INTMAX_D,
     .expect = "a positive integer (optimizer steps between Hessian updates)"},
    {.name = "sophia_bs", .kind = K_INT, .off = OFF(sophia_bs), .lo = 0, .hi = INTMAX_D,
     .expect = "an integer >= 0 (0 = the target tokens of each step)"},
    {.name = "seed", .kind = K_INT, .off = OFF(seed), .lo = 0, .hi = INTMAX_D, .expect = "an integer >= 0"},
    {.name = "output_dir", .kind = K_STR, .off = OFF(output_dir), .expect = "a directory path"},
    {.name = "logging_steps", .kind = K_INT, .off = OFF(logging_steps), .lo = 1, .hi = INTMAX_D,
     .expect = "a positive integer"},
    {.name = "eval_steps", .kind = K_INT, .off = OFF(eval_steps), .lo = 0, .hi = INTMAX_D,
     .expect = "an integer >= 0 (0 = only at start and end)"},
    {.name = "evals_per_epoch", .kind = K_INT, .off = OFF(evals_per_epoch), .lo = 0, .hi = INTMAX_D,
     .flags = F_OPTIONAL, .expect = "an integer >= 0"},
    {.name = "eval_max_tokens", .kind = K_INT, .off = OFF(eval_max_tokens), .lo = 0, .hi = INTMAX_D,
     .expect = "an integer >= 0 (0 = all)"},
    {.name = "train_on_inputs", .kind = K_BOOL, .off = OFF(train_on_inputs)},
    {.name = "bf16", .kind = K_BF16, .off = OFF(bf16)},
    {.name = "fp16", .kind = K_BOOL, .off = OFF(fp16), .flags = F_OPTIONAL}, /* empty = false, as axolotl's None */
    {.name = "device", .kind = K_ENUM, .off = OFF(device), .values = V_DEVICE},
    {.name = "gradient_checkpointing", .kind = K_BOOL, .off = OFF(gradient_checkpointing)},
    /* torchtitan's [activation_checkpoint] table: {mode: none|full|selective, selective_ac_option: op} */
    {.name = "activation_checkpoint", .kind = K_BOOL, .off = OFF(gradient_checkpointing),
     .alias_of = "gradient_checkpointing"},
    {.name = "num_threads", .kind = K_INT, .off = OFF(num_threads), .lo = 0, .hi = 65536,
     .expect = "an integer in [0, 65536] (0 = all cores)"},
    {.name = "save_steps", .kind = K_INT, .off = OFF(save_steps), .lo = 0, .hi = INTMAX_D,
     .expect = "an integer >= 0 (0 = unset: saves_per_epoch, else every 500 steps)"},
    {.name = "saves_per_epoch", .kind = K_INT, .off = OFF(saves_per_epoch), .lo = 0, .hi = INTMAX_D,
     .flags = F_OPTIONAL, .expect = "an integer >= 0"},
    {.name = "save_total_limit", .kind = K_INT, .off = OFF(save_total_limit), .lo = 0, .hi = INTMAX_D,
     .expect = "an integer >= 0 (0 = keep every checkpoint)"},
    {.name = "resume_from_checkpoint", .kind = K_STR, .off = OFF(resume_from_checkpoint), .flags = F_OPTIONAL,
     .expect = "a path to a checkpoint-<step> directory"},
    {.name = "auto_resume_from_checkpoints", .kind = K_BOOL, .off = OFF(auto_resume_from_checkpoints)},
    {.name = "max_nan_steps", .kind = K_INT, .off = OFF(max_nan_steps), .lo = 1, .hi = INTMAX_D,
     .expect = "a positive integer"},
    {.name = "skip_bad_lines", .kind = K_BOOL, .off = OFF(skip_bad_lines)},
    {.name = "memory_check", .kind = K_BOOL, .off = OFF(memory_check)},
    /* ---- several processes (trainer/train.h train_run_comm) ---- */
    {.name = "ddp_timeout", .kind = K_INT, .off = OFF(ddp_timeout), .lo = 1, .hi = INTMAX_D,
     .expect = "a positive number of seconds"},
    /* ---- end of several processes ---- */
    /* axolotl keys (trainer/config_axolotl.c decides the rest) */
    {.name = "data_seed", .kind = K_INT, .off = OFF(data_seed), .lo = 0, .hi = INTMAX_D, .flags = F_ALSO_MINUS1,
     .expect = "an integer >= 0 (-1 = seed)"},
    {.name = "loss_watchdog_threshold", .kind = K_FLOAT, .off = OFF(loss_watchdog_threshold), .lo = 0,
     .hi = HUGE_VAL, .expect = "a number >= 0 (0 = off)"},
    {.name = "loss_watchdog_patience", .kind = K_INT, .off = OFF(loss_watchdog_patience), .lo = 1, .hi = INTMAX_D,
     .expect = "a positive integer"},
    {.name = "chat_template", .kind = K_ENUM, .off = OFF(chat_template), .values = V_CHAT, .later = L_CHAT,
     .flags = F_OPTIONAL},
    {.name = "chat_template_jinja", .kind = K_STR, .off = OFF(chat_template_jinja), .flags = F_OPTIONAL,
     .expect = "a chat template text or a file holding it (one qlora renders: data/chat.h)"},
};
#define N_KEYS ((int)(sizeof KEYS / sizeof KEYS[0]))
_Static_assert(N_KEYS <= TRAIN_CONFIG_MAX_KEYS, "train_config.key_origin needs a slot per key");

/* Keys inside one datasets / test_datasets entry that this file parses; every other key of an entry
 * is decided by trainer/config_axolotl.c (axolotl_dataset_key). */
static const char *const DS_KEYS[] = {"path", "type", "field", "field_messages"};
#define N_DS_KEYS 4

/* ------------------------------------------------------------------------ */
/* Small helpers                                                              */

#define FIELD(c, off, T) ((T *)(void *)((char *)(c) + (off)))
#define CFIELD(c, off, T) ((const T *)(const void *)((const char *)(c) + (off)))
typedef char **strv_t; /* so CFIELD(c, off, strv_t) is char **const * */

static char *dup_str(const char *s) {
    if (!s) return NULL;
    size_t n = strlen(s);
    char *p = malloc(n + 1);
    if (p) memcpy(p, s, n + 1);
    return p;
}

/* Optimal-string-alignment (restricted Damerau-Levenshtein) distance,
 * case-insensitive; strings longer than 63 bytes compare as far apart. */
static int edit_distance(const char *a, const char *b) {
    size_t la = strlen(a), lb = strlen(b);
    if (la > 63 || lb > 63) return 1000;
    int d[64][64];
    for (size_t i = 0; i <= la; i++) d[i][0] = (int)i;
    for (size_t j = 0; j <= lb; j++) d[0][j] = (int)j;
    for (size_t i = 1; i <= la; i++) {
        for (size_t j = 1; j <= lb; j++) {
            int ca = tolower((unsigned char)a[i - 1]), cb = tolower((unsigned char)b[j - 1]);
            int cost = ca != cb;
            int best = d[i - 1][j] + 1;
            if (d[i][j - 1] + 1 < best) best = d[i][j - 1] + 1;
            if (d[i - 1][j - 1] + cost < best) best = d[i - 1][j - 1] + cost;
            if (i > 1 && j > 1 && ca == tolower((unsigned char)b[j - 2]) &&
                tolower((unsigned char)a[i - 2]) == cb && d[i - 2][j - 2] + 1 < best)
                best = d[i - 2][j - 2] + 1;
            d[i][j] = best;
        }
    }
    return d[la][lb];
}

/* Track the closest candidate for a "did you mean" hint. */
typedef struct suggest {
    const char *best;
    int dist;
} suggest;

/* Is cand a plausible meaning of the typo `word`, d edits away? A third of
 * the shorter length in edits (so nothing for words or candidates of 1-2
 * bytes: any two of those are two edits apart, and "did you mean \"rl\"" for
 * every short key helped nobody), or, from 4 common bytes on, one being a
 * prefix or suffix of the other ("lora_rank" -> "lora_r", "epochs" ->
 * "num_epochs"). */
static int suggest_close(const char *word, const char *cand, int d) {
    size_t lw = strlen(word), lc = strlen(cand), m = lw < lc ? lw : lc;
    if ((size_t)d <= m / 3) return 1;
    if (m < 4) return 0;
    size_t diff = lw > lc ? lw - lc : lc - lw;
    if ((size_t)d > diff) return 0;
    return !strncasecmp(word, cand, m) || !strncasecmp(word + lw - m, cand + lc - m, m);
}

static void suggest_try(suggest *s, const char *word, const char *cand) {
    int d = edit_distance(word, cand);
    if (d < s->dist && suggest_close(word, cand, d)) {
        s->dist = d;
        s->best = cand;
    }
}

/* Shortest decimal form that parses back to exactly v (as a float if
 * is_float, else as a double). A bare exponent form gets ".0" inserted so
 * PyYAML also reads it as a number ("1e-08" -> "1.0e-08"). */
static void fmt_shortest(char *buf, size_t n, double v, int is_float) {
    int maxp = is_float ? 9 : 17;
    for (int p = 1; p <= maxp; p++) {
        snprintf(buf, n, "%.*g", p, v);
        if (is_float ? (strtof(buf, NULL) == (float)v) : (strtod(buf, NULL) == v)) break;
    }
    char *ep = strchr(buf, 'e');
    if (ep && !strchr(buf, '.') && strlen(buf) + 3 < n) {
        memmove(ep + 2, ep, strlen(ep) + 1);
        ep[0] = '.';
        ep[1] = '0';
    }
}

static int parse_bool_str(const char *s, int *out) {
    static const char *const T[] = {"true", "yes", "on", "1"};
    static const char *const F[] = {"false", "no", "off", "0"};
    for (size_t i = 0; i < sizeof T / sizeof T[0]; i++) {
        if (!strcasecmp(s, T[i])) return *out = 1, 0;
        if (!strcasecmp(s, F[i])) return *out = 0, 0;
    }
    return -1;
}

/* Parse a whole string as a finite double (surrounding blanks allowed). */
static int parse_double_str(const char *s, double *out) {
    while (isspace((unsigned char)*s)) s++;
    if (!*s) return -1;
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    while (isspace((unsigned char)*end)) end++;
    if (*end || errno == ERANGE || !isfinite(v)) return -1;
    /* strtod also takes hex floats and "nan"/"inf": YAML numbers are decimal. */
    for (const char *q = s; q < end; q++)
        if (isalpha((unsigned char)*q) && *q != 'e' && *q != 'E') return -1;
    *out = v;
    return 0;
}

/* A whole number (decimal, or a float with no fractional part, e.g. "3.0"). */
static int parse_int_str(const char *s, long long *out) {
    double v;
    if (parse_double_str(s, &v)) return -1;
    if (v != floor(v) || fabs(v) > 9.0e15) return -1;
    *out = (long long)v;
    return 0;
}

static int range_ok(const key_spec *k, double v) {
    if ((k->flags & F_ALSO_MINUS1) && v == -1) return 1;
    if ((k->flags & F_LO_OPEN) ? !(v > k->lo) : !(v >= k->lo)) return 0;
    if ((k->flags & F_HI_OPEN) ? !(v < k->hi) : !(v <= k->hi)) return 0;
    if ((k->flags & F_WHOLE_IF_GE1) && v >= 1 && v != floor(v)) return 0;
    return 1;
}

static int add_warning(train_config *c, qerr *e, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int add_warning(train_config *c, qerr *e, const char *fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    char **w = realloc(c->warnings, (size_t)(c->n_warnings + 1) * sizeof *w);
    if (!w) return qerr_set(e, "out of memory");
    c->warnings = w;
    if (!(w[c->n_warnings] = dup_str(buf))) return qerr_set(e, "out of memory");
    c->n_warnings++;
    return 0;
}

/* load_in_8bit (issue 16 item 4): the base held as bitsandbytes' int8 (quant/int8.h). When it is set and
 * load_in_4bit was not given anywhere, load_in_4bit follows it (qlora's default NF4 gives way, as axolotl's
 * false default would); both given true is refused in train_config_validate. Adds the one [config] line
 * that says what load_in_8bit means here (once). */
static const key_spec *find_key(const char *name);
static int load_in_8bit_resolve(train_config *c, qerr *e) {
    const key_spec *k4 = find_key("load_in_4bit");
    if (c->key_origin[k4 - KEYS] == 0) c->load_in_4bit = !c->load_in_8bit;
    if (!c->load_in_8bit) return 0;
    for (int i = 0; i < c->n_warnings; i++)
        if (!strncmp(c->warnings[i], "load_in_8bit: ", 14)) return 0;
    return add_warning(c, e,
                       "load_in_8bit: true: the frozen linears are stored as bitsandbytes' Int8Params (int8 codes + "
                       "fp32 row absmax, 1 byte/param) and dequantized per layer to bf16; the matmul is bf16 with fp32 "
                       "accumulation. LLM.int8's int8 activation quantization and its outlier threshold "
                       "(llm_int8_threshold 6.0) are not applied");
}

static void free_str_list(char **v, int n) {
    for (int i = 0; i < n; i++) free(v[i]);
    free(v);
}

static void free_datasets(dataset_cfg *d, int n);
static void free_dataset_fields(dataset_cfg *d) { free_datasets(d, -1); }

/* n >= 0: the n entries and the array; n == -1: the fields of the one entry *d only. */
static void free_datasets(dataset_cfg *d, int n) {
    int all = n >= 0;
    if (n < 0) n = 1;
    for (int i = 0; i < n; i++) {
        free(d[i].path);
        free(d[i].type);
        free(d[i].field);
        free(d[i].field_messages);
        free(d[i].message_field_role);
        free(d[i].message_field_content);
        free_str_list(d[i].roles_to_train, d[i].n_roles_to_train);
        free(d[i].train_on_eos);
        free(d[i].train_on_eot);
        free(d[i].split);
        free(d[i].data_files);
        free(d[i].chat_template);
        free(d[i].chat_template_jinja);
    }
    if (all) free(d);
}

static const key_spec *find_key(const char *name) {
    for (int i = 0; i < N_KEYS; i++)
        if (!strcmp(KEYS[i].name, name)) return &KEYS[i];
    return NULL;
}

static int enum_index(const char *const *values, const char *s) {
    for (int i = 0; values[i]; i++)
        if (!strcmp(values[i], s)) return i;
    return -1;
}

static void join_values(char *buf, size_t n, const char *const *values) {
    buf[0] = 0;
    for (int i = 0; values[i]; i++) {
        size_t l = strlen(buf);
        snprintf(buf + l, n - l, "%s%s", i ? ", " : "", values[i]);
    }
}

/* ------------------------------------------------------------------------ */
/* Defaults / free                                                            */

int train_config_defaults(train_config *c) {
    memset(c, 0, sizeof *c);
    c->load_in_4bit = 1;
    c->bnb_4bit_use_double_quant = 1;
    c->lora_r = 8;
    c->lora_alpha = 16.0f;
    c->lora_dropout = 0.05f;
    c->val_set_size = 0.0;
    c->sequence_len = 512;
    c->sample_packing = 0;
    c->streaming_multipack_buffer_size = 10000;
    c->pretrain_multipack_attn = 1;
    c->micro_batch_size = 1;
    c->gradient_accumulation_steps = 1;
    c->num_epochs = 1;
    c->max_steps = -1;
    c->learning_rate = 2e-4f;
    c->warmup_steps = 0;
    c->warmup_ratio = 0.0f;
    c->weight_decay = 0.0f;
    c->max_grad_norm = 1.0f;
    c->adam_beta1 = 0.9f;
    c->adam_beta2 = 0.999f;
    c->adam_epsilon = 1e-8f;
    c->sophia_beta1 = 0.965f;
    c->sophia_beta2 = 0.99f;
    c->sophia_rho = 0.04f;
    c->sophia_k = 10;
    c->sophia_bs = 0;
    c->seed = 42;
    c->logging_steps = 1;
    c->bf16 = 1;
    c->gradient_checkpointing = 1;
    c->auto_resume_from_checkpoints = 1;
    c->max_nan_steps = 5;
    c->memory_check = 1;
    c->ddp_timeout = 1800; /* several processes */
    c->data_seed = -1;
    c->loss_watchdog_patience = 3;
    c->chat_template = dup_str("tokenizer_default");
    c->bnb_4bit_quant_type = dup_str("nf4");
    c->adapter = dup_str("qlora");
    c->lr_scheduler = dup_str("cosine");
    c->optimizer = dup_str("adamw");
    c->device = dup_str("auto");
    c->output_dir = dup_str("./outputs/lora-out");
    if (!c->bnb_4bit_quant_type || !c->adapter || !c->lr_scheduler || !c->optimizer || !c->device || !c->output_dir ||
        !c->chat_template)
        return -1;
    return 0;
}

void train_config_free(train_config *c) {
    if (!c) return;
    free(c->base_model);
    free(c->deepspeed); /* several processes */
    free(c->bnb_4bit_quant_type);
    free(c->adapter);
    free_str_list(c->lora_target_modules, c->n_lora_target_modules);
    free_str_list(c->lora_modules_to_save, c->n_lora_modules_to_save);
    free_datasets(c->datasets, c->n_datasets);
    free_datasets(c->test_datasets, c->n_test_datasets);
    free(c->lr_scheduler);
    free(c->optimizer);
    free(c->device);
    free(c->output_dir);
    free(c->resume_from_checkpoint);
    free(c->chat_template);
    free(c->chat_template_jinja);
    free(c->pretraining_path);
    free(c->pretraining_text_column);
    free_str_list(c->eot_tokens, c->n_eot_tokens);
    free_str_list(c->unfrozen_parameters, c->n_unfrozen_parameters);
    free(c->special_bos);
    free(c->special_eos);
    free(c->special_unk);
    free(c->config_path);
    free_str_list(c->warnings, c->n_warnings);
    free_str_list(c->overrides, c->n_overrides);
    memset(c, 0, sizeof *c);
}

/* ------------------------------------------------------------------------ */
/* Parsing one value                                                          */

typedef struct pctx {
    const char *src;          /* file name or "command line" */
    int lines;                /* append " (line N)" to messages */
    yaml_document_t *doc;
    train_config *c;
    const train_config *def;  /* defaults, for null values */
    qerr *e;
    int origin;               /* command line: the key_origin of what it sets (-1 - override index) */
    train_config_refusals *rl; /* a file: every refusal is recorded here and reading goes on; NULL: stop */
} pctx;

/* Record the refusal now in p->e (a file's reading goes on to list them all). Returns -1. */
static int record(const pctx *p) {
    if (!p->rl) return -1;
    char **v = realloc(p->rl->lines, (size_t)(p->rl->n + 1) * sizeof *v);
    if (!v) return -1;
    p->rl->lines = v;
    if ((v[p->rl->n] = strdup(p->e->msg))) p->rl->n++;
    return -1;
}

void train_config_refusals_free(train_config_refusals *r) {
    if (!r) return;
    for (int i = 0; i < r->n; i++) free(r->lines[i]);
    free(r->lines);
    r->lines = NULL;
    r->n = 0;
}

static int perr(const pctx *p, const yaml_node_t *at, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int perr(const pctx *p, const yaml_node_t *at, const char *fmt, ...) {
    char msg[800];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (p->lines && at)
        return qerr_set(p->e, "%s: %s (line %lu)", p->src, msg, (unsigned long)at->start_mark.line + 1);
    return qerr_set(p->e, "%s: %s", p->src, msg);
}

static const char *sval(const yaml_node_t *n) { return (const char *)n->data.scalar.value; }

static int is_null(const yaml_node_t *n) {
    if (!n) return 1;
    if (n->type != YAML_SCALAR_NODE || n->data.scalar.style != YAML_PLAIN_SCALAR_STYLE) return 0;
    const char *s = sval(n);
    return !*s || !strcmp(s, "~") || !strcmp(s, "null") || !strcmp(s, "Null") || !strcmp(s, "NULL");
}

/* "Unset" in the sense of axolotl, which tests these keys for Python
 * truthiness: null, false, 0, "" or an empty collection. */
static int is_unset(const yaml_node_t *n) {
    if (is_null(n)) return 1;
    int b;
    double d;
    switch (n->type) {
    case YAML_SCALAR_NODE:
        return !*sval(n) || (parse_bool_str(sval(n), &b) == 0 && b == 0) ||
               (parse_double_str(sval(n), &d) == 0 && d == 0);
    case YAML_SEQUENCE_NODE:
        return n->data.sequence.items.top == n->data.sequence.items.start;
    case YAML_MAPPING_NODE:
        return n->data.mapping.pairs.top == n->data.mapping.pairs.start;
    default:
        return 0;
    }
}

/* Describe a value for "got ..." in messages. */
static void describe(const yaml_node_t *n, char *buf, size_t len) {
    if (!n) {
        snprintf(buf, len, "nothing");
    } else if (n->type == YAML_SEQUENCE_NODE) {
        snprintf(buf, len, "a list");
    } else if (n->type == YAML_MAPPING_NODE) {
        snprintf(buf, len, "a mapping");
    } else if (is_null(n)) {
        snprintf(buf, len, "null");
    } else {
        const char *s = sval(n);
        size_t l = strlen(s);
        if (l > 60)
            snprintf(buf, len, "\"%.57s...\"", s);
        else
            snprintf(buf, len, "\"%s\"", s);
    }
}

/* Value of a key refused when set (AX_REFUSE, AX_MULTI): accepted iff unset or == allowed. */
static int later_ok(const yaml_node_t *v, const char *allowed) {
    if (is_unset(v)) return 1;
    if (!allowed || v->type != YAML_SCALAR_NODE) return 0;
    int a, b;
    if (parse_bool_str(allowed, &a) == 0) return parse_bool_str(sval(v), &b) == 0 && a == b;
    return !strcmp(sval(v), allowed);
}

static int later_err(const pctx *p, const yaml_node_t *at, const char *prefix, const ax_key *ak) {
    char extra[256] = "";
    if (ak->allowed) snprintf(extra, sizeof extra, " (the only accepted value is %s)", ak->allowed);
    return perr(p, at, "%s%s: refused: %s%s; delete the line, or leave it empty", prefix, ak->name,
                ak->decision == AX_MULTI ? AX_MULTI_WHY : ak->why, extra);
}

/* An axolotl key decided by trainer/config_axolotl.c that this file has no code for: accepted with a
 * [config] line (AX_SAFE), or refused unless unset (AX_REFUSE, AX_MULTI). prefix: "" or "datasets[0]." */
static int apply_decided(const pctx *p, const ax_key *ak, const char *prefix, const yaml_node_t *knode,
                         const yaml_node_t *v) {
    if (ak->decision == AX_SAFE) {
        if (is_unset(v)) return 0;
        return add_warning(p->c, p->e, "%s: ignoring \"%s%s\" (%s)", p->src, prefix, ak->name, ak->why);
    }
    if (later_ok(v, ak->allowed)) return 0;
    return later_err(p, knode ? knode : v, prefix, ak);
}

/* Parse a scalar string for K_STR / dataset strings into a fresh copy. */
static int get_string(const pctx *p, const char *what, const yaml_node_t *v, char **out) {
    char got[96];
    if (v->type != YAML_SCALAR_NODE) {
        describe(v, got, sizeof got);
        return perr(p, v, "%s: expected a string, got %s", what, got);
    }
    if (!*sval(v)) return perr(p, v, "%s: expected a non-empty string", what);
    if (!(*out = dup_str(sval(v)))) return qerr_set(p->e, "out of memory");
    return 0;
}

/* Resolve an enum value (aliases, not-yet values, suggestions). On success
 * *out points into the static tables. */
static int get_enum(const pctx *p, const char *what, const yaml_node_t *v, const char *const *values,
                    const value_alias *aliases, const value_later *later, const char **out) {
    char got[96], list[256];
    join_values(list, sizeof list, values);
    if (v->type != YAML_SCALAR_NODE || !*sval(v)) {
        describe(v, got, sizeof got);
        return perr(p, v, "%s: expected one of %s, got %s", what, list, got);
    }
    const char *s = sval(v);
    int i = enum_index(values, s);
    if (i >= 0) return *out = values[i], 0;
    for (int a = 0; aliases && aliases[a].from; a++) {
        if (!strcmp(aliases[a].from, s)) {
            if (aliases[a].note && add_warning(p->c, p->e, "%s: %s", p->src, aliases[a].note)) return -1;
            *out = values[enum_index(values, aliases[a].to)];
            return 0;
        }
    }
    for (int l = 0; later && later[l].value; l++)
        if (!strcmp(later[l].value, s))
            return perr(p, v, "%s: \"%s\" is %s (accepted: %s)", what, s, later[l].status, list);
    suggest sg = {NULL, 1000};
    for (int j = 0; values[j]; j++) suggest_try(&sg, s, values[j]);
    for (int a = 0; aliases && aliases[a].from; a++) suggest_try(&sg, s, aliases[a].from);
    const char *hint = sg.best;
    describe(v, got, sizeof got);
    if (hint) return perr(p, v, "%s: expected one of %s, got %s; did you mean \"%s\"?", what, list, got, hint);
    return perr(p, v, "%s: expected one of %s, got %s", what, list, got);
}

static yaml_node_t *node_at(yaml_document_t *doc, int id) { return yaml_document_get_node(doc, id); }

/* A list of non-empty strings (null = none) into a fresh array. */
static int parse_str_list(const pctx *p, const char *what, const yaml_node_t *v, char ***out, int *n_out) {
    char got[96];
    *out = NULL;
    *n_out = 0;
    if (is_null(v)) return 0;
    if (v->type != YAML_SEQUENCE_NODE) {
        describe(v, got, sizeof got);
        return perr(p, v, "%s: expected a list of strings, got %s", what, got);
    }
    int n = (int)(v->data.sequence.items.top - v->data.sequence.items.start);
    char **m = calloc((size_t)(n ? n : 1), sizeof *m);
    if (!m) return qerr_set(p->e, "out of memory");
    for (int i = 0; i < n; i++) {
        char sub[160];
        snprintf(sub, sizeof sub, "%s[%d]", what, i);
        if (get_string(p, sub, node_at(p->doc, v->data.sequence.items.start[i]), &m[i])) {
            free_str_list(m, i);
            return -1;
        }
    }
    *out = m;
    *n_out = n;
    return 0;
}

/* The string value of an optional dataset key (null: keep *out); replaces *out. */
static int ds_opt_string(const pctx *p, const char *what, const yaml_node_t *v, char **out) {
    if (is_null(v)) return 0;
    char *s;
    if (get_string(p, what, v, &s)) return -1;
    free(*out);
    *out = s;
    return 0;
}

/* axolotl 0.19.0 drops a key its schema does not have (pydantic's default extra="ignore", no warning:
 * AxolotlInputConfig's model_config sets only populate_by_name; SFTDataset likewise). In a file, a key
 * far from every key qlora or axolotl knows is therefore accepted with one [config] line; a key close
 * to one (a likely typo) stays refused with "did you mean". what: "" or "datasets[0]: ". */
static int ignore_far_key(const pctx *p, const char *what, const char *name) {
    return add_warning(p->c, p->e,
                       "%s: %signoring \"%s\": not a key of axolotl 0.19.0's config schema (axolotl drops such a key "
                       "without a word; pydantic extra=\"ignore\") nor close to one",
                       p->src, what, name);
}

/* One key of a datasets entry beyond path/type/field/field_messages (axolotl's; see
 * trainer/config_axolotl.c). Returns 0, or -1 with p->e set. */
static int ds_axolotl_key(const pctx *p, const char *what, const char *name, const yaml_node_t *k,
                          const yaml_node_t *v, dataset_cfg *d, int *eos_seen) {
    char sub[160], got[96];
    snprintf(sub, sizeof sub, "%s.%s", what, name);
    if (!strcmp(name, "message_property_mappings")) {
        if (is_null(v)) return 0;
        if (v->type != YAML_MAPPING_NODE) {
            describe(v, got, sizeof got);
            return perr(p, v, "%s: expected a mapping {role: <key>, content: <key>}, got %s", sub, got);
        }
        for (yaml_node_pair_t *pr = v->data.mapping.pairs.start; pr < v->data.mapping.pairs.top; pr++) {
            yaml_node_t *mk = node_at(p->doc, pr->key), *mv = node_at(p->doc, pr->value);
            const char *mname = mk->type == YAML_SCALAR_NODE ? sval(mk) : "";
            char sub2[200];
            snprintf(sub2, sizeof sub2, "%s.%s", sub, mname);
            if (!strcmp(mname, "role")) {
                if (ds_opt_string(p, sub2, mv, &d->message_field_role)) return -1;
            } else if (!strcmp(mname, "content")) {
                if (ds_opt_string(p, sub2, mv, &d->message_field_content)) return -1;
            } else {
                return perr(p, mk, "%s: refused: only role and content are mapped here (a template qlora renders "
                                   "uses no other message property)", sub2);
            }
        }
        return 0;
    }
    if (!strcmp(name, "message_field_role")) return ds_opt_string(p, sub, v, &d->message_field_role);
    if (!strcmp(name, "message_field_content")) return ds_opt_string(p, sub, v, &d->message_field_content);
    if (!strcmp(name, "roles_to_train")) {
        if (is_null(v)) return 0; /* axolotl's docs write it empty for the default */
        char **m;
        int n;
        if (parse_str_list(p, sub, v, &m, &n)) return -1;
        free_str_list(d->roles_to_train, d->n_roles_to_train);
        d->roles_to_train = m;
        d->n_roles_to_train = n;
        return 0;
    }
    if (!strcmp(name, "train_on_eos") || !strcmp(name, "train_on_eot")) {
        if (is_null(v)) return 0;
        const char *t;
        if (get_enum(p, sub, v, V_EOS, NULL, NULL, &t)) return -1;
        char **dst = !strcmp(name, "train_on_eos") ? &d->train_on_eos : &d->train_on_eot;
        (void)eos_seen;
        free(*dst);
        if (!(*dst = dup_str(t))) return qerr_set(p->e, "out of memory");
        return 0;
    }
    if (!strcmp(name, "drop_system_message")) {
        int b = 0;
        if (!is_null(v) && (v->type != YAML_SCALAR_NODE || parse_bool_str(sval(v), &b))) {
            describe(v, got, sizeof got);
            return perr(p, v, "%s: expected true or false, got %s", sub, got);
        }
        d->drop_system_message = b;
        return 0;
    }
    if (!strcmp(name, "split")) {
        if (is_null(v)) return 0;
        char *s;
        if (get_string(p, sub, v, &s)) return -1;
        dataset_slice sl;
        qerr e2;
        if (dataset_parse_split(s, &sl, &e2)) {
            free(s);
            return perr(p, v, "%s: %s", sub, e2.msg);
        }
        free(d->split);
        d->split = s;
        return 0;
    }
    if (!strcmp(name, "data_files")) {
        if (v->type == YAML_SEQUENCE_NODE && v->data.sequence.items.top - v->data.sequence.items.start == 1)
            v = node_at(p->doc, v->data.sequence.items.start[0]);
        if (v->type == YAML_SEQUENCE_NODE)
            return perr(p, v, "%s: refused: one file per datasets entry (give each file its own entry)", sub);
        return ds_opt_string(p, sub, v, &d->data_files);
    }
    if (!strcmp(name, "chat_template_jinja")) return ds_opt_string(p, sub, v, &d->chat_template_jinja);
    if (!strcmp(name, "chat_template")) {
        if (is_null(v)) return 0;
        const char *t;
        if (get_enum(p, sub, v, V_CHAT, NULL, L_CHAT, &t)) return -1;
        free(d->chat_template);
        if (!(d->chat_template = dup_str(t))) return qerr_set(p->e, "out of memory");
        return 0;
    }
    const ax_key *ak = axolotl_dataset_key(name);
    if (ak && ak->decision != AX_IMPL) {
        char pre[160];
        snprintf(pre, sizeof pre, "%s.", what);
        return apply_decided(p, ak, pre, k, v);
    }
    if (ak && !strcmp(name, "ds_type")) {
        char pre[160];
        snprintf(pre, sizeof pre, "%s.", what);
        return later_ok(v, ak->allowed) ? 0 : later_err(p, v, pre, ak);
    }
    suggest sg = {NULL, 1000};
    int na;
    const ax_key *all = axolotl_dataset_keys(&na);
    for (int j = 0; j < na; j++) suggest_try(&sg, name, all[j].name);
    if (sg.best) return perr(p, k, "%s: unknown key \"%s\"; did you mean \"%s\"?", what, name, sg.best);
    if (p->lines) {
        char pre[180];
        snprintf(pre, sizeof pre, "%s: ", what);
        return ignore_far_key(p, pre, name);
    }
    return perr(p, k, "%s: unknown key \"%s\" (README \"Coming from axolotl\" lists a datasets entry's keys)", what,
                name);
}

/* One datasets entry (a mapping) into *d (fully owned on success). Every refused key of the entry is
 * recorded (p->rl) before it fails. */
static int parse_dataset(const pctx *p, const char *what, const yaml_node_t *m, dataset_cfg *d) {
    char got[96];
    memset(d, 0, sizeof *d);
    if (m->type != YAML_MAPPING_NODE) {
        describe(m, got, sizeof got);
        return perr(p, m, "%s: expected a mapping with path and type, got %s", what, got);
    }
    char *vals[N_DS_KEYS] = {NULL, NULL, NULL, NULL};
    int seen[N_DS_KEYS] = {0, 0, 0, 0};
    int failed = 0, recorded = 0, eos_seen = 0;
    for (yaml_node_pair_t *pr = m->data.mapping.pairs.start; pr < m->data.mapping.pairs.top; pr++) {
        yaml_node_t *k = node_at(p->doc, pr->key), *v = node_at(p->doc, pr->value);
        if (k->type != YAML_SCALAR_NODE) {
            perr(p, k, "%s: keys must be plain strings", what);
            goto out;
        }
        const char *name = sval(k);
        int ki = -1;
        for (int j = 0; j < N_DS_KEYS; j++)
            if (!strcmp(DS_KEYS[j], name)) ki = j;
        if (ki < 0) {
            if (ds_axolotl_key(p, what, name, k, v, d, &eos_seen)) {
                failed = 1;
                recorded += !!p->rl;
                record(p);
            }
            continue;
        }
        if (seen[ki]) {
            perr(p, k, "%s: key \"%s\" given twice", what, name);
            goto out;
        }
        seen[ki] = 1;
        char sub[160];
        snprintf(sub, sizeof sub, "%s.%s", what, name);
        if (is_null(v)) { /* a value that went missing is not the default (trainer/config.h) */
            static const char *const expect[N_DS_KEYS] = {
                "a path to a JSONL file", "one of completion, alpaca, chat_template, input_output",
                "a JSON key (delete the line for the default, \"text\")",
                "a JSON key (delete the line for the default, \"messages\")"};
            perr(p, k, "%s: no value; expected %s", sub, expect[ki]);
            goto out;
        }
        if (ki == 1) {
            const char *t;
            if (get_enum(p, sub, v, V_DSTYPE, NULL, NULL, &t)) goto out;
            if (!(vals[ki] = dup_str(t))) goto oom;
        } else if (get_string(p, sub, v, &vals[ki])) {
            goto out;
        }
    }
    if (failed) goto out_recorded;
    if (!vals[0]) {
        perr(p, m, "%s: missing required key \"path\"", what);
        goto out;
    }
    if (!vals[1]) {
        perr(p, m, "%s: missing required key \"type\" (one of completion, alpaca, chat_template, input_output)",
             what);
        goto out;
    }
    if (!vals[2] && !(vals[2] = dup_str("text"))) goto oom;
    if (!vals[3] && !(vals[3] = dup_str("messages"))) goto oom;
    if (!d->message_field_role && !(d->message_field_role = dup_str("role"))) goto oom;
    if (!d->message_field_content && !(d->message_field_content = dup_str("content"))) goto oom;
    if (!d->train_on_eos && !(d->train_on_eos = dup_str("turn"))) goto oom;
    if (!d->split && !(d->split = dup_str("train"))) goto oom;
    if (!d->roles_to_train) {
        if (!(d->roles_to_train = calloc(1, sizeof *d->roles_to_train)) ||
            !(d->roles_to_train[0] = dup_str("assistant")))
            goto oom;
        d->n_roles_to_train = 1;
    }
    d->path = vals[0];
    d->type = vals[1];
    d->field = vals[2];
    d->field_messages = vals[3];
    return 0;
oom:
    qerr_set(p->e, "out of memory");
out:
    record(p);
out_recorded:
    for (int j = 0; j < N_DS_KEYS; j++) free(vals[j]);
    free_dataset_fields(d); /* the axolotl fields filled so far (the four above are not in d yet) */
    memset(d, 0, sizeof *d);
    (void)recorded;
    return -1;
}

static int parse_datasets(const pctx *p, const char *key, const yaml_node_t *v, dataset_cfg **out, int *n_out) {
    char got[96];
    *out = NULL;
    *n_out = 0;
    if (is_null(v)) return 0;
    if (v->type != YAML_SEQUENCE_NODE) {
        describe(v, got, sizeof got);
        return perr(p, v, "%s: expected a list of {path, type} entries, got %s", key, got);
    }
    int n = (int)(v->data.sequence.items.top - v->data.sequence.items.start);
    dataset_cfg *d = calloc((size_t)(n ? n : 1), sizeof *d);
    if (!d) return qerr_set(p->e, "out of memory");
    int failed = 0;
    for (int i = 0; i < n; i++) {
        char what[64];
        snprintf(what, sizeof what, "%s[%d]", key, i);
        if (parse_dataset(p, what, node_at(p->doc, v->data.sequence.items.start[i]), &d[i])) {
            failed = 1; /* recorded; the other entries are still read, to list their refusals too */
            if (!p->rl) break;
        }
    }
    if (failed) {
        free_datasets(d, n);
        return -1;
    }
    *out = d;
    *n_out = n;
    return 0;
}

static int parse_modules(const pctx *p, const char *key, const char *const *vals, const yaml_node_t *v, char ***out,
                         int *n_out) {
    char got[96], list[160];
    join_values(list, sizeof list, vals);
    *out = NULL;
    *n_out = 0;
    if (is_null(v)) return 0;
    if (v->type != YAML_SEQUENCE_NODE) {
        describe(v, got, sizeof got);
        return perr(p, v, "%s: expected a list of module names (%s), got %s", key, list, got);
    }
    int n = (int)(v->data.sequence.items.top - v->data.sequence.items.start);
    char **m = calloc((size_t)(n ? n : 1), sizeof *m);
    if (!m) return qerr_set(p->e, "out of memory");
    for (int i = 0; i < n; i++) {
        yaml_node_t *it = node_at(p->doc, v->data.sequence.items.start[i]);
        char what[64];
        snprintf(what, sizeof what, "%s[%d]", key, i);
        const char *name;
        if (get_enum(p, what, it, vals, NULL, NULL, &name)) goto fail;
        for (int j = 0; j < i; j++)
            if (!strcmp(m[j], name)) {
                perr(p, it, "%s: \"%s\" is listed twice", key, name);
                goto fail;
            }
        if (!(m[i] = dup_str(name))) {
            qerr_set(p->e, "out of memory");
            goto fail;
        }
    }
    *out = m;
    *n_out = n;
    return 0;
fail:
    free_str_list(m, n);
    return -1;
}

/* An empty value (null) for a key that needs one: every key but the F_OPTIONAL
 * ones, whose null is a documented "none" (trainer/config.h). A missing value
 * must not quietly become the default: `learning_rate=` from an unset shell
 * variable trained at 2e-4. at: the key's node (the empty value's own mark
 * can be on the next line). */
static int no_value(const pctx *p, const key_spec *k, const char *kname, const yaml_node_t *at) {
    char expect[300], def[160] = "", list[256];
    switch (k->kind) {
    case K_BOOL: snprintf(expect, sizeof expect, "true or false"); break;
    case K_BF16: snprintf(expect, sizeof expect, "true, false or auto"); break;
    case K_ENUM:
        join_values(list, sizeof list, k->values);
        snprintf(expect, sizeof expect, "one of %s", list);
        break;
    case K_DATASETS: snprintf(expect, sizeof expect, "a list of {path, type} entries"); break;
    case K_MODULES: snprintf(expect, sizeof expect, "a list of module names"); break;
    default: snprintf(expect, sizeof expect, "%s", k->expect); break;
    }
    if (p->def) {
        switch (k->kind) {
        case K_STR:
        case K_ENUM: {
            const char *d = *CFIELD(p->def, k->off, char *);
            if (d) snprintf(def, sizeof def, "\"%.100s\"", d);
            break;
        }
        case K_BOOL:
        case K_BF16: snprintf(def, sizeof def, "%s", *CFIELD(p->def, k->off, int) ? "true" : "false"); break;
        case K_INT: snprintf(def, sizeof def, "%d", *CFIELD(p->def, k->off, int)); break;
        case K_FLOAT: fmt_shortest(def, sizeof def, (double)*CFIELD(p->def, k->off, float), 1); break;
        case K_DOUBLE: fmt_shortest(def, sizeof def, *CFIELD(p->def, k->off, double), 0); break;
        default: break;
        }
    }
    if (!p->lines)
        return perr(p, at, "%s: no value; expected %s (leave the override out to keep the config file's value)",
                    kname, expect);
    if (def[0]) return perr(p, at, "%s: no value; expected %s (delete the line for the default, %s)", kname, expect, def);
    return perr(p, at, "%s: no value; expected %s (the key is required)", kname, expect);
}

/* Apply one implemented key. Atomic: on failure p->c is unchanged. */
static int apply_key(const pctx *p, const key_spec *k, const char *kname, const yaml_node_t *v) {
    train_config *c = p->c;
    char got[96];
    describe(v, got, sizeof got);
    switch (k->kind) {
    case K_STR:
    case K_ENUM: {
        char *s = NULL;
        if (is_null(v)) {
            const char *d = *CFIELD(p->def, k->off, char *);
            if (d && !(s = dup_str(d))) return qerr_set(p->e, "out of memory");
        } else if (k->kind == K_STR) {
            if (get_string(p, kname, v, &s)) return -1;
        } else {
            const char *t;
            if (get_enum(p, kname, v, k->values, k->aliases, k->later, &t)) return -1;
            if (!(s = dup_str(t))) return qerr_set(p->e, "out of memory");
        }
        char **f = FIELD(c, k->off, char *);
        free(*f);
        *f = s;
        return 0;
    }
    case K_BOOL:
    case K_BF16: {
        int b = *CFIELD(p->def, k->off, int);
        if (!is_null(v)) {
            if (v->type == YAML_SCALAR_NODE && parse_bool_str(sval(v), &b) == 0) {
                /* ok */
            } else if (k->kind == K_BF16 && v->type == YAML_SCALAR_NODE && !strcmp(sval(v), "auto")) {
                b = 1;
                c->bf16_auto = 1; /* fp16: true may take the compute mode (train_config_validate) */
            } else {
                return perr(p, v, "%s: expected %s, got %s", kname,
                            k->kind == K_BF16                        ? "true, false or auto"
                            : k->off == OFF(gradient_checkpointing) ? "true, false, selective or offload"
                                                                     : "true or false",
                            got);
            }
        }
        if (k->kind == K_BF16 && !(v->type == YAML_SCALAR_NODE && !strcmp(sval(v), "auto"))) c->bf16_auto = 0;
        *FIELD(c, k->off, int) = b;
        return 0;
    }
    case K_INT: {
        long long x = *CFIELD(p->def, k->off, int);
        if (!is_null(v) &&
            (v->type != YAML_SCALAR_NODE || parse_int_str(sval(v), &x) || !range_ok(k, (double)x)))
            return perr(p, v, "%s: expected %s, got %s", kname, k->expect, got);
        *FIELD(c, k->off, int) = (int)x;
        return 0;
    }
    case K_FLOAT:
    case K_DOUBLE: {
        double x = k->kind == K_FLOAT ? (double)*CFIELD(p->def, k->off, float) : *CFIELD(p->def, k->off, double);
        if (!is_null(v)) {
            int bad = v->type != YAML_SCALAR_NODE || parse_double_str(sval(v), &x);
            if (!bad && k->kind == K_FLOAT) {
                bad = !isfinite((float)x);
                if (!bad) x = (double)(float)x;
            }
            if (bad || !range_ok(k, x)) return perr(p, v, "%s: expected %s, got %s", kname, k->expect, got);
        }
        if (k->kind == K_FLOAT)
            *FIELD(c, k->off, float) = (float)x;
        else
            *FIELD(c, k->off, double) = x;
        return 0;
    }
    case K_MODULES: {
        char **m;
        int n;
        if (parse_modules(p, kname, k->values ? k->values : module_values(), v, &m, &n)) return -1;
        free_str_list(*FIELD(c, k->off, char **), *FIELD(c, k->off_n, int));
        *FIELD(c, k->off, char **) = m;
        *FIELD(c, k->off_n, int) = n;
        return 0;
    }
    case K_DATASETS: {
        dataset_cfg *d;
        int n;
        if (parse_datasets(p, kname, v, &d, &n)) return -1;
        free_datasets(*FIELD(c, k->off, dataset_cfg *), *FIELD(c, k->off_n, int));
        *FIELD(c, k->off, dataset_cfg *) = d;
        *FIELD(c, k->off_n, int) = n;
        return 0;
    }
    }
    return qerr_set(p->e, "internal error: unhandled key kind");
}

/* Suggestions prefer implemented keys: "lora_rank" is closer to "local_rank" (2 edits) than to
 * "lora_r" (3), but means the latter. Only keys close to the typo are suggested (suggest_close). */
static int unknown_key(const pctx *p, const yaml_node_t *at, const char *name) {
    suggest sg = {NULL, 1000};
    for (int i = 0; i < N_KEYS; i++) suggest_try(&sg, name, KEYS[i].name);
    const char *hint = sg.best;
    if (!hint) {
        int n;
        const ax_key *all = axolotl_keys(&n);
        for (int i = 0; i < n; i++) suggest_try(&sg, name, all[i].name);
        hint = sg.best;
    }
    if (hint) return perr(p, at, "unknown key \"%s\"; did you mean \"%s\"?", name, hint);
    if (p->lines) return ignore_far_key(p, "", name);
    return perr(p, at, "unknown key \"%s\" (not a key of axolotl's config schema; README \"Coming from axolotl\" "
                       "lists every key)", name);
}

/* ------------------------------------------------------------------------ */
/* axolotl keys whose values this file checks (trainer/config_axolotl.c: AX_IMPL rows without a KEYS row) */

/* special_tokens: pad_token is harmless (padded positions are masked out of attention and loss);
 * bos/eos/unk are kept for train_config_check_special_tokens (equal to the model's own: accepted);
 * any other token would be added to the vocabulary. */
static int ax_special_tokens(const pctx *p, const yaml_node_t *knode, const yaml_node_t *v) {
    char got[96];
    if (is_unset(v)) return 0;
    if (v->type != YAML_MAPPING_NODE) {
        describe(v, got, sizeof got);
        return perr(p, knode, "special_tokens: expected a mapping {bos_token, eos_token, unk_token, pad_token}, got %s",
                    got);
    }
    char *tok[3] = {NULL, NULL, NULL};
    static const char *const names[3] = {"bos_token", "eos_token", "unk_token"};
    int pad = 0;
    for (yaml_node_pair_t *pr = v->data.mapping.pairs.start; pr < v->data.mapping.pairs.top; pr++) {
        yaml_node_t *k = node_at(p->doc, pr->key), *tv = node_at(p->doc, pr->value);
        const char *n = k->type == YAML_SCALAR_NODE ? sval(k) : "";
        char sub[96];
        snprintf(sub, sizeof sub, "special_tokens.%s", n);
        int j = -1;
        for (int i = 0; i < 3; i++)
            if (!strcmp(n, names[i])) j = i;
        if (!strcmp(n, "pad_token")) {
            pad = 1;
            continue;
        }
        if (j < 0 || tok[j]) {
            for (int i = 0; i < 3; i++) free(tok[i]);
            return perr(p, k, "%s: refused: a special token other than the model's own bos/eos/unk/pad would change "
                              "the vocabulary (the base is frozen here)", sub);
        }
        if (is_null(tv)) continue;
        if (get_string(p, sub, tv, &tok[j])) {
            for (int i = 0; i < 3; i++) free(tok[i]);
            return -1;
        }
    }
    char **dst[3] = {&p->c->special_bos, &p->c->special_eos, &p->c->special_unk};
    for (int i = 0; i < 3; i++) {
        if (!tok[i]) continue;
        free(*dst[i]);
        *dst[i] = tok[i];
    }
    if (pad && add_warning(p->c, p->e,
                           "%s: ignoring \"special_tokens.pad_token\" (padded positions are masked, so the pad token "
                           "never matters)", p->src))
        return -1;
    return 0;
}

/* eot_tokens: the tokens that end a turn (axolotl's default: [eos_token]); checked against the template
 * when the data is read (data/dataset.h: the template's end-of-turn token or eos). */
static int ax_eot_tokens(const pctx *p, const yaml_node_t *knode, const yaml_node_t *v) {
    if (is_unset(v)) return 0;
    char **m;
    int n;
    if (parse_str_list(p, "eot_tokens", v, &m, &n)) return -1;
    free_str_list(p->c->eot_tokens, p->c->n_eot_tokens);
    p->c->eot_tokens = m;
    p->c->n_eot_tokens = n;
    return 0;
}

/* unfrozen_parameters: axolotl's regex patterns, each compiled here as axolotl compiles it; which
 * parameters they match, and so whether the run is accepted, is decided once the model is loaded
 * (trainer/unfreeze.h, from trainer/run.c). */
static int ax_unfrozen_parameters(const pctx *p, const yaml_node_t *knode, const yaml_node_t *v) {
    if (is_unset(v)) return 0;
    char **m;
    int n;
    if (parse_str_list(p, "unfrozen_parameters", v, &m, &n)) return -1;
    for (int i = 0; i < n; i++) {
        qerr pe = {{0}};
        if (unfreeze_pattern_check(m[i], &pe)) {
            free_str_list(m, n);
            return perr(p, knode, "%s", pe.msg);
        }
    }
    free_str_list(p->c->unfrozen_parameters, p->c->n_unfrozen_parameters);
    p->c->unfrozen_parameters = m;
    p->c->n_unfrozen_parameters = n;
    return 0;
}

/* plugins: the liger and cut_cross_entropy plugins only swap in fused kernels for the same loss; any
 * other plugin is Python code that may change training, refused by name. */
static int ax_plugins(const pctx *p, const yaml_node_t *knode, const yaml_node_t *v) {
    if (is_unset(v)) return 0;
    char **m;
    int n;
    if (parse_str_list(p, "plugins", v, &m, &n)) return -1;
    int rc = 0;
    for (int i = 0; i < n && !rc; i++) {
        if (strstr(m[i], "integrations.liger.") || strstr(m[i], "integrations.cut_cross_entropy."))
            rc = add_warning(p->c, p->e, "%s: ignoring plugin \"%s\" (a speed-only kernel for the same loss; qlora's "
                                         "own kernels compute it)", p->src, m[i]);
        else
            rc = perr(p, knode, "plugins: refused: \"%.100s\" is axolotl plugin code that may change training; qlora "
                                "accepts only the speed-only liger and cut_cross_entropy plugins", m[i]);
    }
    free_str_list(m, n);
    return rc;
}

/* ---- several processes: fsdp, fsdp_version, fsdp_config, deepspeed ----------------------------------------
 * axolotl's / HF's keys for the distributed strategy. Implemented: data parallel (DDP, FSDP's NO_SHARD, ZeRO
 * stage 0): every rank holds the whole model (trainer/train.h train_run_comm). Every other strategy is refused
 * with one line naming it; settings that do not change the maths (wrapping policy, prefetching, ...) are
 * accepted. This block is owned by the "several processes" work (README "Several processes"). */

static void put_yaml_str(FILE *f, const char *s);

/* pretraining_dataset (axolotl 0.19.0: a list of PretrainingDataset / SFTDataset entries, or a path;
 * utils/data/sft.py _extract_pretraining_config reads only the first): path (a local JSON lines file, or a
 * directory with data_files), text_column, type (pretrain), split (train), skip, data_files; name (a Hub
 * dataset's configuration) and trust_remote_code mean nothing for a local file and get a [config] line.
 * The stream itself is data/stream.h. */
static int ax_pretraining_dataset(const pctx *p, const yaml_node_t *knode, const yaml_node_t *v) {
    train_config *c = p->c;
    char got[96];
    free(c->pretraining_path);
    free(c->pretraining_text_column);
    c->pretraining_path = c->pretraining_text_column = NULL;
    c->pretraining_skip = 0;
    if (is_unset(v)) return 0;
    const yaml_node_t *m = v;
    if (v->type == YAML_SEQUENCE_NODE) {
        int n = (int)(v->data.sequence.items.top - v->data.sequence.items.start);
        if (n > 1)
            return perr(p, knode, "pretraining_dataset: %d entries: axolotl reads only the first "
                                  "(_extract_pretraining_config); give one", n);
        m = node_at(p->doc, *v->data.sequence.items.start);
    }
    if (m->type == YAML_SCALAR_NODE) { /* a path alone */
        if (!*sval(m)) return perr(p, knode, "pretraining_dataset: expected a path or a {path: ...} entry");
        if (!(c->pretraining_path = dup_str(sval(m)))) return qerr_set(p->e, "out of memory");
        return 0;
    }
    if (m->type != YAML_MAPPING_NODE) {
        describe(m, got, sizeof got);
        return perr(p, knode, "pretraining_dataset: expected a list of one {path, text_column, ...} entry, got %s", got);
    }
    char *path = NULL, *files = NULL;
    int rc = 0;
    for (yaml_node_pair_t *pr = m->data.mapping.pairs.start; !rc && pr < m->data.mapping.pairs.top; pr++) {
        yaml_node_t *kn = node_at(p->doc, pr->key), *vn = node_at(p->doc, pr->value);
        const char *k = kn->type == YAML_SCALAR_NODE ? sval(kn) : "";
        char what[96];
        snprintf(what, sizeof what, "pretraining_dataset.%s", k);
        if (!strcmp(k, "path")) {
            rc = get_string(p, what, vn, &path);
        } else if (!strcmp(k, "data_files")) {
            if (!is_null(vn)) rc = get_string(p, what, vn, &files);
        } else if (!strcmp(k, "text_column")) {
            if (!is_null(vn)) rc = get_string(p, what, vn, &c->pretraining_text_column);
        } else if (!strcmp(k, "type")) {
            if (!is_null(vn) && (vn->type != YAML_SCALAR_NODE || strcmp(sval(vn), "pretrain"))) {
                describe(vn, got, sizeof got);
                rc = perr(p, kn, "pretraining_dataset.type: expected pretrain (axolotl's PretrainTokenizationStrategy), "
                                 "got %s", got);
            }
        } else if (!strcmp(k, "split")) {
            if (!is_null(vn) && (vn->type != YAML_SCALAR_NODE || strcmp(sval(vn), "train"))) {
                describe(vn, got, sizeof got);
                rc = perr(p, kn, "pretraining_dataset.split: expected train (a local JSON lines file has that one "
                                 "split; a streamed split cannot be sliced), got %s", got);
            }
        } else if (!strcmp(k, "skip")) {
            long long x = 0;
            if (!is_null(vn) && (vn->type != YAML_SCALAR_NODE || parse_int_str(sval(vn), &x) || x < 0)) {
                describe(vn, got, sizeof got);
                rc = perr(p, kn, "pretraining_dataset.skip: expected a number of records >= 0, got %s", got);
            }
            c->pretraining_skip = x;
        } else if (!strcmp(k, "name") || !strcmp(k, "trust_remote_code")) {
            if (!is_unset(vn))
                rc = add_warning(c, p->e, "%s: ignoring \"pretraining_dataset.%s\" (%s)", p->src, k,
                                 !strcmp(k, "name") ? "a Hugging Face dataset's configuration name; the data here is "
                                                      "a local file"
                                                    : "no Python code is ever run");
        } else {
            rc = perr(p, kn, "pretraining_dataset.%s: unknown key (expected path, text_column, type, split, skip, "
                             "data_files, name)", k);
        }
    }
    if (!rc && !path) rc = perr(p, knode, "pretraining_dataset: missing \"path\" (a JSON lines file)");
    if (!rc) {
        struct stat sb;
        if (files && !stat(path, &sb) && S_ISDIR(sb.st_mode)) {
            size_t n = strlen(path) + strlen(files) + 2;
            if (!(c->pretraining_path = malloc(n))) rc = qerr_set(p->e, "out of memory");
            else snprintf(c->pretraining_path, n, "%s/%s", path, files);
        } else {
            c->pretraining_path = files ? files : path;
            if (files) files = NULL;
            else path = NULL;
        }
    }
    free(path);
    free(files);
    return rc;
}

/* selective_checkpointing (axolotl 0.19.0's eager SAC, monkeypatch/selective_checkpointing.py):
 * within each checkpointed block, the attention op's outputs are saved in forward and everything
 * else is recomputed in backward. `true` = {save: [attention]}. qlora's gradient_checkpointing:
 * selective keeps the attention half and recomputes the MLP half: the same intent (attention is never
 * recomputed, the MLP always is; both exact, so the same gradients), so that is what it runs as. Other
 * save entries (torch op names) and offload: true are refused by name. save_sliding_window and
 * recompute_layer_types only choose which sliding-window layers' attention is saved (memory): qlora
 * keeps attention in every layer. Sets c->selective_checkpointing; sac_resolve applies it. */
static int ax_selective_checkpointing(const pctx *p, const yaml_node_t *knode, const yaml_node_t *v) {
    char got[96];
    int b;
    if (is_unset(v)) {
        p->c->selective_checkpointing = 0;
        return 0;
    }
    if (v->type == YAML_SCALAR_NODE) {
        if (parse_bool_str(sval(v), &b) == 0 && b) {
            p->c->selective_checkpointing = 1;
            return 0;
        }
        describe(v, got, sizeof got);
        return perr(p, knode, "selective_checkpointing: expected true, false or a mapping {save: [attention]}, got %s",
                    got);
    }
    if (v->type != YAML_MAPPING_NODE)
        return perr(p, knode, "selective_checkpointing: expected true, false or a mapping {save: [attention]}, got a list");
    for (yaml_node_pair_t *pr = v->data.mapping.pairs.start; pr < v->data.mapping.pairs.top; pr++) {
        yaml_node_t *kn = node_at(p->doc, pr->key), *vn = node_at(p->doc, pr->value);
        const char *k = kn->type == YAML_SCALAR_NODE ? sval(kn) : "";
        if (!strcmp(k, "save")) {
            if (is_null(vn)) continue; /* axolotl's default: [attention] */
            if (vn->type != YAML_SEQUENCE_NODE || vn->data.sequence.items.top == vn->data.sequence.items.start)
                return perr(p, kn, "selective_checkpointing.save: expected a list of op groups ([attention]), got %s",
                            vn->type == YAML_SEQUENCE_NODE ? "an empty list" : "a single value");
            for (yaml_node_item_t *it = vn->data.sequence.items.start; it < vn->data.sequence.items.top; it++) {
                yaml_node_t *e = node_at(p->doc, *it);
                if (e->type == YAML_SCALAR_NODE && !strcmp(sval(e), "attention")) continue;
                describe(e, got, sizeof got);
                return perr(p, e, "selective_checkpointing.save: %s: refused: saving ops other than attention is not "
                                  "implemented (gradient_checkpointing: selective keeps the attention half and "
                                  "recomputes the MLP half); use save: [attention]", got);
            }
        } else if (!strcmp(k, "offload")) {
            if (is_unset(vn)) continue;
            return perr(p, kn, "selective_checkpointing.offload: refused: the saved attention tensors in pinned host "
                               "memory (side-stream copies) are not implemented; delete the line, or leave it empty");
        } else if (!strcmp(k, "save_sliding_window") || !strcmp(k, "recompute_layer_types")) {
            continue; /* which sliding-window layers' attention is saved: memory only */
        } else {
            return perr(p, kn, "selective_checkpointing.%s: unknown key (expected save, save_sliding_window, "
                               "recompute_layer_types, offload)", k);
        }
    }
    p->c->selective_checkpointing = 1;
    return 0;
}

/* Apply c->selective_checkpointing once gradient_checkpointing is known (it may come later in the
 * file): axolotl refuses SAC without gradient_checkpointing ("selective_checkpointing requires
 * gradient_checkpointing"); with it, it runs as gradient_checkpointing: selective. */
static int sac_resolve(const pctx *p, const yaml_node_t *at) {
    train_config *c = p->c;
    if (!c->selective_checkpointing || c->gradient_checkpointing == 2) return 0;
    if (c->gradient_checkpointing == 0)
        return perr(p, at, "selective_checkpointing: refused: it requires gradient_checkpointing (axolotl refuses it "
                           "without); set gradient_checkpointing: true, or gradient_checkpointing: selective directly");
    c->gradient_checkpointing = 2;
    return add_warning(c, p->e,
                       "%s: selective_checkpointing (save: [attention]) runs as gradient_checkpointing: selective: "
                       "attention kept, the MLP recomputed (axolotl recomputes the attention projections too; the "
                       "gradients are the same)", p->src);
}

static int parallel_key(const char *name) {
    return !strcmp(name, "fsdp") || !strcmp(name, "fsdp_version") || !strcmp(name, "fsdp_config") ||
           !strcmp(name, "deepspeed");
}

static int strategy_refused(const pctx *p, const yaml_node_t *at, const char *what, const char *strategy) {
    return perr(p, at,
                "%s: %s is not implemented yet; implemented: data parallel (NO_SHARD: fsdp_sharding_strategy "
                "NO_SHARD, fsdp: [no_shard], or DeepSpeed zero_optimization.stage 0; what runs when none of fsdp / "
                "fsdp_config / deepspeed is set), SHARD_GRAD_OP (ZeRO stage 2) and FULL_SHARD (ZeRO stage 3)",
                what, strategy);
}

/* fsdp: offload / fsdp_offload_params: true — FSDP's CPUOffload(offload_params=True): parameters, gradients
 * and optimizer state live in host memory. CPU ranks keep everything there already, so the result and the
 * memory are the same: accepted with one [config] line; on device cuda it is refused (setup_device). */
static int offload_params_accepted(const pctx *p, const char *what) {
    p->c->fsdp_offload_params = 1;
    return add_warning(p->c, p->e, "%s: %s: parameters, gradients and optimizer state are in host memory already "
                                   "on CPU ranks (the same result and memory); refused with device: cuda",
                       p->src, what)
               ? -1
               : 0;
}

/* fsdp: a list (or a space-separated string) of HF's FSDPOption values. */
static int parallel_fsdp_option(const pctx *p, const yaml_node_t *at, const char *o) {
    static const char *const names[][2] = {{"hybrid_shard", "HYBRID_SHARD"},
                                           {"hybrid_shard_zero2", "HYBRID_SHARD_ZERO2"}};
    if (!strcmp(o, "no_shard")) return p->c->fsdp_no_shard = 1, 0;
    if (!strcmp(o, "shard_grad_op")) return p->c->fsdp_shard_grad_op = 1, 0;
    if (!strcmp(o, "full_shard")) return p->c->fsdp_full_shard = 1, 0;
    if (!strcmp(o, "auto_wrap")) return 0; /* qlora's unit is the decoder layer whatever the wrapping */
    if (!strcmp(o, "offload")) return offload_params_accepted(p, "fsdp: offload");
    for (size_t i = 0; i < sizeof names / sizeof *names; i++)
        if (!strcmp(o, names[i][0])) return strategy_refused(p, at, "fsdp", names[i][1]);
    return perr(p, at, "fsdp: unknown option \"%s\"; expected no_shard, shard_grad_op or full_shard (hybrid_shard "
                       "is not implemented yet) and optionally auto_wrap and offload", o);
}

static int parallel_bool(const pctx *p, const char *what, const yaml_node_t *v, int *out) {
    char got[96];
    if (v->type == YAML_SCALAR_NODE && parse_bool_str(sval(v), out) == 0) return 0;
    describe(v, got, sizeof got);
    return perr(p, v, "%s: expected true or false, got %s", what, got);
}

static int parallel_fsdp_config(const pctx *p, const yaml_node_t *v) {
    char got[96], what[128];
    if (v->type != YAML_MAPPING_NODE) {
        describe(v, got, sizeof got);
        return perr(p, v, "fsdp_config: expected a mapping (fsdp_sharding_strategy: NO_SHARD, ...), got %s", got);
    }
    /* what does not change the maths: accepted, whatever the value */
    static const char *const harmless[] = {"auto_wrap_policy", "transformer_layer_cls_to_wrap", "use_orig_params",
                                           "sync_module_states", "backward_prefetch", "forward_prefetch",
                                           "limit_all_gathers", "activation_checkpointing", "min_num_params"};
    for (yaml_node_pair_t *pr = v->data.mapping.pairs.start; pr < v->data.mapping.pairs.top; pr++) {
        const yaml_node_t *kn = node_at(p->doc, pr->key), *vn = node_at(p->doc, pr->value);
        if (kn->type != YAML_SCALAR_NODE) return perr(p, kn, "fsdp_config: expected string keys");
        const char *full = sval(kn), *k = strncmp(full, "fsdp_", 5) ? full : full + 5;
        snprintf(what, sizeof what, "fsdp_config.%s", full);
        int b = 0;
        if (!strcmp(k, "version")) {
            if (vn->type != YAML_SCALAR_NODE || (strcmp(sval(vn), "1") && strcmp(sval(vn), "2"))) {
                describe(vn, got, sizeof got);
                return perr(p, vn, "%s: expected 1 or 2, got %s", what, got);
            }
        } else if (!strcmp(k, "sharding_strategy")) {
            /* the names of torch's ShardingStrategy, or its values 1..5 as HF accepts them */
            static const char *const ss[][2] = {{"FULL_SHARD", "1"}, {"SHARD_GRAD_OP", "2"}, {"NO_SHARD", "3"},
                                                {"HYBRID_SHARD", "4"}, {"HYBRID_SHARD_ZERO2", "5"}};
            const char *s = vn->type == YAML_SCALAR_NODE ? sval(vn) : "";
            int hit = -1;
            for (int i = 0; i < 5; i++)
                if (!strcasecmp(s, ss[i][0]) || !strcmp(s, ss[i][1]) ||
                    (!strncasecmp(s, "ShardingStrategy.", 17) && !strcasecmp(s + 17, ss[i][0])))
                    hit = i;
            if (hit < 0) {
                describe(vn, got, sizeof got);
                return perr(p, vn, "%s: expected NO_SHARD, SHARD_GRAD_OP or FULL_SHARD (or HYBRID_SHARD, not "
                                   "implemented yet), got %s", what, got);
            }
            if (hit == 0) p->c->fsdp_full_shard = 1;
            else if (hit == 1) p->c->fsdp_shard_grad_op = 1;
            else if (hit == 2) p->c->fsdp_no_shard = 1;
            else return strategy_refused(p, vn, what, ss[hit][0]);
        } else if (!strcmp(k, "reshard_after_forward")) {
            if (parallel_bool(p, what, vn, &b)) return -1;
            /* FSDP2: parameters freed after forward and gathered again for backward = FULL_SHARD; kept
             * gathered = SHARD_GRAD_OP */
            if (b) p->c->fsdp_full_shard = 1;
            else p->c->fsdp_shard_grad_op = 1;
        } else if (!strcmp(k, "state_dict_type")) {
            /* torch's StateDictType names as accelerate / axolotl write them */
            const char *s = vn->type == YAML_SCALAR_NODE ? sval(vn) : "";
            if (!strncasecmp(s, "StateDictType.", 14)) s += 14;
            if (!strcasecmp(s, "FULL_STATE_DICT")) p->c->fsdp_state_dict_type = 1;
            else if (!strcasecmp(s, "SHARDED_STATE_DICT")) p->c->fsdp_state_dict_type = 2;
            else {
                describe(vn, got, sizeof got);
                return perr(p, vn, "%s: expected FULL_STATE_DICT (one state file written by rank 0) or "
                                   "SHARDED_STATE_DICT (one shard file per rank; LOCAL_STATE_DICT is not "
                                   "implemented), got %s", what, got);
            }
        } else if (!strcmp(k, "cpu_ram_efficient_loading")) {
            if (parallel_bool(p, what, vn, &b)) return -1;
            if (b && add_warning(p->c, p->e, "%s: %s: every rank loads the base model itself (the memory of one "
                                             "base per rank; the result is the same)", p->src, what))
                return -1;
        } else if (!strcmp(k, "offload_params")) {
            if (parallel_bool(p, what, vn, &b)) return -1;
            if (b && offload_params_accepted(p, what)) return -1;
        } else {
            int ok = 0;
            for (size_t i = 0; i < sizeof harmless / sizeof *harmless; i++) ok |= !strcmp(k, harmless[i]);
            if (!ok)
                return perr(p, kn, "%s: unknown key; expected fsdp_version, fsdp_sharding_strategy, "
                                   "fsdp_state_dict_type, fsdp_cpu_ram_efficient_loading, fsdp_offload_params, "
                                   "reshard_after_forward or a wrapping/prefetch setting", what);
        }
    }
    return 0;
}

/* A DeepSpeed JSON: ZeRO stage 0 is data parallel; values the config already sets must be "auto". */
static int parallel_deepspeed(const pctx *p, const yaml_node_t *v) {
    char *path = NULL;
    if (get_string(p, "deepspeed", v, &path)) return -1;
    qerr je;
    cJSON *j = file_read_json_object(path, &je);
    if (!j) {
        free(path);
        return perr(p, v, "deepspeed: %s", je.msg);
    }
    int rc = 0;
    static const char *const from_config[] = {"train_batch_size", "train_micro_batch_size_per_gpu",
                                              "gradient_accumulation_steps", "gradient_clipping"};
    static const char *const harmless[] = {"steps_per_print", "wall_clock_breakdown", "zero_allow_untested_optimizer",
                                           "flops_profiler", "tensorboard", "comms_logger", "bf16", "fp16",
                                           "zero_force_ds_cpu_optimizer", "communication_data_type"};
    for (const cJSON *it = j->child; it && !rc; it = it->next) {
        const char *k = it->string;
        int known = 0;
        for (size_t i = 0; i < sizeof from_config / sizeof *from_config; i++)
            if (!strcmp(k, from_config[i])) {
                known = 1;
                if (!cJSON_IsString(it) || strcmp(it->valuestring, "auto"))
                    rc = perr(p, v, "deepspeed: %s: %s: expected \"auto\" (the config's micro_batch_size, "
                                    "gradient_accumulation_steps and max_grad_norm decide it)", path, k);
            }
        for (size_t i = 0; i < sizeof harmless / sizeof *harmless; i++) known |= !strcmp(k, harmless[i]);
        if (!strcmp(k, "fp16") && cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(it, "enabled")))
            rc = perr(p, v, "deepspeed: %s: fp16.enabled: fp16 compute is not supported (bf16 or fp32)", path);
        if (!strcmp(k, "zero_optimization")) {
            known = 1;
            const cJSON *st = cJSON_GetObjectItemCaseSensitive(it, "stage");
            int stage = st && cJSON_IsNumber(st) ? st->valueint : 0;
            if (st && !cJSON_IsNumber(st))
                rc = perr(p, v, "deepspeed: %s: zero_optimization.stage: expected 0, 1, 2 or 3", path);
            else if (stage == 2)
                p->c->fsdp_shard_grad_op = 2;
            else if (stage == 3)
                p->c->fsdp_full_shard = 2;
            else if (stage != 0) {
                char what[64];
                snprintf(what, sizeof what, "ZeRO stage %d", stage);
                static const char *const meaning[] = {"", "ZeRO stage 1 (optimizer state sharded)",
                                                      "ZeRO stage 2 (SHARD_GRAD_OP)", "ZeRO stage 3 (FULL_SHARD)"};
                char where[600];
                snprintf(where, sizeof where, "deepspeed: %s: zero_optimization.stage", path);
                rc = strategy_refused(p, v, where, stage >= 1 && stage <= 3 ? meaning[stage] : what);
            }
            for (const char *off_key = "offload_optimizer"; off_key && !rc;
                 off_key = strcmp(off_key, "offload_optimizer") ? NULL : "offload_param") {
                const cJSON *o = cJSON_GetObjectItemCaseSensitive(it, off_key);
                const cJSON *dev = o ? cJSON_GetObjectItemCaseSensitive(o, "device") : NULL;
                if (o && !(cJSON_IsString(dev) && !strcmp(dev->valuestring, "none")))
                    rc = perr(p, v, "deepspeed: %s: zero_optimization.%s: offloading is not implemented yet", path,
                              off_key);
            }
        }
        if (!known && !rc)
            rc = perr(p, v, "deepspeed: %s: \"%s\": not supported (accepted: zero_optimization with stage 0, "
                            "\"auto\" batch sizes and clipping, bf16, logging settings)", path, k);
    }
    cJSON_Delete(j);
    if (rc) {
        free(path);
        return -1;
    }
    free(p->c->deepspeed);
    p->c->deepspeed = path;
    return 0;
}

static int apply_parallel(const pctx *p, const char *name, const yaml_node_t *knode, const yaml_node_t *v) {
    if (is_unset(v)) return 0;
    if (!strcmp(name, "fsdp")) {
        if (v->type == YAML_SEQUENCE_NODE) {
            for (yaml_node_item_t *it = v->data.sequence.items.start; it < v->data.sequence.items.top; it++) {
                const yaml_node_t *o = node_at(p->doc, *it);
                if (o->type != YAML_SCALAR_NODE) return perr(p, o, "fsdp: expected a list of option names");
                if (parallel_fsdp_option(p, o, sval(o))) return -1;
            }
            return 0;
        }
        if (v->type != YAML_SCALAR_NODE) return perr(p, v, "fsdp: expected a list of option names");
        char buf[256];
        snprintf(buf, sizeof buf, "%s", sval(v));
        for (char *sp, *t = strtok_r(buf, " ,", &sp); t; t = strtok_r(NULL, " ,", &sp))
            if (parallel_fsdp_option(p, v, t)) return -1;
        return 0;
    }
    if (!strcmp(name, "fsdp_version")) {
        if (v->type != YAML_SCALAR_NODE || (strcmp(sval(v), "1") && strcmp(sval(v), "2")))
            return perr(p, v, "fsdp_version: expected 1 or 2");
        return 0;
    }
    if (!strcmp(name, "fsdp_config")) return parallel_fsdp_config(p, v);
    return parallel_deepspeed(p, v);
}

/* The resolved keys for config.resolved.yaml (read back to the same struct). */
static void parallel_write_yaml(FILE *f, const train_config *c) {
    if (c->deepspeed) { /* the strategy is read from it again */
        fputs("deepspeed: ", f);
        put_yaml_str(f, c->deepspeed);
        fputc('\n', f);
    } else if (c->fsdp_full_shard) {
        fputs("fsdp_config:\n  fsdp_sharding_strategy: FULL_SHARD\n", f);
    } else if (c->fsdp_shard_grad_op) {
        fputs("fsdp_config:\n  fsdp_sharding_strategy: SHARD_GRAD_OP\n", f);
    } else if (c->fsdp_no_shard) {
        fputs("fsdp_config:\n  fsdp_sharding_strategy: NO_SHARD\n", f);
    }
    /* only when given: a config without them resolves as before; one fsdp_config mapping holds them */
    const int open_map = c->deepspeed || !(c->fsdp_shard_grad_op || c->fsdp_no_shard || c->fsdp_full_shard);
    if (open_map && (c->fsdp_offload_params || c->fsdp_state_dict_type)) fputs("fsdp_config:\n", f);
    if (c->fsdp_offload_params) fputs("  fsdp_offload_params: true\n", f);
    if (c->fsdp_state_dict_type)
        fprintf(f, "  fsdp_state_dict_type: %s\n", c->fsdp_state_dict_type == 2 ? "SHARDED_STATE_DICT" : "FULL_STATE_DICT");
}

int train_config_sharded_state_dict(const train_config *c) {
    return c->fsdp_state_dict_type ? c->fsdp_state_dict_type == 2 : c->fsdp_shard_grad_op != 0 || c->fsdp_full_shard != 0;
}

static int parallel_validate(const train_config *c, qerr *e) {
    const char *src = c->config_path ? c->config_path : "config";
    if ((c->fsdp_no_shard || c->fsdp_shard_grad_op == 1 || c->fsdp_full_shard == 1) && c->deepspeed)
        return qerr_set(e, "%s: fsdp / fsdp_config and deepspeed are both set; choose one", src);
    if ((c->fsdp_no_shard != 0) + (c->fsdp_shard_grad_op != 0) + (c->fsdp_full_shard != 0) > 1)
        return qerr_set(e, "%s: fsdp / fsdp_config ask for more than one of NO_SHARD, SHARD_GRAD_OP and FULL_SHARD "
                           "(fsdp options, fsdp_sharding_strategy, reshard_after_forward); choose one", src);
    return 0;
}
/* ---- end of several processes ------------------------------------------------------------------------------ */

/* torchtitan's activation checkpointing table (job_config.py ActivationCheckpoint) as a YAML
 * mapping: mode none | full | selective, and for selective selective_ac_option: op (the per-op
 * policy; here: keep the attention half, recompute the MLP half, model/llama.h). An integer
 * selective_ac_option (every n-th layer) is not implemented and refused. Sets
 * gradient_checkpointing to 0, 1 or 2. */
static int titan_activation_checkpoint(const pctx *p, const yaml_node_t *v) {
    char got[96];
    if (v->type != YAML_MAPPING_NODE) {
        describe(v, got, sizeof got);
        return perr(p, v, "activation_checkpoint: expected a mapping {mode: none|full|selective, "
                          "selective_ac_option: op}, got %s", got);
    }
    int mode = -1, opt_op = -1;
    const yaml_node_t *opt_at = NULL;
    for (yaml_node_pair_t *pr = v->data.mapping.pairs.start; pr < v->data.mapping.pairs.top; pr++) {
        const yaml_node_t *kn = node_at(p->doc, pr->key), *vn = node_at(p->doc, pr->value);
        if (kn->type != YAML_SCALAR_NODE) return perr(p, kn, "activation_checkpoint: expected string keys");
        const char *k = sval(kn);
        describe(vn, got, sizeof got);
        if (!strcmp(k, "mode")) {
            const char *m = vn->type == YAML_SCALAR_NODE ? sval(vn) : "";
            if (!strcmp(m, "none")) mode = 0;
            else if (!strcmp(m, "full")) mode = 1;
            else if (!strcmp(m, "selective")) mode = 2;
            else return perr(p, vn, "activation_checkpoint.mode: expected none, full or selective, got %s", got);
        } else if (!strcmp(k, "selective_ac_option")) {
            opt_at = vn;
            if (vn->type == YAML_SCALAR_NODE && !strcmp(sval(vn), "op")) opt_op = 1;
            else
                return perr(p, vn, "activation_checkpoint.selective_ac_option: expected op (the per-op policy; an "
                                   "integer, every n-th layer, is not implemented), got %s", got);
        } else if (!strcmp(k, "per_op_sac_force_recompute_mm_shapes_by_fqns") ||
                   !strcmp(k, "early_stop") || !strcmp(k, "preserve_rng_state") || !strcmp(k, "determinism_check")) {
            /* torchtitan's tuning of PyTorch's recompute (which mm shapes, RNG handling, the check of the
             * recomputed tensors): recomputation here is exact and deterministic, the results do not change */
        } else {
            return perr(p, kn, "activation_checkpoint.%s: unknown key (expected mode, selective_ac_option)", k);
        }
    }
    if (mode < 0) return perr(p, v, "activation_checkpoint: mode is missing (expected none, full or selective)");
    if (opt_op > 0 && mode != 2)
        return perr(p, opt_at, "activation_checkpoint.selective_ac_option: only with mode: selective");
    p->c->gradient_checkpointing = mode;
    return 0;
}

/* One top-level key: value. `seen` (N_KEYS entries, indexed by the canonical
 * key) detects duplicates in a file, also across the two spellings of a key. */
static int apply_pair(const pctx *p, const char *name, const yaml_node_t *knode, const yaml_node_t *v,
                      const key_spec **seen) {
    const key_spec *k = find_key(name);
    if (k) {
        const key_spec *canon = k->alias_of ? find_key(k->alias_of) : k;
        if (seen) {
            int idx = (int)(canon - KEYS);
            if (seen[idx] && seen[idx] != k)
                return perr(p, knode, "key \"%s\" given twice (also as \"%s\", another name for the same setting)",
                            name, seen[idx]->name);
            if (seen[idx]) return perr(p, knode, "key \"%s\" given twice", name);
            seen[idx] = k;
        }
        if (is_null(v) && !(k->flags & F_OPTIONAL)) return no_value(p, k, name, knode ? knode : v);
        if (!strcmp(name, "activation_checkpoint")) {
            if (titan_activation_checkpoint(p, v)) return -1;
        } else if (!strcmp(name, "gradient_checkpointing") && v->type == YAML_SCALAR_NODE &&
                   !strcmp(sval(v), "selective")) {
            p->c->gradient_checkpointing = 2; /* LLAMA_CKPT_SELECTIVE (model/llama.h) */
        } else if (!strcmp(name, "gradient_checkpointing") && v->type == YAML_SCALAR_NODE && !strcmp(sval(v), "offload")) {
            /* axolotl's (Unsloth's offloaded checkpointing): every block recomputed, its input kept in host
             * memory on a device (LLAMA_CKPT_OFFLOAD); trainer/run.c says what it does on the chosen backend */
            p->c->gradient_checkpointing = 3;
        } else if (apply_key(p, k, name, v)) {
            return -1;
        }
        p->c->key_origin[canon - KEYS] = p->lines && knode ? (int)knode->start_mark.line + 1 : p->origin;
        return 0;
    }
    const yaml_node_t *at = knode ? knode : v;
    if (!strcmp(name, "special_tokens")) return ax_special_tokens(p, at, v);
    if (!strcmp(name, "eot_tokens")) return ax_eot_tokens(p, at, v);
    if (!strcmp(name, "unfrozen_parameters")) return ax_unfrozen_parameters(p, at, v);
    if (!strcmp(name, "plugins")) return ax_plugins(p, at, v);
    if (!strcmp(name, "selective_checkpointing")) return ax_selective_checkpointing(p, at, v);
    if (!strcmp(name, "pretraining_dataset")) return ax_pretraining_dataset(p, at, v);
    if (parallel_key(name)) return apply_parallel(p, name, knode, v); /* several processes */
    const ax_key *ak = axolotl_key(name);
    if (ak && ak->decision != AX_IMPL) return apply_decided(p, ak, "", at, v);
    return unknown_key(p, knode, name);
}

static int yaml_error(qerr *e, const char *src, const yaml_parser_t *ps) {
    switch (ps->error) {
    case YAML_MEMORY_ERROR:
        return qerr_set(e, "%s: out of memory while parsing YAML", src);
    case YAML_READER_ERROR:
        return qerr_set(e, "%s: YAML read error: %s at byte %zu", src, ps->problem ? ps->problem : "?",
                        ps->problem_offset);
    default:
        if (ps->context)
            return qerr_set(e, "%s:%lu:%lu: YAML syntax error: %s (%s at line %lu)", src,
                            (unsigned long)ps->problem_mark.line + 1, (unsigned long)ps->problem_mark.column + 1,
                            ps->problem ? ps->problem : "?", ps->context,
                            (unsigned long)ps->context_mark.line + 1);
        return qerr_set(e, "%s:%lu:%lu: YAML syntax error: %s", src, (unsigned long)ps->problem_mark.line + 1,
                        (unsigned long)ps->problem_mark.column + 1, ps->problem ? ps->problem : "?");
    }
}

/* ------------------------------------------------------------------------ */
/* Input limits                                                               */

/* The text of a config file: a regular file (a directory used to fail as "input error at byte 0", a
 * FIFO without a writer blocked, /dev/zero never ended) of at most TRAIN_CONFIG_MAX_BYTES, with a NUL
 * after the last byte. The open is O_NONBLOCK, so a FIFO cannot block it. */
static unsigned char *config_read(const char *path, size_t *len, qerr *e) {
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) {
        qerr_set(e, "cannot open config %s: %s", path, strerror(errno));
        return NULL;
    }
    struct stat sb;
    unsigned char *buf = NULL;
    if (fstat(fd, &sb)) {
        qerr_set(e, "cannot open config %s: %s", path, strerror(errno));
        goto fail;
    }
    if (!S_ISREG(sb.st_mode)) {
        qerr_set(e, "%s: is %s, expected a YAML file", path, file_kind_name(sb.st_mode));
        goto fail;
    }
    if (sb.st_size > (off_t)TRAIN_CONFIG_MAX_BYTES) {
        qerr_set(e, "%s: %lld bytes, more than the %u-byte (1 MiB) limit of a config file", path,
                 (long long)sb.st_size, TRAIN_CONFIG_MAX_BYTES);
        goto fail;
    }
    size_t want = (size_t)sb.st_size, n = 0;
    if (!(buf = malloc(want + 1))) {
        qerr_set(e, "%s: out of memory", path);
        goto fail;
    }
    while (n < want) { /* exactly st_size bytes: a file that grows meanwhile is not read on */
        ssize_t got = read(fd, buf + n, want - n);
        if (got < 0 && errno == EINTR) continue;
        if (got < 0) {
            qerr_set(e, "%s: read error: %s", path, strerror(errno));
            goto fail;
        }
        if (got == 0) break;
        n += (size_t)got;
    }
    close(fd);
    buf[n] = 0;
    *len = n;
    return buf;
fail:
    free(buf);
    close(fd);
    return NULL;
}

/* Refuse YAML nested deeper than TRAIN_CONFIG_MAX_DEPTH or with more than TRAIN_CONFIG_MAX_ANCHORS
 * anchors and aliases, before libyaml builds a document of it: its scanner walks one saved
 * "simple key" per open flow collection for every token (quadratic in the depth: 400 KB of "[" took
 * minutes), and its loader looks every anchor and alias up in a list (quadratic in their number).
 * Events are pulled one at a time, so the scan stops within one line of the limit. A syntax error is
 * left to the loader, which reports it with its position. what: the message prefix ("x.yaml", or
 * "command line: key"); lines: append the line. */
static int yaml_check_limits(qerr *e, const char *what, int lines, const unsigned char *text, size_t n) {
    yaml_parser_t ps;
    yaml_event_t ev;
    if (!yaml_parser_initialize(&ps)) return qerr_set(e, "%s: out of memory", what);
    yaml_parser_set_input_string(&ps, text, n);
    int depth = 0, anchors = 0, rc = 0;
    while (yaml_parser_parse(&ps, &ev)) {
        yaml_event_type_t t = ev.type;
        unsigned long line = (unsigned long)ev.start_mark.line + 1;
        const unsigned char *anchor = t == YAML_ALIAS_EVENT            ? ev.data.alias.anchor
                                      : t == YAML_SCALAR_EVENT         ? ev.data.scalar.anchor
                                      : t == YAML_SEQUENCE_START_EVENT ? ev.data.sequence_start.anchor
                                      : t == YAML_MAPPING_START_EVENT  ? ev.data.mapping_start.anchor
                                                                       : NULL;
        yaml_event_delete(&ev);
        if (t == YAML_SEQUENCE_START_EVENT || t == YAML_MAPPING_START_EVENT) depth++;
        if (t == YAML_SEQUENCE_END_EVENT || t == YAML_MAPPING_END_EVENT) depth--;
        if (anchor) anchors++;
        char at[48] = "";
        if (lines) snprintf(at, sizeof at, " (line %lu)", line);
        if (depth > TRAIN_CONFIG_MAX_DEPTH) {
            rc = qerr_set(e, "%s: nested deeper than %d levels, the limit of a config%s", what,
                          TRAIN_CONFIG_MAX_DEPTH, at);
            break;
        }
        if (anchors > TRAIN_CONFIG_MAX_ANCHORS) {
            rc = qerr_set(e, "%s: more than %d anchors and aliases (&name, *name), the limit of a config%s", what,
                          TRAIN_CONFIG_MAX_ANCHORS, at);
            break;
        }
        if (t == YAML_STREAM_END_EVENT) break;
    }
    yaml_parser_delete(&ps);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* Public: load / override                                                    */

/* The refusal of a config without `adapter:` (src: where the config came from). */
#define FULL_FT_WHY_FMT "%s: no \"adapter:\": axolotl then trains every weight of the model (a full fine-tune), " \
                        "which qlora does not do; it trains LoRA adapters: add adapter: qlora (NF4 base) or adapter: lora"
static const char *full_ft_why(char *buf, size_t n, const char *src) {
    snprintf(buf, n, FULL_FT_WHY_FMT, src);
    return buf;
}
#define FULL_FT_WHY(src) full_ft_why((char[640]){0}, 640, (src))

int train_config_load(const char *path, train_config *out, qerr *e) {
    train_config_refusals r;
    int rc = train_config_load_all(path, out, &r, e);
    if (rc && r.n > 1) { /* the lines, as many as fit */
        size_t l = 0;
        e->msg[0] = 0;
        for (int i = 0; i < r.n && l + 2 < sizeof e->msg; i++) {
            snprintf(e->msg + l, sizeof e->msg - l, "%s%s", i ? "\n" : "", r.lines[i]);
            l = strlen(e->msg);
        }
    }
    train_config_refusals_free(&r);
    return rc;
}

int train_config_load_all(const char *path, train_config *out, train_config_refusals *rl, qerr *e) {
    memset(out, 0, sizeof *out);
    memset(rl, 0, sizeof *rl);
    size_t len;
    unsigned char *text = config_read(path, &len, e);
    if (!text) return -1;
    if (yaml_check_limits(e, path, 1, text, len)) {
        free(text);
        return -1;
    }
    yaml_parser_t ps;
    yaml_document_t doc;
    train_config c, def;
    int rc = -1, have_doc = 0;
    memset(&c, 0, sizeof c);
    memset(&def, 0, sizeof def);
    if (!yaml_parser_initialize(&ps)) {
        free(text);
        return qerr_set(e, "%s: out of memory", path);
    }
    yaml_parser_set_input_string(&ps, text, len);
    if (!yaml_parser_load(&ps, &doc)) {
        yaml_error(e, path, &ps);
        goto done;
    }
    have_doc = 1;
    yaml_node_t *root = yaml_document_get_root_node(&doc);
    if (!root || is_null(root)) {
        qerr_set(e, "%s: the file is empty; expected a mapping with at least base_model and datasets", path);
        goto done;
    }
    {
        yaml_document_t doc2;
        if (!yaml_parser_load(&ps, &doc2)) {
            yaml_error(e, path, &ps);
            goto done;
        }
        yaml_node_t *root2 = yaml_document_get_root_node(&doc2);
        unsigned long line2 = root2 ? (unsigned long)root2->start_mark.line + 1 : 0;
        yaml_document_delete(&doc2);
        if (root2) {
            qerr_set(e, "%s: more than one YAML document (the second starts at line %lu)", path, line2);
            goto done;
        }
    }
    if (root->type != YAML_MAPPING_NODE) {
        qerr_set(e, "%s: expected a mapping of key: value pairs at the top level (line %lu)", path,
                 (unsigned long)root->start_mark.line + 1);
        goto done;
    }
    if (train_config_defaults(&c) || train_config_defaults(&def)) {
        qerr_set(e, "out of memory");
        goto done;
    }
    pctx p = {path, 1, &doc, &c, &def, e, 0, rl};
    const key_spec *seen[N_KEYS];
    memset(seen, 0, sizeof seen);
    /* axolotl without `adapter:` trains every weight (a full fine-tune): that reason comes first */
    int has_adapter = 0;
    for (yaml_node_pair_t *pr = root->data.mapping.pairs.start; pr < root->data.mapping.pairs.top; pr++) {
        yaml_node_t *k = node_at(&doc, pr->key);
        if (k->type == YAML_SCALAR_NODE && !strcmp(sval(k), "adapter")) has_adapter = 1;
    }
    for (yaml_node_pair_t *pr = root->data.mapping.pairs.start; pr < root->data.mapping.pairs.top; pr++) {
        yaml_node_t *k = node_at(&doc, pr->key), *v = node_at(&doc, pr->value);
        if (k->type != YAML_SCALAR_NODE) {
            perr(&p, k, "top-level keys must be plain strings");
            goto done;
        }
        int before = rl->n;
        if (apply_pair(&p, sval(k), k, v, seen) && rl->n == before) record(&p);
    }
    for (yaml_node_pair_t *pr = root->data.mapping.pairs.start; pr < root->data.mapping.pairs.top; pr++) {
        yaml_node_t *k = node_at(&doc, pr->key);
        if (k->type == YAML_SCALAR_NODE && !strcmp(sval(k), "selective_checkpointing") && sac_resolve(&p, k))
            record(&p);
    }
    if (c.sample_packing_sequentially && c.sample_packing && !c.curriculum_sampling &&
        add_warning(&c, e, "%s: sample_packing_sequentially packs next-fit in the seeded shuffled order (axolotl warns "
                           "the same: \"did you want to also enable curriculum_sampling?\")", path))
        goto done;
    if (c.sample_packing_sequentially && !c.sample_packing &&
        add_warning(&c, e, "%s: sample_packing_sequentially does nothing without sample_packing (as in axolotl)", path))
        goto done;
    if (rl->n > 0) {
        if (!has_adapter) {
            qerr_set(e, "%s", FULL_FT_WHY(path));
            record(&p);
            char *first = rl->lines[rl->n - 1];
            memmove(rl->lines + 1, rl->lines, (size_t)(rl->n - 1) * sizeof *rl->lines);
            rl->lines[0] = first;
        }
        if (rl->n == 1)
            qerr_set(e, "%s", rl->lines[0]);
        else
            qerr_set(e, "%s: %d refused keys (each listed above); nothing was run", path, rl->n);
        goto done;
    }
    if (load_in_8bit_resolve(&c, e)) goto done;
    if (!(c.config_path = dup_str(path))) {
        qerr_set(e, "out of memory");
        goto done;
    }
    *out = c;
    memset(&c, 0, sizeof c);
    rc = 0;
done:
    train_config_free(&c);
    train_config_free(&def);
    if (have_doc) yaml_document_delete(&doc);
    yaml_parser_delete(&ps);
    free(text);
    return rc;
}

int train_config_apply_override(train_config *c, const char *kv, qerr *e) {
    static const char *const src = "command line";
    const char *eq = strchr(kv, '=');
    if (!eq) return qerr_set(e, "%s: expected key=value, got \"%s\"", src, kv);
    const char *kb = kv, *ke = eq;
    while (kb < ke && isspace((unsigned char)*kb)) kb++;
    while (ke > kb && isspace((unsigned char)ke[-1])) ke--;
    char key[128];
    if (ke == kb) return qerr_set(e, "%s: expected key=value, got \"%s\"", src, kv);
    if ((size_t)(ke - kb) >= sizeof key) return qerr_set(e, "%s: unknown key \"%.*s\"", src, (int)(ke - kb), kb);
    memcpy(key, kb, (size_t)(ke - kb));
    key[ke - kb] = 0;

    pctx p = {src, 0, NULL, c, NULL, e, -1 - c->n_overrides, NULL};
    if (!find_key(key) && !axolotl_key(key)) return unknown_key(&p, NULL, key);

    const char *val = eq + 1;
    while (isspace((unsigned char)*val)) val++;
    if (!*val) val = "~";
    char what[160];
    snprintf(what, sizeof what, "%s: %s", src, key);
    if (yaml_check_limits(e, what, 0, (const unsigned char *)val, strlen(val))) return -1;
    /* the slot for this override, so that once applied it is remembered without a failure */
    char **ov = realloc(c->overrides, (size_t)(c->n_overrides + 1) * sizeof *ov);
    if (!ov) return qerr_set(e, "out of memory");
    c->overrides = ov;
    if (!(ov[c->n_overrides] = dup_str(kv))) return qerr_set(e, "out of memory");

    yaml_parser_t ps;
    yaml_document_t doc;
    train_config def;
    int rc = -1;
    memset(&def, 0, sizeof def);
    if (!yaml_parser_initialize(&ps)) {
        free(ov[c->n_overrides]);
        return qerr_set(e, "out of memory");
    }
    yaml_parser_set_input_string(&ps, (const unsigned char *)val, strlen(val));
    if (!yaml_parser_load(&ps, &doc)) {
        if (ps.error == YAML_MEMORY_ERROR)
            qerr_set(e, "out of memory");
        else
            qerr_set(e, "%s: %s: cannot parse \"%s\" as a YAML value: %s at column %lu", src, key, val,
                     ps.problem ? ps.problem : "?", (unsigned long)ps.problem_mark.column + 1);
        yaml_parser_delete(&ps);
        free(ov[c->n_overrides]);
        return -1;
    }
    yaml_node_t *root = yaml_document_get_root_node(&doc);
    if (!root) {
        qerr_set(e, "%s: %s: empty value", src, key);
        goto done;
    }
    if (train_config_defaults(&def)) {
        qerr_set(e, "out of memory");
        goto done;
    }
    p.doc = &doc;
    p.def = &def;
    rc = apply_pair(&p, key, NULL, root, NULL);
    if (rc == 0 && (!strcmp(key, "selective_checkpointing") || !strcmp(key, "gradient_checkpointing")))
        rc = sac_resolve(&p, NULL);
    if (!rc) rc = load_in_8bit_resolve(c, e);
done:
    if (rc == 0)
        c->n_overrides++;
    else
        free(ov[c->n_overrides]);
    train_config_free(&def);
    yaml_document_delete(&doc);
    yaml_parser_delete(&ps);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* Public: validate                                                           */

static int check_datasets(const char *src, const char *key, const dataset_cfg *d, int n, qerr *e) {
    char list[128];
    join_values(list, sizeof list, V_DSTYPE);
    for (int i = 0; i < n; i++) {
        if (!d[i].path || !*d[i].path) return qerr_set(e, "%s: %s[%d]: missing required key \"path\"", src, key, i);
        if (!d[i].type) return qerr_set(e, "%s: %s[%d]: missing required key \"type\" (one of %s)", src, key, i, list);
        if (enum_index(V_DSTYPE, d[i].type) < 0)
            return qerr_set(e, "%s: %s[%d].type: expected one of %s, got \"%s\"", src, key, i, list, d[i].type);
        if (!d[i].field || !*d[i].field)
            return qerr_set(e, "%s: %s[%d].field: expected a non-empty string", src, key, i);
        if (!d[i].field_messages || !*d[i].field_messages)
            return qerr_set(e, "%s: %s[%d].field_messages: expected a non-empty string", src, key, i);
    }
    return 0;
}

const char *train_config_source(const train_config *c, const char *key, int *line, char *buf, size_t n) {
    const key_spec *k = find_key(key);
    if (k && k->alias_of) k = find_key(k->alias_of);
    int o = k ? c->key_origin[k - KEYS] : 0;
    if (line) *line = o > 0 ? o : 0;
    if (o < 0 && -1 - o < c->n_overrides) {
        const char *ov = c->overrides[-1 - o];
        if (strlen(ov) > 80)
            snprintf(buf, n, "command line (%.77s...)", ov);
        else
            snprintf(buf, n, "command line (%s)", ov);
    } else {
        snprintf(buf, n, "%s", c->config_path ? c->config_path : "config");
    }
    return buf;
}

/* Where a key's value came from, as validate's messages show it: "<source>: key: ...<at>". */
typedef struct where {
    char src[128];
    char at[32]; /* " (line N)" or "" */
} where;

static const where *where_of(const train_config *c, const char *key, where *w) {
    int line;
    train_config_source(c, key, &line, w->src, sizeof w->src);
    w->at[0] = 0;
    if (line > 0) snprintf(w->at, sizeof w->at, " (line %d)", line);
    return w;
}

/* Two keys that cannot go together: the message names the later setting (an override beats the file,
 * a later override an earlier one), and the file lines of both. */
static int conflict(const train_config *c, qerr *e, const char *ka, const char *kb, const char *msg) {
    int oa = c->key_origin[find_key(ka) - KEYS], ob = c->key_origin[find_key(kb) - KEYS];
    const char *blame = ob < 0 && (oa >= 0 || ob < oa) ? kb : ka;
    where w;
    where_of(c, blame, &w);
    char tail[96] = "";
    const char *names[2] = {ka, kb};
    int origins[2] = {oa, ob};
    for (int i = 0; i < 2; i++) {
        size_t l = strlen(tail);
        if (origins[i] > 0)
            snprintf(tail + l, sizeof tail - l, "%s%s: line %d", l ? ", " : " (", names[i], origins[i]);
        else if (origins[i] < 0 && names[i] != blame)
            snprintf(tail + l, sizeof tail - l, "%s%s: command line", l ? ", " : " (", names[i]);
    }
    if (tail[0]) strncat(tail, ")", sizeof tail - strlen(tail) - 1);
    return qerr_set(e, "%s: %s%s", w.src, msg, tail);
}

int train_config_validate(const train_config *c, qerr *e) {
    char list[256], num[64];
    where w;
    if (!c->base_model || !*c->base_model)
        return qerr_set(e, "%s: missing required key \"base_model\" (a .gguf file or a Hugging Face model directory)",
                        where_of(c, "base_model", &w)->src);
    if (c->pretraining_path) { /* axolotl's rules for a streamed pretraining_dataset (schemas/validation.py) */
        const char *src = c->config_path ? c->config_path : "config";
        if (c->n_datasets > 0)
            return qerr_set(e, "%s: pretraining_dataset and datasets are both set: axolotl then reads only "
                               "pretraining_dataset; give one", src);
        if (c->max_steps <= 0)
            return qerr_set(e, "%s: pretraining_dataset: max_steps must be set (axolotl: \"Trainer can't infer length "
                               "and schedule optimizer/learning rate without it\")", src);
        if (c->val_set_size != 0.0)
            return qerr_set(e, "%s: pretraining_dataset: val_set_size is not supported (axolotl's rule); give the "
                               "held-out data as test_datasets", src);
        if (!c->sample_packing)
            return qerr_set(e, "%s: pretraining_dataset without sample_packing (axolotl's encode_streaming: rows of "
                               "one truncated text, or concatenated with pad tokens between texts) is not implemented; "
                               "set sample_packing: true", src);
        if (!c->pretrain_multipack_attn)
            return qerr_set(e, "%s: pretrain_multipack_attn: false (attention across the packed windows of a row) is "
                               "not implemented; attention here stays inside each window", src);
    } else if (c->streaming) {
        return qerr_set(e, "%s: streaming: true without pretraining_dataset (streamed datasets: entries) is not "
                           "implemented: datasets entries are read whole; delete the line",
                        c->config_path ? c->config_path : "config");
    } else if (c->n_datasets < 1) {
        where_of(c, "datasets", &w);
        return qerr_set(e, "%s: missing required key \"datasets\" (a list of {path, type} entries, or "
                           "pretraining_dataset)%s", w.src, w.at);
    }
    if (c->key_origin[find_key("adapter") - KEYS] == 0)
        return qerr_set(e, "%s", FULL_FT_WHY(c->config_path ? c->config_path : "config"));
    for (int i = 0; i < N_KEYS; i++) {
        const key_spec *k = &KEYS[i];
        if (k->alias_of) continue;
        where_of(c, k->name, &w);
        const char *src = w.src, *at = w.at;
        switch (k->kind) {
        case K_STR: {
            const char *s = *CFIELD(c, k->off, char *);
            if (!s && (k->flags & F_OPTIONAL)) break;
            if (!s || !*s) return qerr_set(e, "%s: %s: expected %s%s", src, k->name, k->expect, at);
            break;
        }
        case K_ENUM: {
            const char *s = *CFIELD(c, k->off, char *);
            join_values(list, sizeof list, k->values);
            if (!s || enum_index(k->values, s) < 0)
                return qerr_set(e, "%s: %s: expected one of %s, got \"%s\"%s", src, k->name, list, s ? s : "null", at);
            break;
        }
        case K_BOOL:
        case K_BF16: {
            int b = *CFIELD(c, k->off, int);
            if (k->off == OFF(gradient_checkpointing) && (b == 2 || b == 3)) break; /* selective, offload */
            if (b != 0 && b != 1) return qerr_set(e, "%s: %s: expected true or false, got %d%s", src, k->name, b, at);
            break;
        }
        case K_INT: {
            int x = *CFIELD(c, k->off, int);
            if (!range_ok(k, x)) return qerr_set(e, "%s: %s: expected %s, got %d%s", src, k->name, k->expect, x, at);
            break;
        }
        case K_FLOAT:
        case K_DOUBLE: {
            double x = k->kind == K_FLOAT ? (double)*CFIELD(c, k->off, float) : *CFIELD(c, k->off, double);
            if (!isfinite(x) || !range_ok(k, x)) {
                fmt_shortest(num, sizeof num, x, k->kind == K_FLOAT);
                return qerr_set(e, "%s: %s: expected %s, got %s%s", src, k->name, k->expect, num, at);
            }
            break;
        }
        case K_MODULES: {
            char *const *m = *CFIELD(c, k->off, strv_t);
            int n = *CFIELD(c, k->off_n, int);
            const char *const *vals = k->values ? k->values : module_values();
            join_values(list, sizeof list, vals);
            for (int j = 0; j < n; j++) {
                if (!m[j] || enum_index(vals, m[j]) < 0)
                    return qerr_set(e, "%s: %s[%d]: expected one of %s, got \"%s\"%s", src, k->name, j, list,
                                    m[j] ? m[j] : "null", at);
                for (int q = 0; q < j; q++)
                    if (!strcmp(m[q], m[j]))
                        return qerr_set(e, "%s: %s: \"%s\" is listed twice%s", src, k->name, m[j], at);
            }
            break;
        }
        case K_DATASETS:
            if (check_datasets(src, k->name, *CFIELD(c, k->off, dataset_cfg *), *CFIELD(c, k->off_n, int), e))
                return -1;
            break;
        }
    }
    if (c->load_in_8bit && c->load_in_4bit)
        return conflict(c, e, "load_in_4bit", "load_in_8bit",
                        "load_in_4bit and load_in_8bit are both true; choose one frozen-base format (NF4 or int8)");
    if (!strcmp(c->adapter, "qlora") && c->load_in_8bit)
        return conflict(c, e, "adapter", "load_in_8bit",
                        "adapter: \"qlora\" is LoRA over an NF4 base; with load_in_8bit: true use adapter: lora");
    if (!strcmp(c->adapter, "qlora") && !c->load_in_4bit)
        return conflict(c, e, "adapter", "load_in_4bit",
                        "adapter: \"qlora\" requires load_in_4bit: true (use adapter: lora to keep the base in bf16)");
    if (train_config_target_mask(c) == 0) {
        char msg[400];
        join_values(list, sizeof list, module_values());
        snprintf(msg, sizeof msg,
                 "lora_target_modules: no LoRA target; list some of %s, or set lora_target_linear: true", list);
        return conflict(c, e, "lora_target_modules", "lora_target_linear", msg);
    }
    if (c->fp16 && c->bf16 && !c->bf16_auto && c->key_origin[find_key("bf16") - KEYS] != 0)
        return conflict(c, e, "bf16", "fp16",
                        "bf16: true and fp16: true are both set; choose one compute precision (axolotl refuses "
                        "this too)");
    if (c->fp16 && (c->fsdp_shard_grad_op || c->fsdp_full_shard))
        return qerr_set(e,
                        "%s: fp16: true with %s: the loss-scaling decision under a sharded strategy is not "
                        "implemented; use NO_SHARD (data parallel, every rank decides alike) or bf16: true",
                        c->config_path ? c->config_path : "config",
                        c->fsdp_full_shard ? "FULL_SHARD" : "SHARD_GRAD_OP");
    if (c->warmup_steps > 0 && c->warmup_ratio > 0)
        return conflict(c, e, "warmup_steps", "warmup_ratio",
                        "warmup_steps and warmup_ratio are both set; use one of them");
    if (c->val_set_size > 0 && c->n_test_datasets > 0)
        return conflict(c, e, "val_set_size", "test_datasets",
                        "val_set_size and test_datasets are both set; use one held-out source");
    if (c->eval_steps > 0 && c->evals_per_epoch > 0)
        return conflict(c, e, "eval_steps", "evals_per_epoch",
                        "eval_steps and evals_per_epoch are both set; use one of them");
    if (c->save_steps > 0 && c->saves_per_epoch > 0)
        return conflict(c, e, "save_steps", "saves_per_epoch",
                        "save_steps and saves_per_epoch are both set; use one of them");
    return parallel_validate(c, e); /* several processes */
}

/* ------------------------------------------------------------------------ */
/* Public: write                                                              */

/* YAML double-quoted scalar (escapes \ " and control bytes; UTF-8 passes). */
static void put_yaml_str(FILE *f, const char *s) {
    fputc('"', f);
    for (const unsigned char *q = (const unsigned char *)s; *q; q++) {
        switch (*q) {
        case '"': fputs("\\\"", f); break;
        case '\\': fputs("\\\\", f); break;
        case '\n': fputs("\\n", f); break;
        case '\t': fputs("\\t", f); break;
        case '\r': fputs("\\r", f); break;
        default:
            if (*q < 0x20 || *q == 0x7f)
                fprintf(f, "\\x%02x", *q);
            else
                fputc(*q, f);
        }
    }
    fputc('"', f);
}

static void put_datasets(FILE *f, const char *key, const dataset_cfg *d, int n) {
    if (n == 0) {
        fprintf(f, "%s: []\n", key);
        return;
    }
    fprintf(f, "%s:\n", key);
    for (int i = 0; i < n; i++) {
        const char *names[4] = {"path", "type", "field", "field_messages"};
        const char *vals[4] = {d[i].path, d[i].type, d[i].field, d[i].field_messages};
        for (int j = 0; j < 4; j++) {
            fprintf(f, "  %s %s: ", j ? " " : "-", names[j]);
            if (vals[j])
                put_yaml_str(f, vals[j]);
            else
                fputs("null", f);
            fputc('\n', f);
        }
        /* axolotl's keys of an entry (null: the default; written only when set) */
        const char *xn[8] = {"message_field_role", "message_field_content", "train_on_eos", "train_on_eot", "split",
                             "data_files", "chat_template", "chat_template_jinja"};
        const char *xv[8] = {d[i].message_field_role, d[i].message_field_content, d[i].train_on_eos, d[i].train_on_eot,
                             d[i].split, d[i].data_files, d[i].chat_template, d[i].chat_template_jinja};
        for (int j = 0; j < 8; j++) {
            if (!xv[j]) continue;
            fprintf(f, "    %s: ", xn[j]);
            put_yaml_str(f, xv[j]);
            fputc('\n', f);
        }
        if (d[i].roles_to_train) {
            fputs("    roles_to_train: [", f);
            for (int j = 0; j < d[i].n_roles_to_train; j++) {
                if (j) fputs(", ", f);
                put_yaml_str(f, d[i].roles_to_train[j]);
            }
            fputs("]\n", f);
        }
        fprintf(f, "    drop_system_message: %s\n", d[i].drop_system_message ? "true" : "false");
    }
}

int train_config_write_yaml(const train_config *c, const char *path, qerr *e) {
    /* printed into memory, then written in one piece by core/file */
    char *text = NULL;
    size_t text_len = 0;
    FILE *f = open_memstream(&text, &text_len);
    if (!f) return qerr_set(e, "out of memory writing %s", path);
    char num[64];
    fprintf(f, "# Resolved qlora-train configuration: every key with its final value.\n");
    if (c->config_path) {
        fputs("# Loaded from: ", f);
        for (const char *q = c->config_path; *q; q++) fputc(*q == '\n' ? ' ' : *q, f);
        fputc('\n', f);
    }
    for (int i = 0; i < N_KEYS; i++) {
        const key_spec *k = &KEYS[i];
        if (k->alias_of) continue;
        switch (k->kind) {
        case K_STR:
        case K_ENUM: {
            const char *s = *CFIELD(c, k->off, char *);
            if (!s && !(k->flags & F_OPTIONAL)) {
                /* never set (a required key of a config that has not been validated): null would be refused
                 * on reading, and an absent key reads back as this same unset state */
                fprintf(f, "# %s: not set\n", k->name);
                break;
            }
            fprintf(f, "%s: ", k->name);
            if (s)
                put_yaml_str(f, s);
            else
                fputs("null", f);
            fputc('\n', f);
            break;
        }
        case K_BOOL:
        case K_BF16:
            if (k->off == OFF(gradient_checkpointing) && *CFIELD(c, k->off, int) == 2) {
                fprintf(f, "%s: selective\n", k->name);
                break;
            }
            if (k->off == OFF(gradient_checkpointing) && *CFIELD(c, k->off, int) == 3) {
                fprintf(f, "%s: offload\n", k->name);
                break;
            }
            fprintf(f, "%s: %s\n", k->name, *CFIELD(c, k->off, int) ? "true" : "false");
            break;
        case K_INT:
            fprintf(f, "%s: %d\n", k->name, *CFIELD(c, k->off, int));
            break;
        case K_FLOAT:
            fmt_shortest(num, sizeof num, (double)*CFIELD(c, k->off, float), 1);
            fprintf(f, "%s: %s\n", k->name, num);
            break;
        case K_DOUBLE:
            fmt_shortest(num, sizeof num, *CFIELD(c, k->off, double), 0);
            fprintf(f, "%s: %s\n", k->name, num);
            break;
        case K_MODULES: {
            char *const *m = *CFIELD(c, k->off, strv_t);
            int cnt = *CFIELD(c, k->off_n, int);
            fprintf(f, "%s: [", k->name);
            for (int j = 0; j < cnt; j++) {
                if (j) fputs(", ", f);
                put_yaml_str(f, m[j]);
            }
            fputs("]\n", f);
            break;
        }
        case K_DATASETS:
            put_datasets(f, k->name, *CFIELD(c, k->off, dataset_cfg *), *CFIELD(c, k->off_n, int));
            break;
        }
    }
    parallel_write_yaml(f, c); /* several processes */
    if (c->pretraining_path) {
        fputs("pretraining_dataset:\n  - path: ", f);
        put_yaml_str(f, c->pretraining_path);
        fputs("\n    text_column: ", f);
        put_yaml_str(f, c->pretraining_text_column ? c->pretraining_text_column : "text");
        fprintf(f, "\n    skip: %lld\n", c->pretraining_skip);
    }
    if (c->special_bos || c->special_eos || c->special_unk) { /* checked against the model at start-up */
        fputs("special_tokens:\n", f);
        const char *sv[3] = {c->special_bos, c->special_eos, c->special_unk};
        static const char *const sn[3] = {"bos_token", "eos_token", "unk_token"};
        for (int j = 0; j < 3; j++) {
            if (!sv[j]) continue;
            fprintf(f, "  %s: ", sn[j]);
            put_yaml_str(f, sv[j]);
            fputc('\n', f);
        }
    }
    if (c->eot_tokens) {
        fputs("eot_tokens: [", f);
        for (int j = 0; j < c->n_eot_tokens; j++) {
            if (j) fputs(", ", f);
            put_yaml_str(f, c->eot_tokens[j]);
        }
        fputs("]\n", f);
    }
    if (c->unfrozen_parameters) {
        fputs("unfrozen_parameters: [", f);
        for (int j = 0; j < c->n_unfrozen_parameters; j++) {
            if (j) fputs(", ", f);
            put_yaml_str(f, c->unfrozen_parameters[j]);
        }
        fputs("]\n", f);
    }
    int bad = ferror(f);
    if (fclose(f)) bad = 1;
    int rc = bad ? qerr_set(e, "out of memory writing %s", path) : file_write_atomic(path, text, text_len, e);
    free(text);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* Public: derived values                                                     */

unsigned train_config_target_mask(const train_config *c) {
    unsigned m = 0;
    if (c->lora_target_linear) m = (1u << LLAMA_N_LINEAR) - 1u;
    for (int i = 0; i < c->n_lora_target_modules; i++) {
        const char *name = c->lora_target_modules[i];
        int k = name ? llama_linear_slot_of_any(name, strlen(name)) : -1; /* qkv_proj: slot q, gate_up_proj: gate */
        if (k >= 0) m |= 1u << k;
    }
    return m;
}

void train_config_modules_to_save(const train_config *c, int save[2]) {
    save[0] = save[1] = 0;
    for (int i = 0; i < c->n_lora_modules_to_save; i++) {
        const char *name = c->lora_modules_to_save[i];
        if (name && !strcmp(name, "embed_tokens")) save[0] = 1;
        if (name && !strcmp(name, "lm_head")) save[1] = 1;
    }
}

int train_config_eval_interval(const train_config *c, int steps_per_epoch) {
    if (c->eval_steps > 0) return c->eval_steps;
    if (c->evals_per_epoch > 0) {
        int k = steps_per_epoch / c->evals_per_epoch;
        return k > 1 ? k : 1;
    }
    return 0;
}

int train_config_save_interval(const train_config *c, int steps_per_epoch) {
    if (c->save_steps > 0) return c->save_steps;
    if (c->saves_per_epoch > 0) {
        int k = steps_per_epoch / c->saves_per_epoch;
        return k > 1 ? k : 1;
    }
    return 500;
}

int train_config_warmup_steps(const train_config *c, int total_steps) {
    if (c->warmup_steps > 0) return c->warmup_steps;
    if (c->warmup_ratio > 0 && total_steps > 0) return (int)ceil((double)c->warmup_ratio * (double)total_steps);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Public: axolotl keys at run time                                           */

unsigned long long train_config_data_seed(const train_config *c) {
    return (unsigned long long)(c->data_seed >= 0 ? c->data_seed : c->seed);
}

int train_config_pack_mode(const train_config *c) {
    int m = c->sample_packing ? DATASET_PACK : 0;
    if (c->sample_packing && c->sample_packing_sequentially) m |= DATASET_PACK_SEQUENTIAL;
    if (c->curriculum_sampling) m |= DATASET_PACK_IN_ORDER;
    return m;
}

int train_config_dataset_specs(const train_config *c, int test, dataset_spec **out, int *n_out, qerr *e) {
    const dataset_cfg *d = test ? c->test_datasets : c->datasets;
    int n = test ? c->n_test_datasets : c->n_datasets;
    dataset_spec *s = calloc((size_t)n + 1, sizeof *s);
    if (!s) return qerr_set(e, "out of memory");
    for (int i = 0; i < n; i++) {
        char *file;
        struct stat sb;
        if (d[i].data_files && !stat(d[i].path, &sb) && S_ISDIR(sb.st_mode)) {
            size_t l = strlen(d[i].path) + strlen(d[i].data_files) + 2;
            if ((file = malloc(l))) snprintf(file, l, "%s/%s", d[i].path, d[i].data_files);
        } else {
            file = dup_str(d[i].data_files ? d[i].data_files : d[i].path);
        }
        if (!file) {
            train_config_dataset_specs_free(s, i);
            return qerr_set(e, "out of memory");
        }
        const char *ct = d[i].chat_template ? d[i].chat_template : c->chat_template;
        s[i] = (dataset_spec){.path = file, .type = d[i].type, .field = d[i].field,
                              .field_messages = d[i].field_messages, .skip_bad_lines = c->skip_bad_lines,
                              .message_field_role = d[i].message_field_role,
                              .message_field_content = d[i].message_field_content,
                              .roles_to_train = d[i].roles_to_train, .n_roles_to_train = d[i].n_roles_to_train,
                              .train_on_eos = d[i].train_on_eos, .train_on_eot = d[i].train_on_eot,
                              .drop_system_message = d[i].drop_system_message,
                              .chat_template = ct,
                              .chat_template_jinja = d[i].chat_template ? d[i].chat_template_jinja
                                                                        : c->chat_template_jinja,
                              .eot_tokens = c->eot_tokens, .n_eot_tokens = c->n_eot_tokens,
                              .split = d[i].split};
    }
    *out = s;
    *n_out = n;
    return 0;
}

void train_config_dataset_specs_free(dataset_spec *s, int n) {
    if (!s) return;
    for (int i = 0; i < n; i++) free(s[i].path);
    free(s);
}

int train_config_check_special_tokens(const train_config *c, int bos, int eos, int unk,
                                      const char *(*text)(const void *ctx, int id), const void *ctx, qerr *e) {
    const char *given[3] = {c->special_bos, c->special_eos, c->special_unk};
    const int ids[3] = {bos, eos, unk};
    static const char *const names[3] = {"bos_token", "eos_token", "unk_token"};
    for (int i = 0; i < 3; i++) {
        if (!given[i]) continue;
        const char *own = ids[i] >= 0 ? text(ctx, ids[i]) : NULL;
        if (!own || strcmp(own, given[i]))
            return qerr_set(e, "%s: special_tokens.%s: \"%.60s\" is not this model's %.3s token (%s%.60s%s); axolotl "
                               "would add or replace a token, which changes the vocabulary of a frozen base: delete the "
                               "line (the model's own is used)",
                            c->config_path ? c->config_path : "config", names[i], given[i], names[i],
                            own ? "\"" : "", own ? own : "none", own ? "\"" : "");
    }
    return 0;
}

int train_config_base_choice(int flag_4bit, int flag_8bit, const train_config *c, int *base, qerr *e) {
    if (flag_4bit == 1 && flag_8bit == 1)
        return qerr_set(e, "--load-in-4bit 1 and --load-in-8bit 1: choose one frozen-base format (NF4 or int8)");
    if (flag_8bit == 1) *base = LLAMA_BASE_INT8;
    else if (flag_4bit >= 0) *base = flag_4bit ? LLAMA_BASE_NF4 : LLAMA_BASE_BF16;
    else if (c && c->load_in_8bit) *base = flag_8bit == 0 ? LLAMA_BASE_NF4 : LLAMA_BASE_INT8; /* as load_in_8bit=false */
    else if (c) *base = c->load_in_4bit ? LLAMA_BASE_NF4 : LLAMA_BASE_BF16;
    else *base = LLAMA_BASE_NF4;
    return 0;
}
