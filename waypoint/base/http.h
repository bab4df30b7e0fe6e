/*
 * HTTP message types shared by the codecs (waypoint/http1.c, the h2 inner codec), the router
 * (waypoint/router.c) and the filters (filters/): a header list and the request/response
 * heads. Names are stored lower-case (HTTP/2 form; the HTTP/1.1 codec folds them), values
 * as received (validated by the codec: no CTL, no CR/LF, no NUL). Pseudo-headers are not in
 * the list: they are the fields of wp_http_request / wp_http_response.
 *
 * Strings are NUL-terminated as well as length-counted.
 *
 * Memory: the strings belong to whoever filled the list (usually the stream's arena); the list
 * itself grows with wp_headers_add (wp_realloc) and is freed with wp_headers_done.
 */
#ifndef WP_HTTP_H
#define WP_HTTP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct wp_header {
        const char *name; /* lower case */
        const char *value;
        uint32_t name_len, value_len;
};

struct wp_headers {
        struct wp_header *v;
        uint32_t n, cap;
        size_t bytes; /* sum of name + value lengths (for limits) */
};

enum wp_http_version { WP_HTTP_10, WP_HTTP_11, WP_HTTP_2 };

struct wp_http_request {
        const char *method;    /* "GET" */
        const char *scheme;    /* "http" (inner traffic is cleartext) */
        const char *authority; /* Host / :authority */
        const char *path;      /* origin-form path and query ("/a?b=c") */
        enum wp_http_version version;
        struct wp_headers headers;
        int64_t content_length; /* -1 when unknown / chunked */
        bool chunked;
        bool upgrade;           /* Upgrade: (websocket) or CONNECT-like */
        bool expect_continue;
};

struct wp_http_response {
        unsigned status;
        enum wp_http_version version;
        struct wp_headers headers;
        int64_t content_length;
        bool chunked;
};

static inline void wp_headers_init(struct wp_headers *h)
{
        h->v = NULL;
        h->n = h->cap = 0;
        h->bytes = 0;
}
/* Appends (name must be lower case). Returns 0 or -ENOMEM. Strings are borrowed. */
int wp_headers_add(struct wp_headers *h, const char *name, uint32_t name_len, const char *value,
                   uint32_t value_len);
/* First value of name (lower case), or NULL. *ret_len (may be NULL) gets its length. */
const char *wp_headers_get(const struct wp_headers *h, const char *name, uint32_t *ret_len);
/* Removes every header called name. Returns how many were removed. */
unsigned wp_headers_remove(struct wp_headers *h, const char *name);
void wp_headers_done(struct wp_headers *h);

#endif
