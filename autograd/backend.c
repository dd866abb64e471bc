/* autograd/backend.c — the registry of backend tables (see backend.h). */
#include "autograd/backend.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char *const ag_backend_names[] = {"cpu", "cpu-ref", "cpu-fenced", "cuda", NULL};

const ag_backend *ag_backend_find(const char *name) {
    if (!name) return NULL;
    if (!strcmp(name, "cpu")) return ag_backend_cpu_vector_ok() ? &ag_backend_cpu : NULL;
    if (!strcmp(name, "cpu-ref")) return &ag_backend_cpu_ref;
    if (!strcmp(name, "cpu-fenced")) return &ag_backend_cpu_fenced;
#ifdef QLORA_CUDA
    if (!strcmp(name, "cuda")) return ag_backend_cuda_available() ? &ag_backend_cuda : NULL;
#endif
    return NULL; /* "cuda" in a binary built without the backend */
}

int ag_backend_cuda_built(void) {
#ifdef QLORA_CUDA
    return 1;
#else
    return 0;
#endif
}

#ifndef QLORA_CUDA
int ag_backend_cuda_device_name(char *buf, size_t n, double *mem_bytes) {
    if (n) buf[0] = 0;
    if (mem_bytes) *mem_bytes = 0;
    return -1; /* the backend is not in this binary (autograd/backend_cuda.cu defines it otherwise) */
}

int ag_backend_cuda_mem_info(double *free_bytes, double *total_bytes) {
    *free_bytes = *total_bytes = 0;
    return -1;
}
#endif

static const ag_backend *chosen;

void ag_backend_set_default(const ag_backend *be) { chosen = be; }

const ag_backend *ag_backend_default(void) {
    if (chosen) return chosen;
    const char *env = getenv("QLORA_BACKEND");
    const ag_backend *be = env && *env ? ag_backend_find(env) : NULL;
    if (env && *env && !be)
        fprintf(stderr, "[autograd] QLORA_BACKEND=%s is not available in this binary or on this machine; using %s\n",
                env, ag_backend_cpu_vector_ok() ? "cpu" : "cpu-ref");
    if (!be) be = ag_backend_cpu_vector_ok() ? &ag_backend_cpu : &ag_backend_cpu_ref;
    chosen = be;
    return be;
}
