/*
 * The HTTP router (see router.h): compile an Envoy RouteConfiguration into a route table, and
 * evaluate it per request without allocating.
 *
 * Compiled data lives in one arena owned by the table (strings copied, arrays carved out),
 * plus the RE2 objects, listed in the arena and freed with the table.
 */
#include "waypoint/router.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "filters/matcher.h"
#include "waypoint/base/alloc.h"
#include "waypoint/base/re2_shim.h"

/* ---- arena ---------------------------------------------------------------------------- */

struct ablock {
        struct ablock *next;
        size_t used, cap;
        _Alignas(16) unsigned char data[];
};

#define ABLOCK_SIZE 16384

/* ---- compiled structures --------------------------------------------------------------- */

struct qpm {
        const char *name;
        uint32_t name_len;
        bool has_sm; /* else: present match */
        struct wp_strmatch sm;
};

struct wcluster {
        const char *name; /* NULL with cluster_header */
        uint32_t name_len;
        const char *cluster_header;
        uint32_t weight;
        const char *host_rewrite;
        uint32_t host_rewrite_len;
        struct wp_route_header_ops req_ops, resp_ops;
        struct wp_route_filter_configs fcs;
};

enum { PK_PREFIX, PK_PATH, PK_REGEX, PK_SEP_PREFIX, PK_CONNECT };
enum { CK_NAME, CK_HEADER, CK_WEIGHTED };
enum { HR_NONE, HR_LITERAL, HR_AUTO, HR_HEADER };
enum { RW_NONE, RW_PREFIX, RW_REGEX, RW_PATH /* redirect path_redirect */ };

struct vhost;

struct wp_route {
        const char *name;
        const struct vhost *vh;

        /* match */
        uint8_t path_kind;
        bool case_sensitive;
        bool grpc;
        bool has_runtime_fraction;
        const char *path_s;
        uint32_t path_len;
        struct wp_re2 *path_re;
        uint32_t rf_num, rf_den;
        struct wp_hdrmatch *headers;
        uint32_t n_headers;
        struct qpm *qps;
        uint32_t n_qps;

        enum wp_route_action action;

        /* route action */
        uint8_t cluster_kind;
        const char *cluster; /* CK_NAME: name; CK_HEADER: header name */
        uint32_t cluster_len;
        struct wcluster *wc;
        uint32_t n_wc;
        uint64_t wc_total;
        const char *wc_random_header;
        unsigned cluster_not_found_status;
        uint8_t host_rewrite_kind;
        const char *host_rewrite; /* literal, or header name */
        uint32_t host_rewrite_len;
        bool append_x_forwarded_host;
        uint64_t timeout_ms, idle_timeout_ms, max_grpc_timeout_ms, grpc_timeout_offset_ms;
        uint64_t max_stream_duration_ms;
        bool has_max_grpc_timeout;
        const struct wp_route_retry *retry;
        struct wp_route_hash_policy *hash;
        uint32_t n_hash;
        struct wp_route_mirror *mirrors;
        uint32_t n_mirrors;
        struct wp_route_upgrade *upgrades;
        uint32_t n_upgrades;

        /* path rewrite (route action and redirect) */
        uint8_t rewrite_kind;
        const char *rewrite_s; /* prefix rewrite, regex substitution or path_redirect */
        uint32_t rewrite_len;
        struct wp_re2 *rewrite_re;

        /* redirect */
        const char *scheme_redirect; /* NULL: keep */
        uint32_t scheme_redirect_len;
        const char *host_redirect; /* NULL: keep */
        uint32_t host_redirect_len;
        uint32_t port_redirect; /* 0: none */
        bool strip_query;
        bool path_redirect_has_query;

        /* redirect / direct */
        unsigned status;
        const char *body;
        uint32_t body_len;

        struct wp_route_header_ops req_ops, resp_ops;
        struct wp_route_filter_configs fcs;
};

struct vhost {
        const char *name;
        struct wp_route *routes;
        uint32_t n_routes;
        struct wp_route_header_ops req_ops, resp_ops;
        struct wp_route_filter_configs fcs;
        const struct wp_route_retry *retry;
        uint8_t require_tls;
        bool include_req_attempt, include_resp_attempt;
        struct wp_route tls_redirect; /* used when require_tls asks for https */
};

struct dom {
        const char *s; /* lower case; for wildcards the part without '*' */
        uint32_t len;
        struct vhost *vh;
};

struct wp_route_table {
        struct ablock *arena;
        struct wp_match_regex *res;
        const char *name;
        struct vhost *vhosts;
        uint32_t n_vhosts;
        struct dom *exact; /* open addressing, exact_cap slots (power of two) */
        uint32_t exact_cap, n_exact;
        struct dom *suffix; /* "*.foo.com" as ".foo.com", longest first */
        uint32_t n_suffix;
        struct dom *prefix; /* "foo.*" as "foo.", longest first */
        uint32_t n_prefix;
        struct vhost *star;
        bool ignore_port;
        bool most_specific_wins;
        struct wp_route_header_ops req_ops, resp_ops;
        struct wp_route_filter_configs fcs;
};

/* ---- compile context and errors -------------------------------------------------------- */

static __thread char errbuf[1024];

struct cc {
        struct wp_route_table *t;
        char path[512];
        size_t plen;
        uint32_t n_domains, n_routes;
        uint32_t max_body;
};

static int fail(struct cc *c, int err, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

static int fail(struct cc *c, int err, const char *fmt, ...)
{
        va_list ap;
        int n = snprintf(errbuf, sizeof(errbuf), "%s%s", c->path, c->plen ? ": " : "");

        if (n < 0 || (size_t)n >= sizeof(errbuf))
                return err;
        va_start(ap, fmt);
        vsnprintf(errbuf + n, sizeof(errbuf) - (size_t)n, fmt, ap);
        va_end(ap);
        return err;
}

static int fail_nomem(struct cc *c)
{
        return fail(c, -ENOMEM, "out of memory");
}

/* Appends a path component ("name", or "[3]") and returns the previous length for pop(). */
static size_t push(struct cc *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static size_t push(struct cc *c, const char *fmt, ...)
{
        size_t old = c->plen;
        va_list ap;
        int n;

        if (c->plen && fmt[0] != '[' && c->plen < sizeof(c->path) - 1)
                c->path[c->plen++] = '.';
        va_start(ap, fmt);
        n = vsnprintf(c->path + c->plen, sizeof(c->path) - c->plen, fmt, ap);
        va_end(ap);
        if (n > 0)
                c->plen += (size_t)n;
        if (c->plen >= sizeof(c->path))
                c->plen = sizeof(c->path) - 1;
        c->path[c->plen] = 0;
        return old;
}

static void pop(struct cc *c, size_t old)
{
        c->plen = old;
        c->path[old] = 0;
}

/* ---- arena allocation ----------------------------------------------------------------- */

static void *a_alloc(struct cc *c, size_t n)
{
        struct wp_route_table *t = c->t;
        struct ablock *b = t->arena;
        void *p;

        n = (n + 15) & ~(size_t)15;
        if (n == 0)
                n = 16;
        if (!b || b->cap - b->used < n) {
                size_t cap = n > ABLOCK_SIZE ? n : ABLOCK_SIZE;

                b = wp_malloc(sizeof(*b) + cap);
                if (!b)
                        return NULL;
                b->used = 0;
                b->cap = cap;
                if (t->arena && n > ABLOCK_SIZE) {
                        /* keep filling the current block: put the big one behind it */
                        b->next = t->arena->next;
                        t->arena->next = b;
                } else {
                        b->next = t->arena;
                        t->arena = b;
                }
        }
        p = b->data + b->used;
        b->used += n;
        memset(p, 0, n);
        return p;
}

static void *a_array(struct cc *c, size_t n, size_t size)
{
        if (n && size > SIZE_MAX / n)
                return NULL;
        return a_alloc(c, n * size);
}

static char *a_strndup(struct cc *c, const char *s, size_t n)
{
        char *p = a_alloc(c, n + 1);

        if (!p)
                return NULL;
        memcpy(p, s, n);
        p[n] = 0;
        return p;
}

static char lower(char ch)
{
        return (ch >= 'A' && ch <= 'Z') ? (char)(ch + 32) : ch;
}

static char *a_strlower(struct cc *c, const char *s, size_t n)
{
        char *p = a_strndup(c, s, n);

        if (p)
                for (size_t i = 0; i < n; i++)
                        p[i] = lower(p[i]);
        return p;
}

/* Copies s into the arena (checked against WP_ROUTE_MAX_STRING); field names it in errors. */
static int copy_str(struct cc *c, const char *field, const char *s, bool lc, const char **ret,
                    uint32_t *ret_len)
{
        size_t n = strlen(s);
        char *p;

        if (n > WP_ROUTE_MAX_STRING)
                return fail(c, -E2BIG, "%s: longer than %u bytes", field, WP_ROUTE_MAX_STRING);
        p = lc ? a_strlower(c, s, n) : a_strndup(c, s, n);
        if (!p)
                return fail_nomem(c);
        *ret = p;
        if (ret_len)
                *ret_len = (uint32_t)n;
        return 0;
}

/* ---- shared matchers (filters/matcher.h), with this module's arena and error wording ---- */

static void *m_alloc(void *user, size_t n)
{
        return a_alloc(user, n);
}

static int m_fail(void *user, const struct wp_match_error *e)
{
        struct cc *c = user;
        size_t old = c->plen;
        int r;

        if (e->where[0])
                push(c, "%s", e->where);
        switch (e->code) {
        case WP_MATCH_E_NOMEM:
                r = fail_nomem(c);
                break;
        case WP_MATCH_E_UNKNOWN_FIELD:
                r = fail(c, e->err, "field number %u of %s is not supported", e->tag, e->message);
                break;
        case WP_MATCH_E_NO_PATTERN:
                r = fail(c, e->err,
                         "match_pattern: one of exact, prefix, suffix, contains or safe_regex is "
                         "required");
                break;
        case WP_MATCH_E_CUSTOM:
                r = fail(c, e->err, "custom: custom string matchers are not supported");
                break;
        case WP_MATCH_E_EMPTY:
        case WP_MATCH_E_EMPTY_LEGACY:
                r = fail(c, e->err, "%s: must not be empty", e->field);
                break;
        case WP_MATCH_E_TOO_LONG:
                r = fail(c, e->err, "%s: longer than %u bytes", e->field, WP_ROUTE_MAX_STRING);
                break;
        case WP_MATCH_E_REGEX_ICASE:
                r = fail(c, e->err, "ignore_case: has no effect with safe_regex");
                break;
        case WP_MATCH_E_REGEX:
                push(c, "%s", e->field);
                r = fail(c, e->err, "invalid regex: %s: %s", e->detail, e->pattern);
                break;
        case WP_MATCH_E_REGEX_TOO_LONG:
                push(c, "%s", e->field);
                r = fail(c, e->err, "regex longer than %u bytes", WP_RE2_MAX_PATTERN);
                break;
        case WP_MATCH_E_NAME_EMPTY:
        case WP_MATCH_E_NAME_INVALID:
                r = fail(c, e->err, "name: invalid header name \"%s\"", e->pattern);
                break;
        case WP_MATCH_E_RANGE:
                r = fail(c, e->err, "range_match: start must be below end");
                break;
        default:
                r = fail(c, e->err, "invalid matcher");
                break;
        }
        pop(c, old);
        return r;
}

static struct wp_match_cc mcc(struct cc *c)
{
        return (struct wp_match_cc){.alloc = m_alloc,
                                    .fail = m_fail,
                                    .user = c,
                                    .regexes = &c->t->res,
                                    .max_string = WP_ROUTE_MAX_STRING,
                                    .flags = WP_MATCH_HOST_IS_AUTHORITY |
                                             WP_MATCH_REJECT_EMPTY_RANGE};
}

/* A RegexMatcher at field (a path component, e.g. "safe_regex"). */
static int compile_regex(struct cc *c, const Envoy__Type__Matcher__V3__RegexMatcher *rm,
                         const char *field, struct wp_re2 **ret)
{
        struct wp_match_cc m = mcc(c);

        return wp_match_regex_compile(&m, rm, field, ret);
}

/* ---- unknown fields --------------------------------------------------------------------- */

/* Rejects any message in the tree that carries fields our proto subset does not know. */
static int check_unknown(struct cc *c, const ProtobufCMessage *m, unsigned depth)
{
        const ProtobufCMessageDescriptor *d = m->descriptor;
        const char *base = (const char *)m;

        if (m->n_unknown_fields)
                return fail(c, -EINVAL, "field number %u of %s is not supported",
                            m->unknown_fields[0].tag, d->name);
        if (depth > 64)
                return fail(c, -E2BIG, "messages nested too deeply");
        for (unsigned i = 0; i < d->n_fields; i++) {
                const ProtobufCFieldDescriptor *f = &d->fields[i];
                size_t old;
                int r;

                if (f->type != PROTOBUF_C_TYPE_MESSAGE)
                        continue;
                if (f->label == PROTOBUF_C_LABEL_REPEATED) {
                        size_t n = *(const size_t *)(base + f->quantifier_offset);
                        ProtobufCMessage *const *arr =
                            *(ProtobufCMessage *const *const *)(base + f->offset);

                        for (size_t j = 0; j < n; j++) {
                                if (!arr[j])
                                        continue;
                                old = push(c, "%s[%zu]", f->name, j);
                                r = check_unknown(c, arr[j], depth + 1);
                                pop(c, old);
                                if (r < 0)
                                        return r;
                        }
                        continue;
                }
                if ((f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) &&
                    *(const uint32_t *)(base + f->quantifier_offset) != f->id)
                        continue;
                const ProtobufCMessage *sub = *(ProtobufCMessage *const *)(base + f->offset);
                if (!sub)
                        continue;
                old = push(c, "%s", f->name);
                r = check_unknown(c, sub, depth + 1);
                pop(c, old);
                if (r < 0)
                        return r;
        }
        return 0;
}

/* ---- small compilers -------------------------------------------------------------------- */

static int duration_ms(struct cc *c, const char *field, const Google__Protobuf__Duration *d,
                       uint64_t *ret)
{
        if (d->seconds < 0 || d->nanos < 0 || d->nanos > 999999999 || d->seconds > 315576000000LL)
                return fail(c, -EINVAL, "%s: invalid duration", field);
        uint64_t ms = (uint64_t)d->seconds * 1000u + (uint64_t)d->nanos / 1000000u;
        if (ms == 0 && d->nanos > 0)
                ms = 1; /* a sub-millisecond duration is not "disabled" */
        *ret = ms;
        return 0;
}

static int compile_qpm(struct cc *c, const Envoy__Config__Route__V3__QueryParameterMatcher *q,
                       struct qpm *out)
{
        size_t old;
        int r;

        if (!q->name[0])
                return fail(c, -EINVAL, "name: must not be empty");
        r = copy_str(c, "name", q->name, false, &out->name, &out->name_len);
        if (r < 0)
                return r;
        if (q->query_parameter_match_specifier_case ==
            ENVOY__CONFIG__ROUTE__V3__QUERY_PARAMETER_MATCHER__QUERY_PARAMETER_MATCH_SPECIFIER_STRING_MATCH) {
                struct wp_match_cc m = mcc(c);

                out->has_sm = true;
                old = push(c, "string_match");
                r = wp_strmatch_compile(&m, q->string_match, &out->sm);
                pop(c, old);
                return r;
        }
        return 0; /* present_match (either value) or nothing: the parameter must be present */
}

/* Header value from the config: "%%" is a literal '%', any other formatter is rejected. */
static int header_value(struct cc *c, const char *v, size_t n, const char **ret, uint32_t *ret_len)
{
        char *p;
        size_t k = 0;

        if (n > WP_ROUTE_MAX_STRING)
                return fail(c, -E2BIG, "header.value: longer than %u bytes", WP_ROUTE_MAX_STRING);
        p = a_alloc(c, n + 1);
        if (!p)
                return fail_nomem(c);
        for (size_t i = 0; i < n; i++) {
                unsigned char ch = (unsigned char)v[i];

                if (ch == 0 || ch == '\r' || ch == '\n')
                        return fail(c, -EINVAL, "header.value: invalid character 0x%02x", ch);
                if (ch == '%') {
                        if (i + 1 < n && v[i + 1] == '%') {
                                p[k++] = '%';
                                i++;
                                continue;
                        }
                        return fail(c, -EINVAL,
                                    "header.value: header formatters (%%...%%) are not "
                                    "supported: %s",
                                    v);
                }
                p[k++] = (char)ch;
        }
        p[k] = 0;
        *ret = p;
        *ret_len = (uint32_t)k;
        return 0;
}

static bool modifiable_header(const char *lc)
{
        return lc[0] != ':' && strcmp(lc, "host") != 0;
}

static int compile_header_ops(struct cc *c, const char *add_field,
                              Envoy__Config__Core__V3__HeaderValueOption *const *adds, size_t n_add,
                              const char *rm_field, char *const *rms, size_t n_rm,
                              struct wp_route_header_ops *out)
{
        struct wp_route_header_add *a;
        struct wp_route_str *s;
        uint32_t k = 0;
        size_t old;
        int r;

        if (n_add > WP_ROUTE_MAX_HEADER_OPS || n_rm > WP_ROUTE_MAX_HEADER_OPS)
                return fail(c, -E2BIG, "%s: more than %u headers",
                            n_add > n_rm ? add_field : rm_field, WP_ROUTE_MAX_HEADER_OPS);
        if (n_rm) {
                s = a_array(c, n_rm, sizeof(*s));
                if (!s)
                        return fail_nomem(c);
                for (size_t i = 0; i < n_rm; i++) {
                        old = push(c, "%s[%zu]", rm_field, i);
                        r = 0;
                        if (!wp_match_header_name_valid(rms[i], strlen(rms[i])))
                                r = fail(c, -EINVAL, "invalid header name \"%s\"", rms[i]);
                        else
                                r = copy_str(c, "name", rms[i], true, &s[i].s, &s[i].len);
                        if (r == 0 && !modifiable_header(s[i].s))
                                r = fail(c, -EINVAL, "%s may not be removed", s[i].s);
                        pop(c, old);
                        if (r < 0)
                                return r;
                }
                out->remove = s;
                out->n_remove = (uint32_t)n_rm;
        }
        if (!n_add)
                return 0;
        a = a_array(c, n_add, sizeof(*a));
        if (!a)
                return fail_nomem(c);
        for (size_t i = 0; i < n_add; i++) {
                const Envoy__Config__Core__V3__HeaderValueOption *o = adds[i];
                const Envoy__Config__Core__V3__HeaderValue *hv = o->header;
                struct wp_route_header_add *e = &a[k];
                const char *v;
                size_t vlen;

                old = push(c, "%s[%zu]", add_field, i);
                r = 0;
                if (!hv) {
                        r = fail(c, -EINVAL, "header: required");
                } else if (!wp_match_header_name_valid(hv->key, strlen(hv->key))) {
                        r = fail(c, -EINVAL, "header.key: invalid header name \"%s\"", hv->key);
                } else if ((r = copy_str(c, "header.key", hv->key, true, &e->name, &e->name_len)) <
                           0) {
                } else if (!modifiable_header(e->name)) {
                        r = fail(c, -EINVAL, "header.key: %s may not be modified", e->name);
                } else if (
                    o->append &&
                    o->append_action !=
                        ENVOY__CONFIG__CORE__V3__HEADER_VALUE_OPTION__HEADER_APPEND_ACTION__APPEND_IF_EXISTS_OR_ADD) {
                        r = fail(c, -EINVAL, "append and append_action are mutually exclusive");
                } else if ((unsigned)o->append_action > WP_HDR_OVERWRITE_IF_EXISTS) {
                        r = fail(c, -EINVAL, "append_action: unknown value %d",
                                 (int)o->append_action);
                }
                if (r < 0) {
                        pop(c, old);
                        return r;
                }
                if (o->append)
                        e->append = o->append->value ? WP_HDR_APPEND_IF_EXISTS_OR_ADD
                                                     : WP_HDR_OVERWRITE_IF_EXISTS_OR_ADD;
                else
                        e->append = (enum wp_route_header_append)o->append_action;
                v = hv->value;
                vlen = strlen(hv->value);
                if (vlen == 0 && hv->raw_value.len) {
                        v = (const char *)hv->raw_value.data;
                        vlen = hv->raw_value.len;
                }
                r = header_value(c, v, vlen, &e->value, &e->value_len);
                pop(c, old);
                if (r < 0)
                        return r;
                /* Envoy drops entries whose value is empty unless keep_empty_value. */
                if (e->value_len == 0 && !o->keep_empty_value)
                        continue;
                k++;
        }
        out->add = a;
        out->n_add = k;
        return 0;
}

/* typed_per_filter_config map entries share one layout in every message that has them. */
struct pfc_entry {
        ProtobufCMessage base;
        char *key;
        Google__Protobuf__Any *value;
};

static int compile_fcs(struct cc *c, void *const *entries, size_t n,
                       struct wp_route_filter_configs *out)
{
        struct wp_route_filter_config *v;
        size_t old;
        int r;

        if (!n)
                return 0;
        if (n > 1024)
                return fail(c, -E2BIG, "typed_per_filter_config: more than 1024 entries");
        v = a_array(c, n, sizeof(*v));
        if (!v)
                return fail_nomem(c);
        for (size_t i = 0; i < n; i++) {
                const struct pfc_entry *e = entries[i];

                old = push(c, "typed_per_filter_config[\"%s\"]", e->key);
                if (!e->key[0]) {
                        r = fail(c, -EINVAL, "empty filter name");
                } else if (!e->value) {
                        r = fail(c, -EINVAL, "typed config required");
                } else if ((r = copy_str(c, "key", e->key, false, &v[i].filter_name, NULL)) < 0) {
                } else if ((r = copy_str(c, "type_url", e->value->type_url, false, &v[i].type_url,
                                         NULL)) < 0) {
                } else {
                        v[i].value_len = e->value->value.len;
                        if (v[i].value_len) {
                                uint8_t *p = a_alloc(c, v[i].value_len);
                                if (!p)
                                        r = fail_nomem(c);
                                else
                                        memcpy(p, e->value->value.data, v[i].value_len);
                                v[i].value = p;
                        }
                }
                pop(c, old);
                if (r < 0)
                        return r;
        }
        out->v = v;
        out->n = (uint32_t)n;
        return 0;
}

static const struct {
        const char *name;
        uint32_t flag;
} retry_names[] = {
    {"5xx", WP_RETRY_5XX},
    {"gateway-error", WP_RETRY_GATEWAY_ERROR},
    {"reset", WP_RETRY_RESET},
    {"reset-before-request", WP_RETRY_RESET_BEFORE_REQUEST},
    {"connect-failure", WP_RETRY_CONNECT_FAILURE},
    {"envoy-ratelimited", WP_RETRY_ENVOY_RATELIMITED},
    {"retriable-4xx", WP_RETRY_RETRIABLE_4XX},
    {"refused-stream", WP_RETRY_REFUSED_STREAM},
    {"retriable-status-codes", WP_RETRY_RETRIABLE_STATUS_CODES},
    {"retriable-headers", WP_RETRY_RETRIABLE_HEADERS},
    {"http3-post-connect-failure", WP_RETRY_HTTP3_POST_CONNECT_FAILURE},
    {"cancelled", WP_RETRY_GRPC_CANCELLED},
    {"deadline-exceeded", WP_RETRY_GRPC_DEADLINE_EXCEEDED},
    {"internal", WP_RETRY_GRPC_INTERNAL},
    {"resource-exhausted", WP_RETRY_GRPC_RESOURCE_EXHAUSTED},
    {"unavailable", WP_RETRY_GRPC_UNAVAILABLE},
};

static uint32_t parse_retry_on(const char *s)
{
        uint32_t flags = 0;

        while (*s) {
                const char *e = strchr(s, ',');
                size_t n = e ? (size_t)(e - s) : strlen(s);
                const char *b = s;

                while (n && (*b == ' ' || *b == '\t')) {
                        b++;
                        n--;
                }
                while (n && (b[n - 1] == ' ' || b[n - 1] == '\t'))
                        n--;
                for (size_t i = 0; i < sizeof(retry_names) / sizeof(retry_names[0]); i++)
                        if (strlen(retry_names[i].name) == n &&
                            memcmp(retry_names[i].name, b, n) == 0)
                                flags |= retry_names[i].flag;
                if (!e)
                        break;
                s = e + 1;
        }
        return flags;
}

static int compile_retry(struct cc *c, const Envoy__Config__Route__V3__RetryPolicy *p,
                         const struct wp_route_retry **ret)
{
        struct wp_route_retry *r = a_alloc(c, sizeof(*r));
        size_t old;
        int e;

        if (!r)
                return fail_nomem(c);
        r->retry_on = parse_retry_on(p->retry_on);
        r->num_retries = p->num_retries ? p->num_retries->value : 1;
        if (p->per_try_timeout &&
            (e = duration_ms(c, "per_try_timeout", p->per_try_timeout, &r->per_try_timeout_ms)) < 0)
                return e;
        if (p->per_try_idle_timeout &&
            (e = duration_ms(c, "per_try_idle_timeout", p->per_try_idle_timeout,
                             &r->per_try_idle_timeout_ms)) < 0)
                return e;
        r->backoff_base_ms = WP_ROUTE_DEFAULT_BACKOFF_BASE_MS;
        r->backoff_max_ms = 10 * WP_ROUTE_DEFAULT_BACKOFF_BASE_MS;
        if (p->retry_back_off) {
                const Envoy__Config__Route__V3__RetryPolicy__RetryBackOff *b = p->retry_back_off;

                if (!b->base_interval)
                        return fail(c, -EINVAL, "retry_back_off.base_interval: required");
                if ((e = duration_ms(c, "retry_back_off.base_interval", b->base_interval,
                                     &r->backoff_base_ms)) < 0)
                        return e;
                if (r->backoff_base_ms == 0)
                        return fail(c, -EINVAL, "retry_back_off.base_interval: must be > 0");
                r->backoff_max_ms = r->backoff_base_ms * 10;
                if (b->max_interval) {
                        if ((e = duration_ms(c, "retry_back_off.max_interval", b->max_interval,
                                             &r->backoff_max_ms)) < 0)
                                return e;
                        if (r->backoff_max_ms < r->backoff_base_ms)
                                return fail(c, -EINVAL,
                                            "retry_back_off.max_interval: must "
                                            "not be below base_interval");
                }
        }
        if (p->n_retriable_status_codes) {
                uint16_t *codes;

                if (p->n_retriable_status_codes > 1000)
                        return fail(c, -E2BIG, "retriable_status_codes: too many");
                codes = a_array(c, p->n_retriable_status_codes, sizeof(*codes));
                if (!codes)
                        return fail_nomem(c);
                for (size_t i = 0; i < p->n_retriable_status_codes; i++) {
                        if (p->retriable_status_codes[i] < 100 ||
                            p->retriable_status_codes[i] > 599)
                                return fail(c, -EINVAL,
                                            "retriable_status_codes[%zu]: %u is not "
                                            "an HTTP status",
                                            i, p->retriable_status_codes[i]);
                        codes[i] = (uint16_t)p->retriable_status_codes[i];
                }
                r->retriable_status_codes = codes;
                r->n_retriable_status_codes = (uint32_t)p->n_retriable_status_codes;
        }
        if (p->retry_priority)
                return fail(c, -EINVAL, "retry_priority: not supported");
        for (size_t i = 0; i < p->n_retry_host_predicate; i++) {
                const char *n = p->retry_host_predicate[i]->name;
                const Google__Protobuf__Any *tc = p->retry_host_predicate[i]->typed_config;

                if (strcmp(n, "envoy.retry_host_predicates.previous_hosts") == 0 ||
                    (tc &&
                     strcmp(tc->type_url, "type.googleapis.com/envoy.extensions.retry."
                                          "host.previous_hosts.v3.PreviousHostsPredicate") == 0)) {
                        r->previous_hosts = true;
                        continue;
                }
                old = push(c, "retry_host_predicate[%zu]", i);
                e = fail(c, -EINVAL, "retry host predicate %s is not supported", n);
                pop(c, old);
                return e;
        }
        if (p->host_selection_retry_max_attempts < 0 || p->host_selection_retry_max_attempts > 1000)
                return fail(c, -EINVAL, "host_selection_retry_max_attempts: out of range");
        r->host_selection_max_attempts = p->host_selection_retry_max_attempts
                                             ? (uint32_t)p->host_selection_retry_max_attempts
                                             : 1;
        if (p->n_retriable_headers)
                return fail(c, -EINVAL, "retriable_headers: not supported");
        if (p->n_retriable_request_headers)
                return fail(c, -EINVAL, "retriable_request_headers: not supported");
        *ret = r;
        return 0;
}

static int fraction(struct cc *c, const Envoy__Config__Core__V3__RuntimeFractionalPercent *rf,
                    uint32_t *num, uint32_t *den)
{
        *num = 100;
        *den = 100;
        if (!rf->default_value)
                return 0; /* runtime only: we have no runtime; Envoy's default is 100% */
        switch (rf->default_value->denominator) {
        case ENVOY__TYPE__V3__FRACTIONAL_PERCENT__DENOMINATOR_TYPE__HUNDRED:
                *den = 100;
                break;
        case ENVOY__TYPE__V3__FRACTIONAL_PERCENT__DENOMINATOR_TYPE__TEN_THOUSAND:
                *den = 10000;
                break;
        case ENVOY__TYPE__V3__FRACTIONAL_PERCENT__DENOMINATOR_TYPE__MILLION:
                *den = 1000000;
                break;
        default:
                return fail(c, -EINVAL, "default_value.denominator: unknown value");
        }
        *num = rf->default_value->numerator > *den ? *den : rf->default_value->numerator;
        return 0;
}

static int compile_rewrite_regex(struct cc *c,
                                 const Envoy__Type__Matcher__V3__RegexMatchAndSubstitute *rs,
                                 struct wp_route *rt)
{
        char err[256];
        size_t old = push(c, "regex_rewrite");
        int r;

        if (!rs->pattern) {
                r = fail(c, -EINVAL, "pattern: required");
                goto out;
        }
        r = compile_regex(c, rs->pattern, "pattern", &rt->rewrite_re);
        if (r < 0)
                goto out;
        r = copy_str(c, "substitution", rs->substitution, false, &rt->rewrite_s, &rt->rewrite_len);
        if (r < 0)
                goto out;
        if (wp_re2_check_rewrite(rt->rewrite_re, rt->rewrite_s, rt->rewrite_len, err, sizeof(err)) <
            0)
                r = fail(c, -EINVAL, "substitution: %s", err);
        rt->rewrite_kind = RW_REGEX;
out:
        pop(c, old);
        return r;
}

static bool valid_host_chars(const char *s)
{
        for (; *s; s++)
                if ((unsigned char)*s <= 0x20 || (unsigned char)*s == 0x7f || *s == '/' ||
                    *s == '?' || *s == '#')
                        return false;
        return true;
}

static int compile_weighted(struct cc *c, const Envoy__Config__Route__V3__WeightedCluster *w,
                            struct wp_route *rt)
{
        uint64_t total = 0;
        size_t old;
        int r;

        if (w->n_clusters == 0)
                return fail(c, -EINVAL, "clusters: at least one cluster is required");
        if (w->n_clusters > WP_ROUTE_MAX_WEIGHTED)
                return fail(c, -E2BIG, "clusters: more than %u", WP_ROUTE_MAX_WEIGHTED);
        rt->wc = a_array(c, w->n_clusters, sizeof(*rt->wc));
        if (!rt->wc)
                return fail_nomem(c);
        for (size_t i = 0; i < w->n_clusters; i++) {
                const Envoy__Config__Route__V3__WeightedCluster__ClusterWeight *cw = w->clusters[i];
                struct wcluster *o = &rt->wc[i];

                old = push(c, "clusters[%zu]", i);
                r = 0;
                if (cw->name[0] && cw->cluster_header[0])
                        r = fail(c, -EINVAL, "only one of name and cluster_header may be set");
                else if (!cw->name[0] && !cw->cluster_header[0])
                        r = fail(c, -EINVAL, "name or cluster_header is required");
                else if (cw->name[0])
                        r = copy_str(c, "name", cw->name, false, &o->name, &o->name_len);
                else if (!wp_match_header_name_valid(cw->cluster_header,
                                                     strlen(cw->cluster_header)))
                        r = fail(c, -EINVAL, "cluster_header: invalid header name");
                else
                        r = copy_str(c, "cluster_header", cw->cluster_header, true,
                                     &o->cluster_header, NULL);
                if (r == 0 && cw->metadata_match)
                        r = fail(c, -EINVAL,
                                 "metadata_match: subset load balancing is not "
                                 "supported");
                if (r == 0 &&
                    cw->host_rewrite_specifier_case ==
                        ENVOY__CONFIG__ROUTE__V3__WEIGHTED_CLUSTER__CLUSTER_WEIGHT__HOST_REWRITE_SPECIFIER_HOST_REWRITE_LITERAL) {
                        if (!cw->host_rewrite_literal[0] ||
                            !valid_host_chars(cw->host_rewrite_literal))
                                r = fail(c, -EINVAL, "host_rewrite_literal: invalid host");
                        else
                                r = copy_str(c, "host_rewrite_literal", cw->host_rewrite_literal,
                                             false, &o->host_rewrite, &o->host_rewrite_len);
                }
                if (r == 0)
                        r = compile_header_ops(
                            c, "request_headers_to_add", cw->request_headers_to_add,
                            cw->n_request_headers_to_add, "request_headers_to_remove",
                            cw->request_headers_to_remove, cw->n_request_headers_to_remove,
                            &o->req_ops);
                if (r == 0)
                        r = compile_header_ops(
                            c, "response_headers_to_add", cw->response_headers_to_add,
                            cw->n_response_headers_to_add, "response_headers_to_remove",
                            cw->response_headers_to_remove, cw->n_response_headers_to_remove,
                            &o->resp_ops);
                if (r == 0)
                        r = compile_fcs(c, (void *const *)cw->typed_per_filter_config,
                                        cw->n_typed_per_filter_config, &o->fcs);
                o->weight = cw->weight ? cw->weight->value : 0;
                total += o->weight;
                pop(c, old);
                if (r < 0)
                        return r;
        }
        if (total == 0)
                return fail(c, -EINVAL, "clusters: the sum of the weights must be above 0");
        if (total > UINT32_MAX)
                return fail(c, -EINVAL, "clusters: the sum of the weights exceeds %u", UINT32_MAX);
        if (w->total_weight && w->total_weight->value && w->total_weight->value != total)
                return fail(c, -EINVAL,
                            "total_weight: %u differs from the sum of the weights %" PRIu64,
                            w->total_weight->value, total);
        rt->n_wc = (uint32_t)w->n_clusters;
        rt->wc_total = total;
        if (w->random_value_specifier_case ==
                ENVOY__CONFIG__ROUTE__V3__WEIGHTED_CLUSTER__RANDOM_VALUE_SPECIFIER_HEADER_NAME &&
            w->header_name[0]) {
                if (!wp_match_header_name_valid(w->header_name, strlen(w->header_name)))
                        return fail(c, -EINVAL, "header_name: invalid header name");
                return copy_str(c, "header_name", w->header_name, true, &rt->wc_random_header,
                                NULL);
        }
        return 0;
}

static int compile_hash(struct cc *c, const Envoy__Config__Route__V3__RouteAction *ra,
                        struct wp_route *rt)
{
        int r = 0;

        if (!ra->n_hash_policy)
                return 0;
        if (ra->n_hash_policy > 64)
                return fail(c, -E2BIG, "hash_policy: more than 64 entries");
        rt->hash = a_array(c, ra->n_hash_policy, sizeof(*rt->hash));
        if (!rt->hash)
                return fail_nomem(c);
        for (size_t i = 0; i < ra->n_hash_policy && r == 0; i++) {
                const Envoy__Config__Route__V3__RouteAction__HashPolicy *hp = ra->hash_policy[i];
                struct wp_route_hash_policy *o = &rt->hash[i];
                size_t old = push(c, "hash_policy[%zu]", i);

                o->terminal = hp->terminal;
                switch (hp->policy_specifier_case) {
                case ENVOY__CONFIG__ROUTE__V3__ROUTE_ACTION__HASH_POLICY__POLICY_SPECIFIER_HEADER:
                        o->kind = WP_ROUTE_HASH_HEADER;
                        if (!wp_match_header_name_valid(hp->header->header_name,
                                                        strlen(hp->header->header_name)))
                                r = fail(c, -EINVAL, "header.header_name: invalid header name");
                        else if (hp->header->regex_rewrite)
                                r = fail(c, -EINVAL, "header.regex_rewrite: not supported");
                        else
                                r = copy_str(c, "header.header_name", hp->header->header_name, true,
                                             &o->name, &o->name_len);
                        break;
                case ENVOY__CONFIG__ROUTE__V3__ROUTE_ACTION__HASH_POLICY__POLICY_SPECIFIER_COOKIE:
                        o->kind = WP_ROUTE_HASH_COOKIE;
                        if (!hp->cookie->name[0])
                                r = fail(c, -EINVAL, "cookie.name: required");
                        else
                                r = copy_str(c, "cookie.name", hp->cookie->name, false, &o->name,
                                             &o->name_len);
                        if (r == 0)
                                r = copy_str(c, "cookie.path", hp->cookie->path, false,
                                             &o->cookie_path, NULL);
                        if (r == 0 && hp->cookie->ttl) {
                                o->cookie_has_ttl = true;
                                r = duration_ms(c, "cookie.ttl", hp->cookie->ttl,
                                                &o->cookie_ttl_ms);
                        }
                        break;
                case ENVOY__CONFIG__ROUTE__V3__ROUTE_ACTION__HASH_POLICY__POLICY_SPECIFIER_CONNECTION_PROPERTIES:
                        o->kind = WP_ROUTE_HASH_SOURCE_IP;
                        if (!hp->connection_properties->source_ip)
                                r = fail(c, -EINVAL,
                                         "connection_properties: source_ip must "
                                         "be true");
                        break;
                case ENVOY__CONFIG__ROUTE__V3__ROUTE_ACTION__HASH_POLICY__POLICY_SPECIFIER_QUERY_PARAMETER:
                        o->kind = WP_ROUTE_HASH_QUERY_PARAMETER;
                        if (!hp->query_parameter->name[0])
                                r = fail(c, -EINVAL, "query_parameter.name: required");
                        else
                                r = copy_str(c, "query_parameter.name", hp->query_parameter->name,
                                             false, &o->name, &o->name_len);
                        break;
                case ENVOY__CONFIG__ROUTE__V3__ROUTE_ACTION__HASH_POLICY__POLICY_SPECIFIER_FILTER_STATE:
                        r = fail(c, -EINVAL, "filter_state: not supported");
                        break;
                default:
                        r = fail(c, -EINVAL, "policy_specifier: required");
                        break;
                }
                pop(c, old);
        }
        rt->n_hash = (uint32_t)ra->n_hash_policy;
        return r;
}

static int compile_mirrors(struct cc *c, const Envoy__Config__Route__V3__RouteAction *ra,
                           struct wp_route *rt)
{
        int r = 0;

        if (!ra->n_request_mirror_policies)
                return 0;
        if (ra->n_request_mirror_policies > 16)
                return fail(c, -E2BIG, "request_mirror_policies: more than 16 entries");
        rt->mirrors = a_array(c, ra->n_request_mirror_policies, sizeof(*rt->mirrors));
        if (!rt->mirrors)
                return fail_nomem(c);
        for (size_t i = 0; i < ra->n_request_mirror_policies && r == 0; i++) {
                const Envoy__Config__Route__V3__RouteAction__RequestMirrorPolicy *m =
                    ra->request_mirror_policies[i];
                struct wp_route_mirror *o = &rt->mirrors[i];
                size_t old = push(c, "request_mirror_policies[%zu]", i);

                if (m->cluster[0] && m->cluster_header[0])
                        r = fail(c, -EINVAL, "only one of cluster and cluster_header may be set");
                else if (m->cluster[0])
                        r = copy_str(c, "cluster", m->cluster, false, &o->cluster, NULL);
                else if (!m->cluster_header[0])
                        r = fail(c, -EINVAL, "cluster or cluster_header is required");
                else if (!wp_match_header_name_valid(m->cluster_header, strlen(m->cluster_header)))
                        r = fail(c, -EINVAL, "cluster_header: invalid header name");
                else
                        r = copy_str(c, "cluster_header", m->cluster_header, true,
                                     &o->cluster_header, NULL);
                o->numerator = o->denominator = 100;
                if (r == 0 && m->runtime_fraction) {
                        size_t o2 = push(c, "runtime_fraction");
                        r = fraction(c, m->runtime_fraction, &o->numerator, &o->denominator);
                        pop(c, o2);
                }
                pop(c, old);
        }
        rt->n_mirrors = (uint32_t)ra->n_request_mirror_policies;
        return r;
}

static int compile_upgrades(struct cc *c, const Envoy__Config__Route__V3__RouteAction *ra,
                            struct wp_route *rt)
{
        if (!ra->n_upgrade_configs)
                return 0;
        if (ra->n_upgrade_configs > 16)
                return fail(c, -E2BIG, "upgrade_configs: more than 16 entries");
        rt->upgrades = a_array(c, ra->n_upgrade_configs, sizeof(*rt->upgrades));
        if (!rt->upgrades)
                return fail_nomem(c);
        for (size_t i = 0; i < ra->n_upgrade_configs; i++) {
                const Envoy__Config__Route__V3__RouteAction__UpgradeConfig *u =
                    ra->upgrade_configs[i];
                struct wp_route_upgrade *o = &rt->upgrades[i];
                size_t old = push(c, "upgrade_configs[%zu]", i);
                int r = 0;

                if (!u->upgrade_type[0])
                        r = fail(c, -EINVAL, "upgrade_type: required");
                else
                        r = copy_str(c, "upgrade_type", u->upgrade_type, false, &o->type, NULL);
                if (r == 0 && u->connect_config) {
                        if (u->connect_config->proxy_protocol_config)
                                r = fail(c, -EINVAL,
                                         "connect_config.proxy_protocol_config: "
                                         "not supported");
                        o->connect_config = true;
                        o->connect_allow_post = u->connect_config->allow_post;
                }
                o->enabled = u->enabled ? u->enabled->value : true;
                pop(c, old);
                if (r < 0)
                        return r;
        }
        rt->n_upgrades = (uint32_t)ra->n_upgrade_configs;
        return 0;
}

static int compile_route_action(struct cc *c, const Envoy__Config__Route__V3__RouteAction *ra,
                                struct wp_route *rt)
{
        size_t old;
        int r = 0;

        rt->action = WP_ROUTE_ACTION_CLUSTER;
        switch (ra->cluster_specifier_case) {
        case ENVOY__CONFIG__ROUTE__V3__ROUTE_ACTION__CLUSTER_SPECIFIER_CLUSTER:
                rt->cluster_kind = CK_NAME;
                if (!ra->cluster[0])
                        return fail(c, -EINVAL, "cluster: must not be empty");
                r = copy_str(c, "cluster", ra->cluster, false, &rt->cluster, &rt->cluster_len);
                break;
        case ENVOY__CONFIG__ROUTE__V3__ROUTE_ACTION__CLUSTER_SPECIFIER_CLUSTER_HEADER:
                rt->cluster_kind = CK_HEADER;
                if (!wp_match_header_name_valid(ra->cluster_header, strlen(ra->cluster_header)))
                        return fail(c, -EINVAL, "cluster_header: invalid header name");
                r = copy_str(c, "cluster_header", ra->cluster_header, true, &rt->cluster, NULL);
                break;
        case ENVOY__CONFIG__ROUTE__V3__ROUTE_ACTION__CLUSTER_SPECIFIER_WEIGHTED_CLUSTERS:
                rt->cluster_kind = CK_WEIGHTED;
                old = push(c, "weighted_clusters");
                r = compile_weighted(c, ra->weighted_clusters, rt);
                pop(c, old);
                break;
        default:
                return fail(c, -EINVAL,
                            "cluster_specifier: one of cluster, cluster_header or "
                            "weighted_clusters is required");
        }
        if (r < 0)
                return r;
        if (ra->metadata_match)
                return fail(c, -EINVAL, "metadata_match: subset load balancing is not supported");
        switch (ra->cluster_not_found_response_code) {
        case ENVOY__CONFIG__ROUTE__V3__ROUTE_ACTION__CLUSTER_NOT_FOUND_RESPONSE_CODE__SERVICE_UNAVAILABLE:
                rt->cluster_not_found_status = 503;
                break;
        case ENVOY__CONFIG__ROUTE__V3__ROUTE_ACTION__CLUSTER_NOT_FOUND_RESPONSE_CODE__NOT_FOUND:
                rt->cluster_not_found_status = 404;
                break;
        case ENVOY__CONFIG__ROUTE__V3__ROUTE_ACTION__CLUSTER_NOT_FOUND_RESPONSE_CODE__INTERNAL_SERVER_ERROR:
                rt->cluster_not_found_status = 500;
                break;
        default:
                return fail(c, -EINVAL, "cluster_not_found_response_code: unknown value");
        }
        if (ra->prefix_rewrite[0] && ra->regex_rewrite)
                return fail(c, -EINVAL, "only one of prefix_rewrite and regex_rewrite may be set");
        if (ra->prefix_rewrite[0]) {
                if (rt->path_kind == PK_CONNECT)
                        return fail(c, -EINVAL,
                                    "prefix_rewrite: not allowed with "
                                    "connect_matcher");
                rt->rewrite_kind = RW_PREFIX;
                r = copy_str(c, "prefix_rewrite", ra->prefix_rewrite, false, &rt->rewrite_s,
                             &rt->rewrite_len);
                if (r < 0)
                        return r;
        } else if (ra->regex_rewrite) {
                r = compile_rewrite_regex(c, ra->regex_rewrite, rt);
                if (r < 0)
                        return r;
        }
        switch (ra->host_rewrite_specifier_case) {
        case ENVOY__CONFIG__ROUTE__V3__ROUTE_ACTION__HOST_REWRITE_SPECIFIER_HOST_REWRITE_LITERAL:
                if (!ra->host_rewrite_literal[0] || !valid_host_chars(ra->host_rewrite_literal))
                        return fail(c, -EINVAL, "host_rewrite_literal: invalid host");
                rt->host_rewrite_kind = HR_LITERAL;
                r = copy_str(c, "host_rewrite_literal", ra->host_rewrite_literal, false,
                             &rt->host_rewrite, &rt->host_rewrite_len);
                break;
        case ENVOY__CONFIG__ROUTE__V3__ROUTE_ACTION__HOST_REWRITE_SPECIFIER_AUTO_HOST_REWRITE:
                if (ra->auto_host_rewrite && ra->auto_host_rewrite->value)
                        rt->host_rewrite_kind = HR_AUTO;
                break;
        case ENVOY__CONFIG__ROUTE__V3__ROUTE_ACTION__HOST_REWRITE_SPECIFIER_HOST_REWRITE_HEADER:
                if (!wp_match_header_name_valid(ra->host_rewrite_header,
                                                strlen(ra->host_rewrite_header)))
                        return fail(c, -EINVAL, "host_rewrite_header: invalid header name");
                rt->host_rewrite_kind = HR_HEADER;
                r = copy_str(c, "host_rewrite_header", ra->host_rewrite_header, true,
                             &rt->host_rewrite, &rt->host_rewrite_len);
                break;
        default:
                break;
        }
        if (r < 0)
                return r;
        rt->append_x_forwarded_host = ra->append_x_forwarded_host;
        rt->timeout_ms = WP_ROUTE_DEFAULT_TIMEOUT_MS;
        if (ra->timeout && (r = duration_ms(c, "timeout", ra->timeout, &rt->timeout_ms)) < 0)
                return r;
        if (ra->idle_timeout &&
            (r = duration_ms(c, "idle_timeout", ra->idle_timeout, &rt->idle_timeout_ms)) < 0)
                return r;
        if (ra->max_grpc_timeout) {
                rt->has_max_grpc_timeout = true;
                r = duration_ms(c, "max_grpc_timeout", ra->max_grpc_timeout,
                                &rt->max_grpc_timeout_ms);
                if (r < 0)
                        return r;
        }
        if (ra->grpc_timeout_offset &&
            (r = duration_ms(c, "grpc_timeout_offset", ra->grpc_timeout_offset,
                             &rt->grpc_timeout_offset_ms)) < 0)
                return r;
        if (ra->max_stream_duration) {
                const Envoy__Config__Route__V3__RouteAction__MaxStreamDuration *m =
                    ra->max_stream_duration;

                if (m->max_stream_duration &&
                    (r = duration_ms(c, "max_stream_duration.max_stream_duration",
                                     m->max_stream_duration, &rt->max_stream_duration_ms)) < 0)
                        return r;
                if (m->grpc_timeout_header_max) {
                        rt->has_max_grpc_timeout = true;
                        r = duration_ms(c, "max_stream_duration.grpc_timeout_header_max",
                                        m->grpc_timeout_header_max, &rt->max_grpc_timeout_ms);
                        if (r < 0)
                                return r;
                }
                if (m->grpc_timeout_header_offset &&
                    (r = duration_ms(c, "max_stream_duration.grpc_timeout_header_offset",
                                     m->grpc_timeout_header_offset, &rt->grpc_timeout_offset_ms)) <
                        0)
                        return r;
        }
        if (ra->retry_policy) {
                old = push(c, "retry_policy");
                r = compile_retry(c, ra->retry_policy, &rt->retry);
                pop(c, old);
                if (r < 0)
                        return r;
        }
        if ((r = compile_hash(c, ra, rt)) < 0)
                return r;
        if ((r = compile_mirrors(c, ra, rt)) < 0)
                return r;
        return compile_upgrades(c, ra, rt);
}

static int compile_redirect(struct cc *c, const Envoy__Config__Route__V3__RedirectAction *ra,
                            struct wp_route *rt)
{
        static const unsigned codes[] = {301, 302, 303, 307, 308};
        int r = 0;

        rt->action = WP_ROUTE_ACTION_REDIRECT;
        if ((unsigned)ra->response_code >= sizeof(codes) / sizeof(codes[0]))
                return fail(c, -EINVAL, "response_code: unknown value %d", (int)ra->response_code);
        rt->status = codes[ra->response_code];
        if (ra->scheme_rewrite_specifier_case ==
                ENVOY__CONFIG__ROUTE__V3__REDIRECT_ACTION__SCHEME_REWRITE_SPECIFIER_HTTPS_REDIRECT &&
            ra->https_redirect) {
                rt->scheme_redirect = "https";
                rt->scheme_redirect_len = 5;
        } else if (
            ra->scheme_rewrite_specifier_case ==
                ENVOY__CONFIG__ROUTE__V3__REDIRECT_ACTION__SCHEME_REWRITE_SPECIFIER_SCHEME_REDIRECT &&
            ra->scheme_redirect[0]) {
                for (const char *p = ra->scheme_redirect; *p; p++)
                        if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') ||
                              (p != ra->scheme_redirect &&
                               ((*p >= '0' && *p <= '9') || *p == '+' || *p == '-' || *p == '.'))))
                                return fail(c, -EINVAL, "scheme_redirect: invalid scheme");
                r = copy_str(c, "scheme_redirect", ra->scheme_redirect, true, &rt->scheme_redirect,
                             &rt->scheme_redirect_len);
                if (r < 0)
                        return r;
        }
        if (ra->host_redirect[0]) {
                if (!valid_host_chars(ra->host_redirect))
                        return fail(c, -EINVAL, "host_redirect: invalid host");
                r = copy_str(c, "host_redirect", ra->host_redirect, false, &rt->host_redirect,
                             &rt->host_redirect_len);
                if (r < 0)
                        return r;
        }
        if (ra->port_redirect > 65535)
                return fail(c, -EINVAL, "port_redirect: %u is not a port", ra->port_redirect);
        rt->port_redirect = ra->port_redirect;
        rt->strip_query = ra->strip_query;
        switch (ra->path_rewrite_specifier_case) {
        case ENVOY__CONFIG__ROUTE__V3__REDIRECT_ACTION__PATH_REWRITE_SPECIFIER_PATH_REDIRECT:
                if (!ra->path_redirect[0])
                        break;
                for (const char *p = ra->path_redirect; *p; p++)
                        if ((unsigned char)*p <= 0x20 || *p == 0x7f || *p == '#')
                                return fail(c, -EINVAL, "path_redirect: invalid character");
                rt->rewrite_kind = RW_PATH;
                rt->path_redirect_has_query = strchr(ra->path_redirect, '?') != NULL;
                r = copy_str(c, "path_redirect", ra->path_redirect, false, &rt->rewrite_s,
                             &rt->rewrite_len);
                break;
        case ENVOY__CONFIG__ROUTE__V3__REDIRECT_ACTION__PATH_REWRITE_SPECIFIER_PREFIX_REWRITE:
                if (rt->path_kind == PK_CONNECT)
                        return fail(c, -EINVAL,
                                    "prefix_rewrite: not allowed with "
                                    "connect_matcher");
                rt->rewrite_kind = RW_PREFIX;
                r = copy_str(c, "prefix_rewrite", ra->prefix_rewrite, false, &rt->rewrite_s,
                             &rt->rewrite_len);
                break;
        case ENVOY__CONFIG__ROUTE__V3__REDIRECT_ACTION__PATH_REWRITE_SPECIFIER_REGEX_REWRITE:
                r = compile_rewrite_regex(c, ra->regex_rewrite, rt);
                break;
        default:
                break;
        }
        return r;
}

static int compile_direct(struct cc *c, const Envoy__Config__Route__V3__DirectResponseAction *d,
                          struct wp_route *rt)
{
        const char *b = "";
        size_t n = 0;

        rt->action = WP_ROUTE_ACTION_DIRECT;
        if (d->status < 200 || d->status > 599)
                return fail(c, -EINVAL, "status: %u is not in [200, 600)", d->status);
        rt->status = d->status;
        if (d->body) {
                switch (d->body->specifier_case) {
                case ENVOY__CONFIG__CORE__V3__DATA_SOURCE__SPECIFIER_INLINE_STRING:
                        b = d->body->inline_string;
                        n = strlen(b);
                        break;
                case ENVOY__CONFIG__CORE__V3__DATA_SOURCE__SPECIFIER_INLINE_BYTES:
                        b = (const char *)d->body->inline_bytes.data;
                        n = d->body->inline_bytes.len;
                        break;
                case ENVOY__CONFIG__CORE__V3__DATA_SOURCE__SPECIFIER_FILENAME:
                        return fail(c, -EINVAL, "body.filename: not supported (inline the body)");
                case ENVOY__CONFIG__CORE__V3__DATA_SOURCE__SPECIFIER_ENVIRONMENT_VARIABLE:
                        return fail(c, -EINVAL, "body.environment_variable: not supported");
                default:
                        break;
                }
                if (d->body->watched_directory)
                        return fail(c, -EINVAL, "body.watched_directory: not supported");
        }
        if (n > c->max_body)
                return fail(c, -EINVAL,
                            "body: %zu bytes exceed max_direct_response_body_size_bytes "
                            "(%u)",
                            n, c->max_body);
        rt->body = a_strndup(c, n ? b : "", n);
        if (!rt->body)
                return fail_nomem(c);
        rt->body_len = (uint32_t)n;
        return 0;
}

static int compile_match(struct cc *c, const Envoy__Config__Route__V3__RouteMatch *m,
                         struct wp_route *rt)
{
        size_t old;
        int r = 0;

        rt->case_sensitive = m->case_sensitive ? m->case_sensitive->value : true;
        switch (m->path_specifier_case) {
        case ENVOY__CONFIG__ROUTE__V3__ROUTE_MATCH__PATH_SPECIFIER_PREFIX:
                rt->path_kind = PK_PREFIX;
                r = copy_str(c, "prefix", m->prefix, !rt->case_sensitive, &rt->path_s,
                             &rt->path_len);
                break;
        case ENVOY__CONFIG__ROUTE__V3__ROUTE_MATCH__PATH_SPECIFIER_PATH:
                rt->path_kind = PK_PATH;
                r = copy_str(c, "path", m->path, !rt->case_sensitive, &rt->path_s, &rt->path_len);
                break;
        case ENVOY__CONFIG__ROUTE__V3__ROUTE_MATCH__PATH_SPECIFIER_PATH_SEPARATED_PREFIX: {
                const char *p = m->path_separated_prefix;
                size_t n = strlen(p);

                rt->path_kind = PK_SEP_PREFIX;
                if (n == 0 || strpbrk(p, "?#") || p[n - 1] == '/')
                        return fail(c, -EINVAL,
                                    "path_separated_prefix: must be non-empty, without ? or #, "
                                    "and not end in /: \"%s\"",
                                    p);
                r = copy_str(c, "path_separated_prefix", p, !rt->case_sensitive, &rt->path_s,
                             &rt->path_len);
                break;
        }
        case ENVOY__CONFIG__ROUTE__V3__ROUTE_MATCH__PATH_SPECIFIER_SAFE_REGEX:
                rt->path_kind = PK_REGEX;
                r = compile_regex(c, m->safe_regex, "safe_regex", &rt->path_re);
                break;
        case ENVOY__CONFIG__ROUTE__V3__ROUTE_MATCH__PATH_SPECIFIER_CONNECT_MATCHER:
                rt->path_kind = PK_CONNECT;
                break;
        case ENVOY__CONFIG__ROUTE__V3__ROUTE_MATCH__PATH_SPECIFIER_PATH_MATCH_POLICY:
                return fail(c, -EINVAL, "path_match_policy: not supported");
        default:
                return fail(c, -EINVAL,
                            "path_specifier: one of prefix, path, safe_regex, "
                            "path_separated_prefix or connect_matcher is required");
        }
        if (r < 0)
                return r;
        if (m->n_headers + m->n_query_parameters > WP_ROUTE_MAX_MATCHERS)
                return fail(c, -E2BIG, "more than %u header and query parameter matchers",
                            WP_ROUTE_MAX_MATCHERS);
        if (m->n_headers) {
                rt->headers = a_array(c, m->n_headers, sizeof(*rt->headers));
                if (!rt->headers)
                        return fail_nomem(c);
                struct wp_match_cc mc = mcc(c);

                for (size_t i = 0; i < m->n_headers; i++) {
                        old = push(c, "headers[%zu]", i);
                        r = wp_hdrmatch_compile(&mc, m->headers[i], &rt->headers[i]);
                        pop(c, old);
                        if (r < 0)
                                return r;
                }
                rt->n_headers = (uint32_t)m->n_headers;
        }
        if (m->n_query_parameters) {
                rt->qps = a_array(c, m->n_query_parameters, sizeof(*rt->qps));
                if (!rt->qps)
                        return fail_nomem(c);
                for (size_t i = 0; i < m->n_query_parameters; i++) {
                        old = push(c, "query_parameters[%zu]", i);
                        r = compile_qpm(c, m->query_parameters[i], &rt->qps[i]);
                        pop(c, old);
                        if (r < 0)
                                return r;
                }
                rt->n_qps = (uint32_t)m->n_query_parameters;
        }
        rt->grpc = m->grpc != NULL;
        if (m->runtime_fraction) {
                rt->has_runtime_fraction = true;
                old = push(c, "runtime_fraction");
                r = fraction(c, m->runtime_fraction, &rt->rf_num, &rt->rf_den);
                pop(c, old);
                if (r < 0)
                        return r;
        }
        if (m->n_dynamic_metadata)
                return fail(c, -EINVAL, "dynamic_metadata: not supported");
        return 0;
}

static int compile_route(struct cc *c, const Envoy__Config__Route__V3__Route *ro,
                         struct wp_route *rt)
{
        size_t old;
        int r;

        r = copy_str(c, "name", ro->name, false, &rt->name, NULL);
        if (r < 0)
                return r;
        if (!ro->match)
                return fail(c, -EINVAL, "match: required");
        old = push(c, "match");
        r = compile_match(c, ro->match, rt);
        pop(c, old);
        if (r < 0)
                return r;
        switch (ro->action_case) {
        case ENVOY__CONFIG__ROUTE__V3__ROUTE__ACTION_ROUTE:
                old = push(c, "route");
                r = compile_route_action(c, ro->route, rt);
                pop(c, old);
                break;
        case ENVOY__CONFIG__ROUTE__V3__ROUTE__ACTION_REDIRECT:
                old = push(c, "redirect");
                r = compile_redirect(c, ro->redirect, rt);
                pop(c, old);
                break;
        case ENVOY__CONFIG__ROUTE__V3__ROUTE__ACTION_DIRECT_RESPONSE:
                old = push(c, "direct_response");
                r = compile_direct(c, ro->direct_response, rt);
                pop(c, old);
                break;
        case ENVOY__CONFIG__ROUTE__V3__ROUTE__ACTION_NON_FORWARDING_ACTION:
                rt->action = WP_ROUTE_ACTION_NON_FORWARDING;
                break;
        default:
                return fail(c, -EINVAL,
                            "action: one of route, redirect, direct_response or "
                            "non_forwarding_action is required");
        }
        if (r < 0)
                return r;
        r = compile_header_ops(c, "request_headers_to_add", ro->request_headers_to_add,
                               ro->n_request_headers_to_add, "request_headers_to_remove",
                               ro->request_headers_to_remove, ro->n_request_headers_to_remove,
                               &rt->req_ops);
        if (r < 0)
                return r;
        r = compile_header_ops(c, "response_headers_to_add", ro->response_headers_to_add,
                               ro->n_response_headers_to_add, "response_headers_to_remove",
                               ro->response_headers_to_remove, ro->n_response_headers_to_remove,
                               &rt->resp_ops);
        if (r < 0)
                return r;
        return compile_fcs(c, (void *const *)ro->typed_per_filter_config,
                           ro->n_typed_per_filter_config, &rt->fcs);
}

/* ---- domains ---------------------------------------------------------------------------- */

static uint32_t hash_lc(const char *s, size_t n)
{
        uint32_t h = 2166136261u;

        for (size_t i = 0; i < n; i++) {
                h ^= (unsigned char)lower(s[i]);
                h *= 16777619u;
        }
        return h;
}

static bool eq_lc(const char *a, const char *lc, size_t n)
{
        for (size_t i = 0; i < n; i++)
                if (lower(a[i]) != lc[i])
                        return false;
        return true;
}

static struct dom *exact_slot(const struct wp_route_table *t, const char *s, size_t n)
{
        uint32_t mask = t->exact_cap - 1;

        for (uint32_t i = hash_lc(s, n) & mask;; i = (i + 1) & mask) {
                struct dom *d = &t->exact[i];

                if (!d->s || (d->len == n && eq_lc(s, d->s, n)))
                        return d;
        }
}

static int cmp_dom_len_desc(const void *a, const void *b)
{
        const struct dom *x = a, *y = b;

        if (x->len != y->len)
                return x->len > y->len ? -1 : 1;
        return strcmp(x->s, y->s);
}

static int add_domain(struct cc *c, struct vhost *vh, const char *d, struct dom *suffix,
                      uint32_t *n_suffix, struct dom *prefix, uint32_t *n_prefix)
{
        size_t n = strlen(d);
        struct wp_route_table *t = c->t;
        const char *lc;
        uint32_t len;
        int r;

        if (n == 0)
                return fail(c, -EINVAL, "empty domain");
        for (size_t i = 0; i < n; i++)
                if ((unsigned char)d[i] < 0x20 || d[i] == 0x7f)
                        return fail(c, -EINVAL, "control character in domain");
        if (n == 1 && d[0] == '*') {
                if (t->star)
                        return fail(c, -EINVAL, "only one virtual host may have the domain *");
                t->star = vh;
                return 0;
        }
        if (d[0] == '*') {
                r = copy_str(c, "domain", d + 1, true, &lc, &len);
                if (r < 0)
                        return r;
                for (uint32_t i = 0; i < *n_suffix; i++)
                        if (suffix[i].len == len && strcmp(suffix[i].s, lc) == 0)
                                return fail(c, -EINVAL, "duplicate domain %s", d);
                suffix[(*n_suffix)++] = (struct dom){lc, len, vh};
                return 0;
        }
        if (d[n - 1] == '*') {
                r = copy_str(c, "domain", d, true, &lc, &len);
                if (r < 0)
                        return r;
                len--;
                ((char *)lc)[len] = 0;
                for (uint32_t i = 0; i < *n_prefix; i++)
                        if (prefix[i].len == len && strcmp(prefix[i].s, lc) == 0)
                                return fail(c, -EINVAL, "duplicate domain %s", d);
                prefix[(*n_prefix)++] = (struct dom){lc, len, vh};
                return 0;
        }
        r = copy_str(c, "domain", d, true, &lc, &len);
        if (r < 0)
                return r;
        struct dom *slot = exact_slot(t, lc, len);
        if (slot->s)
                return fail(c, -EINVAL, "duplicate domain %s", d);
        *slot = (struct dom){lc, len, vh};
        t->n_exact++;
        return 0;
}

static int compile_vhost(struct cc *c, const Envoy__Config__Route__V3__VirtualHost *v,
                         struct vhost *vh)
{
        size_t old;
        int r;

        r = copy_str(c, "name", v->name, false, &vh->name, NULL);
        if (r < 0)
                return r;
        if (v->matcher)
                return fail(c, -EINVAL, "matcher: the xDS matcher API is not supported");
        if (v->n_routes > WP_ROUTE_MAX_ROUTES - c->n_routes)
                return fail(c, -E2BIG, "routes: more than %u routes in all", WP_ROUTE_MAX_ROUTES);
        c->n_routes += (uint32_t)v->n_routes;
        if ((unsigned)v->require_tls >
            ENVOY__CONFIG__ROUTE__V3__VIRTUAL_HOST__TLS_REQUIREMENT_TYPE__ALL)
                return fail(c, -EINVAL, "require_tls: unknown value");
        vh->require_tls = (uint8_t)v->require_tls;
        vh->tls_redirect.action = WP_ROUTE_ACTION_REDIRECT;
        vh->tls_redirect.status = 301;
        vh->tls_redirect.scheme_redirect = "https";
        vh->tls_redirect.scheme_redirect_len = 5;
        vh->tls_redirect.name = "";
        vh->tls_redirect.vh = vh;
        vh->include_req_attempt = v->include_request_attempt_count;
        vh->include_resp_attempt = v->include_attempt_count_in_response;
        r = compile_header_ops(c, "request_headers_to_add", v->request_headers_to_add,
                               v->n_request_headers_to_add, "request_headers_to_remove",
                               v->request_headers_to_remove, v->n_request_headers_to_remove,
                               &vh->req_ops);
        if (r < 0)
                return r;
        r = compile_header_ops(c, "response_headers_to_add", v->response_headers_to_add,
                               v->n_response_headers_to_add, "response_headers_to_remove",
                               v->response_headers_to_remove, v->n_response_headers_to_remove,
                               &vh->resp_ops);
        if (r < 0)
                return r;
        r = compile_fcs(c, (void *const *)v->typed_per_filter_config, v->n_typed_per_filter_config,
                        &vh->fcs);
        if (r < 0)
                return r;
        if (v->retry_policy) {
                old = push(c, "retry_policy");
                r = compile_retry(c, v->retry_policy, &vh->retry);
                pop(c, old);
                if (r < 0)
                        return r;
        }
        if (v->n_routes) {
                vh->routes = a_array(c, v->n_routes, sizeof(*vh->routes));
                if (!vh->routes)
                        return fail_nomem(c);
        }
        for (size_t i = 0; i < v->n_routes; i++) {
                struct wp_route *rt = &vh->routes[i];

                rt->vh = vh;
                old = push(c, "routes[%zu]", i);
                r = compile_route(c, v->routes[i], rt);
                pop(c, old);
                if (r < 0)
                        return r;
                if (!rt->retry)
                        rt->retry = vh->retry; /* the route's policy replaces the vhost's */
        }
        vh->n_routes = (uint32_t)v->n_routes;
        return 0;
}

/* ---- table ------------------------------------------------------------------------------ */

static int free_fc(struct wp_route_filter_config *fc, void *user)
{
        (void)user;
        if (fc->conf_free && fc->conf)
                fc->conf_free(fc->conf);
        fc->conf = NULL;
        return 0;
}

struct wp_route_table *wp_route_table_free(struct wp_route_table *t)
{
        if (!t)
                return NULL;
        wp_route_table_foreach_filter_config(t, free_fc, NULL);
        wp_match_regexes_free(t->res);
        for (struct ablock *b = t->arena, *next; b; b = next) {
                next = b->next;
                wp_free(b);
        }
        wp_free(t);
        return NULL;
}

static int visit_fcs(struct wp_route_filter_configs *fcs,
                     int (*cb)(struct wp_route_filter_config *fc, void *user), void *user)
{
        for (uint32_t i = 0; i < fcs->n; i++) {
                int r = cb(&fcs->v[i], user);
                if (r < 0)
                        return r;
        }
        return 0;
}

int wp_route_table_foreach_filter_config(struct wp_route_table *t,
                                         int (*cb)(struct wp_route_filter_config *fc, void *user),
                                         void *user)
{
        int r = visit_fcs(&t->fcs, cb, user);

        for (uint32_t i = 0; r >= 0 && i < t->n_vhosts; i++) {
                struct vhost *vh = &t->vhosts[i];

                r = visit_fcs(&vh->fcs, cb, user);
                for (uint32_t j = 0; r >= 0 && j < vh->n_routes; j++) {
                        struct wp_route *rt = &vh->routes[j];

                        r = visit_fcs(&rt->fcs, cb, user);
                        for (uint32_t k = 0; r >= 0 && k < rt->n_wc; k++)
                                r = visit_fcs(&rt->wc[k].fcs, cb, user);
                }
        }
        return r < 0 ? r : 0;
}

const char *wp_route_table_name(const struct wp_route_table *t)
{
        return t->name;
}

int wp_route_table_new(const Envoy__Config__Route__V3__RouteConfiguration *rc,
                       struct wp_route_table **ret, const char **reterr_desc)
{
        struct cc c = {0};
        struct dom *suffix = NULL, *prefix = NULL;
        size_t n_domains = 0, old;
        int r;

        errbuf[0] = 0;
        c.t = wp_calloc(1, sizeof(*c.t));
        if (!c.t) {
                r = fail_nomem(&c);
                goto out;
        }
        r = check_unknown(&c, &rc->base, 0);
        if (r < 0)
                goto err_free;
        r = copy_str(&c, "name", rc->name, false, &c.t->name, NULL);
        if (r < 0)
                goto err_free;
        if (rc->n_internal_only_headers) {
                r = fail(&c, -EINVAL, "internal_only_headers: not supported");
                goto err_free;
        }
        c.max_body = rc->max_direct_response_body_size_bytes
                         ? rc->max_direct_response_body_size_bytes->value
                         : WP_ROUTE_DEFAULT_DIRECT_BODY_MAX;
        c.t->ignore_port = rc->ignore_port_in_host_matching;
        c.t->most_specific_wins = rc->most_specific_header_mutations_wins;
        r = compile_header_ops(&c, "request_headers_to_add", rc->request_headers_to_add,
                               rc->n_request_headers_to_add, "request_headers_to_remove",
                               rc->request_headers_to_remove, rc->n_request_headers_to_remove,
                               &c.t->req_ops);
        if (r < 0)
                goto err_free;
        r = compile_header_ops(&c, "response_headers_to_add", rc->response_headers_to_add,
                               rc->n_response_headers_to_add, "response_headers_to_remove",
                               rc->response_headers_to_remove, rc->n_response_headers_to_remove,
                               &c.t->resp_ops);
        if (r < 0)
                goto err_free;
        r = compile_fcs(&c, (void *const *)rc->typed_per_filter_config,
                        rc->n_typed_per_filter_config, &c.t->fcs);
        if (r < 0)
                goto err_free;
        if (rc->n_virtual_hosts > WP_ROUTE_MAX_VHOSTS) {
                r = fail(&c, -E2BIG, "virtual_hosts: more than %u", WP_ROUTE_MAX_VHOSTS);
                goto err_free;
        }
        for (size_t i = 0; i < rc->n_virtual_hosts; i++) {
                n_domains += rc->virtual_hosts[i]->n_domains;
                if (n_domains > WP_ROUTE_MAX_DOMAINS) {
                        old = push(&c, "virtual_hosts[%zu].domains", i);
                        r = fail(&c, -E2BIG, "more than %u domains in all", WP_ROUTE_MAX_DOMAINS);
                        goto err_free;
                }
        }
        if (rc->n_virtual_hosts) {
                c.t->vhosts = a_array(&c, rc->n_virtual_hosts, sizeof(*c.t->vhosts));
                if (!c.t->vhosts) {
                        r = fail_nomem(&c);
                        goto err_free;
                }
        }
        c.t->exact_cap = 16;
        while (c.t->exact_cap < 2 * n_domains)
                c.t->exact_cap *= 2;
        c.t->exact = a_array(&c, c.t->exact_cap, sizeof(*c.t->exact));
        suffix = wp_calloc(n_domains + 1, sizeof(*suffix));
        prefix = wp_calloc(n_domains + 1, sizeof(*prefix));
        if (!c.t->exact || !suffix || !prefix) {
                r = fail_nomem(&c);
                goto err_free;
        }
        for (size_t i = 0; i < rc->n_virtual_hosts; i++) {
                const Envoy__Config__Route__V3__VirtualHost *v = rc->virtual_hosts[i];
                struct vhost *vh = &c.t->vhosts[i];

                old = push(&c, "virtual_hosts[%zu]", i);
                if (v->n_domains == 0) {
                        r = fail(&c, -EINVAL, "domains: at least one domain is required");
                        goto err_free;
                }
                for (size_t j = 0; j < v->n_domains; j++) {
                        size_t o2 = push(&c, "domains[%zu]", j);

                        r = add_domain(&c, vh, v->domains[j], suffix, &c.t->n_suffix, prefix,
                                       &c.t->n_prefix);
                        if (r < 0)
                                goto err_free;
                        pop(&c, o2);
                }
                r = compile_vhost(&c, v, vh);
                if (r < 0)
                        goto err_free;
                pop(&c, old);
                c.t->n_vhosts++;
        }
        if (c.t->n_suffix) {
                qsort(suffix, c.t->n_suffix, sizeof(*suffix), cmp_dom_len_desc);
                c.t->suffix = a_array(&c, c.t->n_suffix, sizeof(*suffix));
                if (!c.t->suffix) {
                        r = fail_nomem(&c);
                        goto err_free;
                }
                memcpy(c.t->suffix, suffix, c.t->n_suffix * sizeof(*suffix));
        }
        if (c.t->n_prefix) {
                qsort(prefix, c.t->n_prefix, sizeof(*prefix), cmp_dom_len_desc);
                c.t->prefix = a_array(&c, c.t->n_prefix, sizeof(*prefix));
                if (!c.t->prefix) {
                        r = fail_nomem(&c);
                        goto err_free;
                }
                memcpy(c.t->prefix, prefix, c.t->n_prefix * sizeof(*prefix));
        }
        wp_free(suffix);
        wp_free(prefix);
        *ret = c.t;
        return 0;

err_free:
        wp_free(suffix);
        wp_free(prefix);
        wp_route_table_free(c.t);
out:
        *reterr_desc = errbuf;
        return r;
}

/* ---- matching ------------------------------------------------------------------------- */

static bool ieq(const char *a, const char *b, size_t n)
{
        for (size_t i = 0; i < n; i++)
                if (lower(a[i]) != lower(b[i]))
                        return false;
        return true;
}

/* Whether pat (lower-cased already when ic) occurs at v. */
static bool eq_at(const char *v, const char *pat, size_t n, bool ic)
{
        return ic ? eq_lc(v, pat, n) : memcmp(v, pat, n) == 0;
}

static bool hdrm_match(const struct wp_http_request *req, const struct wp_hdrmatch *hm, char *jbuf)
{
        /* a repeated header too long to join fails the matcher, inverted or not */
        return wp_hdrmatch_match(hm, req, jbuf, WP_ROUTE_MAX_JOINED_HEADER) == 1;
}

/* First value of query parameter name in the query q[0..n) (not decoded, as Envoy). */
static bool query_param(const char *q, size_t n, const char *name, size_t nlen, const char **ret,
                        size_t *ret_len)
{
        size_t i = 0;

        while (i < n) {
                size_t e = i;
                while (e < n && q[e] != '&')
                        e++;
                size_t eq = i;
                while (eq < e && q[eq] != '=')
                        eq++;
                if (eq - i == nlen && memcmp(q + i, name, nlen) == 0) {
                        *ret = eq < e ? q + eq + 1 : q + e;
                        *ret_len = eq < e ? e - eq - 1 : 0;
                        return true;
                }
                i = e + 1;
        }
        return false;
}

static bool is_grpc(const struct wp_http_request *req)
{
        uint32_t n;
        const char *ct = wp_headers_get(&req->headers, "content-type", &n);
        static const char g[] = "application/grpc";

        if (!ct || n < sizeof(g) - 1 || memcmp(ct, g, sizeof(g) - 1) != 0)
                return false;
        return n == sizeof(g) - 1 || ct[sizeof(g) - 1] == '+' || ct[sizeof(g) - 1] == ';';
}

static bool route_matches(const struct wp_route *rt, const struct wp_http_request *req,
                          const char *path, size_t plen, size_t noq, uint64_t random, char *jbuf)
{
        bool connect = req->method && strcmp(req->method, "CONNECT") == 0;

        switch (rt->path_kind) {
        case PK_CONNECT:
                if (!connect)
                        return false;
                break;
        case PK_PREFIX:
                /* Envoy: a prefix applies to the whole :path, query included */
                if (!req->path || plen < rt->path_len ||
                    !eq_at(path, rt->path_s, rt->path_len, !rt->case_sensitive))
                        return false;
                break;
        case PK_PATH:
                if (!req->path || noq != rt->path_len ||
                    !eq_at(path, rt->path_s, noq, !rt->case_sensitive))
                        return false;
                break;
        case PK_SEP_PREFIX:
                if (!req->path || noq < rt->path_len ||
                    !eq_at(path, rt->path_s, rt->path_len, !rt->case_sensitive) ||
                    (noq > rt->path_len && path[rt->path_len] != '/'))
                        return false;
                break;
        case PK_REGEX:
                if (!req->path || !wp_re2_full_match(rt->path_re, path, noq))
                        return false;
                break;
        }
        if (rt->has_runtime_fraction && random % rt->rf_den >= rt->rf_num)
                return false;
        for (uint32_t i = 0; i < rt->n_headers; i++)
                if (!hdrm_match(req, &rt->headers[i], jbuf))
                        return false;
        if (rt->n_qps) {
                const char *q = noq < plen && path[noq] == '?' ? path + noq + 1 : "";
                size_t qn = 0;

                if (q[0] || (noq < plen && path[noq] == '?')) {
                        const char *hash = memchr(q, '#', plen - noq - 1);
                        qn = hash ? (size_t)(hash - q) : plen - noq - 1;
                }
                for (uint32_t i = 0; i < rt->n_qps; i++) {
                        const struct qpm *qp = &rt->qps[i];
                        const char *v;
                        size_t vn;

                        if (!query_param(q, qn, qp->name, qp->name_len, &v, &vn))
                                return false;
                        if (qp->has_sm && !wp_strmatch_match(&qp->sm, v, vn))
                                return false;
                }
        }
        if (rt->grpc && !is_grpc(req))
                return false;
        return true;
}

/* Offset of the port's ':' in host, or len when there is no numeric port (Envoy's rule). */
static size_t port_start(const char *h, size_t len)
{
        size_t i = len;

        while (i > 0 && h[i - 1] != ':')
                i--;
        if (i == 0)
                return len;
        for (size_t j = i; j < len; j++)
                if (h[j] == ']')
                        return len; /* "[v6]" without port */
        if (i == len)
                return len;
        for (size_t j = i; j < len; j++)
                if (h[j] < '0' || h[j] > '9')
                        return len;
        return i - 1;
}

static const struct vhost *find_vhost(const struct wp_route_table *t, const char *h, size_t n)
{
        const struct dom *d;

        if (t->n_exact) {
                d = exact_slot(t, h, n);
                if (d->s)
                        return d->vh;
        }
        for (uint32_t i = 0; i < t->n_suffix; i++) {
                d = &t->suffix[i];
                /* the wildcard matches at least one character */
                if (n > d->len && eq_lc(h + n - d->len, d->s, d->len))
                        return d->vh;
        }
        for (uint32_t i = 0; i < t->n_prefix; i++) {
                d = &t->prefix[i];
                if (n > d->len && eq_lc(h, d->s, d->len))
                        return d->vh;
        }
        return NULL;
}

static const struct vhost *select_vhost(const struct wp_route_table *t, const char *host)
{
        size_t n = host ? strlen(host) : 0;
        size_t ps = port_start(host ? host : "", n);
        const struct vhost *vh;

        if (!host)
                host = "";
        if (t->n_exact || t->n_suffix || t->n_prefix) {
                if (t->ignore_port)
                        n = ps;
                vh = find_vhost(t, host, n);
                if (vh)
                        return vh;
                if (ps < n) {
                        vh = find_vhost(t, host, ps);
                        if (vh)
                                return vh;
                }
        }
        return t->star;
}

struct writer {
        char *p;
        size_t cap, len;
        bool overflow;
};

static void w_put(struct writer *w, const char *s, size_t n)
{
        if (w->overflow || n >= w->cap - w->len) {
                w->overflow = true;
                return;
        }
        memcpy(w->p + w->len, s, n);
        w->len += n;
        w->p[w->len] = 0;
}

static void w_puts(struct writer *w, const char *s)
{
        w_put(w, s, strlen(s));
}

/* Length of the part of the request path the route matched (what prefix_rewrite replaces). */
static size_t matched_len(const struct wp_route *rt, size_t noq)
{
        switch (rt->path_kind) {
        case PK_PREFIX:
        case PK_SEP_PREFIX:
        case PK_PATH:
                return rt->path_len;
        default:
                return noq;
        }
}

/* Writes the rewritten path (prefix or regex rewrite) of path[0..plen) to w. */
static int write_rewrite(const struct wp_route *rt, const char *path, size_t plen, size_t noq,
                         struct writer *w)
{
        if (rt->rewrite_kind == RW_PREFIX) {
                size_t m = matched_len(rt, noq);

                w_put(w, rt->rewrite_s, rt->rewrite_len);
                w_put(w, path + m, plen - m);
                return 0;
        }
        /* RW_REGEX: the path without the query is rewritten; the query is kept */
        if (w->overflow || w->cap - w->len < 1)
                return -ENOSPC;
        ssize_t n = wp_re2_replace_all(rt->rewrite_re, path, noq, rt->rewrite_s, rt->rewrite_len,
                                       w->p + w->len, w->cap - w->len);
        if (n < 0) {
                w->overflow = true;
                return (int)n;
        }
        w->len += (size_t)n;
        w_put(w, path + noq, plen - noq);
        return 0;
}

static bool ieq_str(const char *a, const char *b)
{
        size_t n = strlen(a);
        return n == strlen(b) && ieq(a, b, n);
}

/* Location for a redirect route (Envoy's newUri), into ret->buf. */
static int build_location(const struct wp_route *rt, const struct wp_http_request *req,
                          const char *path, size_t plen, size_t noq, struct wp_route_result *ret)
{
        struct writer w = {ret->buf, ret->buf_cap, 0, ret->buf_cap == 0};
        const char *scheme = req->scheme && req->scheme[0] ? req->scheme : "http";
        const char *host = req->authority ? req->authority : "";
        size_t hlen = strlen(host);
        char port[8] = "";
        size_t path_at;

        if (rt->scheme_redirect)
                scheme = rt->scheme_redirect;
        w_puts(&w, scheme);
        w_put(&w, "://", 3);
        if (rt->port_redirect)
                snprintf(port, sizeof(port), ":%u", rt->port_redirect);
        if (rt->host_redirect) {
                w_put(&w, rt->host_redirect, rt->host_redirect_len);
        } else {
                size_t ps = port_start(host, hlen);

                if (ps < hlen) {
                        /* Envoy strips the request's port when a port is given, or when the
                         * scheme changes away from the one whose default port it is (judged
                         * by x-forwarded-proto, else the request's scheme). */
                        const char *proto =
                            wp_headers_get(&req->headers, "x-forwarded-proto", NULL);
                        bool strip = port[0] != 0;

                        if (!proto)
                                proto = req->scheme && req->scheme[0] ? req->scheme : "http";
                        if (!ieq_str(scheme, proto)) {
                                strip |= ieq_str(proto, "https") && strcmp(host + ps, ":443") == 0;
                                strip |= ieq_str(proto, "http") && strcmp(host + ps, ":80") == 0;
                        }
                        if (strip)
                                hlen = ps;
                }
                w_put(&w, host, hlen);
        }
        w_puts(&w, port);
        path_at = w.len;
        w_put(&w, "/", 1); /* in case the new path lacks its leading slash */
        switch (rt->rewrite_kind) {
        case RW_PATH:
                w_put(&w, rt->rewrite_s, rt->rewrite_len);
                if (!rt->path_redirect_has_query)
                        w_put(&w, path + noq, plen - noq);
                break;
        case RW_PREFIX:
        case RW_REGEX: {
                int r = write_rewrite(rt, path, plen, noq, &w);
                if (r < 0)
                        return r;
                break;
        }
        default:
                w_put(&w, path, plen);
                break;
        }
        if (w.overflow)
                return -ENOSPC;
        if (w.len > path_at + 1 && w.p[path_at + 1] == '/') {
                memmove(w.p + path_at, w.p + path_at + 1, w.len - path_at - 1);
                w.len--;
                w.p[w.len] = 0;
        }
        if (rt->strip_query && !(rt->rewrite_kind == RW_PATH && rt->path_redirect_has_query)) {
                char *q = memchr(w.p + path_at, '?', w.len - path_at);
                if (q) {
                        w.len = (size_t)(q - w.p);
                        *q = 0;
                }
        }
        ret->location = w.p;
        ret->location_len = (uint32_t)w.len;
        return 0;
}

static const char *req_header(const struct wp_http_request *req, const char *name, uint32_t *n)
{
        const char *v = wp_headers_get(&req->headers, name, n);
        return v && *n ? v : NULL;
}

static void add_levels(struct wp_route_result *ret, const struct wp_route_table *t,
                       const struct vhost *vh, const struct wp_route *rt, const struct wcluster *wc)
{
        const struct wp_route_header_ops *rq[4], *rs[4];
        const struct wp_route_filter_configs *fc[4];
        unsigned n = 0, k = 0;

        if (wc) {
                rq[n] = &wc->req_ops;
                rs[n++] = &wc->resp_ops;
        }
        rq[n] = &rt->req_ops;
        rs[n++] = &rt->resp_ops;
        rq[n] = &vh->req_ops;
        rs[n++] = &vh->resp_ops;
        rq[n] = &t->req_ops;
        rs[n++] = &t->resp_ops;
        for (unsigned i = 0; i < n; i++) {
                unsigned j = t->most_specific_wins ? n - 1 - i : i;

                if (rq[j]->n_add || rq[j]->n_remove)
                        ret->request_ops[ret->n_request_ops++] = rq[j];
                if (rs[j]->n_add || rs[j]->n_remove)
                        ret->response_ops[ret->n_response_ops++] = rs[j];
        }
        if (wc && wc->fcs.n)
                fc[k++] = &wc->fcs;
        if (rt->fcs.n)
                fc[k++] = &rt->fcs;
        if (vh->fcs.n)
                fc[k++] = &vh->fcs;
        if (t->fcs.n)
                fc[k++] = &t->fcs;
        for (unsigned i = 0; i < k; i++)
                ret->filter_configs[i] = fc[i];
        ret->n_filter_configs = k;
}

static bool parse_u64(const char *s, size_t n, uint64_t *ret)
{
        uint64_t v = 0;

        if (n == 0 || n > 20)
                return false;
        for (size_t i = 0; i < n; i++) {
                if (s[i] < '0' || s[i] > '9')
                        return false;
                if (v > (UINT64_MAX - (uint64_t)(s[i] - '0')) / 10)
                        return false;
                v = v * 10 + (uint64_t)(s[i] - '0');
        }
        *ret = v;
        return true;
}

int wp_route_match(const struct wp_route_table *t, const struct wp_http_request *req,
                   uint64_t random, struct wp_route_result *ret)
{
        char jbuf[WP_ROUTE_MAX_JOINED_HEADER];
        const char *path = req->path ? req->path : "";
        size_t plen = strlen(path), noq = strcspn(path, "?#");
        const struct vhost *vh;
        const struct wp_route *rt = NULL;
        const struct wcluster *wc = NULL;
        char *buf = ret->buf;
        size_t cap = ret->buf_cap;
        int r;

        wp_route_result_init(ret, buf, cap);
        vh = select_vhost(t, req->authority);
        if (!vh)
                return 0;
        ret->vhost_name = vh->name;
        if (vh->require_tls != ENVOY__CONFIG__ROUTE__V3__VIRTUAL_HOST__TLS_REQUIREMENT_TYPE__NONE) {
                const char *xfp = wp_headers_get(&req->headers, "x-forwarded-proto", NULL);
                const char *scheme = xfp ? xfp : req->scheme ? req->scheme : "http";
                bool internal = wp_headers_get(&req->headers, "x-envoy-internal", NULL) != NULL;

                if (!ieq_str(scheme, "https") &&
                    (vh->require_tls ==
                         ENVOY__CONFIG__ROUTE__V3__VIRTUAL_HOST__TLS_REQUIREMENT_TYPE__ALL ||
                     !internal))
                        rt = &vh->tls_redirect;
        }
        for (uint32_t i = 0; !rt && i < vh->n_routes; i++)
                if (route_matches(&vh->routes[i], req, path, plen, noq, random, jbuf))
                        rt = &vh->routes[i];
        if (!rt)
                return 0;
        ret->route = rt;
        ret->route_name = rt->name;
        ret->action = rt->action;
        switch (rt->action) {
        case WP_ROUTE_ACTION_CLUSTER: {
                uint32_t n;
                const char *v;

                ret->cluster_not_found_status = rt->cluster_not_found_status;
                if (rt->cluster_kind == CK_NAME) {
                        ret->cluster = rt->cluster;
                        ret->cluster_len = rt->cluster_len;
                } else if (rt->cluster_kind == CK_HEADER) {
                        if ((v = req_header(req, rt->cluster, &n))) {
                                ret->cluster = v;
                                ret->cluster_len = n;
                        }
                } else {
                        uint64_t x = random, acc = 0;

                        if (rt->wc_random_header && (v = req_header(req, rt->wc_random_header, &n)))
                                parse_u64(v, n, &x);
                        x %= rt->wc_total;
                        for (uint32_t i = 0; i < rt->n_wc; i++) {
                                acc += rt->wc[i].weight;
                                if (x < acc) {
                                        wc = &rt->wc[i];
                                        break;
                                }
                        }
                        if (wc->name) {
                                ret->cluster = wc->name;
                                ret->cluster_len = wc->name_len;
                        } else if ((v = req_header(req, wc->cluster_header, &n))) {
                                ret->cluster = v;
                                ret->cluster_len = n;
                        }
                }
                if (rt->rewrite_kind == RW_PREFIX || rt->rewrite_kind == RW_REGEX) {
                        struct writer w = {buf, cap, 0, cap == 0};

                        r = write_rewrite(rt, path, plen, noq, &w);
                        if (r < 0 || w.overflow)
                                return -ENOSPC;
                        ret->path = w.p;
                        ret->path_len = (uint32_t)w.len;
                }
                if (wc && wc->host_rewrite) {
                        ret->host = wc->host_rewrite;
                        ret->host_len = wc->host_rewrite_len;
                } else if (rt->host_rewrite_kind == HR_LITERAL) {
                        ret->host = rt->host_rewrite;
                        ret->host_len = rt->host_rewrite_len;
                } else if (rt->host_rewrite_kind == HR_HEADER &&
                           (v = req_header(req, rt->host_rewrite, &n))) {
                        ret->host = v;
                        ret->host_len = n;
                }
                ret->auto_host_rewrite = rt->host_rewrite_kind == HR_AUTO;
                ret->append_x_forwarded_host = rt->append_x_forwarded_host;
                ret->timeout_ms = rt->timeout_ms;
                ret->idle_timeout_ms = rt->idle_timeout_ms;
                ret->has_max_grpc_timeout = rt->has_max_grpc_timeout;
                ret->max_grpc_timeout_ms = rt->max_grpc_timeout_ms;
                ret->grpc_timeout_offset_ms = rt->grpc_timeout_offset_ms;
                ret->max_stream_duration_ms = rt->max_stream_duration_ms;
                ret->retry = rt->retry;
                ret->hash_policies = rt->hash;
                ret->n_hash_policies = rt->n_hash;
                ret->mirrors = rt->mirrors;
                ret->n_mirrors = rt->n_mirrors;
                ret->upgrades = rt->upgrades;
                ret->n_upgrades = rt->n_upgrades;
                ret->include_attempt_count_in_request = vh->include_req_attempt;
                ret->include_attempt_count_in_response = vh->include_resp_attempt;
                break;
        }
        case WP_ROUTE_ACTION_REDIRECT:
                ret->status = rt->status;
                r = build_location(rt, req, path, plen, noq, ret);
                if (r < 0)
                        return -ENOSPC;
                break;
        case WP_ROUTE_ACTION_DIRECT:
                ret->status = rt->status;
                ret->body = rt->body;
                ret->body_len = rt->body_len;
                /* Envoy sets Location to the request URL for 201 and 3xx direct responses */
                if (rt->status == 201 || (rt->status >= 300 && rt->status < 400)) {
                        r = build_location(rt, req, path, plen, noq, ret);
                        if (r < 0)
                                return -ENOSPC;
                }
                break;
        default:
                break;
        }
        add_levels(ret, t, vh, rt, wc);
        return 0;
}

const struct wp_route_filter_config *wp_route_result_filter_config(const struct wp_route_result *r,
                                                                   const char *filter_name)
{
        for (unsigned i = 0; i < r->n_filter_configs; i++)
                for (uint32_t j = 0; j < r->filter_configs[i]->n; j++)
                        if (strcmp(r->filter_configs[i]->v[j].filter_name, filter_name) == 0)
                                return &r->filter_configs[i]->v[j];
        return NULL;
}

bool wp_route_mirror_sampled(const struct wp_route_mirror *m, uint64_t random)
{
        return m->denominator && random % m->denominator < m->numerator;
}

/* ---- header mutations ------------------------------------------------------------------- */

static bool has_header(const struct wp_headers *h, const char *name, uint32_t n)
{
        for (uint32_t i = 0; i < h->n; i++)
                if (h->v[i].name_len == n && memcmp(h->v[i].name, name, n) == 0)
                        return true;
        return false;
}

static int apply_level(const struct wp_route_header_ops *ops, struct wp_headers *h)
{
        uint64_t active[(WP_ROUTE_MAX_HEADER_OPS + 63) / 64] = {0};
        int r;

        for (uint32_t i = 0; i < ops->n_remove; i++)
                wp_headers_remove(h, ops->remove[i].s);
        /* appends first, deciding the conditional overwrites as they come (Envoy's order) */
        for (uint32_t i = 0; i < ops->n_add; i++) {
                const struct wp_route_header_add *a = &ops->add[i];

                switch (a->append) {
                case WP_HDR_ADD_IF_ABSENT:
                        if (has_header(h, a->name, a->name_len))
                                break;
                        /* fall through */
                case WP_HDR_APPEND_IF_EXISTS_OR_ADD:
                        r = wp_headers_add(h, a->name, a->name_len, a->value, a->value_len);
                        if (r < 0)
                                return r;
                        break;
                case WP_HDR_OVERWRITE_IF_EXISTS:
                        if (!has_header(h, a->name, a->name_len))
                                break;
                        /* fall through */
                case WP_HDR_OVERWRITE_IF_EXISTS_OR_ADD:
                        active[i / 64] |= UINT64_C(1) << (i % 64);
                        break;
                }
        }
        for (uint32_t i = 0; i < ops->n_add; i++) {
                const struct wp_route_header_add *a = &ops->add[i];

                if (!(active[i / 64] & (UINT64_C(1) << (i % 64))))
                        continue;
                wp_headers_remove(h, a->name);
                r = wp_headers_add(h, a->name, a->name_len, a->value, a->value_len);
                if (r < 0)
                        return r;
        }
        return 0;
}

int wp_route_headers_apply(const struct wp_route_header_ops *const *ops, unsigned n,
                           struct wp_headers *h)
{
        for (unsigned i = 0; i < n; i++) {
                int r = apply_level(ops[i], h);
                if (r < 0)
                        return r;
        }
        return 0;
}
