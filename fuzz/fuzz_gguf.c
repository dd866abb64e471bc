/* fuzz/fuzz_gguf.c — libFuzzer target for the GGUF reader (format/gguf.c) and
 * what reads GGUF metadata next: every accessor on every KV and tensor, row
 * dequantization of small tensors, and the tokenizer loader
 * (data/tokenizer.c). Seeds: the .gguf files in tests/fixtures. */
#include <string.h>

#include "data/tokenizer.h"
#include "fuzz/fuzz_common.h"
#include "format/gguf.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    gguf_file *f = NULL;
    qerr e;
    if (gguf_open(fuzz_file(data, size), &f, &e)) return 0;
    (void)gguf_version(f);
    (void)gguf_alignment(f);
    (void)gguf_data_offset(f);
    for (uint64_t i = 0; i < gguf_n_kv(f); i++) {
        const char *key = gguf_kv_key(f, i);
        int t = gguf_kv_type(f, i);
        if (!key) __builtin_trap();
        uint32_t u32;
        uint64_t u64;
        int64_t i64;
        float f32;
        int b;
        const char *s;
        size_t len;
        (void)gguf_get_u32(f, key, &u32, &e);
        (void)gguf_get_u64(f, key, &u64, &e);
        (void)gguf_get_i64(f, key, &i64, &e);
        (void)gguf_get_f32(f, key, &f32, &e);
        (void)gguf_get_bool(f, key, &b, &e);
        if (gguf_get_str(f, key, &s, &len, &e) == 0 && len) {
            volatile char c = s[len - 1];
            (void)c;
        }
        if (t == GGUF_VTYPE_ARRAY) {
            gguf_vtype et;
            uint64_t cnt;
            if (gguf_get_arr_info(f, key, &et, &cnt, &e) == 0 && cnt) {
                const void *d;
                (void)gguf_get_arr_data(f, key, &d, &e);
                if (gguf_get_arr_str(f, key, cnt - 1, &s, &len, &e) == 0 && len) {
                    volatile char c = s[0];
                    (void)c;
                }
                (void)gguf_get_arr_str(f, key, cnt, &s, &len, &e); /* out of range: must fail */
            }
        }
    }
    for (uint64_t i = 0; i < gguf_n_tensors(f); i++) {
        const gguf_tensor *t = gguf_tensor_at(f, i);
        if (!t || gguf_find_tensor(f, t->name) != t) __builtin_trap();
        uint64_t ne0 = t->ne[0];
        if (ne0 == 0 || ne0 > 4096) continue;
        float row[4096];
        (void)gguf_tensor_rows_to_f32(t, 0, 1, row, &e);
        (void)gguf_tensor_rows_to_f32(t, t->nelements / ne0, 1, row, &e); /* one past the end: must fail */
    }
    tokenizer *tok = NULL;
    if (tokenizer_load_gguf(f, &tok, &e) == 0) {
        tokenizer_ids ids = {0};
        static const char text[] = "Hello <|im_start|>world 123\n\xc3\xa9";
        (void)tokenizer_encode_offsets(tok, text, sizeof text - 1, 1, 0, &ids, &e);
        tokenizer_ids_free(&ids);
        tokenizer_free(tok);
    }
    gguf_close(f);
    return 0;
}
