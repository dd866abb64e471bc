/* core/file.c — whole-file reads, atomic writes, mkdir -p (see file.h). */
#include "core/file.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

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

int file_write_atomic(const char *path, const void *data, size_t len, qerr *e) {
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "wb");
    if (!f) return qerr_set(e, "cannot create %s: %s", tmp, strerror(errno));
    int bad = (len && fwrite(data, 1, len, f) != len) || fflush(f) || fsync(fileno(f));
    int err = errno;
    if (fclose(f)) bad = 1, err = errno;
    if (!bad && rename(tmp, path)) bad = 1, err = errno;
    if (bad) {
        unlink(tmp);
        return qerr_set(e, "cannot write %s: %s", path, strerror(err));
    }
    return 0;
}

int file_mkdir_p(const char *path, qerr *e) {
    char tmp[4096];
    size_t len = strlen(path);
    if (len == 0 || len >= sizeof tmp) return qerr_set(e, "invalid path \"%s\"", path);
    memcpy(tmp, path, len + 1);
    for (char *p = tmp + 1; *p; p++) {
        if (*p != '/') continue;
        *p = 0;
        if (mkdir(tmp, 0755) && errno != EEXIST) return qerr_set(e, "cannot create \"%s\": %s", tmp, strerror(errno));
        *p = '/';
    }
    if (mkdir(tmp, 0755) && errno != EEXIST) return qerr_set(e, "cannot create \"%s\": %s", tmp, strerror(errno));
    return 0;
}
