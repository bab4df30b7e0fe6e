/*
 * RBAC compiler and evaluator (see rbac.h for the semantics and the facts each matcher reads).
 *
 * A config is compiled into a tree of small nodes carved from a per-engine bump pool (one
 * wp_free per block at the end); strings are copied (lower-cased for ignore_case), CIDRs
 * parsed and masked, header names classified (pseudo-header or list lookup), policy details
 * strings preformatted. Evaluation walks the tree with no allocation; recursion depth is
 * bounded by FLT_RBAC_MAX_DEPTH at compile time.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "filters/matcher.h"
#include "filters/rbac.h"
#include "waypoint/base/alloc.h"
#include "waypoint/base/re2_shim.h"

#include "envoy/config/rbac/v3/rbac.pb-c.h"
#include "envoy/extensions/filters/http/rbac/v3/rbac.pb-c.h"
#include "envoy/extensions/filters/network/rbac/v3/rbac.pb-c.h"

#define PEER_PRINCIPAL_KEY "io.istio.peer_principal"
#define URI_TEMPLATE_TYPE_URL                                                                      \
        "type.googleapis.com/envoy.extensions.path.match.uri_template.v3.UriTemplateMatchConfig"
#define DETAILS_PREFIX "rbac_access_denied_matched_policy["
#define DETAILS_NONE   DETAILS_PREFIX "none]"
#define SCRATCH_SIZE   4096 /* a repeated header joined; longer ones go to the heap */

/* ---- bump pool: every compiled object of one engine ---- */

struct pool_blk {
        struct pool_blk *next;
        size_t used, cap;
        _Alignas(16) unsigned char data[];
};

struct pool {
        struct pool_blk *head;
};

static void *pool_alloc(struct pool *p, size_t n)
{
        n = (n + 15) & ~(size_t)15;
        if (!p->head || p->head->cap - p->head->used < n) {
                size_t cap = n > 4096 ? n : 4096;
                struct pool_blk *b = wp_malloc(sizeof(*b) + cap);
                if (!b)
                        return NULL;
                b->next = p->head;
                b->used = 0;
                b->cap = cap;
                p->head = b;
        }
        void *r = p->head->data + p->head->used;
        p->head->used += n;
        memset(r, 0, n);
        return r;
}

static void pool_done(struct pool *p)
{
        while (p->head) {
                struct pool_blk *b = p->head;
                p->head = b->next;
                wp_free(b);
        }
}

/* ---- compiled matchers (string and header matchers: filters/matcher.h) ---- */

struct cidr {
        uint8_t family; /* AF_INET / AF_INET6 */
        uint8_t plen;
        uint8_t addr[16]; /* masked */
};

enum { V_NULL, V_DOUBLE, V_STRING, V_BOOL, V_PRESENT, V_LIST, V_OR };

struct val_m {
        uint8_t kind;
        bool b;         /* V_BOOL, V_PRESENT */
        bool dbl_range; /* V_DOUBLE: range [lo, hi) or exact lo */
        double lo, hi;
        struct wp_strmatch str; /* V_STRING */
        struct val_m **v;       /* V_LIST (one), V_OR (n) */
        uint32_t n;
};

struct meta_m {
        const char *key; /* filter SEP seg SEP seg ... */
        uint32_t key_len;
        bool invert;
        struct val_m *v;
};

enum { T_LIT, T_SEG, T_TEXT };

struct tok {
        uint8_t kind;
        uint32_t len;
        const char *s;
};

struct tmpl {
        struct tok *t;
        uint32_t n;
};

enum {
        N_ANY,
        N_AND,
        N_OR,
        N_NOT,
        N_HEADER,
        N_PATH,
        N_TEMPLATE,
        N_DST_IP,
        N_DST_PORT,
        N_DST_RANGE,
        N_META,
        N_SNI,
        N_AUTHN, /* str NULL: any authenticated peer */
        N_SRC_IP,
        N_PEER, /* filter_state io.istio.peer_principal */
};

struct node {
        uint8_t kind;
        uint32_t n;
        union {
                struct node **kids;
                const struct wp_hdrmatch *hdr;
                const struct wp_strmatch *str;
                const struct cidr *cidr;
                struct {
                        uint32_t lo, hi; /* [lo, hi) */
                } port;
                const struct meta_m *meta;
                const struct tmpl *tmpl;
        } u;
};

struct policy {
        const char *name;
        const char *details;
        struct node **perms, **princs;
        uint32_t n_perms, n_princs;
};

struct flt_rbac_engine {
        enum flt_rbac_action action;
        struct policy *pol;
        uint32_t n_pol;
        struct pool pool;
        struct wp_match_regex *regexes;
};

/* ---- compile context and errors ---- */

struct cc {
        struct flt_rbac_engine *e;
        unsigned nodes;
        size_t plen;
        char path[512];
        const char **reterr_desc;
        bool *reterr_heap;
};

static size_t path_push(struct cc *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static size_t path_push(struct cc *c, const char *fmt, ...)
{
        size_t old = c->plen;
        if (c->plen < sizeof(c->path) - 1) {
                va_list ap;
                va_start(ap, fmt);
                int n = vsnprintf(c->path + c->plen, sizeof(c->path) - c->plen, fmt, ap);
                va_end(ap);
                if (n > 0)
                        c->plen += (size_t)n;
                if (c->plen > sizeof(c->path) - 1)
                        c->plen = sizeof(c->path) - 1;
        }
        return old;
}

static void path_pop(struct cc *c, size_t old)
{
        c->plen = old;
        c->path[old] = '\0';
}

/* Records "path: msg" as the error (heap; static fallback on OOM) and returns err. */
static int fail(struct cc *c, int err, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int fail(struct cc *c, int err, const char *fmt, ...)
{
        if (err == -ENOMEM) {
                *c->reterr_desc = "rbac: out of memory";
                *c->reterr_heap = false;
                return err;
        }
        char msg[256];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(msg, sizeof(msg), fmt, ap);
        va_end(ap);
        size_t n = c->plen + 2 + strlen(msg) + 1;
        char *d = wp_malloc(n);
        if (!d) {
                *c->reterr_desc = "rbac: invalid config (and out of memory describing it)";
                *c->reterr_heap = false;
                return err;
        }
        snprintf(d, n, "%s%s%s", c->path, c->plen ? ": " : "", msg);
        *c->reterr_desc = d;
        *c->reterr_heap = true;
        return err;
}

/* Fields our proto subset does not know arrive as unknown fields: never ignore them. */
static int check_known(struct cc *c, const ProtobufCMessage *m)
{
        if (m && m->n_unknown_fields)
                return fail(c, -EINVAL, "field %u of %s is not supported",
                            (unsigned)m->unknown_fields[0].tag, m->descriptor->name);
        return 0;
}

static void *cc_alloc(struct cc *c, size_t n)
{
        return pool_alloc(&c->e->pool, n);
}

static char *cc_strdup(struct cc *c, const char *s, size_t n, bool lower)
{
        char *d = cc_alloc(c, n + 1);
        if (!d)
                return NULL;
        for (size_t i = 0; i < n; i++) {
                char ch = s[i];
                d[i] = lower && ch >= 'A' && ch <= 'Z' ? (char)(ch + 32) : ch;
        }
        d[n] = '\0';
        return d;
}

static struct node *new_node(struct cc *c, uint8_t kind)
{
        if (++c->nodes > FLT_RBAC_MAX_NODES) {
                fail(c, -E2BIG, "more than %u matchers", FLT_RBAC_MAX_NODES);
                return NULL;
        }
        struct node *n = cc_alloc(c, sizeof(*n));
        if (!n) {
                fail(c, -ENOMEM, "oom");
                return NULL;
        }
        n->kind = kind;
        return n;
}

/* ---- compile: leaves ---- */

static void *m_alloc(void *user, size_t n)
{
        return cc_alloc(user, n);
}

/* Words the shared matchers' errors as this module does. */
static int m_fail(void *user, const struct wp_match_error *e)
{
        struct cc *c = user;

        if (e->where[0])
                path_push(c, ".%s", e->where);
        switch (e->code) {
        case WP_MATCH_E_NOMEM:
                return fail(c, -ENOMEM, "oom");
        case WP_MATCH_E_UNKNOWN_FIELD:
                return fail(c, e->err, "field %u of %s is not supported", e->tag, e->message);
        case WP_MATCH_E_NO_PATTERN:
                return fail(c, e->err, "string matcher without a match pattern");
        case WP_MATCH_E_CUSTOM:
                path_push(c, ".custom");
                return fail(c, e->err, "not supported");
        case WP_MATCH_E_EMPTY:
                return fail(c, e->err, "empty %s", e->field);
        case WP_MATCH_E_EMPTY_LEGACY:
                return fail(c, e->err, "empty header match value");
        case WP_MATCH_E_REGEX_ICASE:
                return fail(c, e->err, "ignore_case has no effect for safe_regex");
        case WP_MATCH_E_REGEX:
                return fail(c, e->err, "safe_regex \"%.100s\": %s", e->pattern, e->detail);
        case WP_MATCH_E_REGEX_TOO_LONG:
                return fail(c, e->err, "safe_regex longer than %u bytes", WP_RE2_MAX_PATTERN);
        case WP_MATCH_E_NAME_EMPTY:
                return fail(c, e->err, "header matcher without a name");
        case WP_MATCH_E_NAME_INVALID:
                return fail(c, e->err, "invalid header name \"%.100s\"", e->pattern);
        default:
                return fail(c, e->err, "%s: invalid", e->field);
        }
}

static struct wp_match_cc mcc(struct cc *c)
{
        return (struct wp_match_cc){
                .alloc = m_alloc, .fail = m_fail, .user = c, .regexes = &c->e->regexes};
}

static int compile_str(struct cc *c, const Envoy__Type__Matcher__V3__StringMatcher *pb,
                       struct wp_strmatch *m)
{
        struct wp_match_cc mc = mcc(c);

        return wp_strmatch_compile(&mc, pb, m);
}

static int compile_header(struct cc *c, const Envoy__Config__Route__V3__HeaderMatcher *pb,
                          struct node *n)
{
        struct wp_match_cc mc = mcc(c);
        struct wp_hdrmatch *h = cc_alloc(c, sizeof(*h));
        int r;

        if (!h)
                return fail(c, -ENOMEM, "oom");
        if ((r = wp_hdrmatch_compile(&mc, pb, h)) < 0)
                return r;
        n->u.hdr = h;
        return 0;
}

static int compile_cidr(struct cc *c, const Envoy__Config__Core__V3__CidrRange *pb, struct node *n)
{
        int r = check_known(c, &pb->base);
        if (r < 0)
                return r;
        if (pb->prefix_len && (r = check_known(c, &pb->prefix_len->base)) < 0)
                return r;
        struct cidr *x = cc_alloc(c, sizeof(*x));
        if (!x)
                return fail(c, -ENOMEM, "oom");
        const char *a = pb->address_prefix ? pb->address_prefix : "";
        unsigned max;
        if (inet_pton(AF_INET, a, x->addr) == 1) {
                x->family = AF_INET;
                max = 32;
        } else if (inet_pton(AF_INET6, a, x->addr) == 1) {
                x->family = AF_INET6;
                max = 128;
        } else {
                return fail(c, -EINVAL, "address_prefix \"%.64s\" is not an IP address", a);
        }
        uint32_t plen = pb->prefix_len ? pb->prefix_len->value : 0;
        if (plen > max)
                return fail(c, -EINVAL, "prefix_len %u is longer than %u", plen, max);
        x->plen = (uint8_t)plen;
        /* Mask the host bits so matching compares whole bytes + one partial byte. */
        for (unsigned i = 0; i < max / 8; i++) {
                unsigned bits = plen > i * 8 ? plen - i * 8 : 0;
                if (bits < 8)
                        x->addr[i] &= (uint8_t)(0xff00u >> bits);
        }
        n->u.cidr = x;
        return 0;
}

static int compile_value(struct cc *c, const Envoy__Type__Matcher__V3__ValueMatcher *pb,
                         unsigned depth, struct val_m **ret)
{
        int r = check_known(c, &pb->base);
        if (r < 0)
                return r;
        if (depth > FLT_RBAC_MAX_DEPTH)
                return fail(c, -E2BIG, "value matchers nested deeper than %u", FLT_RBAC_MAX_DEPTH);
        struct val_m *v = cc_alloc(c, sizeof(*v));
        if (!v)
                return fail(c, -ENOMEM, "oom");
        size_t old;
        switch (pb->match_pattern_case) {
        case ENVOY__TYPE__MATCHER__V3__VALUE_MATCHER__MATCH_PATTERN_NULL_MATCH:
                v->kind = V_NULL;
                break;
        case ENVOY__TYPE__MATCHER__V3__VALUE_MATCHER__MATCH_PATTERN_DOUBLE_MATCH: {
                const Envoy__Type__Matcher__V3__DoubleMatcher *d = pb->double_match;
                if ((r = check_known(c, &d->base)) < 0)
                        return r;
                v->kind = V_DOUBLE;
                if (d->match_pattern_case ==
                    ENVOY__TYPE__MATCHER__V3__DOUBLE_MATCHER__MATCH_PATTERN_RANGE) {
                        if ((r = check_known(c, &d->range->base)) < 0)
                                return r;
                        v->dbl_range = true;
                        v->lo = d->range->start;
                        v->hi = d->range->end;
                } else if (d->match_pattern_case ==
                           ENVOY__TYPE__MATCHER__V3__DOUBLE_MATCHER__MATCH_PATTERN_EXACT) {
                        v->lo = d->exact;
                } else {
                        return fail(c, -EINVAL, "double_match without a match pattern");
                }
                break;
        }
        case ENVOY__TYPE__MATCHER__V3__VALUE_MATCHER__MATCH_PATTERN_STRING_MATCH:
                v->kind = V_STRING;
                old = path_push(c, ".string_match");
                if ((r = compile_str(c, pb->string_match, &v->str)) < 0)
                        return r;
                path_pop(c, old);
                break;
        case ENVOY__TYPE__MATCHER__V3__VALUE_MATCHER__MATCH_PATTERN_BOOL_MATCH:
                v->kind = V_BOOL;
                v->b = pb->bool_match;
                break;
        case ENVOY__TYPE__MATCHER__V3__VALUE_MATCHER__MATCH_PATTERN_PRESENT_MATCH:
                v->kind = V_PRESENT;
                v->b = pb->present_match;
                break;
        case ENVOY__TYPE__MATCHER__V3__VALUE_MATCHER__MATCH_PATTERN_LIST_MATCH: {
                const Envoy__Type__Matcher__V3__ListMatcher *l = pb->list_match;
                if ((r = check_known(c, &l->base)) < 0)
                        return r;
                if (l->match_pattern_case !=
                    ENVOY__TYPE__MATCHER__V3__LIST_MATCHER__MATCH_PATTERN_ONE_OF)
                        return fail(c, -EINVAL, "list_match without one_of");
                v->kind = V_LIST;
                v->n = 1;
                if (!(v->v = cc_alloc(c, sizeof(*v->v))))
                        return fail(c, -ENOMEM, "oom");
                old = path_push(c, ".list_match.one_of");
                if ((r = compile_value(c, l->one_of, depth + 1, &v->v[0])) < 0)
                        return r;
                path_pop(c, old);
                break;
        }
        case ENVOY__TYPE__MATCHER__V3__VALUE_MATCHER__MATCH_PATTERN_OR_MATCH: {
                const Envoy__Type__Matcher__V3__OrMatcher *o = pb->or_match;
                if ((r = check_known(c, &o->base)) < 0)
                        return r;
                /* Envoy's validation: at least two matchers. */
                if (o->n_value_matchers < 2)
                        return fail(c, -EINVAL, "or_match needs at least 2 value_matchers");
                v->kind = V_OR;
                v->n = (uint32_t)o->n_value_matchers;
                if (!(v->v = cc_alloc(c, sizeof(*v->v) * v->n)))
                        return fail(c, -ENOMEM, "oom");
                for (size_t i = 0; i < o->n_value_matchers; i++) {
                        old = path_push(c, ".or_match.value_matchers[%zu]", i);
                        if ((r = compile_value(c, o->value_matchers[i], depth + 1, &v->v[i])) < 0)
                                return r;
                        path_pop(c, old);
                }
                break;
        }
        default:
                return fail(c, -EINVAL, "value matcher without a match pattern");
        }
        *ret = v;
        return 0;
}

static int compile_meta(struct cc *c, const Envoy__Type__Matcher__V3__MetadataMatcher *pb,
                        struct node *n)
{
        int r = check_known(c, &pb->base);
        if (r < 0)
                return r;
        if (!pb->filter || !*pb->filter)
                return fail(c, -EINVAL, "metadata matcher without a filter");
        if (!pb->n_path)
                return fail(c, -EINVAL, "metadata matcher without a path");
        if (!pb->value)
                return fail(c, -EINVAL, "metadata matcher without a value");
        size_t len = strlen(pb->filter);
        for (size_t i = 0; i < pb->n_path; i++) {
                const Envoy__Type__Matcher__V3__MetadataMatcher__PathSegment *s = pb->path[i];
                if ((r = check_known(c, &s->base)) < 0)
                        return r;
                if (s->segment_case !=
                        ENVOY__TYPE__MATCHER__V3__METADATA_MATCHER__PATH_SEGMENT__SEGMENT_KEY ||
                    !s->key || !*s->key)
                        return fail(c, -EINVAL, "path[%zu]: empty segment", i);
                if (strchr(s->key, FLT_RBAC_META_SEP[0]))
                        return fail(c, -EINVAL, "path[%zu]: segment contains the separator", i);
                len += 1 + strlen(s->key);
        }
        if (strchr(pb->filter, FLT_RBAC_META_SEP[0]))
                return fail(c, -EINVAL, "filter name contains the separator");
        struct meta_m *m = cc_alloc(c, sizeof(*m));
        char *key = cc_alloc(c, len + 1);
        if (!m || !key)
                return fail(c, -ENOMEM, "oom");
        char *p = stpcpy(key, pb->filter);
        for (size_t i = 0; i < pb->n_path; i++) {
                *p++ = FLT_RBAC_META_SEP[0];
                p = stpcpy(p, pb->path[i]->key);
        }
        m->key = key;
        m->key_len = (uint32_t)len;
        m->invert = pb->invert;
        size_t old = path_push(c, ".value");
        if ((r = compile_value(c, pb->value, 0, &m->v)) < 0)
                return r;
        path_pop(c, old);
        n->u.meta = m;
        return 0;
}

/* RFC 3986 pchar minus '*' and '=' (Envoy's uri_template literal set). */
static bool tmpl_char(unsigned char ch)
{
        if ((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9'))
                return true;
        return ch && strchr("-._~%!$&'()+,;:@", ch);
}

static bool tmpl_literal(const char *s, size_t n)
{
        if (!n)
                return false;
        for (size_t i = 0; i < n; i++)
                if (!tmpl_char((unsigned char)s[i]))
                        return false;
        return true;
}

struct tmpl_b {
        struct tok t[128];
        uint32_t n;
        bool text_seen;
        bool bad_glob_after_text;
};

static int tmpl_add(struct tmpl_b *b, uint8_t kind, const char *s, size_t len)
{
        if (kind != T_LIT && b->text_seen)
                b->bad_glob_after_text = true;
        if (kind == T_TEXT)
                b->text_seen = true;
        if (kind == T_LIT && b->n && b->t[b->n - 1].kind == T_LIT &&
            b->t[b->n - 1].s + b->t[b->n - 1].len == s) {
                b->t[b->n - 1].len += (uint32_t)len; /* adjacent in the pattern: merge */
                return 0;
        }
        if (b->n == sizeof(b->t) / sizeof(b->t[0]))
                return -E2BIG;
        b->t[b->n++] = (struct tok){.kind = kind, .s = s, .len = (uint32_t)len};
        return 0;
}

/* Parses Envoy's uri_template path_template (the grammar of
 * source/extensions/path/uri_template_lib). Returns 0 or a static error in *why. */
static int tmpl_parse(const char *p, struct tmpl_b *b, const char **why)
{
        size_t len = strlen(p);
        if (!len || p[0] != '/') {
                *why = "must start with '/'";
                return -EINVAL;
        }
        for (size_t i = 0; i < len; i++)
                if ((unsigned char)p[i] <= 0x20 || (unsigned char)p[i] >= 0x7f) {
                        *why = "non-printable character";
                        return -EINVAL;
                }
        char names[5][17];
        unsigned n_vars = 0;
        size_t i = 1;
        if (tmpl_add(b, T_LIT, p, 1))
                goto too_long;
        while (i < len) {
                bool op = false;
                if (p[i] == '*') {
                        bool text = i + 1 < len && p[i + 1] == '*';
                        if (tmpl_add(b, text ? T_TEXT : T_SEG, NULL, 0))
                                goto too_long;
                        i += text ? 2 : 1;
                        op = true;
                } else if (p[i] == '{') {
                        const char *close = memchr(p + i, '}', len - i);
                        if (!close) {
                                *why = "unmatched '{'";
                                return -EINVAL;
                        }
                        const char *body = p + i + 1, *end = close;
                        const char *eq = memchr(body, '=', (size_t)(end - body));
                        const char *name_end = eq ? eq : end;
                        size_t nl = (size_t)(name_end - body);
                        bool ok =
                            nl >= 1 && nl <= 16 &&
                            ((*body >= 'a' && *body <= 'z') || (*body >= 'A' && *body <= 'Z'));
                        for (size_t k = 1; ok && k < nl; k++) {
                                char ch = body[k];
                                ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
                                     (ch >= '0' && ch <= '9') || ch == '_';
                        }
                        if (!ok) {
                                *why = "invalid variable name";
                                return -EINVAL;
                        }
                        if (n_vars == 5) {
                                *why = "more than 5 variables";
                                return -EINVAL;
                        }
                        for (unsigned k = 0; k < n_vars; k++)
                                if (strlen(names[k]) == nl && !memcmp(names[k], body, nl)) {
                                        *why = "repeated variable name";
                                        return -EINVAL;
                                }
                        memcpy(names[n_vars], body, nl);
                        names[n_vars++][nl] = '\0';
                        if (!eq) {
                                if (tmpl_add(b, T_SEG, NULL, 0))
                                        goto too_long;
                        } else {
                                const char *v = eq + 1;
                                if (v == end) {
                                        *why = "empty variable match";
                                        return -EINVAL;
                                }
                                while (v < end) {
                                        if (*v == '*') {
                                                bool text = v + 1 < end && v[1] == '*';
                                                if (tmpl_add(b, text ? T_TEXT : T_SEG, NULL, 0))
                                                        goto too_long;
                                                v += text ? 2 : 1;
                                        } else {
                                                const char *s = v;
                                                while (v < end && *v != '/')
                                                        v++;
                                                if (!tmpl_literal(s, (size_t)(v - s))) {
                                                        *why = "invalid literal";
                                                        return -EINVAL;
                                                }
                                                if (tmpl_add(b, T_LIT, s, (size_t)(v - s)))
                                                        goto too_long;
                                        }
                                        if (v < end) {
                                                if (*v != '/' || v + 1 == end) {
                                                        *why = "invalid variable match";
                                                        return -EINVAL;
                                                }
                                                if (tmpl_add(b, T_LIT, v, 1))
                                                        goto too_long;
                                                v++;
                                        }
                                }
                        }
                        i = (size_t)(close - p) + 1;
                        op = true;
                } else {
                        size_t s = i;
                        while (i < len && p[i] != '/')
                                i++;
                        if (!tmpl_literal(p + s, i - s)) {
                                *why = "invalid literal";
                                return -EINVAL;
                        }
                        if (tmpl_add(b, T_LIT, p + s, i - s))
                                goto too_long;
                }
                if (i == len)
                        break;
                if (p[i] == '/') {
                        if (tmpl_add(b, T_LIT, p + i, 1))
                                goto too_long;
                        i++;
                        continue;
                }
                /* Text right after an operator or variable: a suffix, which must end it. */
                (void)op;
                size_t s = i;
                while (i < len && p[i] != '/')
                        i++;
                if (i != len) {
                        *why = "prefix match not supported";
                        return -EINVAL;
                }
                if (!tmpl_literal(p + s, i - s)) {
                        *why = "invalid literal";
                        return -EINVAL;
                }
                if (tmpl_add(b, T_LIT, p + s, i - s))
                        goto too_long;
        }
        if (b->bad_glob_after_text) {
                *why = "glob after text glob";
                return -EINVAL;
        }
        return 0;
too_long:
        *why = "too many segments";
        return -EINVAL;
}

/* Reads a protobuf varint. Returns bytes used or 0 when malformed. */
static size_t read_varint(const uint8_t *p, size_t n, uint64_t *ret)
{
        uint64_t v = 0;
        for (size_t i = 0; i < n && i < 10; i++) {
                v |= (uint64_t)(p[i] & 0x7f) << (7 * i);
                if (!(p[i] & 0x80)) {
                        *ret = v;
                        return i + 1;
                }
        }
        return 0;
}

static int compile_template(struct cc *c, const Envoy__Config__Core__V3__TypedExtensionConfig *pb,
                            struct node *n)
{
        int r = check_known(c, &pb->base);
        if (r < 0)
                return r;
        const Google__Protobuf__Any *any = pb->typed_config;
        if (!any || !any->type_url || strcmp(any->type_url, URI_TEMPLATE_TYPE_URL))
                return fail(c, -EINVAL, "typed_config: not a UriTemplateMatchConfig");
        /* UriTemplateMatchConfig { string path_template = 1; } is not in our proto subset:
         * decode its one field by hand, rejecting anything else. */
        const uint8_t *p = any->value.data;
        size_t len = any->value.len, off = 0;
        const uint8_t *tp = NULL;
        size_t tl = 0;
        while (off < len) {
                uint64_t tag, l;
                size_t k = read_varint(p + off, len - off, &tag);
                if (!k || tag != ((1u << 3) | 2))
                        return fail(c, -EINVAL, "typed_config: unsupported UriTemplateMatchConfig");
                off += k;
                k = read_varint(p + off, len - off, &l);
                if (!k || l > len - off - k)
                        return fail(c, -EINVAL, "typed_config: truncated UriTemplateMatchConfig");
                off += k;
                tp = p + off;
                tl = (size_t)l;
                off += (size_t)l;
        }
        if (!tp || !tl)
                return fail(c, -EINVAL, "typed_config: empty path_template");
        char *tmplstr = cc_strdup(c, (const char *)tp, tl, false);
        if (!tmplstr)
                return fail(c, -ENOMEM, "oom");
        if (strlen(tmplstr) != tl)
                return fail(c, -EINVAL, "typed_config: NUL in path_template");
        struct tmpl_b *b = wp_calloc(1, sizeof(*b));
        if (!b)
                return fail(c, -ENOMEM, "oom");
        const char *why = NULL;
        r = tmpl_parse(tmplstr, b, &why);
        if (r < 0) {
                wp_free(b);
                return fail(c, r, "path_template \"%.100s\": %s", tmplstr, why);
        }
        struct tmpl *t = cc_alloc(c, sizeof(*t));
        struct tok *toks = cc_alloc(c, sizeof(*toks) * b->n);
        if (!t || !toks) {
                wp_free(b);
                return fail(c, -ENOMEM, "oom");
        }
        memcpy(toks, b->t, sizeof(*toks) * b->n);
        t->t = toks;
        t->n = b->n;
        wp_free(b);
        n->u.tmpl = t;
        return 0;
}

/* ---- compile: trees ---- */

static int compile_perm(struct cc *c, const Envoy__Config__Rbac__V3__Permission *pb, unsigned depth,
                        struct node **ret);
static int compile_princ(struct cc *c, const Envoy__Config__Rbac__V3__Principal *pb, unsigned depth,
                         struct node **ret);

static int compile_path_matcher(struct cc *c, const Envoy__Type__Matcher__V3__PathMatcher *pb,
                                struct node *n)
{
        int r = check_known(c, &pb->base);
        if (r < 0)
                return r;
        if (pb->rule_case != ENVOY__TYPE__MATCHER__V3__PATH_MATCHER__RULE_PATH)
                return fail(c, -EINVAL, "path matcher without a rule");
        struct wp_strmatch *m = cc_alloc(c, sizeof(*m));
        if (!m)
                return fail(c, -ENOMEM, "oom");
        size_t old = path_push(c, ".path");
        if ((r = compile_str(c, pb->path, m)) < 0)
                return r;
        path_pop(c, old);
        n->u.str = m;
        return 0;
}

static int compile_str_node(struct cc *c, const Envoy__Type__Matcher__V3__StringMatcher *pb,
                            struct node *n)
{
        struct wp_strmatch *m = cc_alloc(c, sizeof(*m));
        if (!m)
                return fail(c, -ENOMEM, "oom");
        int r = compile_str(c, pb, m);
        if (r < 0)
                return r;
        n->u.str = m;
        return 0;
}

static int compile_port_range(struct cc *c, const Envoy__Type__V3__Int32Range *pb, struct node *n)
{
        int r = check_known(c, &pb->base);
        if (r < 0)
                return r;
        if (pb->start < 0 || pb->start > 65536 || pb->end < 0 || pb->end > 65536)
                return fail(c, -EINVAL, "port range [%d, %d) out of [0, 65536]", pb->start,
                            pb->end);
        n->u.port.lo = (uint32_t)pb->start;
        n->u.port.hi = (uint32_t)pb->end;
        return 0;
}

/* and/or sets of permissions or principals: items are Permission* or Principal*. */
static int compile_set(struct cc *c, const ProtobufCMessage *set, void **items, size_t n_items,
                       bool perm, const char *field, unsigned depth, struct node *n)
{
        int r = check_known(c, set);
        if (r < 0)
                return r;
        if (!n_items)
                return fail(c, -EINVAL, "empty %s", field);
        if (!(n->u.kids = cc_alloc(c, sizeof(*n->u.kids) * n_items)))
                return fail(c, -ENOMEM, "oom");
        n->n = (uint32_t)n_items;
        for (size_t i = 0; i < n_items; i++) {
                size_t old = path_push(c, ".%s[%zu]", field, i);
                r = perm ? compile_perm(c, items[i], depth + 1, &n->u.kids[i])
                         : compile_princ(c, items[i], depth + 1, &n->u.kids[i]);
                if (r < 0)
                        return r;
                path_pop(c, old);
        }
        return 0;
}

static int compile_perm(struct cc *c, const Envoy__Config__Rbac__V3__Permission *pb, unsigned depth,
                        struct node **ret)
{
        int r = check_known(c, &pb->base);
        if (r < 0)
                return r;
        if (depth > FLT_RBAC_MAX_DEPTH)
                return fail(c, -E2BIG, "rules nested deeper than %u", FLT_RBAC_MAX_DEPTH);
        struct node *n = new_node(c, N_ANY);
        if (!n)
                return c->nodes > FLT_RBAC_MAX_NODES ? -E2BIG : -ENOMEM;
        size_t old;
        switch (pb->rule_case) {
        case ENVOY__CONFIG__RBAC__V3__PERMISSION__RULE_AND_RULES:
        case ENVOY__CONFIG__RBAC__V3__PERMISSION__RULE_OR_RULES: {
                bool is_and = pb->rule_case == ENVOY__CONFIG__RBAC__V3__PERMISSION__RULE_AND_RULES;
                const Envoy__Config__Rbac__V3__Permission__Set *s =
                    is_and ? pb->and_rules : pb->or_rules;
                n->kind = is_and ? N_AND : N_OR;
                old = path_push(c, is_and ? ".and_rules" : ".or_rules");
                r = compile_set(c, &s->base, (void **)s->rules, s->n_rules, true, "rules", depth,
                                n);
                break;
        }
        case ENVOY__CONFIG__RBAC__V3__PERMISSION__RULE_ANY:
                old = path_push(c, ".any");
                if (!pb->any)
                        r = fail(c, -EINVAL, "must be true");
                break;
        case ENVOY__CONFIG__RBAC__V3__PERMISSION__RULE_HEADER:
                n->kind = N_HEADER;
                old = path_push(c, ".header");
                r = compile_header(c, pb->header, n);
                break;
        case ENVOY__CONFIG__RBAC__V3__PERMISSION__RULE_DESTINATION_IP:
                n->kind = N_DST_IP;
                old = path_push(c, ".destination_ip");
                r = compile_cidr(c, pb->destination_ip, n);
                break;
        case ENVOY__CONFIG__RBAC__V3__PERMISSION__RULE_DESTINATION_PORT:
                n->kind = N_DST_PORT;
                old = path_push(c, ".destination_port");
                if (pb->destination_port > 65535)
                        r = fail(c, -EINVAL, "%u is not a port", pb->destination_port);
                n->u.port.lo = pb->destination_port;
                n->u.port.hi = pb->destination_port + 1;
                break;
        case ENVOY__CONFIG__RBAC__V3__PERMISSION__RULE_DESTINATION_PORT_RANGE:
                n->kind = N_DST_RANGE;
                old = path_push(c, ".destination_port_range");
                r = compile_port_range(c, pb->destination_port_range, n);
                break;
        case ENVOY__CONFIG__RBAC__V3__PERMISSION__RULE_METADATA:
                n->kind = N_META;
                old = path_push(c, ".metadata");
                r = compile_meta(c, pb->metadata, n);
                break;
        case ENVOY__CONFIG__RBAC__V3__PERMISSION__RULE_NOT_RULE:
                n->kind = N_NOT;
                n->n = 1;
                old = path_push(c, ".not_rule");
                if (!(n->u.kids = cc_alloc(c, sizeof(*n->u.kids))))
                        r = fail(c, -ENOMEM, "oom");
                else
                        r = compile_perm(c, pb->not_rule, depth + 1, &n->u.kids[0]);
                break;
        case ENVOY__CONFIG__RBAC__V3__PERMISSION__RULE_REQUESTED_SERVER_NAME:
                n->kind = N_SNI;
                old = path_push(c, ".requested_server_name");
                r = compile_str_node(c, pb->requested_server_name, n);
                break;
        case ENVOY__CONFIG__RBAC__V3__PERMISSION__RULE_URL_PATH:
                n->kind = N_PATH;
                old = path_push(c, ".url_path");
                r = compile_path_matcher(c, pb->url_path, n);
                break;
        case ENVOY__CONFIG__RBAC__V3__PERMISSION__RULE_URI_TEMPLATE:
                n->kind = N_TEMPLATE;
                old = path_push(c, ".uri_template");
                r = compile_template(c, pb->uri_template, n);
                break;
        case ENVOY__CONFIG__RBAC__V3__PERMISSION__RULE_MATCHER:
                old = path_push(c, ".matcher");
                r = fail(c, -EINVAL, "not supported");
                break;
        case ENVOY__CONFIG__RBAC__V3__PERMISSION__RULE_SOURCED_METADATA:
                old = path_push(c, ".sourced_metadata");
                r = fail(c, -EINVAL, "not supported");
                break;
        default:
                old = c->plen;
                r = fail(c, -EINVAL, "permission without a rule");
                break;
        }
        if (r < 0)
                return r;
        path_pop(c, old);
        *ret = n;
        return 0;
}

static int compile_princ(struct cc *c, const Envoy__Config__Rbac__V3__Principal *pb, unsigned depth,
                         struct node **ret)
{
        int r = check_known(c, &pb->base);
        if (r < 0)
                return r;
        if (depth > FLT_RBAC_MAX_DEPTH)
                return fail(c, -E2BIG, "ids nested deeper than %u", FLT_RBAC_MAX_DEPTH);
        struct node *n = new_node(c, N_ANY);
        if (!n)
                return c->nodes > FLT_RBAC_MAX_NODES ? -E2BIG : -ENOMEM;
        size_t old;
        switch (pb->identifier_case) {
        case ENVOY__CONFIG__RBAC__V3__PRINCIPAL__IDENTIFIER_AND_IDS:
        case ENVOY__CONFIG__RBAC__V3__PRINCIPAL__IDENTIFIER_OR_IDS: {
                bool is_and =
                    pb->identifier_case == ENVOY__CONFIG__RBAC__V3__PRINCIPAL__IDENTIFIER_AND_IDS;
                const Envoy__Config__Rbac__V3__Principal__Set *s =
                    is_and ? pb->and_ids : pb->or_ids;
                n->kind = is_and ? N_AND : N_OR;
                old = path_push(c, is_and ? ".and_ids" : ".or_ids");
                r = compile_set(c, &s->base, (void **)s->ids, s->n_ids, false, "ids", depth, n);
                break;
        }
        case ENVOY__CONFIG__RBAC__V3__PRINCIPAL__IDENTIFIER_ANY:
                old = path_push(c, ".any");
                if (!pb->any)
                        r = fail(c, -EINVAL, "must be true");
                break;
        case ENVOY__CONFIG__RBAC__V3__PRINCIPAL__IDENTIFIER_AUTHENTICATED:
                n->kind = N_AUTHN;
                old = path_push(c, ".authenticated");
                if ((r = check_known(c, &pb->authenticated->base)) < 0)
                        break;
                if (pb->authenticated->principal_name) {
                        size_t o2 = path_push(c, ".principal_name");
                        r = compile_str_node(c, pb->authenticated->principal_name, n);
                        if (r >= 0)
                                path_pop(c, o2);
                }
                break;
        case ENVOY__CONFIG__RBAC__V3__PRINCIPAL__IDENTIFIER_SOURCE_IP:
                n->kind = N_SRC_IP;
                old = path_push(c, ".source_ip");
                r = compile_cidr(c, pb->source_ip, n);
                break;
        case ENVOY__CONFIG__RBAC__V3__PRINCIPAL__IDENTIFIER_DIRECT_REMOTE_IP:
                n->kind = N_SRC_IP;
                old = path_push(c, ".direct_remote_ip");
                r = compile_cidr(c, pb->direct_remote_ip, n);
                break;
        case ENVOY__CONFIG__RBAC__V3__PRINCIPAL__IDENTIFIER_REMOTE_IP:
                n->kind = N_SRC_IP;
                old = path_push(c, ".remote_ip");
                r = compile_cidr(c, pb->remote_ip, n);
                break;
        case ENVOY__CONFIG__RBAC__V3__PRINCIPAL__IDENTIFIER_HEADER:
                n->kind = N_HEADER;
                old = path_push(c, ".header");
                r = compile_header(c, pb->header, n);
                break;
        case ENVOY__CONFIG__RBAC__V3__PRINCIPAL__IDENTIFIER_METADATA:
                n->kind = N_META;
                old = path_push(c, ".metadata");
                r = compile_meta(c, pb->metadata, n);
                break;
        case ENVOY__CONFIG__RBAC__V3__PRINCIPAL__IDENTIFIER_NOT_ID:
                n->kind = N_NOT;
                n->n = 1;
                old = path_push(c, ".not_id");
                if (!(n->u.kids = cc_alloc(c, sizeof(*n->u.kids))))
                        r = fail(c, -ENOMEM, "oom");
                else
                        r = compile_princ(c, pb->not_id, depth + 1, &n->u.kids[0]);
                break;
        case ENVOY__CONFIG__RBAC__V3__PRINCIPAL__IDENTIFIER_URL_PATH:
                n->kind = N_PATH;
                old = path_push(c, ".url_path");
                r = compile_path_matcher(c, pb->url_path, n);
                break;
        case ENVOY__CONFIG__RBAC__V3__PRINCIPAL__IDENTIFIER_FILTER_STATE: {
                const Envoy__Type__Matcher__V3__FilterStateMatcher *fs = pb->filter_state;
                n->kind = N_PEER;
                old = path_push(c, ".filter_state");
                if ((r = check_known(c, &fs->base)) < 0)
                        break;
                if (!fs->key || strcmp(fs->key, PEER_PRINCIPAL_KEY)) {
                        r = fail(c, -EINVAL, "key \"%.64s\" is not supported (only %s)",
                                 fs->key ? fs->key : "", PEER_PRINCIPAL_KEY);
                        break;
                }
                if (fs->matcher_case !=
                    ENVOY__TYPE__MATCHER__V3__FILTER_STATE_MATCHER__MATCHER_STRING_MATCH) {
                        r = fail(c, -EINVAL, "filter_state matcher without string_match");
                        break;
                }
                size_t o2 = path_push(c, ".string_match");
                r = compile_str_node(c, fs->string_match, n);
                if (r >= 0)
                        path_pop(c, o2);
                break;
        }
        case ENVOY__CONFIG__RBAC__V3__PRINCIPAL__IDENTIFIER_SOURCED_METADATA:
                old = path_push(c, ".sourced_metadata");
                r = fail(c, -EINVAL, "not supported");
                break;
        case ENVOY__CONFIG__RBAC__V3__PRINCIPAL__IDENTIFIER_CUSTOM:
                old = path_push(c, ".custom");
                r = fail(c, -EINVAL, "not supported");
                break;
        default:
                old = c->plen;
                r = fail(c, -EINVAL, "principal without an identifier");
                break;
        }
        if (r < 0)
                return r;
        path_pop(c, old);
        *ret = n;
        return 0;
}

/* ---- engine ---- */

struct pol_ref {
        const char *name;
        size_t idx;
};

static int pol_cmp(const void *a, const void *b)
{
        const struct pol_ref *x = a, *y = b;
        int r = strcmp(x->name, y->name);
        if (r)
                return r;
        return x->idx < y->idx ? -1 : x->idx > y->idx;
}

static char *make_details(struct cc *c, const char *name)
{
        size_t n = strlen(name);
        char *d = cc_alloc(c, sizeof(DETAILS_PREFIX) + n + 1);
        if (!d)
                return NULL;
        char *p = stpcpy(d, DETAILS_PREFIX);
        /* Envoy replaces whitespace so access logs keep their field count. */
        for (size_t i = 0; i < n; i++)
                *p++ = strchr(" \t\n\v\f\r", name[i]) ? '_' : name[i];
        *p++ = ']';
        *p = '\0';
        return d;
}

static int compile_engine(struct cc *c, const Envoy__Config__Rbac__V3__RBAC *pb)
{
        struct flt_rbac_engine *e = c->e;
        int r = check_known(c, &pb->base);
        if (r < 0)
                return r;
        switch (pb->action) {
        case ENVOY__CONFIG__RBAC__V3__RBAC__ACTION__ALLOW:
                e->action = FLT_RBAC_ALLOW;
                break;
        case ENVOY__CONFIG__RBAC__V3__RBAC__ACTION__DENY:
                e->action = FLT_RBAC_DENY;
                break;
        case ENVOY__CONFIG__RBAC__V3__RBAC__ACTION__LOG:
                e->action = FLT_RBAC_LOG;
                break;
        default:
                return fail(c, -EINVAL, "action %d is not supported", (int)pb->action);
        }
        if (pb->n_policies > FLT_RBAC_MAX_POLICIES)
                return fail(c, -E2BIG, "more than %u policies", FLT_RBAC_MAX_POLICIES);
        if (!pb->n_policies)
                return 0;
        struct pol_ref *refs = wp_malloc(sizeof(*refs) * pb->n_policies);
        if (!refs)
                return fail(c, -ENOMEM, "oom");
        for (size_t i = 0; i < pb->n_policies; i++) {
                refs[i].name = pb->policies[i]->key ? pb->policies[i]->key : "";
                refs[i].idx = i;
        }
        /* Envoy keeps policies in a sorted map: name order decides which one is reported.
         * A protobuf map's last duplicate wins. */
        qsort(refs, pb->n_policies, sizeof(*refs), pol_cmp);
        size_t n = 0;
        for (size_t i = 0; i < pb->n_policies; i++) {
                if (i + 1 < pb->n_policies && !strcmp(refs[i].name, refs[i + 1].name))
                        continue;
                refs[n++] = refs[i];
        }
        e->pol = cc_alloc(c, sizeof(*e->pol) * n);
        if (!e->pol) {
                r = fail(c, -ENOMEM, "oom");
                goto out;
        }
        for (size_t i = 0; i < n; i++) {
                const Envoy__Config__Rbac__V3__RBAC__PoliciesEntry *ent = pb->policies[refs[i].idx];
                struct policy *p = &e->pol[i];
                size_t old = path_push(c, ".policies[\"%.100s\"]", refs[i].name);
                if ((r = check_known(c, &ent->base)) < 0)
                        goto out;
                const Envoy__Config__Rbac__V3__Policy *pp = ent->value;
                if (!pp) {
                        r = fail(c, -EINVAL, "no policy");
                        goto out;
                }
                if ((r = check_known(c, &pp->base)) < 0)
                        goto out;
                /* Envoy's validation: a policy has at least one permission and principal. */
                if (!pp->n_permissions || !pp->n_principals) {
                        r = fail(c, -EINVAL, "policy needs at least one %s",
                                 pp->n_permissions ? "principal" : "permission");
                        goto out;
                }
                p->name = cc_strdup(c, refs[i].name, strlen(refs[i].name), false);
                p->details = p->name ? make_details(c, p->name) : NULL;
                p->perms = cc_alloc(c, sizeof(*p->perms) * (pp->n_permissions + 1));
                p->princs = cc_alloc(c, sizeof(*p->princs) * (pp->n_principals + 1));
                if (!p->name || !p->details || !p->perms || !p->princs) {
                        r = fail(c, -ENOMEM, "oom");
                        goto out;
                }
                for (size_t k = 0; k < pp->n_permissions; k++) {
                        size_t o2 = path_push(c, ".permissions[%zu]", k);
                        if ((r = compile_perm(c, pp->permissions[k], 0, &p->perms[k])) < 0)
                                goto out;
                        path_pop(c, o2);
                }
                for (size_t k = 0; k < pp->n_principals; k++) {
                        size_t o2 = path_push(c, ".principals[%zu]", k);
                        if ((r = compile_princ(c, pp->principals[k], 0, &p->princs[k])) < 0)
                                goto out;
                        path_pop(c, o2);
                }
                p->n_perms = (uint32_t)pp->n_permissions;
                p->n_princs = (uint32_t)pp->n_principals;
                path_pop(c, old);
        }
        e->n_pol = (uint32_t)n;
        r = 0;
out:
        wp_free(refs);
        return r;
}

struct flt_rbac_engine *flt_rbac_engine_free(struct flt_rbac_engine *e)
{
        if (!e)
                return NULL;
        wp_match_regexes_free(e->regexes);
        pool_done(&e->pool);
        wp_free(e);
        return NULL;
}

int flt_rbac_engine_new(const ProtobufCMessage *cfg, const char *field,
                        struct flt_rbac_engine **ret, const char **reterr_desc, bool *reterr_heap)
{
        *reterr_heap = false;
        if (!cfg || cfg->descriptor != &envoy__config__rbac__v3__rbac__descriptor) {
                *reterr_desc = "rbac: expected envoy.config.rbac.v3.RBAC";
                return -EINVAL;
        }
        struct flt_rbac_engine *e = wp_calloc(1, sizeof(*e));
        if (!e) {
                *reterr_desc = "rbac: out of memory";
                return -ENOMEM;
        }
        struct cc c = {.e = e, .reterr_desc = reterr_desc, .reterr_heap = reterr_heap};
        if (field)
                path_push(&c, "%s", field);
        int r = compile_engine(&c, (const Envoy__Config__Rbac__V3__RBAC *)cfg);
        if (r < 0) {
                flt_rbac_engine_free(e);
                return r;
        }
        *ret = e;
        return 0;
}

enum flt_rbac_action flt_rbac_engine_action(const struct flt_rbac_engine *e)
{
        return e->action;
}

unsigned flt_rbac_engine_policy_count(const struct flt_rbac_engine *e)
{
        return e->n_pol;
}

/* ---- evaluation ---- */

struct ectx {
        const struct flt_rbac_facts *f;
        char scratch[SCRATCH_SIZE];
};

/* Header matcher: joins repeated values in x->scratch, or on the heap when longer. */
static int hdr_match(struct ectx *x, const struct wp_hdrmatch *h)
{
        int r = wp_hdrmatch_match(h, x->f->req, x->scratch, sizeof(x->scratch));
        if (r != -ENOSPC)
                return r;
        const char *v = NULL;
        size_t vl = 0;
        wp_hdrmatch_value(h, x->f->req, NULL, 0, &v, &vl);
        char *heap = wp_malloc(vl);
        if (!heap)
                return -ENOMEM;
        r = wp_hdrmatch_value(h, x->f->req, heap, vl, &v, &vl);
        bool m = r >= 0 && wp_hdrmatch_accepts(h, r == 1, v, vl);
        wp_free(heap);
        return r < 0 ? r : m;
}

static size_t path_len_no_query(const char *p)
{
        return strcspn(p, "?#");
}

static bool tmpl_match(const struct tmpl *t, const char *p, size_t len)
{
        size_t pos = 0;
        for (uint32_t i = 0; i < t->n; i++) {
                const struct tok *k = &t->t[i];
                switch (k->kind) {
                case T_LIT:
                        if (len - pos < k->len || memcmp(p + pos, k->s, k->len))
                                return false;
                        pos += k->len;
                        break;
                case T_SEG: {
                        /* One segment: up to the next '/', or, before a final suffix literal,
                         * up to that suffix. Segments never contain '/', so this is the only
                         * way the regex could match. */
                        size_t end = pos;
                        while (end < len && p[end] != '/')
                                end++;
                        if (i + 2 == t->n && t->t[i + 1].kind == T_LIT && t->t[i + 1].s[0] != '/') {
                                size_t sl = t->t[i + 1].len;
                                if (end != len || len - pos < sl + 1)
                                        return false;
                                end = len - sl;
                        }
                        if (end == pos || !tmpl_literal(p + pos, end - pos))
                                return false;
                        pos = end;
                        break;
                }
                case T_TEXT: {
                        /* Only literals follow a text glob (checked at compile time). */
                        size_t rest = 0;
                        for (uint32_t j = i + 1; j < t->n; j++)
                                rest += t->t[j].len;
                        if (len - pos < rest)
                                return false;
                        for (size_t j = pos; j < len - rest; j++)
                                if (p[j] != '/' && !tmpl_char((unsigned char)p[j]))
                                        return false;
                        pos = len - rest;
                        break;
                }
                }
        }
        return pos == len;
}

/* Family and address bytes of sa (IPv4-mapped IPv6 as IPv4). Returns 4, 16 or 0. */
static int sa_addr(const struct sockaddr_storage *sa, const uint8_t **ret, uint16_t *ret_port)
{
        if (!sa)
                return 0;
        if (sa->ss_family == AF_INET) {
                const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
                *ret = (const uint8_t *)&in->sin_addr;
                *ret_port = ntohs(in->sin_port);
                return 4;
        }
        if (sa->ss_family == AF_INET6) {
                const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
                *ret_port = ntohs(in6->sin6_port);
                if (IN6_IS_ADDR_V4MAPPED(&in6->sin6_addr)) {
                        *ret = in6->sin6_addr.s6_addr + 12;
                        return 4;
                }
                *ret = in6->sin6_addr.s6_addr;
                return 16;
        }
        return 0;
}

static bool cidr_match(const struct cidr *c, const struct sockaddr_storage *sa)
{
        const uint8_t *a;
        uint16_t port;
        int n = sa_addr(sa, &a, &port);
        if (!n || (n == 4) != (c->family == AF_INET))
                return false;
        unsigned full = c->plen / 8, rem = c->plen % 8;
        if (memcmp(a, c->addr, full))
                return false;
        return !rem || (a[full] & (uint8_t)(0xff00u >> rem)) == c->addr[full];
}

static bool port_match(const struct node *n, const struct sockaddr_storage *sa)
{
        const uint8_t *a;
        uint16_t port;
        if (!sa_addr(sa, &a, &port))
                return false;
        return port >= n->u.port.lo && port < n->u.port.hi;
}

static bool parse_double(const char *s, size_t len, double *ret)
{
        char buf[64];
        if (!len || len >= sizeof(buf))
                return false;
        memcpy(buf, s, len);
        buf[len] = '\0';
        char *end;
        *ret = strtod(buf, &end);
        return *end == '\0';
}

/* Matches one scalar value. */
static bool val_scalar(const struct val_m *v, const struct wp_header *e)
{
        double d;
        switch (v->kind) {
        case V_NULL:
                return false;
        case V_STRING:
                return wp_strmatch_match(&v->str, e->value, e->value_len);
        case V_BOOL:
                return !strcmp(e->value, v->b ? "true" : "false");
        case V_DOUBLE:
                if (!parse_double(e->value, e->value_len, &d))
                        return false;
                return v->dbl_range ? d >= v->lo && d < v->hi : d == v->lo;
        case V_PRESENT:
                return v->b;
        case V_LIST:
                /* A scalar is indistinguishable from a one-element list in the flat form. */
                return val_scalar(v->v[0], e);
        case V_OR:
                for (uint32_t i = 0; i < v->n; i++)
                        if (val_scalar(v->v[i], e))
                                return true;
                return false;
        }
        return false;
}

/* Matches the value stored under key (count entries; first is the first of them). */
static bool val_match(const struct val_m *v, const struct wp_headers *m, const struct meta_m *mm)
{
        const struct wp_header *first = NULL;
        uint32_t count = 0;
        if (m)
                for (uint32_t i = 0; i < m->n; i++)
                        if (m->v[i].name_len == mm->key_len &&
                            !memcmp(m->v[i].name, mm->key, mm->key_len) && !count++)
                                first = &m->v[i];
        if (!count)
                return false;
        switch (v->kind) {
        case V_LIST:
                for (uint32_t i = 0; i < m->n; i++)
                        if (m->v[i].name_len == mm->key_len &&
                            !memcmp(m->v[i].name, mm->key, mm->key_len) &&
                            val_scalar(v->v[0], &m->v[i]))
                                return true;
                return false;
        case V_OR:
                for (uint32_t i = 0; i < v->n; i++)
                        if (val_match(v->v[i], m, mm))
                                return true;
                return false;
        case V_PRESENT:
                return v->b;
        default:
                /* A list is not a string/bool/number. */
                return count == 1 && val_scalar(v, first);
        }
}

static int eval(const struct node *n, struct ectx *x)
{
        const struct flt_rbac_facts *f = x->f;
        int r;
        switch (n->kind) {
        case N_ANY:
                return 1;
        case N_AND:
                for (uint32_t i = 0; i < n->n; i++)
                        if ((r = eval(n->u.kids[i], x)) <= 0)
                                return r;
                return 1;
        case N_OR:
                for (uint32_t i = 0; i < n->n; i++)
                        if ((r = eval(n->u.kids[i], x)) != 0)
                                return r;
                return 0;
        case N_NOT:
                r = eval(n->u.kids[0], x);
                return r < 0 ? r : !r;
        case N_HEADER:
                return hdr_match(x, n->u.hdr);
        case N_PATH:
                if (!f->req || !f->req->path)
                        return 0;
                return wp_strmatch_match(n->u.str, f->req->path, path_len_no_query(f->req->path));
        case N_TEMPLATE:
                if (!f->req || !f->req->path)
                        return 0;
                return tmpl_match(n->u.tmpl, f->req->path, path_len_no_query(f->req->path));
        case N_DST_IP:
                return cidr_match(n->u.cidr, f->dst);
        case N_DST_PORT:
        case N_DST_RANGE:
                return port_match(n, f->dst);
        case N_META:
                return val_match(n->u.meta->v, f->dyn_meta, n->u.meta) != n->u.meta->invert;
        case N_SNI: {
                const char *s = f->sni ? f->sni : "";
                return wp_strmatch_match(n->u.str, s, strlen(s));
        }
        case N_AUTHN:
                if (!f->peer_principal)
                        return 0;
                return !n->u.str ||
                       wp_strmatch_match(n->u.str, f->peer_principal, strlen(f->peer_principal));
        case N_PEER:
                if (!f->peer_principal)
                        return 0;
                return wp_strmatch_match(n->u.str, f->peer_principal, strlen(f->peer_principal));
        case N_SRC_IP:
                return cidr_match(n->u.cidr, f->src);
        }
        return 0;
}

static int eval_any(struct node *const *v, uint32_t n, struct ectx *x)
{
        for (uint32_t i = 0; i < n; i++) {
                int r = eval(v[i], x);
                if (r)
                        return r;
        }
        return 0;
}

int flt_rbac_engine_eval(const struct flt_rbac_engine *e, const struct flt_rbac_facts *f,
                         struct flt_rbac_result *ret)
{
        struct ectx x;
        x.f = f;
        const struct policy *hit = NULL;
        for (uint32_t i = 0; i < e->n_pol && !hit; i++) {
                const struct policy *p = &e->pol[i];
                int r = eval_any(p->perms, p->n_perms, &x);
                if (r < 0)
                        return r;
                if (!r)
                        continue;
                if ((r = eval_any(p->princs, p->n_princs, &x)) < 0)
                        return r;
                if (r)
                        hit = p;
        }
        struct flt_rbac_result res = {.matched = hit != NULL, .policy = hit ? hit->name : NULL};
        switch (e->action) {
        case FLT_RBAC_ALLOW:
                res.allowed = hit != NULL;
                if (!hit)
                        res.details = DETAILS_NONE;
                break;
        case FLT_RBAC_DENY:
                res.allowed = hit == NULL;
                if (hit)
                        res.details = hit->details;
                break;
        case FLT_RBAC_LOG:
                res.allowed = true;
                break;
        }
        *ret = res;
        return 0;
}

/* ---- HTTP filter ---- */

static char *dup_or_empty(const char *s)
{
        return wp_strdup(s ? s : "");
}

struct flt_rbac_conf *flt_rbac_conf_free(struct flt_rbac_conf *c)
{
        if (!c)
                return NULL;
        flt_rbac_engine_free(c->rules);
        flt_rbac_engine_free(c->shadow);
        wp_free(c->rules_stat_prefix);
        wp_free(c->shadow_rules_stat_prefix);
        wp_free(c);
        return NULL;
}

static int oom(const char **reterr_desc, bool *reterr_heap)
{
        *reterr_desc = "rbac: out of memory";
        *reterr_heap = false;
        return -ENOMEM;
}

int flt_rbac_conf_new(const ProtobufCMessage *cfg, struct flt_rbac_conf **ret,
                      const char **reterr_desc, bool *reterr_heap)
{
        *reterr_heap = false;
        if (!cfg ||
            cfg->descriptor != &envoy__extensions__filters__http__rbac__v3__rbac__descriptor) {
                *reterr_desc = "rbac: expected envoy.extensions.filters.http.rbac.v3.RBAC";
                return -EINVAL;
        }
        const Envoy__Extensions__Filters__Http__Rbac__V3__RBAC *pb = (const void *)cfg;
        if (cfg->n_unknown_fields) {
                *reterr_desc =
                    "rbac: unsupported field in envoy.extensions.filters.http.rbac.v3.RBAC";
                return -EINVAL;
        }
        if (pb->matcher || pb->shadow_matcher) {
                *reterr_desc = pb->matcher ? "matcher: the matcher-tree form is not supported"
                                           : "shadow_matcher: the matcher-tree form is not "
                                             "supported";
                return -EINVAL;
        }
        struct flt_rbac_conf *c = wp_calloc(1, sizeof(*c));
        if (!c)
                return oom(reterr_desc, reterr_heap);
        int r;
        c->rules_stat_prefix = dup_or_empty(pb->rules_stat_prefix);
        c->shadow_rules_stat_prefix = dup_or_empty(pb->shadow_rules_stat_prefix);
        if (!c->rules_stat_prefix || !c->shadow_rules_stat_prefix) {
                r = oom(reterr_desc, reterr_heap);
                goto err_free;
        }
        c->track_per_rule_stats = pb->track_per_rule_stats;
        if (pb->rules && (r = flt_rbac_engine_new(&pb->rules->base, "rules", &c->rules, reterr_desc,
                                                  reterr_heap)) < 0)
                goto err_free;
        if (pb->shadow_rules && (r = flt_rbac_engine_new(&pb->shadow_rules->base, "shadow_rules",
                                                         &c->shadow, reterr_desc, reterr_heap)) < 0)
                goto err_free;
        *ret = c;
        return 0;
err_free:
        flt_rbac_conf_free(c);
        return r;
}

static int http_conf_new(const ProtobufCMessage *cfg, void **ret_conf, const char **reterr_desc,
                         bool *reterr_heap)
{
        struct flt_rbac_conf *c;
        int r = flt_rbac_conf_new(cfg, &c, reterr_desc, reterr_heap);
        if (r < 0)
                return r;
        *ret_conf = c;
        return 0;
}

static void http_conf_free(void *conf)
{
        flt_rbac_conf_free(conf);
}

static int http_on_request_headers(struct flt_stream *fs, struct flt_request *r, bool end_stream)
{
        const struct flt_rbac_conf *c = fs->conf;
        struct flt_rbac_stream_state scratch = {0};
        struct flt_rbac_stream_state *st = fs->state ? fs->state : &scratch;
        struct flt_rbac_facts f = {
            .req = r->req,
            .peer_principal = r->peer_principal,
            .src = r->src,
            .dst = r->dst,
            .sni = NULL, /* inner plaintext HTTP: no SNI */
            .dyn_meta = r->dyn_meta,
        };
        struct flt_rbac_result res;
        int err;
        if (c->shadow) {
                if ((err = flt_rbac_engine_eval(c->shadow, &f, &res)) < 0)
                        return err;
                st->shadow_evaluated = true;
                st->shadow_denied = !res.allowed;
                st->shadow_policy = res.policy;
                fs->shadow_denied = !res.allowed;
        }
        if (!c->rules)
                return FLT_CONTINUE;
        if ((err = flt_rbac_engine_eval(c->rules, &f, &res)) < 0)
                return err;
        st->evaluated = true;
        st->policy = res.policy;
        st->logged = flt_rbac_engine_action(c->rules) == FLT_RBAC_LOG && res.matched;
        if (res.allowed)
                return FLT_CONTINUE;
        st->denied = true;
        return flt_reply(fs, 403, FLT_RBAC_DENIED_BODY, res.details);
}

const struct flt_ops flt_rbac_http_ops = {
    .name = FLT_RBAC_HTTP_NAME,
    .type_url = FLT_RBAC_HTTP_TYPE_URL,
    .stream_state_size = sizeof(struct flt_rbac_stream_state),
    .conf_new = http_conf_new,
    .conf_free = http_conf_free,
    .on_request_headers = http_on_request_headers,
};

/* ---- network RBAC ---- */

struct flt_rbac_net {
        struct flt_rbac_engine *rules, *shadow;
        char *stat_prefix;
        uint64_t delay_deny_ms;
};

struct flt_rbac_net *flt_rbac_net_free(struct flt_rbac_net *n)
{
        if (!n)
                return NULL;
        flt_rbac_engine_free(n->rules);
        flt_rbac_engine_free(n->shadow);
        wp_free(n->stat_prefix);
        wp_free(n);
        return NULL;
}

int flt_rbac_net_new(const ProtobufCMessage *cfg, struct flt_rbac_net **ret,
                     const char **reterr_desc, bool *reterr_heap)
{
        *reterr_heap = false;
        if (!cfg ||
            cfg->descriptor != &envoy__extensions__filters__network__rbac__v3__rbac__descriptor) {
                *reterr_desc = "rbac: expected envoy.extensions.filters.network.rbac.v3.RBAC";
                return -EINVAL;
        }
        const Envoy__Extensions__Filters__Network__Rbac__V3__RBAC *pb = (const void *)cfg;
        if (cfg->n_unknown_fields) {
                *reterr_desc =
                    "rbac: unsupported field in envoy.extensions.filters.network.rbac.v3.RBAC";
                return -EINVAL;
        }
        if (pb->matcher || pb->shadow_matcher) {
                *reterr_desc = pb->matcher ? "matcher: the matcher-tree form is not supported"
                                           : "shadow_matcher: the matcher-tree form is not "
                                             "supported";
                return -EINVAL;
        }
        if (pb->delay_deny && (pb->delay_deny->seconds < 0 || pb->delay_deny->nanos < 0 ||
                               pb->delay_deny->seconds > 315576000000)) {
                *reterr_desc = "delay_deny: out of range";
                return -EINVAL;
        }
        struct flt_rbac_net *n = wp_calloc(1, sizeof(*n));
        if (!n)
                return oom(reterr_desc, reterr_heap);
        int r;
        if (!(n->stat_prefix = dup_or_empty(pb->stat_prefix))) {
                r = oom(reterr_desc, reterr_heap);
                goto err_free;
        }
        if (pb->delay_deny)
                n->delay_deny_ms = (uint64_t)pb->delay_deny->seconds * 1000 +
                                   (uint64_t)pb->delay_deny->nanos / 1000000;
        if (pb->rules && (r = flt_rbac_engine_new(&pb->rules->base, "rules", &n->rules, reterr_desc,
                                                  reterr_heap)) < 0)
                goto err_free;
        if (pb->shadow_rules && (r = flt_rbac_engine_new(&pb->shadow_rules->base, "shadow_rules",
                                                         &n->shadow, reterr_desc, reterr_heap)) < 0)
                goto err_free;
        *ret = n;
        return 0;
err_free:
        flt_rbac_net_free(n);
        return r;
}

const char *flt_rbac_net_stat_prefix(const struct flt_rbac_net *n)
{
        return n->stat_prefix;
}

uint64_t flt_rbac_net_delay_deny_ms(const struct flt_rbac_net *n)
{
        return n->delay_deny_ms;
}

int flt_rbac_net_check(const struct flt_rbac_net *n, const struct flt_rbac_facts *f,
                       struct flt_rbac_net_decision *ret)
{
        /* Network RBAC sees no request: header matchers find nothing, url_path never matches. */
        struct flt_rbac_facts nf = *f;
        nf.req = NULL;
        struct flt_rbac_net_decision d = {.allowed = true};
        struct flt_rbac_result res;
        int r;
        if (n->shadow) {
                if ((r = flt_rbac_engine_eval(n->shadow, &nf, &res)) < 0)
                        return r;
                d.shadow_evaluated = true;
                d.shadow_denied = !res.allowed;
                d.shadow_policy = res.policy;
        }
        if (n->rules) {
                if ((r = flt_rbac_engine_eval(n->rules, &nf, &res)) < 0)
                        return r;
                d.allowed = res.allowed;
                d.policy = res.policy;
                d.details = res.details;
                d.logged = flt_rbac_engine_action(n->rules) == FLT_RBAC_LOG && res.matched;
        }
        *ret = d;
        return 0;
}
