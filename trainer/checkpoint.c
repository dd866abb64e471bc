/* trainer/checkpoint.c — HDF5 checkpoint state and the crash-safe directory protocol
 * (see checkpoint.h for the layout and the protocol).
 *
 * HDF5 C API (H5F/H5G/H5D/H5A, 1.10): datasets are chunked with the shuffle
 * filter and zlib (H5Pset_deflate), which compresses fp32 tensors better than
 * zlib alone because the exponent bytes end up together. HDF5's automatic
 * error printing is turned off; each failure becomes one line naming the file
 * and the object. Nothing here prints.
 */
#include "trainer/checkpoint.h"

#include <cjson/cJSON.h>
#include <hdf5.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <inttypes.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

#include "core/file.h"
#include "core/hash.h"
#include "optim/adamw8bit.h"

#define CKPT_FORMAT_NAME "qlora-checkpoint"
#define CKPT_CHUNK_ELEMS ((hsize_t)1 << 18) /* 1 MiB of fp32 per chunk */
#define CKPT_DEFLATE_LEVEL 1                 /* zlib level: 1 is within ~2% of 6 on fp32, 4x faster */
#define CKPT_MAX_TENSORS (1 << 24)

/* ------------------------------------------------------------------------ */
/* small file-system helpers                                                  */

/* The rank and step of the save in progress, for QLORA_TEST_CRASH_RANK / _STEP (test hooks only). */
static int g_test_rank = -1;
static int64_t g_test_step = -1;

void ckpt_test_point(const char *stage) {
    const char *d = getenv("QLORA_TEST_SAVE_DELAY_MS");
    if (d && *d) {
        long ms = strtol(d, NULL, 10);
        if (ms > 0) {
            struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
            while (nanosleep(&ts, &ts) && errno == EINTR) {
            }
        }
    }
    const char *c = getenv("QLORA_TEST_CRASH_AT");
    if (!c || strcmp(c, stage)) return;
    const char *cr = getenv("QLORA_TEST_CRASH_RANK"), *cs = getenv("QLORA_TEST_CRASH_STEP");
    if (cr && *cr && strtol(cr, NULL, 10) != (g_test_rank < 0 ? 0 : g_test_rank)) return;
    if (cs && *cs && strtoll(cs, NULL, 10) != g_test_step) return;
    raise(SIGKILL);
}

static int fsync_path(const char *path, int is_dir, qerr *e) {
    int fd = open(path, (is_dir ? O_RDONLY | O_DIRECTORY : O_RDONLY) | O_CLOEXEC);
    if (fd < 0) return qerr_set(e, "cannot open %s to sync it: %s", path, strerror(errno));
    if (fsync(fd) && errno != EINVAL) {
        int err = errno;
        close(fd);
        return qerr_set(e, "cannot sync %s: %s", path, strerror(err));
    }
    close(fd);
    return 0;
}

/* XXH64 of the `size` bytes of the open file fd (path names it in errors). */
static int hash_fd(int fd, int64_t size, const char *path, uint64_t *h, qerr *e) {
    size_t cap = 1 << 20;
    unsigned char *buf = malloc(cap);
    if (!buf) return qerr_set(e, "out of memory");
    xxh64_state st;
    xxh64_init(&st, 0);
    int64_t total = 0;
    while (total < size) {
        size_t want = size - total < (int64_t)cap ? (size_t)(size - total) : cap;
        ssize_t r = read(fd, buf, want);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) {
            int err = errno;
            free(buf);
            return qerr_set(e, "cannot read %s: %s", path, strerror(err));
        }
        if (r == 0) {
            free(buf);
            return qerr_set(e, "cannot read %s: it shrank while being read", path);
        }
        xxh64_update(&st, buf, (size_t)r);
        total += r;
    }
    free(buf);
    *h = xxh64_digest(&st);
    return 0;
}

/* XXH64 and size of a whole file, which must be a regular file: the size is
 * taken from fstat before a byte is read, so a FIFO or a device (a state.h5
 * symlinked to /dev/zero) is refused instead of blocking or never ending. */
static int hash_file(const char *path, int64_t *size, uint64_t *h, qerr *e) {
    int fd = file_open_regular(path, 0, size, e);
    if (fd < 0) return -1;
    int rc = hash_fd(fd, *size, path, h, e);
    close(fd);
    return rc;
}

static int rm_cb(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(path) && errno != ENOENT ? -1 : 0;
}

int ckpt_remove_tree(const char *path, qerr *e) {
    struct stat sb;
    if (lstat(path, &sb)) return errno == ENOENT ? 0 : qerr_set(e, "cannot stat %s: %s", path, strerror(errno));
    if (nftw(path, rm_cb, 16, FTW_DEPTH | FTW_PHYS))
        return qerr_set(e, "cannot delete %s: %s", path, strerror(errno));
    return 0;
}

/* buf = a "/" b; -1 if it does not fit. */
static int path_join(char *buf, size_t n, const char *a, const char *b) {
    int k = snprintf(buf, n, "%s/%s", a, b);
    return k < 0 || (size_t)k >= n ? -1 : 0;
}

static int is_dir(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0 && S_ISDIR(sb.st_mode);
}

/* "checkpoint-<digits>" (exactly) -> step; else -1. suffix != NULL also
 * accepts "checkpoint-<digits><rest>" and points *suffix at <rest>. */
static int64_t parse_ckpt_name(const char *name, const char **suffix) {
    static const char pre[] = "checkpoint-";
    if (strncmp(name, pre, sizeof pre - 1)) return -1;
    const char *p = name + sizeof pre - 1;
    int64_t v = 0;
    int nd = 0;
    while (*p >= '0' && *p <= '9') {
        if (++nd > 18) return -1;
        v = v * 10 + (*p - '0');
        p++;
    }
    if (nd == 0) return -1;
    if (suffix) {
        *suffix = p;
        return v;
    }
    return *p ? -1 : v;
}

/* ------------------------------------------------------------------------ */
/* HDF5 helpers                                                               */

static void h5_quiet(void) { H5Eset_auto2(H5E_DEFAULT, NULL, NULL); }

/* H5Ewalk2 callback: keep the operating system's words from the innermost entry that has them.
 * HDF5's POSIX driver (H5FDsec2.c) describes a failed read/write/truncate as "... errno = 28,
 * error message = 'No space left on device', ..."; the text between the quotes is strerror(errno). */
static herr_t h5_cause_cb(unsigned n, const H5E_error2_t *err, void *data) {
    (void)n;
    char *out = data;
    const char *m = err && err->desc ? strstr(err->desc, "error message = '") : NULL;
    if (!m || out[0]) return 0;
    m += strlen("error message = '");
    const char *q = strchr(m, '\'');
    size_t len = q ? (size_t)(q - m) : strlen(m);
    if (len > 127) len = 127;
    memcpy(out, m, len);
    out[len] = 0;
    return 0;
}

/* Record why the HDF5 call that just failed failed: the OS error on the current error stack (read
 * before the next HDF5 call clears it). Returns 1 so it can stand where `bad = 1` stood. */
static int h5_failed(char cause[128]) {
    if (!cause[0]) H5Ewalk2(H5E_DEFAULT, H5E_WALK_UPWARD, h5_cause_cb, cause);
    return 1;
}

/* The error line of a failed HDF5 write: the OS error when HDF5 recorded one, else the free space
 * of the file system when it is (nearly) exhausted, else only where it failed. */
static int h5_write_error(const char *path, const char *what, const char *cause, qerr *e) {
    if (cause[0]) return qerr_set(e, "cannot write %s (at %s): %s", path, what, cause);
    struct statvfs fs;
    if (statvfs(path, &fs) == 0 && (double)fs.f_bavail * (double)fs.f_frsize < 1024.0 * 1024.0)
        return qerr_set(e, "cannot write %s (at %s): no space left on device (%.0f KiB free)", path, what,
                        (double)fs.f_bavail * (double)fs.f_frsize / 1024.0);
    return qerr_set(e, "cannot write %s: HDF5 error at %s", path, what);
}

static hid_t h5_fapl(void) {
    hid_t fapl = H5Pcreate(H5P_FILE_ACCESS);
#if H5_VERSION_GE(1, 10, 7)
    /* One trainer per output_dir is enforced by our own lock file; HDF5's
     * flock-based locking fails on some network file systems. */
    if (fapl >= 0) H5Pset_file_locking(fapl, 0, 1);
#endif
    return fapl;
}

static int h5_attr_put(hid_t obj, const char *name, hid_t ftype, hid_t mtype, const void *v) {
    hid_t sp = H5Screate(H5S_SCALAR);
    if (sp < 0) return -1;
    hid_t a = H5Acreate2(obj, name, ftype, sp, H5P_DEFAULT, H5P_DEFAULT);
    int rc = a < 0 || H5Awrite(a, mtype, v) < 0 ? -1 : 0;
    if (a >= 0) H5Aclose(a);
    H5Sclose(sp);
    return rc;
}

static int h5_attr_i64(hid_t obj, const char *name, int64_t v) {
    return h5_attr_put(obj, name, H5T_STD_I64LE, H5T_NATIVE_INT64, &v);
}

static int h5_attr_f64(hid_t obj, const char *name, double v) {
    return h5_attr_put(obj, name, H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, &v);
}

/* Fixed-length, NUL-terminated string type of len + 1 bytes. */
static hid_t h5_str_type(size_t len) {
    hid_t t = H5Tcopy(H5T_C_S1);
    if (t < 0) return -1;
    if (H5Tset_size(t, len + 1) < 0 || H5Tset_strpad(t, H5T_STR_NULLTERM) < 0 || H5Tset_cset(t, H5T_CSET_UTF8) < 0) {
        H5Tclose(t);
        return -1;
    }
    return t;
}

static int h5_attr_str(hid_t obj, const char *name, const char *s) {
    hid_t t = h5_str_type(strlen(s));
    if (t < 0) return -1;
    int rc = h5_attr_put(obj, name, t, t, s);
    H5Tclose(t);
    return rc;
}

static int h5_attr_hex(hid_t obj, const char *name, uint64_t v) {
    char buf[24];
    snprintf(buf, sizeof buf, "%016" PRIx64, v);
    return h5_attr_str(obj, name, buf);
}

/* A 1-D (n) or 2-D (n, cols) dataset; chunked + shuffle + zlib when n > 0 and compress. */
static int h5_put(hid_t loc, const char *name, hid_t ftype, hid_t mtype, const void *data, int64_t n, int64_t cols,
                  int compress) {
    hsize_t dims[2] = {(hsize_t)n, (hsize_t)cols};
    int rank = cols > 0 ? 2 : 1;
    hid_t sp = H5Screate_simple(rank, dims, NULL);
    if (sp < 0) return -1;
    hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
    int rc = -1;
    if (dcpl < 0) goto out_sp;
    if (n > 0 && compress) {
        hsize_t chunk[2] = {(hsize_t)n < CKPT_CHUNK_ELEMS ? (hsize_t)n : CKPT_CHUNK_ELEMS, (hsize_t)cols};
        if (H5Pset_chunk(dcpl, rank, chunk) < 0 || H5Pset_shuffle(dcpl) < 0 ||
            H5Pset_deflate(dcpl, CKPT_DEFLATE_LEVEL) < 0)
            goto out_dcpl;
    }
    hid_t ds = H5Dcreate2(loc, name, ftype, sp, H5P_DEFAULT, dcpl, H5P_DEFAULT);
    if (ds < 0) goto out_dcpl;
    rc = (n > 0 && H5Dwrite(ds, mtype, H5S_ALL, H5S_ALL, H5P_DEFAULT, data) < 0) ? -1 : 0;
    if (H5Dclose(ds) < 0) rc = -1;
out_dcpl:
    H5Pclose(dcpl);
out_sp:
    H5Sclose(sp);
    return rc;
}

/* A scalar string dataset. */
static int h5_put_str(hid_t loc, const char *name, const char *s) {
    hid_t t = h5_str_type(strlen(s));
    if (t < 0) return -1;
    hid_t sp = H5Screate(H5S_SCALAR);
    int rc = -1;
    if (sp >= 0) {
        hid_t ds = H5Dcreate2(loc, name, t, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
        if (ds >= 0) {
            rc = H5Dwrite(ds, t, H5S_ALL, H5S_ALL, H5P_DEFAULT, s) < 0 ? -1 : 0;
            if (H5Dclose(ds) < 0) rc = -1;
        }
        H5Sclose(sp);
    }
    H5Tclose(t);
    return rc;
}

static int h5_get_attr(hid_t obj, const char *name, hid_t mtype, void *v) {
    if (H5Aexists(obj, name) <= 0) return -1;
    hid_t a = H5Aopen(obj, name, H5P_DEFAULT);
    if (a < 0) return -1;
    hid_t sp = H5Aget_space(a);
    int rc = sp < 0 || H5Sget_simple_extent_npoints(sp) != 1 || H5Aread(a, mtype, v) < 0 ? -1 : 0;
    if (sp >= 0) H5Sclose(sp);
    H5Aclose(a);
    return rc;
}

/* Read a fixed-length string attribute into buf (n bytes incl. NUL). */
static int h5_get_attr_str(hid_t obj, const char *name, char *buf, size_t n) {
    if (H5Aexists(obj, name) <= 0) return -1;
    hid_t a = H5Aopen(obj, name, H5P_DEFAULT);
    if (a < 0) return -1;
    int rc = -1;
    hid_t ft = H5Aget_type(a), sp = H5Aget_space(a);
    if (ft >= 0 && sp >= 0 && H5Tget_class(ft) == H5T_STRING && H5Tis_variable_str(ft) == 0 &&
        H5Sget_simple_extent_npoints(sp) == 1) {
        size_t sz = H5Tget_size(ft);
        if (sz > 0 && sz < n) {
            hid_t mt = H5Tcopy(ft); /* same character set: HDF5 does not convert ASCII <-> UTF-8 */
            if (mt >= 0 && H5Tset_size(mt, sz) >= 0) {
                memset(buf, 0, n);
                rc = H5Aread(a, mt, buf) < 0 ? -1 : 0;
                buf[sz] = 0;
            }
            if (mt >= 0) H5Tclose(mt);
        }
    }
    if (ft >= 0) H5Tclose(ft);
    if (sp >= 0) H5Sclose(sp);
    H5Aclose(a);
    return rc;
}

static int h5_get_attr_hex(hid_t obj, const char *name, uint64_t *v) {
    char buf[32];
    if (h5_get_attr_str(obj, name, buf, sizeof buf)) return -1;
    char *end;
    errno = 0;
    unsigned long long x = strtoull(buf, &end, 16);
    if (errno || *end || end == buf) return -1;
    *v = (uint64_t)x;
    return 0;
}

/* Shape of a dataset: rank and dims (up to 2). */
static int h5_shape(hid_t ds, int *rank, hsize_t dims[2]) {
    hid_t sp = H5Dget_space(ds);
    if (sp < 0) return -1;
    int r = H5Sget_simple_extent_ndims(sp);
    int rc = -1;
    if (r >= 0 && r <= 2) {
        dims[0] = dims[1] = 0;
        if (H5Sget_simple_extent_dims(sp, dims, NULL) >= 0) {
            *rank = r;
            rc = 0;
        }
    }
    H5Sclose(sp);
    return rc;
}

/* Read a dataset of exactly (n) or (n, cols) elements into dst. */
static int h5_get(hid_t loc, const char *name, hid_t mtype, void *dst, int64_t n, int64_t cols) {
    if (H5Lexists(loc, name, H5P_DEFAULT) <= 0) return -1;
    hid_t ds = H5Dopen2(loc, name, H5P_DEFAULT);
    if (ds < 0) return -1;
    int rank;
    hsize_t dims[2];
    int rc = -1;
    if (h5_shape(ds, &rank, dims) == 0 && rank == (cols > 0 ? 2 : 1) && dims[0] == (hsize_t)n &&
        (cols == 0 || dims[1] == (hsize_t)cols))
        rc = (n == 0 || H5Dread(ds, mtype, H5S_ALL, H5S_ALL, H5P_DEFAULT, dst) >= 0) ? 0 : -1;
    H5Dclose(ds);
    return rc;
}

/* Length (elements) of a 1-D dataset, or -1. */
static int64_t h5_len(hid_t loc, const char *name) {
    if (H5Lexists(loc, name, H5P_DEFAULT) <= 0) return -1;
    hid_t ds = H5Dopen2(loc, name, H5P_DEFAULT);
    if (ds < 0) return -1;
    int rank;
    hsize_t dims[2];
    int64_t n = -1;
    if (h5_shape(ds, &rank, dims) == 0 && rank == 1 && dims[0] <= (hsize_t)INT64_MAX) n = (int64_t)dims[0];
    H5Dclose(ds);
    return n;
}

/* A scalar fixed-length string dataset, malloc'd. */
static char *h5_get_str(hid_t loc, const char *name) {
    if (H5Lexists(loc, name, H5P_DEFAULT) <= 0) return NULL;
    hid_t ds = H5Dopen2(loc, name, H5P_DEFAULT);
    if (ds < 0) return NULL;
    char *out = NULL;
    hid_t ft = H5Dget_type(ds), sp = H5Dget_space(ds);
    if (ft >= 0 && sp >= 0 && H5Tget_class(ft) == H5T_STRING && H5Tis_variable_str(ft) == 0 &&
        H5Sget_simple_extent_npoints(sp) == 1) {
        size_t sz = H5Tget_size(ft);
        if (sz > 0 && sz < ((size_t)1 << 30)) {
            hid_t mt = H5Tcopy(ft); /* same character set: HDF5 does not convert ASCII <-> UTF-8 */
            out = calloc(sz + 1, 1);
            if (!out || mt < 0 || H5Tset_size(mt, sz) < 0 || H5Dread(ds, mt, H5S_ALL, H5S_ALL, H5P_DEFAULT, out) < 0) {
                free(out);
                out = NULL;
            }
            if (mt >= 0) H5Tclose(mt);
        }
    }
    if (ft >= 0) H5Tclose(ft);
    if (sp >= 0) H5Sclose(sp);
    H5Dclose(ds);
    return out;
}

/* ------------------------------------------------------------------------ */
/* state.h5                                                                   */

int ckpt_write_state(const char *path, const ckpt_state *s, qerr *e) {
    h5_quiet();
    hid_t fapl = h5_fapl();
    hid_t f = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, fapl);
    if (fapl >= 0) H5Pclose(fapl);
    if (f < 0) return qerr_set(e, "cannot create %s (HDF5)", path);
    const char *what = "attributes";
    hid_t g = -1;
    int bad = 0;
    char cause[128] = "";
#define W(expr, w)                                   \
    do {                                             \
        if (!bad && (expr) < 0)                      \
            bad = h5_failed(cause), what = (w);      \
    } while (0)
    W(h5_attr_str(f, "format", CKPT_FORMAT_NAME), "/ format");
    W(h5_attr_i64(f, "format_version", CKPT_FORMAT_VERSION), "/ format_version");
    W(h5_attr_i64(f, "step", s->step), "/ step");
    W(h5_attr_str(f, "created_by", "qlora-train"), "/ created_by");
    /* the run_state.h5 of a sharded checkpoint: the arrays are in the shard files (ckpt_save_sharded) */
    const int arrays = !s->sharded;
    if (!arrays) W(h5_attr_str(f, "layout", "sharded"), "/ layout");
    W(h5_put_str(f, "config", s->config_yaml ? s->config_yaml : ""), "/config");

    /* adapter */
    if (!bad && (g = H5Gcreate2(f, "lora", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT)) < 0) bad = h5_failed(cause), what = "/lora";
    if (arrays)
        W(h5_put(g, "params", H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, s->params, s->n_params, 0, 1), "/lora/params");
    else
        W(h5_attr_i64(g, "n_params", s->n_params), "/lora n_params");
    if (!bad) {
        int n = s->n_tensors;
        char *names = calloc((size_t)(n ? n : 1), CKPT_NAME_MAX);
        int64_t *off = malloc((size_t)(n ? n : 1) * sizeof *off);
        int64_t *shape = malloc((size_t)(n ? n : 1) * 2 * sizeof *shape);
        if (!names || !off || !shape) {
            bad = h5_failed(cause), what = "/lora (out of memory)";
        } else {
            for (int i = 0; i < n; i++) {
                snprintf(names + (size_t)i * CKPT_NAME_MAX, CKPT_NAME_MAX, "%s", s->tensors[i].name);
                off[i] = s->tensors[i].offset;
                shape[2 * i] = s->tensors[i].rows;
                shape[2 * i + 1] = s->tensors[i].cols;
            }
            hid_t t = h5_str_type(CKPT_NAME_MAX - 1);
            W(t, "/lora/tensor_names");
            W(h5_put(g, "tensor_names", t, t, names, n, 0, 0), "/lora/tensor_names");
            if (t >= 0) H5Tclose(t);
            W(h5_put(g, "tensor_offsets", H5T_STD_I64LE, H5T_NATIVE_INT64, off, n, 0, 0), "/lora/tensor_offsets");
            W(h5_put(g, "tensor_shapes", H5T_STD_I64LE, H5T_NATIVE_INT64, shape, n, 2, 0), "/lora/tensor_shapes");
        }
        free(names);
        free(off);
        free(shape);
    }
    if (g >= 0) H5Gclose(g), g = -1;
    ckpt_test_point("state");

    /* optimizer */
    if (!bad && (g = H5Gcreate2(f, "optimizer", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT)) < 0)
        bad = h5_failed(cause), what = "/optimizer";
    const int sophia = !strcmp(s->optimizer, "sophia");
    const int q8 = !strcmp(s->optimizer, "adamw_8bit");
    if (!arrays) {
        /* the moments are in the shard files; adamw_8bit's layout parameters stay here */
        if (q8) {
            W(h5_attr_i64(g, "blocksize", ADAMW8BIT_BLOCKSIZE), "/optimizer blocksize");
            W(h5_attr_i64(g, "min_8bit_size", ADAMW8BIT_MIN_8BIT_SIZE), "/optimizer min_8bit_size");
        }
    } else if (q8) {
        /* bitsandbytes' states: codes of every element, one absmax per block of the 8-bit tensors, the
         * fp32 moments of the tensors below min_8bit_size (optim/adamw8bit.h) */
        W(h5_put(g, "state1", H5T_STD_U8LE, H5T_NATIVE_UCHAR, s->state1, s->n_params, 0, 1), "/optimizer/state1");
        W(h5_put(g, "state2", H5T_STD_U8LE, H5T_NATIVE_UCHAR, s->state2, s->n_params, 0, 1), "/optimizer/state2");
        W(h5_put(g, "absmax1", H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, s->absmax1, s->n_blocks, 0, 1), "/optimizer/absmax1");
        W(h5_put(g, "absmax2", H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, s->absmax2, s->n_blocks, 0, 1), "/optimizer/absmax2");
        W(h5_put(g, "exp_avg", H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, s->exp_avg, s->n32, 0, 1), "/optimizer/exp_avg");
        W(h5_put(g, "exp_avg_sq", H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, s->exp_avg_sq, s->n32, 0, 1),
          "/optimizer/exp_avg_sq");
        W(h5_attr_i64(g, "blocksize", ADAMW8BIT_BLOCKSIZE), "/optimizer blocksize");
        W(h5_attr_i64(g, "min_8bit_size", ADAMW8BIT_MIN_8BIT_SIZE), "/optimizer min_8bit_size");
    } else {
        W(h5_put(g, "exp_avg", H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, s->exp_avg, s->n_params, 0, 1), "/optimizer/exp_avg");
        if (sophia)
            W(h5_put(g, "hessian", H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, s->hessian, s->n_params, 0, 1),
              "/optimizer/hessian");
        else
            W(h5_put(g, "exp_avg_sq", H5T_IEEE_F32LE, H5T_NATIVE_FLOAT, s->exp_avg_sq, s->n_params, 0, 1),
              "/optimizer/exp_avg_sq");
    }
    W(h5_attr_str(g, "name", sophia ? "sophia" : q8 ? "adamw_8bit" : "adamw"), "/optimizer name");
    W(h5_attr_i64(g, "step", s->opt_step), "/optimizer step");
    W(h5_attr_f64(g, "beta1", s->beta1), "/optimizer beta1");
    W(h5_attr_f64(g, "beta2", s->beta2), "/optimizer beta2");
    if (!sophia) W(h5_attr_f64(g, "eps", s->eps), "/optimizer eps");
    W(h5_attr_f64(g, "weight_decay", s->weight_decay), "/optimizer weight_decay");
    if (sophia) {
        W(h5_attr_f64(g, "rho", s->rho), "/optimizer rho");
        W(h5_attr_i64(g, "hessian_interval", s->hessian_interval), "/optimizer hessian_interval");
        W(h5_attr_i64(g, "hessian_updates", s->hessian_updates), "/optimizer hessian_updates");
    }
    if (g >= 0) H5Gclose(g), g = -1;

    /* scheduler */
    if (!bad && (g = H5Gcreate2(f, "scheduler", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT)) < 0)
        bad = h5_failed(cause), what = "/scheduler";
    W(h5_attr_str(g, "name", s->lr_scheduler), "/scheduler name");
    W(h5_attr_f64(g, "base_lr", s->base_lr), "/scheduler base_lr");
    W(h5_attr_i64(g, "warmup_steps", s->warmup_steps), "/scheduler warmup_steps");
    W(h5_attr_i64(g, "total_steps", s->total_steps), "/scheduler total_steps");
    W(h5_attr_i64(g, "last_step", s->step), "/scheduler last_step");
    W(h5_attr_f64(g, "last_lr", s->last_lr), "/scheduler last_lr");
    if (g >= 0) H5Gclose(g), g = -1;

    /* randomness */
    if (!bad && (g = H5Gcreate2(f, "rng", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT)) < 0) bad = h5_failed(cause), what = "/rng";
    W(h5_attr_i64(g, "seed", (int64_t)s->seed), "/rng seed");
    W(h5_attr_str(g, "scheme",
                  "counter-based splitmix64 (core/rng.h): dropout seed = rng_u64(seed, 0xd509, step*4096 + "
                  "micro_batch); epoch order = dataset_epoch_order(seed, epoch); nothing else is random after init"),
      "/rng scheme");
    if (g >= 0) H5Gclose(g), g = -1;

    /* data position */
    if (!bad && (g = H5Gcreate2(f, "data", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT)) < 0) bad = h5_failed(cause), what = "/data";
    int64_t nr = s->n_rows > 0 ? s->n_rows : 1;
    W(h5_attr_i64(g, "epoch", s->rows_consumed / nr), "/data epoch");
    W(h5_attr_i64(g, "index", s->rows_consumed % nr), "/data index");
    W(h5_attr_i64(g, "rows_consumed", s->rows_consumed), "/data rows_consumed");
    W(h5_attr_i64(g, "n_rows", s->n_rows), "/data n_rows");
    W(h5_attr_i64(g, "rows_per_step", s->rows_per_step), "/data rows_per_step");
    W(h5_attr_i64(g, "shuffle_seed", (int64_t)s->shuffle_seed), "/data shuffle_seed");
    W(h5_attr_hex(g, "fingerprint", s->data_fingerprint), "/data fingerprint");
    if (g >= 0) H5Gclose(g), g = -1;

    /* fingerprints */
    if (!bad && (g = H5Gcreate2(f, "fingerprint", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT)) < 0)
        bad = h5_failed(cause), what = "/fingerprint";
    W(h5_attr_str(g, "base_model", s->base_model), "/fingerprint base_model");
    W(h5_attr_hex(g, "model_xxh64", s->model_fingerprint), "/fingerprint model_xxh64");
    W(h5_attr_hex(g, "tokenizer_xxh64", s->tokenizer_fingerprint), "/fingerprint tokenizer_xxh64");
    W(h5_attr_str(g, "base_format", s->base_format), "/fingerprint base_format");
    W(h5_attr_str(g, "method",
                  "model_xxh64: XXH64 (seed 0) of the file size (u64 LE) then the bytes: all of them up to 256 MiB, "
                  "else the first 16 MiB, 64 KiB every 4 MiB and the last 64 KiB; tokenizer_xxh64: XXH64 of every "
                  "tokenizer.* GGUF key, type and value in file order"),
      "/fingerprint method");
    if (g >= 0) H5Gclose(g), g = -1;

    /* trainer */
    if (!bad && (g = H5Gcreate2(f, "trainer_state", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT)) < 0)
        bad = h5_failed(cause), what = "/trainer_state";
    W(h5_attr_i64(g, "nan_streak", s->nan_streak), "/trainer_state nan_streak");
    W(h5_attr_i64(g, "nan_skipped", s->nan_skipped), "/trainer_state nan_skipped");
    W(h5_attr_f64(g, "eval_loss_start", s->eval_loss_start), "/trainer_state eval_loss_start");
    W(h5_attr_f64(g, "last_eval_loss", s->last_eval_loss), "/trainer_state last_eval_loss");
    W(h5_attr_i64(g, "last_eval_step", s->last_eval_step), "/trainer_state last_eval_step");
    W(h5_attr_f64(g, "train_seconds", s->train_seconds), "/trainer_state train_seconds");
    W(h5_attr_i64(g, "loss_watchdog_streak", s->loss_watchdog_streak), "/trainer_state loss_watchdog_streak");
    if (s->loss_scale > 0) { /* fp16 only, so other runs' checkpoints stay as they were */
        W(h5_attr_f64(g, "loss_scale", s->loss_scale), "/trainer_state loss_scale");
        W(h5_attr_i64(g, "scaler_growth_tracker", s->scaler_growth_tracker), "/trainer_state scaler_growth_tracker");
        W(h5_attr_i64(g, "scaler_skipped", s->scaler_skipped), "/trainer_state scaler_skipped");
    }
    if (g >= 0) H5Gclose(g), g = -1;

    W(h5_put(f, "log_history", H5T_STD_U8LE, H5T_NATIVE_UCHAR, s->log_history, s->log_history_len, 0, 1),
      "/log_history");
#undef W
    if (H5Fclose(f) < 0 && !bad) bad = h5_failed(cause), what = "(closing the file)";
    if (bad) return h5_write_error(path, what, cause, e);
    return fsync_path(path, 0, e);
}

void ckpt_state_free(ckpt_state *s) {
    if (!s) return;
    free(s->params);
    free(s->exp_avg);
    free(s->exp_avg_sq);
    free(s->hessian);
    free(s->state1);
    free(s->state2);
    free(s->absmax1);
    free(s->absmax2);
    free(s->tensors);
    free(s->config_yaml);
    free(s->log_history);
    memset(s, 0, sizeof *s);
}

int ckpt_read_state(const char *path, ckpt_state *s, qerr *e) {
    memset(s, 0, sizeof *s);
    /* HDF5 would block on a FIFO and read a device as if it were a file */
    int fd = file_open_regular(path, 0, NULL, e);
    if (fd < 0) return -1;
    close(fd);
    h5_quiet();
    hid_t fapl = h5_fapl();
    hid_t f = H5Fopen(path, H5F_ACC_RDONLY, fapl);
    if (fapl >= 0) H5Pclose(fapl);
    if (f < 0) return qerr_set(e, "%s: not a readable HDF5 file", path);
    char fmt[64];
    int64_t ver = 0;
    hid_t g = -1;
    const char *what = NULL;
    if (h5_get_attr_str(f, "format", fmt, sizeof fmt) || strcmp(fmt, CKPT_FORMAT_NAME) ||
        h5_get_attr(f, "format_version", H5T_NATIVE_INT64, &ver)) {
        H5Fclose(f);
        return qerr_set(e, "%s: not a qlora checkpoint (attribute format != \"" CKPT_FORMAT_NAME "\")", path);
    }
    if (ver != CKPT_FORMAT_VERSION) {
        H5Fclose(f);
        return qerr_set(e, "%s: format_version %lld, but this qlora-train reads version %d", path, (long long)ver,
                        CKPT_FORMAT_VERSION);
    }
#define R(expr, w)                   \
    do {                             \
        if (!what && (expr) < 0) what = (w); \
    } while (0)
#define GROUP(name)                                                                 \
    do {                                                                            \
        if (g >= 0) H5Gclose(g), g = -1;                                            \
        if (!what && (H5Lexists(f, name, H5P_DEFAULT) <= 0 ||                       \
                      (g = H5Gopen2(f, name, H5P_DEFAULT)) < 0))                    \
            what = "/" name;                                                        \
    } while (0)
    R(h5_get_attr(f, "step", H5T_NATIVE_INT64, &s->step), "/ step");
    if (!what && !(s->config_yaml = h5_get_str(f, "config"))) what = "/config";
    /* a sharded checkpoint's run_state.h5: the scalars and the tensor table; the arrays are read from
     * the shard files (ckpt_load_part) */
    char layout[32] = "";
    const int arrays = h5_get_attr_str(f, "layout", layout, sizeof layout) != 0;
    if (!arrays && strcmp(layout, "sharded")) what = "/ layout (expected \"sharded\" or none)";
    s->sharded = !arrays;

    GROUP("lora");
    if (!what) {
        s->n_params = -1;
        if (arrays) s->n_params = h5_len(g, "params");
        else if (h5_get_attr(g, "n_params", H5T_NATIVE_INT64, &s->n_params)) s->n_params = -1;
        int64_t nt = h5_len(g, "tensor_offsets");
        if (s->n_params <= 0 || s->n_params > ((int64_t)1 << 40)) what = "/lora/params";
        else if (nt <= 0 || nt > CKPT_MAX_TENSORS) what = "/lora/tensor_offsets";
        else s->n_tensors = (int)nt;
    }
    if (!what) {
        size_t n = (size_t)s->n_params, nt = (size_t)s->n_tensors;
        if (arrays) {
            s->params = malloc(n * sizeof(float));
            s->exp_avg = malloc(n * sizeof(float));
            s->exp_avg_sq = malloc(n * sizeof(float));
        }
        s->tensors = calloc(nt, sizeof *s->tensors);
        char *names = calloc(nt, CKPT_NAME_MAX);
        int64_t *off = malloc(nt * sizeof *off), *shape = malloc(nt * 2 * sizeof *shape);
        if ((arrays && (!s->params || !s->exp_avg || !s->exp_avg_sq)) || !s->tensors || !names || !off || !shape) {
            what = "(out of memory)";
        } else {
            if (arrays) R(h5_get(g, "params", H5T_NATIVE_FLOAT, s->params, s->n_params, 0), "/lora/params");
            hid_t t = h5_str_type(CKPT_NAME_MAX - 1);
            R(t, "/lora/tensor_names");
            if (!what) R(h5_get(g, "tensor_names", t, names, s->n_tensors, 0), "/lora/tensor_names");
            if (t >= 0) H5Tclose(t);
            R(h5_get(g, "tensor_offsets", H5T_NATIVE_INT64, off, s->n_tensors, 0), "/lora/tensor_offsets");
            R(h5_get(g, "tensor_shapes", H5T_NATIVE_INT64, shape, s->n_tensors, 2), "/lora/tensor_shapes");
            /* The tensors must tile the arena exactly, in order. */
            int64_t next = 0;
            for (int i = 0; !what && i < s->n_tensors; i++) {
                ckpt_tensor *ti = &s->tensors[i];
                memcpy(ti->name, names + (size_t)i * CKPT_NAME_MAX, CKPT_NAME_MAX);
                ti->name[CKPT_NAME_MAX - 1] = 0;
                ti->offset = off[i];
                ti->rows = shape[2 * i];
                ti->cols = shape[2 * i + 1];
                if (ti->offset != next || ti->rows <= 0 || ti->cols <= 0 || ti->rows > s->n_params ||
                    ti->cols > s->n_params / ti->rows || ti->rows * ti->cols > s->n_params - next)
                    what = "/lora/tensor_shapes (tensors do not tile /lora/params)";
                else
                    next += ti->rows * ti->cols;
            }
            if (!what && next != s->n_params) what = "/lora/tensor_shapes (tensors do not cover /lora/params)";
        }
        free(names);
        free(off);
        free(shape);
    }

    GROUP("optimizer");
    R(h5_get_attr_str(g, "name", s->optimizer, sizeof s->optimizer), "/optimizer name");
    if (!what && strcmp(s->optimizer, "adamw") && strcmp(s->optimizer, "sophia") && strcmp(s->optimizer, "adamw_8bit"))
        what = "/optimizer name (neither \"adamw\", \"sophia\" nor \"adamw_8bit\")";
    if (!what && !arrays) {
        /* the moments are in the shard files; the scalars are read below */
        if (!strcmp(s->optimizer, "adamw_8bit")) {
            int64_t bs = 0, min8 = 0;
            R(h5_get_attr(g, "blocksize", H5T_NATIVE_INT64, &bs), "/optimizer blocksize");
            R(h5_get_attr(g, "min_8bit_size", H5T_NATIVE_INT64, &min8), "/optimizer min_8bit_size");
            if (!what && (bs != ADAMW8BIT_BLOCKSIZE || min8 != ADAMW8BIT_MIN_8BIT_SIZE))
                what = "/optimizer blocksize, min_8bit_size (not bitsandbytes' 256 and 4096)";
            for (int i = 0; !what && i < s->n_tensors; i++) {
                const int64_t numel = s->tensors[i].rows * s->tensors[i].cols;
                if (numel >= ADAMW8BIT_MIN_8BIT_SIZE) s->n_blocks += (numel + ADAMW8BIT_BLOCKSIZE - 1) / ADAMW8BIT_BLOCKSIZE;
                else s->n32 += numel;
            }
        }
        if (!strcmp(s->optimizer, "sophia")) {
            R(h5_get_attr(g, "rho", H5T_NATIVE_DOUBLE, &s->rho), "/optimizer rho");
            R(h5_get_attr(g, "hessian_interval", H5T_NATIVE_INT64, &s->hessian_interval), "/optimizer hessian_interval");
            R(h5_get_attr(g, "hessian_updates", H5T_NATIVE_INT64, &s->hessian_updates), "/optimizer hessian_updates");
        } else {
            R(h5_get_attr(g, "eps", H5T_NATIVE_DOUBLE, &s->eps), "/optimizer eps");
        }
    } else if (!what && !strcmp(s->optimizer, "sophia")) {
        /* m in exp_avg, h in hessian: the n_params buffer allocated above as exp_avg_sq */
        s->hessian = s->exp_avg_sq;
        s->exp_avg_sq = NULL;
        R(h5_get(g, "hessian", H5T_NATIVE_FLOAT, s->hessian, s->n_params, 0), "/optimizer/hessian");
        R(h5_get_attr(g, "rho", H5T_NATIVE_DOUBLE, &s->rho), "/optimizer rho");
        R(h5_get_attr(g, "hessian_interval", H5T_NATIVE_INT64, &s->hessian_interval), "/optimizer hessian_interval");
        R(h5_get_attr(g, "hessian_updates", H5T_NATIVE_INT64, &s->hessian_updates), "/optimizer hessian_updates");
        R(h5_get(g, "exp_avg", H5T_NATIVE_FLOAT, s->exp_avg, s->n_params, 0), "/optimizer/exp_avg");
    } else if (!what && !strcmp(s->optimizer, "adamw_8bit")) {
        /* the state's layout follows from the tensor table (optim/adamw8bit.h), under the recorded
         * blocksize and min_8bit_size, which must be the ones this build uses */
        int64_t bs = 0, min8 = 0;
        R(h5_get_attr(g, "blocksize", H5T_NATIVE_INT64, &bs), "/optimizer blocksize");
        R(h5_get_attr(g, "min_8bit_size", H5T_NATIVE_INT64, &min8), "/optimizer min_8bit_size");
        if (!what && (bs != ADAMW8BIT_BLOCKSIZE || min8 != ADAMW8BIT_MIN_8BIT_SIZE))
            what = "/optimizer blocksize, min_8bit_size (not bitsandbytes' 256 and 4096)";
        for (int i = 0; !what && i < s->n_tensors; i++) {
            const int64_t numel = s->tensors[i].rows * s->tensors[i].cols;
            if (numel >= ADAMW8BIT_MIN_8BIT_SIZE) s->n_blocks += (numel + ADAMW8BIT_BLOCKSIZE - 1) / ADAMW8BIT_BLOCKSIZE;
            else s->n32 += numel;
        }
        if (!what) {
            s->state1 = malloc((size_t)s->n_params);
            s->state2 = malloc((size_t)s->n_params);
            s->absmax1 = malloc((size_t)(s->n_blocks + 1) * sizeof(float));
            s->absmax2 = malloc((size_t)(s->n_blocks + 1) * sizeof(float));
            if (!s->state1 || !s->state2 || !s->absmax1 || !s->absmax2) what = "(out of memory)";
        }
        R(h5_get(g, "state1", H5T_NATIVE_UCHAR, s->state1, s->n_params, 0), "/optimizer/state1");
        R(h5_get(g, "state2", H5T_NATIVE_UCHAR, s->state2, s->n_params, 0), "/optimizer/state2");
        R(h5_get(g, "absmax1", H5T_NATIVE_FLOAT, s->absmax1, s->n_blocks, 0), "/optimizer/absmax1");
        R(h5_get(g, "absmax2", H5T_NATIVE_FLOAT, s->absmax2, s->n_blocks, 0), "/optimizer/absmax2");
        R(h5_get(g, "exp_avg", H5T_NATIVE_FLOAT, s->exp_avg, s->n32, 0), "/optimizer/exp_avg");
        R(h5_get(g, "exp_avg_sq", H5T_NATIVE_FLOAT, s->exp_avg_sq, s->n32, 0), "/optimizer/exp_avg_sq");
        R(h5_get_attr(g, "eps", H5T_NATIVE_DOUBLE, &s->eps), "/optimizer eps");
    } else {
        R(h5_get(g, "exp_avg_sq", H5T_NATIVE_FLOAT, s->exp_avg_sq, s->n_params, 0), "/optimizer/exp_avg_sq");
        R(h5_get_attr(g, "eps", H5T_NATIVE_DOUBLE, &s->eps), "/optimizer eps");
        R(h5_get(g, "exp_avg", H5T_NATIVE_FLOAT, s->exp_avg, s->n_params, 0), "/optimizer/exp_avg");
    }
    R(h5_get_attr(g, "step", H5T_NATIVE_INT64, &s->opt_step), "/optimizer step");
    R(h5_get_attr(g, "beta1", H5T_NATIVE_DOUBLE, &s->beta1), "/optimizer beta1");
    R(h5_get_attr(g, "beta2", H5T_NATIVE_DOUBLE, &s->beta2), "/optimizer beta2");
    R(h5_get_attr(g, "weight_decay", H5T_NATIVE_DOUBLE, &s->weight_decay), "/optimizer weight_decay");

    GROUP("scheduler");
    R(h5_get_attr_str(g, "name", s->lr_scheduler, sizeof s->lr_scheduler), "/scheduler name");
    R(h5_get_attr(g, "base_lr", H5T_NATIVE_DOUBLE, &s->base_lr), "/scheduler base_lr");
    R(h5_get_attr(g, "warmup_steps", H5T_NATIVE_INT64, &s->warmup_steps), "/scheduler warmup_steps");
    R(h5_get_attr(g, "total_steps", H5T_NATIVE_INT64, &s->total_steps), "/scheduler total_steps");
    R(h5_get_attr(g, "last_lr", H5T_NATIVE_DOUBLE, &s->last_lr), "/scheduler last_lr");

    GROUP("rng");
    int64_t seed = 0, sseed = 0;
    R(h5_get_attr(g, "seed", H5T_NATIVE_INT64, &seed), "/rng seed");
    s->seed = (uint64_t)seed;

    GROUP("data");
    R(h5_get_attr(g, "rows_consumed", H5T_NATIVE_INT64, &s->rows_consumed), "/data rows_consumed");
    R(h5_get_attr(g, "n_rows", H5T_NATIVE_INT64, &s->n_rows), "/data n_rows");
    R(h5_get_attr(g, "rows_per_step", H5T_NATIVE_INT64, &s->rows_per_step), "/data rows_per_step");
    R(h5_get_attr(g, "shuffle_seed", H5T_NATIVE_INT64, &sseed), "/data shuffle_seed");
    R(h5_get_attr_hex(g, "fingerprint", &s->data_fingerprint), "/data fingerprint");
    s->shuffle_seed = (uint64_t)sseed;

    GROUP("fingerprint");
    R(h5_get_attr_str(g, "base_model", s->base_model, sizeof s->base_model), "/fingerprint base_model");
    R(h5_get_attr_hex(g, "model_xxh64", &s->model_fingerprint), "/fingerprint model_xxh64");
    R(h5_get_attr_hex(g, "tokenizer_xxh64", &s->tokenizer_fingerprint), "/fingerprint tokenizer_xxh64");
    /* added later: a checkpoint written before it has none, and its base format is not checked */
    s->base_format[0] = 0;
    if (g >= 0 && H5Aexists(g, "base_format") > 0)
        R(h5_get_attr_str(g, "base_format", s->base_format, sizeof s->base_format), "/fingerprint base_format");

    GROUP("trainer_state");
    R(h5_get_attr(g, "nan_streak", H5T_NATIVE_INT64, &s->nan_streak), "/trainer_state nan_streak");
    R(h5_get_attr(g, "nan_skipped", H5T_NATIVE_INT64, &s->nan_skipped), "/trainer_state nan_skipped");
    R(h5_get_attr(g, "eval_loss_start", H5T_NATIVE_DOUBLE, &s->eval_loss_start), "/trainer_state eval_loss_start");
    R(h5_get_attr(g, "last_eval_loss", H5T_NATIVE_DOUBLE, &s->last_eval_loss), "/trainer_state last_eval_loss");
    R(h5_get_attr(g, "last_eval_step", H5T_NATIVE_INT64, &s->last_eval_step), "/trainer_state last_eval_step");
    R(h5_get_attr(g, "train_seconds", H5T_NATIVE_DOUBLE, &s->train_seconds), "/trainer_state train_seconds");
    /* added later: a checkpoint written before it has none and resumes with the streak at 0 */
    s->loss_scale = 0.0; /* fp16 state: absent in other runs' and older checkpoints */
    s->scaler_growth_tracker = s->scaler_skipped = 0;
    if (g >= 0 && H5Aexists(g, "loss_scale") > 0) {
        R(h5_get_attr(g, "loss_scale", H5T_NATIVE_DOUBLE, &s->loss_scale), "/trainer_state loss_scale");
        R(h5_get_attr(g, "scaler_growth_tracker", H5T_NATIVE_INT64, &s->scaler_growth_tracker),
          "/trainer_state scaler_growth_tracker");
        R(h5_get_attr(g, "scaler_skipped", H5T_NATIVE_INT64, &s->scaler_skipped), "/trainer_state scaler_skipped");
    }
    s->loss_watchdog_streak = 0;
    if (g >= 0 && H5Aexists(g, "loss_watchdog_streak") > 0)
        R(h5_get_attr(g, "loss_watchdog_streak", H5T_NATIVE_INT64, &s->loss_watchdog_streak),
          "/trainer_state loss_watchdog_streak");
    if (g >= 0) H5Gclose(g), g = -1;

    if (!what) {
        int64_t n = h5_len(f, "log_history");
        if (n < 0 || n > ((int64_t)1 << 34)) {
            what = "/log_history";
        } else {
            s->log_history = malloc((size_t)n + 1);
            if (!s->log_history) what = "(out of memory)";
            R(h5_get(f, "log_history", H5T_NATIVE_UCHAR, s->log_history, n, 0), "/log_history");
            if (!what) {
                s->log_history[n] = 0;
                s->log_history_len = n;
            }
        }
    }
#undef R
#undef GROUP
    H5Fclose(f);
    if (!what && (s->step < 0 || s->rows_consumed < 0 || s->n_rows <= 0 || s->opt_step < 0 || s->opt_step > s->step))
        what = "(step counters out of range)";
    if (what) {
        ckpt_state_free(s);
        return qerr_set(e, "%s: missing or malformed %s", path, what);
    }
    s->opt_lo = 0;
    s->opt_hi = arrays ? s->n_params : 0;
    s->blk_lo = s->n32_lo = 0;
    s->blk_hi = arrays ? s->n_blocks : 0;
    s->n32_hi = arrays ? s->n32 : 0;
    return 0;
}

/* ------------------------------------------------------------------------ */
/* directory protocol                                                         */

/* One file of a checkpoint as COMPLETE records it. */
typedef struct ckpt_file {
    char name[64];
    int64_t size;
    uint64_t h;
} ckpt_file;

/* The most files a marker lists: run_state.h5, index.json and one shard per rank. */
#define CKPT_MAX_FILES 4098

/* COMPLETE: "qlora-checkpoint 1\nstep N\n" then one "name size xxh64" line per file. A single-file
 * checkpoint lists state.h5 alone (the marker of format_version 1 since its first day). */
static int write_marker(const char *dir, int64_t step, const ckpt_file *files, int n_files, qerr *e) {
    char fin[4200];
    snprintf(fin, sizeof fin, "%s/" CKPT_MARKER, dir);
    size_t cap = 64 + (size_t)n_files * 128, len = 0;
    char *text = malloc(cap);
    if (!text) return qerr_set(e, "out of memory");
    len += (size_t)snprintf(text, cap, "%s %d\nstep %lld\n", CKPT_FORMAT_NAME, CKPT_FORMAT_VERSION, (long long)step);
    for (int i = 0; i < n_files; i++)
        len += (size_t)snprintf(text + len, cap - len, "%s %lld %016" PRIx64 "\n", files[i].name,
                                (long long)files[i].size, files[i].h);
    int rc = file_write_atomic(fin, text, len, e);
    free(text);
    if (rc) return -1;
    return fsync_path(dir, 1, e); /* the marker's rename is the commit: its failure to sync is an error */
}

/* fsync every regular file directly inside dir, then dir itself. */
static int fsync_dir_files(const char *dir, qerr *e) {
    DIR *d = opendir(dir);
    if (!d) return qerr_set(e, "cannot open %s: %s", dir, strerror(errno));
    struct dirent *de;
    int rc = 0;
    while (rc == 0 && (de = readdir(d))) {
        if (de->d_name[0] == '.') continue;
        char p[4400];
        if (path_join(p, sizeof p, dir, de->d_name)) continue;
        struct stat sb;
        if (lstat(p, &sb) == 0 && S_ISREG(sb.st_mode)) rc = fsync_path(p, 0, e);
    }
    closedir(d);
    return rc ? -1 : fsync_path(dir, 1, e);
}

/* The end of a save, once every file is in tmp and synced: move an existing fin aside, rename tmp
 * to fin, sync output_dir, write COMPLETE (the commit), drop what was moved aside. On failure fin is
 * removed and what was moved aside put back (tmp is the caller's to remove when the rename failed:
 * -1 with *renamed 0). */
static int commit_dir(const char *output_dir, const char *fin, const char *tmp, const char *old, int64_t step,
                      const ckpt_file *files, int n_files, int *renamed, qerr *e) {
    *renamed = 0;
    ckpt_test_point("rename");
    int moved = 0;
    if (access(fin, F_OK) == 0) {
        /* Same step saved before (an incomplete leftover, or a run resumed from
         * an older checkpoint): keep it aside until the new one is complete. */
        if (ckpt_remove_tree(old, e)) return -1;
        if (rename(fin, old)) return qerr_set(e, "cannot move %s aside: %s", fin, strerror(errno));
        moved = 1;
    }
    if (rename(tmp, fin)) {
        qerr_set(e, "cannot rename %s to %s: %s", tmp, fin, strerror(errno));
        if (moved) rename(old, fin);
        return -1;
    }
    *renamed = 1;
    if (fsync_path(output_dir, 1, e)) goto fail_fin;
    ckpt_test_point("marker");
    if (write_marker(fin, step, files, n_files, e)) goto fail_fin;
    ckpt_test_point("committed");
    if (moved) ckpt_remove_tree(old, NULL);
    return 0;
fail_fin:
    ckpt_remove_tree(fin, NULL);
    if (moved) rename(old, fin);
    return -1;
}

/* fin = output_dir/checkpoint-<step>, tmp = fin.tmp-<pid>, old = fin.old-<pid>. */
static int save_paths(const char *output_dir, int64_t step, int pid, char fin[4096], char tmp[4200], char old[4200],
                      qerr *e) {
    if ((size_t)snprintf(fin, 4096, "%s/checkpoint-%lld", output_dir, (long long)step) >= 4096)
        return qerr_set(e, "output_dir: path too long");
    snprintf(tmp, 4200, "%s.tmp-%d", fin, pid);
    snprintf(old, 4200, "%s.old-%d", fin, pid);
    return 0;
}

int ckpt_save(const char *output_dir, const ckpt_state *s, ckpt_extra_fn extra, void *arg, char *out_dir,
              size_t out_n, qerr *e) {
    char fin[4096], tmp[4200], old[4200], p[4400];
    if (save_paths(output_dir, s->step, (int)getpid(), fin, tmp, old, e)) return -1;
    g_test_step = s->step;
    if (ckpt_remove_tree(tmp, e)) return -1;
    if (mkdir(tmp, 0755)) return qerr_set(e, "cannot create %s: %s", tmp, strerror(errno));
    ckpt_test_point("begin");
    snprintf(p, sizeof p, "%s/" CKPT_STATE_FILE, tmp);
    ckpt_file f = {CKPT_STATE_FILE, 0, 0};
    int renamed = 0;
    if (ckpt_write_state(p, s, e) || hash_file(p, &f.size, &f.h, e)) goto fail_tmp;
    ckpt_test_point("extra");
    if (extra && extra(tmp, arg, e)) goto fail_tmp;
    if (fsync_dir_files(tmp, e)) goto fail_tmp;
    if (commit_dir(output_dir, fin, tmp, old, s->step, &f, 1, &renamed, e)) goto fail;
    if (out_dir) snprintf(out_dir, out_n, "%s", fin);
    return 0;
fail:
    if (renamed) return -1;
fail_tmp:
    ckpt_remove_tree(tmp, NULL);
    return -1;
}

/* The marker is a few lines per file; anything longer is not one. */
#define CKPT_MARKER_MAX (64 + CKPT_MAX_FILES * 128)

/* A file name a marker or an index may name: plain, inside the checkpoint directory. */
static int plain_name(const char *n) {
    if (!n[0] || n[0] == '.') return 0;
    for (const char *c = n; *c; c++)
        if (!((*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') || (*c >= '0' && *c <= '9') || *c == '.' ||
              *c == '_' || *c == '-'))
            return 0;
    return 1;
}

/* Parse and check dir's COMPLETE: every file it lists is a regular file of the recorded size and
 * XXH64. *files (malloc'd, may be NULL) receives the list. */
static int verify_marker(const char *dir, int64_t *step, ckpt_file **files, int *n_files, qerr *e) {
    char p[4400];
    struct stat sb;
    if (files) *files = NULL;
    if (n_files) *n_files = 0;
    if (stat(dir, &sb)) return qerr_set(e, "%s: %s", dir, strerror(errno));
    if (!S_ISDIR(sb.st_mode)) return qerr_set(e, "%s: not a checkpoint directory", dir);
    snprintf(p, sizeof p, "%s/" CKPT_MARKER, dir);
    if (lstat(p, &sb) && errno == ENOENT)
        return qerr_set(e, "%s: incomplete checkpoint (no %s marker: the save was interrupted)", dir, CKPT_MARKER);
    int64_t mlen = 0;
    int fd = file_open_regular(p, CKPT_MARKER_MAX, &mlen, e);
    if (fd < 0) return -1;
    char *buf = malloc((size_t)mlen + 1);
    if (!buf) {
        close(fd);
        return qerr_set(e, "out of memory");
    }
    ssize_t n = 0;
    while (n < mlen) {
        ssize_t got = read(fd, buf + n, (size_t)(mlen - n));
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) break;
        n += got;
    }
    close(fd);
    buf[n] = 0;
    char fmt[32];
    int ver = 0, used = 0;
    long long st = -1;
    ckpt_file *v = NULL;
    int cnt = 0, rc = -1, single = 0, sharded = 0;
    if (sscanf(buf, "%31s %d step %lld%n", fmt, &ver, &st, &used) != 3 || strcmp(fmt, CKPT_FORMAT_NAME) || st < 0) {
        qerr_set(e, "%s: malformed %s marker", dir, CKPT_MARKER);
        goto out;
    }
    if (ver != CKPT_FORMAT_VERSION) {
        qerr_set(e, "%s: checkpoint format_version %d, but this qlora-train reads version %d", dir, ver,
                 CKPT_FORMAT_VERSION);
        goto out;
    }
    if (!(v = calloc(CKPT_MAX_FILES, sizeof *v))) {
        qerr_set(e, "out of memory");
        goto out;
    }
    for (const char *q = buf + used;;) {
        char fname[64], hex[32];
        long long size = -1;
        int k = 0;
        while (*q == ' ' || *q == '\n' || *q == '\t' || *q == '\r') q++;
        if (!*q) break;
        if (cnt == CKPT_MAX_FILES || sscanf(q, "%63s %lld %31s%n", fname, &size, hex, &k) != 3 || size < 0 ||
            !plain_name(fname) || strlen(hex) != 16) {
            qerr_set(e, "%s: malformed %s marker", dir, CKPT_MARKER);
            goto out;
        }
        char *end;
        v[cnt].h = strtoull(hex, &end, 16);
        if (*end) {
            qerr_set(e, "%s: malformed %s marker", dir, CKPT_MARKER);
            goto out;
        }
        snprintf(v[cnt].name, sizeof v[cnt].name, "%s", fname);
        v[cnt].size = size;
        single += !strcmp(fname, CKPT_STATE_FILE);
        sharded += !strcmp(fname, CKPT_RUN_STATE_FILE) + !strcmp(fname, CKPT_INDEX_FILE);
        cnt++;
        q += k;
    }
    if (!(single == 1 && cnt == 1) && !(single == 0 && sharded == 2 && cnt >= 3)) {
        qerr_set(e, "%s: malformed %s marker (it lists neither %s alone nor %s, %s and shard files)", dir, CKPT_MARKER,
                 CKPT_STATE_FILE, CKPT_RUN_STATE_FILE, CKPT_INDEX_FILE);
        goto out;
    }
    for (int i = 0; i < cnt; i++) {
        /* a regular file of the size the marker records, before a byte of it is read */
        int64_t got_size;
        uint64_t got;
        snprintf(p, sizeof p, "%s/%s", dir, v[i].name);
        if ((fd = file_open_regular(p, 0, &got_size, e)) < 0) goto out;
        if (got_size != v[i].size) {
            close(fd);
            qerr_set(e, "%s: %s is %lld bytes, the marker says %lld (truncated or replaced)", dir, v[i].name,
                     (long long)got_size, (long long)v[i].size);
            goto out;
        }
        int hr = hash_fd(fd, got_size, p, &got, e);
        close(fd);
        if (hr) goto out;
        if (got != v[i].h) {
            qerr_set(e, "%s: %s is corrupt (XXH64 %016" PRIx64 ", the marker says %016" PRIx64 ")", dir, v[i].name,
                     got, v[i].h);
            goto out;
        }
    }
    if (step) *step = st;
    rc = 0;
out:
    free(buf);
    if (rc == 0 && files) {
        *files = v;
        *n_files = cnt;
    } else {
        free(v);
    }
    return rc;
}

int ckpt_verify(const char *dir, int64_t *step, qerr *e) { return verify_marker(dir, step, NULL, NULL, e); }

int ckpt_load(const char *dir, ckpt_state *s, qerr *e) { return ckpt_load_part(dir, 0, 0, s, e); }

/* ------------------------------------------------------------------------ */
/* the sharded layout                                                         */

void ckpt_shard_interval(int64_t n, int world, int rank, int64_t *lo, int64_t *hi) {
    const int64_t len = world > 0 ? (n + world - 1) / world : n;
    int64_t a = (int64_t)rank * len, b = a + len;
    if (b > n) b = n;
    if (a > b) a = b;
    *lo = a;
    *hi = b;
}

void ckpt_shard_cuts(int64_t n, int world, int block_aligned, const int64_t *offset, const int64_t *numel,
                    int n_tensors, int64_t *cuts) {
    for (int k = 0; k <= world; k++) {
        int64_t lo, hi;
        ckpt_shard_interval(n, world, k < world ? k : world - 1, &lo, &hi);
        cuts[k] = k < world ? lo : hi;
        if (block_aligned) cuts[k] = adamw8bit_shard_cut(offset, numel, n_tensors, cuts[k]);
    }
}

/* The flat arrays of a sharded checkpoint for an optimizer, in order: "lora/params" first, then the
 * optimizer's. Each is indexed in one of three coordinates: the arena's elements (lora/params, the fp32
 * moments of AdamW and Sophia, adamw_8bit's codes state1/state2), adamw_8bit's blocks (absmax1/absmax2)
 * or its fp32-moment elements (exp_avg/exp_avg_sq of the tensors below min_8bit_size). */
#define CKPT_MAX_ARRAYS 7
enum { COORD_ELEM, COORD_BLOCK, COORD_N32 };
typedef struct shard_array {
    const char *name;
    int coord;
    int u8; /* uint8 codes, else float32 */
} shard_array;

static int sharded_arrays(const char *optimizer, shard_array a[CKPT_MAX_ARRAYS]) {
    a[0] = (shard_array){"lora/params", COORD_ELEM, 0};
    if (!strcmp(optimizer, "adamw_8bit")) {
        a[1] = (shard_array){"optimizer/state1", COORD_ELEM, 1};
        a[2] = (shard_array){"optimizer/state2", COORD_ELEM, 1};
        a[3] = (shard_array){"optimizer/absmax1", COORD_BLOCK, 0};
        a[4] = (shard_array){"optimizer/absmax2", COORD_BLOCK, 0};
        a[5] = (shard_array){"optimizer/exp_avg", COORD_N32, 0};
        a[6] = (shard_array){"optimizer/exp_avg_sq", COORD_N32, 0};
        return 7;
    }
    a[1] = (shard_array){"optimizer/exp_avg", COORD_ELEM, 0};
    a[2] = (shard_array){!strcmp(optimizer, "sophia") ? "optimizer/hessian" : "optimizer/exp_avg_sq", COORD_ELEM, 0};
    return 3;
}

/* Rank `rank` of `world`'s intervals in the three coordinates (iv[coord] = {lo, hi}): elements
 * ckpt_shard_cuts' (on the block grid for adamw_8bit, from s's tensor table), and adamw_8bit's blocks
 * and fp32-moment elements those elements hold. world 0: everything. */
static void shard_intervals(const ckpt_state *s, int world, int rank, int64_t iv[3][2]) {
    const int q8 = !strcmp(s->optimizer, "adamw_8bit");
    iv[COORD_ELEM][0] = 0, iv[COORD_ELEM][1] = s->n_params;
    iv[COORD_BLOCK][0] = 0, iv[COORD_BLOCK][1] = q8 ? s->n_blocks : 0;
    iv[COORD_N32][0] = 0, iv[COORD_N32][1] = q8 ? s->n32 : 0;
    if (world <= 0) return;
    if (!q8) {
        ckpt_shard_interval(s->n_params, world, rank, &iv[COORD_ELEM][0], &iv[COORD_ELEM][1]);
        return;
    }
    int64_t *off = malloc(((size_t)s->n_tensors + 1) * sizeof *off), *num = malloc(((size_t)s->n_tensors + 1) * sizeof *num);
    int64_t *cuts = malloc(((size_t)world + 1) * sizeof *cuts);
    if (!off || !num || !cuts) { /* an empty interval: the caller's size checks then fail */
        iv[COORD_ELEM][0] = iv[COORD_ELEM][1] = s->n_params + 1;
    } else {
        for (int i = 0; i < s->n_tensors; i++) off[i] = s->tensors[i].offset, num[i] = s->tensors[i].rows * s->tensors[i].cols;
        ckpt_shard_cuts(s->n_params, world, 1, off, num, s->n_tensors, cuts);
        iv[COORD_ELEM][0] = cuts[rank], iv[COORD_ELEM][1] = cuts[rank + 1];
        adamw8bit_range_index(off, num, s->n_tensors, cuts[rank], cuts[rank + 1], &iv[COORD_BLOCK][0],
                              &iv[COORD_BLOCK][1], &iv[COORD_N32][0], &iv[COORD_N32][1]);
    }
    free(off);
    free(num);
    free(cuts);
}

/* The caller's array for shard_array k and the first index it holds (ckpt_state's intervals). */
static const void *state_array(const ckpt_state *s, int k, int64_t *first) {
    const int q8 = !strcmp(s->optimizer, "adamw_8bit");
    const int64_t olo = s->opt_hi > 0 ? s->opt_lo : 0;
    *first = 0;
    if (k == 0) return s->params;
    if (q8) {
        switch (k) {
        case 1: *first = olo; return s->state1;
        case 2: *first = olo; return s->state2;
        case 3: *first = s->blk_lo; return s->absmax1;
        case 4: *first = s->blk_lo; return s->absmax2;
        case 5: *first = s->n32_lo; return s->exp_avg;
        default: *first = s->n32_lo; return s->exp_avg_sq;
        }
    }
    *first = olo;
    if (k == 1) return s->exp_avg;
    return !strcmp(s->optimizer, "sophia") ? s->hessian : s->exp_avg_sq;
}

static void shard_file_name(char *buf, size_t n, int rank, int world) {
    snprintf(buf, n, "shard-%05d-of-%05d.h5", rank, world);
}

/* This rank's shard file: its intervals iv of every array (datasets in other coordinates than the
 * elements carry their own "offset" attribute). */
static int write_shard_file(const char *path, const ckpt_state *s, int rank, int world, int64_t iv[3][2],
                            qerr *e) {
    h5_quiet();
    hid_t fapl = h5_fapl();
    hid_t f = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, fapl);
    if (fapl >= 0) H5Pclose(fapl);
    if (f < 0) return qerr_set(e, "cannot create %s (HDF5)", path);
    shard_array arr[CKPT_MAX_ARRAYS];
    const int na = sharded_arrays(s->optimizer, arr);
    const int64_t lo = iv[COORD_ELEM][0], hi = iv[COORD_ELEM][1];
    const char *what = "attributes";
    int bad = 0;
    char cause[128] = "";
    hid_t g = -1;
#define W(expr, w)                              \
    do {                                        \
        if (!bad && (expr) < 0)                 \
            bad = h5_failed(cause), what = (w); \
    } while (0)
    W(h5_attr_str(f, "format", CKPT_SHARD_FORMAT), "/ format");
    W(h5_attr_i64(f, "format_version", CKPT_FORMAT_VERSION), "/ format_version");
    W(h5_attr_i64(f, "step", s->step), "/ step");
    W(h5_attr_i64(f, "rank", rank), "/ rank");
    W(h5_attr_i64(f, "world_size", world), "/ world_size");
    W(h5_attr_i64(f, "n_params", s->n_params), "/ n_params");
    W(h5_attr_i64(f, "offset", lo), "/ offset");
    W(h5_attr_i64(f, "length", hi - lo), "/ length");
    for (int i = 0; i < na; i++) {
        const char *slash = strchr(arr[i].name, '/');
        char grp[32];
        snprintf(grp, sizeof grp, "%.*s", (int)(slash - arr[i].name), arr[i].name);
        if (i < 2) {
            if (g >= 0) H5Gclose(g), g = -1;
            if (!bad && (g = H5Gcreate2(f, grp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT)) < 0)
                bad = h5_failed(cause), what = arr[i].name;
        }
        int64_t first;
        const unsigned char *base = state_array(s, i, &first);
        const int64_t a0 = iv[arr[i].coord][0], n = iv[arr[i].coord][1] - a0;
        const size_t esz = arr[i].u8 ? 1 : sizeof(float);
        const void *data = base ? base + (size_t)(a0 - first) * esz : NULL;
        W(h5_put(g, slash + 1, arr[i].u8 ? H5T_STD_U8LE : H5T_IEEE_F32LE, arr[i].u8 ? H5T_NATIVE_UCHAR : H5T_NATIVE_FLOAT,
                 data, n, 0, 1),
          arr[i].name);
        if (arr[i].coord != COORD_ELEM && !bad) {
            hid_t ds = H5Dopen2(g, slash + 1, H5P_DEFAULT);
            if (ds < 0 || h5_attr_i64(ds, "offset", a0) < 0) bad = h5_failed(cause), what = arr[i].name;
            if (ds >= 0) H5Dclose(ds);
        }
        if (i == 0) ckpt_test_point("shard_mid");
    }
    if (g >= 0) H5Gclose(g);
#undef W
    if (H5Fclose(f) < 0 && !bad) bad = h5_failed(cause), what = "(closing the file)";
    if (bad) return h5_write_error(path, what, cause, e);
    return fsync_path(path, 0, e);
}

/* index.json: each array -> its pieces {file, offset, length} in order. */
static char *index_json(const ckpt_state *s, int world) {
    cJSON *j = cJSON_CreateObject(), *t = NULL, *files = NULL;
    if (!j) return NULL;
    cJSON_AddStringToObject(j, "format", CKPT_INDEX_FORMAT);
    cJSON_AddNumberToObject(j, "format_version", CKPT_FORMAT_VERSION);
    cJSON_AddNumberToObject(j, "step", (double)s->step);
    cJSON_AddNumberToObject(j, "world_size", world);
    cJSON_AddNumberToObject(j, "n_params", (double)s->n_params);
    cJSON_AddStringToObject(j, "run_state", CKPT_RUN_STATE_FILE);
    files = cJSON_AddArrayToObject(j, "files");
    t = cJSON_AddObjectToObject(j, "tensors");
    shard_array arr[CKPT_MAX_ARRAYS];
    const int na = sharded_arrays(s->optimizer, arr);
    if (!strcmp(s->optimizer, "adamw_8bit")) { /* the lengths of the other coordinates */
        cJSON_AddNumberToObject(j, "n_blocks", (double)s->n_blocks);
        cJSON_AddNumberToObject(j, "n32", (double)s->n32);
    }
    for (int r = 0; files && r < world; r++) {
        char fn[64];
        shard_file_name(fn, sizeof fn, r, world);
        cJSON_AddItemToArray(files, cJSON_CreateString(fn));
    }
    for (int a = 0; t && a < na; a++) {
        cJSON *list = cJSON_AddArrayToObject(t, arr[a].name);
        for (int r = 0; list && r < world; r++) {
            int64_t iv[3][2];
            shard_intervals(s, world, r, iv);
            char fn[64];
            shard_file_name(fn, sizeof fn, r, world);
            cJSON *piece = cJSON_CreateObject();
            if (!piece) break;
            cJSON_AddStringToObject(piece, "file", fn);
            cJSON_AddNumberToObject(piece, "offset", (double)iv[arr[a].coord][0]);
            cJSON_AddNumberToObject(piece, "length", (double)(iv[arr[a].coord][1] - iv[arr[a].coord][0]));
            cJSON_AddItemToArray(list, piece);
        }
    }
    char *out = cJSON_Print(j);
    cJSON_Delete(j);
    return out;
}

int ckpt_save_sharded(comm *cm, const char *output_dir, const ckpt_state *s, ckpt_extra_fn extra, void *arg,
                      char *out_dir, size_t out_n, qerr *e) {
    const int rank = cm->rank, world = cm->world_size;
    char fin[4096], tmp[4200], old[4200], p[4400];
    g_test_rank = rank;
    g_test_step = s->step;
    qerr mine = {{0}}; /* this rank's failure */
    int64_t ok = 1;
    int64_t pid = (int64_t)getpid();
    if (comm_broadcast(cm, &pid, 1, COMM_I64, 0, e)) return -2;
    if (save_paths(output_dir, s->step, (int)pid, fin, tmp, old, &mine)) ok = 0;
    if (rank == 0 && ok) {
        if (ckpt_remove_tree(tmp, &mine)) ok = 0;
        else if (mkdir(tmp, 0755)) ok = 0, qerr_set(&mine, "cannot create %s: %s", tmp, strerror(errno));
    }
    if (comm_broadcast(cm, &ok, 1, COMM_I64, 0, e)) return -2;
    if (!ok) {
        if (rank == 0) *e = mine;
        else qerr_set(e, "rank 0 could not create the checkpoint directory for step %lld", (long long)s->step);
        return -1;
    }
    ckpt_test_point("shard_begin");
    int64_t iv[3][2];
    shard_intervals(s, world, rank, iv);
    const int64_t lo = iv[COORD_ELEM][0], hi = iv[COORD_ELEM][1];
    const int64_t olo = s->opt_hi > 0 ? s->opt_lo : 0, ohi = s->opt_hi > 0 ? s->opt_hi : s->n_params;
    const int q8 = !strcmp(s->optimizer, "adamw_8bit");
    char fn[64];
    shard_file_name(fn, sizeof fn, rank, world);
    snprintf(p, sizeof p, "%s/%s", tmp, fn);
    int64_t info[3] = {1, 0, 0}; /* ok, size, XXH64 of this rank's shard file */
    uint64_t h = 0;
    if (lo < olo || hi > ohi) {
        info[0] = 0;
        qerr_set(&mine, "rank %d holds the optimizer state [%lld, %lld), its shard is [%lld, %lld)", rank,
                 (long long)olo, (long long)ohi, (long long)lo, (long long)hi);
    } else if (q8 && (iv[COORD_BLOCK][0] < s->blk_lo || iv[COORD_BLOCK][1] > s->blk_hi ||
                      iv[COORD_N32][0] < s->n32_lo || iv[COORD_N32][1] > s->n32_hi)) {
        info[0] = 0;
        qerr_set(&mine, "rank %d holds the 8-bit blocks [%lld, %lld) and fp32 moments [%lld, %lld), its shard has "
                        "[%lld, %lld) and [%lld, %lld)", rank, (long long)s->blk_lo, (long long)s->blk_hi,
                 (long long)s->n32_lo, (long long)s->n32_hi, (long long)iv[COORD_BLOCK][0],
                 (long long)iv[COORD_BLOCK][1], (long long)iv[COORD_N32][0], (long long)iv[COORD_N32][1]);
    } else if (write_shard_file(p, s, rank, world, iv, &mine) || hash_file(p, &info[1], &h, &mine)) {
        info[0] = 0;
    }
    memcpy(&info[2], &h, sizeof h);
    ckpt_test_point("shard_synced");
    int64_t *all = calloc((size_t)world * 3, sizeof *all);
    if (!all) {
        qerr_set(e, "rank %d: out of memory", rank);
        return -2;
    }
    /* the barrier: every shard file is written and synced (or its rank failed) */
    if (comm_all_gather(cm, info, all, 3, COMM_I64, e)) {
        free(all);
        return -2;
    }
    ckpt_test_point("barrier");
    int64_t rc = 0;
    int bad_rank = -1;
    for (int r = 0; r < world && bad_rank < 0; r++)
        if (!all[3 * r]) bad_rank = r;
    if (rank == 0) {
        ckpt_file *files = calloc((size_t)world + 2, sizeof *files);
        char *idx = NULL;
        int renamed = 0;
        if (!files) {
            rc = -1, qerr_set(&mine, "out of memory");
        } else if (bad_rank >= 0) {
            rc = -1;
            if (bad_rank) qerr_set(&mine, "rank %d could not write its shard file (its message is on its output)", bad_rank);
        } else {
            snprintf(files[0].name, sizeof files[0].name, CKPT_RUN_STATE_FILE);
            snprintf(files[1].name, sizeof files[1].name, CKPT_INDEX_FILE);
            for (int r = 0; r < world; r++) {
                shard_file_name(files[2 + r].name, sizeof files[2 + r].name, r, world);
                files[2 + r].size = all[3 * r + 1];
                memcpy(&files[2 + r].h, &all[3 * r + 2], sizeof files[2 + r].h);
            }
            ckpt_state rs = *s;
            rs.sharded = 1;
            snprintf(p, sizeof p, "%s/" CKPT_RUN_STATE_FILE, tmp);
            if (ckpt_write_state(p, &rs, &mine) || hash_file(p, &files[0].size, &files[0].h, &mine)) rc = -1;
            snprintf(p, sizeof p, "%s/" CKPT_INDEX_FILE, tmp);
            if (!rc && !(idx = index_json(s, world))) rc = -1, qerr_set(&mine, "out of memory (%s)", CKPT_INDEX_FILE);
            if (!rc && (file_write_atomic(p, idx, strlen(idx), &mine) || hash_file(p, &files[1].size, &files[1].h, &mine)))
                rc = -1;
            ckpt_test_point("extra");
            if (!rc && extra && extra(tmp, arg, &mine)) rc = -1;
            if (!rc && fsync_dir_files(tmp, &mine)) rc = -1;
            if (!rc && commit_dir(output_dir, fin, tmp, old, s->step, files, world + 2, &renamed, &mine)) rc = -1;
        }
        if (rc && !renamed) ckpt_remove_tree(tmp, NULL);
        free(idx);
        free(files);
    }
    free(all);
    /* every rank learns whether the checkpoint committed */
    if (comm_broadcast(cm, &rc, 1, COMM_I64, 0, e)) return -2;
    if (rc) {
        if (rank == 0 || !info[0]) *e = mine;
        else if (bad_rank >= 0) qerr_set(e, "rank %d could not write its shard file", bad_rank);
        else qerr_set(e, "rank 0 could not commit checkpoint-%lld (its message is on its output)", (long long)s->step);
        return -1;
    }
    if (out_dir) snprintf(out_dir, out_n, "%s", fin);
    return 0;
}

/* A parsed index.json: per array, the pieces. */
typedef struct shard_piece {
    char file[64];
    int64_t offset, length;
} shard_piece;

/* Read and check index.json; pieces[a] (malloc'd) tile array a (sharded_arrays: [0, n_params), or
 * adamw_8bit's [0, n_blocks) and [0, n32)), in order, each in a file the marker lists (so verified). */
static int read_index(const char *dir, const ckpt_state *s, int64_t step, const ckpt_file *files, int n_files,
                      shard_piece *pieces[CKPT_MAX_ARRAYS], int n_pieces[CKPT_MAX_ARRAYS], int *world, qerr *e) {
    char p[4400];
    snprintf(p, sizeof p, "%s/" CKPT_INDEX_FILE, dir);
    qerr je;
    cJSON *j = file_read_json_object(p, &je);
    if (!j) return qerr_set(e, "%s", je.msg);
    shard_array arr[CKPT_MAX_ARRAYS];
    const int na = sharded_arrays(s->optimizer, arr);
    const int64_t coord_len[3] = {s->n_params, s->n_blocks, s->n32};
    const cJSON *fmt = cJSON_GetObjectItemCaseSensitive(j, "format"), *ver = cJSON_GetObjectItemCaseSensitive(j, "format_version"),
                *st = cJSON_GetObjectItemCaseSensitive(j, "step"), *np = cJSON_GetObjectItemCaseSensitive(j, "n_params"),
                *ws = cJSON_GetObjectItemCaseSensitive(j, "world_size"), *t = cJSON_GetObjectItemCaseSensitive(j, "tensors");
    const char *bad = NULL;
    if (!cJSON_IsString(fmt) || strcmp(fmt->valuestring, CKPT_INDEX_FORMAT)) bad = "format";
    else if (!cJSON_IsNumber(ver) || ver->valuedouble != CKPT_FORMAT_VERSION) bad = "format_version";
    else if (!cJSON_IsNumber(st) || st->valuedouble != (double)step) bad = "step (not the marker's)";
    else if (!cJSON_IsNumber(np) || np->valuedouble != (double)s->n_params) bad = "n_params (not run_state.h5's)";
    else if (!cJSON_IsNumber(ws) || ws->valuedouble < 1 || ws->valuedouble > CKPT_MAX_FILES - 2) bad = "world_size";
    else if (!cJSON_IsObject(t)) bad = "tensors";
    for (int a = 0; a < CKPT_MAX_ARRAYS; a++) pieces[a] = NULL, n_pieces[a] = 0;
    for (int a = 0; !bad && a < na; a++) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(t, arr[a].name);
        const int64_t total = coord_len[arr[a].coord];
        int n = cJSON_IsArray(list) ? cJSON_GetArraySize(list) : 0;
        if (n <= 0 || n > CKPT_MAX_FILES || !(pieces[a] = calloc((size_t)n, sizeof *pieces[a]))) {
            bad = arr[a].name;
            break;
        }
        int64_t next = 0;
        const cJSON *it;
        int k = 0;
        cJSON_ArrayForEach(it, list) {
            const cJSON *fi = cJSON_GetObjectItemCaseSensitive(it, "file"), *of = cJSON_GetObjectItemCaseSensitive(it, "offset"),
                        *ln = cJSON_GetObjectItemCaseSensitive(it, "length");
            int listed = 0;
            for (int i = 0; cJSON_IsString(fi) && i < n_files; i++) listed |= !strcmp(files[i].name, fi->valuestring);
            if (!listed || !cJSON_IsNumber(of) || !cJSON_IsNumber(ln) || of->valuedouble != (double)next ||
                ln->valuedouble < 0 || ln->valuedouble > (double)(total - next)) {
                bad = arr[a].name;
                break;
            }
            snprintf(pieces[a][k].file, sizeof pieces[a][k].file, "%s", fi->valuestring);
            pieces[a][k].offset = next;
            pieces[a][k].length = (int64_t)ln->valuedouble;
            next += pieces[a][k].length;
            k++;
        }
        if (!bad && next != total) bad = arr[a].name;
        n_pieces[a] = k;
    }
    if (!bad) *world = (int)ws->valuedouble;
    cJSON_Delete(j);
    if (bad) {
        for (int a = 0; a < CKPT_MAX_ARRAYS; a++) free(pieces[a]), pieces[a] = NULL;
        return qerr_set(e, "%s: missing or malformed %s (the pieces must be files the marker lists and tile "
                           "the array, [0, n_params) or adamw_8bit's blocks or fp32 moments, in order)", p, bad);
    }
    return 0;
}

/* dst[0 .. hi-lo) <- elements [lo, hi) of array ar (in its coordinates), from the pieces that hold them. */
static int read_array_range(const char *dir, const shard_array *ar, const shard_piece *pc, int n_pc, int64_t step,
                            int64_t n_params, int64_t lo, int64_t hi, void *dst, qerr *e) {
    const char *name = ar->name;
    const size_t esz = ar->u8 ? 1 : sizeof(float);
    for (int k = 0; k < n_pc; k++) {
        const int64_t a = pc[k].offset > lo ? pc[k].offset : lo;
        const int64_t b = pc[k].offset + pc[k].length < hi ? pc[k].offset + pc[k].length : hi;
        if (a >= b) continue;
        char p[4400];
        snprintf(p, sizeof p, "%s/%s", dir, pc[k].file);
        h5_quiet();
        hid_t fapl = h5_fapl();
        hid_t f = H5Fopen(p, H5F_ACC_RDONLY, fapl);
        if (fapl >= 0) H5Pclose(fapl);
        if (f < 0) return qerr_set(e, "%s: not a readable HDF5 file", p);
        char fmt[64];
        int64_t ver = 0, fstep = -1, fn = -1, foff = -1, flen = -1;
        const char *what = NULL;
        if (h5_get_attr_str(f, "format", fmt, sizeof fmt) || strcmp(fmt, CKPT_SHARD_FORMAT)) what = "format";
        else if (h5_get_attr(f, "format_version", H5T_NATIVE_INT64, &ver) || ver != CKPT_FORMAT_VERSION) what = "format_version";
        else if (h5_get_attr(f, "step", H5T_NATIVE_INT64, &fstep) || fstep != step) what = "step";
        else if (h5_get_attr(f, "n_params", H5T_NATIVE_INT64, &fn) || fn != n_params) what = "n_params";
        else if (h5_get_attr(f, "offset", H5T_NATIVE_INT64, &foff) || h5_get_attr(f, "length", H5T_NATIVE_INT64, &flen) ||
                 (ar->coord == COORD_ELEM && (foff != pc[k].offset || flen != pc[k].length)))
            what = "offset, length (not the index's)";
        hid_t ds = -1, fs = -1, ms = -1;
        if (!what && (H5Lexists(f, name, H5P_DEFAULT) <= 0 || (ds = H5Dopen2(f, name, H5P_DEFAULT)) < 0)) what = name;
        int64_t doff = -1; /* blocks, fp32 moments: the dataset's own offset */
        if (!what && ar->coord != COORD_ELEM) {
            flen = pc[k].length;
            if (h5_get_attr(ds, "offset", H5T_NATIVE_INT64, &doff) || doff != pc[k].offset) what = name;
        }
        if (!what) {
            int rk;
            hsize_t dims[2];
            if (h5_shape(ds, &rk, dims) || rk != 1 || dims[0] != (hsize_t)flen) what = name;
        }
        if (!what) {
            hsize_t start = (hsize_t)(a - pc[k].offset), count = (hsize_t)(b - a);
            fs = H5Dget_space(ds);
            ms = H5Screate_simple(1, &count, NULL);
            if (fs < 0 || ms < 0 || H5Sselect_hyperslab(fs, H5S_SELECT_SET, &start, NULL, &count, NULL) < 0 ||
                H5Dread(ds, ar->u8 ? H5T_NATIVE_UCHAR : H5T_NATIVE_FLOAT, ms, fs, H5P_DEFAULT,
                        (unsigned char *)dst + (size_t)(a - lo) * esz) < 0)
                what = name;
        }
        if (ms >= 0) H5Sclose(ms);
        if (fs >= 0) H5Sclose(fs);
        if (ds >= 0) H5Dclose(ds);
        H5Fclose(f);
        if (what) return qerr_set(e, "%s: missing or malformed %s", p, what);
    }
    return 0;
}

int ckpt_load_part(const char *dir, int world, int rank, ckpt_state *s, qerr *e) {
    memset(s, 0, sizeof *s);
    int64_t step;
    ckpt_file *files = NULL;
    int n_files = 0;
    if (verify_marker(dir, &step, &files, &n_files, e)) return -1;
    const int sharded = strcmp(files[0].name, CKPT_STATE_FILE) != 0;
    char p[4400];
    if (path_join(p, sizeof p, dir, sharded ? CKPT_RUN_STATE_FILE : CKPT_STATE_FILE)) {
        free(files);
        return qerr_set(e, "%s: path too long", dir);
    }
    if (ckpt_read_state(p, s, e)) {
        free(files);
        return -1;
    }
    if (s->step != step) {
        ckpt_state_free(s);
        free(files);
        return qerr_set(e, "%s: %s says step %lld, the marker %lld", dir, sharded ? CKPT_RUN_STATE_FILE : CKPT_STATE_FILE,
                        (long long)s->step, (long long)step);
    }
    if (s->sharded != sharded) {
        ckpt_state_free(s);
        free(files);
        return qerr_set(e, "%s: %s: missing or malformed / layout", dir, sharded ? CKPT_RUN_STATE_FILE : CKPT_STATE_FILE);
    }
    if (!sharded) {
        free(files);
        return 0;
    }
    shard_piece *pieces[CKPT_MAX_ARRAYS];
    int n_pieces[CKPT_MAX_ARRAYS], saved_world = 0;
    int rc = read_index(dir, s, step, files, n_files, pieces, n_pieces, &saved_world, e);
    free(files);
    if (rc) {
        ckpt_state_free(s);
        return -1;
    }
    int64_t iv[3][2];
    shard_intervals(s, world, rank, iv);
    shard_array arr[CKPT_MAX_ARRAYS];
    const int na = sharded_arrays(s->optimizer, arr);
    const int q8 = !strcmp(s->optimizer, "adamw_8bit"), sophia = !strcmp(s->optimizer, "sophia");
    void *buf[CKPT_MAX_ARRAYS] = {NULL};
    for (int k = 0; k < na && !rc; k++) {
        const int64_t len = k == 0 ? s->n_params : iv[arr[k].coord][1] - iv[arr[k].coord][0];
        if (!(buf[k] = malloc((size_t)(len + 1) * (arr[k].u8 ? 1 : sizeof(float)))))
            rc = qerr_set(e, "out of memory reading %s", dir);
    }
    s->params = buf[0];
    if (q8) {
        s->state1 = buf[1], s->state2 = buf[2], s->absmax1 = buf[3], s->absmax2 = buf[4];
        s->exp_avg = buf[5], s->exp_avg_sq = buf[6];
    } else {
        s->exp_avg = buf[1];
        if (sophia) s->hessian = buf[2];
        else s->exp_avg_sq = buf[2];
    }
    for (int k = 0; k < na && !rc; k++) {
        const int64_t lo = k == 0 ? 0 : iv[arr[k].coord][0], hi = k == 0 ? s->n_params : iv[arr[k].coord][1];
        rc = read_array_range(dir, &arr[k], pieces[k], n_pieces[k], step, s->n_params, lo, hi, buf[k], e);
    }
    for (int a = 0; a < CKPT_MAX_ARRAYS; a++) free(pieces[a]);
    if (rc) {
        ckpt_state_free(s);
        return -1;
    }
    s->opt_lo = iv[COORD_ELEM][0];
    s->opt_hi = iv[COORD_ELEM][1];
    s->blk_lo = iv[COORD_BLOCK][0], s->blk_hi = iv[COORD_BLOCK][1];
    s->n32_lo = iv[COORD_N32][0], s->n32_hi = iv[COORD_N32][1];
    s->sharded = saved_world;
    return 0;
}

/* ckpt_consolidate's extra files: the adapter and the config, copied from the source checkpoint. */
static int copy_extra(const char *dir, void *arg, qerr *e) {
    static const char *const names[] = {"adapter_model.safetensors", "adapter_config.json", "config.resolved.yaml"};
    const char *src = arg;
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        char a[4400], b[4400];
        snprintf(a, sizeof a, "%s/%s", src, names[i]);
        snprintf(b, sizeof b, "%s/%s", dir, names[i]);
        if (access(a, F_OK)) continue;
        size_t len = 0;
        char *buf = file_read_all(a, &len, e);
        if (!buf) return -1;
        int rc = file_write_atomic(b, buf, len, e);
        free(buf);
        if (rc) return -1;
    }
    return 0;
}

int ckpt_consolidate(const char *src, const char *dst, qerr *e) {
    if (access(dst, F_OK) == 0) return qerr_set(e, "%s: already exists; give a new directory", dst);
    ckpt_state s;
    if (ckpt_load(src, &s, e)) return -1;
    s.sharded = 0;
    char tmp[4200], parent[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp-%d", dst, (int)getpid());
    snprintf(parent, sizeof parent, "%s", dst);
    char *slash = strrchr(parent, '/');
    if (slash == parent) slash[1] = 0;
    else if (slash) *slash = 0;
    else snprintf(parent, sizeof parent, ".");
    int rc = -1;
    ckpt_file f = {CKPT_STATE_FILE, 0, 0};
    char p[4400];
    snprintf(p, sizeof p, "%s/" CKPT_STATE_FILE, tmp);
    if (ckpt_remove_tree(tmp, e)) goto out;
    if (mkdir(tmp, 0755)) {
        qerr_set(e, "cannot create %s: %s", tmp, strerror(errno));
        goto out;
    }
    if (ckpt_write_state(p, &s, e) || hash_file(p, &f.size, &f.h, e) || copy_extra(tmp, (void *)src, e) ||
        fsync_dir_files(tmp, e))
        goto out_tmp;
    if (rename(tmp, dst)) {
        qerr_set(e, "cannot rename %s to %s: %s", tmp, dst, strerror(errno));
        goto out_tmp;
    }
    if (fsync_path(parent, 1, e) || write_marker(dst, s.step, &f, 1, e)) {
        ckpt_remove_tree(dst, NULL);
        goto out;
    }
    rc = 0;
    goto out;
out_tmp:
    ckpt_remove_tree(tmp, NULL);
out:
    ckpt_state_free(&s);
    return rc;
}


static int has_marker(const char *dir) {
    char p[4608];
    return path_join(p, sizeof p, dir, CKPT_MARKER) == 0 && access(p, F_OK) == 0;
}

static int cmp_entry_desc(const void *a, const void *b) {
    const ckpt_entry *x = a, *y = b;
    return x->step < y->step ? 1 : x->step > y->step ? -1 : 0;
}

int ckpt_list(const char *output_dir, ckpt_entry **out, int *n, qerr *e) {
    *out = NULL;
    *n = 0;
    DIR *d = opendir(output_dir);
    if (!d) return errno == ENOENT ? 0 : qerr_set(e, "cannot list %s: %s", output_dir, strerror(errno));
    ckpt_entry *v = NULL;
    int cnt = 0, cap = 0;
    struct dirent *de;
    while ((de = readdir(d))) {
        int64_t st = parse_ckpt_name(de->d_name, NULL);
        if (st < 0) continue;
        char p[4096];
        if (path_join(p, sizeof p, output_dir, de->d_name) || !is_dir(p)) continue;
        if (cnt == cap) {
            cap = cap ? 2 * cap : 16;
            ckpt_entry *nv = realloc(v, (size_t)cap * sizeof *nv);
            if (!nv) {
                free(v);
                closedir(d);
                return qerr_set(e, "out of memory");
            }
            v = nv;
        }
        v[cnt].step = st;
        memcpy(v[cnt].path, p, sizeof p);
        v[cnt].complete = has_marker(p);
        cnt++;
    }
    closedir(d);
    if (cnt) qsort(v, (size_t)cnt, sizeof *v, cmp_entry_desc);
    *out = v;
    *n = cnt;
    return 0;
}

/* Delete a checkpoint so that it never looks complete half-way. */
static int delete_checkpoint(const char *dir, qerr *e) {
    char p[4400];
    snprintf(p, sizeof p, "%s/" CKPT_MARKER, dir);
    if (unlink(p) && errno != ENOENT) return qerr_set(e, "cannot delete %s: %s", p, strerror(errno));
    if (fsync_path(dir, 1, e)) return -1;
    return ckpt_remove_tree(dir, e);
}

int ckpt_prune(const char *output_dir, int keep, int *n_deleted, qerr *e) {
    if (n_deleted) *n_deleted = 0;
    ckpt_entry *v;
    int n;
    if (ckpt_list(output_dir, &v, &n, e)) return -1;
    int complete = 0, rc = 0;
    for (int i = 0; i < n; i++) {
        int del = v[i].complete ? (keep > 0 && ++complete > keep) : complete > 0;
        if (!del) continue;
        /* one that cannot be deleted does not keep the older ones: the first error is reported */
        qerr why;
        if (delete_checkpoint(v[i].path, &why)) {
            if (rc == 0 && e) *e = why;
            rc = -1;
        } else if (n_deleted) {
            (*n_deleted)++;
        }
    }
    free(v);
    return rc;
}

int ckpt_clean_stale(const char *output_dir, int *n_deleted, qerr *e) {
    if (n_deleted) *n_deleted = 0;
    DIR *d = opendir(output_dir);
    if (!d) return errno == ENOENT ? 0 : qerr_set(e, "cannot list %s: %s", output_dir, strerror(errno));
    struct dirent *de;
    int rc = 0;
    while (rc == 0 && (de = readdir(d))) {
        const char *suf;
        if (parse_ckpt_name(de->d_name, &suf) < 0) continue;
        if (strncmp(suf, ".tmp-", 5) && strncmp(suf, ".old-", 5)) continue;
        char p[4400];
        if (path_join(p, sizeof p, output_dir, de->d_name)) continue;
        if (!strncmp(suf, ".old-", 5) && has_marker(p)) {
            /* A complete checkpoint moved aside for a save of the same step
             * that did not complete: put it back in place of the incomplete one. */
            char base[4400];
            if (path_join(base, sizeof base, output_dir, de->d_name) == 0) {
                base[strlen(base) - strlen(suf)] = 0;
                if (!has_marker(base) && ckpt_remove_tree(base, e) == 0 && rename(p, base) == 0) {
                    if (n_deleted) (*n_deleted)++;
                    continue;
                }
            }
        }
        rc = ckpt_remove_tree(p, e);
        if (rc == 0 && n_deleted) (*n_deleted)++;
    }
    closedir(d);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* fingerprints                                                               */

#define FP_FULL_LIMIT ((int64_t)256 << 20)
#define FP_HEAD ((int64_t)16 << 20)
#define FP_STRIDE ((int64_t)4 << 20)
#define FP_BLOCK ((int64_t)64 << 10)

static int fp_range(int fd, xxh64_state *st, int64_t off, int64_t len, unsigned char *buf, size_t cap,
                    const char *path, qerr *e) {
    while (len > 0) {
        size_t want = len < (int64_t)cap ? (size_t)len : cap;
        ssize_t r = pread(fd, buf, want, (off_t)off);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return qerr_set(e, "cannot read %s: %s", path, strerror(errno));
        if (r == 0) return qerr_set(e, "%s: file shrank while reading it", path);
        xxh64_update(st, buf, (size_t)r);
        off += r;
        len -= r;
    }
    return 0;
}

static int fp_file(const char *path, uint64_t *fp, qerr *e) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return qerr_set(e, "cannot open %s: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb)) {
        close(fd);
        return qerr_set(e, "cannot stat %s: %s", path, strerror(errno));
    }
    int64_t size = (int64_t)sb.st_size;
    size_t cap = 1 << 20;
    unsigned char *buf = malloc(cap);
    if (!buf) {
        close(fd);
        return qerr_set(e, "out of memory");
    }
    xxh64_state st;
    xxh64_init(&st, 0);
    unsigned char le[8];
    for (int i = 0; i < 8; i++) le[i] = (unsigned char)((uint64_t)size >> (8 * i));
    xxh64_update(&st, le, 8);
    int rc;
    if (size <= FP_FULL_LIMIT) {
        rc = fp_range(fd, &st, 0, size, buf, cap, path, e);
    } else {
        rc = fp_range(fd, &st, 0, FP_HEAD, buf, cap, path, e);
        for (int64_t off = FP_HEAD; rc == 0 && off + FP_BLOCK <= size - FP_BLOCK; off += FP_STRIDE)
            rc = fp_range(fd, &st, off, FP_BLOCK, buf, cap, path, e);
        if (rc == 0) rc = fp_range(fd, &st, size - FP_BLOCK, FP_BLOCK, buf, cap, path, e);
    }
    free(buf);
    close(fd);
    if (rc == 0) *fp = xxh64_digest(&st);
    return rc;
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

int ckpt_fingerprint_model(const char *path, uint64_t *fp, qerr *e) {
    struct stat sb;
    if (stat(path, &sb)) return qerr_set(e, "cannot open %s: %s", path, strerror(errno));
    if (!S_ISDIR(sb.st_mode)) return fp_file(path, fp, e);
    DIR *d = opendir(path);
    if (!d) return qerr_set(e, "cannot open %s: %s", path, strerror(errno));
    char **names = NULL;
    int n = 0, cap = 0, rc = 0;
    struct dirent *de;
    while ((de = readdir(d))) {
        if (de->d_name[0] == '.') continue;
        char p[4400];
        if (path_join(p, sizeof p, path, de->d_name)) continue;
        struct stat fsb;
        if (stat(p, &fsb) || !S_ISREG(fsb.st_mode)) continue;
        if (n == cap) {
            cap = cap ? 2 * cap : 16;
            char **nn = realloc(names, (size_t)cap * sizeof *nn);
            if (!nn) {
                rc = qerr_set(e, "out of memory");
                break;
            }
            names = nn;
        }
        if (!(names[n] = strdup(de->d_name))) {
            rc = qerr_set(e, "out of memory");
            break;
        }
        n++;
    }
    closedir(d);
    if (n) qsort(names, (size_t)n, sizeof *names, cmp_str);
    xxh64_state st;
    xxh64_init(&st, 0);
    for (int i = 0; rc == 0 && i < n; i++) {
        char p[4400];
        if (path_join(p, sizeof p, path, names[i])) continue;
        uint64_t h;
        rc = fp_file(p, &h, e);
        xxh64_update(&st, names[i], strlen(names[i]) + 1);
        xxh64_update(&st, &h, sizeof h);
    }
    for (int i = 0; i < n; i++) free(names[i]);
    free(names);
    if (rc == 0) *fp = xxh64_digest(&st);
    return rc;
}

uint64_t ckpt_fingerprint_tokenizer(const gguf_file *f) {
    xxh64_state st;
    xxh64_init(&st, 0);
    for (uint64_t i = 0; i < gguf_n_kv(f); i++) {
        const char *key = gguf_kv_key(f, i);
        if (!key || strncmp(key, "tokenizer.", 10)) continue;
        int32_t type = gguf_kv_type(f, i);
        xxh64_update(&st, key, strlen(key) + 1);
        xxh64_update(&st, &type, sizeof type);
        const char *s;
        size_t len;
        if (type == GGUF_VTYPE_STRING) {
            if (gguf_get_str(f, key, &s, &len, NULL) == 0) {
                uint64_t l = len;
                xxh64_update(&st, &l, sizeof l);
                xxh64_update(&st, s, len);
            }
        } else if (type == GGUF_VTYPE_ARRAY) {
            gguf_vtype et;
            uint64_t cnt;
            if (gguf_get_arr_info(f, key, &et, &cnt, NULL)) continue;
            int32_t et32 = (int32_t)et;
            xxh64_update(&st, &et32, sizeof et32);
            xxh64_update(&st, &cnt, sizeof cnt);
            if (et == GGUF_VTYPE_STRING) {
                for (uint64_t j = 0; j < cnt; j++)
                    if (gguf_get_arr_str(f, key, j, &s, &len, NULL) == 0) {
                        uint64_t l = len;
                        xxh64_update(&st, &l, sizeof l);
                        xxh64_update(&st, s, len);
                    }
            } else if (gguf_vtype_size(et)) {
                const void *data;
                if (gguf_get_arr_data(f, key, &data, NULL) == 0)
                    xxh64_update(&st, data, (size_t)(cnt * gguf_vtype_size(et)));
            }
        } else if (type == GGUF_VTYPE_FLOAT32 || type == GGUF_VTYPE_FLOAT64) {
            float v = 0;
            if (gguf_get_f32(f, key, &v, NULL) == 0) xxh64_update(&st, &v, sizeof v);
        } else if (type == GGUF_VTYPE_BOOL) {
            int b = 0;
            if (gguf_get_bool(f, key, &b, NULL) == 0) xxh64_update(&st, &b, sizeof b);
        } else {
            int64_t v = 0;
            uint64_t u = 0;
            if (gguf_get_i64(f, key, &v, NULL) == 0)
                xxh64_update(&st, &v, sizeof v);
            else if (gguf_get_u64(f, key, &u, NULL) == 0)
                xxh64_update(&st, &u, sizeof u);
        }
    }
    return xxh64_digest(&st);
}
