/*
 * Allocation wrappers. Every allocation in our libraries goes through these so that tests can fail
 * allocation N in turn (failalloc, as nghttp2's TEST_FAILMALLOC_RUN) and walk every goto ladder.
 *
 * wp_malloc/wp_calloc/wp_realloc return NULL on failure (sizes the peer chooses; callers handle it).
 * wp_xmalloc/wp_xcalloc abort on failure (small fixed-size allocations only).
 * wp_mem_* have the signatures of nghttp2_mem's hooks (user data last), so modules that embed
 * nghttp2 route its allocations through the same counter without base including nghttp2.
 * OpenSSL's own allocations are not routed (they are outside failalloc's reach).
 */
#ifndef WP_ALLOC_H
#define WP_ALLOC_H

#include <stddef.h>

void *wp_malloc(size_t n) __attribute__((warn_unused_result));
void *wp_calloc(size_t nmemb, size_t n) __attribute__((warn_unused_result));
void *wp_realloc(void *p, size_t n) __attribute__((warn_unused_result));
char *wp_strdup(const char *s) __attribute__((warn_unused_result));
char *wp_strndup(const char *s, size_t n) __attribute__((warn_unused_result));
void wp_free(void *p);
void *wp_xmalloc(size_t n);
void *wp_xcalloc(size_t nmemb, size_t n);

void *wp_mem_malloc(size_t n, void *user);
void wp_mem_free(void *p, void *user);
void *wp_mem_calloc(size_t nmemb, size_t n, void *user);
void *wp_mem_realloc(void *p, size_t n, void *user);

/* Test hook: when n > 0, the n-th allocation from now (this thread) fails, and later ones succeed.
 * 0 disables. wp_alloc_failed() tells whether the injected failure has fired. */
void wp_alloc_fail_at(unsigned long n);
int wp_alloc_failed(void);

#endif
