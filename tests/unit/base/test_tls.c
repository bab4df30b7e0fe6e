/*
 * Tests for waypoint/base/tls.c. Two endpoints are pumped against each other purely in memory:
 * wp_tls on both sides, or wp_tls against a raw OpenSSL peer for behaviour wp_tls cannot produce
 * (TLS 1.2 only, other ALPN). The PKI comes from tests/tools/mkpki.py.
 */
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

#include "check.h"
#include "waypoint/base/alloc.h"
#include "waypoint/base/tls.h"
#include "waypoint/base/x509.h"

#define TD           "cluster.local"
#define CLIENT_URI   "spiffe://cluster.local/ns/default/sa/sleep"
#define WAYPOINT_URI "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-waypoint"

static const char *pki_dir;

static void pki_setup(void)
{
        pki_dir = check_pki_dir("tls");
}

static void pki_teardown(void)
{
        check_pki_cleanup();
}

/* Returns the PEM text of <pki>/<name><ext> (wp_free it); exits 99 when missing. */
static char *pki_read(const char *name, const char *ext)
{
        char path[512], *data;

        snprintf(path, sizeof(path), "%s/%s%s", pki_dir, name, ext);
        if (wp_read_file(path, 1 << 20, &data, NULL) < 0) {
                fprintf(stderr, "cannot read %s\n", path);
                exit(99);
        }
        return data;
}

/* Builds a context from PKI names: cert NULL = no client certificate. */
static struct wp_tls_ctx *make_ctx(bool server, const char *cert, const char *root, const char *td)
{
        struct wp_tls_ctx_config cfg = {0};
        struct wp_tls_ctx *ctx = NULL;
        char *chain = cert ? pki_read(cert, ".pem") : NULL;
        char *key = cert ? pki_read(cert, ".key") : NULL;
        char *roots = pki_read(root, ".pem");
        const char *desc = NULL;
        int r;

        cfg.server = server;
        cfg.cert_chain_pem = chain;
        cfg.key_pem = key;
        cfg.root_pem = roots;
        cfg.trust_domain = td;
        cfg.require_peer_cert = true;
        r = wp_tls_ctx_new(&cfg, &ctx, &desc);
        if (r < 0)
                fprintf(stderr, "wp_tls_ctx_new(%s): %d %s\n", cert ? cert : "-", r,
                        desc ? desc : "");
        wp_free(chain);
        wp_free(key);
        wp_free(roots);
        return ctx;
}

/* One side of a pumped connection: a wp_tls, or a raw OpenSSL SSL with memory BIOs. */
struct ep {
        struct wp_tls *t;
        SSL *raw;
        BIO *rin, *rout;
        int hs; /* last handshake result */
};

static int ep_handshake(struct ep *e)
{
        int r;

        if (e->t)
                return wp_tls_handshake(e->t);
        r = SSL_do_handshake(e->raw);
        if (r == 1)
                return 0;
        r = SSL_get_error(e->raw, r);
        ERR_clear_error();
        return r == SSL_ERROR_WANT_READ ? -EAGAIN : -EPROTO;
}

static size_t ep_output(struct ep *e, uint8_t *buf, size_t cap)
{
        int n;

        if (e->t)
                return wp_tls_output(e->t, buf, cap);
        n = BIO_read(e->rout, buf, (int)cap);
        return n > 0 ? (size_t)n : 0;
}

static void ep_feed(struct ep *e, const uint8_t *buf, size_t n)
{
        if (e->t) {
                CHECK_INT_EQ(wp_tls_feed(e->t, buf, n), n);
                return;
        }
        CHECK_INT_EQ(BIO_write(e->rin, buf, (int)n), n);
}

/* Moves up to step bytes from a's output into b. Returns bytes moved. */
static size_t transfer(struct ep *a, struct ep *b, size_t step)
{
        uint8_t buf[65536];
        size_t n = ep_output(a, buf, step < sizeof(buf) ? step : sizeof(buf));

        if (n)
                ep_feed(b, buf, n);
        return n;
}

/* Runs both handshakes to completion or failure, moving at most step bytes per direction per
 * round. Keeps delivering after a failure so the other side sees the alert. */
static void pump_handshake(struct ep *c, struct ep *s, size_t step)
{
        int rounds;

        c->hs = s->hs = -EAGAIN;
        for (rounds = 0; rounds < 1000000; rounds++) {
                size_t moved;

                if (c->hs == -EAGAIN)
                        c->hs = ep_handshake(c);
                if (s->hs == -EAGAIN)
                        s->hs = ep_handshake(s);
                moved = transfer(c, s, step) + transfer(s, c, step);
                if (!moved && (c->hs != -EAGAIN || s->hs != -EAGAIN)) {
                        /* One side is finished; give the other one last chance with what it
                         * has been fed (e.g. the alert). */
                        if (c->hs == -EAGAIN)
                                c->hs = ep_handshake(c);
                        if (s->hs == -EAGAIN)
                                s->hs = ep_handshake(s);
                        if (!transfer(c, s, step) && !transfer(s, c, step))
                                break;
                }
                if (!moved && c->hs == -EAGAIN && s->hs == -EAGAIN)
                        break; /* stuck */
        }
}

static void ep_new_wp(struct ep *e, struct wp_tls_ctx *ctx)
{
        memset(e, 0, sizeof(*e));
        if (ctx)
                CHECK_INT_EQ(wp_tls_new(ctx, &e->t), 0);
}

static void ep_done(struct ep *e)
{
        e->t = wp_tls_free(e->t);
        SSL_free(e->raw); /* frees its BIOs */
        e->raw = NULL;
}

/* A raw OpenSSL client: TLS max version, ALPN list (wire format, may be NULL), cert name. */
static SSL_CTX *raw_client_ctx(int max_version, const unsigned char *alpn, size_t alpn_len,
                               const char *cert)
{
        SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
        char path[512];

        if (!ctx)
                return NULL;
        SSL_CTX_set_max_proto_version(ctx, max_version);
        if (alpn)
                SSL_CTX_set_alpn_protos(ctx, alpn, (unsigned)alpn_len);
        if (cert) {
                snprintf(path, sizeof(path), "%s/%s.pem", pki_dir, cert);
                SSL_CTX_use_certificate_chain_file(ctx, path);
                snprintf(path, sizeof(path), "%s/%s.key", pki_dir, cert);
                SSL_CTX_use_PrivateKey_file(ctx, path, SSL_FILETYPE_PEM);
        }
        SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
        return ctx;
}

static void ep_new_raw(struct ep *e, SSL_CTX *ctx, bool server)
{
        memset(e, 0, sizeof(*e));
        e->raw = SSL_new(ctx);
        e->rin = BIO_new(BIO_s_mem());
        e->rout = BIO_new(BIO_s_mem());
        BIO_set_mem_eof_return(e->rin, -1);
        BIO_set_mem_eof_return(e->rout, -1);
        SSL_set_bio(e->raw, e->rin, e->rout);
        if (server)
                SSL_set_accept_state(e->raw);
        else
                SSL_set_connect_state(e->raw);
}

static struct wp_tls_ctx *server_ctx, *client_ctx;

static void test_handshake_verifies_both_identities(void)
{
        struct ep c, s;

        ep_new_wp(&c, client_ctx);
        ep_new_wp(&s, server_ctx);
        REQUIRE(c.t && s.t);
        CHECK(!wp_tls_handshake_done(c.t));
        CHECK(wp_tls_peer_uri(s.t) == NULL);
        pump_handshake(&c, &s, 65536);
        CHECK_INT_EQ(c.hs, 0);
        CHECK_INT_EQ(s.hs, 0);
        CHECK(wp_tls_handshake_done(c.t));
        CHECK(wp_tls_handshake_done(s.t));
        CHECK_STR_EQ(wp_tls_peer_uri(s.t), CLIENT_URI);
        CHECK_STR_EQ(wp_tls_peer_uri(c.t), WAYPOINT_URI);
        CHECK_STR_EQ(wp_tls_alpn(s.t), "h2");
        CHECK_STR_EQ(wp_tls_alpn(c.t), "h2");
        CHECK_STR_EQ(wp_tls_version(s.t), "TLSv1.3");
        CHECK(wp_tls_error(s.t) == NULL);
        CHECK_INT_EQ(wp_tls_handshake(s.t), 0); /* idempotent */
        CHECK_INT_EQ(ERR_peek_error(), 0);
        ep_done(&c);
        ep_done(&s);
}

static void test_handshake_one_byte_at_a_time(void)
{
        struct ep c, s;

        ep_new_wp(&c, client_ctx);
        ep_new_wp(&s, server_ctx);
        REQUIRE(c.t && s.t);
        pump_handshake(&c, &s, 1);
        CHECK_INT_EQ(c.hs, 0);
        CHECK_INT_EQ(s.hs, 0);
        CHECK_STR_EQ(wp_tls_peer_uri(s.t), CLIENT_URI);
        CHECK_STR_EQ(wp_tls_peer_uri(c.t), WAYPOINT_URI);
        ep_done(&c);
        ep_done(&s);
}

static void test_handshake_sends_intermediates(void)
{
        /* Both leaves are issued by the intermediate; only root.pem is trusted, so this works
         * only if each side sends its intermediate. */
        struct wp_tls_ctx *sc = make_ctx(true, "chained-waypoint", "root", TD);
        struct wp_tls_ctx *cc = make_ctx(false, "chained-client", "root", TD);
        struct ep c, s;

        REQUIRE(sc && cc);
        ep_new_wp(&c, cc);
        ep_new_wp(&s, sc);
        pump_handshake(&c, &s, 65536);
        CHECK_INT_EQ(c.hs, 0);
        CHECK_INT_EQ(s.hs, 0);
        CHECK_STR_EQ(wp_tls_peer_uri(s.t), CLIENT_URI);
        CHECK_STR_EQ(wp_tls_peer_uri(c.t), WAYPOINT_URI);
        ep_done(&c);
        ep_done(&s);
        wp_tls_ctx_unref(sc);
        wp_tls_ctx_unref(cc);
}

/* Writes n bytes on a, moves everything to b, reads it all back and compares. */
static void send_and_check(struct ep *a, struct ep *b, size_t n)
{
        uint8_t *in = malloc(n), *out = malloc(n + 1);
        size_t got = 0;
        ssize_t r;

        REQUIRE(in && out);
        for (size_t i = 0; i < n; i++)
                in[i] = (uint8_t)(i * 131 + (i >> 8));
        CHECK_INT_EQ(wp_tls_write(a->t, in, n), n);
        CHECK(wp_tls_output_pending(a->t) > n); /* records add overhead */
        while (transfer(a, b, 65536))
                ;
        CHECK_INT_EQ(wp_tls_output_pending(a->t), 0);
        while ((r = wp_tls_read(b->t, out + got, n + 1 - got)) > 0)
                got += (size_t)r;
        CHECK_INT_EQ(r, -EAGAIN);
        CHECK_INT_EQ(got, n);
        CHECK(memcmp(in, out, n) == 0);
        free(in);
        free(out);
}

static void test_data_flows_both_ways(void)
{
        struct ep c, s;
        uint8_t buf[16];

        ep_new_wp(&c, client_ctx);
        ep_new_wp(&s, server_ctx);
        REQUIRE(c.t && s.t);
        pump_handshake(&c, &s, 65536);
        REQUIRE(c.hs == 0 && s.hs == 0);
        /* Nothing buffered yet: -EAGAIN, not 0. */
        CHECK_INT_EQ(wp_tls_read(s.t, buf, sizeof(buf)), -EAGAIN);
        send_and_check(&c, &s, 1);
        send_and_check(&s, &c, 100);
        send_and_check(&c, &s, 1 << 20);
        send_and_check(&s, &c, 1 << 20);
        CHECK_INT_EQ(wp_tls_write(c.t, buf, 0), 0);
        CHECK_INT_EQ(ERR_peek_error(), 0);
        ep_done(&c);
        ep_done(&s);
}

static void test_partial_record_reads_eagain(void)
{
        struct ep c, s;
        uint8_t rec[256], out[64];
        size_t n;

        ep_new_wp(&c, client_ctx);
        ep_new_wp(&s, server_ctx);
        REQUIRE(c.t && s.t);
        pump_handshake(&c, &s, 65536);
        REQUIRE(c.hs == 0 && s.hs == 0);
        CHECK_INT_EQ(wp_tls_write(c.t, (const uint8_t *)"hello", 5), 5);
        n = wp_tls_output(c.t, rec, sizeof(rec));
        REQUIRE(n > 5 && n < sizeof(rec));
        /* All but the last byte of the record: nothing readable yet. */
        for (size_t i = 0; i + 1 < n; i++) {
                wp_tls_feed(s.t, rec + i, 1);
                CHECK_INT_EQ(wp_tls_read(s.t, out, sizeof(out)), -EAGAIN);
        }
        wp_tls_feed(s.t, rec + n - 1, 1);
        CHECK_INT_EQ(wp_tls_read(s.t, out, sizeof(out)), 5);
        CHECK(memcmp(out, "hello", 5) == 0);
        ep_done(&c);
        ep_done(&s);
}

static void test_close_notify_reads_zero(void)
{
        struct ep c, s;
        uint8_t buf[16];

        ep_new_wp(&c, client_ctx);
        ep_new_wp(&s, server_ctx);
        REQUIRE(c.t && s.t);
        pump_handshake(&c, &s, 65536);
        REQUIRE(c.hs == 0 && s.hs == 0);
        CHECK_INT_EQ(wp_tls_write(c.t, (const uint8_t *)"bye", 3), 3);
        wp_tls_shutdown(c.t);
        while (transfer(&c, &s, 65536))
                ;
        CHECK_INT_EQ(wp_tls_read(s.t, buf, sizeof(buf)), 3);
        CHECK_INT_EQ(wp_tls_read(s.t, buf, sizeof(buf)), 0);
        CHECK_INT_EQ(wp_tls_read(s.t, buf, sizeof(buf)), 0);
        /* The server answers with its own close_notify. */
        wp_tls_shutdown(s.t);
        while (transfer(&s, &c, 65536))
                ;
        CHECK_INT_EQ(wp_tls_read(c.t, buf, sizeof(buf)), 0);
        CHECK_INT_EQ(ERR_peek_error(), 0);
        ep_done(&c);
        ep_done(&s);
}

/* Asserts that the server rejected the client with -EPROTO and err containing want, and that
 * the client ends with -EPROTO too (during the handshake, or on the first read when TLS 1.3
 * finished the client's side before the server judged the client certificate). */
static void expect_server_rejects(struct ep *c, struct ep *s, const char *want)
{
        CHECK_INT_EQ(s->hs, -EPROTO);
        if (s->t) {
                const char *err = wp_tls_error(s->t);

                fprintf(stderr, "  server error: %s\n", err ? err : "(null)");

                CHECK(err && strstr(err, want));
                if (!err || !strstr(err, want))
                        fprintf(stderr, "  server error: \"%s\", want \"%s\"\n",
                                err ? err : "(null)", want);
                CHECK(wp_tls_peer_uri(s->t) == NULL);
                CHECK(!wp_tls_handshake_done(s->t));
                CHECK_INT_EQ(wp_tls_handshake(s->t), -EPROTO); /* sticky */
        }
        if (c->t) {
                uint8_t buf[16];

                if (c->hs == 0)
                        CHECK_INT_EQ(wp_tls_read(c->t, buf, sizeof(buf)), -EPROTO);
                else
                        CHECK_INT_EQ(c->hs, -EPROTO);
                CHECK(wp_tls_error(c->t) && strstr(wp_tls_error(c->t), "alert"));
                fprintf(stderr, "  client error: %s\n",
                        wp_tls_error(c->t) ? wp_tls_error(c->t) : "(null)");
        } else {
                CHECK_INT_EQ(c->hs == 0 ? -EPROTO : c->hs, -EPROTO);
        }
        CHECK_INT_EQ(ERR_peek_error(), 0);
}

static void run_bad_client_step(const char *cert, const char *root, const char *want, size_t step)
{
        struct wp_tls_ctx *cc = make_ctx(false, cert, root, TD);
        struct ep c, s;

        REQUIRE(cc);
        ep_new_wp(&c, cc);
        ep_new_wp(&s, server_ctx);
        pump_handshake(&c, &s, step);
        expect_server_rejects(&c, &s, want);
        ep_done(&c);
        ep_done(&s);
        wp_tls_ctx_unref(cc);
}

static void run_bad_client(const char *cert, const char *root, const char *want)
{
        run_bad_client_step(cert, root, want, 65536);
}

static void test_server_rejects_other_trust_domain_one_byte_at_a_time(void)
{
        run_bad_client_step("other-td-client", "root", "not in trust domain cluster.local", 1);
}

static void test_server_rejects_missing_client_cert(void)
{
        run_bad_client(NULL, "root", "peer did not return a certificate");
}

static void test_server_rejects_client_from_other_root(void)
{
        run_bad_client("foreign-client", "root",
                       "certificate verify failed: unable to get local issuer certificate");
}

static void test_server_rejects_other_trust_domain(void)
{
        run_bad_client("other-td-client", "root",
                       "peer identity spiffe://evil.example/ns/default/sa/sleep not in trust "
                       "domain cluster.local");
}

static void test_server_rejects_expired_client(void)
{
        run_bad_client("expired-client", "root",
                       "certificate verify failed: certificate has expired");
}

static void test_server_rejects_client_without_uri_san(void)
{
        run_bad_client("no-san-client", "root", "no URI SAN");
}

static void test_server_rejects_client_with_two_uri_sans(void)
{
        run_bad_client("two-uri-client", "root", "more than one URI SAN");
}

static void test_server_rejects_client_with_bad_spiffe_id(void)
{
        run_bad_client("bad-spiffe-client", "root", "not a valid SPIFFE identity");
}

static void test_client_rejects_server_in_other_trust_domain(void)
{
        struct wp_tls_ctx *sc = make_ctx(true, "other-td-client", "root", TD);
        struct ep c, s;

        REQUIRE(sc);
        ep_new_wp(&c, client_ctx);
        ep_new_wp(&s, sc);
        pump_handshake(&c, &s, 65536);
        CHECK_INT_EQ(c.hs, -EPROTO);
        CHECK(wp_tls_error(c.t) && strstr(wp_tls_error(c.t), "not in trust domain cluster.local"));
        CHECK_INT_EQ(s.hs, -EPROTO);
        CHECK(wp_tls_error(s.t) && strstr(wp_tls_error(s.t), "alert"));
        CHECK_INT_EQ(ERR_peek_error(), 0);
        ep_done(&c);
        ep_done(&s);
        wp_tls_ctx_unref(sc);
}

static void test_client_rejects_server_from_other_root(void)
{
        struct wp_tls_ctx *sc = make_ctx(true, "foreign-client", "root", TD);
        struct ep c, s;

        REQUIRE(sc);
        ep_new_wp(&c, client_ctx);
        ep_new_wp(&s, sc);
        pump_handshake(&c, &s, 65536);
        CHECK_INT_EQ(c.hs, -EPROTO);
        CHECK(wp_tls_error(c.t) &&
              strstr(wp_tls_error(c.t), "certificate verify failed: unable to get local issuer"));
        CHECK_INT_EQ(s.hs, -EPROTO);
        ep_done(&c);
        ep_done(&s);
        wp_tls_ctx_unref(sc);
}

static void test_trust_domain_null_accepts_any_domain(void)
{
        struct wp_tls_ctx *sc = make_ctx(true, "waypoint", "root", NULL);
        struct wp_tls_ctx *cc = make_ctx(false, "other-td-client", "root", NULL);
        struct ep c, s;

        REQUIRE(sc && cc);
        ep_new_wp(&c, cc);
        ep_new_wp(&s, sc);
        pump_handshake(&c, &s, 65536);
        CHECK_INT_EQ(c.hs, 0);
        CHECK_INT_EQ(s.hs, 0);
        CHECK_STR_EQ(wp_tls_peer_uri(s.t), "spiffe://evil.example/ns/default/sa/sleep");
        ep_done(&c);
        ep_done(&s);
        wp_tls_ctx_unref(sc);
        wp_tls_ctx_unref(cc);
}

static void run_raw_client(int max_version, const unsigned char *alpn, size_t alpn_len,
                           const char *want)
{
        SSL_CTX *rc = raw_client_ctx(max_version, alpn, alpn_len, "client");
        struct ep c, s;

        REQUIRE(rc);
        ep_new_raw(&c, rc, false);
        ep_new_wp(&s, server_ctx);
        pump_handshake(&c, &s, 65536);
        expect_server_rejects(&c, &s, want);
        ep_done(&c);
        ep_done(&s);
        SSL_CTX_free(rc);
}

static void test_server_rejects_tls12_client(void)
{
        static const unsigned char h2[] = "\x02h2";

        run_raw_client(TLS1_2_VERSION, h2, 3, "unsupported protocol");
}

static void test_server_rejects_http11_alpn(void)
{
        static const unsigned char h11[] = "\x08http/1.1";

        run_raw_client(TLS1_3_VERSION, h11, 9, "no application protocol");
}

static void test_server_rejects_missing_alpn(void)
{
        run_raw_client(TLS1_3_VERSION, NULL, 0, "no application protocol");
}

static void test_server_accepts_h2_among_other_alpn(void)
{
        static const unsigned char list[] = "\x08http/1.1\x02h2";
        SSL_CTX *rc = raw_client_ctx(TLS1_3_VERSION, list, 12, "client");
        struct ep c, s;

        REQUIRE(rc);
        ep_new_raw(&c, rc, false);
        ep_new_wp(&s, server_ctx);
        pump_handshake(&c, &s, 65536);
        CHECK_INT_EQ(c.hs, 0);
        CHECK_INT_EQ(s.hs, 0);
        CHECK_STR_EQ(wp_tls_alpn(s.t), "h2");
        ep_done(&c);
        ep_done(&s);
        SSL_CTX_free(rc);
}

static void test_client_rejects_server_without_alpn(void)
{
        /* A raw TLS 1.3 server that ignores ALPN entirely. */
        SSL_CTX *rs = SSL_CTX_new(TLS_server_method());
        char path[512];
        struct ep c, s;

        REQUIRE(rs);
        snprintf(path, sizeof(path), "%s/waypoint.pem", pki_dir);
        CHECK(SSL_CTX_use_certificate_chain_file(rs, path) == 1);
        snprintf(path, sizeof(path), "%s/waypoint.key", pki_dir);
        CHECK(SSL_CTX_use_PrivateKey_file(rs, path, SSL_FILETYPE_PEM) == 1);
        ep_new_wp(&c, client_ctx);
        ep_new_raw(&s, rs, true);
        pump_handshake(&c, &s, 65536);
        CHECK_INT_EQ(c.hs, -EPROTO);
        CHECK(wp_tls_error(c.t) && strstr(wp_tls_error(c.t), "server did not select ALPN h2"));
        CHECK(wp_tls_alpn(c.t) == NULL);
        CHECK(wp_tls_peer_uri(c.t) == NULL);
        CHECK_INT_EQ(ERR_peek_error(), 0);
        ep_done(&c);
        ep_done(&s);
        SSL_CTX_free(rs);
}

static void test_server_rejects_garbage(void)
{
        static const char *inputs[] = {
            "GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            "\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00", /* truncated ClientHello body */
            "\x16\x03\x01\xff\xff",                     /* record length too long */
            "\x17\x03\x03\x00\x10xxxxxxxxxxxxxxxx",     /* app data before handshake */
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        };

        for (size_t i = 0; i < sizeof(inputs) / sizeof(inputs[0]); i++) {
                struct wp_tls *t = NULL;
                uint8_t buf[64];
                size_t len = strlen(inputs[i]);
                int r;

                if (i == 1)
                        len = 10;
                REQUIRE(wp_tls_new(server_ctx, &t) == 0);
                CHECK_INT_EQ(wp_tls_feed(t, (const uint8_t *)inputs[i], len), len);
                r = wp_tls_handshake(t);
                if (r == -EAGAIN) {
                        /* A prefix that could still be valid; garbage must follow. */
                        CHECK_INT_EQ(wp_tls_feed(t, (const uint8_t *)"\x00\x00\x00\x00", 4), 4);
                        r = wp_tls_handshake(t);
                }
                if (r != -EPROTO)
                        fprintf(stderr, "  input %zu: %d\n", i, r);
                CHECK_INT_EQ(r, -EPROTO);
                CHECK(wp_tls_error(t) != NULL && wp_tls_error(t)[0]);
                CHECK_INT_EQ(wp_tls_read(t, buf, sizeof(buf)), -EPROTO);
                CHECK_INT_EQ(wp_tls_write(t, buf, 1), -EPROTO);
                CHECK_INT_EQ(ERR_peek_error(), 0);
                t = wp_tls_free(t);
        }
}

static void test_write_before_handshake_fails(void)
{
        struct wp_tls *t = NULL;

        REQUIRE(wp_tls_new(client_ctx, &t) == 0);
        CHECK_INT_EQ(wp_tls_write(t, (const uint8_t *)"x", 1), -EPROTO);
        CHECK(wp_tls_error(t) != NULL);
        wp_tls_free(t);
}

static void test_client_output_starts_with_client_hello(void)
{
        struct wp_tls *t = NULL;
        uint8_t buf[4096];
        size_t n;

        REQUIRE(wp_tls_new(client_ctx, &t) == 0);
        CHECK_INT_EQ(wp_tls_output_pending(t), 0);
        CHECK_INT_EQ(wp_tls_handshake(t), -EAGAIN);
        n = wp_tls_output_pending(t);
        CHECK(n > 5);
        CHECK_INT_EQ(wp_tls_output(t, buf, 1), 1);
        CHECK_INT_EQ(buf[0], 0x16); /* handshake record */
        CHECK_INT_EQ(wp_tls_output_pending(t), n - 1);
        CHECK_INT_EQ(wp_tls_output(t, buf, sizeof(buf)), n - 1);
        CHECK_INT_EQ(wp_tls_output(t, buf, sizeof(buf)), 0);
        wp_tls_free(t);
}

static void test_ctx_reports_own_identity(void)
{
        int64_t now = (int64_t)time(NULL);
        int64_t na = wp_tls_ctx_own_not_after(server_ctx);

        CHECK_STR_EQ(wp_tls_ctx_own_uri(server_ctx), WAYPOINT_URI);
        CHECK_STR_EQ(wp_tls_ctx_own_uri(client_ctx), CLIENT_URI);
        /* mkpki issues leaves for one year. */
        CHECK(na > now + 360 * 86400LL && na < now + 370 * 86400LL);
}

static void test_ctx_new_rejects_bad_config(void)
{
        struct wp_tls_ctx_config cfg = {0};
        struct wp_tls_ctx *ctx = NULL;
        char *chain = pki_read("client", ".pem"), *key = pki_read("client", ".key");
        char *wkey = pki_read("waypoint", ".key"), *root = pki_read("root", ".pem");
        const char *desc = NULL;

        cfg.server = true;
        cfg.cert_chain_pem = chain;
        cfg.key_pem = key;
        cfg.root_pem = root;
        cfg.trust_domain = TD;
        cfg.require_peer_cert = true;

        cfg.key_pem = wkey; /* key of another certificate */
        CHECK_INT_EQ(wp_tls_ctx_new(&cfg, &ctx, &desc), -EINVAL);
        CHECK_STR_EQ(desc, "private key does not match certificate");
        cfg.key_pem = key;

        cfg.cert_chain_pem = "not a pem";
        CHECK_INT_EQ(wp_tls_ctx_new(&cfg, &ctx, &desc), -EINVAL);
        CHECK(desc && strstr(desc, "certificate chain"));
        cfg.cert_chain_pem = chain;

        cfg.key_pem = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        CHECK_INT_EQ(wp_tls_ctx_new(&cfg, &ctx, &desc), -EINVAL);
        CHECK(desc && strstr(desc, "private key"));
        cfg.key_pem = key;

        cfg.root_pem = "";
        CHECK_INT_EQ(wp_tls_ctx_new(&cfg, &ctx, &desc), -EINVAL);
        CHECK(desc && strstr(desc, "root"));
        cfg.root_pem = root;

        cfg.trust_domain = "";
        CHECK_INT_EQ(wp_tls_ctx_new(&cfg, &ctx, &desc), -EINVAL);
        cfg.trust_domain = TD;

        cfg.cert_chain_pem = NULL; /* a server needs a certificate */
        cfg.key_pem = NULL;
        CHECK_INT_EQ(wp_tls_ctx_new(&cfg, &ctx, &desc), -EINVAL);
        cfg.cert_chain_pem = chain; /* cert without key */
        CHECK_INT_EQ(wp_tls_ctx_new(&cfg, &ctx, &desc), -EINVAL);
        cfg.key_pem = key;

        CHECK(ctx == NULL);
        CHECK_INT_EQ(wp_tls_ctx_new(&cfg, &ctx, &desc), 0);
        ctx = wp_tls_ctx_unref(ctx);
        CHECK(ctx == NULL);
        CHECK_INT_EQ(ERR_peek_error(), 0);
        wp_free(chain);
        wp_free(key);
        wp_free(wkey);
        wp_free(root);
}

static void test_ctx_refcount_outlives_owner(void)
{
        struct wp_tls_ctx *sc = make_ctx(true, "waypoint", "root", TD);
        struct ep c, s;

        REQUIRE(sc);
        CHECK(wp_tls_ctx_ref(sc) == sc);
        CHECK(wp_tls_ctx_unref(sc) == NULL);
        ep_new_wp(&s, sc);
        REQUIRE(s.t);
        sc = wp_tls_ctx_unref(sc); /* the connection keeps it alive */
        ep_new_wp(&c, client_ctx);
        pump_handshake(&c, &s, 65536);
        CHECK_INT_EQ(c.hs, 0);
        CHECK_INT_EQ(s.hs, 0);
        ep_done(&c);
        ep_done(&s);
        CHECK(wp_tls_free(NULL) == NULL);
        CHECK(wp_tls_ctx_unref(NULL) == NULL);
        CHECK(wp_tls_ctx_ref(NULL) == NULL);
}

struct fa_arg {
        struct wp_tls_ctx_config cfg;
};

static int ctx_new_body(void *arg)
{
        struct fa_arg *a = arg;
        struct wp_tls_ctx *ctx = NULL;
        const char *desc = NULL;
        int r = wp_tls_ctx_new(&a->cfg, &ctx, &desc);

        if (r < 0) {
                /* Only the injected failure may happen, and it must be reported as such. */
                CHECK_INT_EQ(r, -ENOMEM);
                CHECK(desc != NULL);
                return r;
        }
        wp_tls_ctx_unref(ctx);
        return 0;
}

static int tls_new_body(void *arg)
{
        struct wp_tls *t = NULL;
        int r = wp_tls_new(arg, &t);

        if (r < 0)
                return r;
        wp_tls_free(t);
        return 0;
}

static void test_failalloc_ctx_new_and_tls_new(void)
{
        struct fa_arg a = {0};
        unsigned n;

        a.cfg.server = true;
        a.cfg.cert_chain_pem = pki_read("chained-waypoint", ".pem");
        a.cfg.key_pem = pki_read("chained-waypoint", ".key");
        a.cfg.root_pem = pki_read("root", ".pem");
        a.cfg.trust_domain = TD;
        a.cfg.require_peer_cert = true;
        n = check_failalloc_run(ctx_new_body, &a);
        CHECK(n >= 2); /* the ctx and the trust domain copy */
        a.cfg.trust_domain = NULL;
        CHECK(check_failalloc_run(ctx_new_body, &a) >= 1);
        n = check_failalloc_run(tls_new_body, client_ctx);
        CHECK(n >= 1);
        CHECK_INT_EQ(ERR_peek_error(), 0);
        wp_free((char *)a.cfg.cert_chain_pem);
        wp_free((char *)a.cfg.key_pem);
        wp_free((char *)a.cfg.root_pem);
}

int main(void)
{
        pki_setup();
        server_ctx = make_ctx(true, "waypoint", "root", TD);
        client_ctx = make_ctx(false, "client", "root", TD);
        if (!server_ctx || !client_ctx)
                return 99;

        RUN(test_handshake_verifies_both_identities);
        RUN(test_handshake_one_byte_at_a_time);
        RUN(test_handshake_sends_intermediates);
        RUN(test_data_flows_both_ways);
        RUN(test_partial_record_reads_eagain);
        RUN(test_close_notify_reads_zero);
        RUN(test_server_rejects_missing_client_cert);
        RUN(test_server_rejects_client_from_other_root);
        RUN(test_server_rejects_other_trust_domain);
        RUN(test_server_rejects_other_trust_domain_one_byte_at_a_time);
        RUN(test_server_rejects_expired_client);
        RUN(test_server_rejects_client_without_uri_san);
        RUN(test_server_rejects_client_with_two_uri_sans);
        RUN(test_server_rejects_client_with_bad_spiffe_id);
        RUN(test_client_rejects_server_in_other_trust_domain);
        RUN(test_client_rejects_server_from_other_root);
        RUN(test_trust_domain_null_accepts_any_domain);
        RUN(test_server_rejects_tls12_client);
        RUN(test_server_rejects_http11_alpn);
        RUN(test_server_rejects_missing_alpn);
        RUN(test_server_accepts_h2_among_other_alpn);
        RUN(test_client_rejects_server_without_alpn);
        RUN(test_server_rejects_garbage);
        RUN(test_write_before_handshake_fails);
        RUN(test_client_output_starts_with_client_hello);
        RUN(test_ctx_reports_own_identity);
        RUN(test_ctx_new_rejects_bad_config);
        RUN(test_ctx_refcount_outlives_owner);
        RUN(test_failalloc_ctx_new_and_tls_new);

        wp_tls_ctx_unref(server_ctx);
        wp_tls_ctx_unref(client_ctx);
        pki_teardown();
        return check_exit();
}
