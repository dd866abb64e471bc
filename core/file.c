/* core/file.c — whole-file reads, atomic writes (whole or streamed), mkdir -p (see file.h). */
#include "core/file.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

char *file_read_all(const char *path, size_t *len, qerr *e) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        qerr_set(e, "%s: cannot open: %s", path, strerror(errno));
        return NULL;
    }
    /* read to end of file (a pipe or /proc file has no size up front); the
     * size, when there is one, only sets the first allocation */
    struct stat st;
    size_t cap = fstat(fileno(f), &st) == 0 && S_ISREG(st.st_mode) && st.st_size > 0 ? (size_t)st.st_size + 1 : 65536;
    size_t n = 0;
    char *b = malloc(cap);
    while (b) {
        n += fread(b + n, 1, cap - n - 1, f);
        if (n < cap - 1) break;
        char *nb = realloc(b, cap * 2);
        if (!nb) free(b);
        b = nb;
        cap *= 2;
    }
    int bad = !b || ferror(f);
    fclose(f);
    if (bad) {
        free(b);
        qerr_set(e, "%s: cannot read", path);
        return NULL;
    }
    b[n] = 0;
    if (len) *len = n;
    return b;
}

const char *file_kind_name(unsigned mode) {
    return S_ISDIR(mode)    ? "a directory"
           : S_ISFIFO(mode) ? "a FIFO"
           : S_ISCHR(mode)  ? "a character device"
           : S_ISBLK(mode)  ? "a block device"
           : S_ISSOCK(mode) ? "a socket"
                            : "not a regular file";
}

int file_open_regular(const char *path, int64_t max_bytes, int64_t *size, qerr *e) {
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) {
        int err = errno;
        qerr_set(e, "%s: cannot open: %s", path, strerror(err));
        errno = err;
        return -1;
    }
    struct stat sb;
    if (fstat(fd, &sb)) {
        int err = errno;
        qerr_set(e, "%s: cannot stat: %s", path, strerror(err));
        close(fd);
        errno = err;
        return -1;
    }
    if (!S_ISREG(sb.st_mode)) {
        qerr_set(e, "%s: not a regular file (%s)", path, file_kind_name(sb.st_mode));
        close(fd);
        errno = EINVAL;
        return -1;
    }
    if (max_bytes > 0 && (int64_t)sb.st_size > max_bytes) {
        qerr_set(e, "%s: %lld bytes, more than the %lld expected", path, (long long)sb.st_size,
                 (long long)max_bytes);
        close(fd);
        errno = EFBIG;
        return -1;
    }
    if (size) *size = (int64_t)sb.st_size;
    return fd;
}

char *file_read_regular(const char *path, size_t max_bytes, size_t *len, qerr *e) {
    int64_t st_size = 0;
    int fd = file_open_regular(path, 0, &st_size, e);
    if (fd < 0) return NULL;
    double cap = (double)max_bytes;
    if (max_bytes == 0) cap = (double)sysconf(_SC_PHYS_PAGES) * (double)sysconf(_SC_PAGESIZE) / 2;
    if (cap > 0 && (double)st_size > cap) {
        qerr_set(e, "%s: %.2f GiB, more than the %.2f GiB limit (%s): split it into several files", path,
                 (double)st_size / 1073741824.0, cap / 1073741824.0,
                 max_bytes ? "for this kind of input" : "half of this machine's memory");
        close(fd);
        return NULL;
    }
    size_t want = (size_t)st_size, n = 0;
    char *buf = malloc(want + 1);
    if (!buf) {
        close(fd);
        qerr_set(e, "%s: out of memory reading %zu bytes", path, want);
        return NULL;
    }
    while (n < want) {
        ssize_t got = read(fd, buf + n, want - n);
        if (got < 0 && errno == EINTR) continue;
        if (got < 0) {
            qerr_set(e, "%s: read error: %s", path, strerror(errno));
            free(buf);
            close(fd);
            return NULL;
        }
        if (got == 0) break; /* the file shrank while being read: what is there */
        n += (size_t)got;
    }
    close(fd);
    buf[n] = 0;
    if (len) *len = n;
    return buf;
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

int file_atomic_begin(file_atomic *w, const char *path, qerr *e) {
    size_t n = strlen(path);
    w->fd = -1;
    w->path = strdup(path);
    w->tmp = malloc(n + 5);
    if (!w->path || !w->tmp) {
        free(w->path);
        free(w->tmp);
        return qerr_set(e, "out of memory");
    }
    memcpy(w->tmp, path, n);
    memcpy(w->tmp + n, ".tmp", 5);
    w->fd = open(w->tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (w->fd < 0) {
        qerr_set(e, "cannot create %s: %s", w->tmp, strerror(errno));
        free(w->path);
        free(w->tmp);
        return -1;
    }
    return 0;
}

int file_write_fd_all(int fd, const void *data, size_t len) {
    const char *p = data;
    while (len) {
        size_t chunk = len > (1u << 30) ? (1u << 30) : len; /* write() moves at most ~2 GiB per call */
        ssize_t k = write(fd, p, chunk);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) {
            if (k == 0) errno = EIO;
            return -1;
        }
        p += k;
        len -= (size_t)k;
    }
    return 0;
}

int file_atomic_write(file_atomic *w, const void *data, size_t len, qerr *e) {
    if (file_write_fd_all(w->fd, data, len)) return qerr_set(e, "cannot write %s: %s", w->tmp, strerror(errno));
    return 0;
}

static void release(file_atomic *w) {
    free(w->path);
    free(w->tmp);
    w->path = w->tmp = NULL;
    w->fd = -1;
}

void file_atomic_abort(file_atomic *w) {
    if (w->fd >= 0) close(w->fd);
    if (w->tmp) unlink(w->tmp);
    release(w);
}

/* fsync the directory holding `path`, so that a rename into it is durable.
 * Best effort: some filesystems cannot sync a directory. */
static void fsync_parent(const char *path) {
    char *dup = strdup(path);
    if (!dup) return;
    int dfd = open(dirname(dup), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
        (void)fsync(dfd);
        close(dfd);
    }
    free(dup);
}

int file_atomic_commit(file_atomic *w, qerr *e) {
    int bad = fsync(w->fd) != 0;
    int err = errno;
    if (close(w->fd) && !bad) bad = 1, err = errno;
    w->fd = -1;
    if (bad) {
        qerr_set(e, "cannot write %s: %s", w->path, strerror(err));
        file_atomic_abort(w);
        return -1;
    }
    if (rename(w->tmp, w->path)) {
        qerr_set(e, "cannot rename %s to %s: %s", w->tmp, w->path, strerror(errno));
        file_atomic_abort(w);
        return -1;
    }
    fsync_parent(w->path);
    release(w);
    return 0;
}

int file_write_atomic(const char *path, const void *data, size_t len, qerr *e) {
    file_atomic w;
    if (file_atomic_begin(&w, path, e)) return -1;
    if (file_atomic_write(&w, data, len, e)) {
        file_atomic_abort(&w);
        return -1;
    }
    return file_atomic_commit(&w, e);
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
