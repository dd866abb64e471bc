/* model/hf.c — Hugging Face model directories (see hf.h). */
#include "model/hf.h"

#include <stdlib.h>

struct hf_model {
    llama_hparams hp;
};

int hf_model_open(const char *dir, hf_model **out, qerr *e) {
    *out = NULL;
    return qerr_set(e, "%s: Hugging Face model directories are not supported yet", dir);
}
void hf_model_close(hf_model *h) { free(h); }
const llama_hparams *hf_model_hparams(const hf_model *h) { return &h->hp; }
int hf_model_prequantized(const hf_model *h) { (void)h; return 0; }
int hf_model_tokenizer(const hf_model *h, tokenizer **out, qerr *e) { (void)h; *out = NULL; return qerr_set(e, "not supported"); }
int hf_model_load(const hf_model *h, int a, int b, int c, llama_model *m, qerr *e) { (void)h; (void)a; (void)b; (void)c; (void)m; return qerr_set(e, "not supported"); }
int hf_model_tensor_f32(const hf_model *h, int r, int l, int k, float *d, qerr *e) { (void)h; (void)r; (void)l; (void)k; (void)d; return qerr_set(e, "not supported"); }
