/* core/file.c — whole-file reads (see file.h). */
#include "core/file.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>

char *file_read_all(const char *path, size_t *len, qerr *e) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        qerr_set(e, "%s: cannot open", path);
        return NULL;
    }
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *b = n >= 0 ? malloc((size_t)n + 1) : NULL;
    if (!b || fread(b, 1, (size_t)n, f) != (size_t)n) {
        free(b);
        fclose(f);
        qerr_set(e, "%s: cannot read", path);
        return NULL;
    }
    fclose(f);
    b[n] = 0;
    if (len) *len = (size_t)n;
    return b;
}

cJSON *file_read_json_object(const char *path, qerr *e) {
    char *t = file_read_all(path, NULL, e);
    if (!t) return NULL;
    cJSON *j = cJSON_Parse(t);
    free(t);
    if (!j || !cJSON_IsObject(j)) {
        cJSON_Delete(j);
        qerr_set(e, "%s: not a JSON object", path);
        return NULL;
    }
    return j;
}
