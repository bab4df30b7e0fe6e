#include "check.h"

#include <errno.h>

#include "waypoint/base/alloc.h"

int check_failures;
const char *check_current;

unsigned check_failalloc_run(int (*body)(void *arg), void *arg)
{
        unsigned long k;

        for (k = 1; k < 100000; k++) {
                wp_alloc_fail_at(k);
                int r = body(arg);
                int fired = wp_alloc_failed();
                wp_alloc_fail_at(0);
                if (!fired) {
                        if (r < 0) {
                                fprintf(stderr, "failalloc: body failed (%d) without injection\n",
                                        r);
                                check_failures++;
                        }
                        return (unsigned)(k - 1);
                }
                if (r >= 0 && r != 0) {
                        fprintf(stderr, "failalloc: odd return %d at k=%lu\n", r, k);
                        check_failures++;
                }
        }
        fprintf(stderr, "failalloc: gave up after %lu points\n", k);
        check_failures++;
        return (unsigned)k;
}

char *check_read_test_file(const char *relpath, size_t *ret_len)
{
        const char *dir = getenv("WP_TEST_SRCDIR");
        char path[4096];
        FILE *f;
        char *buf;
        long n;

        snprintf(path, sizeof(path), "%s/%s", dir ? dir : "tests", relpath);
        f = fopen(path, "rb");
        if (!f) {
                fprintf(stderr, "cannot open %s: %s\n", path, strerror(errno));
                exit(99);
        }
        fseek(f, 0, SEEK_END);
        n = ftell(f);
        fseek(f, 0, SEEK_SET);
        buf = malloc((size_t)n + 1);
        if (!buf || fread(buf, 1, (size_t)n, f) != (size_t)n)
                exit(99);
        buf[n] = 0;
        fclose(f);
        if (ret_len)
                *ret_len = (size_t)n;
        return buf;
}

static char pki_dir[256];

const char *check_pki_dir(const char *tag)
{
        const char *src = getenv("WP_TEST_SRCDIR");
        char cmd[1024];

        if (pki_dir[0])
                return pki_dir;
        snprintf(pki_dir, sizeof(pki_dir), "/tmp/wp-test-%s-XXXXXX", tag);
        if (!mkdtemp(pki_dir)) {
                perror("mkdtemp");
                exit(99);
        }
        snprintf(cmd, sizeof(cmd), "/usr/bin/python3 '%s/tools/mkpki.py' '%s' >&2",
                 src ? src : "tests", pki_dir);
        if (system(cmd) != 0) {
                fprintf(stderr, "mkpki.py failed\n");
                exit(99);
        }
        return pki_dir;
}

void check_pki_cleanup(void)
{
        char cmd[512];

        if (!pki_dir[0])
                return;
        snprintf(cmd, sizeof(cmd), "rm -rf '%s'", pki_dir);
        if (system(cmd) != 0)
                fprintf(stderr, "cannot remove %s\n", pki_dir);
        pki_dir[0] = 0;
}
