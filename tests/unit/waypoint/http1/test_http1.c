/*
 * waypoint/http1.c: the HTTP/1.x parser (request and response side) and serializers.
 *
 * Most scenarios go through run(): it feeds a message in one piece, then one byte at a time,
 * then in 3- and 7-byte steps, records a transcript of the events (head fields, body bytes,
 * trailers, done, upgrade, error) and checks that every split gives the same transcript.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "waypoint/base/alloc.h"
#include "waypoint/base/buf.h"
#include "waypoint/base/http.h"
#include "waypoint/http1.h"

/* ---- transcript harness ---- */

struct str {
        char *s;
        size_t len, cap;
};

static void sput(struct str *t, const char *d, size_t n)
{
        if (t->len + n + 1 > t->cap) {
                t->cap = (t->len + n + 1) * 2;
                t->s = realloc(t->s, t->cap);
                if (!t->s)
                        abort();
        }
        memcpy(t->s + t->len, d, n);
        t->len += n;
        t->s[t->len] = '\0';
}

static void sprintf_(struct str *t, const char *fmt, ...)
{
        char tmp[512];
        va_list ap;
        int n;

        va_start(ap, fmt);
        n = vsnprintf(tmp, sizeof(tmp), fmt, ap);
        va_end(ap);
        sput(t, tmp, (size_t)n < sizeof(tmp) ? (size_t)n : sizeof(tmp) - 1);
}

static void dump_headers(struct str *t, const struct wp_headers *h)
{
        for (uint32_t i = 0; i < h->n; i++) {
                /* names and values are NUL-terminated and length-counted: check both agree */
                CHECK(strlen(h->v[i].name) == h->v[i].name_len);
                CHECK(strlen(h->v[i].value) == h->v[i].value_len);
                sprintf_(t, " [%s=%s]", h->v[i].name, h->v[i].value);
        }
}

static void dump_head(struct str *t, struct wp_h1_parser *p)
{
        const struct wp_h1_info *in = wp_h1_parser_info(p);
        struct wp_http_request *q = wp_h1_parser_request(p);
        struct wp_http_response *r = wp_h1_parser_response(p);

        if (q) {
                sprintf_(t, "HEAD %s %s %s a=%s v=%d cl=%lld ch=%d up=%d ex=%d ka=%d hm=%d tf=%d",
                         q->method, q->scheme, q->path, q->authority, (int)q->version,
                         (long long)q->content_length, q->chunked, q->upgrade, q->expect_continue,
                         in->keep_alive, in->host_mismatch, (int)in->target_form);
                dump_headers(t, &q->headers);
        } else {
                sprintf_(t, "HEAD %u '%s' v=%d cl=%lld ch=%d ka=%d body=%d eof=%d", r->status,
                         in->reason, (int)r->version, (long long)r->content_length, r->chunked,
                         in->keep_alive, in->has_body, in->body_until_close);
                dump_headers(t, &r->headers);
        }
        sput(t, "\n", 1);
}

struct run_opts {
        enum wp_h1_mode mode;
        const struct wp_h1_limits *lim;
        const char *method; /* response side: the request's method */
        bool eof;           /* call wp_h1_parser_eof() at the end of input */
};

/*
 * Feeds in[0..len) making `step` more bytes available each time the parser needs more
 * (step 0 = all at once). Returns the transcript (caller frees); *ret_err gets the error.
 */
static char *run_step(const struct run_opts *o, const char *in, size_t len, size_t step,
                      enum wp_h1_error *ret_err)
{
        struct wp_h1_parser *p;
        struct str t = {0}, body = {0};
        size_t off = 0, have = step ? (step < len ? step : len) : len;
        struct wp_h1_event ev;
        int guard = 0;

        *ret_err = WP_H1_OK;
        if (wp_h1_parser_new(o->mode, o->lim, &p) < 0)
                abort();
        if (o->method)
                CHECK(wp_h1_parser_set_request_method(p, o->method) == 0);
        sput(&t, "", 0);
        for (;;) {
                ssize_t n = wp_h1_parser_feed(p, (const uint8_t *)in + off, have - off, &ev);

                if (++guard > 1000000)
                        abort();
                if (n < 0) {
                        if (body.len)
                                sprintf_(&t, "BODY %s\n", body.s), body.len = 0;
                        *ret_err = wp_h1_parser_error(p);
                        sprintf_(&t, "ERR %d %s\n", n, wp_h1_error_str(*ret_err));
                        break;
                }
                CHECK((size_t)n <= have - off);
                off += (size_t)n;
                if (ev.type == WP_H1_EV_BODY) {
                        CHECK(ev.len > 0);
                        /* zero-copy: the data is the input we passed */
                        CHECK(ev.data + ev.len == (const uint8_t *)in + off);
                        sput(&body, (const char *)ev.data, ev.len);
                        continue;
                }
                if (body.len && ev.type != WP_H1_EV_NONE) {
                        sprintf_(&t, "BODY %s\n", body.s);
                        body.len = 0;
                }
                if (ev.type == WP_H1_EV_NONE) {
                        CHECK(off == have); /* NONE means everything was consumed */
                        if (have < len) {
                                have = step && have + step < len ? have + step : len;
                                continue;
                        }
                        if (o->eof) {
                                int r = wp_h1_parser_eof(p, &ev);
                                if (body.len)
                                        sprintf_(&t, "BODY %s\n", body.s), body.len = 0;
                                if (r < 0) {
                                        *ret_err = wp_h1_parser_error(p);
                                        sprintf_(&t, "EOF-ERR %s\n", wp_h1_error_str(*ret_err));
                                } else {
                                        sprintf_(&t, "EOF %d\n", (int)ev.type);
                                }
                        }
                        break;
                }
                if (ev.type == WP_H1_EV_HEAD)
                        dump_head(&t, p);
                else if (ev.type == WP_H1_EV_TRAILERS) {
                        sput(&t, "TRAILERS", 8);
                        dump_headers(&t, wp_h1_parser_trailers(p));
                        sput(&t, "\n", 1);
                } else if (ev.type == WP_H1_EV_DONE) {
                        sprintf_(&t, "DONE at %zu\n", off);
                } else if (ev.type == WP_H1_EV_UPGRADE) {
                        sprintf_(&t, "UPGRADE rest=%zu\n", len - off);
                        break;
                }
        }
        free(body.s);
        wp_h1_parser_free(p);
        return t.s;
}

/* Runs whole, bytewise, 3- and 7-byte steps; checks they agree. Returns the whole-run
 * transcript (caller frees). */
static char *run(const struct run_opts *o, const char *in, size_t len, enum wp_h1_error *ret_err)
{
        static const size_t steps[] = {1, 3, 7};
        char *whole = run_step(o, in, len, 0, ret_err);

        for (size_t i = 0; i < sizeof(steps) / sizeof(steps[0]); i++) {
                enum wp_h1_error e;
                char *t = run_step(o, in, len, steps[i], &e);

                if (strcmp(t, whole) != 0 || e != *ret_err) {
                        fprintf(stderr, "split %zu differs:\n--- whole\n%s--- split\n%s", steps[i],
                                whole, t);
                        check_failures++;
                }
                free(t);
        }
        return whole;
}

static const struct run_opts REQ = {.mode = WP_H1_REQUEST};

/* Runs a request and checks the transcript contains every line of want (in order). */
static void expect_ok(const struct run_opts *o, const char *in, const char *want)
{
        enum wp_h1_error e;
        char *t = run(o, in, strlen(in), &e);
        struct str w = {0};
        const char *dollar = strchr(want, '$');

        /* "$" in want stands for the input's length (where a single message ends) */
        if (dollar) {
                sput(&w, want, (size_t)(dollar - want));
                sprintf_(&w, "%zu", strlen(in));
                sput(&w, dollar + 1, strlen(dollar + 1));
                want = w.s;
        }
        if (e != WP_H1_OK || strcmp(t, want) != 0) {
                fprintf(stderr, "%s: input:\n%s\n--- want\n%s--- got\n%s", check_current, in, want,
                        t);
                check_failures++;
        }
        free(w.s);
        free(t);
}

static void expect_err(const struct run_opts *o, const char *in, size_t len, enum wp_h1_error want)
{
        enum wp_h1_error e;
        char *t = run(o, in, len, &e);

        if (e != want) {
                fprintf(stderr, "%s: want error '%s', got '%s' for:\n%.*s\n--- transcript\n%s",
                        check_current, wp_h1_error_str(want), wp_h1_error_str(e), (int)len, in, t);
                check_failures++;
        }
        free(t);
}

#define REQ_ERR(s, e) expect_err(&REQ, s, sizeof(s) - 1, e)

/* ---- valid requests ---- */

static void test_request_simple_get(void)
{
        expect_ok(&REQ, "GET /a/b?c=d HTTP/1.1\r\nHost: Example.com:8080\r\nUser-Agent: x\r\n\r\n",
                  "HEAD GET http /a/b?c=d a=Example.com:8080 v=1 cl=-1 ch=0 up=0 ex=0 ka=1 hm=0 "
                  "tf=0 [host=Example.com:8080] [user-agent=x]\n"
                  "DONE at $\n");
}

static void test_request_names_lowercased_values_trimmed(void)
{
        expect_ok(&REQ,
                  "GET / HTTP/1.1\r\nHOST: h\r\nX-MiXeD-Case:  \t v a l \t \r\nX-Empty:\r\n"
                  "X-Empty2:   \r\n\r\n",
                  "HEAD GET http / a=h v=1 cl=-1 ch=0 up=0 ex=0 ka=1 hm=0 tf=0 [host=h] "
                  "[x-mixed-case=v a l] [x-empty=] [x-empty2=]\n"
                  "DONE at $\n");
}

static void test_request_content_length_body(void)
{
        expect_ok(&REQ, "POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\nhello world",
                  "HEAD POST http /p a=h v=1 cl=11 ch=0 up=0 ex=0 ka=1 hm=0 tf=0 [host=h] "
                  "[content-length=11]\n"
                  "BODY hello world\n"
                  "DONE at $\n");
}

static void test_request_chunked_body_with_extensions_and_trailers(void)
{
        expect_ok(&REQ,
                  "POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                  "5;name=value;q=\"quoted str\"\r\nhello\r\n"
                  "6 ; ext\r\n world\r\n"
                  "A\r\n0123456789\r\n"
                  "0\r\nX-Trailer: t1\r\nChecksum: abc \r\n\r\n",
                  "HEAD POST http /c a=h v=1 cl=-1 ch=1 up=0 ex=0 ka=1 hm=0 tf=0 [host=h] "
                  "[transfer-encoding=chunked]\n"
                  "BODY hello world0123456789\n"
                  "TRAILERS [x-trailer=t1] [checksum=abc]\n"
                  "DONE at $\n");
}

static void test_request_chunked_without_trailers(void)
{
        expect_ok(&REQ,
                  "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: Chunked\r\n\r\n"
                  "3\r\nabc\r\n000\r\n\r\n",
                  "HEAD POST http / a=h v=1 cl=-1 ch=1 up=0 ex=0 ka=1 hm=0 tf=0 [host=h] "
                  "[transfer-encoding=Chunked]\n"
                  "BODY abc\n"
                  "DONE at $\n");
}

static void test_request_http10_keepalive_only_with_connection_keepalive(void)
{
        expect_ok(&REQ, "GET / HTTP/1.0\r\n\r\n",
                  "HEAD GET http / a= v=0 cl=-1 ch=0 up=0 ex=0 ka=0 hm=0 tf=0\nDONE at $\n");
        expect_ok(&REQ, "GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n",
                  "HEAD GET http / a= v=0 cl=-1 ch=0 up=0 ex=0 ka=1 hm=0 tf=0 "
                  "[connection=Keep-Alive]\nDONE at $\n");
        expect_ok(&REQ, "GET / HTTP/1.1\r\nHost: h\r\nConnection: foo, CLOSE\r\n\r\n",
                  "HEAD GET http / a=h v=1 cl=-1 ch=0 up=0 ex=0 ka=0 hm=0 tf=0 [host=h] "
                  "[connection=foo, CLOSE]\nDONE at $\n");
        /* a higher minor version is HTTP/1.1 */
        expect_ok(&REQ, "GET / HTTP/1.7\r\nHost: h\r\n\r\n",
                  "HEAD GET http / a=h v=1 cl=-1 ch=0 up=0 ex=0 ka=1 hm=0 tf=0 [host=h]\n"
                  "DONE at $\n");
}

static void test_request_expect_100_continue_flagged(void)
{
        expect_ok(
            &REQ,
            "PUT /u HTTP/1.1\r\nHost: h\r\nExpect: 100-Continue\r\nContent-Length: 2\r\n\r\nok",
            "HEAD PUT http /u a=h v=1 cl=2 ch=0 up=0 ex=1 ka=1 hm=0 tf=0 [host=h] "
            "[expect=100-Continue] [content-length=2]\nBODY ok\nDONE at $\n");
        /* RFC 9110 10.1.1: ignored in HTTP/1.0 */
        expect_ok(&REQ, "PUT /u HTTP/1.0\r\nExpect: 100-continue\r\n\r\n",
                  "HEAD PUT http /u a= v=0 cl=-1 ch=0 up=0 ex=0 ka=0 hm=0 tf=0 "
                  "[expect=100-continue]\nDONE at $\n");
}

static void test_request_leading_empty_lines_ignored(void)
{
        expect_ok(&REQ, "\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n",
                  "HEAD GET http / a=h v=1 cl=-1 ch=0 up=0 ex=0 ka=1 hm=0 tf=0 [host=h]\n"
                  "DONE at $\n");
        REQ_ERR("\r\n\r\n\r\n\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n", WP_H1_E_BAD_START_LINE);
}

static void test_request_absolute_form_records_authority_and_flags_mismatch(void)
{
        expect_ok(&REQ, "GET http://Example.com:80/x?y HTTP/1.1\r\nHost: example.COM:80\r\n\r\n",
                  "HEAD GET http /x?y a=Example.com:80 v=1 cl=-1 ch=0 up=0 ex=0 ka=1 hm=0 tf=1 "
                  "[host=example.COM:80]\nDONE at $\n");
        expect_ok(&REQ, "GET HTTPS://evil.example HTTP/1.1\r\nHost: good.example\r\n\r\n",
                  "HEAD GET https / a=evil.example v=1 cl=-1 ch=0 up=0 ex=0 ka=1 hm=1 tf=1 "
                  "[host=good.example]\nDONE at $\n");
        expect_ok(&REQ, "GET http://a.b?q=1 HTTP/1.1\r\nHost: a.b\r\n\r\n",
                  "HEAD GET http /?q=1 a=a.b v=1 cl=-1 ch=0 up=0 ex=0 ka=1 hm=0 tf=1 "
                  "[host=a.b]\nDONE at $\n");
        expect_ok(&REQ, "OPTIONS http://[::1]:8080 HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n",
                  "HEAD OPTIONS http * a=[::1]:8080 v=1 cl=-1 ch=0 up=0 ex=0 ka=1 hm=0 tf=1 "
                  "[host=[::1]:8080]\nDONE at $\n");
        expect_ok(&REQ, "OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n",
                  "HEAD OPTIONS http * a=h v=1 cl=-1 ch=0 up=0 ex=0 ka=1 hm=0 tf=3 [host=h]\n"
                  "DONE at $\n");
}

static void test_request_utf8_values(void)
{
        struct wp_h1_limits lim = {.allow_obs_text = true};
        struct run_opts lax = {.mode = WP_H1_REQUEST, .lim = &lim};

        expect_ok(&REQ,
                  "GET / HTTP/1.1\r\nHost: h\r\nX-Name: caf\xc3\xa9 \xe2\x82\xac "
                  "\xf0\x9f\x98\x80\r\n\r\n",
                  "HEAD GET http / a=h v=1 cl=-1 ch=0 up=0 ex=0 ka=1 hm=0 tf=0 [host=h] "
                  "[x-name=caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80]\nDONE at $\n");
        REQ_ERR("GET / HTTP/1.1\r\nHost: h\r\nX: \xc3\r\n\r\n", WP_H1_E_BAD_UTF8);
        REQ_ERR("GET / HTTP/1.1\r\nHost: h\r\nX: \xc0\xaf\r\n\r\n",
                WP_H1_E_BAD_UTF8); /* overlong */
        REQ_ERR("GET / HTTP/1.1\r\nHost: h\r\nX: \xed\xa0\x80\r\n\r\n",
                WP_H1_E_BAD_UTF8); /* surrogate */
        REQ_ERR("GET / HTTP/1.1\r\nHost: h\r\nX: \xf4\x90\x80\x80\r\n\r\n", WP_H1_E_BAD_UTF8);
        REQ_ERR("GET / HTTP/1.1\r\nHost: h\r\nX: \xff\r\n\r\n", WP_H1_E_BAD_UTF8);
        expect_ok(&lax, "GET / HTTP/1.1\r\nHost: h\r\nX: a\xff\r\n\r\n",
                  "HEAD GET http / a=h v=1 cl=-1 ch=0 up=0 ex=0 ka=1 hm=0 tf=0 [host=h] "
                  "[x=a\xff]\nDONE at $\n");
}

static void test_request_value_bytes_checked_at_every_position(void)
{
        static const char bad[] = {'\0', '\x01', '\x08', '\n', '\x1f', '\x7f'};

        for (size_t pos = 0; pos < 24; pos++) {
                char in[128];
                char v[25];
                enum wp_h1_error e;
                char *t;

                memset(v, 'v', 24);
                v[24] = '\0';
                v[pos] = '\t'; /* allowed anywhere (trimmed at the ends) */
                int n = snprintf(in, sizeof(in), "GET / HTTP/1.1\r\nHost: h\r\nX: %s\r\n\r\n", v);
                t = run(&REQ, in, (size_t)n, &e);
                CHECK(e == WP_H1_OK);
                free(t);
                for (size_t b = 0; b < sizeof(bad); b++) {
                        in[28 + pos] = bad[b];
                        expect_err(&REQ, in, (size_t)n,
                                   bad[b] == '\n' ? WP_H1_E_BARE_LF : WP_H1_E_BAD_HEADER_VALUE);
                }
                in[28 + pos] = '\xe9'; /* Latin-1, not UTF-8 */
                expect_err(&REQ, in, (size_t)n, WP_H1_E_BAD_UTF8);
        }
}

/* ---- smuggling and syntax defences (request side) ---- */

static void test_request_rejects_framing_conflicts(void)
{
        REQ_ERR(
            "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
            "0\r\n\r\n",
            WP_H1_E_CL_AND_TE);
        REQ_ERR(
            "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            WP_H1_E_CL_AND_TE);
        REQ_ERR("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
                WP_H1_E_MULTIPLE_CONTENT_LENGTH);
        REQ_ERR("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5, 5\r\n\r\nhello",
                WP_H1_E_BAD_CONTENT_LENGTH);
        REQ_ERR("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +5\r\n\r\nhello",
                WP_H1_E_BAD_CONTENT_LENGTH);
        REQ_ERR("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n",
                WP_H1_E_BAD_CONTENT_LENGTH);
        REQ_ERR("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0x5\r\n\r\n",
                WP_H1_E_BAD_CONTENT_LENGTH);
        REQ_ERR("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5 5\r\n\r\n",
                WP_H1_E_BAD_CONTENT_LENGTH);
        REQ_ERR("POST / HTTP/1.1\r\nHost: h\r\nContent-Length:\r\n\r\n",
                WP_H1_E_BAD_CONTENT_LENGTH);
        REQ_ERR("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 9223372036854775808\r\n\r\n",
                WP_H1_E_BAD_CONTENT_LENGTH);
        REQ_ERR("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 99999999999999999999999\r\n\r\n",
                WP_H1_E_BAD_CONTENT_LENGTH);
        /* TE */
        REQ_ERR("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
                WP_H1_E_TE_CHUNKED_NOT_LAST);
        REQ_ERR("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: "
                "identity\r\n\r\n",
                WP_H1_E_TE_CHUNKED_NOT_LAST);
        REQ_ERR("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
                WP_H1_E_TE_CHUNKED_NOT_LAST);
        REQ_ERR("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked,\r\n\r\n",
                WP_H1_E_TE_CHUNKED_NOT_LAST);
        REQ_ERR("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: ,chunked\r\n\r\n",
                WP_H1_E_TE_CHUNKED_NOT_LAST);
        REQ_ERR("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n",
                WP_H1_E_TE_UNSUPPORTED);
        REQ_ERR("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                WP_H1_E_TE_UNSUPPORTED);
        REQ_ERR("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: xchunked\r\n\r\n",
                WP_H1_E_TE_UNSUPPORTED);
        REQ_ERR("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked;a=b\r\n\r\n",
                WP_H1_E_TE_UNSUPPORTED);
        REQ_ERR("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                WP_H1_E_TE_HTTP10);
        REQ_ERR("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding:\r\n\r\n",
                WP_H1_E_TE_CHUNKED_NOT_LAST);
        /* the classic obfuscations */
        REQ_ERR("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding : chunked\r\n\r\n",
                WP_H1_E_WS_BEFORE_COLON);
        REQ_ERR("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding:\x0b"
                "chunked\r\n\r\n",
                WP_H1_E_BAD_HEADER_VALUE);
        REQ_ERR("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nTransfer-Encoding:\r\n "
                "chunked\r\n\r\n",
                WP_H1_E_OBS_FOLD);
}

static void test_request_accepts_identical_duplicate_content_length(void)
{
        expect_ok(
            &REQ,
            "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\ncontent-length: 003\r\n\r\nabc",
            "HEAD POST http / a=h v=1 cl=3 ch=0 up=0 ex=0 ka=1 hm=0 tf=0 [host=h] "
            "[content-length=3]\nBODY abc\nDONE at $\n");
}

static void test_request_rejects_line_terminator_abuse(void)
{
        REQ_ERR("GET / HTTP/1.1\nHost: h\r\n\r\n", WP_H1_E_BARE_LF);
        REQ_ERR("GET / HTTP/1.1\r\nHost: h\n\r\n", WP_H1_E_BARE_LF);
        REQ_ERR("GET / HTTP/1.1\r\nHost: h\r\n\n", WP_H1_E_BARE_LF);
        REQ_ERR("GET / HTTP/1.1\r\nHost: h\rX: y\r\n\r\n", WP_H1_E_BARE_CR);
        REQ_ERR("GET / HTTP/1.1\r\nHost: h\r\nX: a\rb\r\n\r\n", WP_H1_E_BARE_CR);
        REQ_ERR("\nGET / HTTP/1.1\r\nHost: h\r\n\r\n", WP_H1_E_BARE_LF);
        REQ_ERR("GET / HTTP/1.1\r\nHost: h\r\nX: y\r\n\r\r\n", WP_H1_E_BARE_CR);
        /* obs-fold, whitespace after the start line */
        REQ_ERR("GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n\tb\r\n\r\n", WP_H1_E_OBS_FOLD);
        REQ_ERR("GET / HTTP/1.1\r\n Host: h\r\n\r\n", WP_H1_E_OBS_FOLD);
}

static void test_request_rejects_bad_names_and_values(void)
{
        REQ_ERR("GET / HTTP/1.1\r\nHost: h\r\nX Y: z\r\n\r\n", WP_H1_E_BAD_HEADER_NAME);
        REQ_ERR("GET / HTTP/1.1\r\nHost: h\r\n: z\r\n\r\n", WP_H1_E_BAD_HEADER_NAME);
        REQ_ERR("GET / HTTP/1.1\r\nHost: h\r\nNoColon\r\n\r\n", WP_H1_E_BAD_HEADER_NAME);
        REQ_ERR("GET / HTTP/1.1\r\nHost: h\r\nX(y): z\r\n\r\n", WP_H1_E_BAD_HEADER_NAME);
        REQ_ERR("GET / HTTP/1.1\r\nHost: h\r\nX\xc3\xa9: z\r\n\r\n", WP_H1_E_BAD_HEADER_NAME);
        REQ_ERR("GET / HTTP/1.1\r\nHost: h\r\nX\t: z\r\n\r\n", WP_H1_E_WS_BEFORE_COLON);
        REQ_ERR("GET / HTTP/1.1\r\nHost: h\r\nX: a\x01"
                "b\r\n\r\n",
                WP_H1_E_BAD_HEADER_VALUE);
        REQ_ERR("GET / HTTP/1.1\r\nHost: h\r\nX: a\x7f\r\n\r\n", WP_H1_E_BAD_HEADER_VALUE);
        REQ_ERR("GET / HTTP/1.1\r\nHost: h\r\nX: a\0b\r\n\r\n", WP_H1_E_BAD_HEADER_VALUE);
        REQ_ERR("GET / HTTP/1.1\r\nHost: h\r\nX\0: a\r\n\r\n", WP_H1_E_BAD_HEADER_NAME);
        REQ_ERR("GET / HTTP/1.1\r\nHost: h\r\nX Y : z\r\n\r\n", WP_H1_E_BAD_HEADER_NAME);
        REQ_ERR("GET / HTTP/1.1\r\nHost: h\r\nX \t : z\r\n\r\n", WP_H1_E_WS_BEFORE_COLON);
}

static void test_request_rejects_bad_request_lines(void)
{
        REQ_ERR("G@T / HTTP/1.1\r\nHost: h\r\n\r\n", WP_H1_E_BAD_METHOD);
        REQ_ERR("GET\x01 / HTTP/1.1\r\nHost: h\r\n\r\n", WP_H1_E_BAD_METHOD);
        REQ_ERR(" GET / HTTP/1.1\r\nHost: h\r\n\r\n", WP_H1_E_BAD_START_LINE);
        REQ_ERR("GET  / HTTP/1.1\r\nHost: h\r\n\r\n", WP_H1_E_BAD_START_LINE);
        REQ_ERR("GET\t/ HTTP/1.1\r\nHost: h\r\n\r\n", WP_H1_E_BAD_START_LINE);
        REQ_ERR("GET /\r\n\r\n", WP_H1_E_BAD_START_LINE); /* HTTP/0.9 */
        REQ_ERR("GET / HTTP/1.1 \r\nHost: h\r\n\r\n", WP_H1_E_BAD_VERSION);
        REQ_ERR("GET / http/1.1\r\nHost: h\r\n\r\n", WP_H1_E_BAD_VERSION);
        REQ_ERR("GET / HTTP/1.10\r\nHost: h\r\n\r\n", WP_H1_E_BAD_VERSION);
        REQ_ERR("GET / HTTP/11\r\nHost: h\r\n\r\n", WP_H1_E_BAD_VERSION);
        REQ_ERR("GET / HTTP/2.0\r\nHost: h\r\n\r\n", WP_H1_E_VERSION_UNSUPPORTED);
        REQ_ERR("GET / HTTP/0.9\r\nHost: h\r\n\r\n", WP_H1_E_VERSION_UNSUPPORTED);
        REQ_ERR("GET /a b HTTP/1.1\r\nHost: h\r\n\r\n", WP_H1_E_BAD_VERSION);
        REQ_ERR("GET /a#frag HTTP/1.1\r\nHost: h\r\n\r\n", WP_H1_E_BAD_TARGET);
        REQ_ERR("GET /caf\xc3\xa9 HTTP/1.1\r\nHost: h\r\n\r\n", WP_H1_E_BAD_TARGET);
        REQ_ERR("GET /\x7f HTTP/1.1\r\nHost: h\r\n\r\n", WP_H1_E_BAD_TARGET);
        REQ_ERR("GET a/b HTTP/1.1\r\nHost: h\r\n\r\n", WP_H1_E_BAD_TARGET);
        REQ_ERR("GET * HTTP/1.1\r\nHost: h\r\n\r\n", WP_H1_E_ASTERISK_NOT_OPTIONS);
        REQ_ERR("GET h:80 HTTP/1.1\r\nHost: h\r\n\r\n", WP_H1_E_AUTHORITY_NOT_CONNECT);
        REQ_ERR("CONNECT / HTTP/1.1\r\nHost: h\r\n\r\n", WP_H1_E_CONNECT_NOT_AUTHORITY);
        REQ_ERR("CONNECT h HTTP/1.1\r\nHost: h\r\n\r\n", WP_H1_E_CONNECT_NOT_AUTHORITY);
        REQ_ERR("CONNECT http://h:80/ HTTP/1.1\r\nHost: h\r\n\r\n", WP_H1_E_CONNECT_NOT_AUTHORITY);
        REQ_ERR("GET http://user@h/ HTTP/1.1\r\nHost: h\r\n\r\n", WP_H1_E_BAD_TARGET);
        REQ_ERR("GET http:///x HTTP/1.1\r\nHost: h\r\n\r\n", WP_H1_E_BAD_TARGET);
        REQ_ERR("GET ftp://h/x HTTP/1.1\r\nHost: h\r\n\r\n", WP_H1_E_BAD_TARGET);
        REQ_ERR("GET http://h:99999/ HTTP/1.1\r\nHost: h\r\n\r\n", WP_H1_E_BAD_TARGET);
}

static void test_request_host_rules(void)
{
        REQ_ERR("GET / HTTP/1.1\r\n\r\n", WP_H1_E_MISSING_HOST);
        REQ_ERR("GET http://h/ HTTP/1.1\r\n\r\n", WP_H1_E_MISSING_HOST);
        REQ_ERR("GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n", WP_H1_E_MULTIPLE_HOST);
        REQ_ERR("GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n", WP_H1_E_MULTIPLE_HOST);
        REQ_ERR("GET / HTTP/1.1\r\nHost: a b\r\n\r\n", WP_H1_E_BAD_HOST);
        REQ_ERR("GET / HTTP/1.1\r\nHost: u@h\r\n\r\n", WP_H1_E_BAD_HOST);
        REQ_ERR("GET / HTTP/1.1\r\nHost: h:\r\n\r\n", WP_H1_E_BAD_HOST);
        REQ_ERR("GET / HTTP/1.1\r\nHost: h:x\r\n\r\n", WP_H1_E_BAD_HOST);
        REQ_ERR("GET / HTTP/1.1\r\nHost: [::1\r\n\r\n", WP_H1_E_BAD_HOST);
        REQ_ERR("GET / HTTP/1.1\r\nHost: h%zz\r\n\r\n", WP_H1_E_BAD_HOST);
        REQ_ERR("GET / HTTP/1.1\r\nHost: h/x\r\n\r\n", WP_H1_E_BAD_HOST);
        /* empty Host is valid (RFC 9112 3.2) */
        expect_ok(&REQ, "GET / HTTP/1.1\r\nHost:\r\n\r\n",
                  "HEAD GET http / a= v=1 cl=-1 ch=0 up=0 ex=0 ka=1 hm=0 tf=0 [host=]\n"
                  "DONE at $\n");
}

static void test_request_rejects_bad_chunks(void)
{
#define CH "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
        REQ_ERR(CH "x\r\n", WP_H1_E_BAD_CHUNK_SIZE);
        REQ_ERR(CH "\r\n", WP_H1_E_BAD_CHUNK_SIZE);
        REQ_ERR(CH "-1\r\n", WP_H1_E_BAD_CHUNK_SIZE);
        REQ_ERR(CH " 5\r\nhello\r\n0\r\n\r\n", WP_H1_E_BAD_CHUNK_SIZE);
        REQ_ERR(CH "0x5\r\nhello\r\n0\r\n\r\n", WP_H1_E_BAD_CHUNK_SIZE);
        REQ_ERR(CH "5\nhello\r\n0\r\n\r\n", WP_H1_E_BARE_LF);
        REQ_ERR(CH "5\rhello\r\n0\r\n\r\n", WP_H1_E_BARE_CR);
        REQ_ERR(CH "5\r\nhelloX\r\n0\r\n\r\n", WP_H1_E_MISSING_CHUNK_CRLF);
        REQ_ERR(CH "5\r\nhello\rX0\r\n\r\n", WP_H1_E_MISSING_CHUNK_CRLF);
        REQ_ERR(CH "5\r\nhello\n0\r\n\r\n", WP_H1_E_MISSING_CHUNK_CRLF);
        REQ_ERR(CH "10000000000000000\r\n", WP_H1_E_CHUNK_SIZE_OVERFLOW);
        REQ_ERR(CH "00000000000000001\r\n", WP_H1_E_CHUNK_SIZE_OVERFLOW);
        REQ_ERR(CH "8000000000000000\r\n", WP_H1_E_CHUNK_SIZE_OVERFLOW);
        REQ_ERR(CH "5 \r\nhello\r\n0\r\n\r\n", WP_H1_E_BAD_CHUNK_EXT);
        REQ_ERR(CH "5 x\r\nhello\r\n0\r\n\r\n", WP_H1_E_BAD_CHUNK_EXT);
        REQ_ERR(CH "5;a\x01\r\nhello\r\n0\r\n\r\n", WP_H1_E_BAD_CHUNK_EXT);
        REQ_ERR(CH "5;a=\"b\nc\"\r\nhello\r\n0\r\n\r\n", WP_H1_E_BARE_LF);
        REQ_ERR(CH "5;a\rb\r\nhello\r\n0\r\n\r\n", WP_H1_E_BARE_CR);
        /* trailers get the field-line rules */
        REQ_ERR(CH "0\r\nX : y\r\n\r\n", WP_H1_E_WS_BEFORE_COLON);
        REQ_ERR(CH "0\r\nX: y\r\n z\r\n\r\n", WP_H1_E_OBS_FOLD);
        REQ_ERR(CH "0\r\nX: y\n\r\n", WP_H1_E_BARE_LF);
        REQ_ERR(CH "0\r\nX: \x01\r\n\r\n", WP_H1_E_BAD_HEADER_VALUE);
}

static void test_request_connect(void)
{
        expect_ok(&REQ, "CONNECT svc.ns:443 HTTP/1.1\r\nHost: svc.ns:443\r\n\r\nRAW",
                  "HEAD CONNECT http  a=svc.ns:443 v=1 cl=-1 ch=0 up=1 ex=0 ka=1 hm=0 tf=2 "
                  "[host=svc.ns:443]\nDONE at 49\nUPGRADE rest=3\n");
        REQ_ERR("CONNECT h:1 HTTP/1.1\r\nHost: h:1\r\nContent-Length: 1\r\n\r\nx",
                WP_H1_E_CONNECT_BODY);
        REQ_ERR("CONNECT h:1 HTTP/1.1\r\nHost: h:1\r\nTransfer-Encoding: chunked\r\n\r\n",
                WP_H1_E_CONNECT_BODY);
}

/* ---- upgrade, pipelining, boundaries ---- */

static void test_request_websocket_upgrade_waits_for_decision(void)
{
        const char *in = "GET /ws HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, Upgrade\r\n"
                         "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n\x81\x05hello";
        expect_ok(&REQ, in,
                  "HEAD GET http /ws a=h v=1 cl=-1 ch=0 up=1 ex=0 ka=1 hm=0 tf=0 [host=h] "
                  "[connection=keep-alive, Upgrade] [upgrade=websocket] "
                  "[sec-websocket-version=13]\nDONE at 109\nUPGRADE rest=7\n");

        /* Upgrade without the connection token, or in HTTP/1.0: not an upgrade */
        expect_ok(&REQ, "GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n\r\n",
                  "HEAD GET http / a=h v=1 cl=-1 ch=0 up=0 ex=0 ka=1 hm=0 tf=0 [host=h] "
                  "[upgrade=websocket]\nDONE at $\n");
        expect_ok(&REQ, "GET / HTTP/1.0\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
                  "HEAD GET http / a= v=0 cl=-1 ch=0 up=0 ex=0 ka=0 hm=0 tf=0 "
                  "[connection=upgrade] [upgrade=websocket]\nDONE at $\n");

        /* refused upgrade: resume parses the next request */
        struct wp_h1_parser *p;
        struct wp_h1_event ev;
        const char *two = "GET /ws HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n"
                          "GET /next HTTP/1.1\r\nHost: h\r\n\r\n";
        size_t len = strlen(two), off = 0;
        ssize_t n;

        REQUIRE(wp_h1_parser_new(WP_H1_REQUEST, NULL, &p) == 0);
        CHECK(wp_h1_parser_resume(p) == -EINVAL);
        n = wp_h1_parser_feed(p, (const uint8_t *)two, len, &ev);
        CHECK(ev.type == WP_H1_EV_HEAD && n == 62);
        off += (size_t)n;
        n = wp_h1_parser_feed(p, (const uint8_t *)two + off, len - off, &ev);
        CHECK(ev.type == WP_H1_EV_DONE && n == 0);
        for (int i = 0; i < 3; i++) {
                n = wp_h1_parser_feed(p, (const uint8_t *)two + off, len - off, &ev);
                CHECK(ev.type == WP_H1_EV_UPGRADE && n == 0);
        }
        CHECK(wp_h1_parser_resume(p) == 0);
        n = wp_h1_parser_feed(p, (const uint8_t *)two + off, len - off, &ev);
        CHECK(ev.type == WP_H1_EV_HEAD && (size_t)n == len - off);
        CHECK_STR_EQ(wp_h1_parser_request(p)->path, "/next");
        CHECK(!wp_h1_parser_request(p)->upgrade);
        wp_h1_parser_free(p);
}

static void test_request_pipelined_parser_stops_at_boundary(void)
{
        const char *in = "POST /1 HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc"
                         "GET /2 HTTP/1.1\r\nHost: h\r\n\r\n"
                         "POST /3 HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
                         "1\r\nx\r\n0\r\n\r\n"
                         "GET /4 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n";
        const char *want = "HEAD POST http /1 a=h v=1 cl=3 ch=0 up=0 ex=0 ka=1 hm=0 tf=0 [host=h] "
                           "[content-length=3]\nBODY abc\nDONE at 51\n"
                           "HEAD GET http /2 a=h v=1 cl=-1 ch=0 up=0 ex=0 ka=1 hm=0 tf=0 [host=h]\n"
                           "DONE at 79\n"
                           "HEAD POST http /3 a=h v=1 cl=-1 ch=1 up=0 ex=0 ka=1 hm=0 tf=0 [host=h] "
                           "[transfer-encoding=chunked]\nBODY x\nDONE at 147\n"
                           "HEAD GET http /4 a=h v=1 cl=-1 ch=0 up=0 ex=0 ka=0 hm=0 tf=0 [host=h] "
                           "[connection=close]\nDONE at 194\n";
        expect_ok(&REQ, in, want);

        /* DONE leaves the next request's bytes alone; len == 0 calls keep the head */
        struct wp_h1_parser *p;
        struct wp_h1_event ev;
        size_t len = strlen(in);
        ssize_t n;

        REQUIRE(wp_h1_parser_new(WP_H1_REQUEST, NULL, &p) == 0);
        n = wp_h1_parser_feed(p, (const uint8_t *)in, len, &ev);
        CHECK(ev.type == WP_H1_EV_HEAD && n == 48);
        n = wp_h1_parser_feed(p, (const uint8_t *)in + 48, len - 48, &ev);
        CHECK(ev.type == WP_H1_EV_BODY && n == 3 && ev.len == 3);
        n = wp_h1_parser_feed(p, (const uint8_t *)in + 51, len - 51, &ev);
        CHECK(ev.type == WP_H1_EV_DONE && n == 0);
        n = wp_h1_parser_feed(p, NULL, 0, &ev);
        CHECK(ev.type == WP_H1_EV_NONE && n == 0);
        CHECK_STR_EQ(wp_h1_parser_request(p)->path, "/1");
        n = wp_h1_parser_feed(p, (const uint8_t *)in + 51, len - 51, &ev);
        CHECK(ev.type == WP_H1_EV_HEAD && n == 28);
        CHECK_STR_EQ(wp_h1_parser_request(p)->path, "/2");
        CHECK_INT_EQ(wp_h1_parser_request(p)->headers.n, 1);
        wp_h1_parser_free(p);
}

static void test_request_errors_are_sticky_and_eof_truncation(void)
{
        struct wp_h1_parser *p;
        struct wp_h1_event ev;
        const char *bad = "GET / HTTP/1.1\nHost: h\r\n\r\n";

        REQUIRE(wp_h1_parser_new(WP_H1_REQUEST, NULL, &p) == 0);
        CHECK(wp_h1_parser_feed(p, (const uint8_t *)bad, strlen(bad), &ev) == -EBADMSG);
        CHECK(wp_h1_parser_error(p) == WP_H1_E_BARE_LF);
        CHECK(wp_h1_parser_feed(p, (const uint8_t *)"GET", 3, &ev) == -EBADMSG);
        CHECK(wp_h1_parser_eof(p, &ev) == -EBADMSG);
        CHECK(wp_h1_error_status(wp_h1_parser_error(p)) == 400);
        wp_h1_parser_free(p);

        struct run_opts o = {.mode = WP_H1_REQUEST, .eof = true};
        expect_err(&o, "GET / HTTP/1.1\r\nHost: h\r\n", 25, WP_H1_E_TRUNCATED);
        expect_err(&o, "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nab", 49,
                   WP_H1_E_TRUNCATED);
        expect_err(&o, CH "5\r\nhello\r\n", sizeof(CH "5\r\nhello\r\n") - 1, WP_H1_E_TRUNCATED);
        /* EOF between messages (or after empty lines) is clean */
        expect_ok(&o, "GET / HTTP/1.1\r\nHost: h\r\n\r\n\r\n",
                  "HEAD GET http / a=h v=1 cl=-1 ch=0 up=0 ex=0 ka=1 hm=0 tf=0 [host=h]\n"
                  "DONE at 27\nEOF 0\n");
}

/* ---- limits ---- */

static char *repeat(char c, size_t n)
{
        char *s = malloc(n + 1);
        memset(s, c, n);
        s[n] = '\0';
        return s;
}

static void test_limits_request_line_exact_and_plus_one(void)
{
        struct wp_h1_limits lim = {.max_start_line = 64};
        struct run_opts o = {.mode = WP_H1_REQUEST, .lim = &lim};
        char buf[256];
        /* "GET /xxx HTTP/1.1" = 4 + path + 9 */
        char *path = repeat('x', 64 - 4 - 9 - 1);
        enum wp_h1_error e;
        char *t;

        snprintf(buf, sizeof(buf), "GET /%s HTTP/1.1\r\nHost: h\r\n\r\n", path);
        t = run(&o, buf, strlen(buf), &e);
        CHECK(e == WP_H1_OK);
        free(t);
        snprintf(buf, sizeof(buf), "GET /%sy HTTP/1.1\r\nHost: h\r\n\r\n", path);
        expect_err(&o, buf, strlen(buf), WP_H1_E_START_LINE_TOO_LONG);
        CHECK(wp_h1_error_status(WP_H1_E_START_LINE_TOO_LONG) == 414);
        /* rejected before the line ends: no CRLF needed */
        snprintf(buf, sizeof(buf), "GET /%syyyyyyyyyyyyyyyy", path);
        expect_err(&o, buf, strlen(buf), WP_H1_E_START_LINE_TOO_LONG);
        free(path);
}

static void test_limits_header_bytes_and_count(void)
{
        struct wp_h1_limits lim = {.max_header_bytes = 100, .max_headers = 4};
        struct run_opts o = {.mode = WP_H1_REQUEST, .lim = &lim};
        char buf[512];
        enum wp_h1_error e;
        char *t;
        /* "Host: h\r\n" = 9 bytes; "X: <v>\r\n" = 5 + v: 9 + 5 + 86 = 100 */
        char *v = repeat('v', 86);

        snprintf(buf, sizeof(buf), "GET / HTTP/1.1\r\nHost: h\r\nX: %s\r\n\r\n", v);
        t = run(&o, buf, strlen(buf), &e);
        CHECK(e == WP_H1_OK);
        free(t);
        snprintf(buf, sizeof(buf), "GET / HTTP/1.1\r\nHost: h\r\nX: %sv\r\n\r\n", v);
        expect_err(&o, buf, strlen(buf), WP_H1_E_HEADERS_TOO_LARGE);
        CHECK(wp_h1_error_status(WP_H1_E_HEADERS_TOO_LARGE) == 431);
        /* without any CRLF: rejected as soon as the limit is crossed */
        snprintf(buf, sizeof(buf), "GET / HTTP/1.1\r\nHost: h\r\nX: %s%s", v, v);
        expect_err(&o, buf, strlen(buf), WP_H1_E_HEADERS_TOO_LARGE);
        free(v);

        expect_ok(&o, "GET / HTTP/1.1\r\nHost: h\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n",
                  "HEAD GET http / a=h v=1 cl=-1 ch=0 up=0 ex=0 ka=1 hm=0 tf=0 [host=h] [a=1] "
                  "[b=2] [c=3]\nDONE at $\n");
        expect_err(&o, "GET / HTTP/1.1\r\nHost: h\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n\r\n", 51,
                   WP_H1_E_TOO_MANY_HEADERS);
        CHECK(wp_h1_error_status(WP_H1_E_TOO_MANY_HEADERS) == 431);
}

static void test_limits_trailers(void)
{
        struct wp_h1_limits lim = {.max_header_bytes = 40, .max_headers = 2};
        struct run_opts o = {.mode = WP_H1_REQUEST, .lim = &lim};

        expect_ok(&o, CH "0\r\nA: 1\r\nB: 2\r\n\r\n",
                  "HEAD POST http / a=h v=1 cl=-1 ch=1 up=0 ex=0 ka=1 hm=0 tf=0 [host=h] "
                  "[transfer-encoding=chunked]\nTRAILERS [a=1] [b=2]\nDONE at $\n");
        expect_err(&o, CH "0\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n",
                   sizeof(CH "0\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n") - 1, WP_H1_E_TRAILERS_TOO_LARGE);
        expect_err(&o, CH "0\r\nA: 012345678901234567890123456789012345\r\n\r\n",
                   sizeof(CH "0\r\nA: 012345678901234567890123456789012345\r\n\r\n") - 1,
                   WP_H1_E_TRAILERS_TOO_LARGE);
        expect_ok(&o, CH "0\r\nA: 01234567890123456789012345678901234\r\n\r\n",
                  "HEAD POST http / a=h v=1 cl=-1 ch=1 up=0 ex=0 ka=1 hm=0 tf=0 [host=h] "
                  "[transfer-encoding=chunked]\nTRAILERS [a=01234567890123456789012345678901234]\n"
                  "DONE at $\n");
}

static void test_limits_chunk_extension(void)
{
        struct wp_h1_limits lim = {.max_chunk_ext = 8};
        struct run_opts o = {.mode = WP_H1_REQUEST, .lim = &lim};

        expect_ok(&o, CH "1;abcdefg\r\nx\r\n0\r\n\r\n",
                  "HEAD POST http / a=h v=1 cl=-1 ch=1 up=0 ex=0 ka=1 hm=0 tf=0 [host=h] "
                  "[transfer-encoding=chunked]\nBODY x\nDONE at $\n");
        expect_err(&o, CH "1;abcdefgh\r\nx\r\n0\r\n\r\n",
                   sizeof(CH "1;abcdefgh\r\nx\r\n0\r\n\r\n") - 1, WP_H1_E_CHUNK_EXT_TOO_LONG);
        /* also on the last chunk */
        expect_err(&o, CH "0;abcdefgh\r\n\r\n", sizeof(CH "0;abcdefgh\r\n\r\n") - 1,
                   WP_H1_E_CHUNK_EXT_TOO_LONG);
}

static void test_limits_body(void)
{
        struct wp_h1_limits lim = {.max_body = 5};
        struct run_opts o = {.mode = WP_H1_REQUEST, .lim = &lim};

        expect_ok(&o, "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello",
                  "HEAD POST http / a=h v=1 cl=5 ch=0 up=0 ex=0 ka=1 hm=0 tf=0 [host=h] "
                  "[content-length=5]\nBODY hello\nDONE at $\n");
        expect_err(&o, "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 6\r\n\r\nhello!", 53,
                   WP_H1_E_BODY_TOO_LARGE);
        CHECK(wp_h1_error_status(WP_H1_E_BODY_TOO_LARGE) == 413);
        expect_ok(&o, CH "2\r\nhe\r\n3\r\nllo\r\n0\r\n\r\n",
                  "HEAD POST http / a=h v=1 cl=-1 ch=1 up=0 ex=0 ka=1 hm=0 tf=0 [host=h] "
                  "[transfer-encoding=chunked]\nBODY hello\nDONE at $\n");
        expect_err(&o, CH "2\r\nhe\r\n4\r\nllo!\r\n0\r\n\r\n",
                   sizeof(CH "2\r\nhe\r\n4\r\nllo!\r\n0\r\n\r\n") - 1, WP_H1_E_BODY_TOO_LARGE);

        /* the caller's hook after the head */
        struct wp_h1_parser *p;
        struct wp_h1_event ev;
        const char *in = "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n0123456789";
        ssize_t n;

        REQUIRE(wp_h1_parser_new(WP_H1_REQUEST, NULL, &p) == 0);
        n = wp_h1_parser_feed(p, (const uint8_t *)in, strlen(in), &ev);
        CHECK(ev.type == WP_H1_EV_HEAD);
        wp_h1_parser_set_max_body(p, 9);
        CHECK(wp_h1_parser_feed(p, (const uint8_t *)in + n, strlen(in) - (size_t)n, &ev) ==
              -EBADMSG);
        CHECK(wp_h1_parser_error(p) == WP_H1_E_BODY_TOO_LARGE);
        wp_h1_parser_free(p);

        REQUIRE(wp_h1_parser_new(WP_H1_REQUEST, NULL, &p) == 0);
        n = wp_h1_parser_feed(p, (const uint8_t *)in, strlen(in), &ev);
        wp_h1_parser_set_max_body(p, 10);
        CHECK(wp_h1_parser_feed(p, (const uint8_t *)in + n, strlen(in) - (size_t)n, &ev) == 10);
        CHECK(ev.type == WP_H1_EV_BODY);
        wp_h1_parser_free(p);
}

static void test_limits_constructor_validation(void)
{
        struct wp_h1_parser *p = NULL;
        struct wp_h1_limits lim = {.max_start_line = 8};

        CHECK(wp_h1_parser_new(WP_H1_REQUEST, &lim, &p) == -EINVAL);
        lim = (struct wp_h1_limits){.max_headers = 100000};
        CHECK(wp_h1_parser_new(WP_H1_REQUEST, &lim, &p) == -EINVAL);
        CHECK(wp_h1_parser_new((enum wp_h1_mode)7, NULL, &p) == -EINVAL);
        CHECK(p == NULL);
        CHECK(wp_h1_parser_free(NULL) == NULL);
}

/* ---- responses ---- */

static void resp_ok(const char *method, bool eof, const char *in, const char *want)
{
        struct run_opts o = {.mode = WP_H1_RESPONSE, .method = method, .eof = eof};
        expect_ok(&o, in, want);
}

static void resp_err(const char *in, enum wp_h1_error e)
{
        struct run_opts o = {.mode = WP_H1_RESPONSE};
        expect_err(&o, in, strlen(in), e);
}

static void test_response_framings(void)
{
        resp_ok(NULL, false, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi",
                "HEAD 200 'OK' v=1 cl=2 ch=0 ka=1 body=1 eof=0 [content-length=2]\nBODY hi\n"
                "DONE at $\n");
        resp_ok(NULL, false,
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n"
                "grpc-status: 0\r\n\r\n",
                "HEAD 200 'OK' v=1 cl=-1 ch=1 ka=1 body=1 eof=0 [transfer-encoding=chunked]\n"
                "BODY hi\nTRAILERS [grpc-status=0]\nDONE at $\n");
        /* read until close */
        resp_ok(NULL, true, "HTTP/1.0 200 OK\r\n\r\nall of it",
                "HEAD 200 'OK' v=0 cl=-1 ch=0 ka=0 body=1 eof=1\nBODY all of it\nEOF 4\n");
        resp_ok(NULL, true, "HTTP/1.1 200 OK\r\nConnection: keep-alive\r\n\r\nuntil close",
                "HEAD 200 'OK' v=1 cl=-1 ch=0 ka=0 body=1 eof=1 [connection=keep-alive]\n"
                "BODY until close\nEOF 4\n");
        /* no reason phrase, with and without the SP */
        resp_ok(NULL, false, "HTTP/1.1 404 \r\nContent-Length: 0\r\n\r\n",
                "HEAD 404 '' v=1 cl=0 ch=0 ka=1 body=0 eof=0 [content-length=0]\nDONE at $\n");
        resp_ok(NULL, false, "HTTP/1.1 404\r\nContent-Length: 0\r\n\r\n",
                "HEAD 404 '' v=1 cl=0 ch=0 ka=1 body=0 eof=0 [content-length=0]\nDONE at $\n");
        /* HTTP/1.0 keep-alive */
        resp_ok(NULL, false,
                "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
                "HEAD 200 'OK' v=0 cl=0 ch=0 ka=1 body=0 eof=0 [connection=keep-alive] "
                "[content-length=0]\nDONE at $\n");
}

static void test_response_no_body_for_head_204_304(void)
{
        /* bytes after the head belong to the next response */
        resp_ok("HEAD", false, "HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\nHTTP/1.1 200 OK\r\n",
                "HEAD 200 'OK' v=1 cl=1234 ch=0 ka=1 body=0 eof=0 [content-length=1234]\n"
                "DONE at 41\n");
        resp_ok(NULL, false,
                "HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n\r\n"
                "HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n"
                "HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nz",
                "HEAD 204 'No Content' v=1 cl=10 ch=0 ka=1 body=0 eof=0 [content-length=10]\n"
                "DONE at 47\n"
                "HEAD 304 'Not Modified' v=1 cl=-1 ch=1 ka=1 body=0 eof=0 "
                "[transfer-encoding=chunked]\nDONE at 104\n"
                "HEAD 200 'OK' v=1 cl=1 ch=0 ka=1 body=1 eof=0 [content-length=1]\nBODY z\n"
                "DONE at $\n");
        /* the HEAD method applies until the final response, then GET is assumed */
        resp_ok("HEAD", false,
                "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
                "HEAD 100 'Continue' v=1 cl=-1 ch=0 ka=1 body=0 eof=0\nDONE at 25\n"
                "HEAD 200 'OK' v=1 cl=5 ch=0 ka=1 body=0 eof=0 [content-length=5]\nDONE at 63\n"
                "HEAD 200 'OK' v=1 cl=5 ch=0 ka=1 body=1 eof=0 [content-length=5]\nBODY hello\n"
                "DONE at $\n");
}

static void test_response_interim_and_101_upgrade(void)
{
        resp_ok(NULL, false,
                "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                "HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n",
                "HEAD 100 'Continue' v=1 cl=-1 ch=0 ka=1 body=0 eof=0\nDONE at 25\n"
                "HEAD 103 'Early Hints' v=1 cl=-1 ch=0 ka=1 body=0 eof=0 [link=</a>]\n"
                "DONE at 65\n"
                "HEAD 201 'Created' v=1 cl=0 ch=0 ka=1 body=0 eof=0 [content-length=0]\n"
                "DONE at $\n");
        resp_ok(NULL, false,
                "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                "\r\n\x81\x02hi",
                "HEAD 101 'Switching Protocols' v=1 cl=-1 ch=0 ka=1 body=0 eof=0 "
                "[connection=Upgrade] [upgrade=websocket]\nDONE at 77\nUPGRADE rest=4\n");
        resp_ok("CONNECT", false, "HTTP/1.1 200 Connection Established\r\n\r\ntunnel bytes",
                "HEAD 200 'Connection Established' v=1 cl=-1 ch=0 ka=1 body=0 eof=0\n"
                "DONE at 39\nUPGRADE rest=12\n");
        /* a refused CONNECT has a normal body */
        resp_ok("CONNECT", false, "HTTP/1.1 407 Nope\r\nContent-Length: 2\r\n\r\nno",
                "HEAD 407 'Nope' v=1 cl=2 ch=0 ka=1 body=1 eof=0 [content-length=2]\nBODY no\n"
                "DONE at $\n");

        struct wp_h1_parser *p;
        struct wp_h1_event ev;
        const char *in = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\nxyz";

        REQUIRE(wp_h1_parser_new(WP_H1_RESPONSE, NULL, &p) == 0);
        CHECK(wp_h1_parser_request(p) == NULL);
        CHECK(wp_h1_parser_feed(p, (const uint8_t *)in, strlen(in), &ev) == 50);
        CHECK(wp_h1_parser_feed(p, (const uint8_t *)in + 50, 3, &ev) == 0 &&
              ev.type == WP_H1_EV_DONE);
        CHECK(wp_h1_parser_feed(p, (const uint8_t *)in + 50, 3, &ev) == 0 &&
              ev.type == WP_H1_EV_UPGRADE);
        CHECK(wp_h1_parser_resume(p) == -EINVAL);
        CHECK(wp_h1_parser_eof(p, &ev) == 0 && ev.type == WP_H1_EV_UPGRADE);
        wp_h1_parser_free(p);

        /* an endless stream of 1xx is cut off */
        struct str s = {0};
        for (int i = 0; i < 9; i++)
                sput(&s, "HTTP/1.1 100 Continue\r\n\r\n", 25);
        resp_err(s.s, WP_H1_E_TOO_MANY_INTERIM);
        free(s.s);
}

static void test_response_rejects_smuggling_and_syntax(void)
{
        resp_err("HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
                 WP_H1_E_CL_AND_TE);
        resp_err("HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                 WP_H1_E_MULTIPLE_CONTENT_LENGTH);
        resp_err("HTTP/1.1 200 OK\r\nContent-Length: 1x\r\n\r\n", WP_H1_E_BAD_CONTENT_LENGTH);
        resp_err("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
                 WP_H1_E_TE_CHUNKED_NOT_LAST);
        resp_err("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", WP_H1_E_TE_UNSUPPORTED);
        resp_err("HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", WP_H1_E_TE_HTTP10);
        resp_err("HTTP/1.1 200 OK\nContent-Length: 0\r\n\r\n", WP_H1_E_BARE_LF);
        resp_err("HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n", WP_H1_E_OBS_FOLD);
        resp_err("HTTP/1.1 200 OK\r\nX : a\r\n\r\n", WP_H1_E_WS_BEFORE_COLON);
        resp_err("HTTP/1.1 200 OK\r\nX: a\x01\r\n\r\n", WP_H1_E_BAD_HEADER_VALUE);
        resp_err("HTTP/1.1 2000 OK\r\n\r\n", WP_H1_E_BAD_STATUS);
        resp_err("HTTP/1.1 20 OK\r\n\r\n", WP_H1_E_BAD_STATUS);
        resp_err("HTTP/1.1 099 OK\r\n\r\n", WP_H1_E_BAD_STATUS);
        resp_err("HTTP/1.1 600 OK\r\n\r\n", WP_H1_E_BAD_STATUS);
        resp_err("HTTP/1.1 2x0 OK\r\n\r\n", WP_H1_E_BAD_STATUS);
        resp_err("HTTP/1.1  200 OK\r\n\r\n", WP_H1_E_BAD_STATUS);
        resp_err("HTTP/1.1 200 O\x01K\r\n\r\n", WP_H1_E_BAD_REASON);
        resp_err("HTTP/2 200 OK\r\n\r\n", WP_H1_E_BAD_VERSION);
        resp_err("HTTP/3.0 200 OK\r\n\r\n", WP_H1_E_VERSION_UNSUPPORTED);
        resp_err("HTTP/1.1\r\n\r\n", WP_H1_E_BAD_STATUS);
        resp_err("ICY 200 OK\r\n\r\n", WP_H1_E_BAD_VERSION);
        resp_err("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                 WP_H1_E_BAD_CHUNK_SIZE);
        struct run_opts o = {.mode = WP_H1_RESPONSE, .eof = true};
        expect_err(&o, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab", 40, WP_H1_E_TRUNCATED);
        expect_err(&o, "HTTP/1.1 100 Continue\r\n\r\n", 25, WP_H1_E_TRUNCATED);
        expect_err(&o, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", 52,
                   WP_H1_E_TRUNCATED);
        struct wp_h1_parser *p;
        REQUIRE(wp_h1_parser_new(WP_H1_RESPONSE, NULL, &p) == 0);
        CHECK(wp_h1_parser_set_request_method(p, NULL) == -EINVAL);
        wp_h1_parser_free(p);
        REQUIRE(wp_h1_parser_new(WP_H1_REQUEST, NULL, &p) == 0);
        CHECK(wp_h1_parser_set_request_method(p, "GET") == -EINVAL);
        CHECK(wp_h1_parser_response(p) == NULL);
        wp_h1_parser_free(p);
}

/* ---- serializers ---- */

static void hdr(struct wp_headers *h, const char *n, const char *v)
{
        REQUIRE(wp_headers_add(h, n, (uint32_t)strlen(n), v, (uint32_t)strlen(v)) == 0);
}

static bool headers_equal(const struct wp_headers *a, const struct wp_headers *b)
{
        if (a->n != b->n)
                return false;
        for (uint32_t i = 0; i < a->n; i++)
                if (strcmp(a->v[i].name, b->v[i].name) != 0 ||
                    strcmp(a->v[i].value, b->v[i].value) != 0)
                        return false;
        return true;
}

static void test_serializer_request_round_trip(void)
{
        struct wp_http_request q = {.method = "POST",
                                    .path = "/a?b=c",
                                    .authority = "svc:8080",
                                    .version = WP_HTTP_11,
                                    .content_length = -1,
                                    .chunked = true};
        struct wp_headers trl;
        uint8_t mem[1024];
        struct wp_buf out;
        struct wp_h1_parser *p;
        struct wp_h1_event ev;
        struct str body = {0};
        size_t off = 0;

        wp_headers_init(&q.headers);
        wp_headers_init(&trl);
        hdr(&q.headers, "host", "ignored-dup");
        hdr(&q.headers, "content-length", "99");
        hdr(&q.headers, "x-a", "1");
        hdr(&q.headers, "user-agent", "t/1 (x)");
        hdr(&trl, "x-checksum", "abc");
        wp_buf_wrap(&out, mem, sizeof(mem));
        CHECK(wp_h1_write_request_head(&out, &q) > 0);
        CHECK(wp_h1_write_chunk(&out, "hello ", 6) == 11);
        CHECK(wp_h1_write_chunk_prefix(&out, 17) == 4);
        wp_buf_append(&out, "world, this is 17", 17);
        CHECK(wp_h1_write_chunk_suffix(&out) == 2);
        CHECK(wp_h1_write_last_chunk(&out, &trl) > 0);
        CHECK(strncmp((char *)out.pos,
                      "POST /a?b=c HTTP/1.1\r\nhost: svc:8080\r\nx-a: 1\r\nuser-agent: t/1 (x)\r\n"
                      "transfer-encoding: chunked\r\n\r\n6\r\nhello \r\n11\r\n",
                      wp_buf_len(&out) < 110 ? wp_buf_len(&out) : 110) == 0);

        REQUIRE(wp_h1_parser_new(WP_H1_REQUEST, NULL, &p) == 0);
        for (;;) {
                ssize_t n = wp_h1_parser_feed(p, out.pos + off, wp_buf_len(&out) - off, &ev);
                REQUIRE(n >= 0);
                off += (size_t)n;
                if (ev.type == WP_H1_EV_HEAD) {
                        struct wp_http_request *r = wp_h1_parser_request(p);
                        CHECK_STR_EQ(r->method, "POST");
                        CHECK_STR_EQ(r->path, "/a?b=c");
                        CHECK_STR_EQ(r->authority, "svc:8080");
                        CHECK(r->chunked && r->content_length == -1);
                        CHECK_INT_EQ(r->headers.n, 4); /* host, x-a, user-agent, te */
                        CHECK_STR_EQ(wp_headers_get(&r->headers, "user-agent", NULL), "t/1 (x)");
                } else if (ev.type == WP_H1_EV_BODY) {
                        sput(&body, (const char *)ev.data, ev.len);
                } else if (ev.type == WP_H1_EV_TRAILERS) {
                        CHECK(headers_equal(wp_h1_parser_trailers(p), &trl));
                } else if (ev.type == WP_H1_EV_DONE || ev.type == WP_H1_EV_NONE) {
                        CHECK(ev.type == WP_H1_EV_DONE);
                        break;
                }
        }
        CHECK(off == wp_buf_len(&out));
        CHECK_STR_EQ(body.s, "hello world, this is 17");
        free(body.s);
        wp_h1_parser_free(p);

        /* GET with no body: no framing field, upgrade adds connection */
        struct wp_http_request g = {.method = "GET",
                                    .path = "/ws",
                                    .authority = "h",
                                    .version = WP_HTTP_11,
                                    .content_length = -1,
                                    .upgrade = true};
        wp_headers_init(&g.headers);
        hdr(&g.headers, "upgrade", "websocket");
        wp_buf_wrap(&out, mem, sizeof(mem));
        CHECK(wp_h1_write_request_head(&out, &g) > 0);
        CHECK(wp_buf_len(&out) == strlen("GET /ws HTTP/1.1\r\nhost: h\r\nupgrade: websocket\r\n"
                                         "connection: upgrade\r\n\r\n"));
        CHECK(memcmp(out.pos,
                     "GET /ws HTTP/1.1\r\nhost: h\r\nupgrade: websocket\r\nconnection: "
                     "upgrade\r\n\r\n",
                     wp_buf_len(&out)) == 0);
        REQUIRE(wp_h1_parser_new(WP_H1_REQUEST, NULL, &p) == 0);
        CHECK(wp_h1_parser_feed(p, out.pos, wp_buf_len(&out), &ev) == (ssize_t)wp_buf_len(&out));
        CHECK(ev.type == WP_H1_EV_HEAD && wp_h1_parser_request(p)->upgrade);
        wp_h1_parser_free(p);

        /* CONNECT uses the authority as target; content-length 0 is written */
        struct wp_http_request c = {
            .method = "CONNECT", .authority = "h:443", .version = WP_HTTP_11, .content_length = 0};
        wp_headers_init(&c.headers);
        wp_buf_wrap(&out, mem, sizeof(mem));
        CHECK(wp_h1_write_request_head(&out, &c) > 0);
        CHECK(memcmp(out.pos, "CONNECT h:443 HTTP/1.1\r\nhost: h:443\r\ncontent-length: 0\r\n\r\n",
                     wp_buf_len(&out)) == 0);

        wp_headers_done(&q.headers);
        wp_headers_done(&trl);
        wp_headers_done(&g.headers);
}

static void test_serializer_response_round_trip(void)
{
        struct wp_http_response r = {.status = 200, .version = WP_HTTP_11, .content_length = 5};
        uint8_t mem[512];
        struct wp_buf out;
        struct wp_h1_parser *p;
        struct wp_h1_event ev;
        ssize_t n;

        wp_headers_init(&r.headers);
        hdr(&r.headers, "content-type", "text/plain");
        hdr(&r.headers, "transfer-encoding", "chunked"); /* ignored: framing from the struct */
        hdr(&r.headers, "set-cookie", "a=1");
        hdr(&r.headers, "set-cookie", "b=2");
        wp_buf_wrap(&out, mem, sizeof(mem));
        CHECK(wp_h1_write_response_head(&out, &r) > 0);
        wp_buf_append(&out, "hello", 5);
        REQUIRE(wp_h1_parser_new(WP_H1_RESPONSE, NULL, &p) == 0);
        n = wp_h1_parser_feed(p, out.pos, wp_buf_len(&out), &ev);
        REQUIRE(n > 0 && ev.type == WP_H1_EV_HEAD);
        struct wp_http_response *got = wp_h1_parser_response(p);
        CHECK_INT_EQ(got->status, 200);
        CHECK_STR_EQ(wp_h1_parser_info(p)->reason, "OK");
        CHECK_INT_EQ(got->content_length, 5);
        CHECK(!got->chunked);
        CHECK_INT_EQ(got->headers.n, 4);
        CHECK_STR_EQ(got->headers.v[1].value, "a=1");
        CHECK_STR_EQ(got->headers.v[2].value, "b=2");
        CHECK_STR_EQ(got->headers.v[3].name, "content-length");
        n = wp_h1_parser_feed(p, out.pos + n, wp_buf_len(&out) - (size_t)n, &ev);
        CHECK(n == 5 && ev.type == WP_H1_EV_BODY && memcmp(ev.data, "hello", 5) == 0);
        wp_h1_parser_free(p);

        /* 204 and 1xx get no framing; unknown status gets an empty reason */
        struct wp_http_response e = {.status = 204, .content_length = 7};
        wp_headers_init(&e.headers);
        wp_buf_wrap(&out, mem, sizeof(mem));
        CHECK(wp_h1_write_response_head(&out, &e) == 27);
        CHECK(memcmp(out.pos, "HTTP/1.1 204 No Content\r\n\r\n", 27) == 0);
        e.status = 101;
        wp_buf_wrap(&out, mem, sizeof(mem));
        CHECK(wp_h1_write_response_head(&out, &e) > 0);
        CHECK(memcmp(out.pos, "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\n\r\n",
                     wp_buf_len(&out)) == 0);
        e.status = 299;
        e.content_length = -1;
        wp_buf_wrap(&out, mem, sizeof(mem));
        CHECK(wp_h1_write_response_head(&out, &e) > 0);
        CHECK(memcmp(out.pos, "HTTP/1.1 299 \r\n\r\n", wp_buf_len(&out)) == 0);
        e.status = 99;
        CHECK(wp_h1_write_response_head(&out, &e) == -EINVAL);
        wp_headers_done(&r.headers);
}

static void test_serializer_rejects_injection_and_overflow(void)
{
        struct wp_http_request q = {.method = "GET",
                                    .path = "/",
                                    .authority = "h",
                                    .version = WP_HTTP_11,
                                    .content_length = -1};
        uint8_t mem[64];
        struct wp_buf out;

        wp_headers_init(&q.headers);
        wp_buf_wrap(&out, mem, sizeof(mem));
        hdr(&q.headers, "x", "a\r\nx-injected: 1");
        CHECK(wp_h1_write_request_head(&out, &q) == -EINVAL);
        CHECK(wp_buf_len(&out) == 0);
        wp_headers_remove(&q.headers, "x");
        hdr(&q.headers, "bad name", "v");
        CHECK(wp_h1_write_request_head(&out, &q) == -EINVAL);
        wp_headers_remove(&q.headers, "bad name");
        q.path = "/a b";
        CHECK(wp_h1_write_request_head(&out, &q) == -EINVAL);
        q.path = "/\r\n";
        CHECK(wp_h1_write_request_head(&out, &q) == -EINVAL);
        q.path = "/";
        q.method = "G T";
        CHECK(wp_h1_write_request_head(&out, &q) == -EINVAL);
        q.method = "GET";
        q.authority = "h\r\nx: y";
        CHECK(wp_h1_write_request_head(&out, &q) == -EINVAL);
        q.authority = "h";
        hdr(&q.headers, "x-long", "0123456789012345678901234567890123456789");
        CHECK(wp_h1_write_request_head(&out, &q) == -ENOBUFS);
        CHECK(wp_buf_len(&out) == 0);
        wp_headers_remove(&q.headers, "x-long");
        CHECK(wp_h1_write_request_head(&out, &q) == 27);
        CHECK(wp_h1_write_chunk(&out, "x", 0) == -EINVAL);
        CHECK(wp_h1_write_chunk_prefix(&out, 0) == -EINVAL);
        wp_buf_wrap(&out, mem, 4);
        CHECK(wp_h1_write_chunk(&out, "xy", 2) == -ENOBUFS);
        CHECK(wp_h1_write_last_chunk(&out, NULL) == -ENOBUFS);
        wp_buf_wrap(&out, mem, 5);
        CHECK(wp_h1_write_last_chunk(&out, NULL) == 5);
        wp_headers_done(&q.headers);
}

/* ---- hop-by-hop ---- */

static void test_hop_by_hop_removal(void)
{
        struct wp_headers h;

        wp_headers_init(&h);
        hdr(&h, "host", "h");
        hdr(&h, "connection", "Keep-Alive, X-Secret, host");
        hdr(&h, "keep-alive", "timeout=5");
        hdr(&h, "x-secret", "1");
        hdr(&h, "te", "trailers");
        hdr(&h, "proxy-connection", "keep-alive");
        hdr(&h, "transfer-encoding", "chunked");
        hdr(&h, "upgrade", "websocket");
        hdr(&h, "x-keep", "yes");
        hdr(&h, "connection", "x-other, content-length");
        hdr(&h, "x-other", "2");
        hdr(&h, "content-length", "3");
        size_t bytes_keep = 1 + 4 + 6 + 3 + 14 + 1;
        CHECK_INT_EQ(wp_h1_remove_hop_by_hop(&h, false), 9);
        CHECK_INT_EQ(h.n, 3);
        CHECK_STR_EQ(h.v[0].name, "host");
        CHECK_STR_EQ(h.v[1].name, "x-keep");
        CHECK_STR_EQ(h.v[2].name, "content-length");
        CHECK_INT_EQ(h.bytes, bytes_keep);
        wp_headers_done(&h);

        wp_headers_init(&h);
        hdr(&h, "upgrade", "websocket");
        hdr(&h, "connection", "upgrade");
        hdr(&h, "x", "1");
        CHECK_INT_EQ(wp_h1_remove_hop_by_hop(&h, true), 1);
        CHECK_INT_EQ(h.n, 2);
        CHECK_STR_EQ(h.v[0].name, "upgrade");
        CHECK_INT_EQ(wp_h1_remove_hop_by_hop(&h, false), 1);
        CHECK_INT_EQ(h.n, 1);
        wp_headers_done(&h);
        wp_headers_init(&h);
        CHECK_INT_EQ(wp_h1_remove_hop_by_hop(&h, false), 0);
}

/* ---- errors table ---- */

static void test_every_error_has_status_and_reason(void)
{
        for (int e = 1; e < _WP_H1_E_MAX; e++) {
                unsigned s = wp_h1_error_status((enum wp_h1_error)e);
                CHECK(s == 400 || s == 413 || s == 414 || s == 431 || s == 501 || s == 505);
                CHECK(wp_h1_error_str((enum wp_h1_error)e) &&
                      strlen(wp_h1_error_str((enum wp_h1_error)e)) > 3);
        }
        CHECK(wp_h1_error_status(WP_H1_E_TE_UNSUPPORTED) == 501);
        CHECK(wp_h1_error_status(WP_H1_E_VERSION_UNSUPPORTED) == 505);
        CHECK(wp_h1_error_status((enum wp_h1_error)999) == 400);
}

/* ---- mutations: whatever the bytes, every split agrees and nothing crashes ---- */

static void test_mutated_messages_parse_the_same_at_every_split(void)
{
        static const char *const corpus[] = {
            "POST /a?b HTTP/1.1\r\nHost: h:1\r\nContent-Length: 4\r\nX: y\r\n\r\nbody"
            "GET / HTTP/1.1\r\nHost: h\r\n\r\n",
            "PUT http://h/x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            "4;e=1\r\nabcd\r\n0\r\nT: 1\r\n\r\n",
            "GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            "\r\nxx",
        };
        static const char *const rcorpus[] = {
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
            "\r\n3\r\nabc\r\n0\r\n\r\n",
            "HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nabcHTTP/1.1 204 x\r\n\r\n",
        };
        static const char noise[] = {'\r', '\n', '\0',   ' ',    '\t',   ':', ',', '0',
                                     'f',  ';',  '\x7f', '\x80', '\xff', 'A', '"', '/'};
        unsigned seed = 12345;
        int rejected = 0, total = 0;

        for (int round = 0; round < 300; round++) {
                bool resp = round % 3 == 2;
                const char *src = resp ? rcorpus[round % 2] : corpus[round % 3];
                size_t len = strlen(src);
                char buf[512];
                enum wp_h1_error e;
                struct run_opts o = {.mode = resp ? WP_H1_RESPONSE : WP_H1_REQUEST,
                                     .eof = round % 2 == 0};

                memcpy(buf, src, len);
                for (int m = 0; m < 1 + round % 3; m++) {
                        seed = seed * 1103515245u + 12345u;
                        size_t at = (seed >> 8) % len;
                        seed = seed * 1103515245u + 12345u;
                        buf[at] = noise[(seed >> 8) % sizeof(noise)];
                }
                char *t = run(&o, buf, len, &e);
                total++;
                rejected += e != WP_H1_OK;
                free(t);
        }
        /* most mutations break something; some land in bodies or values and pass */
        CHECK(rejected > total / 3 && rejected < total);
}

/* ---- failalloc ---- */

static int fa_parse(void *arg)
{
        struct wp_h1_parser *p;
        struct wp_h1_event ev;
        struct str in = {0};
        size_t off = 0;
        int r;
        bool bytewise = arg != NULL;

        r = wp_h1_parser_new(WP_H1_REQUEST, NULL, &p);
        if (r < 0)
                return r;
        /* enough fields to grow the header list, enough bytes to grow the buffer */
        sput(&in, "POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n", 55);
        for (int i = 0; i < 40; i++) {
                char line[128];
                int n = snprintf(line, sizeof(line), "X-Field-%02d: %064d\r\n", i, i);
                sput(&in, line, (size_t)n);
        }
        sput(&in, "\r\n3\r\nabc\r\n0\r\n", 13);
        for (int i = 0; i < 20; i++)
                sput(&in, "X-Trailer: 0123456789012345678901234567890123456789012345678\r\n", 62);
        sput(&in, "\r\n", 2);
        r = 0;
        for (;;) {
                size_t avail = bytewise ? (off < in.len ? 1 : 0) : in.len - off;
                ssize_t n = wp_h1_parser_feed(p, (const uint8_t *)in.s + off, avail, &ev);
                if (n < 0) {
                        r = (int)n;
                        break;
                }
                off += (size_t)n;
                if (ev.type == WP_H1_EV_DONE)
                        break;
                if (ev.type == WP_H1_EV_NONE && off == in.len) {
                        r = -EIO; /* never reached DONE */
                        break;
                }
        }
        if (r == 0 &&
            (wp_h1_parser_request(p)->headers.n != 42 || wp_h1_parser_trailers(p)->n != 20))
                r = -EIO;
        free(in.s);
        wp_h1_parser_free(p);
        return r;
}

static void test_failalloc_constructor_and_parse(void)
{
        /* parser, head buffer growth (3), header list growth (3), trailer buffer and list */
        CHECK(check_failalloc_run(fa_parse, NULL) >= 8);
        CHECK(check_failalloc_run(fa_parse, (void *)1) >= 8);
}

int main(void)
{
        RUN(test_request_simple_get);
        RUN(test_request_names_lowercased_values_trimmed);
        RUN(test_request_content_length_body);
        RUN(test_request_chunked_body_with_extensions_and_trailers);
        RUN(test_request_chunked_without_trailers);
        RUN(test_request_http10_keepalive_only_with_connection_keepalive);
        RUN(test_request_expect_100_continue_flagged);
        RUN(test_request_leading_empty_lines_ignored);
        RUN(test_request_absolute_form_records_authority_and_flags_mismatch);
        RUN(test_request_utf8_values);
        RUN(test_request_value_bytes_checked_at_every_position);
        RUN(test_request_rejects_framing_conflicts);
        RUN(test_request_accepts_identical_duplicate_content_length);
        RUN(test_request_rejects_line_terminator_abuse);
        RUN(test_request_rejects_bad_names_and_values);
        RUN(test_request_rejects_bad_request_lines);
        RUN(test_request_host_rules);
        RUN(test_request_rejects_bad_chunks);
        RUN(test_request_connect);
        RUN(test_request_websocket_upgrade_waits_for_decision);
        RUN(test_request_pipelined_parser_stops_at_boundary);
        RUN(test_request_errors_are_sticky_and_eof_truncation);
        RUN(test_limits_request_line_exact_and_plus_one);
        RUN(test_limits_header_bytes_and_count);
        RUN(test_limits_trailers);
        RUN(test_limits_chunk_extension);
        RUN(test_limits_body);
        RUN(test_limits_constructor_validation);
        RUN(test_response_framings);
        RUN(test_response_no_body_for_head_204_304);
        RUN(test_response_interim_and_101_upgrade);
        RUN(test_response_rejects_smuggling_and_syntax);
        RUN(test_serializer_request_round_trip);
        RUN(test_serializer_response_round_trip);
        RUN(test_serializer_rejects_injection_and_overflow);
        RUN(test_hop_by_hop_removal);
        RUN(test_every_error_has_status_and_reason);
        RUN(test_mutated_messages_parse_the_same_at_every_split);
        RUN(test_failalloc_constructor_and_parse);
        return check_exit();
}
