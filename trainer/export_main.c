/* trainer/export_main.c — `qlora-export RUN_DIR [options]`: the trained PEFT
 * adapter of a run as a llama.cpp GGUF LoRA and/or a merged HF model
 * (trainer/export.h). Exit status: 0 success, 1 failure, 2 bad usage.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "autograd/gemm.h"
#include "core/clock.h"
#include "core/parse.h"
#include "model/adapter.h"
#include "model/base.h"
#include "trainer/checkpoint.h"
#include "trainer/config.h"
#include "trainer/export.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: qlora-export RUN_DIR [--gguf FILE] [--merged DIR] [options]\n"
            "       qlora-export --consolidate CHECKPOINT OUT   (a sharded checkpoint as one state.h5 in the new\n"
            "                       checkpoint directory OUT: resumable by one process with\n"
            "                       resume_from_checkpoint: OUT, exportable with qlora-export OUT)\n"
            "       qlora-export --base MODEL --merged DIR [--merge-base source]   (the base alone, as an HF directory)\n"
            "  RUN_DIR holds adapter_config.json + adapter_model.safetensors (a qlora-train output_dir,\n"
            "  or any PEFT LoRA adapter of a Llama-family model).\n"
            "  --gguf FILE          llama.cpp LoRA adapter (F32; use with llama-cli --lora FILE)\n"
            "  --merged DIR         base + adapter merged, HF directory (bf16 safetensors, config,\n"
            "                       generation_config, tokenizer files)\n"
            "                       (neither given: RUN_DIR/adapter_model.gguf and RUN_DIR/merged)\n"
            "  --base PATH          base model (.gguf or HF directory); default: base_model from\n"
            "                       RUN_DIR/config.resolved.yaml, else adapter_config.json\n"
            "  --merge-base trained merge into the base exactly as trained against (NF4 dequantized\n"
            "                       when the run used load_in_4bit) [default]\n"
            "  --merge-base source  merge into the checkpoint's own weights\n"
            "  --load-in-4bit 0|1   how the run held the base: NF4 or bf16 (default: from\n"
            "                       config.resolved.yaml; else 1)\n"
            "  --load-in-8bit 0|1   1: the run held the base as int8 (default: load_in_8bit from\n"
            "                       config.resolved.yaml; else 0)\n"
            "  --max-shard-size N   merged safetensors shard size in MB (default 2048)\n");
}

/* --max-shard-size's bound in MB (1 TiB): any larger shard is one file anyway, and (size_t)MB << 20 stays
 * far from overflow. */
#define EXPORT_MAX_SHARD_MB (1L << 20)

static char *join(const char *dir, const char *name) {
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = malloc(n);
    if (p) snprintf(p, n, "%s/%s", dir, name);
    return p;
}

int main(int argc, char **argv) {
    if (argc >= 2 && !strcmp(argv[1], "--consolidate")) {
        if (argc != 4) {
            fprintf(stderr, "qlora-export: --consolidate takes CHECKPOINT OUT (two directories)\n");
            return 2;
        }
        qerr ce;
        double t0 = clock_now_sec();
        if (ckpt_consolidate(argv[2], argv[3], &ce)) {
            fprintf(stderr, "qlora-export: %s\n", ce.msg);
            return 1;
        }
        fprintf(stderr, "[export] consolidated %s into %s (one state.h5, %.1fs)\n", argv[2], argv[3],
                clock_now_sec() - t0);
        return 0;
    }
    const char *run = NULL, *gguf_out = NULL, *merged_out = NULL, *base_path = NULL;
    int merge_source = 0, load_in_4bit = -1, flag_4bit = -1, flag_8bit = -1;
    long shard_mb = 2048;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        int has_val = i + 1 < argc;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        } else if (!strcmp(a, "--gguf") && has_val) {
            gguf_out = argv[++i];
        } else if (!strcmp(a, "--merged") && has_val) {
            merged_out = argv[++i];
        } else if (!strcmp(a, "--base") && has_val) {
            base_path = argv[++i];
        } else if (!strcmp(a, "--merge-base") && has_val) {
            const char *v = argv[++i];
            if (!strcmp(v, "source")) merge_source = 1;
            else if (!strcmp(v, "trained")) merge_source = 0;
            else {
                fprintf(stderr, "qlora-export: --merge-base: expected \"trained\" or \"source\", got \"%s\"\n", v);
                return 2;
            }
        } else if ((!strcmp(a, "--load-in-4bit") || !strcmp(a, "--load-in-8bit") || !strcmp(a, "--max-shard-size")) &&
                   has_val) {
            /* strict (core/parse.h): "12abc", "1e99", "abc" are refused, not read as 12, 1, 0 */
            int shard = !strcmp(a, "--max-shard-size");
            int64_t v;
            qerr pe;
            if (parse_int_range(a, argv[++i], shard ? 1 : 0, shard ? EXPORT_MAX_SHARD_MB : 1, &v, &pe)) {
                fprintf(stderr, "qlora-export: %s\n", pe.msg);
                return 2;
            }
            if (shard)
                shard_mb = (long)v;
            else if (!strcmp(a, "--load-in-8bit"))
                flag_8bit = (int)v;
            else
                flag_4bit = (int)v;
        } else if (a[0] == '-' || run) {
            fprintf(stderr, "qlora-export: unexpected argument \"%s\"\n", a);
            usage(stderr);
            return 2;
        } else {
            run = a;
        }
    }
    if (!run && !(base_path && merged_out && !gguf_out)) {
        usage(stderr);
        return 2;
    }
    char *def_gguf = NULL, *def_merged = NULL;
    if (!gguf_out && !merged_out) {
        gguf_out = def_gguf = join(run, "adapter_model.gguf");
        merged_out = def_merged = join(run, "merged");
    }

    /* what the run used: config.resolved.yaml (written by qlora-train) */
    train_config c;
    int have_cfg = 0, dq = 1;
    qerr e = {{0}};
    char *cfg_path = run ? join(run, "config.resolved.yaml") : NULL;
    if (cfg_path && access(cfg_path, R_OK) == 0) {
        if (train_config_load(cfg_path, &c, &e)) {
            fprintf(stderr, "qlora-export: %s\n", e.msg);
            free(cfg_path), free(def_gguf), free(def_merged);
            return 2;
        }
        have_cfg = 1;
        if (!base_path) base_path = c.base_model;
        dq = c.bnb_4bit_use_double_quant;
    }
    if (train_config_base_choice(flag_4bit, flag_8bit, have_cfg ? &c : NULL, &load_in_4bit, &e)) {
        fprintf(stderr, "qlora-export: %s\n", e.msg);
        if (have_cfg) train_config_free(&c);
        free(cfg_path), free(def_gguf), free(def_merged);
        return 2;
    }

    int rc = 1;
    base_model *b = NULL;
    tokenizer *tok = NULL;
    lora_set ls;
    adapter_info info;
    llama_model m;
    memset(&ls, 0, sizeof ls);
    memset(&info, 0, sizeof info);
    memset(&m, 0, sizeof m);
    int have_model = 0;
    double t0 = clock_now_sec();

    char peek[1024];
    if (!base_path && run && adapter_peek_base(run, peek, sizeof peek) == 0 && access(peek, R_OK) == 0) base_path = peek;
    if (!base_path) {
        fprintf(stderr, "qlora-export: %s: no config.resolved.yaml and no readable base_model_name_or_path: "
                        "give the base model with --base PATH\n", run);
        rc = 2;
        goto out;
    }
    if (base_model_open(base_path, &b, &e)) goto fail;
    const llama_hparams *hp = base_model_hparams(b);
    if (!run) {
        /* no adapter: the base alone as an HF directory (e.g. GGUF -> safetensors) */
        if (base_model_tokenizer(b, &tok, &e)) goto fail;
        if (!merge_source) {
            if (base_model_load(b, load_in_4bit, dq, 16, &m, &e)) goto fail;
            have_model = 1;
        }
        if (export_merged(b, have_model ? &m : NULL, tok, NULL, NULL, merged_out, (size_t)shard_mb << 20, &e))
            goto fail;
        fprintf(stderr, "[export] base model %s as an HF directory: %s\n", base_path, merged_out);
        rc = 0;
        goto out;
    }
    if (adapter_load_peft(run, hp, &ls, &info, &e)) goto fail;
    fprintf(stderr, "[export] adapter %s: r %d, alpha %g%s, %d modules; base %s (%s)\n", run, ls.r, ls.alpha,
            ls.use_rslora ? " (rsLoRA)" : "", info.n_present, base_path,
            base_model_kind(b) == BASE_GGUF ? "GGUF" : "HF directory");
    if (ls.r > EXPORT_VLLM_MAX_LORA_RANK)
        fprintf(stderr, "[export] warning: r = %d > %d, vLLM's default max_lora_rank: serve with --max-lora-rank %d "
                        "(or more)\n", ls.r, EXPORT_VLLM_MAX_LORA_RANK, ls.r <= 32 ? 32 : ls.r <= 64 ? 64 : ls.r);

    if (gguf_out) {
        if (export_gguf_lora(b, &ls, &info, gguf_out, &e)) goto fail;
        fprintf(stderr, "[export] GGUF LoRA: %s (F32, adapter.lora.alpha %g%s, q/k rows of B in GGUF order)\n",
                gguf_out, ls.use_rslora ? ls.alpha * sqrtf((float)ls.r) : ls.alpha,
                ls.use_rslora ? " = alpha*sqrt(r) for rsLoRA" : "");
    }
    if (merged_out) {
        if (base_model_tokenizer(b, &tok, &e)) goto fail;
        if (!merge_source) {
            if (base_model_load(b, load_in_4bit, dq, 16, &m, &e)) goto fail;
            have_model = 1;
        }
        if (export_merged(b, have_model ? &m : NULL, tok, &ls, &info, merged_out, (size_t)shard_mb << 20, &e))
            goto fail;
        if (have_cfg) { /* the template the run trained with, as axolotl saves the tokenizer with it */
            char *tmpl = NULL;
            if (export_run_chat_template(c.chat_template, c.chat_template_jinja, tok, &tmpl, &e)) goto fail;
            if (tmpl) {
                int trc = export_write_chat_template(merged_out, tmpl, &e);
                free(tmpl);
                if (trc) goto fail;
                fprintf(stderr, "[export] chat template: the run's chat_template: %s%s (chat_template.jinja), not the "
                                "model's own\n", c.chat_template, strcmp(c.chat_template, "jinja") ? "" : " text");
            }
        }
        fprintf(stderr, "[export] merged model: %s (bf16; W + scaling*B*A in fp32 with W = %s)\n", merged_out,
                merge_source ? "the checkpoint's own weights"
                : load_in_4bit == LLAMA_BASE_INT8
                    ? "the int8 base dequantized as PEFT merges it (bitsandbytes int8_vectorwise_dequant), as trained "
                      "(--merge-base source for the original weights)"
                : load_in_4bit ? "the NF4 base dequantized, as trained (--merge-base source for the original weights)"
                               : "the bf16 base, as trained");
    }
    fprintf(stderr, "[export] done in %.1fs\n", clock_now_sec() - t0);
    rc = 0;
    goto out;
fail:
    fprintf(stderr, "qlora-export: %s\n", e.msg);
    rc = 1;
out:
    if (have_model) llama_free(&m);
    tokenizer_free(tok);
    lora_set_free(&ls);
    adapter_info_free(&info);
    base_model_close(b);
    if (have_cfg) train_config_free(&c);
    free(cfg_path);
    free(def_gguf);
    free(def_merged);
    gemm_shutdown();
    return rc;
}
