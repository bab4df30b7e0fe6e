/*
 * Envoy's StringMatcher / RegexMatcher / HeaderMatcher, compiled once and evaluated without
 * allocation (see matcher.h).
 */
#include "filters/matcher.h"

#include <errno.h>
#include <string.h>

#include "waypoint/base/re2_shim.h"

/* ---- compile ---- */

static int report(const struct wp_match_cc *cc, int err, enum wp_match_errcode code,
                  const char *where, const char *field)
{
        struct wp_match_error e = {.err = err,
                                   .code = code,
                                   .where = where,
                                   .field = field,
                                   .detail = "",
                                   .pattern = ""};

        return cc->fail(cc->user, &e);
}

static int nomem(const struct wp_match_cc *cc, const char *where)
{
        return report(cc, -ENOMEM, WP_MATCH_E_NOMEM, where, "");
}

/* Fields our proto subset does not know arrive as unknown fields: never ignore them. */
static int check_known(const struct wp_match_cc *cc, const ProtobufCMessage *m, const char *where)
{
        if (!m || !m->n_unknown_fields)
                return 0;
        struct wp_match_error e = {.err = -EINVAL,
                                   .code = WP_MATCH_E_UNKNOWN_FIELD,
                                   .where = where,
                                   .field = "",
                                   .detail = "",
                                   .pattern = "",
                                   .tag = m->unknown_fields[0].tag,
                                   .message = m->descriptor->name};
        return cc->fail(cc->user, &e);
}

/* Copies s[0..n) (lower-cased when lc) into the caller's memory, within cc->max_string. */
static int copy(const struct wp_match_cc *cc, const char *where, const char *field, const char *s,
                size_t n, bool lc, const char **ret, uint32_t *ret_len)
{
        if (cc->max_string && n > cc->max_string)
                return report(cc, -E2BIG, WP_MATCH_E_TOO_LONG, where, field);
        char *d = cc->alloc(cc->user, n + 1);
        if (!d)
                return nomem(cc, where);
        for (size_t i = 0; i < n; i++)
                d[i] = lc && s[i] >= 'A' && s[i] <= 'Z' ? (char)(s[i] + 32) : s[i];
        d[n] = '\0';
        *ret = d;
        *ret_len = (uint32_t)n;
        return 0;
}

static int regex_compile(const struct wp_match_cc *cc,
                         const Envoy__Type__Matcher__V3__RegexMatcher *rm, const char *where,
                         const char *field, struct wp_re2 **ret)
{
        int r = check_known(cc, &rm->base, where);
        if (r < 0)
                return r;
        unsigned max = WP_MATCH_RE2_MAX_PROGRAM_SIZE;
        if (rm->engine_type_case ==
                    ENVOY__TYPE__MATCHER__V3__REGEX_MATCHER__ENGINE_TYPE_GOOGLE_RE2 &&
            rm->google_re2) {
                if ((r = check_known(cc, &rm->google_re2->base, where)) < 0)
                        return r;
                if (rm->google_re2->max_program_size)
                        max = rm->google_re2->max_program_size->value;
        }
        struct wp_match_regex *node = cc->alloc(cc->user, sizeof(*node));
        if (!node)
                return nomem(cc, where);
        const char *re = rm->regex ? rm->regex : "";
        char err[256];
        err[0] = '\0';
        r = wp_re2_new(re, strlen(re), max, &node->re, err, sizeof(err));
        if (r == -ENOMEM)
                return nomem(cc, where);
        if (r == -E2BIG)
                return report(cc, -E2BIG, WP_MATCH_E_REGEX_TOO_LONG, where, field);
        if (r < 0) {
                struct wp_match_error e = {.err = -EINVAL,
                                           .code = WP_MATCH_E_REGEX,
                                           .where = where,
                                           .field = field,
                                           .detail = err,
                                           .pattern = re};
                return cc->fail(cc->user, &e);
        }
        node->next = *cc->regexes;
        *cc->regexes = node;
        *ret = node->re;
        return 0;
}

int wp_match_regex_compile(const struct wp_match_cc *cc,
                           const Envoy__Type__Matcher__V3__RegexMatcher *rm, const char *field,
                           struct wp_re2 **ret)
{
        return regex_compile(cc, rm, "", field, ret);
}

void wp_match_regexes_free(struct wp_match_regex *list)
{
        for (; list; list = list->next)
                list->re = wp_re2_free(list->re);
}

static int strmatch_compile(const struct wp_match_cc *cc,
                            const Envoy__Type__Matcher__V3__StringMatcher *m, const char *where,
                            struct wp_strmatch *out)
{
        static const char *const names[] = {"exact", "prefix", "suffix", "contains"};
        const char *s = NULL;
        int r = check_known(cc, &m->base, where);

        if (r < 0)
                return r;
        out->ignore_case = m->ignore_case;
        switch (m->match_pattern_case) {
        case ENVOY__TYPE__MATCHER__V3__STRING_MATCHER__MATCH_PATTERN_EXACT:
                out->kind = WP_STRMATCH_EXACT;
                s = m->exact;
                break;
        case ENVOY__TYPE__MATCHER__V3__STRING_MATCHER__MATCH_PATTERN_PREFIX:
                out->kind = WP_STRMATCH_PREFIX;
                s = m->prefix;
                break;
        case ENVOY__TYPE__MATCHER__V3__STRING_MATCHER__MATCH_PATTERN_SUFFIX:
                out->kind = WP_STRMATCH_SUFFIX;
                s = m->suffix;
                break;
        case ENVOY__TYPE__MATCHER__V3__STRING_MATCHER__MATCH_PATTERN_CONTAINS:
                out->kind = WP_STRMATCH_CONTAINS;
                s = m->contains;
                break;
        case ENVOY__TYPE__MATCHER__V3__STRING_MATCHER__MATCH_PATTERN_SAFE_REGEX:
                /* Envoy rejects this combination rather than ignoring the flag */
                if (m->ignore_case)
                        return report(cc, -EINVAL, WP_MATCH_E_REGEX_ICASE, where, "ignore_case");
                out->kind = WP_STRMATCH_REGEX;
                return regex_compile(cc, m->safe_regex, where, "safe_regex", &out->re);
        case ENVOY__TYPE__MATCHER__V3__STRING_MATCHER__MATCH_PATTERN_CUSTOM:
                return report(cc, -EINVAL, WP_MATCH_E_CUSTOM, where, "custom");
        default:
                return report(cc, -EINVAL, WP_MATCH_E_NO_PATTERN, where, "match_pattern");
        }
        if (!s)
                s = "";
        size_t n = strlen(s);
        /* Envoy's validation: prefix, suffix and contains must not be empty */
        if (!n && out->kind != WP_STRMATCH_EXACT)
                return report(cc, -EINVAL, WP_MATCH_E_EMPTY, where, names[out->kind]);
        return copy(cc, where, "pattern", s, n, out->ignore_case, &out->s, &out->len);
}

int wp_strmatch_compile(const struct wp_match_cc *cc,
                        const Envoy__Type__Matcher__V3__StringMatcher *m, struct wp_strmatch *out)
{
        return strmatch_compile(cc, m, "", out);
}

bool wp_match_header_name_valid(const char *s, size_t n)
{
        if (n == 0)
                return false;
        for (size_t i = 0; i < n; i++) {
                unsigned char ch = (unsigned char)s[i];
                if (i == 0 && ch == ':')
                        continue;
                if (ch <= 0x20 || ch >= 0x7f || strchr("\"(),/;<=>?@[\\]{}:", ch))
                        return false;
        }
        return true;
}

/* Legacy exact_match / prefix_match / suffix_match / contains_match: case-sensitive. */
static int legacy(const struct wp_match_cc *cc, uint8_t kind, const char *s, const char *field,
                  struct wp_hdrmatch *out)
{
        size_t n = s ? strlen(s) : 0;

        out->kind = WP_HDRMATCH_STRING;
        out->sm.kind = kind;
        if (!n) {
                /* Envoy: an empty exact_match matches any value; the others are invalid */
                if (kind == WP_STRMATCH_EXACT) {
                        out->kind = WP_HDRMATCH_ANY_VALUE;
                        return 0;
                }
                return report(cc, -EINVAL, WP_MATCH_E_EMPTY_LEGACY, "", field);
        }
        return copy(cc, "", field, s, n, false, &out->sm.s, &out->sm.len);
}

int wp_hdrmatch_compile(const struct wp_match_cc *cc,
                        const Envoy__Config__Route__V3__HeaderMatcher *h, struct wp_hdrmatch *out)
{
        int r = check_known(cc, &h->base, "");
        size_t nlen = h->name ? strlen(h->name) : 0;

        if (r < 0)
                return r;
        if (!nlen)
                return report(cc, -EINVAL, WP_MATCH_E_NAME_EMPTY, "", "name");
        if (!wp_match_header_name_valid(h->name, nlen)) {
                struct wp_match_error e = {.err = -EINVAL,
                                           .code = WP_MATCH_E_NAME_INVALID,
                                           .where = "",
                                           .field = "name",
                                           .detail = "",
                                           .pattern = h->name};
                return cc->fail(cc->user, &e);
        }
        if ((r = copy(cc, "", "name", h->name, nlen, true, &out->name, &out->name_len)) < 0)
                return r;
        if (strcmp(out->name, ":method") == 0)
                out->pseudo = WP_HDR_METHOD;
        else if (strcmp(out->name, ":path") == 0)
                out->pseudo = WP_HDR_PATH;
        else if (strcmp(out->name, ":authority") == 0 ||
                 ((cc->flags & WP_MATCH_HOST_IS_AUTHORITY) && strcmp(out->name, "host") == 0))
                out->pseudo = WP_HDR_AUTHORITY;
        else if (strcmp(out->name, ":scheme") == 0)
                out->pseudo = WP_HDR_SCHEME;
        else if (out->name[0] == ':')
                out->pseudo = WP_HDR_OTHER;
        out->invert = h->invert_match;
        out->missing_as_empty = h->treat_missing_header_as_empty;
        switch (h->header_match_specifier_case) {
        case ENVOY__CONFIG__ROUTE__V3__HEADER_MATCHER__HEADER_MATCH_SPECIFIER_EXACT_MATCH:
                return legacy(cc, WP_STRMATCH_EXACT, h->exact_match, "exact_match", out);
        case ENVOY__CONFIG__ROUTE__V3__HEADER_MATCHER__HEADER_MATCH_SPECIFIER_PREFIX_MATCH:
                return legacy(cc, WP_STRMATCH_PREFIX, h->prefix_match, "prefix_match", out);
        case ENVOY__CONFIG__ROUTE__V3__HEADER_MATCHER__HEADER_MATCH_SPECIFIER_SUFFIX_MATCH:
                return legacy(cc, WP_STRMATCH_SUFFIX, h->suffix_match, "suffix_match", out);
        case ENVOY__CONFIG__ROUTE__V3__HEADER_MATCHER__HEADER_MATCH_SPECIFIER_CONTAINS_MATCH:
                return legacy(cc, WP_STRMATCH_CONTAINS, h->contains_match, "contains_match", out);
        case ENVOY__CONFIG__ROUTE__V3__HEADER_MATCHER__HEADER_MATCH_SPECIFIER_SAFE_REGEX_MATCH:
                out->kind = WP_HDRMATCH_STRING;
                out->sm.kind = WP_STRMATCH_REGEX;
                return regex_compile(cc, h->safe_regex_match, "", "safe_regex_match", &out->sm.re);
        case ENVOY__CONFIG__ROUTE__V3__HEADER_MATCHER__HEADER_MATCH_SPECIFIER_STRING_MATCH:
                out->kind = WP_HDRMATCH_STRING;
                return strmatch_compile(cc, h->string_match, "string_match", &out->sm);
        case ENVOY__CONFIG__ROUTE__V3__HEADER_MATCHER__HEADER_MATCH_SPECIFIER_RANGE_MATCH:
                if ((r = check_known(cc, &h->range_match->base, "")) < 0)
                        return r;
                out->kind = WP_HDRMATCH_RANGE;
                out->start = h->range_match->start;
                out->end = h->range_match->end;
                if ((cc->flags & WP_MATCH_REJECT_EMPTY_RANGE) && out->start >= out->end)
                        return report(cc, -EINVAL, WP_MATCH_E_RANGE, "", "range_match");
                return 0;
        case ENVOY__CONFIG__ROUTE__V3__HEADER_MATCHER__HEADER_MATCH_SPECIFIER_PRESENT_MATCH:
                out->kind = WP_HDRMATCH_PRESENT;
                out->present = h->present_match;
                return 0;
        default:
                /* no specifier: the header must be present (Envoy) */
                out->kind = WP_HDRMATCH_PRESENT;
                out->present = true;
                return 0;
        }
}

/* ---- match ---- */

static inline char lower(char ch)
{
        return ch >= 'A' && ch <= 'Z' ? (char)(ch + 32) : ch;
}

/* Whether m->s occurs at v (m->s is lower case already when ignore_case). */
static bool eq_at(const struct wp_strmatch *m, const char *v)
{
        if (!m->ignore_case)
                return memcmp(v, m->s, m->len) == 0;
        for (uint32_t i = 0; i < m->len; i++)
                if (lower(v[i]) != m->s[i])
                        return false;
        return true;
}

bool wp_strmatch_match(const struct wp_strmatch *m, const char *v, size_t n)
{
        switch (m->kind) {
        case WP_STRMATCH_EXACT:
                return n == m->len && eq_at(m, v);
        case WP_STRMATCH_PREFIX:
                return n >= m->len && eq_at(m, v);
        case WP_STRMATCH_SUFFIX:
                return n >= m->len && eq_at(m, v + n - m->len);
        case WP_STRMATCH_CONTAINS:
                if (!m->ignore_case)
                        return memmem(v, n, m->s, m->len) != NULL;
                for (size_t i = 0; i + m->len <= n; i++)
                        if (eq_at(m, v + i))
                                return true;
                return false;
        case WP_STRMATCH_REGEX:
                return wp_re2_full_match(m->re, v, n);
        }
        return false;
}

static bool is_space(char ch)
{
        return ch == ' ' || (ch >= '\t' && ch <= '\r');
}

/* absl::SimpleAtoi for int64: optional surrounding ASCII whitespace and sign. */
static bool parse_i64(const char *s, size_t len, int64_t *ret)
{
        size_t i = 0;

        while (len && is_space(s[len - 1]))
                len--;
        while (i < len && is_space(s[i]))
                i++;
        bool neg = false;
        if (i < len && (s[i] == '+' || s[i] == '-'))
                neg = s[i++] == '-';
        if (i == len)
                return false;
        uint64_t v = 0, lim = neg ? (uint64_t)INT64_MAX + 1 : (uint64_t)INT64_MAX;
        for (; i < len; i++) {
                if (s[i] < '0' || s[i] > '9')
                        return false;
                unsigned d = (unsigned)(s[i] - '0');
                if (v > (lim - d) / 10)
                        return false;
                v = v * 10 + d;
        }
        *ret = neg ? (int64_t)(0 - v) : (int64_t)v;
        return true;
}

int wp_hdrmatch_value(const struct wp_hdrmatch *h, const struct wp_http_request *req, char *buf,
                      size_t cap, const char **v, size_t *n)
{
        const char *p = NULL;

        if (!req)
                return 0;
        switch (h->pseudo) {
        case WP_HDR_METHOD:
                p = req->method;
                break;
        case WP_HDR_PATH:
                p = req->path;
                break;
        case WP_HDR_AUTHORITY:
                p = req->authority;
                break;
        case WP_HDR_SCHEME:
                p = req->scheme;
                break;
        case WP_HDR_OTHER:
                return 0;
        default: {
                const struct wp_headers *hs = &req->headers;
                const struct wp_header *first = NULL;
                size_t count = 0, total = 0;

                for (uint32_t i = 0; i < hs->n; i++) {
                        const struct wp_header *e = &hs->v[i];
                        if (e->name_len != h->name_len || memcmp(e->name, h->name, h->name_len))
                                continue;
                        if (!count++)
                                first = e;
                        else
                                total++; /* the ',' */
                        total += e->value_len;
                }
                if (!count)
                        return 0;
                if (count == 1) {
                        *v = first->value;
                        *n = first->value_len;
                        return 1;
                }
                if (total > cap) {
                        *n = total;
                        return -ENOSPC;
                }
                size_t off = 0;
                for (uint32_t i = 0; i < hs->n; i++) {
                        const struct wp_header *e = &hs->v[i];
                        if (e->name_len != h->name_len || memcmp(e->name, h->name, h->name_len))
                                continue;
                        if (off)
                                buf[off++] = ',';
                        memcpy(buf + off, e->value, e->value_len);
                        off += e->value_len;
                }
                *v = buf;
                *n = off;
                return 1;
        }
        }
        if (!p)
                return 0;
        *v = p;
        *n = strlen(p);
        return 1;
}

bool wp_hdrmatch_accepts(const struct wp_hdrmatch *h, bool present, const char *v, size_t n)
{
        bool m = false;
        int64_t x;

        if (!present) {
                if (!h->missing_as_empty)
                        /* Envoy: an absent header matches only "present_match: false", or
                         * "present_match: true" inverted */
                        return h->kind == WP_HDRMATCH_PRESENT && h->present == h->invert;
                v = "";
                n = 0;
        }
        switch (h->kind) {
        case WP_HDRMATCH_STRING:
                m = wp_strmatch_match(&h->sm, v, n);
                break;
        case WP_HDRMATCH_ANY_VALUE:
                m = true;
                break;
        case WP_HDRMATCH_RANGE:
                m = parse_i64(v, n, &x) && x >= h->start && x < h->end;
                break;
        case WP_HDRMATCH_PRESENT:
                m = h->present;
                break;
        }
        return m != h->invert;
}

int wp_hdrmatch_match(const struct wp_hdrmatch *h, const struct wp_http_request *req, char *buf,
                      size_t cap)
{
        const char *v = NULL;
        size_t n = 0;
        int r = wp_hdrmatch_value(h, req, buf, cap, &v, &n);

        if (r < 0)
                return r;
        return wp_hdrmatch_accepts(h, r == 1, v, n);
}
