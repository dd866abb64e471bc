/* tests/test_core.c — the one-source-of-truth helpers of core/: whole-file
 * read, atomic write (whole and streamed: commit, abort, errors), mkdir -p,
 * the string buffer, the monotonic clock and Python's float repr. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/clock.h"
#include "core/file.h"
#include "core/pyrepr.h"
#include "core/strbuf.h"
#include "tests/tmpdir.h"

static int group_setup(void **state) { return tmpdir_setup(state, "qlora_test_core"); }

static int exists(const char *p) { return access(p, F_OK) == 0; }

static void test_write_atomic_and_read(void **state) {
    const tmpdir *t = *state;
    char path[128], tmp[160];
    snprintf(path, sizeof path, "%s/a.bin", t->dir);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    qerr e = {{0}};
    const char data[] = "one\0two"; /* bytes, not a C string */
    assert_int_equal(file_write_atomic(path, data, sizeof data, &e), 0);
    assert_false(exists(tmp));
    size_t n = 0;
    char *got = file_read_all(path, &n, &e);
    assert_non_null(got);
    assert_int_equal(n, sizeof data);
    assert_memory_equal(got, data, sizeof data);
    assert_int_equal(got[n], 0); /* NUL after the last byte */
    free(got);
    /* replaced whole, also by an empty file */
    assert_int_equal(file_write_atomic(path, NULL, 0, &e), 0);
    got = file_read_all(path, &n, &e);
    assert_non_null(got);
    assert_int_equal(n, 0);
    free(got);
    /* errors */
    assert_int_equal(file_write_atomic("/nonexistent/dir/x", "x", 1, &e), -1);
    assert_non_null(strstr(e.msg, "cannot create /nonexistent/dir/x.tmp"));
    assert_null(file_read_all("/nonexistent/x", NULL, &e));
    assert_non_null(strstr(e.msg, "/nonexistent/x: cannot open"));
}

static void test_atomic_stream(void **state) {
    const tmpdir *t = *state;
    char path[128], tmp[160];
    snprintf(path, sizeof path, "%s/s.bin", t->dir);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    qerr e = {{0}};
    assert_int_equal(file_write_atomic(path, "old", 3, &e), 0);
    /* abort: the old file stays, the temporary goes */
    file_atomic w;
    assert_int_equal(file_atomic_begin(&w, path, &e), 0);
    assert_true(exists(tmp));
    assert_int_equal(file_atomic_write(&w, "new!", 4, &e), 0);
    file_atomic_abort(&w);
    assert_false(exists(tmp));
    size_t n = 0;
    char *got = file_read_all(path, &n, &e);
    assert_non_null(got);
    assert_string_equal(got, "old");
    free(got);
    /* until commit a reader sees the old file; after it, all pieces in order */
    assert_int_equal(file_atomic_begin(&w, path, &e), 0);
    static char big[1 << 20];
    for (size_t i = 0; i < sizeof big; i++) big[i] = (char)(i * 7);
    assert_int_equal(file_atomic_write(&w, "head", 4, &e), 0);
    assert_int_equal(file_write_fd_all(w.fd, big, sizeof big), 0);
    got = file_read_all(path, &n, &e);
    assert_string_equal(got, "old");
    free(got);
    assert_int_equal(file_atomic_commit(&w, &e), 0);
    assert_false(exists(tmp));
    got = file_read_all(path, &n, &e);
    assert_non_null(got);
    assert_int_equal(n, 4 + sizeof big);
    assert_memory_equal(got, "head", 4);
    assert_memory_equal(got + 4, big, sizeof big);
    free(got);
    /* a commit that cannot rename (the target is a non-empty directory) leaves no temporary */
    char d[128], f[200];
    snprintf(d, sizeof d, "%s/dir", t->dir);
    snprintf(f, sizeof f, "%s/dir/f", t->dir);
    assert_int_equal(file_mkdir_p(d, &e), 0);
    assert_int_equal(file_write_atomic(f, "x", 1, &e), 0);
    assert_int_equal(file_atomic_begin(&w, d, &e), 0);
    assert_int_equal(file_atomic_write(&w, "x", 1, &e), 0);
    assert_int_equal(file_atomic_commit(&w, &e), -1);
    assert_non_null(strstr(e.msg, "cannot rename"));
    snprintf(tmp, sizeof tmp, "%s.tmp", d);
    assert_false(exists(tmp));
}

static void test_mkdir_p(void **state) {
    const tmpdir *t = *state;
    char p[160];
    qerr e = {{0}};
    snprintf(p, sizeof p, "%s/a/b/c", t->dir);
    assert_int_equal(file_mkdir_p(p, &e), 0);
    struct stat st;
    assert_int_equal(stat(p, &st), 0);
    assert_true(S_ISDIR(st.st_mode));
    assert_int_equal(file_mkdir_p(p, &e), 0); /* existing: fine */
    assert_int_equal(file_mkdir_p("", &e), -1);
    assert_non_null(strstr(e.msg, "invalid path"));
    snprintf(p, sizeof p, "%s/file", t->dir);
    assert_int_equal(file_write_atomic(p, "x", 1, &e), 0);
    snprintf(p, sizeof p, "%s/file/sub", t->dir);
    assert_int_equal(file_mkdir_p(p, &e), -1);
    assert_non_null(strstr(e.msg, "cannot create"));
}

static void test_strbuf(void **state) {
    (void)state;
    strbuf b = {0};
    strbuf_puts(&b, "");
    assert_non_null(b.p); /* an empty buffer still holds a string */
    assert_string_equal(b.p, "");
    for (int i = 0; i < 1000; i++) strbuf_printf(&b, "%d,", i);
    strbuf_put(&b, "\0x", 2);
    assert_false(b.oom);
    assert_int_equal(b.n, strlen(b.p) + 2);
    assert_int_equal(strncmp(b.p, "0,1,2,", 6), 0);
    assert_int_equal(b.p[b.n], 0);
    size_t cap = b.cap;
    strbuf_clear(&b);
    assert_int_equal(b.n, 0);
    assert_string_equal(b.p, "");
    assert_int_equal(b.cap, cap); /* keeps its memory */
    strbuf_puts(&b, "again");
    assert_string_equal(b.p, "again");
    free(b.p);
}

static void test_clock_and_repr(void **state) {
    (void)state;
    double a = clock_now_sec(), c = clock_now_sec();
    assert_true(c >= a);
    assert_true(proc_peak_rss_mib() > 0);
    char buf[32];
    struct {
        float v;
        const char *s;
    } cases[] = {{0.05f, "0.05"},   {32.0f, "32.0"},       {-0.0f, "-0.0"},      {1e-5f, "1e-05"},
                 {1e16f, "1e+16"},  {0.1f, "0.1"},         {NAN, "NaN"},         {INFINITY, "Infinity"},
                 {-INFINITY, "-Infinity"}, {3.4028235e38f, "3.4028235e+38"}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        py_float_repr(buf, sizeof buf, cases[i].v);
        assert_string_equal(buf, cases[i].s);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_write_atomic_and_read),
        cmocka_unit_test(test_atomic_stream),
        cmocka_unit_test(test_mkdir_p),
        cmocka_unit_test(test_strbuf),
        cmocka_unit_test(test_clock_and_repr),
    };
    return cmocka_run_group_tests(tests, group_setup, tmpdir_teardown);
}
