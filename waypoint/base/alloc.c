#include "waypoint/base/alloc.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Per-thread failure injection: countdown to the allocation that fails. */
static __thread unsigned long fail_countdown;
static __thread int fail_fired;

void wp_alloc_fail_at(unsigned long n)
{
        fail_countdown = n;
        fail_fired = 0;
}

int wp_alloc_failed(void)
{
        return fail_fired;
}

static int should_fail(void)
{
        if (fail_countdown == 0)
                return 0;
        if (--fail_countdown == 0) {
                fail_fired = 1;
                return 1;
        }
        return 0;
}

void *wp_malloc(size_t n)
{
        if (should_fail())
                return NULL;
        return malloc(n ? n : 1);
}

void *wp_calloc(size_t nmemb, size_t n)
{
        if (should_fail())
                return NULL;
        return calloc(nmemb ? nmemb : 1, n ? n : 1);
}

void *wp_realloc(void *p, size_t n)
{
        if (should_fail())
                return NULL;
        return realloc(p, n ? n : 1);
}

char *wp_strdup(const char *s)
{
        return wp_strndup(s, strlen(s));
}

char *wp_strndup(const char *s, size_t n)
{
        char *d = wp_malloc(n + 1);

        if (!d)
                return NULL;
        memcpy(d, s, n);
        d[n] = 0;
        return d;
}

void wp_free(void *p)
{
        free(p);
}

void *wp_xmalloc(size_t n)
{
        void *p = malloc(n ? n : 1);

        if (!p) {
                fputs("out of memory\n", stderr);
                abort();
        }
        return p;
}

void *wp_xcalloc(size_t nmemb, size_t n)
{
        void *p = calloc(nmemb ? nmemb : 1, n ? n : 1);

        if (!p) {
                fputs("out of memory\n", stderr);
                abort();
        }
        return p;
}

void *wp_mem_malloc(size_t n, void *user)
{
        return wp_malloc(n);
}

void wp_mem_free(void *p, void *user)
{
        wp_free(p);
}

void *wp_mem_calloc(size_t nmemb, size_t n, void *user)
{
        return wp_calloc(nmemb, n);
}

void *wp_mem_realloc(void *p, size_t n, void *user)
{
        return wp_realloc(p, n);
}
