/*
 * A small C API over the RE2 C++ library, for Envoy's safe_regex (RegexMatcher with the
 * google_re2 engine): compile once at config time, then full match and global replace on the
 * data path.
 *
 * Our code allocates nothing per match or replace: results go to caller buffers. RE2 itself
 * may allocate internally (its DFA cache grows up to a per-regex budget; capture extraction for
 * rewrites uses small scratch arrays). RE2's allocations do not go through wp_malloc.
 *
 * Compiled regexes are immutable and safe to share between threads.
 */
#ifndef WP_RE2_SHIM_H
#define WP_RE2_SHIM_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

struct wp_re2;

/* Longest pattern accepted (bytes). */
#define WP_RE2_MAX_PATTERN 8192

/*
 * Compiles pattern[0..len) with RE2's default options (UTF-8, POSIX syntax off, longest match
 * off), as Envoy does. When max_program_size > 0, a program larger than that is rejected (the
 * check Envoy applies with google_re2.max_program_size or re2.max_program_size.error_level).
 * On success stores the regex in *ret and returns 0. Returns -EINVAL on a syntax error or an
 * oversized program, with a description in errbuf (NUL-terminated, truncated to errlen),
 * -E2BIG when len > WP_RE2_MAX_PATTERN, -ENOMEM.
 */
int wp_re2_new(const char *pattern, size_t len, unsigned max_program_size, struct wp_re2 **ret,
               char *errbuf, size_t errlen);

/* Frees re. NULL-safe; returns NULL. */
struct wp_re2 *wp_re2_free(struct wp_re2 *re);

/* Whether re matches the whole of s[0..len). */
bool wp_re2_full_match(const struct wp_re2 *re, const char *s, size_t len);

/* Number of capturing groups in re. */
int wp_re2_groups(const struct wp_re2 *re);

/*
 * Checks a substitution string for wp_re2_replace_all: backslash escapes are \0..\9 (capture
 * groups, each no higher than the regex's group count) and \\ (a backslash). Returns 0 or
 * -EINVAL with a description in errbuf.
 */
int wp_re2_check_rewrite(const struct wp_re2 *re, const char *rewrite, size_t rlen, char *errbuf,
                         size_t errlen);

/*
 * Replaces every non-overlapping match of re in s[0..len) with rewrite (checked beforehand
 * with wp_re2_check_rewrite), as RE2::GlobalReplace does, writing the result to out[0..cap)
 * with a terminating NUL. Returns the result length (without the NUL), -ENOSPC when it does
 * not fit in cap, -ENOMEM (RE2 ran out of memory).
 */
ssize_t wp_re2_replace_all(const struct wp_re2 *re, const char *s, size_t len, const char *rewrite,
                           size_t rlen, char *out, size_t cap);

#ifdef __cplusplus
}
#endif

#endif
