/* tests/dir_snapshot.c — a directory's files as text, for "nothing changed" checks (see dir_snapshot.h). */
#include "tests/dir_snapshot.h"

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "core/hash.h"

enum { SNAPSHOT_MAX = 1 << 16, SNAPSHOT_READ = 1 << 20 };

static int cmp_names(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

static void snapshot_rec(const char *dir, char *out, size_t n, unsigned char *buf) {
    DIR *d = opendir(dir);
    if (!d) {
        snprintf(out + strlen(out), n - strlen(out), "%s: (missing)\n", dir);
        return;
    }
    char *names[256];
    int k = 0;
    struct dirent *de;
    while ((de = readdir(d)) && k < 256)
        if (strcmp(de->d_name, ".") && strcmp(de->d_name, "..")) names[k++] = strdup(de->d_name);
    closedir(d);
    qsort(names, (size_t)k, sizeof *names, cmp_names);
    for (int i = 0; i < k; i++) {
        char p[1024];
        snprintf(p, sizeof p, "%s/%s", dir, names[i] ? names[i] : "?");
        struct stat sb;
        if (lstat(p, &sb) == 0 && S_ISDIR(sb.st_mode)) {
            snprintf(out + strlen(out), n - strlen(out), "%s/\n", p);
            snapshot_rec(p, out, n, buf);
        } else {
            FILE *f = fopen(p, "rb");
            size_t len = f ? fread(buf, 1, SNAPSHOT_READ, f) : 0;
            if (f) fclose(f);
            snprintf(out + strlen(out), n - strlen(out), "%s %lld %016llx\n", p, (long long)sb.st_size,
                     (unsigned long long)xxh64(buf, len, 0));
        }
        free(names[i]);
    }
}

char *dir_snapshot(const char *dir) {
    char *s = calloc(SNAPSHOT_MAX, 1);
    unsigned char *buf = malloc(SNAPSHOT_READ);
    if (!s || !buf) {
        free(s);
        free(buf);
        return NULL;
    }
    snapshot_rec(dir, s, SNAPSHOT_MAX, buf);
    free(buf);
    return s;
}
