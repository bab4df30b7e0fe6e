/*
 * The gRPC client session pumped against a raw nghttp2 server written here (independent of
 * grpc.c): framing both ways, status from trailers / Trailers-Only / HTTP status / RST_STREAM,
 * limits, GOAWAY, keepalive. Server output is fed whole and again one byte at a time.
 */
#include <errno.h>
#include <nghttp2/nghttp2.h>
#include <stdlib.h>

#include "check.h"
#include "waypoint/base/alloc.h"
#include "xds-client/grpc.h"

#define PATH "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"

static bool bytewise;
static bool failalloc_mode;

/* ---- raw nghttp2 server ---- */

struct srv {
        nghttp2_session *ng;
        int32_t sid;
        char method[16], scheme[16], path[200], authority[100], ctype[64], te[32], ua[64],
            auth[64];
        unsigned nreq;
        uint8_t rx[4096];
        size_t nrx;
        bool rx_eof;
        uint32_t rst_code;
        bool rst_seen;
        /* response body */
        uint8_t tx[70000];
        size_t ntx, txoff;
        size_t max_chunk; /* bytes per DATA frame (0: no limit) */
        bool tx_end;      /* end after tx: trailers (if ntrailers) else END_STREAM on DATA */
        nghttp2_nv trailers[4];
        size_t ntrailers;
        bool provider_deferred;
};

static int s_on_header(nghttp2_session *ng, const nghttp2_frame *f, const uint8_t *name,
                       size_t namelen, const uint8_t *value, size_t valuelen, uint8_t flags,
                       void *ud)
{
        struct srv *s = ud;
        char *dst = NULL;
        size_t cap = 0;

#define H(n, field)                                                                                \
        if (namelen == strlen(n) && memcmp(name, n, namelen) == 0) {                               \
                dst = s->field;                                                                    \
                cap = sizeof(s->field);                                                            \
        }
        H(":method", method) H(":scheme", scheme) H(":path", path) H(":authority", authority)
            H("content-type", ctype) H("te", te) H("user-agent", ua) H("authorization", auth)
#undef H
                if (dst)
        {
                size_t k = valuelen < cap - 1 ? valuelen : cap - 1;
                memcpy(dst, value, k);
                dst[k] = 0;
        }
        return 0;
}

static int s_on_frame_recv(nghttp2_session *ng, const nghttp2_frame *f, void *ud)
{
        struct srv *s = ud;

        if (f->hd.type == NGHTTP2_HEADERS && f->headers.cat == NGHTTP2_HCAT_REQUEST) {
                s->sid = f->hd.stream_id;
                s->nreq++;
        }
        if ((f->hd.type == NGHTTP2_DATA || f->hd.type == NGHTTP2_HEADERS) &&
            (f->hd.flags & NGHTTP2_FLAG_END_STREAM))
                s->rx_eof = true;
        if (f->hd.type == NGHTTP2_RST_STREAM) {
                s->rst_seen = true;
                s->rst_code = f->rst_stream.error_code;
        }
        return 0;
}

static int s_on_data(nghttp2_session *ng, uint8_t flags, int32_t sid, const uint8_t *data,
                     size_t len, void *ud)
{
        struct srv *s = ud;

        if (s->nrx + len <= sizeof(s->rx)) {
                memcpy(s->rx + s->nrx, data, len);
                s->nrx += len;
        }
        return 0;
}

static ssize_t s_read(nghttp2_session *ng, int32_t sid, uint8_t *buf, size_t length,
                      uint32_t *flags, nghttp2_data_source *src, void *ud)
{
        struct srv *s = ud;
        size_t n = s->ntx - s->txoff;

        if (n > length)
                n = length;
        if (s->max_chunk && n > s->max_chunk)
                n = s->max_chunk;
        memcpy(buf, s->tx + s->txoff, n);
        s->txoff += n;
        if (s->txoff == s->ntx && s->tx_end) {
                *flags |= NGHTTP2_DATA_FLAG_EOF;
                if (s->ntrailers) {
                        *flags |= NGHTTP2_DATA_FLAG_NO_END_STREAM;
                        nghttp2_submit_trailer(ng, sid, s->trailers, s->ntrailers);
                }
                return (ssize_t)n;
        }
        if (n == 0) {
                s->provider_deferred = true;
                return NGHTTP2_ERR_DEFERRED;
        }
        return (ssize_t)n;
}

static void srv_init(struct srv *s)
{
        nghttp2_session_callbacks *cb;

        memset(s, 0, sizeof(*s));
        nghttp2_session_callbacks_new(&cb);
        nghttp2_session_callbacks_set_on_header_callback(cb, s_on_header);
        nghttp2_session_callbacks_set_on_frame_recv_callback(cb, s_on_frame_recv);
        nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cb, s_on_data);
        nghttp2_session_server_new(&s->ng, cb, s);
        nghttp2_session_callbacks_del(cb);
        nghttp2_submit_settings(s->ng, NGHTTP2_FLAG_NONE, NULL, 0);
}

static void srv_done(struct srv *s)
{
        nghttp2_session_del(s->ng);
}

#define NV(n, v) {(uint8_t *)(n), (uint8_t *)(v), strlen(n), strlen(v), NGHTTP2_NV_FLAG_NONE}

/* queues a message into the response body */
static void srv_msg(struct srv *s, uint8_t flag, const void *msg, size_t len, size_t claimed)
{
        uint8_t *p = s->tx + s->ntx;

        p[0] = flag;
        p[1] = (uint8_t)(claimed >> 24);
        p[2] = (uint8_t)(claimed >> 16);
        p[3] = (uint8_t)(claimed >> 8);
        p[4] = (uint8_t)claimed;
        memcpy(p + 5, msg, len);
        s->ntx += 5 + len;
        if (s->provider_deferred) {
                s->provider_deferred = false;
                nghttp2_session_resume_data(s->ng, s->sid);
        }
}

static void srv_respond(struct srv *s, const char *status, const char *ctype)
{
        nghttp2_nv nva[2] = {NV(":status", status), NV("content-type", ctype)};
        nghttp2_data_provider prd = {.read_callback = s_read};

        nghttp2_submit_response(s->ng, s->sid, nva, 2, &prd);
}

static void srv_trailers(struct srv *s, const char *status, const char *message)
{
        s->trailers[0] = (nghttp2_nv)NV("grpc-status", status);
        s->ntrailers = 1;
        if (message)
                s->trailers[s->ntrailers++] = (nghttp2_nv)NV("grpc-message", message);
        s->tx_end = true;
        if (s->provider_deferred) {
                s->provider_deferred = false;
                nghttp2_session_resume_data(s->ng, s->sid);
        }
}

/* ---- client side ---- */

struct cli {
        struct xds_grpc_session *s;
        struct xds_grpc_stream *st;
        unsigned nmsg;
        size_t lens[16];
        uint8_t data[16][64];
        bool closed;
        unsigned ncloses;
        int status;
        char message[256];
        unsigned goaways;
        uint32_t goaway_code;
        bool refuse;
};

static int c_on_message(struct xds_grpc_stream *st, const uint8_t *msg, size_t len, void *user)
{
        struct cli *c = user;

        if (c->nmsg < 16) {
                c->lens[c->nmsg] = len;
                memcpy(c->data[c->nmsg], msg, len < 64 ? len : 64);
        }
        c->nmsg++;
        return c->refuse ? -1 : 0;
}

static void c_on_close(struct xds_grpc_stream *st, int status, const char *message, void *user)
{
        struct cli *c = user;

        c->closed = true;
        c->ncloses++;
        c->status = status;
        snprintf(c->message, sizeof(c->message), "%s", message);
        c->st = NULL;
}

static void c_on_goaway(struct xds_grpc_session *s, uint32_t code, void *user)
{
        struct cli *c = user;

        c->goaways++;
        c->goaway_code = code;
}

static const struct xds_grpc_callbacks ccb = {
        .on_message = c_on_message,
        .on_close = c_on_close,
        .on_goaway = c_on_goaway,
};

/* Moves bytes both ways until neither side has anything to say. Returns 0 or the client error. */
static int pump(struct cli *c, struct srv *s)
{
        for (int round = 0; round < 10000; round++) {
                const uint8_t *data;
                bool progress = false;
                ssize_t n;

                while ((n = xds_grpc_session_pull(c->s, &data)) > 0) {
                        progress = true;
                        if (nghttp2_session_mem_recv(s->ng, data, (size_t)n) != n)
                                return -EPROTO;
                }
                if (n < 0)
                        return (int)n;
                while ((n = nghttp2_session_mem_send(s->ng, &data)) > 0) {
                        progress = true;
                        if (bytewise) {
                                for (ssize_t i = 0; i < n; i++) {
                                        ssize_t r = xds_grpc_session_feed(c->s, data + i, 1);
                                        if (r < 0)
                                                return (int)r;
                                }
                        } else {
                                ssize_t r = xds_grpc_session_feed(c->s, data, (size_t)n);
                                if (r < 0)
                                        return (int)r;
                        }
                }
                if (!progress)
                        return 0;
        }
        return -ELOOP;
}

static int setup(struct cli *c, struct srv *s, const struct xds_grpc_limits *lim)
{
        struct xds_grpc_header extra[] = {{"authorization", "Bearer t0ken"}};
        int r;

        memset(c, 0, sizeof(*c));
        srv_init(s);
        r = xds_grpc_session_new(&ccb, lim, "istiod.istio-system.svc:15012", c, &c->s);
        if (r < 0)
                return r;
        r = xds_grpc_stream_open(c->s, PATH, extra, 1, c, &c->st);
        if (r < 0)
                return r;
        return pump(c, s);
}

static void teardown(struct cli *c, struct srv *s)
{
        c->s = xds_grpc_session_free(c->s);
        srv_done(s);
}

/* ---- tests ---- */

static void test_request_headers_and_settings(void)
{
        struct xds_grpc_limits lim = {.initial_window = 1u << 20};
        struct cli c;
        struct srv s;

        REQUIRE(setup(&c, &s, &lim) == 0);
        CHECK_INT_EQ(s.nreq, 1);
        CHECK_STR_EQ(s.method, "POST");
        CHECK_STR_EQ(s.scheme, "https");
        CHECK_STR_EQ(s.path, PATH);
        CHECK_STR_EQ(s.authority, "istiod.istio-system.svc:15012");
        CHECK_STR_EQ(s.ctype, "application/grpc");
        CHECK_STR_EQ(s.te, "trailers");
        CHECK_STR_EQ(s.ua, "waypoint/0.1");
        CHECK_STR_EQ(s.auth, "Bearer t0ken");
        CHECK_INT_EQ(nghttp2_session_get_remote_settings(s.ng, NGHTTP2_SETTINGS_ENABLE_PUSH), 0);
        CHECK_INT_EQ(nghttp2_session_get_remote_settings(s.ng,
                                                         NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE),
                     1u << 20);
        CHECK(!s.rx_eof);
        teardown(&c, &s);
}

static void test_stream_open_rejects_bad_headers(void)
{
        struct xds_grpc_header bad[] = {{":path", "/x"}};
        struct xds_grpc_stream *st;
        struct cli c;
        struct srv s;

        REQUIRE(setup(&c, &s, NULL) == 0);
        CHECK_INT_EQ(xds_grpc_stream_open(c.s, PATH, bad, 1, &c, &st), -EINVAL);
        teardown(&c, &s);
        CHECK_INT_EQ(xds_grpc_session_new(&ccb, NULL, "", NULL, &c.s), -EINVAL);
}

static void round_trip(size_t max_chunk)
{
        struct cli c;
        struct srv s;

        REQUIRE(setup(&c, &s, NULL) == 0);
        CHECK_INT_EQ(xds_grpc_stream_send(c.st, (const uint8_t *)"hello", 5), 0);
        CHECK_INT_EQ(xds_grpc_stream_send(c.st, NULL, 0), 0);
        CHECK_INT_EQ(xds_grpc_stream_finish(c.st), 0);
        CHECK_INT_EQ(xds_grpc_stream_send(c.st, (const uint8_t *)"x", 1), -EPIPE);
        REQUIRE(pump(&c, &s) == 0);
        CHECK_INT_EQ(s.nrx, 15);
        CHECK(memcmp(s.rx, "\0\0\0\0\5hello\0\0\0\0\0", 15) == 0);
        CHECK(s.rx_eof);

        s.max_chunk = max_chunk;
        srv_respond(&s, "200", "application/grpc");
        srv_msg(&s, 0, "world!", 6, 6);
        srv_msg(&s, 0, "abc", 3, 3);
        srv_trailers(&s, "0", NULL);
        REQUIRE(pump(&c, &s) == 0);
        CHECK_INT_EQ(c.nmsg, 2);
        CHECK_INT_EQ(c.lens[0], 6);
        CHECK(memcmp(c.data[0], "world!", 6) == 0);
        CHECK_INT_EQ(c.lens[1], 3);
        CHECK(memcmp(c.data[1], "abc", 3) == 0);
        CHECK(c.closed);
        CHECK_INT_EQ(c.ncloses, 1);
        CHECK_INT_EQ(c.status, 0);
        CHECK_STR_EQ(c.message, "");
        teardown(&c, &s);
}

static void test_message_round_trip(void)
{
        round_trip(0);
}

static void test_message_split_across_data_frames(void)
{
        round_trip(1); /* every DATA frame carries one byte */
}

static void test_several_messages_in_one_data_frame(void)
{
        struct cli c;
        struct srv s;

        REQUIRE(setup(&c, &s, NULL) == 0);
        srv_msg(&s, 0, "one", 3, 3);
        srv_msg(&s, 0, "", 0, 0);
        srv_msg(&s, 0, "three", 5, 5);
        srv_respond(&s, "200", "application/grpc+proto");
        REQUIRE(pump(&c, &s) == 0);
        CHECK_INT_EQ(c.nmsg, 3);
        CHECK_INT_EQ(c.lens[0], 3);
        CHECK_INT_EQ(c.lens[1], 0);
        CHECK_INT_EQ(c.lens[2], 5);
        CHECK(memcmp(c.data[2], "three", 5) == 0);
        CHECK(!c.closed);
        teardown(&c, &s);
}

static void test_trailers_error_status_percent_decoded(void)
{
        struct cli c;
        struct srv s;

        REQUIRE(setup(&c, &s, NULL) == 0);
        srv_respond(&s, "200", "application/grpc");
        srv_trailers(&s, "14", "no%20healthy%20upstream%3A%20%E2%9C%93%zz");
        REQUIRE(pump(&c, &s) == 0);
        CHECK(c.closed);
        CHECK_INT_EQ(c.status, 14);
        CHECK_STR_EQ(c.message, "no healthy upstream: \xe2\x9c\x93%zz");
        teardown(&c, &s);
}

static void test_trailers_only_response(void)
{
        nghttp2_nv nva[] = {NV(":status", "200"), NV("content-type", "application/grpc"),
                            NV("grpc-status", "16"), NV("grpc-message", "bad%20token")};
        struct cli c;
        struct srv s;

        REQUIRE(setup(&c, &s, NULL) == 0);
        nghttp2_submit_response(s.ng, s.sid, nva, 4, NULL);
        REQUIRE(pump(&c, &s) == 0);
        CHECK(c.closed);
        CHECK_INT_EQ(c.status, 16);
        CHECK_STR_EQ(c.message, "bad token");
        teardown(&c, &s);
}

static void test_http_status_maps_to_grpc_status(void)
{
        static const struct {
                const char *http;
                int grpc;
        } cases[] = {{"503", 14}, {"502", 14}, {"429", 14}, {"400", 13},
                     {"401", 16}, {"403", 7},  {"404", 12}, {"500", 2}};

        for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
                nghttp2_nv nva[] = {NV(":status", cases[i].http)};
                struct cli c;
                struct srv s;

                REQUIRE(setup(&c, &s, NULL) == 0);
                nghttp2_submit_response(s.ng, s.sid, nva, 1, NULL);
                REQUIRE(pump(&c, &s) == 0);
                CHECK(c.closed);
                CHECK_INT_EQ(c.status, cases[i].grpc);
                CHECK(strstr(c.message, cases[i].http) != NULL);
                teardown(&c, &s);
        }
}

static void test_http_503_with_body_is_unavailable(void)
{
        struct cli c;
        struct srv s;

        REQUIRE(setup(&c, &s, NULL) == 0);
        srv_respond(&s, "503", "text/plain");
        srv_msg(&s, 0, "x", 1, 1);
        REQUIRE(pump(&c, &s) == 0);
        CHECK(c.closed);
        CHECK_INT_EQ(c.status, 14);
        CHECK_INT_EQ(c.nmsg, 0);
        CHECK(s.rst_seen);
        teardown(&c, &s);
}

static void test_wrong_content_type_is_unknown(void)
{
        struct cli c;
        struct srv s;

        REQUIRE(setup(&c, &s, NULL) == 0);
        srv_respond(&s, "200", "application/grpcx");
        srv_msg(&s, 0, "x", 1, 1);
        REQUIRE(pump(&c, &s) == 0);
        CHECK(c.closed);
        CHECK_INT_EQ(c.status, 2);
        CHECK_INT_EQ(c.nmsg, 0);
        CHECK(strstr(c.message, "content-type") != NULL);
        teardown(&c, &s);
}

static void test_truncated_message_at_end_stream_is_internal(void)
{
        struct cli c;
        struct srv s;

        REQUIRE(setup(&c, &s, NULL) == 0);
        srv_respond(&s, "200", "application/grpc");
        srv_msg(&s, 0, "abc", 3, 10); /* claims 10 bytes, has 3 */
        srv_trailers(&s, "0", NULL);
        REQUIRE(pump(&c, &s) == 0);
        CHECK(c.closed);
        CHECK_INT_EQ(c.status, 13);
        CHECK_INT_EQ(c.nmsg, 0);
        teardown(&c, &s);
}

static void test_end_stream_without_grpc_status_is_internal(void)
{
        struct cli c;
        struct srv s;

        REQUIRE(setup(&c, &s, NULL) == 0);
        srv_respond(&s, "200", "application/grpc");
        srv_msg(&s, 0, "abc", 3, 3);
        s.tx_end = true; /* END_STREAM on DATA, no trailers */
        REQUIRE(pump(&c, &s) == 0);
        CHECK_INT_EQ(c.nmsg, 1);
        CHECK(c.closed);
        CHECK_INT_EQ(c.status, 13);
        CHECK(strstr(c.message, "grpc-status") != NULL);
        teardown(&c, &s);
}

static void test_oversized_message_is_resource_exhausted(void)
{
        struct xds_grpc_limits lim = {.max_message = 100};
        static uint8_t big[101];
        struct cli c;
        struct srv s;

        REQUIRE(setup(&c, &s, &lim) == 0);
        srv_respond(&s, "200", "application/grpc");
        srv_msg(&s, 0, big, 100, 100); /* at the limit: fine */
        srv_msg(&s, 0, big, 101, 101);
        REQUIRE(pump(&c, &s) == 0);
        CHECK_INT_EQ(c.nmsg, 1);
        CHECK(c.closed);
        CHECK_INT_EQ(c.status, 8);
        CHECK(strstr(c.message, "101") != NULL);
        CHECK(strstr(c.message, "100") != NULL);
        CHECK(s.rst_seen);
        CHECK_INT_EQ(s.rst_code, NGHTTP2_CANCEL);
        teardown(&c, &s);
}

static void test_oversized_length_prefix_rejected_before_body(void)
{
        struct cli c;
        struct srv s;

        REQUIRE(setup(&c, &s, NULL) == 0); /* default 16 MiB */
        srv_respond(&s, "200", "application/grpc");
        srv_msg(&s, 0, "", 0, 0xffffffffu); /* only the prefix */
        REQUIRE(pump(&c, &s) == 0);
        CHECK(c.closed);
        CHECK_INT_EQ(c.status, 8);
        teardown(&c, &s);
}

static void test_compressed_flag_is_internal(void)
{
        struct cli c;
        struct srv s;

        REQUIRE(setup(&c, &s, NULL) == 0);
        srv_respond(&s, "200", "application/grpc");
        srv_msg(&s, 1, "abc", 3, 3);
        REQUIRE(pump(&c, &s) == 0);
        CHECK(c.closed);
        CHECK_INT_EQ(c.status, 13);
        CHECK_STR_EQ(c.message, "compressed message without grpc-encoding");
        CHECK_INT_EQ(c.nmsg, 0);
        teardown(&c, &s);
}

static void test_rst_stream_maps_to_status(void)
{
        static const struct {
                uint32_t h2;
                int grpc;
        } cases[] = {{NGHTTP2_CANCEL, 1},
                     {NGHTTP2_REFUSED_STREAM, 14},
                     {NGHTTP2_PROTOCOL_ERROR, 13},
                     {NGHTTP2_ENHANCE_YOUR_CALM, 8}};

        for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
                struct cli c;
                struct srv s;

                REQUIRE(setup(&c, &s, NULL) == 0);
                srv_respond(&s, "200", "application/grpc");
                REQUIRE(pump(&c, &s) == 0);
                nghttp2_submit_rst_stream(s.ng, NGHTTP2_FLAG_NONE, s.sid, cases[i].h2);
                REQUIRE(pump(&c, &s) == 0);
                CHECK(c.closed);
                CHECK_INT_EQ(c.status, cases[i].grpc);
                teardown(&c, &s);
        }
}

static void test_goaway_reported_and_new_streams_refused(void)
{
        struct xds_grpc_stream *st2;
        struct cli c;
        struct srv s;

        REQUIRE(setup(&c, &s, NULL) == 0);
        nghttp2_submit_goaway(s.ng, NGHTTP2_FLAG_NONE, s.sid, NGHTTP2_NO_ERROR, NULL, 0);
        REQUIRE(pump(&c, &s) == 0);
        CHECK_INT_EQ(c.goaways, 1);
        CHECK_INT_EQ(c.goaway_code, NGHTTP2_NO_ERROR);
        CHECK(!c.closed); /* the stream below last_stream_id goes on */
        CHECK_INT_EQ(xds_grpc_stream_open(c.s, PATH, NULL, 0, &c, &st2), -ENOTCONN);
        teardown(&c, &s);
}

static void test_goaway_below_stream_closes_it_unavailable(void)
{
        struct cli c;
        struct srv s;

        REQUIRE(setup(&c, &s, NULL) == 0);
        nghttp2_submit_goaway(s.ng, NGHTTP2_FLAG_NONE, 0, NGHTTP2_NO_ERROR, NULL, 0);
        REQUIRE(pump(&c, &s) == 0);
        CHECK_INT_EQ(c.goaways, 1);
        CHECK(c.closed);
        CHECK_INT_EQ(c.status, 14);
        teardown(&c, &s);
}

static void test_cancel_sends_rst_and_reports_cancelled(void)
{
        struct cli c;
        struct srv s;

        REQUIRE(setup(&c, &s, NULL) == 0);
        xds_grpc_stream_cancel(c.st);
        REQUIRE(pump(&c, &s) == 0);
        CHECK(c.closed);
        CHECK_INT_EQ(c.ncloses, 1);
        CHECK_INT_EQ(c.status, 1);
        CHECK(s.rst_seen);
        CHECK_INT_EQ(s.rst_code, NGHTTP2_CANCEL);
        teardown(&c, &s);
}

static void test_on_message_refusal_cancels_stream(void)
{
        struct cli c;
        struct srv s;

        REQUIRE(setup(&c, &s, NULL) == 0);
        c.refuse = true;
        srv_respond(&s, "200", "application/grpc");
        srv_msg(&s, 0, "one", 3, 3);
        srv_msg(&s, 0, "two", 3, 3);
        REQUIRE(pump(&c, &s) == 0);
        CHECK_INT_EQ(c.nmsg, 1);
        CHECK(c.closed);
        CHECK_INT_EQ(c.status, 1);
        CHECK(s.rst_seen);
        teardown(&c, &s);
}

static void test_keepalive_ping_ack_and_timeout(void)
{
        struct xds_grpc_limits lim = {.keepalive_interval_ms = 1000, .keepalive_timeout_ms = 500};
        const uint64_t ms = 1000000;
        uint64_t next = 0;
        struct cli c;
        struct srv s;

        REQUIRE(setup(&c, &s, &lim) == 0);
        CHECK_INT_EQ(xds_grpc_session_tick(c.s, 10 * ms, &next), 0);
        CHECK_INT_EQ(next, 1010 * ms);
        CHECK(!xds_grpc_session_want_write(c.s));
        CHECK_INT_EQ(xds_grpc_session_tick(c.s, 1010 * ms, &next), 0); /* PING */
        CHECK(xds_grpc_session_want_write(c.s));
        CHECK_INT_EQ(next, 1510 * ms);
        REQUIRE(pump(&c, &s) == 0); /* nghttp2 server acks */
        CHECK_INT_EQ(xds_grpc_session_tick(c.s, 1400 * ms, &next), 0);
        CHECK_INT_EQ(next, 2010 * ms);
        CHECK_INT_EQ(xds_grpc_session_tick(c.s, 2010 * ms, &next), 0); /* PING, never acked */
        CHECK_INT_EQ(xds_grpc_session_tick(c.s, 2400 * ms, &next), 0);
        CHECK_INT_EQ(xds_grpc_session_tick(c.s, 2510 * ms, &next), -ETIMEDOUT);
        CHECK(strstr(xds_grpc_session_error(c.s), "keepalive") != NULL);
        CHECK_INT_EQ(xds_grpc_session_feed(c.s, (const uint8_t *)"", 0), -EPROTO);
        teardown(&c, &s);
}

static void test_garbage_from_server_is_eproto(void)
{
        struct cli c;
        struct srv s;
        static const uint8_t junk[] = "\0\0\x04\x09\0\0\0\0\0abcd"; /* CONTINUATION out of place */

        const uint8_t *out;

        REQUIRE(setup(&c, &s, NULL) == 0);
        /* nghttp2 answers a connection error itself with GOAWAY: the session is dead once that
         * GOAWAY has been pulled */
        CHECK(xds_grpc_session_feed(c.s, junk, sizeof(junk) - 1) >= 0);
        CHECK(xds_grpc_session_pull(c.s, &out) > 0);
        CHECK(strstr(xds_grpc_session_error(c.s), "GOAWAY PROTOCOL_ERROR") != NULL);
        CHECK_INT_EQ(xds_grpc_session_feed(c.s, junk, 1), -EPROTO);
        teardown(&c, &s);
}

static void test_percent_decode(void)
{
        char out[32];

        CHECK_INT_EQ(xds_grpc_percent_decode("a%41%zz%4", out, sizeof(out)), 7);
        CHECK_STR_EQ(out, "aA%zz%4");
        CHECK_INT_EQ(xds_grpc_percent_decode("%e2%9C%93", out, sizeof(out)), 3);
        CHECK_STR_EQ(out, "\xe2\x9c\x93");
        CHECK_INT_EQ(xds_grpc_percent_decode("abcdef", out, 4), -ENOSPC);
        CHECK_INT_EQ(xds_grpc_percent_decode("abc", out, 4), 3);
}

static void test_frame_header(void)
{
        uint8_t h[5];

        xds_grpc_frame_header(h, 0x01020304);
        CHECK(memcmp(h, "\0\1\2\3\4", 5) == 0);
}

/* ---- failalloc ---- */

static int fa_session_new(void *arg)
{
        struct xds_grpc_session *s;
        int r = xds_grpc_session_new(&ccb, NULL, "istiod:15012", NULL, &s);

        if (r < 0)
                return r;
        xds_grpc_session_free(s);
        return 0;
}

static int fa_exchange(void *arg)
{
        struct cli c;
        struct srv s;
        int r;

        r = setup(&c, &s, NULL);
        if (r == 0)
                r = xds_grpc_stream_send(c.st, (const uint8_t *)"hello", 5);
        if (r == 0)
                r = pump(&c, &s);
        if (r == 0 && s.sid) {
                srv_respond(&s, "200", "application/grpc");
                srv_msg(&s, 0, "world", 5, 5);
                srv_trailers(&s, "3", "bad%20thing");
                r = pump(&c, &s);
        }
        teardown(&c, &s);
        return r < 0 ? r : 0;
}

static void test_failalloc(void)
{
        failalloc_mode = true;
        CHECK(check_failalloc_run(fa_session_new, NULL) > 0);
        CHECK(check_failalloc_run(fa_exchange, NULL) > 0);
        failalloc_mode = false;
}

static void run_all(void)
{
        RUN(test_request_headers_and_settings);
        RUN(test_stream_open_rejects_bad_headers);
        RUN(test_message_round_trip);
        RUN(test_message_split_across_data_frames);
        RUN(test_several_messages_in_one_data_frame);
        RUN(test_trailers_error_status_percent_decoded);
        RUN(test_trailers_only_response);
        RUN(test_http_status_maps_to_grpc_status);
        RUN(test_http_503_with_body_is_unavailable);
        RUN(test_wrong_content_type_is_unknown);
        RUN(test_truncated_message_at_end_stream_is_internal);
        RUN(test_end_stream_without_grpc_status_is_internal);
        RUN(test_oversized_message_is_resource_exhausted);
        RUN(test_oversized_length_prefix_rejected_before_body);
        RUN(test_compressed_flag_is_internal);
        RUN(test_rst_stream_maps_to_status);
        RUN(test_goaway_reported_and_new_streams_refused);
        RUN(test_goaway_below_stream_closes_it_unavailable);
        RUN(test_cancel_sends_rst_and_reports_cancelled);
        RUN(test_on_message_refusal_cancels_stream);
        RUN(test_keepalive_ping_ack_and_timeout);
        RUN(test_garbage_from_server_is_eproto);
}

int main(void)
{
        RUN(test_percent_decode);
        RUN(test_frame_header);
        bytewise = false;
        run_all();
        fprintf(stderr, "-- again, server output fed one byte at a time\n");
        bytewise = true;
        run_all();
        bytewise = false;
        RUN(test_failalloc);
        return check_exit();
}
