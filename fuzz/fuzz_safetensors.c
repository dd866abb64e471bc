/* fuzz/fuzz_safetensors.c — libFuzzer target for the safetensors reader
 * (format/safetensors.c): open, then touch every tensor's first and last byte
 * and look up names and metadata. */
#include <string.h>

#include "fuzz/fuzz_common.h"
#include "format/safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    safetensors_file *f = NULL;
    qerr e;
    if (safetensors_open(fuzz_file(data, size), &f, &e)) return 0;
    int n = safetensors_count(f);
    for (int i = 0; i < n; i++) {
        st_tensor t;
        safetensors_get(f, i, &t);
        if (!t.name || !t.dtype || t.n_dims < 0 || t.n_dims > ST_MAX_DIMS) __builtin_trap();
        if (t.nbytes) {
            volatile unsigned char a = ((const unsigned char *)t.data)[0];
            volatile unsigned char z = ((const unsigned char *)t.data)[t.nbytes - 1];
            (void)a;
            (void)z;
        }
        st_tensor u;
        if (safetensors_find(f, t.name, &u, &e) || u.data != t.data) __builtin_trap();
    }
    st_tensor u;
    (void)safetensors_find(f, "no such tensor", &u, &e);
    (void)safetensors_metadata(f, "format");
    safetensors_close(f);
    return 0;
}
