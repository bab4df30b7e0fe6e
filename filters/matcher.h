/*
 * Envoy's string and header matchers, shared by the router (RouteMatch.headers,
 * query_parameters) and RBAC (header, url_path, principal names, filter_state, metadata):
 *   envoy.type.matcher.v3.StringMatcher   exact / prefix / suffix / contains / safe_regex,
 *                                         ignore_case
 *   envoy.type.matcher.v3.RegexMatcher    RE2 full match (waypoint/base/re2_shim.h), with a
 *                                         program size limit (google_re2.max_program_size
 *                                         when set, else WP_MATCH_RE2_MAX_PROGRAM_SIZE)
 *   envoy.config.route.v3.HeaderMatcher   legacy *_match fields, string_match, present_match,
 *                                         range_match, invert_match,
 *                                         treat_missing_header_as_empty
 *
 * Compile (config time): the caller supplies a struct wp_match_cc: an allocator whose memory
 * lives as long as the compiled matchers (both callers carve them from an arena), a list the
 * compiled regexes are chained onto (free it with wp_match_regexes_free), and an error
 * callback. Errors are reported as a struct wp_match_error (a code plus the fields involved)
 * so that each caller words them in its own style; the callback returns the value compile
 * then returns (normally e->err).
 *
 * Match (data path): allocates nothing. A header that appears several times is matched on
 * its values joined with ',' (Envoy's getAllOfHeaderAsString) in a caller buffer.
 * Pseudo-headers :method, :path, :authority and :scheme come from the request head; any other
 * name starting with ':' is absent. Semantics of an absent header (Envoy): it matches only
 * "present_match: false", or "present_match: true" with invert_match; with
 * treat_missing_header_as_empty it is matched as the empty value instead. An empty legacy
 * exact_match matches any value (Envoy).
 */
#ifndef FLT_MATCHER_H
#define FLT_MATCHER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "envoy/config/route/v3/route_components.pb-c.h"
#include "envoy/type/matcher/v3/regex.pb-c.h"
#include "envoy/type/matcher/v3/string.pb-c.h"
#include "waypoint/base/http.h"

/* The value Istio's bootstrap gives re2.max_program_size.error_level (Envoy's default: 100). */
#define WP_MATCH_RE2_MAX_PROGRAM_SIZE 32768

enum wp_strmatch_kind {
        WP_STRMATCH_EXACT,
        WP_STRMATCH_PREFIX,
        WP_STRMATCH_SUFFIX,
        WP_STRMATCH_CONTAINS,
        WP_STRMATCH_REGEX,
};

/* A compiled StringMatcher. */
struct wp_strmatch {
        uint8_t kind;     /* enum wp_strmatch_kind */
        bool ignore_case; /* s is lower case */
        uint32_t len;
        const char *s; /* NUL-terminated; NULL for REGEX */
        struct wp_re2 *re;
};

enum wp_hdrmatch_kind {
        WP_HDRMATCH_STRING,    /* sm */
        WP_HDRMATCH_ANY_VALUE, /* legacy exact_match "" */
        WP_HDRMATCH_RANGE,     /* [start, end) on the value as an integer */
        WP_HDRMATCH_PRESENT,   /* present */
};

enum {
        WP_HDR_PSEUDO_NONE,
        WP_HDR_METHOD,
        WP_HDR_PATH,
        WP_HDR_AUTHORITY,
        WP_HDR_SCHEME,
        WP_HDR_OTHER
};

/* A compiled HeaderMatcher. */
struct wp_hdrmatch {
        const char *name; /* lower case */
        uint32_t name_len;
        uint8_t kind;   /* enum wp_hdrmatch_kind */
        uint8_t pseudo; /* WP_HDR_* */
        bool present;   /* WP_HDRMATCH_PRESENT: present_match */
        bool invert;
        bool missing_as_empty;
        struct wp_strmatch sm;
        int64_t start, end;
};

/* Compiled regexes, chained for freeing. */
struct wp_match_regex {
        struct wp_match_regex *next;
        struct wp_re2 *re;
};

enum wp_match_errcode {
        WP_MATCH_E_NOMEM,          /* -ENOMEM */
        WP_MATCH_E_UNKNOWN_FIELD,  /* a message carries fields our proto subset does not know:
                                      tag, message (descriptor name) */
        WP_MATCH_E_NO_PATTERN,     /* StringMatcher without a match pattern */
        WP_MATCH_E_CUSTOM,         /* StringMatcher custom (field "custom") */
        WP_MATCH_E_EMPTY,          /* field (prefix, suffix, contains) must not be empty */
        WP_MATCH_E_EMPTY_LEGACY,   /* field (prefix_match...) must not be empty */
        WP_MATCH_E_TOO_LONG,       /* field longer than cc->max_string (-E2BIG) */
        WP_MATCH_E_REGEX_ICASE,    /* ignore_case with safe_regex */
        WP_MATCH_E_REGEX,          /* field (safe_regex...) does not compile: detail, pattern */
        WP_MATCH_E_REGEX_TOO_LONG, /* field: pattern longer than WP_RE2_MAX_PATTERN (-E2BIG) */
        WP_MATCH_E_NAME_EMPTY,     /* HeaderMatcher without a name */
        WP_MATCH_E_NAME_INVALID,   /* HeaderMatcher name not a header name: pattern = the name */
        WP_MATCH_E_RANGE,          /* range_match start >= end (with WP_MATCH_REJECT_EMPTY_RANGE) */
};

struct wp_match_error {
        int err; /* -EINVAL, -E2BIG, -ENOMEM */
        enum wp_match_errcode code;
        const char *where;   /* sub-message of the one compiled ("" or "string_match") */
        const char *field;   /* the offending field in where, or "" */
        const char *detail;  /* WP_MATCH_E_REGEX: RE2's message */
        const char *pattern; /* the regex, or the header name */
        unsigned tag;        /* WP_MATCH_E_UNKNOWN_FIELD */
        const char *message; /* WP_MATCH_E_UNKNOWN_FIELD */
};

/* wp_match_cc.flags */
enum {
        WP_MATCH_HOST_IS_AUTHORITY = 1u << 0,  /* header "host" reads :authority */
        WP_MATCH_REJECT_EMPTY_RANGE = 1u << 1, /* range_match with start >= end is an error */
};

/* What compile needs from its caller. */
struct wp_match_cc {
        void *(*alloc)(void *user, size_t n); /* zeroed, 16-aligned; NULL: out of memory */
        int (*fail)(void *user, const struct wp_match_error *e);
        void *user;
        struct wp_match_regex **regexes; /* compiled regexes are pushed here */
        uint32_t max_string;             /* longest string copied (0: no limit) */
        unsigned flags;                  /* WP_MATCH_* */
};

/* Compiles m into *out. Returns 0 or what cc->fail returned. */
int wp_strmatch_compile(const struct wp_match_cc *cc,
                        const Envoy__Type__Matcher__V3__StringMatcher *m, struct wp_strmatch *out);

/* Compiles h into *out. Returns 0 or what cc->fail returned. */
int wp_hdrmatch_compile(const struct wp_match_cc *cc,
                        const Envoy__Config__Route__V3__HeaderMatcher *h, struct wp_hdrmatch *out);

/* Compiles a RegexMatcher (field names it in errors, e.g. "safe_regex") into *ret. */
int wp_match_regex_compile(const struct wp_match_cc *cc,
                           const Envoy__Type__Matcher__V3__RegexMatcher *rm, const char *field,
                           struct wp_re2 **ret);

/* Whether s[0..n) is a header name: an RFC 9110 token, optionally after a leading ':'. */
bool wp_match_header_name_valid(const char *s, size_t n);

/* Frees a chain of compiled regexes (not the nodes: they are the caller's arena's). */
void wp_match_regexes_free(struct wp_match_regex *list);

/* Whether v[0..n) matches m. */
bool wp_strmatch_match(const struct wp_strmatch *m, const char *v, size_t n);

/*
 * The value of h's header in req (NULL: no request, every header absent). Returns 1 with the
 * value in v and n (pointing into req or buf), 0 when absent, or -ENOSPC when several values
 * joined need more than cap bytes (n is then the size needed).
 */
int wp_hdrmatch_value(const struct wp_hdrmatch *h, const struct wp_http_request *req, char *buf,
                      size_t cap, const char **v, size_t *n);

/* Whether h accepts a header found (present) with value v[0..n), or absent (!present). */
bool wp_hdrmatch_accepts(const struct wp_hdrmatch *h, bool present, const char *v, size_t n);

/* wp_hdrmatch_value then wp_hdrmatch_accepts: 1 or 0, or -ENOSPC as wp_hdrmatch_value. */
int wp_hdrmatch_match(const struct wp_hdrmatch *h, const struct wp_http_request *req, char *buf,
                      size_t cap);

#endif
