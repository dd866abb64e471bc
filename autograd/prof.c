/* autograd/prof.c — op-class timers (see prof.h). */
#include "autograd/prof.h"

#include <string.h>

#include "core/clock.h"

const char *const ag_prof_names[AG_PROF_N] = {"other", "gemm",  "dequant", "convert", "attention", "norm",
                                              "rope",  "eltwise", "ce",    "embed",   "ckpt_copy", "optimizer",
                                              "lm_head_gemm", "grad_zero", "lora_gemm"};

static double g_acc[AG_PROF_N];
static double g_last;
static int g_cur;
static double g_class_flops[AG_PROF_N]; /* GEMM FLOPs by the class their time went to */
static int g_lm_head;
static int g_lora;

int ag_prof_push(int c) {
    double t = clock_now_sec();
    if (g_last > 0) g_acc[g_cur] += t - g_last;
    g_last = t;
    int prev = g_cur;
    g_cur = c != AG_PROF_GEMM ? c : g_lm_head ? AG_PROF_LM_HEAD_GEMM : g_lora ? AG_PROF_LORA_GEMM : c;
    return prev;
}

void ag_prof_pop(int prev) { (void)ag_prof_push(prev); }

void ag_prof_lm_head(int on) { g_lm_head = on; }

void ag_prof_lora(int on) { g_lora = on; }

void ag_prof_add_gemm_flops(double flops) { g_class_flops[g_cur] += flops; /* the GEMM entry point pushed its class first */ }

void ag_prof_reset(void) {
    memset(g_acc, 0, sizeof g_acc);
    memset(g_class_flops, 0, sizeof g_class_flops);
    g_last = clock_now_sec();
}

void ag_prof_read(double secs[AG_PROF_N], double *gemm_flops) {
    (void)ag_prof_push(g_cur);
    memcpy(secs, g_acc, sizeof g_acc);
    if (gemm_flops) {
        *gemm_flops = 0;
        for (int c = 0; c < AG_PROF_N; c++) *gemm_flops += g_class_flops[c];
    }
}

void ag_prof_read_gemm_flops(double flops[AG_PROF_N]) { memcpy(flops, g_class_flops, sizeof g_class_flops); }
