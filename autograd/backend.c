/* autograd/backend.c — the registry of backend tables (see backend.h). */
#include "autograd/backend.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char *const ag_backend_names[] = {"cpu", "cpu-ref", "cuda", NULL};

const ag_backend *ag_backend_find(const char *name) {
    if (!name) return NULL;
    if (!strcmp(name, "cpu")) return ag_backend_cpu_vector_ok() ? &ag_backend_cpu : NULL;
    if (!strcmp(name, "cpu-ref")) return &ag_backend_cpu_ref;
    return NULL; /* "cuda": not built into this binary (a later issue adds it) */
}

const ag_backend *ag_backend_default(void) {
    static const ag_backend *chosen;
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
