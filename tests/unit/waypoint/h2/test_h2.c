/*
 * waypoint/h2.c: the inner HTTP/2 codec, server side, against an nghttp2 client session as the
 * peer (and hand-made frames where a conforming client cannot misbehave). Every exchange is run
 * with the client's bytes fed whole and one byte at a time.
 */
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <nghttp2/nghttp2.h>

#include "check.h"
#include "waypoint/h2.h"

/* ---- the codec's user ---- */

struct req_rec {
        int32_t id;
        char method[16], path[64], authority[64], hdrs[512], trailers[256];
        int64_t content_length;
        bool end_at_head, ended;
        size_t body;
        uint32_t close_error;
        bool closed;
};

struct srv {
        struct wp_h2 *h;
        struct req_rec reqs[16];
        int nreqs;
        bool consume; /* give credit back at once */
        bool refuse;  /* on_request fails */
};

static void dump(char *out, size_t cap, const struct wp_headers *hs)
{
        size_t n = 0;

        out[0] = 0;
        for (uint32_t i = 0; hs && i < hs->n && n < cap; i++) {
                CHECK(strlen(hs->v[i].name) == hs->v[i].name_len);
                n += (size_t)snprintf(out + n, cap - n, "[%s=%s]", hs->v[i].name, hs->v[i].value);
        }
}

static int s_on_request(struct wp_h2 *h, int32_t id, struct wp_http_request *req, bool end,
                        void *user)
{
        struct srv *s = user;
        struct req_rec *r;

        if (s->refuse || s->nreqs == 16)
                return -ENOMEM;
        r = &s->reqs[s->nreqs++];
        memset(r, 0, sizeof(*r));
        r->id = id;
        snprintf(r->method, sizeof(r->method), "%s", req->method);
        snprintf(r->path, sizeof(r->path), "%s", req->path ? req->path : "-");
        snprintf(r->authority, sizeof(r->authority), "%s", req->authority);
        dump(r->hdrs, sizeof(r->hdrs), &req->headers);
        r->content_length = req->content_length;
        r->end_at_head = end;
        CHECK(req->version == WP_HTTP_2);
        wp_h2_set_user(h, id, r);
        return 0;
}

static struct srv *srv_of(struct wp_h2 *h);

static int s_on_data(struct wp_h2 *h, void *su, const uint8_t *d, size_t n)
{
        struct req_rec *r = su;

        (void)d;
        r->body += n;
        if (srv_of(h)->consume)
                wp_h2_consume(h, r->id, n);
        return 0;
}

static void s_on_end(struct wp_h2 *h, void *su, struct wp_headers *trailers)
{
        struct req_rec *r = su;

        (void)h;
        r->ended = true;
        dump(r->trailers, sizeof(r->trailers), trailers);
}

static void s_on_close(struct wp_h2 *h, void *su, uint32_t error)
{
        struct req_rec *r = su;

        (void)h;
        r->closed = true;
        r->close_error = error;
}

static const struct wp_h2_callbacks scb = {
        .on_request = s_on_request,
        .on_data = s_on_data,
        .on_end = s_on_end,
        .on_close = s_on_close,
};

static struct srv *g_srv;

static struct srv *srv_of(struct wp_h2 *h)
{
        (void)h;
        return g_srv;
}

/* ---- the peer: an nghttp2 client ---- */

struct cli {
        nghttp2_session *ng;
        int status[64];
        char hdrs[64][256];
        size_t body[64];
        char trailer[64][128];
        uint32_t rst[64];
        bool closed[64];
        bool goaway;
        uint32_t goaway_code;
        const uint8_t *send_body;
        size_t send_len, send_off;
};

static int c_on_header(nghttp2_session *ng, const nghttp2_frame *f, const uint8_t *name, size_t nl,
                       const uint8_t *value, size_t vl, uint8_t flags, void *ud)
{
        struct cli *c = ud;
        int i = f->hd.stream_id / 2;

        (void)ng;
        (void)flags;
        if (i >= 64)
                return 0;
        if (nl == 7 && !memcmp(name, ":status", 7)) {
                c->status[i] = atoi((const char *)value);
                return 0;
        }
        if (f->headers.cat == NGHTTP2_HCAT_HEADERS && c->status[i])
                snprintf(c->trailer[i] + strlen(c->trailer[i]),
                         sizeof(c->trailer[i]) - strlen(c->trailer[i]), "[%.*s=%.*s]", (int)nl,
                         name, (int)vl, value);
        else
                snprintf(c->hdrs[i] + strlen(c->hdrs[i]), sizeof(c->hdrs[i]) - strlen(c->hdrs[i]),
                         "[%.*s=%.*s]", (int)nl, name, (int)vl, value);
        return 0;
}

static int c_on_data(nghttp2_session *ng, uint8_t flags, int32_t id, const uint8_t *d, size_t n,
                     void *ud)
{
        struct cli *c = ud;

        (void)ng;
        (void)flags;
        (void)d;
        if (id / 2 < 64)
                c->body[id / 2] += n;
        return 0;
}

static int c_on_frame(nghttp2_session *ng, const nghttp2_frame *f, void *ud)
{
        struct cli *c = ud;

        (void)ng;
        if (f->hd.type == NGHTTP2_RST_STREAM && f->hd.stream_id / 2 < 64)
                c->rst[f->hd.stream_id / 2] =
                        f->rst_stream.error_code ? f->rst_stream.error_code : 0x100; /* NO_ERROR */
        if (f->hd.type == NGHTTP2_GOAWAY) {
                c->goaway = true;
                c->goaway_code = f->goaway.error_code;
        }
        return 0;
}

static int c_on_close(nghttp2_session *ng, int32_t id, uint32_t err, void *ud)
{
        struct cli *c = ud;

        (void)ng;
        (void)err;
        if (id / 2 < 64)
                c->closed[id / 2] = true;
        return 0;
}

static void cli_init(struct cli *c, const nghttp2_settings_entry *iv, size_t niv)
{
        nghttp2_session_callbacks *cbs;
        nghttp2_option *opt;

        memset(c, 0, sizeof(*c));
        nghttp2_session_callbacks_new(&cbs);
        nghttp2_session_callbacks_set_on_header_callback(cbs, c_on_header);
        nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, c_on_data);
        nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, c_on_frame);
        nghttp2_session_callbacks_set_on_stream_close_callback(cbs, c_on_close);
        nghttp2_option_new(&opt);
        nghttp2_option_set_no_http_messaging(opt, 1); /* we send malformed requests on purpose */
        nghttp2_session_client_new2(&c->ng, cbs, c, opt);
        nghttp2_option_del(opt);
        nghttp2_session_callbacks_del(cbs);
        nghttp2_submit_settings(c->ng, NGHTTP2_FLAG_NONE, iv, niv);
}

static ssize_t c_read_body(nghttp2_session *ng, int32_t id, uint8_t *buf, size_t len,
                           uint32_t *flags, nghttp2_data_source *src, void *ud)
{
        struct cli *c = ud;
        size_t n = c->send_len - c->send_off;

        (void)ng;
        (void)id;
        (void)src;
        if (n > len)
                n = len;
        memcpy(buf, c->send_body + c->send_off, n);
        c->send_off += n;
        if (c->send_off == c->send_len)
                *flags |= NGHTTP2_DATA_FLAG_EOF;
        return (ssize_t)n;
}

/* names as given (nghttp2 lower-cases the names it copies) */
#define NVS(n, v)                                                                                  \
        {                                                                                          \
                (uint8_t *)(n), (uint8_t *)(v), sizeof(n) - 1, sizeof(v) - 1,                      \
                        NGHTTP2_NV_FLAG_NO_COPY_NAME | NGHTTP2_NV_FLAG_NO_COPY_VALUE               \
        }

static int32_t cli_request(struct cli *c, const nghttp2_nv *nv, size_t n, const void *body,
                           size_t blen)
{
        nghttp2_data_provider prd = {.read_callback = c_read_body};

        c->send_body = body;
        c->send_len = blen;
        c->send_off = 0;
        return nghttp2_submit_request(c->ng, NULL, nv, n, body ? &prd : NULL, NULL);
}

static bool byte_by_byte;

/* Moves bytes both ways until neither side has anything to say. Returns the last feed result. */
static int pump(struct cli *c, struct wp_h2 *h)
{
        int r = 0;

        for (int round = 0; round < 1000; round++) {
                const uint8_t *out;
                ssize_t n;
                bool moved = false;

                while ((n = nghttp2_session_mem_send(c->ng, &out)) > 0) {
                        moved = true;
                        if (byte_by_byte) {
                                for (ssize_t i = 0; i < n && r == 0; i++)
                                        r = wp_h2_feed(h, out + i, 1);
                        } else if (r == 0) {
                                r = wp_h2_feed(h, out, (size_t)n);
                        }
                }
                while ((n = wp_h2_pull(h, &out)) > 0) {
                        moved = true;
                        CHECK(nghttp2_session_mem_recv(c->ng, out, (size_t)n) == n);
                }
                if (!moved)
                        break;
        }
        return r;
}

static const nghttp2_nv get_nv[] = {NVS(":method", "GET"),       NVS(":scheme", "http"),
                                    NVS(":authority", "svc:80"), NVS(":path", "/a?b=c"),
                                    NVS("x-one", "1"),           NVS("host", "ignored")};

static void setup(struct srv *s, struct cli *c, const struct wp_h2_limits *lim)
{
        memset(s, 0, sizeof(*s));
        g_srv = s;
        s->consume = true;
        REQUIRE(wp_h2_new(&scb, lim, true, s, &s->h) == 0);
        cli_init(c, NULL, 0);
}

static void teardown(struct srv *s, struct cli *c)
{
        wp_h2_free(s->h);
        nghttp2_session_del(c->ng);
}

/* ---- cases ---- */

static void test_get_with_body_and_trailers(void)
{
        struct srv s;
        struct cli c;
        struct wp_http_response resp = {.status = 200, .content_length = -1};
        struct wp_headers trl;
        int32_t id;

        setup(&s, &c, NULL);
        id = cli_request(&c, get_nv, 6, NULL, 0);
        CHECK(pump(&c, s.h) == 0);
        REQUIRE(s.nreqs == 1);
        CHECK_STR_EQ(s.reqs[0].method, "GET");
        CHECK_STR_EQ(s.reqs[0].path, "/a?b=c");
        CHECK_STR_EQ(s.reqs[0].authority, "svc:80");
        CHECK_STR_EQ(s.reqs[0].hdrs, "[x-one=1]"); /* host dropped: :authority wins */
        CHECK(s.reqs[0].end_at_head);
        CHECK_INT_EQ(s.reqs[0].content_length, -1);
        wp_headers_init(&resp.headers);
        wp_headers_add(&resp.headers, "x-resp", 6, "r", 1);
        wp_headers_add(&resp.headers, "connection", 10, "close", 5); /* dropped */
        wp_headers_add(&resp.headers, "transfer-encoding", 17, "chunked", 7);
        CHECK(wp_h2_respond(s.h, id, &resp, false) == 0);
        CHECK(wp_h2_send(s.h, id, "hello", 5) == 0);
        wp_headers_init(&trl);
        wp_headers_add(&trl, "grpc-status", 11, "0", 1);
        CHECK(wp_h2_end(s.h, id, &trl) == 0);
        wp_headers_done(&trl);
        wp_headers_done(&resp.headers);
        pump(&c, s.h);
        CHECK_INT_EQ(c.status[id / 2], 200);
        CHECK_STR_EQ(c.hdrs[id / 2], "[x-resp=r]");
        CHECK_INT_EQ(c.body[id / 2], 5);
        CHECK_STR_EQ(c.trailer[id / 2], "[grpc-status=0]");
        CHECK(c.closed[id / 2]);
        CHECK(s.reqs[0].closed && s.reqs[0].close_error == 0);
        CHECK_INT_EQ(c.rst[id / 2], 0);
        CHECK_INT_EQ(wp_h2_nstreams(s.h), 0);
        teardown(&s, &c);
}

static void test_post_body_credit_follows_consume(void)
{
        struct srv s;
        struct cli c;
        struct wp_h2_limits lim;
        static uint8_t body[200000];
        const nghttp2_nv nv[] = {NVS(":method", "POST"), NVS(":scheme", "http"),
                                 NVS(":authority", "svc"), NVS(":path", "/up"),
                                 NVS("content-length", "200000")};
        int32_t id;

        wp_h2_limits_default(&lim);
        lim.initial_stream_window = 65535;
        setup(&s, &c, &lim);
        s.consume = false;
        id = cli_request(&c, nv, 5, body, sizeof(body));
        pump(&c, s.h);
        REQUIRE(s.nreqs == 1);
        CHECK_INT_EQ(s.reqs[0].content_length, 200000);
        CHECK_STR_EQ(s.reqs[0].hdrs, "");    /* content-length is in the struct only */
        CHECK_INT_EQ(s.reqs[0].body, 65535); /* no credit came back */
        CHECK(!s.reqs[0].ended);
        for (int round = 0; round < 20 && !s.reqs[0].ended; round++) {
                size_t before = s.reqs[0].body;

                wp_h2_consume(s.h, id, before); /* clamped to what is unconsumed */
                pump(&c, s.h);
                CHECK(s.reqs[0].body > before);
                CHECK(s.reqs[0].body - before <= 65535); /* one window per round at most */
        }
        CHECK(s.reqs[0].ended);
        CHECK_INT_EQ(s.reqs[0].body, sizeof(body));
        teardown(&s, &c);
}

static void test_request_trailers(void)
{
        struct srv s;
        struct cli c;
        const nghttp2_nv nv[] = {NVS(":method", "POST"), NVS(":scheme", "http"),
                                 NVS(":authority", "svc"), NVS(":path", "/t"),
                                 NVS("te", "trailers")};
        const nghttp2_nv tnv[] = {NVS("x-sum", "42")};
        int32_t id;

        setup(&s, &c, NULL);
        id = nghttp2_submit_headers(c.ng, NGHTTP2_FLAG_NONE, -1, NULL, nv, 5, NULL);
        REQUIRE(id > 0);
        pump(&c, s.h);
        CHECK(!s.reqs[0].ended);
        nghttp2_submit_headers(c.ng, NGHTTP2_FLAG_END_STREAM, id, NULL, tnv, 1, NULL);
        pump(&c, s.h);
        REQUIRE(s.nreqs == 1);
        CHECK_STR_EQ(s.reqs[0].hdrs, "[te=trailers]");
        CHECK(s.reqs[0].ended);
        CHECK_STR_EQ(s.reqs[0].trailers, "[x-sum=42]");
        teardown(&s, &c);
}

/* Malformed requests: reset PROTOCOL_ERROR by nghttp2's checks, never shown to the user. */
static void test_malformed_requests(void)
{
        static const nghttp2_nv cases[][6] = {
                {NVS(":method", "GET"), NVS(":scheme", "http"), NVS(":authority", "a"),
                 NVS(":path", "/"), NVS("X-Upper", "v")},
                {NVS(":method", "GET"), NVS(":scheme", "http"), NVS(":authority", "a"),
                 NVS(":path", "/"), NVS("connection", "close")},
                {NVS(":method", "GET"), NVS(":scheme", "http"), NVS(":authority", "a"),
                 NVS(":path", "/"), NVS("transfer-encoding", "chunked")},
                {NVS(":method", "GET"), NVS(":scheme", "http"), NVS(":authority", "a"),
                 NVS(":path", "/"), NVS("te", "gzip")},
                {NVS(":method", "GET"), NVS(":scheme", "http"), NVS(":authority", "a"),
                 NVS(":path", "/"), NVS("upgrade", "websocket")},
                {NVS(":method", "GET"), NVS(":scheme", "http"), NVS(":authority", "a"),
                 NVS(":path", "/"), NVS(":path", "/x")},
                {NVS(":method", "GET"), NVS(":scheme", "http"), NVS(":authority", "a"),
                 NVS(":path", "/"), NVS(":bogus", "x")},
                {NVS(":method", "GET"), NVS("x-a", "b"), NVS(":scheme", "http"),
                 NVS(":authority", "a"), NVS(":path", "/")},
                {NVS(":method", "GET"), NVS(":scheme", "http"), NVS(":authority", "a"),
                 NVS(":path", "noslash"), NVS("x", "y")},
                {NVS(":method", "GET"), NVS(":scheme", "http"), NVS(":authority", "a"),
                 NVS(":path", "/"), NVS("x-bad", "a\nb")},
                {NVS(":scheme", "http"), NVS(":authority", "a"), NVS(":path", "/"), NVS("x", "y"),
                 NVS("y", "z")},
        };
        const size_t ncases = sizeof(cases) / sizeof(cases[0]);

        for (size_t k = 0; k < ncases; k++) {
                struct srv s;
                struct cli c;
                int32_t id;

                setup(&s, &c, NULL);
                id = cli_request(&c, cases[k], 5, NULL, 0);
                CHECK(pump(&c, s.h) == 0);
                if (s.nreqs || c.rst[id / 2] != NGHTTP2_PROTOCOL_ERROR)
                        fprintf(stderr, "case %zu: nreqs %d rst %u hdrs %s\n", k, s.nreqs,
                                c.rst[id / 2], s.nreqs ? s.reqs[0].hdrs : "");
                CHECK_INT_EQ(s.nreqs, 0);
                CHECK_INT_EQ(c.rst[id / 2], NGHTTP2_PROTOCOL_ERROR);
                CHECK(!c.goaway);
                /* the connection goes on */
                id = cli_request(&c, get_nv, 4, NULL, 0);
                pump(&c, s.h);
                CHECK_INT_EQ(s.nreqs, 1);
                teardown(&s, &c);
        }
}

static void test_content_length_mismatch(void)
{
        static uint8_t body[10];
        const nghttp2_nv nv[] = {NVS(":method", "POST"), NVS(":scheme", "http"),
                                 NVS(":authority", "svc"), NVS(":path", "/"),
                                 NVS("content-length", "5")};

        for (int more = 0; more < 2; more++) {
                struct srv s;
                struct cli c;
                int32_t id;

                setup(&s, &c, NULL);
                id = cli_request(&c, nv, 5, body, more ? 10 : 3);
                pump(&c, s.h);
                CHECK_INT_EQ(c.rst[id / 2], NGHTTP2_PROTOCOL_ERROR);
                if (s.nreqs) {
                        CHECK(s.reqs[0].closed);
                        CHECK(!s.reqs[0].ended);
                        CHECK_INT_EQ(s.reqs[0].close_error, NGHTTP2_PROTOCOL_ERROR);
                }
                teardown(&s, &c);
        }
}

static void test_oversized_header_block_gets_431(void)
{
        struct srv s;
        struct cli c;
        struct wp_h2_limits lim;
        static char big[3000];
        nghttp2_nv nv[5] = {NVS(":method", "GET"), NVS(":scheme", "http"), NVS(":authority", "svc"),
                            NVS(":path", "/")};
        int32_t id;

        memset(big, 'v', sizeof(big));
        nv[4] = (nghttp2_nv){(uint8_t *)"x-big", (uint8_t *)big, 5, sizeof(big), 0};
        wp_h2_limits_default(&lim);
        lim.max_header_list_size = 2048;
        setup(&s, &c, &lim);
        id = cli_request(&c, nv, 5, NULL, 0);
        pump(&c, s.h);
        CHECK_INT_EQ(s.nreqs, 0);
        CHECK_INT_EQ(c.status[id / 2], 431);
        CHECK(c.closed[id / 2]);
        id = cli_request(&c, nv, 4, NULL, 0);
        pump(&c, s.h);
        CHECK_INT_EQ(s.nreqs, 1);
        teardown(&s, &c);
}

static void test_too_many_streams_refused(void)
{
        struct srv s;
        struct cli c;
        struct wp_h2_limits lim;
        int32_t ids[3];

        wp_h2_limits_default(&lim);
        lim.max_concurrent_streams = 2;
        setup(&s, &c, &lim);
        /* three open requests (bodies never end) before the client saw the SETTINGS */
        for (int i = 0; i < 3; i++)
                ids[i] = nghttp2_submit_headers(c.ng, NGHTTP2_FLAG_NONE, -1, NULL, get_nv, 4, NULL);
        pump(&c, s.h);
        CHECK_INT_EQ(s.nreqs, 2);
        CHECK_INT_EQ(c.rst[ids[0] / 2], 0);
        CHECK_INT_EQ(c.rst[ids[1] / 2], 0);
        CHECK_INT_EQ(c.rst[ids[2] / 2], NGHTTP2_REFUSED_STREAM);
        CHECK(!c.goaway);
        teardown(&s, &c);
}

static void test_rst_flood_goaway(void)
{
        struct srv s;
        struct cli c;
        struct wp_h2_limits lim;
        int r = 0;

        wp_h2_limits_default(&lim);
        lim.rst_flood_max = 5;
        setup(&s, &c, &lim);
        for (int i = 0; i < 10; i++) {
                int32_t id =
                        nghttp2_submit_headers(c.ng, NGHTTP2_FLAG_NONE, -1, NULL, get_nv, 4, NULL);

                if (r == 0)
                        r = pump(&c, s.h); /* the HEADERS go out before their reset */
                nghttp2_submit_rst_stream(c.ng, NGHTTP2_FLAG_NONE, id, NGHTTP2_CANCEL);
        }
        if (r == 0)
                r = pump(&c, s.h);
        CHECK_INT_EQ(r, -EPROTO);
        CHECK(c.goaway);
        CHECK_INT_EQ(c.goaway_code, NGHTTP2_ENHANCE_YOUR_CALM);
        CHECK(wp_h2_finished(s.h));
        teardown(&s, &c);
}

/* A hand-made DATA frame (a conforming client would respect the window). */
static void data_frame(uint8_t *f, int32_t id, size_t len, bool end)
{
        f[0] = (uint8_t)(len >> 16);
        f[1] = (uint8_t)(len >> 8);
        f[2] = (uint8_t)len;
        f[3] = 0; /* DATA */
        f[4] = end ? 1 : 0;
        f[5] = (uint8_t)((uint32_t)id >> 24);
        f[6] = (uint8_t)(id >> 16);
        f[7] = (uint8_t)(id >> 8);
        f[8] = (uint8_t)id;
        memset(f + 9, 'd', len);
}

static void test_data_beyond_window(void)
{
        struct srv s;
        struct cli c;
        struct wp_h2_limits lim;
        static uint8_t f[9 + 16384];
        int32_t id;
        int r = 0;

        wp_h2_limits_default(&lim);
        lim.initial_stream_window = 65535;
        setup(&s, &c, &lim);
        s.consume = false;
        id = nghttp2_submit_headers(c.ng, NGHTTP2_FLAG_NONE, -1, NULL, get_nv, 4, NULL);
        pump(&c, s.h);
        REQUIRE(s.nreqs == 1);
        for (int i = 0; i < 5 && r == 0; i++) { /* 80 KiB > 64 KiB */
                data_frame(f, id, 16384, false);
                r = wp_h2_feed(s.h, f, sizeof(f));
        }
        CHECK_INT_EQ(r, 0);
        pump(&c, s.h);
        CHECK_INT_EQ(c.rst[id / 2], NGHTTP2_FLOW_CONTROL_ERROR);
        CHECK(s.reqs[0].closed);
        CHECK_INT_EQ(s.reqs[0].close_error, NGHTTP2_FLOW_CONTROL_ERROR);
        CHECK(s.reqs[0].body < 5 * 16384); /* the rest was refused */
        teardown(&s, &c);
}

static void test_bad_preface(void)
{
        struct srv s;
        struct cli c;
        const uint8_t *out;
        ssize_t n;
        bool goaway = false;
        static const char bad[] = "PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n\0\0\0\4\0\0\0\0\0";

        setup(&s, &c, NULL);
        CHECK_INT_EQ(wp_h2_feed(s.h, (const uint8_t *)bad, sizeof(bad) - 1), -EPROTO);
        while ((n = wp_h2_pull(s.h, &out)) > 0)
                for (ssize_t i = 0; i + 9 <= n; i++)
                        if (out[i + 3] == NGHTTP2_GOAWAY)
                                goaway = true;
        CHECK(goaway);
        CHECK(wp_h2_finished(s.h));
        CHECK_INT_EQ(wp_h2_feed(s.h, (const uint8_t *)"x", 1), -EPROTO);
        teardown(&s, &c);
}

static void test_refused_by_user_and_graceful_goaway(void)
{
        struct srv s;
        struct cli c;
        struct wp_http_response resp = {.status = 204, .content_length = -1};
        int32_t a, b;

        setup(&s, &c, NULL);
        a = nghttp2_submit_headers(c.ng, NGHTTP2_FLAG_NONE, -1, NULL, get_nv, 4, NULL);
        pump(&c, s.h);
        REQUIRE(s.nreqs == 1);
        s.refuse = true;
        b = cli_request(&c, get_nv, 4, NULL, 0);
        pump(&c, s.h);
        CHECK_INT_EQ(c.rst[b / 2], NGHTTP2_REFUSED_STREAM);
        /* drain: GOAWAY(NO_ERROR); the open stream still completes */
        wp_h2_goaway(s.h, WP_H2_NO_ERROR);
        pump(&c, s.h);
        CHECK(c.goaway);
        CHECK_INT_EQ(c.goaway_code, NGHTTP2_NO_ERROR);
        wp_headers_init(&resp.headers);
        CHECK(wp_h2_respond(s.h, a, &resp, true) == 0);
        pump(&c, s.h);
        CHECK_INT_EQ(c.status[a / 2], 204);
        /* the request was still open: RST_STREAM(NO_ERROR) follows the response (RFC 9113 8.1) */
        CHECK_INT_EQ(c.rst[a / 2], 0x100);
        CHECK(s.reqs[0].closed);
        CHECK(wp_h2_finished(s.h));
        teardown(&s, &c);
}

/* ---- client side (against the codec's own server side) ---- */

struct cl_rec {
        unsigned status;
        size_t body;
        char hdrs[256], trailers[128];
        bool ended, closed, head_end;
        uint32_t close_error;
};

static int32_t g_goaway_last = -1;

static void c2_on_response(struct wp_h2 *h, void *su, struct wp_http_response *resp, bool end)
{
        struct cl_rec *r = su;

        (void)h;
        r->status = resp->status;
        r->head_end = end;
        CHECK(resp->version == WP_HTTP_2);
        dump(r->hdrs, sizeof(r->hdrs), &resp->headers);
}

static int c2_on_data(struct wp_h2 *h, void *su, const uint8_t *d, size_t n)
{
        (void)h;
        (void)d;
        ((struct cl_rec *)su)->body += n;
        return 0;
}

static void c2_on_end(struct wp_h2 *h, void *su, struct wp_headers *trailers)
{
        struct cl_rec *r = su;

        (void)h;
        r->ended = true;
        dump(r->trailers, sizeof(r->trailers), trailers);
}

static void c2_on_close(struct wp_h2 *h, void *su, uint32_t error)
{
        struct cl_rec *r = su;

        (void)h;
        r->closed = true;
        r->close_error = error;
}

static void c2_on_goaway(struct wp_h2 *h, int32_t last, uint32_t error, void *user)
{
        (void)h;
        (void)user;
        (void)error;
        g_goaway_last = last;
}

static const struct wp_h2_callbacks ccb = {
        .on_response = c2_on_response,
        .on_data = c2_on_data,
        .on_end = c2_on_end,
        .on_close = c2_on_close,
        .on_goaway = c2_on_goaway,
};

static void pump2(struct wp_h2 *a, struct wp_h2 *b)
{
        for (int round = 0; round < 100; round++) {
                const uint8_t *out;
                ssize_t n;
                bool moved = false;

                while ((n = wp_h2_pull(a, &out)) > 0) {
                        moved = true;
                        if (byte_by_byte)
                                for (ssize_t i = 0; i < n; i++)
                                        CHECK(wp_h2_feed(b, out + i, 1) == 0);
                        else
                                CHECK(wp_h2_feed(b, out, (size_t)n) == 0);
                }
                while ((n = wp_h2_pull(b, &out)) > 0) {
                        moved = true;
                        CHECK(wp_h2_feed(a, out, (size_t)n) == 0);
                }
                if (!moved)
                        break;
        }
}

static void test_client_request_response(void)
{
        struct srv s;
        struct wp_h2 *c;
        struct cl_rec r = {0};
        struct wp_http_request req = {
                .method = "POST", .path = "/p?q", .authority = "svc:80", .content_length = 5};
        struct wp_http_response resp = {.status = 201, .content_length = -1};
        struct wp_headers trl;
        int32_t id;

        memset(&s, 0, sizeof(s));
        g_srv = &s;
        s.consume = true;
        REQUIRE(wp_h2_new(&scb, NULL, true, &s, &s.h) == 0);
        REQUIRE(wp_h2_new(&ccb, NULL, false, NULL, &c) == 0);
        wp_headers_init(&req.headers);
        wp_headers_add(&req.headers, "x-a", 3, "1", 1);
        wp_headers_add(&req.headers, "connection", 10, "x-a", 3); /* never sent */
        wp_headers_add(&req.headers, "host", 4, "other", 5);      /* :authority wins */
        wp_headers_add(&req.headers, "te", 2, "trailers", 8);
        id = wp_h2_request(c, &req, false, &r);
        REQUIRE(id == 1);
        CHECK(wp_h2_send(c, id, "hello", 5) == 0);
        CHECK(wp_h2_end(c, id, NULL) == 0);
        CHECK(wp_h2_send(c, id, "x", 1) == -EPIPE); /* ended */
        pump2(c, s.h);
        REQUIRE(s.nreqs == 1);
        CHECK_STR_EQ(s.reqs[0].method, "POST");
        CHECK_STR_EQ(s.reqs[0].path, "/p?q");
        CHECK_STR_EQ(s.reqs[0].authority, "svc:80");
        CHECK_STR_EQ(s.reqs[0].hdrs, "[x-a=1][te=trailers]");
        CHECK_INT_EQ(s.reqs[0].content_length, 5);
        CHECK_INT_EQ(s.reqs[0].body, 5);
        CHECK(s.reqs[0].ended);
        wp_headers_init(&resp.headers);
        wp_headers_add(&resp.headers, "x-r", 3, "2", 1);
        CHECK(wp_h2_respond(s.h, id, &resp, false) == 0);
        CHECK(wp_h2_send(s.h, id, "world!", 6) == 0);
        wp_headers_init(&trl);
        wp_headers_add(&trl, "grpc-status", 11, "0", 1);
        CHECK(wp_h2_end(s.h, id, &trl) == 0);
        pump2(c, s.h);
        CHECK_INT_EQ(r.status, 201);
        CHECK(!r.head_end);
        CHECK_STR_EQ(r.hdrs, "[x-r=2]");
        CHECK_INT_EQ(r.body, 6);
        CHECK(r.ended);
        CHECK_STR_EQ(r.trailers, "[grpc-status=0]");
        CHECK(r.closed && r.close_error == 0);
        CHECK_INT_EQ(wp_h2_nstreams(c), 0);
        wp_headers_done(&req.headers);
        wp_headers_done(&resp.headers);
        wp_headers_done(&trl);
        wp_h2_free(c);
        wp_h2_free(s.h);
}

static void test_client_stream_limit_and_goaway(void)
{
        struct srv s;
        struct wp_h2 *c;
        struct wp_h2_limits lim;
        struct cl_rec r[3] = {{0}};
        struct wp_http_request req = {
                .method = "GET", .path = "/", .authority = "a", .content_length = -1};
        int32_t a, b;

        memset(&s, 0, sizeof(s));
        g_srv = &s;
        wp_h2_limits_default(&lim);
        lim.max_concurrent_streams = 2;
        REQUIRE(wp_h2_new(&scb, &lim, true, &s, &s.h) == 0);
        REQUIRE(wp_h2_new(&ccb, NULL, false, NULL, &c) == 0);
        wp_headers_init(&req.headers);
        pump2(c, s.h); /* SETTINGS both ways */
        CHECK_INT_EQ(wp_h2_stream_limit(c), 2);
        a = wp_h2_request(c, &req, true, &r[0]);
        CHECK(a > 0);
        CHECK(wp_h2_request(c, &req, true, &r[1]) > 0);
        CHECK(!wp_h2_can_open(c));
        CHECK_INT_EQ(wp_h2_request(c, &req, true, &r[2]), -EAGAIN);
        CHECK(wp_h2_request(s.h, &req, true, &r[2]) == -EINVAL); /* a server opens nothing */
        req.method = "CONNECT";
        CHECK(wp_h2_request(c, &req, true, &r[2]) == -EINVAL);
        req.method = "GET";
        pump2(c, s.h);
        CHECK_INT_EQ(s.nreqs, 2);
        /* the server goes away after the first; the second was not processed... */
        wp_h2_reset(s.h, s.reqs[1].id, WP_H2_REFUSED_STREAM);
        pump2(c, s.h);
        CHECK(r[1].closed);
        CHECK_INT_EQ(r[1].close_error, WP_H2_REFUSED_STREAM);
        wp_h2_goaway(s.h, WP_H2_NO_ERROR);
        pump2(c, s.h);
        CHECK_INT_EQ(g_goaway_last, s.reqs[1].id);
        CHECK(!wp_h2_can_open(c));
        CHECK_INT_EQ(wp_h2_stream_limit(c), 0);
        /* ... a stream opened after the GOAWAY is refused, the open one completes */
        b = wp_h2_request(c, &req, true, &r[2]);
        CHECK_INT_EQ(b, -EAGAIN);
        {
                struct wp_http_response resp = {.status = 200, .content_length = 0};

                wp_headers_init(&resp.headers);
                CHECK(wp_h2_respond(s.h, a, &resp, true) == 0);
        }
        pump2(c, s.h);
        CHECK_INT_EQ(r[0].status, 200);
        CHECK(r[0].head_end);
        CHECK(r[0].closed && r[0].close_error == 0);
        CHECK(wp_h2_finished(s.h));
        wp_h2_free(c);
        wp_h2_free(s.h);
}

/* Every allocation of an exchange (request with trailers, response with body and trailers) fails
 * once in turn: the codec reports it (or resets the stream), never crashes or leaks. */
static int fa_exchange(void *arg)
{
        struct srv s;
        struct cli c;
        struct wp_http_response resp = {.status = 200, .content_length = -1};
        struct wp_headers trl;
        const nghttp2_nv tnv[] = {NVS("x-sum", "1")};
        int32_t id;
        bool ok;

        (void)arg;
        memset(&s, 0, sizeof(s));
        g_srv = &s;
        s.consume = true;
        if (wp_h2_new(&scb, NULL, true, &s, &s.h) < 0)
                return -ENOMEM;
        cli_init(&c, NULL, 0);
        id = nghttp2_submit_headers(c.ng, NGHTTP2_FLAG_NONE, -1, NULL, get_nv, 4, NULL);
        pump(&c, s.h);
        nghttp2_submit_headers(c.ng, NGHTTP2_FLAG_END_STREAM, id, NULL, tnv, 1, NULL);
        pump(&c, s.h);
        ok = s.nreqs == 1 && s.reqs[0].ended && !strcmp(s.reqs[0].trailers, "[x-sum=1]");
        wp_headers_init(&resp.headers);
        wp_headers_init(&trl);
        ok = ok && wp_headers_add(&resp.headers, "x-r", 3, "1", 1) == 0 &&
             wp_headers_add(&trl, "grpc-status", 11, "0", 1) == 0 &&
             wp_h2_respond(s.h, id, &resp, false) == 0 && wp_h2_send(s.h, id, "hello", 5) == 0 &&
             wp_h2_end(s.h, id, &trl) == 0;
        wp_headers_done(&resp.headers);
        wp_headers_done(&trl);
        if (ok)
                pump(&c, s.h);
        ok = ok && c.status[id / 2] == 200 && c.body[id / 2] == 5 &&
             !strcmp(c.trailer[id / 2], "[grpc-status=0]");
        teardown(&s, &c);
        return ok ? 0 : -ENOMEM;
}

static void test_allocation_failures(void)
{
        CHECK(check_failalloc_run(fa_exchange, NULL) > 10);
}

static void run_all(void)
{
        RUN(test_get_with_body_and_trailers);
        RUN(test_post_body_credit_follows_consume);
        RUN(test_request_trailers);
        RUN(test_malformed_requests);
        RUN(test_content_length_mismatch);
        RUN(test_oversized_header_block_gets_431);
        RUN(test_too_many_streams_refused);
        RUN(test_rst_flood_goaway);
        RUN(test_data_beyond_window);
        RUN(test_bad_preface);
        RUN(test_refused_by_user_and_graceful_goaway);
        RUN(test_client_request_response);
        RUN(test_client_stream_limit_and_goaway);
}

int main(void)
{
        byte_by_byte = false;
        run_all();
        RUN(test_allocation_failures);
        byte_by_byte = true;
        fprintf(stderr, "-- again, fed one byte at a time\n");
        run_all();
        return check_exit();
}
