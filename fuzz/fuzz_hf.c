/* fuzz/fuzz_hf.c — libFuzzer target for the Hugging Face directory loader (model/hf.c: config.json,
 * model.safetensors.index.json and its weight_map, the shard files, tokenizer.json and
 * tokenizer_config.json through data/tokenizer_json.c), then the tokenizer built from what it read.
 *
 * One input is a whole model directory: its parts are separated by the line FUZZ_HF_SEP and go, in
 * this order, into config.json, tokenizer.json, tokenizer_config.json, model.safetensors.index.json,
 * model.safetensors and model-00001-of-00002.safetensors (an empty part means "no such file"; the
 * index names shard files, and the two shard names above are the ones the seeds use). The directory
 * lives in /dev/shm, one per process, rewritten per input. Seeds: fuzz/seeds/hf/, written by
 * scripts/make_fuzz_seeds_hf.py. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "data/tokenizer.h"
#include "model/hf.h"

#define FUZZ_HF_SEP "\n--qlora-fuzz-file--\n"

static const char *const part_names[] = {
    "config.json",     "tokenizer.json",   "tokenizer_config.json", "model.safetensors.index.json",
    "model.safetensors", "model-00001-of-00002.safetensors",
};
enum { N_PARTS = sizeof part_names / sizeof part_names[0] };

static char dir_path[64];

static void remove_dir(void) {
    char path[128];
    for (int i = 0; i < N_PARTS; i++) {
        snprintf(path, sizeof path, "%s/%s", dir_path, part_names[i]);
        unlink(path);
    }
    rmdir(dir_path);
}

static const char *fuzz_dir(void) {
    if (!dir_path[0]) {
        snprintf(dir_path, sizeof dir_path, "/dev/shm/qlora-fuzz-hf-%d", (int)getpid());
        mkdir(dir_path, 0700);
        atexit(remove_dir);
    }
    return dir_path;
}

static void put(const char *dir, const char *name, const uint8_t *p, size_t n) {
    char path[128];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    if (!p) {
        unlink(path);
        return;
    }
    FILE *f = fopen(path, "wb");
    if (!f || (n && fwrite(p, 1, n, f) != n) || fclose(f)) {
        perror(path);
        abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    const char *dir = fuzz_dir();
    const size_t sep_len = strlen(FUZZ_HF_SEP);
    const uint8_t *p = data, *end = data + size;
    for (int i = 0; i < N_PARTS; i++) {
        const uint8_t *q = p ? memmem(p, (size_t)(end - p), FUZZ_HF_SEP, sep_len) : NULL;
        const uint8_t *stop = q ? q : end;
        put(dir, part_names[i], p && stop > p ? p : NULL, p ? (size_t)(stop - p) : 0);
        p = q ? q + sep_len : NULL;
    }
    hf_model *h = NULL;
    qerr e;
    if (hf_model_open(dir, &h, &e) == 0) {
        const llama_hparams *hp = hf_model_hparams(h);
        if (!hp || hp->n_layer <= 0 || hp->vocab <= 0) __builtin_trap();
        tokenizer *t = NULL;
        if (hf_model_tokenizer(h, &t, &e) == 0) {
            static const char text[] = "Hello world, <|im_start|>fuzz\n  x \xc3\xa9\xff";
            tokenizer_ids ids = {0};
            (void)tokenizer_encode(t, text, sizeof text - 1, 1, &ids, &e);
            tokenizer_ids_free(&ids);
            tokenizer_free(t);
        }
        hf_model_close(h);
    } else if (!e.msg[0]) {
        __builtin_trap(); /* a failure always says why */
    }
    return 0;
}
