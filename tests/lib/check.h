/*
 * Minimal test assertions. A failed CHECK prints file:line and the expression and marks the test
 * failed; the test's main() returns check_exit(). Exit codes follow meson: 0 pass, 77 skip,
 * 99 hard error.
 */
#ifndef WP_CHECK_H
#define WP_CHECK_H

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern int check_failures;
extern const char *check_current;

#define CHECK(expr)                                                                                \
        do {                                                                                       \
                if (!(expr)) {                                                                     \
                        fprintf(stderr, "%s:%d: %s: CHECK failed: %s\n", __FILE__, __LINE__,       \
                                check_current ? check_current : "?", #expr);                       \
                        check_failures++;                                                          \
                }                                                                                  \
        } while (0)

/* Like CHECK but stops the current test function (returns). */
#define REQUIRE(expr)                                                                              \
        do {                                                                                       \
                if (!(expr)) {                                                                     \
                        fprintf(stderr, "%s:%d: %s: REQUIRE failed: %s\n", __FILE__, __LINE__,     \
                                check_current ? check_current : "?", #expr);                       \
                        check_failures++;                                                          \
                        return;                                                                    \
                }                                                                                  \
        } while (0)

#define CHECK_INT_EQ(a, b)                                                                         \
        do {                                                                                       \
                long long _a = (long long)(a), _b = (long long)(b);                                \
                if (_a != _b) {                                                                    \
                        fprintf(stderr, "%s:%d: %s: CHECK failed: %s == %s (%lld != %lld)\n",      \
                                __FILE__, __LINE__, check_current ? check_current : "?", #a, #b,   \
                                _a, _b);                                                           \
                        check_failures++;                                                          \
                }                                                                                  \
        } while (0)

#define CHECK_STR_EQ(a, b)                                                                         \
        do {                                                                                       \
                const char *_a = (a), *_b = (b);                                                   \
                if (!_a || !_b || strcmp(_a, _b) != 0) {                                           \
                        fprintf(stderr, "%s:%d: %s: CHECK failed: %s == %s (\"%s\" != \"%s\")\n",  \
                                __FILE__, __LINE__, check_current ? check_current : "?", #a, #b,   \
                                _a ? _a : "(null)", _b ? _b : "(null)");                           \
                        check_failures++;                                                          \
                }                                                                                  \
        } while (0)

/* Runs one test function, naming it in failure output. */
#define RUN(fn)                                                                                    \
        do {                                                                                       \
                check_current = #fn;                                                               \
                int _before = check_failures;                                                      \
                fn();                                                                              \
                fprintf(stderr, "%s %s\n", check_failures == _before ? "ok  " : "FAIL", #fn);      \
                check_current = NULL;                                                              \
        } while (0)

static inline int check_exit(void)
{
        return check_failures ? 1 : 0;
}

/*
 * failalloc: runs body() with allocation k failing, for k = 1, 2, ... until a run completes
 * without the injected failure firing (every allocation on the path has been failed once).
 * body must clean up after itself and return 0 on success or a negative errno on the injected
 * failure; anything else (crash, leak under ASan, wrong return) fails the test.
 * Returns the number of allocation points exercised.
 */
unsigned check_failalloc_run(int (*body)(void *arg), void *arg);

/* Reads a file relative to the source tree's tests/ directory (env WP_TEST_SRCDIR, set by meson).
 * Aborts the test (exit 99) when missing. Caller frees with free(). */
char *check_read_test_file(const char *relpath, size_t *ret_len);

/*
 * Test PKI: mints tests/tools/mkpki.py's certificates once into a fresh temporary directory
 * (exit 99 on failure) and returns its path; check_pki_cleanup() removes it.
 */
const char *check_pki_dir(const char *tag);
void check_pki_cleanup(void);

#endif
