/*
 * X.509 and SPIFFE helpers. wp_spiffe_parse() is pure (no OpenSSL): it accepts exactly
 * spiffe://<td>/ns/<ns>/sa/<sa> (as ztunnel's Identity::from_str), rejecting empty segments,
 * extra segments, a trailing '/', query/fragment, and oversized fields.
 */
#ifndef WP_X509_H
#define WP_X509_H

#include <stddef.h>

#define WP_SPIFFE_TD_MAX 255
#define WP_SPIFFE_SEG_MAX 253

struct wp_spiffe_id {
        char td[WP_SPIFFE_TD_MAX + 1];
        char ns[WP_SPIFFE_SEG_MAX + 1];
        char sa[WP_SPIFFE_SEG_MAX + 1];
};

/* Returns 0 or -EINVAL. */
int wp_spiffe_parse(const char *uri, size_t len, struct wp_spiffe_id *ret);

/* Extracts the single spiffe:// URI SAN of a certificate (an X509 *, as void * to keep OpenSSL
 * out of callers' includes) into out. Returns 0, -ENOENT (none), -EINVAL (more than one URI SAN,
 * or not a valid SPIFFE id), -ENOSPC. */
int wp_x509_spiffe_uri(const void *x509, char *out, size_t cap);

/* Reads a whole file into a NUL-terminated heap buffer (wp_malloc). Returns 0 or -errno.
 * max bounds the size (-EFBIG beyond it). */
int wp_read_file(const char *path, size_t max, char **ret, size_t *ret_len);

#endif
