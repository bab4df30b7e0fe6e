/* Tests for filters/matcher.c: Envoy's StringMatcher / HeaderMatcher, compiled and evaluated. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "filters/matcher.h"
#include "waypoint/base/alloc.h"
#include "xds-client/resources.h"

/* A failed table case: the message says which. */
#define CHECK_FAIL(...)                                                                            \
        do {                                                                                       \
                fprintf(stderr, "%s:%d: %s: ", __FILE__, __LINE__,                                 \
                        check_current ? check_current : "?");                                      \
                fprintf(stderr, __VA_ARGS__);                                                      \
                fputc('\n', stderr);                                                               \
                check_failures++;                                                                  \
        } while (0)

/* ---- helpers: a malloc'd arena, an error recorder, JSON to protobuf ---- */

struct blk {
        struct blk *next;
        _Alignas(16) unsigned char data[];
};

struct env {
        struct blk *blocks;
        struct wp_match_regex *regexes;
        char err[512]; /* "code where field [detail]" of the last error */
        struct wp_match_cc cc;
};

static void *env_alloc(void *user, size_t n)
{
        struct env *e = user;
        struct blk *b = wp_calloc(1, sizeof(*b) + n);
        if (!b)
                return NULL;
        b->next = e->blocks;
        e->blocks = b;
        return b->data;
}

static int env_fail(void *user, const struct wp_match_error *x)
{
        struct env *e = user;
        snprintf(e->err, sizeof(e->err), "%d %s %s %s", (int)x->code, x->where, x->field,
                 x->code == WP_MATCH_E_REGEX ? x->pattern : "");
        return x->err;
}

static void env_init(struct env *e, uint32_t max_string, unsigned flags)
{
        memset(e, 0, sizeof(*e));
        e->cc = (struct wp_match_cc){.alloc = env_alloc,
                                     .fail = env_fail,
                                     .user = e,
                                     .regexes = &e->regexes,
                                     .max_string = max_string,
                                     .flags = flags};
}

static void env_done(struct env *e)
{
        wp_match_regexes_free(e->regexes);
        e->regexes = NULL;
        while (e->blocks) {
                struct blk *b = e->blocks;
                e->blocks = b->next;
                wp_free(b);
        }
}

/* The message json decodes to (desc), or NULL: the test JSON is wrong, which fails the test. */
static ProtobufCMessage *pb(const ProtobufCMessageDescriptor *desc, const char *json)
{
        struct json_object *o = NULL;
        ProtobufCMessage *m = NULL;
        const char *why = "?";

        if (xds_json_parse(json, strlen(json), &o, &why) == 0) {
                if (xds_pbjson_decode(desc, o, 0, NULL, &m, &why) < 0)
                        m = NULL;
                json_object_put(o);
        }
        if (!m)
                CHECK_FAIL("test JSON does not decode (%s): %s", why, json);
        return m;
}

#define SM_DESC (&envoy__type__matcher__v3__string_matcher__descriptor)
#define HM_DESC (&envoy__config__route__v3__header_matcher__descriptor)

static int compile_sm(struct env *e, const char *json, struct wp_strmatch *out)
{
        ProtobufCMessage *m = pb(SM_DESC, json);
        int r = m ? wp_strmatch_compile(&e->cc, (const void *)m, out) : -1000;
        xds_pbjson_message_free(m);
        return r;
}

static int compile_hm(struct env *e, const char *json, struct wp_hdrmatch *out)
{
        ProtobufCMessage *m = pb(HM_DESC, json);
        int r = m ? wp_hdrmatch_compile(&e->cc, (const void *)m, out) : -1000;
        xds_pbjson_message_free(m);
        return r;
}

/* ---- string matchers ---- */

static void test_string_matcher_kinds(void)
{
        static const struct {
                const char *json, *value;
                int want;
        } cases[] = {
                {"{\"exact\":\"abc\"}", "abc", 1},
                {"{\"exact\":\"abc\"}", "abcd", 0},
                {"{\"exact\":\"abc\"}", "ABC", 0},
                {"{\"exact\":\"abc\"}", "", 0},
                {"{\"exact\":\"\"}", "", 1},
                {"{\"exact\":\"\"}", "a", 0},
                {"{\"exact\":\"AbC\",\"ignore_case\":true}", "aBc", 1},
                {"{\"exact\":\"AbC\",\"ignore_case\":true}", "aBcd", 0},
                {"{\"prefix\":\"/api\"}", "/api/v1", 1},
                {"{\"prefix\":\"/api\"}", "/api", 1},
                {"{\"prefix\":\"/api\"}", "/ap", 0},
                {"{\"prefix\":\"/api\"}", "/API/v1", 0},
                {"{\"prefix\":\"/API\",\"ignore_case\":true}", "/api/v1", 1},
                {"{\"suffix\":\".com\"}", "x.com", 1},
                {"{\"suffix\":\".com\"}", "com", 0},
                {"{\"suffix\":\".com\"}", "x.COM", 0},
                {"{\"suffix\":\".Com\",\"ignore_case\":true}", "x.cOM", 1},
                {"{\"contains\":\"mid\"}", "amidb", 1},
                {"{\"contains\":\"mid\"}", "mid", 1},
                {"{\"contains\":\"mid\"}", "mi", 0},
                {"{\"contains\":\"mid\"}", "aMIDb", 0},
                {"{\"contains\":\"MID\",\"ignore_case\":true}", "xmIdx", 1},
                {"{\"contains\":\"MID\",\"ignore_case\":true}", "xmIx", 0},
                /* safe_regex is a full match */
                {"{\"safe_regex\":{\"regex\":\"a.c\"}}", "abc", 1},
                {"{\"safe_regex\":{\"regex\":\"a.c\"}}", "xabc", 0},
                {"{\"safe_regex\":{\"regex\":\"a.c\"}}", "abcx", 0},
                {"{\"safe_regex\":{\"regex\":\"a|b\"}}", "ab", 0},
                {"{\"safe_regex\":{\"regex\":\"a|b\"}}", "b", 1},
                {"{\"safe_regex\":{\"google_re2\":{},\"regex\":\"[0-9]+\"}}", "123", 1},
                {"{\"safe_regex\":{\"regex\":\".*\"}}", "", 1},
        };
        for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
                struct env e;
                struct wp_strmatch m = {0};
                env_init(&e, 0, 0);
                CHECK_INT_EQ(compile_sm(&e, cases[i].json, &m), 0);
                if (wp_strmatch_match(&m, cases[i].value, strlen(cases[i].value)) !=
                    (cases[i].want == 1))
                        CHECK_FAIL("case %zu: %s on \"%s\": want %d", i, cases[i].json,
                                   cases[i].value, cases[i].want);
                env_done(&e);
        }
}

static void test_string_matcher_compile_errors(void)
{
        static const struct {
                const char *json;
                uint32_t max_string;
                int err;
                const char *desc; /* code where field [pattern] */
        } cases[] = {
                {"{\"prefix\":\"\"}", 0, -EINVAL, "4  prefix "},
                {"{\"suffix\":\"\"}", 0, -EINVAL, "4  suffix "},
                {"{\"contains\":\"\"}", 0, -EINVAL, "4  contains "},
                {"{}", 0, -EINVAL, "2  match_pattern "},
                {"{\"ignore_case\":true}", 0, -EINVAL, "2  match_pattern "},
                {"{\"custom\":{\"name\":\"c\"}}", 0, -EINVAL, "3  custom "},
                {"{\"safe_regex\":{\"regex\":\"a(\"}}", 0, -EINVAL, "8  safe_regex a("},
                {"{\"safe_regex\":{\"regex\":\"a\"},\"ignore_case\":true}", 0, -EINVAL,
                 "7  ignore_case "},
                {"{\"safe_regex\":{\"google_re2\":{\"max_program_size\":5},\"regex\":\"a{50}\"}}",
                 0, -EINVAL, "8  safe_regex a{50}"},
                {"{\"exact\":\"abcde\"}", 4, -E2BIG, "6  pattern "},
                {"{\"prefix\":\"abcde\",\"ignore_case\":true}", 4, -E2BIG, "6  pattern "},
        };
        for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
                struct env e;
                struct wp_strmatch m = {0};
                env_init(&e, cases[i].max_string, 0);
                int r = compile_sm(&e, cases[i].json, &m);
                if (r != cases[i].err || strcmp(e.err, cases[i].desc) != 0)
                        CHECK_FAIL("case %zu: %s: got %d \"%s\", want %d \"%s\"", i, cases[i].json,
                                   r, e.err, cases[i].err, cases[i].desc);
                env_done(&e);
        }
        /* at the limit is fine */
        struct env e;
        struct wp_strmatch m = {0};
        env_init(&e, 4, 0);
        CHECK_INT_EQ(compile_sm(&e, "{\"exact\":\"abcd\"}", &m), 0);
        CHECK(wp_strmatch_match(&m, "abcd", 4));
        env_done(&e);
}

/* ---- header matchers ---- */

struct req {
        struct wp_http_request r;
};

static void req_init(struct req *q)
{
        memset(q, 0, sizeof(*q));
        q->r.method = "GET";
        q->r.path = "/p?q=1";
        q->r.scheme = "http";
        q->r.authority = "Host.Example:80";
        q->r.content_length = -1;
        wp_headers_init(&q->r.headers);
        static const char *const h[][2] = {
                {"x-a", "1"},
                {"x-m", "a"},
                {"x-n", " 42 "},
                {"x-m", "b"},
                {"x-bad", "4x"},
                {"x-e", ""},
                {"x-big", "9223372036854775808"},
        };
        for (size_t i = 0; i < sizeof(h) / sizeof(h[0]); i++)
                REQUIRE(wp_headers_add(&q->r.headers, h[i][0], (uint32_t)strlen(h[i][0]), h[i][1],
                                       (uint32_t)strlen(h[i][1])) == 0);
}

static void test_header_matcher_cases(void)
{
        static const struct {
                const char *json;
                unsigned flags;
                int want;
        } cases[] = {
                /* legacy fields, case-sensitive; names are lower-cased */
                {"{\"name\":\"x-a\",\"exact_match\":\"1\"}", 0, 1},
                {"{\"name\":\"X-A\",\"exact_match\":\"1\"}", 0, 1},
                {"{\"name\":\"x-a\",\"exact_match\":\"2\"}", 0, 0},
                {"{\"name\":\"x-a\",\"exact_match\":\"\"}", 0, 1}, /* empty exact: any value */
                {"{\"name\":\"x-z\",\"exact_match\":\"\"}", 0, 0}, /* ... of a present header */
                {"{\"name\":\"x-m\",\"prefix_match\":\"a,\"}", 0, 1},
                {"{\"name\":\"x-m\",\"suffix_match\":\",b\"}", 0, 1},
                {"{\"name\":\"x-m\",\"contains_match\":\",\"}", 0, 1},
                {"{\"name\":\"x-m\",\"exact_match\":\"a\"}", 0, 0},
                {"{\"name\":\"x-m\",\"safe_regex_match\":{\"regex\":\"a,b\"}}", 0, 1},
                {"{\"name\":\"x-m\",\"safe_regex_match\":{\"regex\":\"a\"}}", 0, 0},
                /* string_match, with ignore_case */
                {"{\"name\":\"x-m\",\"string_match\":{\"exact\":\"a,b\"}}", 0, 1},
                {"{\"name\":\"x-m\",\"string_match\":{\"exact\":\"A,B\"}}", 0, 0},
                {"{\"name\":\"x-m\",\"string_match\":{\"exact\":\"A,B\",\"ignore_case\":true}}", 0,
                 1},
                {"{\"name\":\"x-e\",\"string_match\":{\"exact\":\"\"}}", 0, 1},
                /* invert_match */
                {"{\"name\":\"x-a\",\"string_match\":{\"exact\":\"1\"},\"invert_match\":true}", 0,
                 0},
                {"{\"name\":\"x-a\",\"string_match\":{\"exact\":\"2\"},\"invert_match\":true}", 0,
                 1},
                /* an absent header does not match an inverted value matcher */
                {"{\"name\":\"x-z\",\"string_match\":{\"exact\":\"1\"},\"invert_match\":true}", 0,
                 0},
                /* present / absent */
                {"{\"name\":\"x-a\",\"present_match\":true}", 0, 1},
                {"{\"name\":\"x-a\",\"present_match\":false}", 0, 0},
                {"{\"name\":\"x-z\",\"present_match\":true}", 0, 0},
                {"{\"name\":\"x-z\",\"present_match\":false}", 0, 1},
                {"{\"name\":\"x-z\",\"present_match\":true,\"invert_match\":true}", 0, 1},
                {"{\"name\":\"x-a\",\"present_match\":true,\"invert_match\":true}", 0, 0},
                {"{\"name\":\"x-a\"}", 0, 1}, /* no specifier: presence */
                {"{\"name\":\"x-z\"}", 0, 0},
                /* treat_missing_header_as_empty */
                {"{\"name\":\"x-z\",\"string_match\":{\"exact\":\"\"},"
                 "\"treat_missing_header_as_empty\":true}",
                 0, 1},
                {"{\"name\":\"x-z\",\"string_match\":{\"exact\":\"\"}}", 0, 0},
                {"{\"name\":\"x-z\",\"string_match\":{\"prefix\":\"a\"},"
                 "\"treat_missing_header_as_empty\":true,\"invert_match\":true}",
                 0, 1},
                {"{\"name\":\"x-z\",\"range_match\":{\"start\":\"0\",\"end\":\"9\"},"
                 "\"treat_missing_header_as_empty\":true}",
                 0, 0},
                /* range_match: [start, end) on an integer with optional whitespace and sign */
                {"{\"name\":\"x-n\",\"range_match\":{\"start\":\"40\",\"end\":\"43\"}}", 0, 1},
                {"{\"name\":\"x-n\",\"range_match\":{\"start\":\"42\",\"end\":\"43\"}}", 0, 1},
                {"{\"name\":\"x-n\",\"range_match\":{\"start\":\"40\",\"end\":\"42\"}}", 0, 0},
                {"{\"name\":\"x-n\",\"range_match\":{\"start\":\"40\",\"end\":\"42\"},"
                 "\"invert_match\":true}",
                 0, 1},
                {"{\"name\":\"x-bad\",\"range_match\":{\"start\":\"0\",\"end\":\"100\"}}", 0, 0},
                {"{\"name\":\"x-e\",\"range_match\":{\"start\":\"-1\",\"end\":\"1\"}}", 0, 0},
                {"{\"name\":\"x-big\",\"range_match\":{\"start\":\"0\",\"end\":"
                 "\"9223372036854775807\"}}",
                 0, 0}, /* overflows int64: not a number */
                {"{\"name\":\"x-a\",\"range_match\":{\"start\":\"5\",\"end\":\"5\"}}", 0, 0},
                {"{\"name\":\"x-a\",\"range_match\":{\"start\":\"5\",\"end\":\"5\"},"
                 "\"invert_match\":true}",
                 0, 1},
                /* pseudo-headers come from the request head */
                {"{\"name\":\":method\",\"exact_match\":\"GET\"}", 0, 1},
                {"{\"name\":\":method\",\"exact_match\":\"POST\"}", 0, 0},
                {"{\"name\":\":path\",\"string_match\":{\"exact\":\"/p?q=1\"}}", 0, 1},
                {"{\"name\":\":authority\",\"string_match\":{\"prefix\":\"host.example\","
                 "\"ignore_case\":true}}",
                 0, 1},
                {"{\"name\":\":authority\",\"string_match\":{\"prefix\":\"host.example\"}}", 0, 0},
                {"{\"name\":\":scheme\",\"exact_match\":\"http\"}", 0, 1},
                {"{\"name\":\":protocol\",\"present_match\":true}", 0, 0},
                {"{\"name\":\":protocol\",\"present_match\":false}", 0, 1},
                /* "host" reads :authority only when the caller asks for it */
                {"{\"name\":\"host\",\"present_match\":true}", WP_MATCH_HOST_IS_AUTHORITY, 1},
                {"{\"name\":\"Host\",\"suffix_match\":\":80\"}", WP_MATCH_HOST_IS_AUTHORITY, 1},
                {"{\"name\":\"host\",\"present_match\":true}", 0, 0},
        };
        struct req q;
        char buf[64];
        req_init(&q);
        for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
                struct env e;
                struct wp_hdrmatch h = {0};
                env_init(&e, 0, cases[i].flags);
                int r = compile_hm(&e, cases[i].json, &h);
                if (r < 0) {
                        CHECK_FAIL("case %zu: %s: compile %d %s", i, cases[i].json, r, e.err);
                } else {
                        r = wp_hdrmatch_match(&h, &q.r, buf, sizeof(buf));
                        if (r != cases[i].want)
                                CHECK_FAIL("case %zu: %s: got %d, want %d", i, cases[i].json, r,
                                           cases[i].want);
                }
                env_done(&e);
        }
        wp_headers_done(&q.r.headers);
}

static void test_header_no_request_means_every_header_absent(void)
{
        struct env e;
        struct wp_hdrmatch h = {0};
        char buf[16];

        env_init(&e, 0, 0);
        CHECK_INT_EQ(compile_hm(&e, "{\"name\":\":method\",\"present_match\":false}", &h), 0);
        CHECK_INT_EQ(wp_hdrmatch_match(&h, NULL, buf, sizeof(buf)), 1);
        memset(&h, 0, sizeof(h));
        CHECK_INT_EQ(compile_hm(&e, "{\"name\":\"x-a\",\"exact_match\":\"\"}", &h), 0);
        CHECK_INT_EQ(wp_hdrmatch_match(&h, NULL, buf, sizeof(buf)), 0);
        env_done(&e);
}

static void test_header_joined_value_needs_room(void)
{
        struct env e;
        struct wp_hdrmatch h = {0};
        struct req q;
        char buf[8];
        const char *v = NULL;
        size_t n = 0;

        req_init(&q);
        env_init(&e, 0, 0);
        CHECK_INT_EQ(compile_hm(&e, "{\"name\":\"x-m\",\"string_match\":{\"exact\":\"a,b\"}}", &h),
                     0);
        /* "a,b" needs 3 bytes */
        CHECK_INT_EQ(wp_hdrmatch_match(&h, &q.r, buf, 2), -ENOSPC);
        CHECK_INT_EQ(wp_hdrmatch_value(&h, &q.r, buf, 2, &v, &n), -ENOSPC);
        CHECK_INT_EQ((int)n, 3);
        CHECK_INT_EQ(wp_hdrmatch_value(&h, &q.r, buf, 3, &v, &n), 1);
        CHECK_INT_EQ((int)n, 3);
        CHECK(v == buf && memcmp(v, "a,b", 3) == 0);
        CHECK_INT_EQ(wp_hdrmatch_match(&h, &q.r, buf, 3), 1);
        /* a single value is not copied */
        memset(&h, 0, sizeof(h));
        CHECK_INT_EQ(compile_hm(&e, "{\"name\":\"x-a\",\"exact_match\":\"1\"}", &h), 0);
        CHECK_INT_EQ(wp_hdrmatch_value(&h, &q.r, NULL, 0, &v, &n), 1);
        CHECK(n == 1 && v[0] == '1' && v != buf);
        env_done(&e);
        wp_headers_done(&q.r.headers);
}

static void test_header_matcher_compile_errors(void)
{
        static const struct {
                const char *json;
                unsigned flags;
                uint32_t max_string;
                int err;
                const char *desc; /* code where field [pattern] */
        } cases[] = {
                {"{\"exact_match\":\"x\"}", 0, 0, -EINVAL, "10  name "},
                {"{\"name\":\"\",\"present_match\":true}", 0, 0, -EINVAL, "10  name "},
                {"{\"name\":\"a b\",\"present_match\":true}", 0, 0, -EINVAL, "11  name "},
                {"{\"name\":\"a:b\",\"present_match\":true}", 0, 0, -EINVAL, "11  name "},
                {"{\"name\":\"x\",\"prefix_match\":\"\"}", 0, 0, -EINVAL, "5  prefix_match "},
                {"{\"name\":\"x\",\"suffix_match\":\"\"}", 0, 0, -EINVAL, "5  suffix_match "},
                {"{\"name\":\"x\",\"contains_match\":\"\"}", 0, 0, -EINVAL, "5  contains_match "},
                {"{\"name\":\"x\",\"string_match\":{\"prefix\":\"\"}}", 0, 0, -EINVAL,
                 "4 string_match prefix "},
                {"{\"name\":\"x\",\"string_match\":{}}", 0, 0, -EINVAL,
                 "2 string_match match_pattern "},
                {"{\"name\":\"x\",\"string_match\":{\"safe_regex\":{\"regex\":\"[\"}}}", 0, 0,
                 -EINVAL, "8 string_match safe_regex ["},
                {"{\"name\":\"x\",\"safe_regex_match\":{\"regex\":\"(\"}}", 0, 0, -EINVAL,
                 "8  safe_regex_match ("},
                {"{\"name\":\"x\",\"range_match\":{\"start\":\"5\",\"end\":\"5\"}}",
                 WP_MATCH_REJECT_EMPTY_RANGE, 0, -EINVAL, "12  range_match "},
                {"{\"name\":\"x\",\"exact_match\":\"abcdef\"}", 0, 5, -E2BIG, "6  exact_match "},
                {"{\"name\":\"abcdef\",\"present_match\":true}", 0, 5, -E2BIG, "6  name "},
        };
        for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
                struct env e;
                struct wp_hdrmatch h = {0};
                env_init(&e, cases[i].max_string, cases[i].flags);
                int r = compile_hm(&e, cases[i].json, &h);
                if (r != cases[i].err || strcmp(e.err, cases[i].desc) != 0)
                        CHECK_FAIL("case %zu: %s: got %d \"%s\", want %d \"%s\"", i, cases[i].json,
                                   r, e.err, cases[i].err, cases[i].desc);
                env_done(&e);
        }
}

/* ---- allocation ---- */

struct fa {
        ProtobufCMessage *hm, *sm;
};

static int fa_body(void *arg)
{
        struct fa *a = arg;
        struct env e;
        struct wp_hdrmatch h = {0};
        struct wp_strmatch s = {0};
        env_init(&e, 0, 0);
        int r = wp_hdrmatch_compile(&e.cc, (const Envoy__Config__Route__V3__HeaderMatcher *)a->hm,
                                    &h);
        if (r == 0)
                r = wp_strmatch_compile(&e.cc,
                                        (const Envoy__Type__Matcher__V3__StringMatcher *)a->sm, &s);
        if (r == 0) {
                CHECK(wp_strmatch_match(&s, "ABC", 3));
                CHECK(!wp_strmatch_match(&s, "XAB", 3));
        }
        env_done(&e);
        return r;
}

static void test_failalloc_compile(void)
{
        struct fa a = {
                pb(HM_DESC, "{\"name\":\"X-Ver\",\"string_match\":{\"safe_regex\":{\"regex\":\"v[0-"
                            "9]+\"}}}"),
                pb(SM_DESC, "{\"prefix\":\"ab\",\"ignore_case\":true}"),
        };
        REQUIRE(a.hm && a.sm);
        CHECK_INT_EQ(fa_body(&a), 0);
        unsigned points = check_failalloc_run(fa_body, &a);
        CHECK(points >= 3);
        xds_pbjson_message_free(a.hm);
        xds_pbjson_message_free(a.sm);
}

/* Matching allocates nothing: every allocation fails while matching. */
static void test_match_does_not_allocate(void)
{
        struct env e;
        struct wp_hdrmatch h[3];
        struct req q;
        char buf[64];

        memset(h, 0, sizeof(h));
        req_init(&q);
        env_init(&e, 0, 0);
        CHECK_INT_EQ(compile_hm(&e,
                                "{\"name\":\"x-m\",\"string_match\":{\"safe_regex\":{\"regex\":"
                                "\"[a-z],[a-z]\"}}}",
                                &h[0]),
                     0);
        CHECK_INT_EQ(compile_hm(&e, "{\"name\":\"X-M\",\"contains_match\":\"a,\"}", &h[1]), 0);
        CHECK_INT_EQ(compile_hm(&e,
                                "{\"name\":\"x-n\",\"range_match\":{\"start\":\"1\",\"end\":"
                                "\"100\"}}",
                                &h[2]),
                     0);
        wp_alloc_fail_at(1);
        for (int i = 0; i < 3; i++)
                CHECK_INT_EQ(wp_hdrmatch_match(&h[i], &q.r, buf, sizeof(buf)), 1);
        CHECK_INT_EQ(wp_alloc_failed(), 0);
        wp_alloc_fail_at(0);
        env_done(&e);
        wp_headers_done(&q.r.headers);
}

int main(void)
{
        RUN(test_string_matcher_kinds);
        RUN(test_string_matcher_compile_errors);
        RUN(test_header_matcher_cases);
        RUN(test_header_no_request_means_every_header_absent);
        RUN(test_header_joined_value_needs_room);
        RUN(test_header_matcher_compile_errors);
        RUN(test_failalloc_compile);
        RUN(test_match_does_not_allocate);
        return check_exit();
}
