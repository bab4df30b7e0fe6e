/*
 * HBONE sessions pumped against each other in memory: hbone server <-> hbone client, and hbone
 * server <-> a raw nghttp2 client written here (independent of hbone's API) that sends what our
 * client never would. Every scenario runs with whole buffers and again one byte at a time.
 */
#include <errno.h>
#include <nghttp2/nghttp2.h>
#include <stdlib.h>

#include "check.h"
#include "hbone/hbone.h"
#include "waypoint/base/alloc.h"

static bool bytewise;
static bool failalloc_mode; /* allocation failures expected: callbacks cope, no CHECKs */

/* ---- per-tunnel and per-session records ---- */

#define MAX_TUN 1100

struct tun {
        bool used;
        struct hbone_stream *st;
        unsigned status;      /* client: response */
        size_t rx;            /* bytes received */
        uint8_t rxbuf[64];    /* first bytes received */
        bool eof, closed;
        uint32_t close_code;
        unsigned writable;
        bool hold_credit;     /* don't consume in on_tunnel_data */
        bool echo;            /* server: echo data back */
};

struct side {
        struct hbone_session *s;
        struct tun tuns[MAX_TUN];
        unsigned ntun;
        /* server behaviour */
        int accept;           /* 1 respond 200 at once, 0 keep pending, -1 refuse */
        bool hold_credit;
        bool echo;
        char authority[300];
        char baggage[200];
        bool saw_forwarded;
        unsigned nreq;
        unsigned goaways;
        uint32_t goaway_code;
};

static struct tun *tun_new(struct side *sd)
{
        if (sd->ntun >= MAX_TUN)
                abort();
        struct tun *t = &sd->tuns[sd->ntun++];
        memset(t, 0, sizeof(*t));
        t->used = true;
        return t;
}

static int srv_on_request(struct hbone_session *s, struct hbone_stream *st,
                          const struct hbone_request *req, void *user)
{
        struct side *sd = user;
        struct tun *t;

        sd->nreq++;
        snprintf(sd->authority, sizeof(sd->authority), "%s", req->authority);
        snprintf(sd->baggage, sizeof(sd->baggage), "%s", req->baggage ? req->baggage : "");
        sd->saw_forwarded = req->forwarded != NULL;
        if (sd->accept < 0)
                return -1;
        t = tun_new(sd);
        t->st = st;
        t->hold_credit = sd->hold_credit;
        t->echo = sd->echo;
        hbone_stream_set_user(st, t);
        if (sd->accept > 0 && hbone_stream_respond(st, 200, NULL, 0) < 0) {
                CHECK(failalloc_mode);
                hbone_stream_reset(st, HBONE_H2_INTERNAL_ERROR);
        }
        return 0;
}

static void on_response(struct hbone_stream *st, unsigned status, void *user)
{
        struct tun *t = user;

        t->status = status;
}

static int on_data(struct hbone_stream *st, const uint8_t *data, size_t len, void *user)
{
        struct tun *t = user;

        if (t->rx < sizeof(t->rxbuf)) {
                size_t k = sizeof(t->rxbuf) - t->rx < len ? sizeof(t->rxbuf) - t->rx : len;
                memcpy(t->rxbuf + t->rx, data, k);
        }
        t->rx += len;
        if (t->echo && hbone_stream_write(st, data, len) != (ssize_t)len) {
                CHECK(failalloc_mode);
                return -1;
        }
        if (!t->hold_credit)
                hbone_stream_consume(st, len);
        return 0;
}

static void on_eof(struct hbone_stream *st, void *user)
{
        struct tun *t = user;

        CHECK(!t->eof);
        t->eof = true;
        if (t->echo && hbone_stream_shutdown(st) < 0)
                CHECK(failalloc_mode);
}

static void on_writable(struct hbone_stream *st, void *user)
{
        struct tun *t = user;

        t->writable++;
}

static void on_close(struct hbone_stream *st, uint32_t code, void *user)
{
        struct tun *t = user;

        CHECK(!t->closed);
        t->closed = true;
        t->close_code = code;
        t->st = NULL;
}

static void on_goaway(struct hbone_session *s, uint32_t code, void *user)
{
        struct side *sd = user;

        sd->goaways++;
        sd->goaway_code = code;
}

static const struct hbone_callbacks cbs = {
        .on_tunnel_request = srv_on_request,
        .on_tunnel_response = on_response,
        .on_tunnel_data = on_data,
        .on_tunnel_eof = on_eof,
        .on_tunnel_writable = on_writable,
        .on_tunnel_close = on_close,
        .on_goaway = on_goaway,
};

/* ---- endpoints: an hbone session or a raw nghttp2 session ---- */

struct raw {
        nghttp2_session *ng;
        unsigned status[64];        /* by stream id / 2 */
        uint32_t rst[64];           /* RST_STREAM code received + 1 */
        bool goaway;
        uint32_t goaway_code;
        int32_t goaway_last;
        size_t data_rx;
};

struct ep {
        struct hbone_session *h;
        struct raw *raw;
        bool broken;
};

static ssize_t ep_pull(struct ep *e, const uint8_t **data)
{
        if (e->h)
                return hbone_session_pull(e->h, data);
        return nghttp2_session_mem_send(e->raw->ng, data);
}

static ssize_t ep_feed1(struct ep *e, const uint8_t *in, size_t len)
{
        if (e->h)
                return hbone_session_feed(e->h, in, len);
        return nghttp2_session_mem_recv(e->raw->ng, in, len);
}

static ssize_t ep_feed(struct ep *e, const uint8_t *in, size_t len)
{
        if (!bytewise)
                return ep_feed1(e, in, len);
        for (size_t i = 0; i < len; i++) {
                ssize_t r = ep_feed1(e, in + i, 1);
                if (r < 0)
                        return r;
        }
        return (ssize_t)len;
}

/* Moves bytes both ways until neither side has anything to send. Returns 0, or the first
 * negative feed/pull result (the pump stops feeding a broken side but still drains it once). */
static int pump(struct ep *a, struct ep *b)
{
        int err = 0;

        for (int round = 0; round < 100000; round++) {
                bool moved = false;
                struct ep *from = a, *to = b;

                for (int dir = 0; dir < 2; dir++) {
                        for (;;) {
                                const uint8_t *d;
                                ssize_t n = ep_pull(from, &d);

                                if (n < 0) {
                                        from->broken = true;
                                        return err ? err : (int)n;
                                }
                                if (n == 0)
                                        break;
                                moved = true;
                                if (to->broken)
                                        continue;
                                ssize_t r = ep_feed(to, d, (size_t)n);
                                if (r < 0) {
                                        to->broken = true;
                                        if (!err)
                                                err = (int)r;
                                }
                        }
                        from = b;
                        to = a;
                }
                if (!moved)
                        return err;
        }
        return -ELOOP;
}

/* ---- raw nghttp2 client ---- */

static int raw_on_header(nghttp2_session *ng, const nghttp2_frame *f, const uint8_t *name,
                         size_t namelen, const uint8_t *value, size_t valuelen, uint8_t flags,
                         void *ud)
{
        struct raw *r = ud;

        if (f->hd.type == NGHTTP2_HEADERS && namelen == 7 && !memcmp(name, ":status", 7) &&
            f->hd.stream_id / 2 < 64)
                r->status[f->hd.stream_id / 2] = (unsigned)atoi((const char *)value);
        return 0;
}

static int raw_on_frame_recv(nghttp2_session *ng, const nghttp2_frame *f, void *ud)
{
        struct raw *r = ud;

        if (f->hd.type == NGHTTP2_RST_STREAM && f->hd.stream_id / 2 < 64)
                r->rst[f->hd.stream_id / 2] = f->rst_stream.error_code + 1;
        if (f->hd.type == NGHTTP2_GOAWAY) {
                r->goaway = true;
                r->goaway_code = f->goaway.error_code;
                r->goaway_last = f->goaway.last_stream_id;
        }
        return 0;
}

static int raw_on_data(nghttp2_session *ng, uint8_t flags, int32_t id, const uint8_t *d, size_t len,
                       void *ud)
{
        ((struct raw *)ud)->data_rx += len;
        return 0;
}

static void raw_init(struct raw *r)
{
        nghttp2_session_callbacks *c;
        nghttp2_option *o;

        memset(r, 0, sizeof(*r));
        nghttp2_session_callbacks_new(&c);
        nghttp2_session_callbacks_set_on_header_callback(c, raw_on_header);
        nghttp2_session_callbacks_set_on_frame_recv_callback(c, raw_on_frame_recv);
        nghttp2_session_callbacks_set_on_data_chunk_recv_callback(c, raw_on_data);
        nghttp2_option_new(&o);
        /* craft what a sane client would not: the raw peer must not police itself */
        nghttp2_option_set_no_http_messaging(o, 1);
        nghttp2_option_set_peer_max_concurrent_streams(o, 1000);
        nghttp2_session_client_new2(&r->ng, c, r, o);
        nghttp2_option_del(o);
        nghttp2_session_callbacks_del(c);
        nghttp2_submit_settings(r->ng, NGHTTP2_FLAG_NONE, NULL, 0);
}

static void raw_done(struct raw *r)
{
        nghttp2_session_del(r->ng);
}

#define NV(n, v) {(uint8_t *)(n), (uint8_t *)(v), sizeof(n) - 1, strlen(v), NGHTTP2_NV_FLAG_NONE}

static int32_t raw_request(struct raw *r, const nghttp2_nv *nva, size_t n, bool end_stream)
{
        if (end_stream)
                return nghttp2_submit_request(r->ng, NULL, nva, n, NULL, NULL);
        /* HEADERS without END_STREAM: a data provider that never produces */
        return nghttp2_submit_headers(r->ng, NGHTTP2_FLAG_NONE, -1, NULL, nva, n, NULL);
}

/* ---- fixtures ---- */

static struct side srv, cli;

static void setup_limits(struct hbone_limits *lim)
{
        hbone_limits_default(lim);
}

static int pair_new(const struct hbone_limits *slim, const struct hbone_limits *clim)
{
        int r;

        memset(&srv, 0, sizeof(srv));
        memset(&cli, 0, sizeof(cli));
        srv.accept = 1;
        r = hbone_session_new(&cbs, slim, true, &srv, &srv.s);
        if (r < 0)
                return r;
        r = hbone_session_new(&cbs, clim, false, &cli, &cli.s);
        if (r < 0) {
                srv.s = hbone_session_free(srv.s);
                return r;
        }
        return 0;
}

static void pair_free(void)
{
        srv.s = hbone_session_free(srv.s);
        cli.s = hbone_session_free(cli.s);
}

static int pump_pair(void)
{
        struct ep a = {.h = cli.s}, b = {.h = srv.s};

        return pump(&a, &b);
}

static struct tun *open_tunnel(const char *authority)
{
        struct tun *t = tun_new(&cli);
        struct hbone_stream *st = NULL;
        static const struct hbone_header extra[] = {
                {"baggage", "k8s.namespace.name=default"},
                {"forwarded", "for=\"10.0.0.9:1234\""},
        };

        if (hbone_session_open(cli.s, authority, extra, 2, t, &st) < 0)
                return NULL;
        t->st = st;
        return t;
}

/* ---- scenarios: hbone <-> hbone ---- */

static void test_session_tunnel_data_halfclose_and_clean_close(void)
{
        struct hbone_limits lim;
        struct tun *c, *s;

        setup_limits(&lim);
        REQUIRE(pair_new(&lim, &lim) == 0);
        CHECK_INT_EQ(hbone_session_streams_available(cli.s), 100);
        c = open_tunnel("10.96.3.4:80");
        REQUIRE(c);
        CHECK_INT_EQ(pump_pair(), 0);
        CHECK_INT_EQ(srv.nreq, 1);
        CHECK_STR_EQ(srv.authority, "10.96.3.4:80");
        CHECK_STR_EQ(srv.baggage, "k8s.namespace.name=default");
        CHECK(srv.saw_forwarded);
        CHECK_INT_EQ(c->status, 200);
        REQUIRE(srv.ntun == 1);
        s = &srv.tuns[0];
        CHECK_INT_EQ(hbone_session_open_streams(srv.s), 1);
        CHECK_INT_EQ(hbone_session_streams_available(cli.s), 99);

        CHECK_INT_EQ(hbone_stream_write(c->st, (const uint8_t *)"hello", 5), 5);
        CHECK_INT_EQ(hbone_stream_queued(c->st), 5);
        CHECK_INT_EQ(pump_pair(), 0);
        CHECK_INT_EQ(s->rx, 5);
        CHECK(memcmp(s->rxbuf, "hello", 5) == 0);
        CHECK_INT_EQ(hbone_stream_queued(c->st), 0);

        /* client half-closes; server still sends */
        CHECK_INT_EQ(hbone_stream_shutdown(c->st), 0);
        CHECK_INT_EQ(hbone_stream_write(c->st, (const uint8_t *)"x", 1), -EPIPE);
        CHECK_INT_EQ(pump_pair(), 0);
        CHECK(s->eof);
        CHECK(!s->closed);
        CHECK_INT_EQ(hbone_stream_write(s->st, (const uint8_t *)"world!", 6), 6);
        CHECK_INT_EQ(pump_pair(), 0);
        CHECK_INT_EQ(c->rx, 6);
        CHECK(memcmp(c->rxbuf, "world!", 6) == 0);
        CHECK(!c->eof);
        CHECK_INT_EQ(hbone_stream_shutdown(s->st), 0);
        CHECK_INT_EQ(pump_pair(), 0);
        CHECK(c->eof);
        CHECK(c->closed && s->closed);
        CHECK_INT_EQ(c->close_code, 0);
        CHECK_INT_EQ(s->close_code, 0);
        CHECK_INT_EQ(hbone_session_open_streams(srv.s), 0);
        CHECK_INT_EQ(hbone_session_open_streams(cli.s), 0);
        CHECK(!hbone_session_finished(srv.s));
        pair_free();
}

static void test_session_server_halfclose_first(void)
{
        struct hbone_limits lim;
        struct tun *c, *s;

        setup_limits(&lim);
        REQUIRE(pair_new(&lim, &lim) == 0);
        c = open_tunnel("[fd00::1]:8080");
        REQUIRE(c);
        CHECK_INT_EQ(pump_pair(), 0);
        REQUIRE(srv.ntun == 1);
        s = &srv.tuns[0];
        CHECK_STR_EQ(srv.authority, "[fd00::1]:8080");
        CHECK_INT_EQ(hbone_stream_write(s->st, (const uint8_t *)"abc", 3), 3);
        CHECK_INT_EQ(hbone_stream_shutdown(s->st), 0);
        CHECK_INT_EQ(pump_pair(), 0);
        CHECK_INT_EQ(c->rx, 3);
        CHECK(c->eof && !c->closed);
        CHECK_INT_EQ(hbone_stream_write(c->st, (const uint8_t *)"defg", 4), 4);
        CHECK_INT_EQ(hbone_stream_shutdown(c->st), 0);
        CHECK_INT_EQ(pump_pair(), 0);
        CHECK_INT_EQ(s->rx, 4);
        CHECK(s->eof && s->closed && c->closed);
        CHECK_INT_EQ(s->close_code, 0);
        CHECK_INT_EQ(c->close_code, 0);
        pair_free();
}

static void test_session_reset_by_client_and_by_server(void)
{
        struct hbone_limits lim;
        struct tun *c1, *c2, *s1, *s2;

        setup_limits(&lim);
        REQUIRE(pair_new(&lim, &lim) == 0);
        c1 = open_tunnel("1.1.1.1:1");
        c2 = open_tunnel("2.2.2.2:2");
        REQUIRE(c1 && c2);
        CHECK_INT_EQ(pump_pair(), 0);
        REQUIRE(srv.ntun == 2);
        s1 = &srv.tuns[0];
        s2 = &srv.tuns[1];
        CHECK_INT_EQ(hbone_stream_id(s1->st), hbone_stream_id(c1->st));

        hbone_stream_reset(c1->st, HBONE_H2_CANCEL);
        CHECK_INT_EQ(hbone_stream_write(c1->st, (const uint8_t *)"x", 1), -EPIPE);
        CHECK_INT_EQ(pump_pair(), 0);
        CHECK(c1->closed && s1->closed);
        CHECK_INT_EQ(c1->close_code, HBONE_H2_CANCEL);
        CHECK_INT_EQ(s1->close_code, HBONE_H2_CANCEL);

        hbone_stream_reset(s2->st, HBONE_H2_CONNECT_ERROR);
        CHECK_INT_EQ(pump_pair(), 0);
        CHECK(c2->closed && s2->closed);
        CHECK_INT_EQ(c2->close_code, HBONE_H2_CONNECT_ERROR);
        CHECK_INT_EQ(s2->close_code, HBONE_H2_CONNECT_ERROR);
        CHECK_INT_EQ(hbone_session_open_streams(srv.s), 0);
        CHECK_INT_EQ(hbone_session_open_streams(cli.s), 0);
        pair_free();
}

static void test_session_refused_request_gets_503_and_closes(void)
{
        struct hbone_limits lim;
        struct tun *c;

        setup_limits(&lim);
        REQUIRE(pair_new(&lim, &lim) == 0);
        srv.accept = -1;
        c = open_tunnel("10.0.0.1:9080");
        REQUIRE(c);
        CHECK_INT_EQ(hbone_stream_write(c->st, (const uint8_t *)"early", 5), 5);
        CHECK_INT_EQ(pump_pair(), 0);
        CHECK_INT_EQ(srv.nreq, 1);
        CHECK_INT_EQ(c->status, 503);
        CHECK(c->closed);
        CHECK_INT_EQ(srv.ntun, 0);
        CHECK_INT_EQ(hbone_session_open_streams(srv.s), 0);
        CHECK_INT_EQ(hbone_session_open_streams(cli.s), 0);
        pair_free();
}

static void test_session_client_rejects_bad_open_arguments(void)
{
        struct hbone_limits lim;
        struct hbone_stream *st;
        struct hbone_header bad[] = {{"Upper", "x"}};
        struct hbone_header pseudo[] = {{":path", "/"}};

        setup_limits(&lim);
        REQUIRE(pair_new(&lim, &lim) == 0);
        CHECK_INT_EQ(hbone_session_open(cli.s, "no-port", NULL, 0, NULL, &st), -EINVAL);
        CHECK_INT_EQ(hbone_session_open(cli.s, "1.2.3.4:80", bad, 1, NULL, &st), -EINVAL);
        CHECK_INT_EQ(hbone_session_open(cli.s, "1.2.3.4:80", pseudo, 1, NULL, &st), -EINVAL);
        CHECK_INT_EQ(hbone_session_open(srv.s, "1.2.3.4:80", NULL, 0, NULL, &st), -EINVAL);
        CHECK_INT_EQ(hbone_session_open_streams(cli.s), 0);
        pair_free();
}

static void test_session_flow_control_bounds_inflight_and_resumes_on_consume(void)
{
        struct hbone_limits lim;
        struct tun *c, *s;
        static uint8_t blob[300 * 1024];
        size_t sent = 0;
        ssize_t w;

        setup_limits(&lim);
        lim.initial_stream_window = 65536;
        lim.initial_conn_window = 1 << 20;
        lim.stream_send_buffer = 128 * 1024;
        REQUIRE(pair_new(&lim, &lim) == 0);
        srv.hold_credit = true;
        c = open_tunnel("10.0.0.1:80");
        REQUIRE(c);
        CHECK_INT_EQ(pump_pair(), 0);
        REQUIRE(srv.ntun == 1);
        s = &srv.tuns[0];

        for (size_t i = 0; i < sizeof(blob); i++)
                blob[i] = (uint8_t)(i * 7);
        w = hbone_stream_write(c->st, blob, sizeof(blob));
        CHECK_INT_EQ(w, 128 * 1024); /* bounded queue: partial write */
        sent = (size_t)w;
        CHECK_INT_EQ(hbone_stream_write(c->st, blob + sent, sizeof(blob) - sent), -EAGAIN);
        CHECK_INT_EQ(pump_pair(), 0);
        /* the server holds its credit: exactly one stream window in flight */
        CHECK_INT_EQ(s->rx, 65536);
        CHECK_INT_EQ(hbone_stream_queued(c->st), 128 * 1024 - 65536);
        CHECK_INT_EQ(c->writable, 0); /* queue did not drain below half (64 KiB) yet */
        CHECK_INT_EQ(pump_pair(), 0);
        CHECK_INT_EQ(s->rx, 65536);

        /* consume in pieces; the client resumes and the queue refills after on_tunnel_writable */
        for (int iter = 0; iter < 1000 && s->rx < sizeof(blob); iter++) {
                size_t before = s->rx;

                hbone_stream_consume(s->st, 16384);
                CHECK_INT_EQ(pump_pair(), 0);
                CHECK(s->rx - before <= 65536);
                if (sent < sizeof(blob)) {
                        w = hbone_stream_write(c->st, blob + sent, sizeof(blob) - sent);
                        if (w > 0)
                                sent += (size_t)w;
                        else
                                CHECK_INT_EQ(w, -EAGAIN);
                        CHECK_INT_EQ(pump_pair(), 0);
                }
        }
        CHECK_INT_EQ(sent, sizeof(blob));
        CHECK_INT_EQ(s->rx, sizeof(blob));
        CHECK(c->writable >= 1);
        CHECK(memcmp(s->rxbuf, blob, sizeof(s->rxbuf)) == 0);
        /* closing with unconsumed credit must not leak the connection window */
        hbone_stream_reset(c->st, HBONE_H2_CANCEL);
        CHECK_INT_EQ(pump_pair(), 0);
        CHECK(s->closed && c->closed);
        pair_free();
}

static void test_session_thousand_streams_echo(void)
{
        struct hbone_limits lim;
        char auth[64];
        unsigned n = 1000;

        setup_limits(&lim);
        lim.max_concurrent_streams = 1000;
        REQUIRE(pair_new(&lim, &lim) == 0);
        srv.echo = true;
        for (unsigned i = 0; i < n; i++) {
                snprintf(auth, sizeof(auth), "10.0.%u.%u:%u", i / 250, i % 250, 1000 + i);
                struct tun *c = open_tunnel(auth);
                REQUIRE(c);
                CHECK_INT_EQ(hbone_stream_write(c->st, (const uint8_t *)"0123456789", 10), 10);
                CHECK_INT_EQ(hbone_stream_shutdown(c->st), 0);
        }
        CHECK_INT_EQ(hbone_session_streams_available(cli.s), 0);
        struct hbone_stream *st;
        CHECK_INT_EQ(hbone_session_open(cli.s, "1.2.3.4:5", NULL, 0, NULL, &st), -EAGAIN);
        CHECK_INT_EQ(pump_pair(), 0);
        CHECK_INT_EQ(srv.nreq, n);
        unsigned ok = 0;
        for (unsigned i = 0; i < n; i++) {
                struct tun *c = &cli.tuns[i];
                if (c->status == 200 && c->rx == 10 && c->eof && c->closed && c->close_code == 0 &&
                    srv.tuns[i].closed && srv.tuns[i].close_code == 0)
                        ok++;
        }
        CHECK_INT_EQ(ok, n);
        CHECK_INT_EQ(hbone_session_open_streams(srv.s), 0);
        CHECK_INT_EQ(hbone_session_open_streams(cli.s), 0);
        CHECK_INT_EQ(hbone_session_streams_available(cli.s), 1000);
        pair_free();
}

static void test_session_keepalive_ping_and_timeout(void)
{
        struct hbone_limits lim;
        uint64_t next = 0, ms = 1000000ULL;
        const uint8_t *d;

        setup_limits(&lim);
        REQUIRE(pair_new(&lim, &lim) == 0);
        CHECK_INT_EQ(pump_pair(), 0);
        CHECK_INT_EQ(hbone_session_tick(cli.s, 1000 * ms, &next), 0);
        CHECK_INT_EQ(next, 11000 * ms);
        CHECK(!hbone_session_want_write(cli.s));
        CHECK_INT_EQ(hbone_session_tick(cli.s, 10999 * ms, &next), 0);
        CHECK(!hbone_session_want_write(cli.s));
        CHECK_INT_EQ(hbone_session_tick(cli.s, 11000 * ms, &next), 0);
        CHECK(hbone_session_want_write(cli.s)); /* the PING */
        CHECK_INT_EQ(next, 31000 * ms);
        /* the peer acks: no timeout */
        CHECK_INT_EQ(pump_pair(), 0);
        CHECK_INT_EQ(hbone_session_tick(cli.s, 11001 * ms, &next), 0);
        CHECK_INT_EQ(next, 21000 * ms);
        CHECK_INT_EQ(hbone_session_tick(cli.s, 40000 * ms, &next), 0);
        CHECK(hbone_session_want_write(cli.s)); /* second PING */
        /* it goes out but the peer never answers */
        CHECK(hbone_session_pull(cli.s, &d) > 0);
        CHECK_INT_EQ(hbone_session_tick(cli.s, 59999 * ms, &next), 0);
        CHECK_INT_EQ(next, 60000 * ms);
        CHECK_INT_EQ(hbone_session_tick(cli.s, 60000 * ms, &next), -ETIMEDOUT);
        CHECK(hbone_session_finished(cli.s));
        CHECK(strstr(hbone_session_error(cli.s), "keepalive") != NULL);
        pair_free();
}

static void test_session_drain_sends_goaway_and_existing_stream_completes(void)
{
        struct hbone_limits lim;
        struct hbone_stream *st;
        struct tun *c, *s;

        setup_limits(&lim);
        REQUIRE(pair_new(&lim, &lim) == 0);
        c = open_tunnel("10.0.0.1:80");
        REQUIRE(c);
        CHECK_INT_EQ(pump_pair(), 0);
        REQUIRE(srv.ntun == 1);
        s = &srv.tuns[0];
        hbone_session_drain(srv.s);
        CHECK_INT_EQ(pump_pair(), 0);
        CHECK_INT_EQ(cli.goaways, 1);
        CHECK_INT_EQ(cli.goaway_code, 0);
        CHECK(hbone_session_goaway_received(cli.s));
        CHECK_INT_EQ(hbone_session_streams_available(cli.s), 0);
        CHECK_INT_EQ(hbone_session_open(cli.s, "10.0.0.1:80", NULL, 0, NULL, &st), -ENOTCONN);
        CHECK(!hbone_session_finished(srv.s));
        CHECK(!hbone_session_finished(cli.s));
        /* the stream is still alive */
        CHECK_INT_EQ(hbone_stream_write(c->st, (const uint8_t *)"ping", 4), 4);
        CHECK_INT_EQ(hbone_stream_shutdown(c->st), 0);
        CHECK_INT_EQ(hbone_stream_write(s->st, (const uint8_t *)"pong", 4), 4);
        CHECK_INT_EQ(hbone_stream_shutdown(s->st), 0);
        CHECK_INT_EQ(pump_pair(), 0);
        CHECK_INT_EQ(s->rx, 4);
        CHECK_INT_EQ(c->rx, 4);
        CHECK(s->closed && c->closed);
        CHECK_INT_EQ(s->close_code, 0);
        CHECK(hbone_session_finished(srv.s));
        CHECK(hbone_session_finished(cli.s));
        CHECK_STR_EQ(hbone_session_error(srv.s), "");
        pair_free();
}

static void test_session_abort_reports_cancel(void)
{
        struct hbone_limits lim;
        struct tun *c;

        setup_limits(&lim);
        REQUIRE(pair_new(&lim, &lim) == 0);
        c = open_tunnel("10.0.0.1:80");
        REQUIRE(c);
        CHECK_INT_EQ(hbone_stream_write(c->st, (const uint8_t *)"abc", 3), 3);
        CHECK_INT_EQ(pump_pair(), 0);
        REQUIRE(srv.ntun == 1);
        srv.s = hbone_session_abort(srv.s);
        CHECK(srv.tuns[0].closed);
        CHECK_INT_EQ(srv.tuns[0].close_code, HBONE_H2_CANCEL);
        cli.s = hbone_session_abort(cli.s);
        CHECK(c->closed);
        CHECK_INT_EQ(c->close_code, HBONE_H2_CANCEL);
        CHECK(hbone_session_abort(NULL) == NULL);
        CHECK(hbone_session_free(NULL) == NULL);
}

/* ---- hbone server <-> raw nghttp2 client ---- */

struct rawfix {
        struct raw raw;
        struct ep re, se;
        int pump_rv;
};

static int raw_setup(struct rawfix *f, const struct hbone_limits *lim)
{
        int r;

        memset(&srv, 0, sizeof(srv));
        srv.accept = 1;
        r = hbone_session_new(&cbs, lim, true, &srv, &srv.s);
        if (r < 0)
                return r;
        raw_init(&f->raw);
        f->re = (struct ep){.raw = &f->raw};
        f->se = (struct ep){.h = srv.s};
        return 0;
}

static void raw_teardown(struct rawfix *f)
{
        raw_done(&f->raw);
        srv.s = hbone_session_free(srv.s);
}

static void test_server_answers_405_to_non_connect(void)
{
        struct hbone_limits lim;
        struct rawfix f;
        nghttp2_nv nva[] = {NV(":method", "GET"), NV(":scheme", "https"), NV(":path", "/"),
                            NV(":authority", "1.2.3.4:80")};

        setup_limits(&lim);
        REQUIRE(raw_setup(&f, &lim) == 0);
        int32_t id = raw_request(&f.raw, nva, 4, true);
        CHECK_INT_EQ(id, 1);
        CHECK_INT_EQ(pump(&f.re, &f.se), 0);
        CHECK_INT_EQ(f.raw.status[0], 405);
        CHECK_INT_EQ(srv.nreq, 0);
        /* what the server advertised */
        nghttp2_session *ng = f.raw.ng;
        CHECK_INT_EQ(nghttp2_session_get_remote_settings(ng, NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS),
                     100);
        CHECK_INT_EQ(nghttp2_session_get_remote_settings(ng, NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE),
                     4 << 20);
        CHECK_INT_EQ(nghttp2_session_get_remote_settings(ng, NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE),
                     16384);
        CHECK_INT_EQ(nghttp2_session_get_remote_settings(ng, NGHTTP2_SETTINGS_ENABLE_CONNECT_PROTOCOL),
                     0);
        CHECK_INT_EQ(nghttp2_session_get_remote_window_size(ng), 16 << 20);
        CHECK_INT_EQ(hbone_session_open_streams(srv.s), 0);
        raw_teardown(&f);
}

static void test_server_resets_connect_with_protocol(void)
{
        struct hbone_limits lim;
        struct rawfix f;
        nghttp2_nv nva[] = {NV(":method", "CONNECT"), NV(":protocol", "websocket"),
                            NV(":scheme", "https"), NV(":path", "/"),
                            NV(":authority", "1.2.3.4:80")};

        setup_limits(&lim);
        REQUIRE(raw_setup(&f, &lim) == 0);
        raw_request(&f.raw, nva, 5, false);
        CHECK_INT_EQ(pump(&f.re, &f.se), 0);
        CHECK_INT_EQ(f.raw.rst[0], HBONE_H2_PROTOCOL_ERROR + 1);
        CHECK_INT_EQ(f.raw.status[0], 0);
        CHECK_INT_EQ(srv.nreq, 0);
        CHECK_INT_EQ(hbone_session_open_streams(srv.s), 0);
        raw_teardown(&f);
}

static void test_server_resets_connect_with_path_or_without_authority(void)
{
        struct hbone_limits lim;
        struct rawfix f;
        nghttp2_nv with_path[] = {NV(":method", "CONNECT"), NV(":path", "/"),
                                  NV(":authority", "1.2.3.4:80")};
        nghttp2_nv with_scheme[] = {NV(":method", "CONNECT"), NV(":scheme", "https"),
                                    NV(":authority", "1.2.3.4:80")};
        nghttp2_nv no_auth[] = {NV(":method", "CONNECT")};

        setup_limits(&lim);
        REQUIRE(raw_setup(&f, &lim) == 0);
        raw_request(&f.raw, with_path, 3, false);
        raw_request(&f.raw, with_scheme, 3, false);
        raw_request(&f.raw, no_auth, 1, false);
        CHECK_INT_EQ(pump(&f.re, &f.se), 0);
        for (int i = 0; i < 3; i++) {
                CHECK_INT_EQ(f.raw.rst[i], HBONE_H2_PROTOCOL_ERROR + 1);
                CHECK_INT_EQ(f.raw.status[i], 0);
        }
        CHECK_INT_EQ(srv.nreq, 0);
        CHECK_INT_EQ(hbone_session_open_streams(srv.s), 0);
        CHECK(!hbone_session_finished(srv.s));
        raw_teardown(&f);
}

static void test_server_answers_400_to_malformed_authority(void)
{
        struct hbone_limits lim;
        struct rawfix f;
        nghttp2_nv noport[] = {NV(":method", "CONNECT"), NV(":authority", "1.2.3.4")};
        nghttp2_nv zero[] = {NV(":method", "CONNECT"), NV(":authority", "1.2.3.4:0")};
        nghttp2_nv v6bare[] = {NV(":method", "CONNECT"), NV(":authority", "fd00::1:80")};
        nghttp2_nv dup[] = {NV(":method", "CONNECT"), NV(":authority", "1.2.3.4:80"),
                            NV("baggage", "a=1"), NV("baggage", "a=2")};

        setup_limits(&lim);
        REQUIRE(raw_setup(&f, &lim) == 0);
        raw_request(&f.raw, noport, 2, false);
        raw_request(&f.raw, zero, 2, false);
        raw_request(&f.raw, v6bare, 2, false);
        raw_request(&f.raw, dup, 4, false);
        CHECK_INT_EQ(pump(&f.re, &f.se), 0);
        for (int i = 0; i < 4; i++) {
                CHECK_INT_EQ(f.raw.status[i], 400);
                /* the client had not half-closed: RST_STREAM(NO_ERROR) follows */
                CHECK_INT_EQ(f.raw.rst[i], HBONE_H2_NO_ERROR + 1);
        }
        CHECK_INT_EQ(srv.nreq, 0);
        CHECK_INT_EQ(hbone_session_open_streams(srv.s), 0);
        raw_teardown(&f);
}

static void test_server_refuses_streams_beyond_max_concurrent(void)
{
        struct hbone_limits lim;
        struct rawfix f;
        nghttp2_nv nva[] = {NV(":method", "CONNECT"), NV(":authority", "1.2.3.4:80")};

        setup_limits(&lim);
        lim.max_concurrent_streams = 3;
        REQUIRE(raw_setup(&f, &lim) == 0);
        srv.accept = 0; /* keep them pending */
        for (int i = 0; i < 5; i++)
                raw_request(&f.raw, nva, 2, false);
        CHECK_INT_EQ(pump(&f.re, &f.se), 0);
        CHECK_INT_EQ(srv.nreq, 3);
        CHECK_INT_EQ(hbone_session_open_streams(srv.s), 3);
        for (int i = 0; i < 3; i++)
                CHECK_INT_EQ(f.raw.rst[i], 0);
        CHECK_INT_EQ(f.raw.rst[3], HBONE_H2_REFUSED_STREAM + 1);
        CHECK_INT_EQ(f.raw.rst[4], HBONE_H2_REFUSED_STREAM + 1);
        /* answering later works */
        CHECK_INT_EQ(hbone_stream_respond(srv.tuns[0].st, 200, NULL, 0), 0);
        CHECK_INT_EQ(hbone_stream_respond(srv.tuns[0].st, 200, NULL, 0), -EINVAL);
        CHECK_INT_EQ(pump(&f.re, &f.se), 0);
        CHECK_INT_EQ(f.raw.status[0], 200);
        raw_teardown(&f);
}

static void test_server_answers_431_to_oversized_header_list(void)
{
        struct hbone_limits lim;
        struct rawfix f;
        static char big[20000];

        memset(big, 'b', sizeof(big) - 1);
        nghttp2_nv nva[] = {NV(":method", "CONNECT"), NV(":authority", "1.2.3.4:80"),
                            {(uint8_t *)"x-big", (uint8_t *)big, 5, sizeof(big) - 1,
                             NGHTTP2_NV_FLAG_NO_INDEX}};

        setup_limits(&lim);
        REQUIRE(raw_setup(&f, &lim) == 0);
        raw_request(&f.raw, nva, 3, false);
        CHECK_INT_EQ(pump(&f.re, &f.se), 0);
        CHECK_INT_EQ(f.raw.status[0], 431);
        CHECK_INT_EQ(srv.nreq, 0);
        CHECK_INT_EQ(hbone_session_open_streams(srv.s), 0);
        raw_teardown(&f);
}

static ssize_t never_read(nghttp2_session *ng, int32_t id, uint8_t *buf, size_t len,
                          uint32_t *flags, nghttp2_data_source *src, void *ud)
{
        size_t n = len < 100 ? len : 100;

        memset(buf, 'd', n);
        return (ssize_t)n;
}

static void test_server_resets_data_before_response(void)
{
        struct hbone_limits lim;
        struct rawfix f;
        nghttp2_nv nva[] = {NV(":method", "CONNECT"), NV(":authority", "1.2.3.4:80")};
        nghttp2_data_provider prd = {.read_callback = never_read};

        setup_limits(&lim);
        REQUIRE(raw_setup(&f, &lim) == 0);
        srv.accept = 0;
        CHECK_INT_EQ(nghttp2_submit_request(f.raw.ng, NULL, nva, 2, &prd, NULL), 1);
        CHECK_INT_EQ(pump(&f.re, &f.se), 0);
        CHECK_INT_EQ(srv.nreq, 1);
        REQUIRE(srv.ntun == 1);
        CHECK(srv.tuns[0].closed);
        CHECK_INT_EQ(srv.tuns[0].close_code, HBONE_H2_PROTOCOL_ERROR);
        CHECK_INT_EQ(srv.tuns[0].rx, 0);
        CHECK_INT_EQ(f.raw.rst[0], HBONE_H2_PROTOCOL_ERROR + 1);
        CHECK_INT_EQ(hbone_session_open_streams(srv.s), 0);
        raw_teardown(&f);
}

static void test_server_goaways_on_rst_flood(void)
{
        struct hbone_limits lim;
        struct rawfix f;
        nghttp2_nv nva[] = {NV(":method", "CONNECT"), NV(":authority", "1.2.3.4:80")};
        uint8_t *wire = NULL;
        size_t wlen = 0;
        const uint8_t *d;
        ssize_t n, r = 0;

        setup_limits(&lim);
        REQUIRE(raw_setup(&f, &lim) == 0);
        srv.accept = 0;
        /* HEADERS then RST_STREAM, 150 times, as CVE-2023-44487 does */
        for (int i = 0; i < 150; i++) {
                int32_t id = raw_request(&f.raw, nva, 2, false);
                for (int k = 0; k < 2; k++) {
                        while ((n = nghttp2_session_mem_send(f.raw.ng, &d)) > 0) {
                                wire = realloc(wire, wlen + (size_t)n);
                                memcpy(wire + wlen, d, (size_t)n);
                                wlen += (size_t)n;
                        }
                        if (k == 0)
                                nghttp2_submit_rst_stream(f.raw.ng, NGHTTP2_FLAG_NONE, id,
                                                          NGHTTP2_CANCEL);
                }
        }
        r = ep_feed(&f.se, wire, wlen);
        free(wire);
        CHECK_INT_EQ(r, -EPROTO);
        CHECK(hbone_session_finished(srv.s));
        CHECK(strstr(hbone_session_error(srv.s), "rst flood") != NULL);
        CHECK_INT_EQ(hbone_session_feed(srv.s, (const uint8_t *)"x", 1), -EPROTO);
        /* the GOAWAY reaches the peer */
        while ((n = hbone_session_pull(srv.s, &d)) > 0)
                nghttp2_session_mem_recv(f.raw.ng, d, (size_t)n);
        CHECK(f.raw.goaway);
        CHECK_INT_EQ(f.raw.goaway_code, HBONE_H2_ENHANCE_YOUR_CALM);
        CHECK(srv.nreq >= 100 && srv.nreq <= 102);
        raw_teardown(&f);
}

static void test_server_rejects_garbage_preface(void)
{
        struct hbone_limits lim;
        struct rawfix f;
        const char *junk = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        const uint8_t *d;
        ssize_t n;
        struct raw r2;
        bool goaway = false;

        setup_limits(&lim);
        REQUIRE(raw_setup(&f, &lim) == 0);
        CHECK_INT_EQ(ep_feed(&f.se, (const uint8_t *)junk, strlen(junk)), -EPROTO);
        CHECK(hbone_session_finished(srv.s));
        CHECK(hbone_session_error(srv.s)[0] != 0);
        /* decode what the server sends with a fresh client: SETTINGS then GOAWAY */
        raw_init(&r2);
        const uint8_t *pre;
        while (nghttp2_session_mem_send(r2.ng, &pre) > 0)
                ;
        while ((n = hbone_session_pull(srv.s, &d)) > 0)
                nghttp2_session_mem_recv(r2.ng, d, (size_t)n);
        goaway = r2.goaway;
        CHECK(goaway);
        CHECK_INT_EQ(r2.goaway_code, HBONE_H2_PROTOCOL_ERROR);
        raw_done(&r2);
        raw_teardown(&f);
}

/* ---- failalloc ---- */

static int fa_session_new(void *arg)
{
        struct hbone_limits lim;
        struct hbone_session *s = NULL;
        int r;

        hbone_limits_default(&lim);
        r = hbone_session_new(&cbs, &lim, arg != NULL, &srv, &s);
        if (r < 0)
                return r;
        hbone_session_free(s);
        return 0;
}

static void test_session_new_survives_failalloc(void)
{
        CHECK(check_failalloc_run(fa_session_new, (void *)1) > 2);
        CHECK(check_failalloc_run(fa_session_new, NULL) > 2);
}

static int fa_exchange(void *arg)
{
        struct hbone_limits lim;
        struct tun *c;
        int r;

        hbone_limits_default(&lim);
        r = pair_new(&lim, &lim);
        if (r < 0)
                return r;
        r = -ENOMEM;
        c = open_tunnel("10.0.0.1:80");
        if (!c)
                goto out;
        if (hbone_stream_write(c->st, (const uint8_t *)"hello", 5) != 5)
                goto out;
        if (hbone_stream_shutdown(c->st) < 0)
                goto out;
        srv.echo = true;
        r = pump_pair();
        if (r < 0)
                goto out;
        if (!(c->closed && c->rx == 5 && c->close_code == 0)) {
                r = -EIO;
                goto out;
        }
        r = 0;
out:
        pair_free();
        return r;
}

static void test_session_exchange_survives_failalloc(void)
{
        bool save = bytewise;

        bytewise = false;
        failalloc_mode = true;
        CHECK(check_failalloc_run(fa_exchange, NULL) > 5);
        failalloc_mode = false;
        bytewise = save;
}

static void run_all(void)
{
        RUN(test_session_tunnel_data_halfclose_and_clean_close);
        RUN(test_session_server_halfclose_first);
        RUN(test_session_reset_by_client_and_by_server);
        RUN(test_session_refused_request_gets_503_and_closes);
        RUN(test_session_client_rejects_bad_open_arguments);
        RUN(test_session_flow_control_bounds_inflight_and_resumes_on_consume);
        RUN(test_session_thousand_streams_echo);
        RUN(test_session_keepalive_ping_and_timeout);
        RUN(test_session_drain_sends_goaway_and_existing_stream_completes);
        RUN(test_session_abort_reports_cancel);
        RUN(test_server_answers_405_to_non_connect);
        RUN(test_server_resets_connect_with_protocol);
        RUN(test_server_resets_connect_with_path_or_without_authority);
        RUN(test_server_answers_400_to_malformed_authority);
        RUN(test_server_refuses_streams_beyond_max_concurrent);
        RUN(test_server_answers_431_to_oversized_header_list);
        RUN(test_server_resets_data_before_response);
        RUN(test_server_goaways_on_rst_flood);
        RUN(test_server_rejects_garbage_preface);
}

int main(void)
{
        bytewise = false;
        run_all();
        fprintf(stderr, "-- again, one byte at a time\n");
        bytewise = true;
        run_all();
        RUN(test_session_new_survives_failalloc);
        RUN(test_session_exchange_survives_failalloc);
        return check_exit();
}
